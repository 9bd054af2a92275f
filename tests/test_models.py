"""Networks: reference parameter counts, flat-parameter view equals the module, all sizes run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ast_core.models import (
    AvgPool2x2,
    ConvNet,
    ConvNetEnsemble,
    FlatModel,
    PixelConv2d,
    build_model,
    default_depth,
)
from ast_core.settings import ARCHITECTURES

MTT_FORMS = ("resnet18", "vgg11", "alexnet")
NORM_LAYERS = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)


def conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def norm(channels: int) -> int:
    return 2 * channels  # scale and shift per channel (instance norm and batch norm alike)


def linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def resnet18_count(channels: int) -> int:
    """MTT ResNet-18 by hand: stem, then per stage a block with a 1x1 projection (stages 2-4) and a plain one."""
    def plain(c: int) -> int:
        return 2 * (conv(c, c, 3, bias=False) + norm(c))

    def projecting(cin: int, cout: int) -> int:
        return (conv(cin, cout, 3, bias=False) + norm(cout) + conv(cout, cout, 3, bias=False) + norm(cout)
                + conv(cin, cout, 1, bias=False) + norm(cout))

    stem = conv(channels, 64, 3, bias=False) + norm(64)
    stages = 2 * plain(64) + projecting(64, 128) + plain(128) + projecting(128, 256) + plain(256) \
        + projecting(256, 512) + plain(512)
    return stem + stages + linear(512, 10)


def vgg11_count(channels: int) -> int:
    """MTT VGG-11 by hand: eight 3x3 convs with bias, each with instance norm; the 1x1x512 map feeds the linear."""
    pairs = [(channels, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    return sum(conv(a, b, 3) + norm(b) for a, b in pairs) + linear(512, 10)


def alexnet_count(channels: int) -> int:
    """MTT AlexNet by hand: five convs with bias, no norm; a 192 x 4 x 4 map feeds the linear."""
    convs = conv(channels, 128, 5) + conv(128, 192, 5) + conv(192, 256, 3) + conv(256, 192, 3) + conv(192, 192, 3)
    return convs + linear(192 * 4 * 4, 10)


HAND_COUNTS = {"resnet18": resnet18_count, "vgg11": vgg11_count, "alexnet": alexnet_count}


@pytest.mark.parametrize(("channels", "size", "expected"), [(1, 28, 317_706), (3, 32, 320_010)])
def test_convnet3_parameter_count_matches_reference_code(channels: int, size: int, expected: int) -> None:
    model = build_model("convnet", channels, 10, size)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("arch", MTT_FORMS)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_mtt_form_parameter_count_equals_the_hand_count(arch: str, channels: int, size: int) -> None:
    model = build_model(arch, channels, 10, size)
    assert sum(p.numel() for p in model.parameters()) == HAND_COUNTS[arch](channels)


def test_hand_counts_match_the_published_cifar_sizes() -> None:
    # The CIFAR ResNet-18 and VGG-11 have 11,173,962 and 9,231,114 parameters (norm layers count 2 per channel).
    assert (resnet18_count(3), vgg11_count(3)) == (11_173_962, 9_231_114)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_mtt_forms_use_instance_norm_and_bn_options_batch_norm(arch: str) -> None:
    mtt = build_model(arch, 3, 10, 32)
    norms = [m for m in mtt.modules() if isinstance(m, NORM_LAYERS)]
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels and m.affine
                         for m in norms)
    option = build_model(f"{arch}_bn", 3, 10, 32)
    assert not any(isinstance(m, nn.GroupNorm) for m in option.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in option.modules()) == len(norms)
    # Same layer shapes, only the normalisation differs: equal parameter counts.
    assert sum(p.numel() for p in option.parameters()) == sum(p.numel() for p in mtt.parameters())


def test_alexnet_has_no_normalisation_layer() -> None:
    model = build_model("alexnet", 1, 10, 28)
    assert not any(isinstance(m, NORM_LAYERS) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 5


@pytest.mark.parametrize(("arch", "feature_dim"), [("resnet18", 512), ("vgg11", 512), ("alexnet", 192 * 4 * 4)])
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_mtt_forms_train_on_cpu(arch: str, feature_dim: int, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, channels, 10, size)
    x = torch.randn(3, channels, size, size)
    assert model.embed(x).shape == (3, feature_dim)
    logits = model(x)
    assert logits.shape == (3, 10)
    F.cross_entropy(logits, torch.tensor([0, 4, 9])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_vgg11_on_too_small_images_says_so() -> None:
    with pytest.raises(ValueError, match="image_size=8 is too small for vgg11"):
        build_model("vgg11", 1, 10, 8)


def test_convnet_depth_follows_image_size() -> None:
    assert [default_depth(s) for s in (28, 32, 64, 128)] == [3, 3, 4, 5]
    # 28 px is padded to a 32 px map, so every depth ends on a 4x4 map with width 128.
    for size in (28, 32, 64):
        assert build_model("convnet", 1, 10, size).feature_dim == 128 * 4 * 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 64)])
def test_every_architecture_runs_and_flat_view_matches(arch: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, channels, 7, size, width=16).eval()
    x = torch.randn(2, channels, size, size)
    flat_model = FlatModel(model)
    flat = flat_model.flatten()
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(flat_model(flat, x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(flat_model.embed(flat, x), model.embed(x), rtol=0, atol=0)
    assert model(x).shape == (2, 7)


def test_flat_forward_is_differentiable_in_the_flat_vector() -> None:
    model = build_model("convnet", 1, 3, 28, width=8)
    flat_model = FlatModel(model)
    flat = flat_model.flatten().requires_grad_(True)
    shifted = flat + 0.01 * torch.ones_like(flat)
    flat_model(shifted, torch.randn(4, 1, 28, 28)).sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0


def test_unflatten_round_trip_and_load_into_module() -> None:
    model = build_model("convnet", 3, 10, 32, width=8)
    flat_model = FlatModel(model)
    new_flat = torch.randn(flat_model.num_params)
    flat_model.load_into_module(new_flat)
    torch.testing.assert_close(flat_model.flatten(), new_flat)
    names = [name for name, _ in model.named_parameters()]
    assert list(flat_model.unflatten(new_flat)) == names


def test_flat_vector_of_wrong_size_is_rejected_with_a_clear_message() -> None:
    flat_model = FlatModel(build_model("convnet", 1, 10, 28, width=8))
    with pytest.raises(ValueError, match="another dataset or architecture"):
        flat_model.unflatten(torch.zeros(flat_model.num_params + 1))


def test_bad_architecture_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="arch='mlp'.*convnet"):
        build_model("mlp", 1, 10, 28)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("convnet", 1, 0, 28)


def test_convnet_ensemble_equals_its_networks_one_by_one() -> None:
    """Network k of the ensemble sees input k and gives exactly what ConvNet k gives alone; gradients of a
    sum of per-network losses are each network's own; split() returns the weights."""
    torch.manual_seed(0)
    networks = [build_model("convnet", 3, 5, 16, width=4, depth=2).double() for _ in range(3)]
    ensemble = ConvNetEnsemble(networks)
    x = torch.randn(3, 6, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(5, (3, 6))
    logits = ensemble(x)
    assert logits.shape == (3, 6, 5)
    for k, net in enumerate(networks):
        torch.testing.assert_close(logits[k], net(x[k]), rtol=0, atol=1e-12)
    sum(F.cross_entropy(logits[k], y[k]) for k in range(3)).backward()
    for k, net in enumerate(networks):
        F.cross_entropy(net(x[k]), y[k]).backward()
    conv = ensemble.features[0]
    torch.testing.assert_close(conv.weight.grad.chunk(3)[1], networks[1].features[0].weight.grad, rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(ensemble.weight.grad[2], networks[2].classifier.weight.grad, rtol=0, atol=1e-12)
    for own, back in zip(networks, ensemble.split(), strict=True):
        assert type(back) is ConvNet and back.shape == own.shape
        for (name, a), (_, b) in zip(own.named_parameters(), back.named_parameters(), strict=True):
            assert torch.equal(a, b), name


def test_convnet_ensemble_rejects_mixed_or_foreign_networks() -> None:
    with pytest.raises(ValueError, match="same ConvNet shape"):
        ConvNetEnsemble([build_model("convnet", 1, 10, 28, width=8), build_model("convnet", 1, 10, 28, width=4)])
    with pytest.raises(ValueError, match="sequence of ConvNet"):
        ConvNetEnsemble([build_model("alexnet", 1, 10, 28)])
    ensemble = ConvNetEnsemble([build_model("convnet", 1, 10, 28, width=4)] * 2)
    with pytest.raises(ValueError, match="3 input batches for 2 networks"):
        ensemble(torch.zeros(3, 1, 1, 28, 28))


def test_fast_pool_equals_avg_pool2d_with_first_and_second_derivatives() -> None:
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    pool = AvgPool2x2()
    torch.testing.assert_close(pool(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(pool, (x,)) and torch.autograd.gradgradcheck(pool, (x,))
    odd = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(pool(odd), F.avg_pool2d(odd, 2))  # odd maps: the library kernel


def test_grey_first_conv_matches_conv2d_and_restores_the_backend() -> None:
    torch.manual_seed(0)
    conv = PixelConv2d(1, 8, kernel_size=3, padding=3)
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    plain = F.conv2d(x, conv.weight, conv.bias, padding=3)
    torch.testing.assert_close(conv(x), plain, rtol=1e-5, atol=1e-5)
    assert torch.backends.mkldnn.enabled
    model = build_model("convnet", 1, 10, 28, width=8)
    assert type(model.features[0]) is PixelConv2d and type(build_model("convnet", 3, 10, 32).features[0]) is nn.Conv2d
    grad, = torch.autograd.grad(conv(x).square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(plain.square().sum(), x)[0], rtol=1e-4, atol=1e-4)
