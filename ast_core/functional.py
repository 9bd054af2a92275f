"""One student step's gradient as a differentiable function of (parameters, images): docs/method.md section 4.

Trajectory matching differentiates the student update theta_n = theta_{n-1} - alpha * g_n with
g_n = grad_theta CE(f(theta_{n-1}, x_n)) through N steps (MTT Eq. 5, AST Eq. 20-22). Autograd does this by
keeping the graph of every step's backward pass (`create_graph=True`) and differentiating it again.

`step_gradient(flat_model)` returns `step(flat, x, labels) -> (g, ce)` where `g` is differentiable with
respect to `flat` and `x`, and to `labels` when they are soft: a float ``[B, classes]`` matrix of target
probabilities (DATM's learned labels, `ast_core.soft_labels`), for which CE is the soft cross-entropy
-sum_c p_c log softmax(z)_c averaged over the batch. g is linear in p, g = J^T (q sum_c p_c - p) / B with
q = softmax(z) and J the logits' Jacobian (q - p when p sums to 1, as a softmax does), so
v^T dg/dp = ((q . J v) - J v) / B per image: from the logits' tangent J v, which the backward pass computes anyway.
For the instance-norm ConvNet of `ast_core.models` it is `ConvNetStepGrad`: the forward and backward passes
are written out with plain tensor ops (no autograd graph) and the vector-Jacobian product that the outer
backward needs is computed by hand.
Because g is a gradient, its Jacobian w.r.t. theta is the symmetric Hessian H, so for a cotangent v

    v^T dg/dtheta = H v = d/de grad_theta CE(theta + e v, x) |_{e=0}
    v^T dg/dx     = d/de grad_x CE(theta + e v, x) |_{e=0}       (mixed partials commute)

i.e. one tangent (R-operator, Pearlmutter 1994) forward pass with theta-tangent v followed by the tangent of
the backward pass gives both parts. The math (and the convolution work) is the same as autograd's double
backward; a step keeps about a third of the memory (the block inputs, normalised maps and pooled gradients
instead of every intermediate of two graphs: ~100 MB instead of ~340 MB per step at ipc 10 on 28 px) and
makes fewer passes over the large maps (BENCHMARKS.md). Any other architecture falls back to autograd
(`torch.func.functional_call` through `FlatModel`).

Exact simplification used: a convolution bias directly followed by instance norm cancels in the mean
subtraction, so its gradient (and Hessian rows) are exactly 0 and it is skipped in the arithmetic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ast_core.models import ConvNet, FlatModel, native_cpu_convolution, pool_2x2

StepGradient = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
_aten = torch.ops.aten


@dataclass(frozen=True)
class ConvNetLayout:
    """Where each parameter of an instance-norm ConvNet lives in the flat vector (FlatModel order)."""

    blocks: tuple[tuple[slice, slice, slice, slice], ...]  # (conv weight, conv bias, norm gamma, norm beta)
    weight_shapes: tuple[torch.Size, ...]
    paddings: tuple[int, ...]
    eps: float
    classifier: tuple[slice, slice]  # (weight, bias)
    classifier_shape: torch.Size


def convnet_layout(flat_model: FlatModel) -> ConvNetLayout | None:
    """The layout when `flat_model` wraps an `ast_core.models.ConvNet` with instance norm, else None."""
    module = flat_model.module
    if not isinstance(module, ConvNet) or list(module.children()) != [module.features, module.classifier]:
        return None
    layers = list(module.features)
    if len(layers) % 4:
        return None
    offsets, start = {}, 0
    for name, size in zip(flat_model.names, flat_model.layer_sizes, strict=True):
        offsets[name] = slice(start, start + size)
        start += size
    blocks, shapes, paddings, eps = [], [], [], set()
    for i in range(0, len(layers), 4):
        conv, norm, relu, pool = layers[i:i + 4]
        plain_conv = (isinstance(conv, nn.Conv2d) and conv.bias is not None and conv.stride == (1, 1)
                      and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                      and conv.padding[0] == conv.padding[1])
        instance_norm = isinstance(norm, nn.GroupNorm) and norm.affine and norm.num_groups == norm.num_channels
        plain_pool = (isinstance(pool, nn.AvgPool2d) and pool.kernel_size in (2, (2, 2))
                      and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0)) and not pool.ceil_mode)
        if not (plain_conv and instance_norm and isinstance(relu, nn.ReLU) and plain_pool):
            return None
        names = [f"features.{i}.weight", f"features.{i}.bias", f"features.{i + 1}.weight", f"features.{i + 1}.bias"]
        blocks.append(tuple(offsets[name] for name in names))
        shapes.append(conv.weight.shape)
        paddings.append(int(conv.padding[0]))
        eps.add(float(norm.eps))
    if len(eps) != 1:
        return None
    return ConvNetLayout(tuple(blocks), tuple(shapes), tuple(paddings), eps.pop(),
                         (offsets["classifier.weight"], offsets["classifier.bias"]), module.classifier.weight.shape)


# ---------------------------------------------------------------------------------------------------------
# Building blocks (no autograd: called inside the Function)
# ---------------------------------------------------------------------------------------------------------

def _conv(x: Tensor, weight: Tensor, padding: int) -> Tensor:
    with native_cpu_convolution(x, weight):
        return F.conv2d(x, weight, padding=padding)


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int, input_grad: bool = True,
                   weight_grad: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """(d<grad, conv(x, W)>/dx, d<grad, conv(x, W)>/dW), each only when asked for."""
    dx, dw, _ = _aten.convolution_backward(grad, x, weight, None, [1, 1], [padding] * 2, [1, 1], False, [0, 0], 1,
                                           [input_grad, weight_grad, False])
    return dx, dw


def _pool(x: Tensor) -> Tensor:
    """2x2 average pooling (stride 2): `pool_2x2` on even maps, the CPU kernel on odd ones."""
    return F.avg_pool2d(x, 2) if x.shape[-1] % 2 or x.shape[-2] % 2 else pool_2x2(x)


def _masked_pool_grad(grad: Tensor, activation: Tensor) -> Tensor:
    """Backward of ReLU then `_pool`: `grad` / 4 spread over each 2x2 window, 0 where `activation` <= 0.

    `activation` may be the ReLU's input or output (same mask). On even maps the column spread copies the pooled
    map (half the full size) and the row spread is a broadcast inside the masking op, so the full-size map is
    written once.
    """
    n, c, h, w = activation.shape
    if h % 2 or w % 2:
        spread = _aten.avg_pool2d_backward(grad, activation, [2, 2], [2, 2], [0, 0], False, True, None)
        return _relu_grad(spread, activation)
    quarter = grad * 0.25
    rows = torch.stack([quarter, quarter], -1).view(n, c, h // 2, 1, w).expand(n, c, h // 2, 2, w)
    return _relu_grad(rows, activation.view(n, c, h // 2, 2, w)).view(n, c, h, w)


def _relu_grad(grad: Tensor, activation: Tensor) -> Tensor:
    """grad masked where the ReLU output (or input) is not positive."""
    return _aten.threshold_backward(grad, activation, 0)


def _mean_hw(t: Tensor) -> Tensor:
    return t.mean((2, 3), keepdim=True)


def _sum_hw(t: Tensor) -> Tensor:
    return t.sum((2, 3), keepdim=True)


def _dot_hw(a: Tensor, b: Tensor) -> Tensor:
    """sum over space of a * b per sample and channel, (n, c, 1, 1), without materialising the product."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2))[..., None, None]


def _per_channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class ConvNetStepGrad(torch.autograd.Function):
    """g = grad_theta mean CE(ConvNet(theta, x), y) with a hand-written vector-Jacobian product.

    Per block (conv -> instance norm -> ReLU -> avg-pool), with h the conv output, xh = (h - mu) r the
    normalised map, r = (var + eps)^(-1/2), z = gamma xh + beta, m = [z > 0]:
      backward:  gz = pool^T(gx) m;  g_gamma = sum gz xh;  g_beta = sum gz;
                 gh = r gamma (gz - mean(gz) - xh mean(gz xh));  g_W = conv_w^T(gh, x);  gx_prev = conv_x^T(gh, W)
      tangent:   dh = conv(x, dW) + conv(dx, W);  q = r mean(xh dh);  dxh = r (dh - mean(dh)) - q xh;
                 dz = dgamma xh + gamma dxh + dbeta;  dx_next = pool(m dz)       (dr = -q r, mean(xh) = 0)
      R-backward: differentiate every backward line in the same direction (see `_block_r_backward`).
    Means are over the spatial dims of one sample and channel; the mask has zero tangent (ReLU'' = 0 a.e.).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, x: Tensor, labels: Tensor,  # type: ignore[override]
                layout: ConvNetLayout) -> tuple[Tensor, Tensor]:
        grad, loss, saved = _forward_pass(flat, x.contiguous(), labels, layout)
        ctx.layout = layout
        ctx.save_for_backward(flat, *saved)
        ctx.mark_non_differentiable(loss)
        return grad, loss

    @staticmethod
    @once_differentiable
    def backward(ctx, v: Tensor, _: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        flat, *saved = ctx.saved_tensors
        need_theta, need_x, need_labels = ctx.needs_input_grad[:3]
        out, d_x, d_logits = _backward_pass(flat, v, saved, ctx.layout, need_theta, need_x)
        d_labels = None
        if need_labels:  # soft labels: d/dp of g = J^T (q sum(p) - p) / B in direction v
            probs = saved[1]
            d_labels = ((probs * d_logits).sum(1, keepdim=True) - d_logits) / len(d_logits)
        return out, d_x, d_labels, None


def _forward_pass(flat: Tensor, x: Tensor, labels: Tensor,
                  layout: ConvNetLayout) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(g, ce, tensors the backward pass needs): the step's forward and backward pass, no autograd graph."""
    grad = torch.zeros_like(flat)
    inputs, normed, rstds, activations = [], [], [], []
    h = x
    for (w_slice, _, g_slice, b_slice), shape, padding in zip(layout.blocks, layout.weight_shapes,
                                                              layout.paddings, strict=True):
        inputs.append(h)
        xh, rstd = _instance_norm(_conv(h, flat[w_slice].view(shape), padding), layout.eps)
        activation = _affine_relu(xh, flat[g_slice], flat[b_slice])
        h = _pool(activation)
        normed.append(xh)
        rstds.append(rstd)
        activations.append(activation)
    w_slice, c_slice = layout.classifier
    weight = flat[w_slice].view(layout.classifier_shape)
    features = h.flatten(1)
    log_probs = torch.log_softmax(torch.addmm(flat[c_slice], features, weight.t()), 1)
    probs = log_probs.exp()
    if labels.is_floating_point():  # soft targets p: CE = -mean_b sum_c p log q, dCE/dz = (q sum(p) - p) / B
        loss = -(labels * log_probs).sum(1).mean()
        grad_logits = probs * labels.sum(1, keepdim=True) - labels
    else:
        loss = F.nll_loss(log_probs, labels)
        grad_logits = probs - F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    grad_logits /= len(labels)
    grad[w_slice] = (grad_logits.t() @ features).view(-1)
    grad[c_slice] = grad_logits.sum(0)
    grad_out = (grad_logits @ weight).view(h.shape)
    block_grads: list[Tensor] = []
    grad_sums: list[Tensor] = []  # per block: sum(gz) and sum(gz xh) stacked, reused by the backward pass
    for index in reversed(range(len(layout.blocks))):
        w_slice, _, g_slice, b_slice = layout.blocks[index]
        block_grads.insert(0, grad_out)
        xh = normed[index]
        gz = _masked_pool_grad(grad_out, activations[index])
        sum_gz, sum_gz_xh = _sum_hw(gz), _dot_hw(gz, xh)
        grad_sums.insert(0, torch.stack([sum_gz, sum_gz_xh]))
        grad[g_slice] = sum_gz_xh.sum(0).view(-1)
        grad[b_slice] = sum_gz.sum(0).view(-1)
        gh = _norm_input_grad(gz, xh, rstds[index], flat[g_slice], sum_gz, sum_gz_xh)
        weight = flat[w_slice].view(layout.weight_shapes[index])
        grad_out, grad_w = _conv_backward(gh, inputs[index], weight, layout.paddings[index], input_grad=index > 0)
        grad[w_slice] = grad_w.reshape(-1)
    return grad, loss, [features, probs, grad_logits, *inputs, *normed, *rstds, *block_grads, *grad_sums]


def _backward_pass(flat: Tensor, v: Tensor, saved: list[Tensor], layout: ConvNetLayout, need_theta: bool,
                   need_x: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(v^T dg/dtheta, v^T dg/dx, the logits' tangent J v): the tangent forward pass in direction v, then the
    tangent backward pass."""
    depth = len(layout.blocks)
    features, probs, grad_logits, *rest = saved
    inputs, normed, rstds, block_grads, grad_sums = (rest[i * depth:(i + 1) * depth] for i in range(5))
    out = torch.zeros_like(flat) if need_theta else None
    # the ReLU inputs: only their sign is used (as the mask), so the clamp is skipped
    pre_activations = [torch.addcmul(_per_channel(flat[b_slice]), xh, _per_channel(flat[g_slice]))
                       for xh, (_, _, g_slice, b_slice) in zip(normed, layout.blocks, strict=True)]
    tangent_in: Tensor | None = None
    saved_tangents = []
    for index, ((w_slice, _, g_slice, b_slice), shape, padding) in enumerate(
            zip(layout.blocks, layout.weight_shapes, layout.paddings, strict=True)):
        dh = _conv(inputs[index], v[w_slice].view(shape), padding)
        if tangent_in is not None:
            dh += _conv(tangent_in, flat[w_slice].view(shape), padding)
        xh, rstd, gamma = normed[index], rstds[index], _per_channel(flat[g_slice])
        mean, q = _mean_hw(dh), rstd * _dot_hw(xh, dh) / (dh.shape[2] * dh.shape[3])
        # dz = dbeta + dgamma xh + gamma dxh with dxh = r dh - q xh - r mean(dh), never materialised
        dz = torch.addcmul(_per_channel(v[b_slice]) - gamma * rstd * mean, dh, gamma * rstd)
        dz.addcmul_(xh, _per_channel(v[g_slice]) - gamma * q)
        saved_tangents.append((tangent_in, dh, mean, q))
        tangent_in = _pool(_relu_grad(dz, pre_activations[index]))
    w_slice, c_slice = layout.classifier
    weight, d_weight = flat[w_slice].view(layout.classifier_shape), v[w_slice].view(layout.classifier_shape)
    d_features = tangent_in.flatten(1)
    d_logits = torch.addmm(v[c_slice], d_features, weight.t()).addmm_(features, d_weight.t())
    d_grad_logits = probs * (d_logits - (probs * d_logits).sum(1, keepdim=True)) / len(probs)
    if out is not None:
        out[w_slice] = (d_grad_logits.t() @ features + grad_logits.t() @ d_features).view(-1)
        out[c_slice] = d_grad_logits.sum(0)
    d_grad_out = (d_grad_logits @ weight + grad_logits @ d_weight).view(block_grads[-1].shape)
    for index in reversed(range(depth)):
        d_grad_out = _block_r_backward(layout, index, flat, v, out, inputs[index], normed[index], rstds[index],
                                       pre_activations[index], block_grads[index], grad_sums[index], d_grad_out,
                                       *saved_tangents[index], need_input=bool(index) or need_x)
    return out, d_grad_out, d_logits


def _instance_norm(h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(xh, r): h normalised per sample and channel over space (in place), r = (biased var + eps)^(-1/2)."""
    centred = h.sub_(_mean_hw(h))
    var = torch.linalg.vector_norm(centred, dim=(2, 3), keepdim=True).square_() / (h.shape[2] * h.shape[3])
    rstd = torch.rsqrt(var + eps)
    return centred.mul_(rstd), rstd


def _affine_relu(xh: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return torch.addcmul(_per_channel(beta), xh, _per_channel(gamma)).clamp_(min=0)


def _norm_input_grad(gz: Tensor, xh: Tensor, rstd: Tensor, gamma: Tensor, sum_gz: Tensor,
                     sum_gz_xh: Tensor) -> Tensor:
    """Instance-norm backward: gh = r gamma (gz - mean(gz) - xh mean(gz xh))."""
    scale = rstd * _per_channel(gamma)
    size = gz.shape[2] * gz.shape[3]
    return torch.addcmul(-scale * sum_gz / size, gz, scale).addcmul_(xh, -scale * sum_gz_xh / size)


def _block_r_backward(layout: ConvNetLayout, index: int, flat: Tensor, v: Tensor, out: Tensor | None,
                      x: Tensor, xh: Tensor, rstd: Tensor, pre_activation: Tensor, grad_out: Tensor,
                      grad_sums: Tensor, d_grad_out: Tensor, dx: Tensor | None, dh: Tensor, mean: Tensor, q: Tensor,
                      need_input: bool) -> Tensor | None:
    """Tangent of one block's backward pass; writes the theta part into `out`, returns the input-grad tangent.

    With gx_hat = gamma gz, j = mean(gx_hat), k = mean(gx_hat xh), gh = r (gx_hat - j - xh k) and the tangent
    dxh = r dh - q xh - r mean(dh):
      d gh = -q gh + r (d gx_hat - d j - dxh k - xh d k),   d gx_hat = gamma d gz + d gamma gz,
      d g_gamma = sum(d gz xh + gz dxh),  d g_beta = sum(d gz),
      d g_W = conv_w^T(d gh, x) + conv_w^T(gh, dx),  d gx_prev = conv_x^T(d gh, W) + conv_x^T(gh, dW).
    d gh is assembled as one per-channel combination of d gz, gz, dh and xh (four passes over the map).
    """
    w_slice, _, g_slice, b_slice = layout.blocks[index]
    shape, padding = layout.weight_shapes[index], layout.paddings[index]
    gamma, d_gamma = _per_channel(flat[g_slice]), _per_channel(v[g_slice])
    size = xh.shape[2] * xh.shape[3]
    gz = _masked_pool_grad(grad_out, pre_activation)
    d_gz = _masked_pool_grad(d_grad_out, pre_activation)
    sum_gz, sum_gz_xh = grad_sums
    sum_d_gz, sum_d_gz_xh = _sum_hw(d_gz), _dot_hw(d_gz, xh)
    sum_gz_dxh = rstd * (_dot_hw(gz, dh) - mean * sum_gz) - q * sum_gz_xh
    gh = _norm_input_grad(gz, xh, rstd, flat[g_slice], sum_gz, sum_gz_xh)
    # j, k and their tangents, per sample and channel
    d_j = (gamma * sum_d_gz + d_gamma * sum_gz) / size
    k = gamma * sum_gz_xh / size
    d_k = (gamma * (sum_d_gz_xh + sum_gz_dxh) + d_gamma * sum_gz_xh) / size
    scale = rstd * gamma
    constant = rstd * (rstd * k * mean - d_j) + q * scale * sum_gz / size
    d_gh = torch.addcmul(constant, d_gz, scale).addcmul_(gz, rstd * d_gamma - q * scale)
    d_gh.addcmul_(dh, -rstd * rstd * k).addcmul_(xh, rstd * (2 * q * k - d_k))
    weight, d_weight = flat[w_slice].view(shape), v[w_slice].view(shape)
    if out is not None:
        out[g_slice] = (sum_d_gz_xh + sum_gz_dxh).sum(0).view(-1)
        out[b_slice] = sum_d_gz.sum(0).view(-1)
        d_grad_w = _conv_backward(d_gh, x, weight, padding, input_grad=False)[1]
        if dx is not None:
            d_grad_w += _conv_backward(gh, dx, weight, padding, input_grad=False)[1]
        out[w_slice] = d_grad_w.reshape(-1)
    if not need_input:
        return None
    d_grad_in = _conv_backward(d_gh, x, weight, padding, weight_grad=False)[0]
    return d_grad_in.add_(_conv_backward(gh, x, d_weight, padding, weight_grad=False)[0])


def _autograd_step(flat_model: FlatModel) -> StepGradient:
    """Fallback for any architecture: autograd's gradient, kept differentiable when the inputs need it."""

    def step(flat: Tensor, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        differentiable = torch.is_grad_enabled() and (flat.requires_grad or x.requires_grad or labels.requires_grad)
        with torch.enable_grad():
            leaf = flat if flat.requires_grad else flat.detach().requires_grad_(True)
            loss = F.cross_entropy(flat_model(leaf, x), labels)  # float labels: soft cross-entropy
            (grad,) = torch.autograd.grad(loss, leaf, create_graph=differentiable)
        return grad, loss.detach()

    return step


def step_gradient(flat_model: FlatModel) -> StepGradient:
    """`step(flat, x, labels) -> (g, ce)`: g = grad_flat CE, differentiable w.r.t. `flat`, `x` and soft `labels`
    (class indices, or a float [B, classes] matrix of target probabilities).

    Uses `ConvNetStepGrad` for an instance-norm ConvNet and autograd otherwise; `ce` is detached.
    """
    layout = convnet_layout(flat_model)
    if layout is None:
        return _autograd_step(flat_model)

    def step(flat: Tensor, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return ConvNetStepGrad.apply(flat, x, labels, layout)

    return step


@functools.cache
def reuse_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse (process-wide, idempotent); returns whether it applied.

    glibc serves every allocation above 32 MB (one ipc-10 block-1 activation is 52 MB) with a fresh mmap and
    unmaps it on free, so each such tensor is page-faulted in again: on a CPU the unrolled step then spends
    about a third of its time in the kernel (BENCHMARKS.md). M_MMAP_MAX = 0 serves them from the heap instead
    and M_TRIM_THRESHOLD = -1 keeps the heap, like a caching allocator: the process keeps its peak memory.
    No-op where glibc's `mallopt` is unavailable.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))
