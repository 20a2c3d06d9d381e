"""Safe loading: crafted malicious pickles never run, broken files give clear errors, wrappers are unwrapped."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from atelier.models import loading
from atelier.models.errors import ModelLoadError, UnsafeFileError

TORCH_EXTS = [".pth", ".ckpt", ".pt", ".bin"]


class _Payload:
    """Pickles to `func(arg)`: what an attacker's model file does on a plain torch.load / pickle.load."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker: str):
    """(name, object) pairs whose unpickling would create `marker` by running code."""
    cmd = f"touch {marker}"
    code = f"open({marker!r}, 'w').write('pwned')"
    return [
        ("os.system", _Payload(os.system, cmd)),
        ("builtins.exec", _Payload(exec, code)),
        ("builtins.eval", _Payload(eval, code)),
        ("subprocess.Popen", _Payload(subprocess.Popen, ["touch", marker])),
        ("subprocess.call", _Payload(subprocess.call, ["touch", marker])),
    ]


def _write_torch_zip(path, obj):
    torch.save(obj, path)  # torch's zip container; the pickle inside carries the payload


def _write_legacy_pickle(path, obj):
    with open(path, "wb") as f:  # plain pickle stream, as very old .pth/.ckpt files are
        pickle.dump(obj, f, protocol=2)


@pytest.mark.parametrize("ext", TORCH_EXTS)
@pytest.mark.parametrize("writer", [_write_torch_zip, _write_legacy_pickle])
def test_malicious_pickles_are_refused_and_never_run(tmp_path, ext, writer):
    marker = tmp_path / "pwned"
    for name, payload in _payloads(str(marker)):
        path = tmp_path / f"evil_{name.replace('.', '_')}{ext}"
        writer(path, {"state_dict": {"weight": torch.zeros(2)}, "x": payload})
        with pytest.raises(UnsafeFileError) as err:
            loading.read_state_dict(path)
        assert path.name in str(err.value)
        assert "Nothing in it was run" in str(err.value)
        assert not marker.exists(), f"payload {name} ran while loading {path.name}"


def test_unsafe_error_names_the_global(tmp_path):
    path = tmp_path / "evil.pth"
    _write_torch_zip(path, {"w": torch.zeros(1), "p": _Payload(os.system, "true")})
    with pytest.raises(UnsafeFileError, match=r"posix\.system|os\.system|nt\.system"):
        loading.read_state_dict(path)


def test_malicious_file_through_cli_inspect_does_not_run(tmp_path):
    """The same refusal through `atelier models inspect` in a fresh process (no payload runs there either)."""
    import atelier.cli.main  # noqa: F401  (a broken import of the pack fails here, not as a skip)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    _write_torch_zip(path, {"w": torch.zeros(1), "p": _Payload(os.system, f"touch {marker}")})
    r = subprocess.run([sys.executable, "-m", "atelier", "models", "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "refused" in (r.stdout + r.stderr)
    assert "Traceback" not in r.stderr
    assert not marker.exists()


def test_torchscript_archive_weights_read_without_running_it(tmp_path):
    """A TorchScript archive goes through the allow-listing reader (tests/models/test_torchscript_weights.py)."""
    lin = torch.nn.Linear(2, 2)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(lin), str(path))
    sd, meta = loading.read_state_dict(path)
    assert meta["format"] == "torchscript"
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight)


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_truncated_and_corrupted_files(tmp_path, ext):
    good = tmp_path / f"good{ext}"
    sd = {"conv.weight": torch.randn(8, 3, 3, 3), "conv.bias": torch.randn(8)}
    (save_file(sd, good) if ext == ".safetensors" else torch.save(sd, good))
    data = good.read_bytes()
    trunc = tmp_path / f"trunc{ext}"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / f"junk{ext}"
    junk.write_bytes(os.urandom(4096))
    for bad in (trunc, junk):
        with pytest.raises(ModelLoadError) as err:
            loading.read_state_dict(bad)
        assert bad.name in str(err.value)
    out, _ = loading.read_state_dict(good)
    assert torch.equal(out["conv.weight"], sd["conv.weight"])


def test_unsupported_extension_and_missing(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported extension"):
        loading.read_state_dict(p)
    with pytest.raises(ModelLoadError, match="not found"):
        loading.read_state_dict(tmp_path / "nope.pth")


def test_canonicalise_prefers_ema_and_strips_module(tmp_path):
    ema = {"module.a": torch.ones(2), "module.b": torch.ones(3)}
    raw = {"module.a": torch.zeros(2), "module.b": torch.zeros(3)}
    path = tmp_path / "wrapped.pth"
    torch.save({"params": raw, "params_ema": ema, "iter": 5}, path)
    sd, _meta = loading.read_state_dict(path)
    assert set(sd) == {"a", "b"} and torch.equal(sd["a"], torch.ones(2))
    path2 = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"params_ema": {"w": torch.ones(1)}}, "latent_avg": torch.full((4,), 2.0)}, path2)
    sd2, meta2 = loading.read_state_dict(path2)
    assert set(sd2) == {"w"} and torch.equal(meta2["latent_avg"], torch.full((4,), 2.0))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelLoadError, match="expected a state dict"):
        loading.read_state_dict(path)


def test_safetensors_metadata_json(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1)}, path, metadata={"init_kwargs": '{"z_dim": 4}', "note": "hi"})
    _sd, meta = loading.read_state_dict(path)
    assert meta["init_kwargs"] == {"z_dim": 4} and meta["note"] == "hi"


@pytest.mark.parametrize("ext", [".pth", ".tar", ".ckpt", ".pkl", ".safetensors"])
@pytest.mark.parametrize("text", ["a", "README\n======\n", "<html><body>404 Not Found</body></html>", ")"])
def test_text_file_renamed_as_a_model_names_the_file(tmp_path, ext, text):
    """A note or a download page saved under a model's name: one ModelLoadError naming the file (issue 16: some
    texts gave a bare `IndexError: pop from empty list` from the unpickler)."""
    p = tmp_path / f"notes{ext}"
    p.write_text(text)
    with pytest.raises(ModelLoadError, match=rf"'notes{ext}' is a text file, not a model") as err:
        loading.read_state_dict(p)
    assert text.strip().splitlines()[0][:20] in str(err.value)


def test_text_file_through_cli_inspect_is_one_line(tmp_path):
    import atelier.cli.main  # noqa: F401  (a broken import of the pack fails here, not as a skip)
    p = tmp_path / "model.tar"
    p.write_text("e\n")
    r = subprocess.run([sys.executable, "-m", "atelier", "models", "inspect", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "'model.tar' is a text file" in r.stderr, r.stderr


def test_owned_float32_lets_go_of_the_file(tmp_path):
    """Copies that share no memory with the tensors read from the (mapped) file, equal in value, float32, and 4-D
    ones channels-last when asked; the originals' storages are never reused."""
    g = torch.Generator().manual_seed(0)
    tensors = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
               "half": torch.randn(5, generator=g).half()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    sd, _ = loading.read_state_dict(path)
    owned = loading.owned_float32(sd, channels_last=True)
    file_ptrs = {v.untyped_storage().data_ptr() for v in sd.values()}
    assert all(v.untyped_storage().data_ptr() not in file_ptrs for v in owned.values())
    assert all(v.dtype == torch.float32 for v in owned.values())
    assert owned["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert owned["conv.bias"].is_contiguous()
    for k, v in tensors.items():
        assert torch.equal(owned[k], v.float())
