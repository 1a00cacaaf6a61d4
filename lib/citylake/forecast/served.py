"""Registry models for the families that are not a fitted library model (AR, baselines).

AR's coefficients (one row per series of a region and metric) and the baselines' rule
are logged as an MLflow ``pyfunc`` so every champion, whatever its family, is a
registered model version that a later run loads by name and alias. ``predict`` takes a
pandas frame of recent history (sensor_id, metric, ts, value) and returns the next
``horizon`` steps; the Spark jobs use the same coefficients at scale.
"""

from __future__ import annotations

from pathlib import Path
import tempfile

import numpy as np
import pandas as pd

import mlflow.pyfunc


class ServedForecaster(mlflow.pyfunc.PythonModel):
    """AR coefficients or a baseline rule, as a pyfunc model."""

    def __init__(self, family: str, region: str, metric: str, horizon: int = 24):
        self.family = family
        self.region = region
        self.metric = metric
        self.horizon = horizon
        self.coefficients: pd.DataFrame | None = None

    def load_context(self, context) -> None:
        path = context.artifacts.get("coefficients") if context.artifacts else None
        self.coefficients = pd.read_parquet(path) if path else None

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Forecasts of steps 1..horizon from each series' last values (recursive for AR)."""
        rows = []
        for (sensor_id, metric), s in model_input.sort_values("ts").groupby(["sensor_id", "metric"]):
            values = s["value"].to_numpy(dtype=float)
            if self.family == "ar" and self.coefficients is not None:
                c = self.coefficients[(self.coefficients.sensor_id == sensor_id)]
                if c.empty:
                    continue
                coefs = np.asarray(c.iloc[0]["coefs"], dtype=float)
                history = list(values[-len(coefs):])
                for h in range(1, self.horizon + 1):
                    y = float(c.iloc[0]["intercept"]) + float(np.dot(coefs, history[::-1][: len(coefs)]))
                    history.append(y)
                    rows.append((sensor_id, metric, h, y))
            else:
                rows += [(sensor_id, metric, h, float(values[-1])) for h in range(1, self.horizon + 1)]
        return pd.DataFrame(rows, columns=["sensor_id", "metric", "step", "y_pred"])


class LightGBMBlocks(mlflow.pyfunc.PythonModel):
    """A local-engine GBT model (:mod:`citylake.forecast.gbt`) as a pyfunc: the LightGBM
    text of each step block, the blocks, the numeric features, the sensor categories and
    the target, and each block's linear stage as JSON (empty for models without one).
    ``predict`` takes the training-set columns (``sensor_id``, ``step``, ``value``, the
    features) and returns the forecast in the metric's unit."""

    def __init__(self, texts, blocks, numeric, categories, target: str, linear=()):
        self.texts = tuple(texts)
        self.blocks = tuple(tuple(b) for b in blocks)
        self.numeric = tuple(numeric)
        self.categories = tuple(categories)
        self.target = target
        self.linear = tuple(linear)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        import lightgbm as lgb

        from citylake.forecast.gbt import predict_lightgbm
        from citylake.forecast.linear_stage import LinearStage

        boosters = [lgb.Booster(model_str=t) for t in self.texts]
        # getattr: models pickled before the linear stage existed have no such attribute.
        linear = [LinearStage.from_json(t) for t in getattr(self, "linear", ())]
        return predict_lightgbm(boosters, model_input, self.numeric, self.categories, self.blocks, self.target, linear)


def log_served_model(family: str, region: str, metric: str, coefficients: pd.DataFrame | None) -> str:
    """Log the family's pyfunc in the active run; returns its ``runs:/`` URI."""
    artifacts = {}
    with tempfile.TemporaryDirectory() as tmp:
        if coefficients is not None:
            path = Path(tmp) / "coefficients.parquet"
            coefficients.to_parquet(path, index=False)
            artifacts["coefficients"] = str(path)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ServedForecaster(family, region, metric),
            artifacts=artifacts or None,
            pip_requirements=["pandas", "numpy", f"mlflow=={mlflow.__version__}"],
            metadata={"citylake_family": family, "region": region, "metric": metric},
        )
    return info.model_uri


def load_coefficients(uri: str) -> pd.DataFrame | None:
    """The AR coefficient rows stored with a served model (None for baselines)."""
    model = mlflow.pyfunc.load_model(uri)
    return model.unwrap_python_model().coefficients
