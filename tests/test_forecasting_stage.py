"""Integration: train, backtest and forecast through the CLI on a small generated city.

Beside the generated sensors, one "lab" region holds a series built to be
autoregressive (an AR(2) process), where AR must beat persistence and its 90% intervals
must cover about 90% of the actuals. Everything runs for real: Spark, Delta, a sqlite
MLflow store with its registry, LightGBM.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F

from citylake.cli import main
from citylake.lake import Lake
from citylake.stages.forecasting import registered_name

pytestmark = pytest.mark.integration

START = dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc)
DAYS = 4
LAB = "lab"
HORIZON = 6


def _write_ar_lab(root: Path, seed: int = 3) -> None:
    """An AR(2) energy series (15-min grid) in its own region, in the landing format."""
    rng = np.random.default_rng(seed)
    n = DAYS * 96
    y = np.empty(n)
    y[:2] = 200.0
    for t in range(2, n):  # mean 200 kWh: 30 / (1 - 0.6 - 0.25)
        y[t] = 30 + 0.6 * y[t - 1] + 0.25 * y[t - 2] + rng.normal(0, 5)
    (root / "raw" / "sensors" / "sensors_20260101_lab.csv").write_text(
        "sensor_id,region,lat,lon\nlab-ar-1,lab,0.0,0.0\n")
    for day in range(DAYS):
        date = (START + dt.timedelta(days=day)).date()
        folder = root / "raw" / "readings" / f"date={date.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["sensor_id,ts,metric,value"]
        for k in range(96):
            ts = START + dt.timedelta(days=day, minutes=15 * k)
            lines.append(f"lab-ar-1,{ts.strftime('%Y-%m-%dT%H:%M:%SZ')},energy_kwh,{y[day * 96 + k]:.3f}")
        (folder / "lab.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def forecast_city(spark, tmp_path_factory):
    """Generated city + AR lab through gold, then train, backtest and forecast by the CLI."""
    from conftest import make_config

    base = tmp_path_factory.mktemp("forecast-city")
    root = base / "lake"
    mlflow_env = {
        "CITYLAKE__MLFLOW__TRACKING_URI": f"sqlite:///{base / 'mlruns.db'}",
        "CITYLAKE__MLFLOW__ARTIFACT_ROOT": str(base / "mlartifacts"),
        "CITYLAKE__SPARK__SHUFFLE_PARTITIONS": "2",
        # Small models: the test checks the plumbing and the accuracy ranking, not speed.
        "CITYLAKE__FORECAST__GBT_TREES": "60",
    }
    args = ["--lake", str(root), "-q"]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in mlflow_env.items():
            mp.setenv(key, value)
        assert main([*args, "generate", "--days", str(DAYS), "--regions", "2", "--start-date",
                     START.date().isoformat()]) == 0
        _write_ar_lab(root)
        assert main([*args, "run"]) == 0
        assert main([*args, "train"]) == 0
        assert main([*args, "backtest", "--horizon", str(HORIZON), "--stride", "2"]) == 0
        assert main([*args, "forecast", "--horizon", str(HORIZON)]) == 0
        first_forecast = Lake(spark, make_config(root)).read("forecasts").count()
        assert main([*args, "forecast", "--horizon", str(HORIZON)]) == 0  # same origins: replaced
    config = make_config(root, mlflow={"tracking_uri": mlflow_env["CITYLAKE__MLFLOW__TRACKING_URI"],
                                       "artifact_root": mlflow_env["CITYLAKE__MLFLOW__ARTIFACT_ROOT"]})
    mlflow.set_tracking_uri(mlflow_env["CITYLAKE__MLFLOW__TRACKING_URI"])
    return Lake(spark, config), first_forecast


def _metric(lake, model, region, metric, column="rmse"):
    rows = (lake.read("backtest_metrics")
            .where((F.col("model") == model) & (F.col("region") == region) & (F.col("metric") == metric))
            .orderBy("step").select("step", column).collect())
    return {r["step"]: r[column] for r in rows}


def test_backtest_tables_hold_every_model_and_step(forecast_city):
    lake, _ = forecast_city
    bf = lake.read("backtest_forecasts")
    assert {r["model"] for r in bf.select("model").distinct().collect()} == {
        "ar", "gbt", "persistence", "seasonal_naive"}
    assert {r["step"] for r in bf.select("step").distinct().collect()} == set(range(1, HORIZON + 1))
    # Every origin is after the cutoff and every target after its origin.
    assert bf.where((F.col("origin_ts") <= F.col("cutoff_ts")) | (F.col("target_ts") <= F.col("origin_ts"))).count() == 0
    assert bf.where(F.col("y_lower") > F.col("y_upper")).count() == 0
    metrics = lake.read("backtest_metrics")
    all_rows = metrics.where(F.col("region") == "ALL").collect()
    assert all_rows and all(r["n"] > 0 and r["rmse"] >= r["mae"] >= 0 for r in all_rows)


def test_ar_beats_persistence_on_an_autoregressive_series(forecast_city):
    lake, _ = forecast_city
    ar = _metric(lake, "ar", LAB, "energy_kwh")
    persistence = _metric(lake, "persistence", LAB, "energy_kwh")
    assert set(ar) == set(range(1, HORIZON + 1))
    assert all(ar[h] < persistence[h] for h in range(2, HORIZON + 1)), (ar, persistence)


def test_ninety_percent_intervals_cover_80_to_97_percent(forecast_city):
    lake, _ = forecast_city
    bf = lake.read("backtest_forecasts").where(F.col("y_true").isNotNull())
    inside = (F.col("y_true") >= F.col("y_lower")) & (F.col("y_true") <= F.col("y_upper"))
    ar_lab = bf.where((F.col("model") == "ar") & (F.col("region") == LAB)).agg(F.avg(inside.cast("double"))).first()[0]
    assert 0.80 <= ar_lab <= 0.97, ar_lab
    gbt_all = bf.where(F.col("model") == "gbt").agg(F.avg(inside.cast("double"))).first()[0]
    assert 0.80 <= gbt_all <= 0.97, gbt_all


def test_champions_are_recorded_and_registered(forecast_city):
    lake, _ = forecast_city
    champions = lake.read("champions").collect()
    groups = {(r["region"], r["metric"]) for r in lake.read("backtest_metrics").where(F.col("region") != "ALL")
              .select("region", "metric").distinct().collect()}
    assert {(c["region"], c["metric"]) for c in champions} == groups
    client = MlflowClient()
    for c in champions:
        assert c["champion_model"] in ("ar", "gbt", "persistence", "seasonal_naive")
        version = client.get_model_version_by_alias(registered_name(c["region"], c["metric"]), "champion")
        assert version.tags.get("citylake.family") == c["champion_model"]
    lab = [c for c in champions if c["region"] == LAB][0]
    assert lab["champion_model"] != "persistence"


def test_forecasts_are_served_once_per_origin(forecast_city):
    lake, first_count = forecast_city
    fc = lake.read("forecasts")
    assert fc.count() == first_count > 0
    keys = ["model", "sensor_id", "metric", "origin_ts", "step"]
    assert fc.groupBy(*keys).count().where("count > 1").count() == 0
    assert fc.where(F.col("y_pred").isNull() | F.col("run_id").isNull()).count() == 0
    served = {(r["region"], r["metric"], r["model"]) for r in fc.select("region", "metric", "model").distinct().collect()}
    champions = {(r["region"], r["metric"], r["champion_model"]) for r in lake.read("champions").collect()}
    assert served <= champions
    lab = fc.where(F.col("region") == LAB).orderBy("step").collect()
    assert [r["step"] for r in lab] == list(range(1, HORIZON + 1))
    assert all(150 < r["y_pred"] < 250 for r in lab)  # around the AR(2) mean of 200 kWh


def test_mlflow_runs_params_and_artifacts(forecast_city):
    lake, _ = forecast_city
    experiment = mlflow.get_experiment_by_name(lake.config.mlflow.experiment)
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert {r.data.tags.get("citylake.job") for r in parents} >= {"train", "backtest"}
    backtest = [r for r in parents if r.data.tags.get("citylake.job") == "backtest"][0]
    assert backtest.data.params["forecast.ar_order"] == "12"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == backtest.info.run_id]
    families = {r.data.tags.get("citylake.family") for r in children}
    assert {"ar", "gbt", "persistence", "seasonal_naive"} <= families
    by_name = {r.data.tags.get("mlflow.runName"): r for r in children}
    ar_child = by_name[f"{LAB}/energy_kwh/ar"]
    assert ar_child.data.metrics["training_rows"] > 0 and "rmse" in ar_child.data.metrics
    client = MlflowClient()
    history = client.get_metric_history(ar_child.info.run_id, "rmse")
    assert sorted(m.step for m in history) == list(range(1, HORIZON + 1))
    artifacts = {a.path for a in client.list_artifacts(backtest.info.run_id)}
    assert "ar_coefficients.csv" in artifacts
    plots = {a.path for a in client.list_artifacts(backtest.info.run_id, f"plots/{LAB}")}
    assert any(p.endswith(".png") and "forecast_vs_actual" in p for p in plots)
    assert any(p.endswith(".png") and "metrics_by_step" in p for p in plots)
    gbt_child = [r for name, r in by_name.items() if name.endswith("/gbt")][0]
    charts = {a.path for a in client.list_artifacts(gbt_child.info.run_id, "plots")}
    assert any("feature_importance" in p and p.endswith(".png") for p in charts)


def test_forecast_for_a_past_day_is_issued_from_its_end(forecast_city):
    """``forecast --date D`` (what the daily DAG runs for its data interval): origins are the
    series' last steps on or before D, targets follow D, and a re-run replaces its rows."""
    lake, _ = forecast_city
    day = (START + dt.timedelta(days=1)).date()
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    args = ["--lake", str(lake.root), "-q", "forecast", "--horizon", str(HORIZON), "--date", day.isoformat()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CITYLAKE__MLFLOW__TRACKING_URI", lake.config.mlflow.tracking_uri)
        mp.setenv("CITYLAKE__MLFLOW__ARTIFACT_ROOT", lake.config.mlflow.artifact_root)
        assert main(args) == 0
        past = lake.read("forecasts").where(F.col("origin_ts") < F.lit(end))
        n_past = past.count()
        assert main(args) == 0  # the same day again: replaced, not added
    assert n_past > 0 and lake.read("forecasts").where(F.col("origin_ts") < F.lit(end)).count() == n_past
    origins = past.select(F.max("origin_ts").alias("hi"), F.min("target_ts").alias("first")).first()
    assert origins["hi"].date() == day and origins["first"] > origins["hi"]
    lab = past.where(F.col("region") == LAB).select("origin_ts").distinct().collect()
    assert [r["origin_ts"] for r in lab] == [dt.datetime(2026, 1, 6, 23, 45)]  # last 15-min step of the day
