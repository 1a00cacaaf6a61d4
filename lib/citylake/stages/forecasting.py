"""Forecasting stages: train, backtest (with champions) and forecast.

* ``run_train(lake, cutoff)``: AR(p) for every series and GBT per region and metric on
  gold features up to ``cutoff``; coefficients and feature importances land in gold;
  an MLflow parent run with one child run per region and model family.
* ``run_backtest(lake, cutoff, horizon, stride)``: the same training on data up to the
  cutoff, then forecasts from every ``stride``-th grid step after it (each origin sees
  only data up to itself) by AR, GBT, persistence and seasonal naive; intervals
  (AR analytic; the others split-conformal, cross-fitted over two halves of the origins
  so no row is calibrated on itself); metrics per region and step; a champion per region
  and metric (lowest mean RMSE over the steps) in ``champions`` and as the MLflow
  registry alias ``champion``.
* ``run_forecast(lake, horizon)``: each region and metric served by its champion (loaded
  from the registry by name and alias), from each series' newest step; rows replace
  those of an earlier run for the same origin.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from functools import reduce
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from citylake.errors import CitylakeError
from citylake.forecast import ar_direct, ar_spark, baselines, conformal, evaluation, gbt, tracking
from citylake.lake import Lake
from citylake.pipeline import end_of_day

log = logging.getLogger(__name__)

FAMILIES = ("ar", "gbt", "persistence", "seasonal_naive")


@dataclass
class TrainedModels:
    """What one training produced (Spark frames are persisted until ``release``)."""

    coefficients: DataFrame
    gbt_models: list
    cutoff: dt.datetime | None
    seconds: dict[str, float] = field(default_factory=dict)

    def release(self) -> None:
        self.coefficients.unpersist()


@dataclass
class ForecastReport:
    """Summary of a train / backtest / forecast run, printed by the CLI."""

    job: str
    run_id: str | None
    rows: dict[str, int] = field(default_factory=dict)
    champions: list[tuple[str, str, str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        head = f"{self.job} run {self.run_id}" if self.run_id else self.job
        parts = [head] + [f"{k} {v}" for k, v in self.rows.items()]
        text = ", ".join(parts) + f" [{self.seconds:.1f}s]"
        for region, metric, model, rmse in self.champions:
            text += f"\n        champion {region}/{metric}: {model} (rmse {rmse:.3f})"
        return text


def _utc(ts: dt.datetime | None) -> dt.datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def gold_history(lake: Lake, cutoff: dt.datetime | None = None) -> DataFrame:
    """Gold features of every metric, up to ``cutoff`` (inclusive) when given.

    Every metric stays in: the GBT's ``x_<metric>`` features read a station's other
    metrics even when only some are modelled (see :func:`modelled`).
    """
    gold = lake.read("gold_features")
    if cutoff is not None:
        gold = gold.where(F.col("ts") <= F.lit(_utc(cutoff)))
    return gold


def modelled(lake: Lake, df: DataFrame) -> DataFrame:
    """Rows of the metrics to forecast (config ``forecast.metrics``; empty: all)."""
    metrics = lake.config.forecast.metrics
    return df.where(F.col("metric").isin(metrics)) if metrics else df


def _gbt_params(lake: Lake) -> gbt.GBTParams:
    fc = lake.config.forecast
    return gbt.GBTParams(
        n_trees=fc.gbt_trees, max_depth=fc.gbt_max_depth, learning_rate=fc.gbt_learning_rate,
        min_rows_per_leaf=fc.gbt_min_rows_per_leaf, subsample=fc.gbt_subsample,
        feature_fraction=fc.gbt_feature_fraction, steps_per_model=fc.gbt_steps_per_model,
        max_bins=fc.gbt_max_bins, linear_stage=fc.gbt_linear_stage,
    )


def train_models(lake: Lake, history: DataFrame, cutoff: dt.datetime | None) -> TrainedModels:
    """Fit AR for every series and GBT per region and metric on ``history``: gold rows up
    to ``cutoff`` (AR reads those rows from the table itself, see the comment below)."""
    fc = lake.config.forecast
    seconds = {}
    started = time.monotonic()
    # AR reads gold_features up to the cutoff itself: its direct reader skips Spark's
    # row-by-row hand-over to Python (forecast/ar_direct.py); ``history`` is that same data.
    coefficients = ar_direct.fit_ar_table(
        lake.spark, lake.path("gold_features"), p=fc.ar_order, candidates=fc.ar_candidates or None,
        criterion=fc.ar_criterion, ts_max=_utc(cutoff), metrics=fc.metrics or None,
        tasks=fc.ar_tasks or None, reader=fc.ar_reader,
    ).persist(StorageLevel.MEMORY_AND_DISK)
    n_series = coefficients.count()
    seconds["ar"] = time.monotonic() - started
    log.info("AR: %d series fitted in %.1fs", n_series, seconds["ar"])
    started = time.monotonic()
    stride = max(1, fc.gbt_origin_stride)
    models = gbt.train_gbt(
        history, fc.horizon, engine=fc.gbt_engine, params=_gbt_params(lake),
        spark_min_rows=fc.gbt_spark_min_rows, parallelism=fc.gbt_parallelism,
        sample_fraction=1.0 / stride, metrics=fc.metrics or None,
    )
    seconds["gbt"] = time.monotonic() - started
    log.info("GBT: %d region models (%s) in %.1fs", len(models),
             ", ".join(sorted({m.engine for m in models})), seconds["gbt"])
    return TrainedModels(coefficients, models, cutoff, seconds)


def _write_training_tables(lake: Lake, trained: TrainedModels, run_id: str) -> None:
    lake.append("gold_ar_coefficients", trained.coefficients)
    if trained.gbt_models:
        importances = gbt.feature_importances_df(lake.spark, trained.gbt_models)
        importances = importances.withColumns({"run_id": F.lit(run_id), "trained_ts": F.current_timestamp()})
        lake.append("gold_feature_importance", importances)


def _params(lake: Lake, **extra: Any) -> dict[str, Any]:
    params = tracking.flat_params("forecast", lake.config.forecast)
    params.update({k: v for k, v in extra.items() if v is not None})
    params["lake"] = lake.root
    return params


def _log_children(trained: TrainedModels, metrics_rows: list | None, job: str) -> dict[tuple[str, str, str], str]:
    """One child run per region, metric and family; returns their run ids."""
    runs: dict[tuple[str, str, str], str] = {}
    criterion = trained.coefficients.select("criterion").first()
    criterion = criterion["criterion"] if criterion else None
    coef_summary = (
        trained.coefficients.groupBy("region", "metric")
        .agg(F.count(F.lit(1)).alias("n"), F.sum("n_train").alias("rows"), F.avg("p").alias("p"),
             F.avg("sigma").alias("sigma"), F.sum(F.col("fit_ok").cast("int")).alias("ok"))
        .collect()
    )
    step_metrics: dict[tuple[str, str, str], list[tuple[str, float, int]]] = {}
    for r in metrics_rows or []:
        key = (r["region"], r["metric"], r["model"])
        for name in ("mae", "rmse", "mape", "smape", "mase", "coverage"):
            step_metrics.setdefault(key, []).append((name, r[name], r["step"]))
    groups = {(r["region"], r["metric"]) for r in coef_summary} | {(m.region, m.metric) for m in trained.gbt_models}
    by_model = {(m.region, m.metric): m for m in trained.gbt_models}
    coef_by = {(r["region"], r["metric"]): r for r in coef_summary}
    for region, metric in sorted(groups, key=str):
        for family in FAMILIES:
            if job == "train" and family in ("persistence", "seasonal_naive"):
                continue
            params: dict[str, Any] = {"family": family, "region": region, "metric": metric}
            plain: dict[str, float] = {}
            if family == "ar" and (region, metric) in coef_by:
                c = coef_by[(region, metric)]
                params.update(series=c["n"], mean_p=c["p"], criterion_order=criterion)
                plain.update(training_rows=c["rows"], series_fitted=c["ok"], mean_sigma=c["sigma"] or 0.0,
                             duration_s=trained.seconds.get("ar", 0.0))
            elif family == "gbt" and (region, metric) in by_model:
                m = by_model[(region, metric)]
                params.update(engine=m.engine, features=len(m.features), horizon=m.horizon)
                plain.update(training_rows=m.n_train, duration_s=m.seconds, train_rmse=m.rmse)
            elif family in ("ar", "gbt"):
                continue
            with tracking.child_run(f"{region}/{metric}/{family}",
                                    {"citylake.family": family, "citylake.region": str(region),
                                     "citylake.metric": metric}) as run:
                tracking.log_batch(run.info.run_id, params=params, metrics=plain,
                                   step_metrics=step_metrics.get((region, metric, family)))
                if family == "gbt":
                    gbt.log_model_mlflow(by_model[(region, metric)], "model")
                    _log_importance_chart(by_model[(region, metric)])
                runs[(region, metric, family)] = run.info.run_id
    return runs


def _log_importance_chart(model: gbt.GBTModel, top: int = 20) -> None:
    """Bar chart of the model's gain importances (top ``top``) in the active run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    ranked = sorted(model.importances.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    if not ranked:
        return
    names, values = zip(*reversed(ranked))
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    ax.barh(names, values)
    ax.set(title=f"GBT feature importance (gain share): {model.region} / {model.metric}", xlabel="share of gain")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"feature_importance_{model.region}_{model.metric}.png"
        fig.savefig(path, dpi=80)
        mlflow.log_artifact(str(path), artifact_path="plots")
    plt.close(fig)


def run_train(lake: Lake, cutoff: dt.datetime | None = None) -> ForecastReport:
    """Fit every model on gold features up to ``cutoff`` (default: all) and track it."""
    started = time.monotonic()
    history = gold_history(lake, cutoff)
    with tracking.parent_run(lake.config, "train", _params(lake, cutoff=cutoff)) as run:
        trained = train_models(lake, history, cutoff)
        _write_training_tables(lake, trained, run.info.run_id)
        _log_children(trained, None, "train")
        _log_ar_table(trained)
        rows = {"ar_series": trained.coefficients.count(), "gbt_models": len(trained.gbt_models)}
        trained.release()
    return ForecastReport("train", run.info.run_id, rows, seconds=time.monotonic() - started)


def _log_ar_table(trained: TrainedModels) -> None:
    import mlflow

    table = ar_spark.coefficients_long(trained.coefficients).toPandas()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ar_coefficients.csv"
        table.to_csv(path, index=False)
        mlflow.log_artifact(str(path))


# -- backtest -------------------------------------------------------------------------------
def backtest_origins(history: DataFrame, cutoff: dt.datetime, stride: int, catalogue) -> DataFrame:
    """(sensor_id, metric, origin_ts, fold): grid steps after ``cutoff`` with a value, every
    ``stride``-th step of each series' grid; ``fold`` (0/1) alternates over origins."""
    interval = baselines.interval_lookup(catalogue)
    offset = F.floor((F.unix_seconds("ts") - F.lit(int(_utc(cutoff).timestamp()))) / interval)
    return (
        history.where((F.col("ts") > F.lit(_utc(cutoff))) & F.col("value").isNotNull())
        .withColumn("_k", offset)
        .where(F.pmod(F.col("_k") - 1, F.lit(stride)) == 0)
        .select("sensor_id", "metric", F.col("ts").alias("origin_ts"),
                F.pmod(F.floor((F.col("_k") - 1) / stride), F.lit(2)).cast("int").alias("fold"))
    )


def _cross_conformal(rows: DataFrame, level: float, models: list[str]) -> DataFrame:
    """Intervals for ``models`` from the residuals of the *other* fold of origins."""
    target = rows.where(F.col("model").isin(models))
    others = rows.where(~F.col("model").isin(models))
    parts = [others]
    for fold in (0, 1):
        calibration = target.where(F.col("fold") != fold)
        q = conformal.conformal_quantiles(calibration, level=level)
        parts.append(conformal.apply_conformal(target.where(F.col("fold") == fold), q, models=models))
    out = reduce(DataFrame.unionByName, parts)
    return out


def _station_rows_at(history: DataFrame, keys: DataFrame) -> DataFrame:
    """Gold rows of *every* metric of the keys' stations at the origin times: the GBT's
    ``x_<metric>`` features need the station's other metrics at the origin."""
    station_ts = keys.select("sensor_id", F.col("origin_ts").alias("ts")).distinct()
    return history.join(station_ts, ["sensor_id", "ts"], "left_semi")


def forecast_rows(lake: Lake, trained: TrainedModels, history: DataFrame, origins: DataFrame,
                  horizon: int) -> DataFrame:
    """Forecast rows of every family from ``origins`` (sensor_id, metric, origin_ts)."""
    fc = lake.config.forecast
    catalogue = lake.catalogue
    keys = origins.select("sensor_id", "metric", "origin_ts")
    ar_rows = ar_spark.forecast_spark(trained.coefficients, history, horizon, level=fc.interval_level,
                                      origins=keys).withColumn("model", F.lit("ar"))
    parts = [ar_rows]
    if trained.gbt_models:
        horizon_gbt = min([horizon] + [m.horizon for m in trained.gbt_models])
        parts.append(gbt.predict_gbt(trained.gbt_models, _station_rows_at(history, keys), horizon_gbt)
                     .join(keys, ["sensor_id", "metric", "origin_ts"], "left_semi"))
    base_history = history.select("sensor_id", "metric", "region", "ts", "value")
    parts.append(baselines.persistence(base_history, keys, horizon, catalogue))
    parts.append(baselines.seasonal_naive(base_history, keys, horizon, catalogue, season=fc.season))
    out = reduce(DataFrame.unionByName, [_forecast_shape(p) for p in parts])
    return conformal.clip(out, catalogue)


def _forecast_shape(rows: DataFrame) -> DataFrame:
    """Forecast rows in :data:`baselines.FORECAST_COLUMNS` order; a model without its own
    interval (GBT: split-conformal, added later) gets null bounds."""
    for bound in ("y_lower", "y_upper"):
        if bound not in rows.columns:
            rows = rows.withColumn(bound, F.lit(None).cast("double"))
    return rows.select(*baselines.FORECAST_COLUMNS)


def default_cutoff(history: DataFrame, test_fraction: float) -> dt.datetime:
    """The time that leaves the last ``test_fraction`` of ``history``'s span for testing,
    floored to the hour (UTC)."""
    if not 0 < test_fraction < 1:
        raise CitylakeError(f"forecast.backtest_test_fraction must be in (0, 1), not {test_fraction}")
    span = history.agg(F.min("ts").alias("lo"), F.max("ts").alias("hi")).first()
    if span["lo"] is None:
        raise CitylakeError("gold_features is empty: run the pipeline (citylake run) before forecasting")
    lo, hi = _utc(span["lo"]), _utc(span["hi"])
    return (lo + (hi - lo) * (1 - test_fraction)).replace(minute=0, second=0, microsecond=0)


def run_backtest(lake: Lake, cutoff: dt.datetime | None = None, horizon: int | None = None,
                 stride: int | None = None) -> ForecastReport:
    """Train on data up to ``cutoff``, forecast from every ``stride``-th step after it.

    Without ``cutoff`` the last ``forecast.backtest_test_fraction`` of the data is tested.
    """
    started = time.monotonic()
    fc = lake.config.forecast
    horizon = horizon or fc.horizon
    stride = stride or fc.backtest_stride
    history = gold_history(lake).persist(StorageLevel.MEMORY_AND_DISK)
    cutoff = _utc(cutoff) or default_cutoff(history, fc.backtest_test_fraction)
    log.info("backtest: cutoff %s, horizon %d, stride %d", cutoff.isoformat(), horizon, stride)
    train_part = history.where(F.col("ts") <= F.lit(cutoff))
    with tracking.parent_run(lake.config, "backtest",
                             _params(lake, cutoff=cutoff, horizon=horizon, stride=stride)) as run:
        run_id = run.info.run_id
        trained = train_models(lake, train_part, cutoff)
        _write_training_tables(lake, trained, run_id)
        origins = backtest_origins(modelled(lake, history), cutoff, stride, lake.catalogue).persist()
        n_origins = origins.count()
        if n_origins == 0:
            raise CitylakeError(f"no backtest origins after cutoff {cutoff}: the data ends before it")
        rows = forecast_rows(lake, trained, history, origins, horizon)
        rows = rows.join(origins, ["sensor_id", "metric", "origin_ts"])
        rows = evaluation.attach_actuals(rows, history.select("sensor_id", "metric", "ts", "value"))
        rows = _cross_conformal(rows, fc.interval_level, ["gbt", "persistence", "seasonal_naive"])
        rows = rows.withColumns({"run_id": F.lit(run_id), "cutoff_ts": F.lit(cutoff)}).persist()
        lake.overwrite("backtest_forecasts", rows)
        scale = evaluation.mase_scale(modelled(lake, train_part).select("sensor_id", "metric", "region", "ts", "value"))
        metrics = evaluation.backtest_metrics(rows, scale).withColumns(
            {"run_id": F.lit(run_id), "cutoff_ts": F.lit(cutoff)}).persist()
        lake.overwrite("backtest_metrics", metrics)
        metric_rows = metrics.collect()
        children = _log_children(trained, [r for r in metric_rows if r["region"] != "ALL"], "backtest")
        _log_ar_table(trained)
        _log_overall(metric_rows)
        chosen = evaluation.champions(metrics.where(F.col("region") != "ALL")).collect()
        registered = _register_champions(lake, chosen, children, trained)
        _write_champions(lake, chosen, registered, run_id)
        _log_plots(rows, metric_rows)
        report = ForecastReport(
            "backtest", run_id,
            {"origins": n_origins, "forecast_rows": lake.read("backtest_forecasts").count()},
            champions=[(c["region"], c["metric"], c["champion_model"], c["rmse"]) for c in chosen],
        )
        for df in (rows, metrics, origins):
            df.unpersist()
        trained.release()
    history.unpersist()
    report.seconds = time.monotonic() - started
    return report


def _log_overall(metric_rows: list) -> None:
    """Parent-run metrics: RMSE per model over all regions, per step (one batch)."""
    import mlflow

    entries = [(f"rmse_{r['model']}_{r['metric']}", r["rmse"], r["step"]) for r in metric_rows if r["region"] == "ALL"]
    entries += [(f"coverage_{r['model']}_{r['metric']}", r["coverage"], r["step"])
                for r in metric_rows if r["region"] == "ALL" and r["coverage"] is not None]
    tracking.log_batch(mlflow.active_run().info.run_id, step_metrics=entries)


def registered_name(region: str, metric: str) -> str:
    """The MLflow registered model serving one region and metric."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in f"{region}-{metric}")
    return f"citylake-{safe}"


def _register_champions(lake: Lake, chosen: list, children: dict, trained: TrainedModels) -> dict:
    """Register each champion as a new version of its region/metric model; alias 'champion'."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from citylake.forecast.served import log_served_model

    client = MlflowClient()
    out = {}
    for c in chosen:
        region, metric, family = c["region"], c["metric"], c["champion_model"]
        name = registered_name(region, metric)
        run_id = children.get((region, metric, family))
        if family == "gbt" and run_id:
            uri = f"runs:/{run_id}/model"
        else:
            coeffs = None
            if family == "ar":
                coeffs = (trained.coefficients.where((F.col("region") == region) & (F.col("metric") == metric))
                          .toPandas())
            with tracking.child_run(f"{region}/{metric}/{family}/served",
                                    {"citylake.family": family, "citylake.region": region,
                                     "citylake.metric": metric}) as run:
                uri = log_served_model(family, region, metric, coeffs)
        version = mlflow.register_model(uri, name, tags={"citylake.family": family})
        client.set_registered_model_alias(name, "champion", version.version)
        out[(region, metric)] = (name, version.version)
        log.info("champion %s/%s: %s -> %s v%s", region, metric, family, name, version.version)
    return out


def _write_champions(lake: Lake, chosen: list, registered: dict, run_id: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    rows = [(c["region"], c["metric"], c["champion_model"], c["rmse"], c["runner_up"], c["runner_up_rmse"],
             *registered.get((c["region"], c["metric"]), (None, None)), run_id, now) for c in chosen]
    if rows:
        lake.append("champions", lake.spark.createDataFrame(rows, lake.spec("champions").struct()))


def _log_plots(rows: DataFrame, metric_rows: list) -> None:
    """Per region: metrics by step, and actual vs step-1 forecast with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import pandas as pd

    metrics = pd.DataFrame([r.asDict() for r in metric_rows])
    if metrics.empty:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for (region, metric), part in metrics.groupby(["region", "metric"]):
            fig, ax = plt.subplots(figsize=(7, 4))
            for model, m in part.groupby("model"):
                ax.plot(m["step"], m["rmse"], marker="o", label=model)
            ax.set(title=f"RMSE by step: {region} / {metric}", xlabel="step", ylabel="RMSE")
            ax.legend()
            path = Path(tmp) / f"metrics_by_step_{region}_{metric}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            mlflow.log_artifact(str(path), artifact_path=f"plots/{region}")
        sample = (rows.where(F.col("step") == 1)
                  .select("model", "sensor_id", "metric", "region", "target_ts", "y_true", "y_pred", "y_lower", "y_upper"))
        sensors = (sample.select("region", "metric", "sensor_id").distinct()
                   .groupBy("region", "metric").agg(F.slice(F.array_sort(F.collect_list("sensor_id")), 1, 3).alias("s"))
                   .select("region", "metric", F.explode("s").alias("sensor_id")))
        pdf = sample.join(sensors, ["region", "metric", "sensor_id"]).toPandas()
        for (region, metric), part in pdf.groupby(["region", "metric"]):
            ids = sorted(part["sensor_id"].unique())
            fig, axes = plt.subplots(len(ids), 1, figsize=(9, 2.6 * len(ids)), squeeze=False)
            for ax, sid in zip(axes[:, 0], ids):
                s = part[part["sensor_id"] == sid].sort_values("target_ts")
                actual = s.drop_duplicates("target_ts")
                ax.plot(actual["target_ts"], actual["y_true"], color="black", lw=1, label="actual")
                for model, m in s.groupby("model"):
                    if model in ("ar", "gbt"):
                        ax.plot(m["target_ts"], m["y_pred"], lw=1, label=model)
                        ax.fill_between(m["target_ts"], m["y_lower"], m["y_upper"], alpha=0.2)
                ax.set_title(f"{sid} / {metric}: step-1 forecasts with 90% band", fontsize=9)
                ax.legend(fontsize=7)
            fig.tight_layout()
            path = Path(tmp) / f"forecast_vs_actual_{region}_{metric}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            mlflow.log_artifact(str(path), artifact_path=f"plots/{region}")


# -- forecast -------------------------------------------------------------------------------
def latest_champions(lake: Lake) -> list:
    """The newest champion row per region and metric."""
    from pyspark.sql import Window

    newest = Window.partitionBy("region", "metric").orderBy(F.col("selected_ts").desc())
    return (lake.read("champions").withColumn("_r", F.row_number().over(newest))
            .where("_r = 1").drop("_r").collect())


def run_forecast(lake: Lake, horizon: int | None = None, model: str | None = None,
                 date: dt.date | None = None) -> ForecastReport:
    """Forecast every series from its newest step with its region's champion (or ``model``).

    With ``date`` (UTC) the origin is each series' newest step *on or before that day*,
    as if the forecast were issued at the end of it: what a scheduled run for that data
    interval issues, so re-running or backfilling a day gives the same rows.

    Champions come from the MLflow registry (``citylake-<region>-<metric>@champion``);
    AR intervals are analytic, the others use split-conformal quantiles from the latest
    backtest. Rows for an origin already forecast are replaced (MERGE), never duplicated.
    """
    import mlflow

    from citylake.forecast.served import load_coefficients

    started = time.monotonic()
    fc = lake.config.forecast
    horizon = horizon or fc.horizon
    tracking.setup(lake.config)
    champions = latest_champions(lake)
    if not champions:
        raise CitylakeError("no champions yet: run `citylake backtest --cutoff TS` first")
    history = gold_history(lake)
    if date is not None:
        history = history.where(F.col("ts") < F.lit(end_of_day(date)))
    history = history.persist(StorageLevel.MEMORY_AND_DISK)
    origins = modelled(lake, history).where(F.col("value").isNotNull()).groupBy("sensor_id", "metric").agg(
        F.max("ts").alias("origin_ts"))
    parts = []
    for c in champions:
        region, metric = c["region"], c["metric"]
        family = model or c["champion_model"]
        uri = f"models:/{registered_name(region, metric)}@champion"
        version = mlflow.MlflowClient().get_model_version_by_alias(registered_name(region, metric), "champion")
        series = history.where((F.col("region") == region) & (F.col("metric") == metric))
        keys = origins.join(series.select("sensor_id", "metric").distinct(), ["sensor_id", "metric"], "left_semi")
        if family == "ar":
            pdf = load_coefficients(uri) if c["champion_model"] == "ar" else None
            coeffs = (lake.spark.createDataFrame(pdf) if pdf is not None else
                      _latest_coefficients(lake).where((F.col("region") == region) & (F.col("metric") == metric)))
            rows = ar_spark.forecast_spark(coeffs, series, horizon, level=fc.interval_level, origins=keys)
            rows = rows.withColumn("model", F.lit("ar"))
        elif family == "gbt":
            loaded = gbt.load_model_mlflow(uri, engine=_engine_of(uri))
            rows = gbt.predict_gbt([loaded], _station_rows_at(history, keys), min(horizon, loaded.horizon))
            rows = rows.join(keys, ["sensor_id", "metric", "origin_ts"], "left_semi")
        elif family == "persistence":
            rows = baselines.persistence(series.select("sensor_id", "metric", "region", "ts", "value"), keys, horizon)
        else:
            rows = baselines.seasonal_naive(series.select("sensor_id", "metric", "region", "ts", "value"), keys,
                                            horizon, season=fc.season)
        parts.append(_forecast_shape(rows).withColumn("run_id", F.lit(version.run_id)))
    out = reduce(DataFrame.unionByName, parts)
    calibration = lake.read("backtest_forecasts")
    q = conformal.conformal_quantiles(calibration, level=fc.interval_level)
    out = conformal.clip(conformal.apply_conformal(out, q), lake.catalogue)
    out = out.withColumn("issued_ts", F.current_timestamp()).persist()
    n = out.count()
    target = lake.delta("forecasts")
    keys_cond = " AND ".join(f"t.{k} = s.{k}" for k in ("model", "sensor_id", "metric", "origin_ts", "step"))
    (target.alias("t").merge(lake.conform("forecasts", out).alias("s"), keys_cond)
     .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
    out.unpersist()
    history.unpersist()
    if n == 0:
        log.warning("no forecasts issued: no modelled series has data%s",
                    f" on or before {date.isoformat()}" if date else "")
    return ForecastReport("forecast", None, {"forecast_rows": n},
                          champions=[(c["region"], c["metric"], model or c["champion_model"], c["rmse"] or 0.0)
                                     for c in champions],
                          seconds=time.monotonic() - started)


def _latest_coefficients(lake: Lake) -> DataFrame:
    coeffs = lake.read("gold_ar_coefficients")
    newest = coeffs.agg(F.max("fitted_ts")).first()[0]
    return coeffs.where(F.col("fitted_ts") == F.lit(newest))


def _engine_of(uri: str) -> str:
    import mlflow

    meta = (mlflow.models.get_model_info(uri).metadata or {}).get("citylake_gbt", {})
    return meta.get("engine", "local")
