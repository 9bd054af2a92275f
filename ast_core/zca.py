"""ZCA whitening (docs/method.md section 1), as in the MTT reference (kornia `ZCAWhitening`, eps=0.1).

Fit on the training set: flatten to N x D, centre by the mean, unbiased covariance C = Xc^T Xc / (N - 1)
(accumulated in float64 over chunks, so 50,000 x 3072 CIFAR fits in modest memory), eigendecomposition
C = U diag(S) U^T (`torch.linalg.eigh`), whitening W = U diag(1/sqrt(S + eps)) U^T and its inverse
W^-1 = U diag(sqrt(S + eps)) U^T. transform(x) = (x - mean) W; inverse(y) = y W^-1 + mean.
With eps > 0 the whitened covariance is U diag(S / (S + eps)) U^T (regularised, not exactly identity).
The MTT/AST code fits it on [0, 1] pixels; on data divided by a std s the eigenvalues S shrink by s^2, so the
same eps regularises 1/s^2 times less (8-25x for the usual image statistics, docs/method.md section 8).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ZCA"]

_STATE_KEYS = ("mean", "whitening", "inverse", "eps")
# float64 elements per chunk while accumulating the covariance (2**24 * 8 bytes = 128 MiB)
_CHUNK_ELEMENTS = 2**24


def _default_device(x: Tensor, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else x.device


class ZCA:
    """A fitted ZCA whitening transform; matrices are stored in float32, fitted in float64."""

    def __init__(self, mean: Tensor, whitening: Tensor, inverse: Tensor, eps: float) -> None:
        d = mean.numel()
        if whitening.shape != (d, d) or inverse.shape != (d, d):
            raise ValueError(
                f"whitening/inverse must be {d} x {d} to match mean of {d} features, got "
                f"{tuple(whitening.shape)} and {tuple(inverse.shape)}"
            )
        self.mean = mean.reshape(1, d).float()
        self.whitening = whitening.float()
        self.inverse_matrix = inverse.float()
        self.eps = float(eps)

    @property
    def num_features(self) -> int:
        """D, the number of features per sample (C * H * W for images)."""
        return self.mean.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def __repr__(self) -> str:
        return f"ZCA(num_features={self.num_features}, eps={self.eps}, device={self.device})"

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1, device: str | torch.device | None = None) -> ZCA:
        """Fit on `x` (N x ...); `device` None: cuda if available else x's device (the compute device)."""
        if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps={eps!r} must be a finite number >= 0 (the reference uses 0.1)")
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError(f"x must be N x ... with N >= 2 samples, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        dev = _default_device(x, device)
        n = x.shape[0]
        flat = x.detach().reshape(n, -1)
        d = flat.shape[1]
        rows = max(1, _CHUNK_ELEMENTS // d)

        total = torch.zeros(1, d, dtype=torch.float64, device=dev)
        for start in range(0, n, rows):
            total += flat[start : start + rows].to(device=dev, dtype=torch.float64).sum(0, keepdim=True)
        mean = total / n

        cov = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for start in range(0, n, rows):
            chunk = flat[start : start + rows].to(device=dev, dtype=torch.float64) - mean
            cov.addmm_(chunk.T, chunk)
        cov /= n - 1
        cov = (cov + cov.T) / 2  # exact symmetry for eigh

        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0.0)  # tiny negative eigenvalues are round-off of a PSD matrix (SVD would give >= 0)
        whitening = (u * torch.rsqrt(s + eps)) @ u.T
        inverse = (u * torch.sqrt(s + eps)) @ u.T
        return cls(mean, whitening, inverse, eps)

    def _flat(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x[0].numel() != self.num_features:
            raise ValueError(
                f"x must be N x ... with {self.num_features} features per sample, got shape {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], -1)

    def transform(self, x: Tensor) -> Tensor:
        """Whiten: (x - mean) W, same shape, dtype and device as `x`; differentiable w.r.t. `x`."""
        flat = self._flat(x)
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        w = self.whitening.to(device=x.device, dtype=x.dtype)
        return ((flat - mean) @ w).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """Un-whiten: y W^-1 + mean, same shape, dtype and device as `x`; differentiable w.r.t. `x`."""
        flat = self._flat(x)
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        w_inv = self.inverse_matrix.to(device=x.device, dtype=x.dtype)
        return torch.addmm(mean, flat, w_inv).reshape(x.shape)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors for safetensors: mean (1 x D), whitening and inverse (D x D), eps (0-d float64)."""
        return {
            "mean": self.mean.contiguous(),
            "whitening": self.whitening.contiguous(),
            "inverse": self.inverse_matrix.contiguous(),
            "eps": torch.tensor(self.eps, dtype=torch.float64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ZCA:
        """Rebuild from `state_dict()` output."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}; expected {list(_STATE_KEYS)}")
        return cls(state["mean"], state["whitening"], state["inverse"], float(state["eps"]))

    def to(self, device: str | torch.device) -> ZCA:
        """A copy with its tensors on `device`."""
        return ZCA(self.mean.to(device), self.whitening.to(device), self.inverse_matrix.to(device), self.eps)
