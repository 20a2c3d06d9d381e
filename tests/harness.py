"""The architecture round trip every model test shares: tiny random config -> file -> detect -> load -> same module.

An architecture test builds a small module directly (a reference class written in the test, the registry package's
own class, diffusers, spandrel, or the pack's class from its constructor), computes its output on a fixed input, and
hands the state dict to `check_roundtrip`. The harness then, for each file format:

1. writes the state dict to a file in a models folder of its own (`.safetensors` with optional metadata; `.pth`
   with `torch.save`, of `pth_object` when the file wraps the weights, e.g. `{"g_ema": sd}` or `{"params_ema": sd}`);
2. loads it by name through a fresh `ModelManager` over that folder (the path every node takes: the safe readers of
   models/loading.py, the registry's detectors, the family check, placement on the CPU);
3. checks the descriptor facts given (`facts`, dotted names into the descriptor: "architecture", "model.z_dim",
   "config.channels", "size_requirements.multiple_of", ...) and that the module is in eval mode without gradients;
4. on the first format, that `run(model)` equals `expected` within `tol`; on the others (to keep tests fast), that
   the loaded module holds the same tensors, tensor for tensor, and `to_json()` gives the same facts.

`expected` must not be flat (a comparison against a constant proves little): the harness refuses one whose spread is
below `10 * tol`. It returns the first format's descriptor for the test's own further checks.

    from harness import check_roundtrip, load_file   # tests/ is on pytest's pythonpath

    ref = TutorialGenerator(nz=16, ngf=8, nc=1, n_up=3).eval()
    z = torch.randn(5, 16)
    desc = check_roundtrip(tmp_path, ref.state_dict(), run=lambda g: g(z), expected=ref(z), folder="gans",
                           family="gan", facts={"architecture": "DCGAN", "model.z_dim": 16, "model.c_dim": 0})

Families to come use it the same way: a diffusion UNet against diffusers' UNet2DModel on a fixed (x, sigma), a
style network against its reference class on a fixed image, an inpainter against spandrel on (image, mask).
`load_file` is the single-format step alone (write, load through a fresh manager) for tests that only need the
descriptor, e.g. to check refusals, receptive fields or tiling on it.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import save_file

from atelier.models.descriptor import ModelDescriptor
from atelier.models.manager import ModelManager

FORMATS = ("safetensors", "pth")
_MISSING = object()


def write_model(
    path: pathlib.Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    pth_object: Any = None,
) -> pathlib.Path:
    """Write `state_dict` as `.safetensors` (with `metadata`) or `.pth` (`torch.save` of `pth_object` or the dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        flat, seen = {}, set()
        for k, v in state_dict.items():  # safetensors refuses tensors that share storage: copy only those
            v = v.detach().contiguous()
            ptr = v.untyped_storage().data_ptr()
            flat[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
        save_file(flat, str(path), metadata=dict(metadata) if metadata else None)
    else:
        torch.save(pth_object if pth_object is not None else dict(state_dict), path)
    return path


def load_file(
    tmp_path: pathlib.Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    fmt: str = "safetensors",
    folder: str = "gans",
    family: str | tuple[str, ...] | None = None,
    name: str = "tiny",
    metadata: Mapping[str, str] | None = None,
    pth_object: Any = None,
) -> ModelDescriptor:
    """Write the weights into `<tmp>/harness-<fmt>/<folder>/<name>.<fmt>`; load by name through a fresh manager."""
    root = tmp_path / f"harness-{fmt}"
    write_model(root / folder / f"{name}.{fmt}", state_dict, metadata=metadata, pth_object=pth_object)
    manager = ModelManager(str(root), device=torch.device("cpu"))
    return manager.load(f"{name}.{fmt}", folder, family=family)


def fact(desc: ModelDescriptor, dotted: str) -> Any:
    """`desc` followed along a dotted name: attributes of objects, keys of dicts ("config.channels")."""
    value: Any = desc
    for part in dotted.split("."):
        got = value.get(part, _MISSING) if isinstance(value, Mapping) else getattr(value, part, _MISSING)
        if got is _MISSING:
            raise AssertionError(f"descriptor fact {dotted!r}: {part!r} not found in {type(value).__name__}")
        value = got
    return value


def _comparable(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k != "source"}


def _assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{what}: different state-dict keys"
    for k, v in sa.items():
        assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), f"{what}: tensor {k!r} differs"


def check_roundtrip(
    tmp_path: pathlib.Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    run: Callable[[torch.nn.Module], torch.Tensor],
    expected: torch.Tensor,
    facts: Mapping[str, Any] | None = None,
    folder: str = "gans",
    family: str | tuple[str, ...] | None = None,
    formats: Sequence[str] = FORMATS,
    name: str = "tiny",
    metadata: Mapping[str, str] | None = None,
    pth_object: Any = None,
    tol: float = 1e-5,
) -> ModelDescriptor:
    """Each format through a fresh manager: the same facts, and `run(model)` equal to `expected` within `tol`.

    `name` is the file's stem (some architectures read a variant from it, e.g. "taesdxl_decoder"); a fact's expected
    value may be `pytest.approx(...)`.
    """
    expected = expected.detach().float()
    spread = (expected - expected.mean()).abs().max().item()
    assert spread > 10 * tol, f"expected output is flat (spread {spread:.3g}): the comparison would prove little"
    descs: list[ModelDescriptor] = []
    for fmt in formats:
        desc = load_file(tmp_path, state_dict, fmt=fmt, folder=folder, family=family, name=name, metadata=metadata,
                         pth_object=pth_object)
        for dotted, want in (facts or {}).items():
            got = fact(desc, dotted)
            assert got == want, f"{fmt}: descriptor {dotted} = {got!r}, expected {want!r}"
        assert not desc.model.training, f"{fmt}: loaded module left in training mode"
        assert not any(p.requires_grad for p in desc.model.parameters()), f"{fmt}: parameters require grad"
        if descs:  # compared before any module runs (some re-parameterise their weights on the first call)
            assert _comparable(desc.to_json()) == _comparable(descs[0].to_json()), f"{fmt}: facts differ by format"
            _assert_same_tensors(desc.model, descs[0].model, f"{fmt} vs {formats[0]}")
        descs.append(desc)
    with torch.no_grad():
        out = run(descs[0].model)
    what = f"{formats[0]}: output"
    assert out.shape == expected.shape, f"{what} shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    err = (out.detach().float() - expected).abs().max().item()
    assert err <= tol, f"{what}: max abs difference {err:.3g} from the directly built module (tolerance {tol:g})"
    return descs[0]
