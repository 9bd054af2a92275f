"""TESLA: the trajectory-matching gradient with memory constant in N (Cui et al., ICML 2023; docs/method.md section 4).

The unrolled student (MTT) is theta_N = theta_0 - alpha sum_i g_i with g_i = nu grad_theta CE(theta_{i-1}; X_i)
and the loss (MTT Eq. 5) is L = ||theta_N - theta*||^2 / D with D = ||theta*_t - theta*_{t+M}||^2. Write
r = theta_N - theta* = (theta_0 - theta*) - alpha G, G = sum_i g_i.

TESLA treats every theta_{i-1} as a constant when differentiating g_i (it drops the paths through which X_j,
j < i, and alpha reach theta_{i-1}). Then each step contributes independently:

    dL/dX_i   = dL/dg_i . dg_i/dX_i = v^T dg_i/dX_i,   v = dL/dg_i = -2 alpha r / D
              = (2 alpha (theta* - theta_0) + 2 alpha^2 G)^T dg_i/dX_i / D      (TESLA paper, Eq. 6 form)
    dL/dalpha = -2 r^T G / D

v is the same vector for every step, so one pass without any graph gives theta_N, G and v; a second pass
recomputes each step's gradient with a graph (one step alive at a time) and back-propagates v^T g_i into the
images, including through that step's DSA draw (replayed from the saved generator state).

We follow the *exact* derivative of this objective, factor 2 included. The authors' code computes
`2 * torch.autograd.grad(...)`, which repeats the returned tuple instead of doubling it, so its image
gradient is half of this one (their issue #5). The result equals the unrolled gradient exactly for N = 1 and
approximates it for N > 1: relative to the kept terms, the dropped ones grow like alpha ||H|| times the number
of later steps (tests/test_tesla.py: 1.7e-2 on the images at N = 4, alpha = 0.01; 1.1e-1 at alpha = 0.05).
Not supported: intermediate matching (Eq. 22) and student momentum (`DistillConfig` rejects them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ast_core.functional import StepGradient

Augment = Callable[[Tensor, torch.Generator], Tensor]


def tesla_gradients(step: StepGradient, augment: Augment, images: Tensor, labels: Tensor,
                    batches: Sequence[Tensor], start: Tensor, target: Tensor, expert_start: Tensor, syn_lr: Tensor,
                    nu: float, generator: torch.Generator) -> tuple[Tensor, list[float]]:
    """Final matching loss and the per-step inner losses; fills `images.grad` and `syn_lr.grad` if finite, and
    `labels.grad` for soft labels that require it. `expert_start` is the point the denominator is taken from.

    `augment(x, generator)` is the DSA call of the unrolled mode; `generator` is advanced exactly as there
    (one augmentation per step, in order), so both modes see the same draws.
    """
    alpha = syn_lr.detach()
    params = start.detach()
    grad_sum = torch.zeros_like(params)
    states, inner = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(generator.get_state())
            grad, loss = step(params, augment(images[batch], generator), labels[batch])
            inner.append(float(loss))
            grad_sum.add_(grad, alpha=nu)
            params = params - alpha * (nu * grad)
    residual = params - target
    denominator = (expert_start - target).pow(2).sum()
    loss = residual.pow(2).sum() / denominator
    if not torch.isfinite(loss):
        return loss, inner
    cotangent = -2 * alpha * residual / denominator
    learnable = [images] + ([labels] if labels.requires_grad else [])  # soft labels (a leaf) get their part too
    params = start.detach()
    replay = torch.Generator(device=generator.device)
    for batch, state in zip(batches, states, strict=True):
        replay.set_state(state)
        grad, _ = step(params, augment(images[batch], replay), labels[batch])
        torch.autograd.backward(grad, grad_tensors=nu * cotangent, inputs=learnable)
        params = params - alpha * (nu * grad.detach())
    syn_lr.grad = (-2 * residual @ grad_sum / denominator).to(syn_lr.dtype)
    return loss, inner
