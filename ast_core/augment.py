"""Differentiable Siamese Augmentation (DSA), docs/method.md section 1.

Follows the semantics of the DSA/MTT reference (`DiffAugment` with `ParamDiffAug`, single-family mode "S"):
each call picks ONE family of the strategy uniformly at random and applies it to the whole batch with
per-sample random parameters. Every operation is differentiable with respect to the images.

Randomness is explicit: all random numbers are drawn on the CPU (from a seeded `torch.Generator`, a given
generator, or torch's global CPU RNG) and then moved to the images' device, so CPU and GPU runs agree.
The same seed gives the same family and the same per-sample parameters ("siamese": apply the identical
transform to two batches of the same size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ast_core.settings import DEFAULT_STRATEGY, DIGIT_DATASETS, FAMILIES, dsa_strategy_for, parse_dsa_strategy

__all__ = ["DEFAULT_STRATEGY", "DIGIT_DATASETS", "FAMILIES", "DSA", "DSAParams", "dsa_strategy_for"]


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the DSA families (defaults = MTT's `ParamDiffAug`)."""

    scale: float = 1.2  # per-axis scale factor in [1/scale, scale]
    rotate_degrees: float = 15.0  # rotation angle in [-rotate_degrees, rotate_degrees]
    crop_ratio: float = 0.125  # translation up to +-crop_ratio of the side (integer pixels)
    cutout_ratio: float = 0.5  # side of the zeroed square relative to the image side
    brightness: float = 1.0  # additive shift in brightness * U(-0.5, 0.5)
    saturation: float = 2.0  # channel-deviation factor in saturation * U(0, 1)
    contrast: float = 0.5  # deviation factor in U(contrast, contrast + 1)
    flip_p: float = 0.5  # probability of a horizontal flip per sample

    def __post_init__(self) -> None:
        checks = {
            "scale": self.scale >= 1.0,
            "rotate_degrees": self.rotate_degrees >= 0.0,
            "crop_ratio": 0.0 <= self.crop_ratio <= 1.0,
            "cutout_ratio": 0.0 <= self.cutout_ratio <= 1.0,
            "brightness": self.brightness >= 0.0,
            "saturation": self.saturation >= 0.0,
            "contrast": self.contrast >= 0.0,
            "flip_p": 0.0 <= self.flip_p <= 1.0,
        }
        allowed = {
            "scale": ">= 1",
            "rotate_degrees": ">= 0",
            "crop_ratio": "in [0, 1]",
            "cutout_ratio": "in [0, 1]",
            "brightness": ">= 0",
            "saturation": ">= 0",
            "contrast": ">= 0",
            "flip_p": "in [0, 1]",
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ValueError(f"DSAParams.{name}={value!r} is invalid: must be finite and {allowed[name]}")


class DSA:
    """Differentiable siamese augmentation: `DSA(strategy)(x, seed=...)` augments an N x C x H x W batch."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY, params: DSAParams | None = None) -> None:
        self.strategy = strategy
        self.families = parse_dsa_strategy(strategy)
        self.params = params if params is not None else DSAParams()
        if not isinstance(self.params, DSAParams):
            raise ValueError(f"params={params!r} must be a DSAParams instance")

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, params={self.params!r})"

    def __call__(
        self, x: Tensor, seed: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Apply one random family; `seed`: deterministic, else draws from `generator` or the global RNG."""
        if x.dim() != 4:
            raise ValueError(f"x must be N x C x H x W, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got device {generator.device}")
        if not self.families:
            return x
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if len(self.families) == 1:
            family = self.families[0]
        else:
            family = self.families[int(torch.randint(len(self.families), (1,), generator=generator))]
        return self.apply(x, family, generator)

    def apply(self, x: Tensor, family: str, generator: torch.Generator | None = None) -> Tensor:
        """Apply one named family (no random family choice) with parameters drawn from `generator`."""
        if family not in FAMILIES:
            raise ValueError(f"family={family!r} is unknown; allowed families: {', '.join(FAMILIES)}")
        op = getattr(self, f"_{family}")
        return op(x, generator).contiguous()

    # ----------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _uniform(n: int, x: Tensor, g: torch.Generator | None) -> Tensor:
        """n draws of U(0, 1) on the CPU, returned as an n x 1 x 1 x 1 tensor on x's device and dtype."""
        return torch.rand(n, generator=g).to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)

    # ---------------------------------------------------------------------------------------- families
    def _color(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        """Brightness, then saturation, then contrast (the reference's `color` family)."""
        n = x.shape[0]
        p = self.params
        b = self._uniform(n, x, g)
        s = self._uniform(n, x, g)
        c = self._uniform(n, x, g)
        x = x + (b - 0.5) * p.brightness
        if x.shape[1] > 1:  # saturation is the identity on one channel
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (s * p.saturation) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (c + p.contrast) + mean

    def _crop(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        """Translate by integer shifts up to +-crop_ratio of the side, zero padding.

        out[i, :, h, w] = x[i, :, h + dh_i, w + dw_i] where inside the image, else 0.
        """
        n, c, h, w = x.shape
        r = self.params.crop_ratio
        sh, sw = int(h * r + 0.5), int(w * r + 0.5)
        dh = torch.randint(-sh, sh + 1, (n,), generator=g).to(x.device)
        dw = torch.randint(-sw, sw + 1, (n,), generator=g).to(x.device)
        rows = torch.arange(h, device=x.device).unsqueeze(0) + dh.unsqueeze(1)  # n x h
        cols = torch.arange(w, device=x.device).unsqueeze(0) + dw.unsqueeze(1)  # n x w
        valid_r = (rows >= 0) & (rows < h)
        valid_c = (cols >= 0) & (cols < w)
        rows = rows.clamp(0, h - 1)
        cols = cols.clamp(0, w - 1)
        out = x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w))
        out = out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
        mask = (valid_r.view(n, 1, h, 1) & valid_c.view(n, 1, 1, w)).to(x.dtype)
        return out * mask

    def _cutout(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        """Zero a square of side cutout_ratio * side at a random centre per sample (clipped at the border)."""
        n, _, h, w = x.shape
        r = self.params.cutout_ratio
        ch, cw = int(h * r + 0.5), int(w * r + 0.5)
        oh = torch.randint(0, h + (1 - ch % 2), (n,), generator=g).to(x.device)
        ow = torch.randint(0, w + (1 - cw % 2), (n,), generator=g).to(x.device)
        top = (oh - ch // 2).unsqueeze(1)
        left = (ow - cw // 2).unsqueeze(1)
        rows = torch.arange(h, device=x.device).unsqueeze(0)
        cols = torch.arange(w, device=x.device).unsqueeze(0)
        in_r = (rows >= top) & (rows < top + ch)  # n x h
        in_c = (cols >= left) & (cols < left + cw)  # n x w
        keep = ~(in_r.view(n, 1, h, 1) & in_c.view(n, 1, 1, w))
        return x * keep.to(x.dtype)

    def _flip(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        """Horizontal flip of each sample with probability flip_p."""
        u = torch.rand(x.shape[0], generator=g).to(x.device).view(-1, 1, 1, 1)
        return torch.where(u < self.params.flip_p, x.flip(3), x)

    def _warp(self, x: Tensor, theta: Tensor) -> Tensor:
        """One batched affine warp (bilinear, zero padding, align_corners=True as in the reference)."""
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _scale(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        """Per-axis scaling of the sampling grid by factors in [1/scale, scale]."""
        n = x.shape[0]
        r = self.params.scale
        sx = torch.rand(n, generator=g, dtype=torch.float64) * (r - 1.0 / r) + 1.0 / r
        sy = torch.rand(n, generator=g, dtype=torch.float64) * (r - 1.0 / r) + 1.0 / r
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = sx
        theta[:, 1, 1] = sy
        return self._warp(x, theta)

    def _rotate(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        """Rotation by an angle in [-rotate_degrees, rotate_degrees] about the image centre."""
        n = x.shape[0]
        max_rad = math.radians(self.params.rotate_degrees)
        angle = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2.0 * max_rad
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cos
        theta[:, 0, 1] = -sin
        theta[:, 1, 0] = sin
        theta[:, 1, 1] = cos
        return self._warp(x, theta)
