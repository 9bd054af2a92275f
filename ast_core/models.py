"""Networks for distillation and cross-architecture evaluation (docs/method.md sections 1 and 8).

`convnet` is the ConvNet-D of the MTT/AST reference code: D blocks of Conv3x3 -> instance norm (GroupNorm
with one group per channel, affine) -> ReLU -> AvgPool2x2, then one linear classifier. `resnet18`, `vgg11`
and `alexnet` follow the structure of MTT's `networks.py`, the cross-architecture nets its and AST's
published numbers use: ResNet-18 and VGG-11 with instance norm, AlexNet without normalisation.
`resnet18_bn` and `vgg11_bn` are torchvision's batch-norm versions with stems adapted to small images.

`FlatModel` gives a functional view of any of them: one flat parameter vector in, logits out. The
distillation unroll differentiates through a sequence of such vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.func import functional_call

from ast_core.settings import ARCHITECTURES

CONVNET_DEPTH_BY_SIZE = {28: 3, 32: 3, 64: 4, 128: 5}
VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # conv widths, "M" max-pool


def default_depth(image_size: int) -> int:
    """ConvNet depth so that the last feature map is 4x4 (3 for 28/32 px, 4 for 64, 5 for 128)."""
    if image_size in CONVNET_DEPTH_BY_SIZE:
        return CONVNET_DEPTH_BY_SIZE[image_size]
    return max(1, round(math.log2(max(image_size, 8) / 4)))


def instance_norm(channels: int) -> nn.GroupNorm:
    """MTT's 'instancenorm': one group per channel with a learned scale and shift (no batch statistics)."""
    return nn.GroupNorm(channels, channels, affine=True)


def pool_2x2(x: Tensor) -> Tensor:
    """2x2 average pooling (stride 2) of an even map as two strided adds: the same sums as `F.avg_pool2d`,
    faster than its CPU kernel (BENCHMARKS.md, section d). No autograd of its own (see `AvgPool2x2`)."""
    n, c, h, w = x.shape
    pairs = x.view(n, c, h, w // 2, 2)
    rows = (pairs[..., 0] + pairs[..., 1]).view(n, c, h // 2, 2, w // 2)
    return (rows[:, :, :, 0] + rows[:, :, :, 1]).mul_(0.25)


class _Pool2x2(torch.autograd.Function):
    """`pool_2x2` with its gradient written out (grad / 4 on each window), itself differentiable, so
    second derivatives (the input-gradient penalty) work."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return pool_2x2(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        n, c, h, w = grad.shape
        return (grad * 0.25).view(n, c, h, 1, w, 1).expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class AvgPool2x2(nn.AvgPool2d):
    """`nn.AvgPool2d(2, 2)` computed by `pool_2x2` on even maps (the CPU kernel on odd ones)."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            return super().forward(x)
        return _Pool2x2.apply(x)


@contextmanager
def native_cpu_convolution(x: Tensor, weight: Tensor) -> Iterator[None]:
    """Inside: a CPU convolution of one input channel per group (a grey image's first layer) uses PyTorch's
    native kernel instead of oneDNN's, several times faster there (BENCHMARKS.md, section d); any other
    convolution keeps the default."""
    if x.device.type != "cpu" or weight.shape[1] != 1:
        yield
        return
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


class PixelConv2d(nn.Conv2d):
    """The first convolution of a grey image: its forward pass under `native_cpu_convolution`."""

    def forward(self, x: Tensor) -> Tensor:
        with native_cpu_convolution(x, self.weight):
            return super().forward(x)


def first_padding(image_size: int, padding: int) -> int:
    """Padding of a network's first conv: 2 more for 28 px inputs, so the map is 32 px as in the MTT code."""
    return padding + 2 if image_size == 28 else padding


def _check_map(size: int, arch: str, image_size: int) -> None:
    if size < 1:
        raise ValueError(f"image_size={image_size} is too small for {arch}: the feature map vanishes")


class ConvNet(nn.Module):
    """ConvNet-D with instance norm. 28x28 inputs are padded in the first conv to a 32x32 map."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 128,
                 depth: int | None = None) -> None:
        super().__init__()
        depth = depth or default_depth(image_size)
        self.shape = (in_channels, num_classes, image_size, width, depth)
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for block in range(depth):
            padding = first_padding(image_size, 1) if block == 0 else 1
            conv = PixelConv2d if channels == 1 else nn.Conv2d
            layers.append(conv(channels, width, kernel_size=3, padding=padding))
            size = size + 2 * padding - 2
            layers += [instance_norm(width), nn.ReLU(inplace=False), AvgPool2x2()]
            channels, size = width, size // 2
        if size < 1:
            raise ValueError(f"depth={depth} is too deep for image_size={image_size}: "
                             "the feature map vanishes")
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class ConvNetEnsemble(nn.Module):
    """K ConvNets of one shape run as one network: a K x B x C x H x W batch (network k's inputs at k) gives
    K x B x classes logits.

    Network k owns channels k * width ... (k + 1) * width of every layer: the convolutions are grouped
    (groups = K), instance norm is per channel anyway, ReLU and pooling are elementwise, and the classifier
    is one batched matrix product. So each layer is one kernel call for all K networks, and the gradient of
    a sum of per-network losses is each network's own gradient: training the ensemble with an elementwise
    optimiser (SGD) trains the K networks exactly as one at a time would (the batched evaluation of
    docs/method.md section 5). Built from the K networks' current weights (copied); `split` gives them back.
    """

    def __init__(self, networks: Sequence[ConvNet]) -> None:
        super().__init__()
        if not networks or any(not isinstance(net, ConvNet) for net in networks):
            raise ValueError("networks must be a non-empty sequence of ConvNet")
        if len({net.shape for net in networks}) != 1:
            raise ValueError("networks must all have the same ConvNet shape (width, depth, input, classes)")
        self.num_networks = count = len(networks)
        self.shape = networks[0].shape
        layers: list[nn.Module] = []
        for index, layer in enumerate(networks[0].features):
            same = [net.features[index] for net in networks]
            if isinstance(layer, nn.Conv2d):
                merged: nn.Module = type(layer)(layer.in_channels * count, layer.out_channels * count,
                                              layer.kernel_size, padding=layer.padding, groups=count,
                                              device="meta")
            elif isinstance(layer, nn.GroupNorm):
                merged = nn.GroupNorm(layer.num_groups * count, layer.num_channels * count, eps=layer.eps,
                                      device="meta")
            else:
                layers.append(layer)  # ReLU, AvgPool2d: no parameters, elementwise or per channel
                continue
            for name, _ in layer.named_parameters():
                setattr(merged, name, nn.Parameter(torch.cat([getattr(m, name).detach() for m in same])))
            layers.append(merged)
        self.features = nn.Sequential(*layers)
        self.weight = nn.Parameter(torch.stack([net.classifier.weight.detach() for net in networks]))
        self.bias = nn.Parameter(torch.stack([net.classifier.bias.detach() for net in networks]))

    def forward(self, x: Tensor) -> Tensor:
        count, batch = x.shape[:2]
        if count != self.num_networks:
            raise ValueError(f"x has {count} input batches for {self.num_networks} networks")
        features = self.features(x.transpose(0, 1).reshape(batch, count * x.shape[2], *x.shape[3:]))
        features = features.reshape(batch, count, -1).transpose(0, 1)  # K x B x (width * size * size)
        return torch.baddbmm(self.bias.unsqueeze(1), features, self.weight.transpose(1, 2))

    def split(self) -> list[ConvNet]:
        """The K networks as separate ConvNets holding the ensemble's current weights (copies)."""
        merged = [layer for layer in self.features if isinstance(layer, (nn.Conv2d, nn.GroupNorm))]
        networks = []
        for k in range(self.num_networks):
            with torch.device("meta"):
                net = ConvNet(*self.shape)
            net = net.to_empty(device=self.weight.device).to(self.weight.dtype)
            single = [layer for layer in net.features if isinstance(layer, (nn.Conv2d, nn.GroupNorm))]
            with torch.no_grad():
                for own, joint in zip(single, merged, strict=True):
                    for name, param in own.named_parameters():
                        param.copy_(getattr(joint, name).chunk(self.num_networks)[k])
                net.classifier.weight.copy_(self.weight[k])
                net.classifier.bias.copy_(self.bias[k])
            networks.append(net)
        return networks


class Network(nn.Module):
    """A feature stack and a linear classifier on its flattened output: the `embed`/`classifier` interface."""

    def __init__(self, features: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class BasicBlock(nn.Module):
    """ResNet basic block with instance norm; a strided 1x1 conv + norm shortcut where the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = instance_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = instance_norm(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False), instance_norm(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def _resnet18(in_channels: int, num_classes: int, image_size: int) -> Network:
    """MTT's ResNet-18: 3x3 stride-1 stem, stages of 64/128/256/512 channels (strides 1, 2, 2, 2), two
    basic blocks each, global average pool (MTT's 4x4 pool of the 4x4 map at 28/32 px), Linear(512).

    Above 64 px the stem is the ImageNet one (7x7 stride 2 + max-pool), as MTT's ResNet18ImageNet.
    """
    if image_size <= 64:
        stem = [nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False), instance_norm(64),
                nn.ReLU()]
    else:
        stem = [nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False), instance_norm(64),
                nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]
    blocks, channels = [], 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        blocks += [BasicBlock(channels, width, stride), BasicBlock(width, width, 1)]
        channels = width
    return Network(nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1)), nn.Linear(512, num_classes))


def _vgg11(in_channels: int, num_classes: int, image_size: int) -> Network:
    """MTT's VGG-11: eight Conv3x3 -> instance norm -> ReLU, five max-pools, a linear classifier on the
    flattened map (512 values at 28/32 px; 28 px is padded to 32 in the first conv)."""
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for item in VGG11_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            size //= 2
            continue
        padding = first_padding(image_size, 1) if not layers else 1
        layers += [nn.Conv2d(channels, item, kernel_size=3, padding=padding), instance_norm(item), nn.ReLU()]
        channels, size = item, size + 2 * padding - 2
    _check_map(size, "vgg11", image_size)
    return Network(nn.Sequential(*layers), nn.Linear(channels * size * size, num_classes))


def _alexnet(in_channels: int, num_classes: int, image_size: int) -> Network:
    """MTT's AlexNet, no normalisation: Conv5x5 128 and 192 each with a max-pool, Conv3x3 256, 192, 192 and
    a max-pool, a linear classifier on the flattened map (192 x 4 x 4 at 28/32 px)."""
    padding = first_padding(image_size, 2)
    features = nn.Sequential(
        nn.Conv2d(in_channels, 128, kernel_size=5, padding=padding), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(128, 192, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(192, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 192, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(192, 192, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
    )
    size = (image_size + 2 * padding - 4) // 8  # the first conv's map, then three 2x2 pools
    _check_map(size, "alexnet", image_size)
    return Network(features, nn.Linear(192 * size * size, num_classes))


def _resnet18_bn(in_channels: int, num_classes: int, image_size: int) -> Network:
    """torchvision's ResNet-18 (batch norm) with a CIFAR-style stem (3x3 conv, stride 1, no max-pool) up to 64 px."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    if image_size <= 64:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    classifier = net.fc
    net.fc = nn.Identity()
    return Network(net, classifier)


def _vgg11_bn(in_channels: int, num_classes: int, image_size: int) -> Network:
    """torchvision's VGG-11 with batch norm; the max-pools that would shrink a small map below 1x1 are dropped."""
    net = torchvision.models.vgg11_bn(num_classes=num_classes)
    layers = list(net.features)
    layers[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    size, kept = image_size, []
    for layer in layers:
        if isinstance(layer, nn.MaxPool2d):
            if size < 2:
                continue
            size //= 2
        kept.append(layer)
    return Network(nn.Sequential(*kept, nn.AdaptiveAvgPool2d(1)), nn.Linear(512, num_classes))


_BUILDERS: dict[str, Callable[[int, int, int], Network]] = {
    "resnet18": _resnet18, "vgg11": _vgg11, "alexnet": _alexnet, "resnet18_bn": _resnet18_bn,
    "vgg11_bn": _vgg11_bn,
}


@torch.no_grad()
def batched_features(feature_fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 512) -> Tensor:
    """Apply `feature_fn` (e.g. a trained model's `embed`) to `x` in batches without building a graph."""
    return torch.cat([feature_fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, width: int = 128,
                depth: int | None = None) -> nn.Module:
    """Build an architecture by name; every result has `.embed(x)` and `.classifier`.

    `width` and `depth` shape the ConvNet only; the other networks have the fixed widths of their reference.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"arch={name!r} is not supported; allowed: {', '.join(ARCHITECTURES)}")
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size),
                       ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer")
    if name == "convnet":
        return ConvNet(in_channels, num_classes, image_size, width=width, depth=depth)
    return _BUILDERS[name](in_channels, num_classes, image_size)


class FlatModel:
    """Functional view of a module: parameters as one flat vector (MTT's "flat_param" student).

    `forward(flat, x)` runs the module with its parameters replaced by views into `flat`, so a chain
    flat_0 -> flat_1 -> ... built from autograd ops stays differentiable end to end. Buffers (batch-norm
    statistics) are taken from the module as they are.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = [(name, p) for name, p in module.named_parameters()]
        self.names: tuple[str, ...] = tuple(name for name, _ in named)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for _, p in named)
        self.layer_sizes: tuple[int, ...] = tuple(p.numel() for _, p in named)
        self.num_params = sum(self.layer_sizes)

    def flatten(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """Concatenate the module's parameters (or the given name->tensor dict) into a detached vector."""
        source = params if params is not None else dict(self.module.named_parameters())
        missing = [name for name in self.names if name not in source]
        if missing:
            raise ValueError(f"params is missing entries for {missing[:3]}")
        return torch.cat([source[name].detach().reshape(-1) for name in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into named views with the module's parameter shapes."""
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(f"flat has shape {tuple(flat.shape)}; expected a vector of {self.num_params} "
                             "values (a trajectory from another dataset or architecture?)")
        chunks = torch.split(flat, self.layer_sizes)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes,
                                                                      strict=True)}

    def load_into_module(self, flat: Tensor) -> nn.Module:
        """Copy a flat vector into the module's parameters (no graph) and return the module."""
        with torch.no_grad():
            for param, value in zip(self.module.parameters(), self.unflatten(flat).values(), strict=True):
                param.copy_(value)
        return self.module

    def forward(self, flat: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.module, self.unflatten(flat), (x,))

    __call__ = forward

    def embed(self, flat: Tensor, x: Tensor) -> Tensor:
        """Features before the final linear layer, computed with the parameters in `flat`."""
        params = {f"net.{name}": value for name, value in self.unflatten(flat).items()}
        return functional_call(_EmbedOnly(self.module), params, (x,))


class _EmbedOnly(nn.Module):
    """Adapter so `functional_call` can run a model's `embed` instead of its `forward`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.embed(x)
