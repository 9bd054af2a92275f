"""Expert-training loss terms of AST (docs/method.md section 2, AST Eq. 19).

L_SC = λ_e · CE + μ · E_x[(‖∇_x W(x)‖₂ − K)²]

`clipped_ce_scale` gives λ_e (the clipped cross-entropy weight), `input_gradient_norms` the quantity the
penalty constrains and `gradient_penalty` the penalty itself; `ast_core.experts` combines them. Each has the
paper's form and the authors' code form (docs/method.md section 8, items 2-3) as a named setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ast_core.settings import CLIP_SCHEDULES, GP_NORMS, GP_SIDES

CODE_CLIP_STEP, CODE_CLIP_EPOCHS = 0.05, 10   # authors' code: λ = 0.5, 0.55, …, 0.95 in epochs 0-9


def clipped_ce_scale(epoch: float, warmup_epochs: float = 5, start: float = 0.5, schedule: str = "paper") -> float:
    """λ_e of Eq. 19 for a 0-indexed epoch.

    schedule="paper": linear from `start` at epoch 0 to 1 at `warmup_epochs`, then 1 (the paper's 0.5 -> 1
    over 5 epochs; epoch 1 gives 0.6, epoch 2.5 gives 0.75). schedule="code": the authors' code, 0.5 + 0.05 ·
    epoch for the first 10 epochs, then 1, whatever `warmup_epochs` and `start` say.
    """
    if schedule not in CLIP_SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; allowed: {', '.join(CLIP_SCHEDULES)}")
    for name, value in (("epoch", epoch), ("warmup_epochs", warmup_epochs)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start={start!r} must be in [0, 1]")
    if schedule == "code":
        return 0.5 + CODE_CLIP_STEP * math.floor(epoch) if epoch < CODE_CLIP_EPOCHS else 1.0
    if epoch >= warmup_epochs:
        return 1.0
    return start + (1.0 - start) * epoch / warmup_epochs


def input_gradient_norms(model: Callable[[Tensor], Tensor], x: Tensor, norm: str = "sample",
                         create_graph: bool = False) -> Tensor:
    """‖∇_x Σ_c f(x)_c‖₂, the input sensitivity the penalty of Eq. 19 constrains.

    norm="sample": one L2 norm per sample over C, H, W (shape N; WGAN-GP, docs/method.md section 2.2). norm="pixel": the
    authors' code, one L2 norm per pixel over the channels (shape N x H x W). `x` is treated as a constant
    input; with `create_graph` the norms back-propagate into the model's parameters.
    """
    if norm not in GP_NORMS:
        raise ValueError(f"norm={norm!r} is not supported; allowed: {', '.join(GP_NORMS)}")
    if norm == "pixel" and x.dim() != 4:
        raise ValueError(f"norm='pixel' needs N x C x H x W inputs, got x of shape {tuple(x.shape)}")
    inputs = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model(inputs).sum(), inputs, create_graph=create_graph)
    if norm == "sample":
        return torch.linalg.vector_norm(grad.flatten(1), dim=1)
    return torch.linalg.vector_norm(grad, dim=1)


def gradient_penalty(model: Callable[[Tensor], Tensor], x: Tensor, target_norm: float = 1.0,
                     norm: str = "sample", sided: str = "two_sided") -> Tensor:
    """Gradient penalty of Eq. 19: mean of (‖∇_x Σ_c f(x)_c‖₂ − K)² over samples (or pixels and samples).

    sided="two_sided": the paper's formula, which also pushes norms below K *up*. sided="one_sided": only
    norms above K are penalised, mean of max(0, ‖∇‖ − K)², the paper's text ("keep the norm below K").
    The result back-propagates into the model's parameters.
    """
    if sided not in GP_SIDES:
        raise ValueError(f"sided={sided!r} is not supported; allowed: {', '.join(GP_SIDES)}")
    if not math.isfinite(target_norm) or target_norm < 0:
        raise ValueError(f"target_norm={target_norm!r} must be a finite number >= 0")
    gap = input_gradient_norms(model, x, norm, create_graph=True) - target_norm
    if sided == "one_sided":
        gap = gap.clamp_min(0.0)
    return gap.pow(2).mean()
