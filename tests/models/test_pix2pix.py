"""CycleGAN/pix2pix generators: equal to vintagify's ResnetGenerator on its real weights and to junyanz-layout
reference classes built here; receptive field and tiling properties."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from atelier.models.errors import InputError
from atelier.models.loading import read_state_dict
from atelier.models.registry import detect
from harness import check_roundtrip, load_file  # tests/ is on pytest's pythonpath
from helpers_packages import package_file, package_module

TOL = 1e-5


def randomise_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# reference classes: the junyanz/pytorch-CycleGAN-and-pix2pix layouts (networks.py), written out here


class RefResnetBlock(nn.Module):
    def __init__(self, dim, padding_type, norm_layer, use_dropout, use_bias):
        super().__init__()
        conv_block = []
        for i in range(2):
            p = 0
            if padding_type == "reflect":
                conv_block += [nn.ReflectionPad2d(1)]
            else:
                p = 1
            conv_block += [nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias), norm_layer(dim)]
            if i == 0:
                conv_block += [nn.ReLU(True)] + ([nn.Dropout(0.5)] if use_dropout else [])
        self.conv_block = nn.Sequential(*conv_block)

    def forward(self, x):
        return x + self.conv_block(x)


class RefResnetGenerator(nn.Module):
    def __init__(self, input_nc, output_nc, ngf, norm_layer, use_dropout=False, n_blocks=6, padding_type="reflect"):
        super().__init__()
        use_bias = isinstance(norm_layer, functools.partial) and norm_layer.func == nn.InstanceNorm2d
        model = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
                 norm_layer(ngf), nn.ReLU(True)]
        for i in range(2):
            mult = 2**i
            model += [nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                      norm_layer(ngf * mult * 2), nn.ReLU(True)]
        for _ in range(n_blocks):
            model += [RefResnetBlock(ngf * 4, padding_type, norm_layer, use_dropout, use_bias)]
        for i in range(2):
            mult = 2 ** (2 - i)
            model += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1,
                                         output_padding=1, bias=use_bias), norm_layer(ngf * mult // 2), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


class RefUnetBlock(nn.Module):
    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False, innermost=False,
                 norm_layer=nn.BatchNorm2d, use_dropout=False):
        super().__init__()
        self.outermost = outermost
        use_bias = isinstance(norm_layer, functools.partial) and norm_layer.func == nn.InstanceNorm2d
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu, downnorm = nn.LeakyReLU(0.2, True), norm_layer(inner_nc)
        uprelu, upnorm = nn.ReLU(True), norm_layer(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                model += [nn.Dropout(0.5)]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class RefUnetGenerator(nn.Module):
    def __init__(self, input_nc, output_nc, num_downs, ngf=64, norm_layer=nn.BatchNorm2d, use_dropout=False):
        super().__init__()
        block = RefUnetBlock(ngf * 8, ngf * 8, submodule=None, norm_layer=norm_layer, innermost=True)
        for _ in range(num_downs - 5):
            block = RefUnetBlock(ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer, use_dropout=use_dropout)
        block = RefUnetBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = RefUnetBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
        block = RefUnetBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
        self.model = RefUnetBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True,
                                  norm_layer=norm_layer)

    def forward(self, x):
        return self.model(x)


BATCH = nn.BatchNorm2d
INSTANCE = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)


def _image(size: int, batch: int = 1) -> torch.Tensor:
    """skimage's astronaut, resized, in [-1,1] (random values when scikit-image is absent)."""
    try:
        from skimage import data
    except ImportError:
        return torch.rand(batch, 3, size, size) * 2 - 1
    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255  # [1,3,512,512]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return (x * 2 - 1).expand(batch, -1, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------------------------


def test_vintagify_cyclegan_equals_package_model():
    ref_mod = package_module("vintagify", "generator.py")
    sd, meta = read_state_dict(package_file("vintagify", "resources/G_A2B_epoch33.pth"))
    desc = detect(sd, meta, "G_A2B_epoch33.pth")
    assert (desc.family, desc.architecture, desc.purpose) == ("gan", "ResnetGenerator", "ImageToImage")
    assert (desc.config["n_blocks"], desc.config["norm"], desc.config["ngf"]) == (9, "instance_affine", 64)
    assert desc.size_requirements.multiple_of == 4 and desc.scale == 1
    assert desc.config["input_range"] == desc.config["output_range"] == [-1.0, 1.0]
    ref = ref_mod.ResnetGenerator(n_blocks=9)
    ref.load_state_dict(sd)
    ref.eval()
    x = _image(64, batch=2)
    with torch.no_grad():
        ours, theirs = desc.model(x), ref(x)
    diff = (ours - theirs).abs().max().item()
    print(f"CycleGAN (vintagify) max abs diff vs vintagify.generator.ResnetGenerator: {diff:.3g}")
    assert ours.shape == x.shape
    assert diff <= TOL


@pytest.mark.parametrize(
    "norm,padding,dropout,n_blocks,in_nc,out_nc,expect_norm",
    [
        (BATCH, "reflect", False, 2, 3, 3, "batch"),
        (INSTANCE, "reflect", True, 3, 1, 3, "instance"),
        (BATCH, "zero", True, 1, 3, 1, "batch"),
    ],
)
def test_resnet_generator_layouts(tmp_path, norm, padding, dropout, n_blocks, in_nc, out_nc, expect_norm):
    ref = randomise_norms(RefResnetGenerator(in_nc, out_nc, 4, norm, dropout, n_blocks, padding))
    x = torch.rand(2, in_nc, 36, 44) * 2 - 1
    with torch.no_grad():
        expected = ref(x)
    check_roundtrip(tmp_path, ref.state_dict(), run=lambda m: m(x), expected=expected, family="gan", tol=TOL,
                    facts={"architecture": "ResnetGenerator", "config.n_blocks": n_blocks, "config.norm": expect_norm,
                           "config.dropout": dropout, "config.ngf": 4, "config.padding": padding,
                           "config.block_attr": "conv_block", "in_channels": in_nc, "out_channels": out_nc})


@pytest.mark.parametrize("num_downs,norm,expect_norm", [(7, BATCH, "batch"), (5, INSTANCE, "instance")])
def test_unet_generator(tmp_path, num_downs, norm, expect_norm):
    ref = randomise_norms(RefUnetGenerator(3, 3, num_downs, ngf=4, norm_layer=norm, use_dropout=True))
    size = 2**num_downs
    x = torch.rand(2, 3, size, 2 * size) * 2 - 1
    with torch.no_grad():
        expected = ref(x)
    check_roundtrip(tmp_path, ref.state_dict(), run=lambda m: m(x), expected=expected, family="gan", tol=TOL,
                    facts={"architecture": "UnetGenerator", "config.num_downs": num_downs, "config.ngf": 4,
                           "config.norm": expect_norm, "size_requirements.multiple_of": 2**num_downs})


def _dependence_radius(model: nn.Module, size: int, points: list[tuple[int, int]]) -> int:
    """Largest distance from an output pixel to an input pixel its value depends on (by gradients)."""
    worst = 0
    for y, x in points:
        inp = torch.randn(1, 3, size, size, requires_grad=True)
        model(inp)[0, :, y, x].sum().backward()
        ys, xs = torch.nonzero(inp.grad[0].abs().sum(0)).unbind(1)
        worst = max(worst, int((ys - y).abs().max()), int((xs - x).abs().max()))
    return worst


@pytest.mark.parametrize("kind", ["resnet", "unet"])
def test_receptive_field_is_a_tight_bound(tmp_path, kind):
    if kind == "resnet":
        ref = RefResnetGenerator(3, 3, 4, BATCH, n_blocks=2)
        size, points = 96, [(48, 48), (49, 50), (50, 51), (51, 49)]  # every phase of the stride-4 lattice
    else:
        ref = RefUnetGenerator(3, 3, 5, ngf=2)
        size, points = 256, [(128, 128), (129, 130), (131, 133)]
    desc = load_file(tmp_path, randomise_norms(ref).state_dict())
    model = desc.model.requires_grad_(True)
    radius = _dependence_radius(model, size, points)
    assert 2 * desc.receptive_field < size  # the probe is not clipped by the borders
    assert radius <= desc.receptive_field <= radius + 4


def test_tiled_equals_untiled_for_batchnorm_resnet(tmp_path):
    from atelier.models.tiling import tiled_apply

    desc = load_file(tmp_path, randomise_norms(RefResnetGenerator(3, 3, 4, BATCH, n_blocks=1)).state_dict())
    assert desc.config["tiling_exact"] is True
    x = torch.rand(1, 3, 96, 168) * 2 - 1
    with torch.no_grad():
        whole = desc.model(x)
        tiled = tiled_apply(desc.model, x, tile=88, context=desc.receptive_field, blend=4,
                            align=desc.size_requirements.multiple_of, progress=None)
        assert (tiled - whole).abs().max().item() <= 1e-6  # float rounding only (outputs here are ~0.06 in size)
        no_context = tiled_apply(desc.model, x, tile=88, context=0, blend=4, align=4, progress=None)
        assert (no_context - whole).abs().max().item() > 1e-4  # the property can fail


def test_bad_input_is_refused(tmp_path):
    desc = load_file(tmp_path, RefResnetGenerator(3, 3, 4, BATCH, n_blocks=1).eval().state_dict())
    with pytest.raises(InputError, match=r"x: expected \[B,3,H,W\]"):
        desc.model(torch.rand(1, 1, 32, 32))
    with pytest.raises(InputError, match="multiples of 4"):
        desc.model(torch.rand(1, 3, 30, 32))


def test_legacy_instance_norm_running_stats_are_ignored(tmp_path):
    """Checkpoints from old PyTorch carry InstanceNorm running stats; junyanz drops them, so do we."""
    ref = RefResnetGenerator(3, 3, 4, INSTANCE, n_blocks=1).eval()
    sd = dict(ref.state_dict())
    for name, m in ref.named_modules():
        if isinstance(m, nn.InstanceNorm2d):
            sd[f"{name}.running_mean"] = torch.zeros(m.num_features)
            sd[f"{name}.running_var"] = torch.ones(m.num_features)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = ref(x)
    check_roundtrip(tmp_path, sd, run=lambda m: m(x), expected=expected, tol=TOL)
