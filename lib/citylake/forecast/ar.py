"""Autoregressive models for many series at once, in plain numpy.

The model, per series::

    y_t = a + b_1 * y_(t-1) + ... + b_p * y_(t-p) + e_t,   e_t ~ N(0, sigma^2)

fitted by ordinary least squares with an intercept, like statsmodels'
``AutoReg(y, lags=p, trend="c")``. Every function works on a ``(n_series, T)`` float
matrix whose columns are consecutive steps of each series' regular grid; NaN (or inf)
marks a step without a usable value. Series of different lengths are NaN-padded on the
left, so the last column is every series' newest step.

How missing and filled points enter the fit
-------------------------------------------
* A linearly filled point (silver ``is_filled``) is an ordinary observation: the caller
  passes its value. (Set it to NaN to exclude filled points.)
* The lag design has one row per target step t >= p: ``(1, y_(t-1), ..., y_(t-p)) -> y_t``.
  A row whose target or any of its p lags is missing is dropped, and nothing else is.
  A single missing step therefore removes exactly the p + 1 rows that touch it; rows on
  either side of a gap still count. With no gap this is statsmodels' AutoReg sample
  (the first p steps are only used as lags).
* A series with ``nobs <= p + 1`` usable rows, or whose design is (numerically) singular
  (e.g. a constant series), gets NaN coefficients and ``ok = False``; nothing raises.

Conventions (checked against statsmodels 0.15 in ``tests/test_ar.py``)
------------------------------------------------------------------------
* ``nobs``: design rows used (statsmodels' ``AutoRegResults.nobs`` = T - p without gaps).
* ``sigma = sqrt(SSR / (nobs - p - 1))``: the innovation s.d. with the OLS degrees-of-
  freedom correction (p + 1 estimated mean parameters). statsmodels' ``sigma2`` is the ML
  estimate ``SSR / nobs``; it is available here as :attr:`ARFit.sigma2_mle`, and
  ``sigma**2 == sigma2_mle * nobs / (nobs - p - 1)``.
* ``aic = -2 llf + 2 (p + 1)`` and ``bic = -2 llf + ln(nobs) (p + 1)`` with the Gaussian
  ``llf = -nobs/2 * (ln(2 pi SSR/nobs) + 1)``: exactly the values ``ar_select_order``
  ranks. ``AutoRegResults.aic/bic`` count sigma^2 as one more parameter, so they are
  larger by 2 resp. ln(nobs); the ranking is the same.
* Order selection (:func:`select_order`) compares all candidate orders on one estimation
  sample - the rows valid for the largest candidate, i.e. the first max(candidates) steps
  are held back for every candidate, like ``ar_select_order`` - then refits the chosen
  order on its own sample (all rows valid for that order), like ``ar_select_order(...)
  .model.fit()``.

Numerics: each series is centred on the mean of its usable values before the normal
equations are formed (OLS with an intercept is shift-invariant; the intercept is mapped
back), and X'X is scaled to unit diagonal before the batched solve. This keeps series
with a large level and small variation (air pressure ~1000 hPa) accurate to ~1e-10.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Criterion = Literal["aic", "bic"]

#: Bytes the lag design of one chunk of series may take; bounds peak memory of a fit.
#: 16 MiB measured fastest (cache-friendly) on 10k x 2000 AR(12); larger is no faster.
DEFAULT_CHUNK_BYTES = 16 * 2**20
#: A scaled X'X whose smallest eigenvalue is below this is treated as singular.
SINGULAR_EIGENVALUE = 1e-12


@dataclass(frozen=True)
class ARFit:
    """Fitted AR models, one entry per series (row of the input matrix).

    All values are in the series' unit except where noted. ``coefs[:, j]`` is the
    coefficient of lag j + 1 (lag 1 first); columns at or beyond a series' ``order`` are 0.
    """

    order: np.ndarray  #: (n,) int, p of each series
    intercept: np.ndarray  #: (n,) a
    coefs: np.ndarray  #: (n, width) b_1 .. b_width, zero-padded beyond ``order``
    sigma: np.ndarray  #: (n,) sqrt(SSR / (nobs - p - 1))
    ssr: np.ndarray  #: (n,) sum of squared residuals, unit^2
    nobs: np.ndarray  #: (n,) int, design rows used
    aic: np.ndarray  #: (n,) -2 llf + 2 (p + 1)
    bic: np.ndarray  #: (n,) -2 llf + ln(nobs) (p + 1)
    ok: np.ndarray  #: (n,) bool, False when too short or singular (coefficients NaN)
    first_target: np.ndarray  #: (n,) int, column of the first target used, -1 if none
    last_target: np.ndarray  #: (n,) int, column of the last target used, -1 if none

    @property
    def sigma2_mle(self) -> np.ndarray:
        """statsmodels' ``sigma2`` convention: SSR / nobs (unit^2)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.nobs > 0, self.ssr / np.maximum(self.nobs, 1), np.nan)

    def __len__(self) -> int:
        return int(self.order.shape[0])

    @classmethod
    def from_params(
        cls, intercept: np.ndarray, coefs: np.ndarray, sigma: np.ndarray, order: np.ndarray | None = None
    ) -> "ARFit":
        """A fit from stored parameters (e.g. a coefficient table), enough to forecast.

        ``coefs`` (n, width), lag 1 first; ``order`` defaults to ``width`` for every
        series. Sample statistics (ssr, nobs, aic, bic, targets) are unknown: NaN / 0 / -1.
        """
        coefs = np.atleast_2d(np.asarray(coefs, dtype=np.float64))
        n, width = coefs.shape
        nan = np.full(n, np.nan)
        intercept = np.asarray(intercept, dtype=np.float64).reshape(n)
        return cls(
            order=np.full(n, width, np.int64) if order is None else np.asarray(order, np.int64).reshape(n),
            intercept=intercept, coefs=coefs, sigma=np.asarray(sigma, dtype=np.float64).reshape(n),
            ssr=nan, nobs=np.zeros(n, np.int64), aic=nan, bic=nan, ok=np.isfinite(intercept),
            first_target=np.full(n, -1, np.int64), last_target=np.full(n, -1, np.int64),
        )


# -- building blocks ------------------------------------------------------------------


def _as_matrix(values: np.ndarray) -> np.ndarray:
    """``values`` as a C-contiguous float64 (n, T) matrix with NaN for any non-finite."""
    matrix = np.array(values, dtype=np.float64, copy=True, ndmin=2)
    if matrix.ndim != 2:
        raise ValueError(f"values must be (n_series, T), got shape {matrix.shape}")
    matrix[~np.isfinite(matrix)] = np.nan
    return matrix


def _centre(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtract each row's mean of finite values (0 for an all-NaN row)."""
    finite = np.isfinite(matrix)
    count = finite.sum(axis=1)
    total = np.where(finite, matrix, 0.0).sum(axis=1)
    mu = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return matrix - mu[:, None], mu


def _valid_rows(matrix: np.ndarray, p: int) -> np.ndarray:
    """(n, T - p) bool: design row r (target t = r + p) has target and p lags finite.

    A running count of missing steps gives each window's count in O(n T), without the
    (n, T - p, p + 1) temporary an ``isfinite(window).all()`` would need.
    """
    missing = np.cumsum(~np.isfinite(matrix), axis=1, dtype=np.int32)
    padded = np.concatenate([np.zeros((matrix.shape[0], 1), np.int32), missing], axis=1)
    return (padded[:, p + 1 :] - padded[:, : matrix.shape[1] - p]) == 0


def _design(centred: np.ndarray, p: int, valid: np.ndarray) -> np.ndarray:
    """(n, R, p + 2) augmented design [1, y_(t-p), ..., y_(t-1), y_t], invalid rows zero."""
    n, t_len = centred.shape
    design = np.empty((n, t_len - p, p + 2))
    design[:, :, 0] = 1.0
    # Copy the sliding windows wholesale, then zero the (usually few) invalid rows:
    # cheaper than a masked copy of every element.
    filled = np.where(np.isfinite(centred), centred, 0.0)
    design[:, :, 1:] = sliding_window_view(filled, p + 1, axis=1)
    invalid = ~valid
    if invalid.any():
        design[invalid] = 0.0
    return design


def _gram(design: np.ndarray) -> np.ndarray:
    """Batched A'A (n, k, k): holds X'X, X'y and y'y of the augmented design."""
    return np.matmul(design.transpose(0, 2, 1), design)


def _solve(xtx: np.ndarray, xty: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve X'X beta = X'y per series; returns (beta (n, k), ok (n,)).

    X'X is scaled to unit diagonal so one eigenvalue threshold flags singular designs
    whatever the series' unit; flagged (or unusable) systems are replaced by the
    identity before the batched solve, so ``np.linalg.solve`` never sees a singular one.
    """
    n, k, _ = xtx.shape
    diag = np.einsum("nkk->nk", xtx)
    ok = usable & np.all(diag > 0, axis=1)
    scale = np.sqrt(np.where(diag > 0, diag, 1.0))
    scaled = xtx / (scale[:, :, None] * scale[:, None, :])
    rhs = xty / scale
    eye = np.eye(k)
    scaled[~ok] = eye
    if k > 1 and n:
        smallest = np.linalg.eigvalsh(scaled)[:, 0]
        ok &= smallest > SINGULAR_EIGENVALUE
        scaled[~ok] = eye
    rhs[~ok] = 0.0
    beta = np.linalg.solve(scaled, rhs[:, :, None])[:, :, 0] / scale
    beta[~ok] = np.nan
    return beta, ok


def _information(ssr: np.ndarray, nobs: np.ndarray, n_params: int) -> tuple[np.ndarray, np.ndarray]:
    """(aic, bic) from the Gaussian log-likelihood at sigma^2 = SSR / nobs."""
    with np.errstate(divide="ignore", invalid="ignore"):
        nobs_f = nobs.astype(np.float64)
        llf = -nobs_f / 2 * (np.log(2 * np.pi * np.maximum(ssr, 0.0) / nobs_f) + 1)
        aic = -2 * llf + 2 * n_params
        bic = -2 * llf + np.log(nobs_f) * n_params
    return aic, bic


def _chunk_size(rows: int, p: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, rows * (p + 2) * 8))


# -- fitting --------------------------------------------------------------------------


def _fit_chunk(matrix: np.ndarray, p: int) -> dict[str, np.ndarray]:
    """OLS AR(p) of every row of ``matrix`` (n, T), T > p."""
    n, t_len = matrix.shape
    centred, mu = _centre(matrix)
    valid = _valid_rows(centred, p)
    nobs = valid.sum(axis=1)
    design = _design(centred, p, valid)
    gram = _gram(design)
    k = p + 1
    beta, ok = _solve(gram[:, :k, :k], gram[:, :k, k], nobs > k)
    # Residuals through the design (not y'y - b'X'y) keep SSR accurate for good fits.
    weights = np.concatenate([-np.nan_to_num(beta), np.ones((n, 1))], axis=1)
    resid = np.matmul(design, weights[:, :, None])[:, :, 0]
    ssr = np.where(ok, np.einsum("nr,nr->n", resid, resid), np.nan)
    lags = beta[:, :0:-1]  # design columns run y_(t-p) .. y_(t-1); lag 1 first
    intercept = beta[:, 0] + mu * (1 - lags.sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.sqrt(ssr / (nobs - k))
    aic, bic = _information(ssr, nobs, k)
    has_row = valid.any(axis=1)
    rows = valid.shape[1]
    first = np.where(has_row, valid.argmax(axis=1) + p, -1)
    last = np.where(has_row, rows - 1 - valid[:, ::-1].argmax(axis=1) + p, -1)
    return {
        "intercept": intercept, "coefs": lags, "sigma": sigma, "ssr": ssr, "nobs": nobs,
        "aic": aic, "bic": bic, "ok": ok, "first_target": first, "last_target": last,
    }


def _empty_chunk(n: int, p: int) -> dict[str, np.ndarray]:
    """Result for series too short to hold even one design row (T <= p)."""
    nan = np.full(n, np.nan)
    return {
        "intercept": nan, "coefs": np.full((n, p), np.nan), "sigma": nan, "ssr": nan,
        "nobs": np.zeros(n, np.int64), "aic": nan, "bic": nan, "ok": np.zeros(n, bool),
        "first_target": np.full(n, -1), "last_target": np.full(n, -1),
    }


def fit_many(values: np.ndarray, p: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ARFit:
    """OLS AR(p) with intercept for every row of ``values``.

    ``values``: (n_series, T) floats in the series' unit on consecutive grid steps, NaN
    for missing, left-padded with NaN for shorter series. ``p``: order (>= 0), in grid
    steps. ``chunk_bytes`` bounds the lag design held at once (series are processed in
    chunks of about ``chunk_bytes / ((T - p) * (p + 2) * 8)``). Returns an
    :class:`ARFit`; see the module docstring for the missing-data and df conventions.
    """
    if p < 0:
        raise ValueError(f"order p must be >= 0, got {p}")
    matrix = _as_matrix(values)
    n, t_len = matrix.shape
    if t_len <= p:
        parts = [_empty_chunk(n, p)]
    else:
        step = _chunk_size(t_len - p, p, chunk_bytes)
        parts = [_fit_chunk(matrix[i : i + step], p) for i in range(0, n, step)]
    if not parts:
        parts = [_empty_chunk(0, p)]
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    merged["nobs"] = merged["nobs"].astype(np.int64)
    merged["first_target"] = merged["first_target"].astype(np.int64)
    merged["last_target"] = merged["last_target"].astype(np.int64)
    return ARFit(order=np.full(n, p, dtype=np.int64), **merged)


# -- order selection ------------------------------------------------------------------


def _criteria_chunk(matrix: np.ndarray, candidates: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(aic, bic), each (n, K), of every candidate on the common sample of this chunk.

    One Gram matrix of the largest order holds every smaller order's normal equations
    (same rows, a subset of the columns), so all candidates cost one pass over the data.
    SSR comes from ``y'y - beta'X'y`` here: it only ranks models.
    """
    p_max = max(candidates)
    centred, _ = _centre(matrix)
    valid = _valid_rows(centred, p_max)
    nobs = valid.sum(axis=1)
    gram = _gram(_design(centred, p_max, valid))
    target = p_max + 1
    aic = np.full((matrix.shape[0], len(candidates)), np.nan)
    bic = np.full_like(aic, np.nan)
    for j, p in enumerate(candidates):
        cols = np.r_[0, np.arange(p_max + 1 - p, p_max + 1)]
        xty = gram[:, cols, target]
        beta, ok = _solve(gram[:, cols[:, None], cols[None, :]], xty, nobs > p + 1)
        ssr = gram[:, target, target] - np.einsum("nk,nk->n", np.nan_to_num(beta), xty)
        a, b = _information(np.where(ok, ssr, np.nan), nobs, p + 1)
        aic[:, j], bic[:, j] = a, b
    return aic, bic


def information_criteria(
    values: np.ndarray, candidates: Sequence[int], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """AIC and BIC (each (n_series, len(candidates))) of AR(p) for each candidate p,
    all on the sample of rows valid for max(candidates) (see module docstring).
    NaN where a candidate cannot be fitted on that sample."""
    cands = [int(c) for c in candidates]
    if not cands or min(cands) < 0:
        raise ValueError(f"candidates must be a non-empty list of orders >= 0, got {candidates}")
    matrix = _as_matrix(values)
    n, t_len = matrix.shape
    p_max = max(cands)
    if t_len <= p_max:
        nan = np.full((n, len(cands)), np.nan)
        return nan, nan.copy()
    step = _chunk_size(t_len - p_max, p_max, chunk_bytes)
    parts = [_criteria_chunk(matrix[i : i + step], cands) for i in range(0, n, step)]
    if not parts:
        return np.zeros((0, len(cands))), np.zeros((0, len(cands)))
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])


def combine_fits(fits: list[tuple[np.ndarray, ARFit]], n: int, width: int) -> ARFit:
    """One ARFit of ``n`` series from parts ``(series indices, fit of those series)``.

    ``coefs`` become (n, width), zero-padded beyond each part's width; series in no
    part get order 0, NaN parameters and ``ok = False``.
    """
    out = {
        "order": np.zeros(n, np.int64), "intercept": np.full(n, np.nan),
        "coefs": np.zeros((n, width)), "sigma": np.full(n, np.nan), "ssr": np.full(n, np.nan),
        "nobs": np.zeros(n, np.int64), "aic": np.full(n, np.nan), "bic": np.full(n, np.nan),
        "ok": np.zeros(n, bool), "first_target": np.full(n, -1, np.int64),
        "last_target": np.full(n, -1, np.int64),
    }
    for index, fit in fits:
        for key in out:
            if key == "coefs":
                out[key][index, : fit.coefs.shape[1]] = fit.coefs
            else:
                out[key][index] = getattr(fit, key)
    return ARFit(**out)


def select_order(
    values: np.ndarray,
    candidates: Sequence[int],
    criterion: Criterion = "aic",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[np.ndarray, ARFit]:
    """Choose p per series from ``candidates`` by ``criterion`` and fit it.

    Candidates are ranked on one common sample (rows valid for max(candidates)); ties go
    to the smaller order, as in ``ar_select_order``. The chosen order is then refitted on
    all rows valid for it. A series where no candidate can be ranked gets the smallest
    candidate (whose refit may still be ``ok``). Returns ``(orders (n,), fit)``; the fit's
    ``coefs`` are (n, max(candidates)), zero beyond each series' order, and its aic/bic
    are those of the refit on its own sample.
    """
    if criterion not in ("aic", "bic"):
        raise ValueError(f"criterion must be 'aic' or 'bic', got {criterion!r}")
    cands = sorted({int(c) for c in candidates})
    matrix = _as_matrix(values)
    aic, bic = information_criteria(matrix, cands, chunk_bytes)
    table = aic if criterion == "aic" else bic
    rankable = np.isfinite(table).any(axis=1)
    best = np.argmin(np.where(np.isfinite(table), table, np.inf), axis=1)
    orders = np.asarray(cands, dtype=np.int64)[np.where(rankable, best, 0)]
    fits = []
    for p in np.unique(orders):
        index = np.flatnonzero(orders == p)
        fits.append((index, fit_many(matrix[index], int(p), chunk_bytes)))
    return orders, combine_fits(fits, matrix.shape[0], max(cands))


# -- forecasting ----------------------------------------------------------------------


def psi_weights(coefs: np.ndarray, h: int) -> np.ndarray:
    """MA(inf) weights psi_0 .. psi_(h-1) of AR coefficients (lag 1 first).

    ``coefs``: (p,) or (n, p). Returns (h,) or (n, h) with psi_0 = 1 and
    psi_j = sum_(i=1..min(j,p)) b_i psi_(j-i) (dimensionless).
    """
    b = np.asarray(coefs, dtype=np.float64)
    single = b.ndim == 1
    b = np.atleast_2d(b)
    n, p = b.shape
    psi = np.zeros((n, max(h, 0)))
    if h <= 0:
        return psi[0] if single else psi
    psi[:, 0] = 1.0
    for j in range(1, h):
        m = min(j, p)
        # psi[:, j-1], psi[:, j-2], ... pair with b_1, b_2, ...
        psi[:, j] = np.einsum("ni,ni->n", b[:, :m], psi[:, j - 1 :: -1][:, :m]) if m else 0.0
    return psi[0] if single else psi


def forecast(fit: ARFit, history: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Recursive h-step forecasts and their standard errors.

    ``history``: (n, L) with L >= fit.coefs.shape[1], the newest value last (unit of the
    series); only each series' last ``order`` values are used, and a NaN among them
    makes that series' forecasts NaN. Returns ``(mean, se)``, each (n, h): mean_k is the
    forecast k steps after the last history column, and
    ``se_k = sigma * sqrt(sum_(j<k) psi_j^2)`` (parameter uncertainty ignored, as in
    statsmodels' AutoReg forecasts, which use sigma2_mle instead of sigma^2).
    """
    n, width = fit.coefs.shape
    hist = np.asarray(history, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != n or hist.shape[1] < width:
        raise ValueError(f"history must be ({n}, >= {width}), got {hist.shape}")
    in_order = np.arange(width)[None, :] < fit.order[:, None]
    # lags[:, j] = y_(T-1-j): newest first, to pair with coefs (lag 1 first).
    lags = hist[:, hist.shape[1] - width :][:, ::-1] if width else np.zeros((n, 0))
    lags = np.where(in_order, lags, 0.0)
    coefs = np.where(in_order, fit.coefs, 0.0)
    mean = np.empty((n, max(h, 0)))
    for k in range(max(h, 0)):
        mean[:, k] = fit.intercept + np.einsum("nj,nj->n", coefs, lags)
        if width:
            lags = np.concatenate([mean[:, k : k + 1], lags[:, :-1]], axis=1)
    psi = psi_weights(coefs, max(h, 0))
    se = fit.sigma[:, None] * np.sqrt(np.cumsum(psi**2, axis=1))
    return mean, se


def interval(mean: np.ndarray, se: np.ndarray, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Central normal prediction interval: ``mean -/+ z * se`` with z the
    (1 + level) / 2 quantile of N(0, 1) (1.645 for level 0.9). Returns (lower, upper)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return mean - z * se, mean + z * se
