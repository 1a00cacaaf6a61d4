"""The GBT's linear stage: a ridge regression whose forecast is one more input of the trees.

Why: trees approximate additive linear structure with many splits, and much of a
series' movement is linear in its recent values (mean reversion: the change over the
next day is roughly proportional to how far the series is above its recent mean, and
to the weather's recent change). A ridge regression on the group's numeric features
captures that in one column, ``linear_forecast``, and the trees spend their splits on
what is not linear (the daily cycle, thresholds, interactions). On Beijing PM2.5 the
ridge alone was 19.1% below persistence at 24 h (AR(p): 14.6%), and the trees with it
as an input 20.9% (20.0% without it); at 12 h 16.6% vs 15.0%; end to end,
citylake's GBT went from 19.5% to 20.3% below persistence (bench/RESULTS_BEIJING.md).

The stage is fitted per model (group and step block) on the same training rows and
target as the trees. Inputs: the model's numeric features except the target-time
calendar (:data:`citylake.forecast.gbt_data.CALENDAR_FEATURES`: sin/cos of hour,
weekday and season act through interactions, which are the trees' job), each
standardised with its training mean and standard deviation; a missing value takes the
training mean (0 after standardising), a column without spread gets weight 0. The
ridge penalty ``l2`` is per row on the standardised scale: it only has to keep the
exactly collinear columns (``change_k = value - lag_k``) solvable, not shrink.

The Spark ML engine builds the same stage from ``Imputer`` (mean) and
``LinearRegression`` (``standardization=True``, ``regParam`` = ``l2``); Spark scales
its penalty by the label's spread, so the two engines' stages agree closely but not to
the last digit.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from citylake.forecast.gbt_data import CALENDAR_FEATURES, STEP

#: Name of the stage's output among the trees' inputs (and in the importance table).
LINEAR_FEATURE = "linear_forecast"
#: Ridge penalty per training row on standardised features (see the module doc).
DEFAULT_L2 = 1e-4


def linear_inputs(numeric: Sequence[str]) -> list[str]:
    """The stage's inputs among a model's numeric features: all but the target calendar
    and ``step`` (constant within a one-step model)."""
    return [c for c in numeric if c not in CALENDAR_FEATURES and c != STEP]


@dataclass(frozen=True)
class LinearStage:
    """A fitted stage: ``forecast = intercept + sum(coef * (x - mean) / scale)``, with a
    missing x at its mean. Units: the target's (the change of the metric)."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "LinearStage":
        d = json.loads(text)
        return LinearStage(tuple(d["features"]), tuple(d["mean"]), tuple(d["scale"]), tuple(d["coef"]),
                           float(d["intercept"]))


def _inputs(pdf: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    return pdf[list(features)].to_numpy(dtype="float64")


def _standardised(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(X - mean) / scale`` with a missing value at its mean (0)."""
    Z = (X - mean) / scale
    return np.where(np.isnan(Z), 0.0, Z)


def fit_linear_stage(pdf: pd.DataFrame, numeric: Sequence[str], y: np.ndarray, l2: float = DEFAULT_L2) -> LinearStage:
    """Fit the stage on training rows ``pdf`` (columns ``numeric``) and target ``y``:
    minimises ``mean((y - forecast)^2) + l2 * |coef|^2`` (standardised features)."""
    features = linear_inputs(numeric)
    X = _inputs(pdf, features)
    with warnings.catch_warnings():  # a column without any value in these rows: mean 0, scale 1
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(X, axis=0) if len(X) else np.zeros(len(features))
        scale = np.nanstd(X, axis=0) if len(X) else np.ones(len(features))
    mean = np.where(np.isnan(mean), 0.0, mean)
    # No spread: its standardised column is 0 in every row, and the penalty gives it weight 0.
    scale = np.where(np.isnan(scale) | (scale <= 1e-12), 1.0, scale)
    Z = _standardised(X, mean, scale)
    y = np.asarray(y, dtype="float64")
    y_mean = float(y.mean()) if len(y) else 0.0
    n = max(len(y), 1)
    gram = Z.T @ Z / n + l2 * np.eye(len(features))
    # lstsq, not solve: with l2 = 0 a column without spread leaves gram singular (its
    # minimum-norm weight is 0).
    coef = np.linalg.lstsq(gram, Z.T @ (y - y_mean) / n, rcond=None)[0] if features else np.zeros(0)
    # Z has mean 0 per column (missing -> 0 = the mean), so the intercept is y's mean.
    return LinearStage(tuple(features), tuple(mean.tolist()), tuple(scale.tolist()), tuple(coef.tolist()), y_mean)


def linear_forecast(stage: LinearStage, pdf: pd.DataFrame) -> np.ndarray:
    """The stage's forecast for each row of ``pdf`` (needs the stage's feature columns)."""
    Z = _standardised(_inputs(pdf, stage.features), np.asarray(stage.mean), np.asarray(stage.scale))
    return stage.intercept + Z @ np.asarray(stage.coef)
