"""Tests for ast_core.zca (ZCA whitening, docs/method.md section 1) against an independent numpy computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits

import ast_core.zca as zca_module
from ast_core.data import stratified_split
from ast_core.zca import ZCA
from pipeline.params import DataParams, Params
from pipeline.prepared import fit_and_save_zca, load_prepared, load_raw
from pipeline.schema import ParamsError, from_mapping

ROOT = Path(__file__).resolve().parents[1]
VAL = 100  # validation images carved from the digits train split


def _correlated(n: int = 2000, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Well-conditioned correlated data: z A + b with a random mixing matrix A."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return z @ mix + 3.0 * torch.randn(1, d, generator=g)


def _cov(x: torch.Tensor) -> np.ndarray:
    return np.cov(x.reshape(x.shape[0], -1).double().numpy(), rowvar=False)


def test_small_eps_whitens_to_identity() -> None:
    x = _correlated()
    assert np.abs(_cov(x) - np.eye(16)).max() > 0.2  # the input really is correlated
    zca = ZCA.fit(x, eps=1e-5)
    y = zca.transform(x)
    assert np.allclose(_cov(y), np.eye(16), atol=1e-2)
    assert np.allclose(y.double().mean(0).numpy(), 0.0, atol=1e-4)


def test_regularised_covariance_matches_numpy() -> None:
    eps = 0.1
    x = _correlated(seed=1)
    zca = ZCA.fit(x, eps=eps)
    c = _cov(x)
    s, u = np.linalg.eigh(c)
    expected = (u * (s / (s + eps))) @ u.T
    assert np.allclose(_cov(zca.transform(x)), expected, atol=1e-4)
    # and the matrices themselves match numpy's
    w = (u / np.sqrt(s + eps)) @ u.T
    w_inv = (u * np.sqrt(s + eps)) @ u.T
    assert np.allclose(zca.whitening.double().numpy(), w, atol=1e-5)
    assert np.allclose(zca.inverse_matrix.double().numpy(), w_inv, atol=1e-5)
    assert np.allclose(zca.mean.double().numpy().ravel(), x.double().numpy().mean(0), atol=1e-5)


def test_chunked_fit_equals_single_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _correlated(n=300, seed=2)
    whole = ZCA.fit(x, eps=0.1)
    monkeypatch.setattr(zca_module, "_CHUNK_ELEMENTS", 16 * 7)  # 7 rows per chunk, ragged last chunk
    chunked = ZCA.fit(x, eps=0.1)
    assert torch.allclose(whole.whitening, chunked.whitening, atol=1e-6)
    assert torch.allclose(whole.mean, chunked.mean, atol=1e-6)


def test_round_trip_and_image_shapes() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(500, 2, 3, 3, generator=g)
    x[:, 1] = 0.5 * x[:, 0] + 0.5 * x[:, 1]  # correlated channels
    zca = ZCA.fit(x, eps=0.1)
    y = zca.transform(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    back = zca.inverse(y)
    assert back.shape == x.shape
    assert torch.allclose(back, x, atol=1e-4)
    # works on a batch that was not in the fit
    fresh = torch.rand(7, 2, 3, 3, generator=g)
    assert torch.allclose(zca.inverse(zca.transform(fresh)), fresh, atol=1e-4)


def test_transform_is_differentiable() -> None:
    zca = ZCA.fit(_correlated(n=200), eps=0.1)
    x = torch.randn(4, 16, requires_grad=True)
    zca.inverse(x).sum().backward()
    expected = zca.inverse_matrix.sum(1).expand(4, 16)
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_state_dict_round_trip() -> None:
    x = _correlated(n=400, seed=4)
    zca = ZCA.fit(x, eps=0.1)
    state = zca.state_dict()
    assert set(state) == {"mean", "whitening", "inverse", "eps"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = ZCA.from_state_dict({k: v.clone() for k, v in state.items()})
    assert again.eps == pytest.approx(0.1)
    probe = torch.randn(5, 16)
    assert torch.equal(zca.transform(probe), again.transform(probe))
    assert torch.equal(zca.inverse(probe), again.inverse(probe))
    moved = zca.to("cpu")
    assert torch.equal(moved.transform(probe), zca.transform(probe))


def test_bad_arguments() -> None:
    x = _correlated(n=50)
    with pytest.raises(ValueError, match="eps"):
        ZCA.fit(x, eps=-0.1)
    with pytest.raises(ValueError, match="x must"):
        ZCA.fit(x[:1])
    zca = ZCA.fit(x)
    with pytest.raises(ValueError, match="16 features"):
        zca.transform(torch.zeros(3, 15))
    with pytest.raises(ValueError, match="state"):
        ZCA.from_state_dict({"mean": zca.mean})


# The data pipeline (pipeline/prepared.py) on scikit-learn digits: which pixels the ZCA is fitted on.


def _digits_params(**data: object) -> Params:
    return Params(data=DataParams(dataset="digits", val_size=VAL, **data))


def _digits_train_pixels() -> np.ndarray:
    """The pipeline's digits train split as [0, 1] pixels (N x 64), straight from scikit-learn's 0..16 levels."""
    digits = load_digits()
    keep, _ = stratified_split(digits.target, 0.2, seed=0)     # the carved test split
    train, _ = stratified_split(digits.target[keep], VAL, seed=0)  # the validation split (seed = params.seed)
    return digits.images[keep][train].reshape(-1, 64) / 16


def _hand_whitening(x: np.ndarray, eps: float) -> np.ndarray:
    """U diag(1/sqrt(S + eps)) U^T from the eigendecomposition of the unbiased covariance of `x`."""
    s, u = np.linalg.eigh(np.cov(x, rowvar=False))
    return (u / np.sqrt(np.clip(s, 0, None) + eps)) @ u.T


def _prepared_train(params: Params) -> tuple[np.ndarray, Params]:
    """Run the prepare stage's ZCA fit, then load as later stages do; the whitened train split as N x 64."""
    fit_and_save_zca(params, load_raw(params, download=False))
    prepared = load_prepared(params)
    return prepared.data.train_x.reshape(len(prepared.data.train_x), -1).double().numpy(), prepared


def test_pipeline_fits_zca_on_raw_pixels_as_the_hand_computation(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # artifacts/prepare lands in tmp_path
    params = _digits_params(zca=True)
    assert params.data.zca_fit == "raw"  # the default is the authors' code form
    whitened, prepared = _prepared_train(params)
    x = _digits_train_pixels()
    w = _hand_whitening(x, eps=0.1)
    assert np.allclose(prepared.zca.whitening.double().numpy(), w, atol=1e-5)
    assert np.allclose(whitened, (x - x.mean(0)) @ w, atol=1e-4)
    # No mean/std step: the inverse ZCA alone gives the pixels back.
    assert prepared.data.info.mean == (0.0,) and prepared.data.info.std == (1.0,)
    pixels = prepared.to_pixels(prepared.data.train_x).reshape(len(x), -1).double().numpy()
    assert np.allclose(pixels, x, atol=1e-4)


def test_fit_on_normalised_pixels_is_the_raw_fit_with_eps_times_std_squared(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Dividing by std shrinks the covariance by std^2, so eps acts as eps * std^2 on pixels (1/std^2 weaker)."""
    monkeypatch.chdir(tmp_path)
    normalised, prepared = _prepared_train(_digits_params(zca=True, zca_fit="normalized"))
    std = prepared.data.info.std[0]
    x = _digits_train_pixels()
    centred = x - x.mean(0)
    assert np.allclose(normalised, centred @ _hand_whitening(x, eps=0.1 * std**2), atol=1e-4)
    raw = centred @ _hand_whitening(x, eps=0.1)
    # Weaker regularisation keeps more of each direction's variance: trace of S / (S + eps) grows.
    assert 1 / std**2 > 5
    assert np.trace(np.cov(normalised, rowvar=False)) > 1.5 * np.trace(np.cov(raw, rowvar=False))


def test_zca_fitted_with_other_settings_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _prepared_train(_digits_params(zca=True))
    with pytest.raises(ValueError, match=r"data.zca_fit=raw.*params say normalized.*run `ast-dd prepare` again"):
        load_prepared(_digits_params(zca=True, zca_fit="normalized"))
    with pytest.raises(ValueError, match="zca_eps=0.1 but params say raw, 0.01"):
        load_prepared(_digits_params(zca=True, zca_eps=0.01))


def test_prepare_stage_reruns_when_the_zca_form_changes() -> None:
    """DVC keys the prepare stage on the whole `data` section, so a new data.zca_fit is a new cache key."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "data" in stages["prepare"]["params"]


def test_bad_zca_fit_names_the_key_and_the_forms() -> None:
    with pytest.raises(ParamsError, match="data.zca_fit: 'pca' is not allowed; allowed: raw, normalized"):
        from_mapping(DataParams, {"zca_fit": "pca"}, "data")
