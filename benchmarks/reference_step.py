"""Reference trajectory-matching step, written the straightforward way of the original MTT code (Cazenavette et
al., CVPR 2022; docs/method.md section 4): the baseline that `ast_core.distill` is timed and checked against.

A `ReparamModule` sets the module's parameters to views of the flat student vector before every forward; the
N student steps keep one autograd graph each (`torch.autograd.grad(ce, params[-1], create_graph=True)`), DSA
is drawn per step, and the final loss is the normalised parameter distance (MTT Eq. 5). One call returns the
loss with the gradients of the images and of the learnable lr alpha, i.e. `Distiller`'s unrolled gradient with
every AST module off (nu = 1, no intermediate matching, no perturbation, no student momentum).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ast_core.models import AvgPool2x2, PixelConv2d

Augment = Callable[[Tensor, torch.Generator], Tensor]


def with_torch_layers(module: nn.Module) -> nn.Module:
    """A copy of `module` with the project's fast layers (`PixelConv2d`, `AvgPool2x2`) replaced by torch's
    `nn.Conv2d` and `nn.AvgPool2d`, the layers of the MTT code's ConvNet, holding the same weights."""
    net = copy.deepcopy(module)
    for name, layer in list(net.named_modules()):
        owner_path, _, attribute = name.rpartition(".")
        if isinstance(layer, PixelConv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.padding,
                              bias=layer.bias is not None).to(layer.weight)
            plain.load_state_dict(layer.state_dict())
            setattr(net.get_submodule(owner_path), attribute, plain)
        elif isinstance(layer, AvgPool2x2):
            setattr(net.get_submodule(owner_path), attribute, nn.AvgPool2d(2, 2))
    return net


class ReparamModule(nn.Module):
    """A copy of `module` (with torch's layers, `with_torch_layers`) whose parameters are plain attributes,
    re-pointed into a flat vector on each call."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.net = with_torch_layers(module)
        self.slots: list[tuple[nn.Module, str, torch.Size]] = []
        for name, param in module.named_parameters():
            owner_path, _, attribute = name.rpartition(".")
            owner = self.net.get_submodule(owner_path)
            self.slots.append((owner, attribute, param.shape))
        for owner, attribute, _ in self.slots:
            del owner._parameters[attribute]
        self.sizes = [shape.numel() for _, _, shape in self.slots]

    def forward(self, flat: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        for (owner, attribute, shape), chunk in zip(self.slots, flat.split(self.sizes), strict=True):
            setattr(owner, attribute, chunk.view(shape))
        return self.net(x)


def reference_gradients(net: ReparamModule, images: Tensor, labels: Tensor, batches: Sequence[Tensor],
                        start: Tensor, target: Tensor, syn_lr: Tensor, augment: Augment,
                        generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, d loss / d images, d loss / d alpha) of N = len(batches) unrolled student steps, as MTT does it."""
    images = images.detach().requires_grad_(True)
    syn_lr = syn_lr.detach().requires_grad_(True)
    student_params = [start.detach().clone().requires_grad_(True)]
    for batch in batches:
        x = augment(images[batch], generator)
        ce = F.cross_entropy(net(student_params[-1], x), labels[batch])
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    param_loss = F.mse_loss(student_params[-1], target, reduction="sum")
    param_dist = F.mse_loss(start, target, reduction="sum")
    loss = param_loss / param_dist
    loss.backward()
    return loss.detach(), images.grad, syn_lr.grad
