"""GBT forecaster: training set, routing, both engines, importances, MLflow round trip.

Gold frames are built with the real ``build_features`` from small synthetic silver frames
(hourly pm25: a strong daily cycle + AR(1) noise). Spark ML runs with few shallow trees.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from citylake.forecast import gbt
from citylake.forecast.gbt_data import (
    CALENDAR_FEATURES,
    numeric_feature_candidates,
    origin_rows,
    training_set,
)
from citylake.transforms.features import build_features

START = pd.Timestamp("2026-01-05", tz="UTC")  # a Monday
INTERVALS = {"pm25": 3600, "temperature": 3600}
LAGS, WINDOWS = [1, 2, 24], [3, 24]
HORIZON = 6
SMALL = gbt.GBTParams(n_trees=40, max_depth=3, min_rows_per_leaf=10)
TINY = gbt.GBTParams(n_trees=5, max_depth=3, min_rows_per_leaf=10)


def synthetic_silver(
    spark: SparkSession,
    regions: int = 2,
    sensors: int = 3,
    steps: int = 400,
    metrics: tuple[str, ...] = ("pm25",),
    seed: int = 0,
) -> DataFrame:
    """Hourly silver rows: 40 + 20 sin(2 pi hour / 24) + level per sensor + AR(1) noise."""
    rng = np.random.default_rng(seed)
    ts = pd.date_range(START, periods=steps, freq="h")
    cycle = 20 * np.sin(2 * np.pi * ts.hour.to_numpy() / 24)
    frames = []
    for r in range(regions):
        for s in range(sensors):
            for i, metric in enumerate(metrics):
                noise = np.zeros(steps)
                shocks = rng.normal(0, 2, steps)
                for t in range(1, steps):
                    noise[t] = 0.7 * noise[t - 1] + shocks[t]
                value = 40 + 5 * r + 3 * s + 10 * i + cycle + noise
                frames.append(
                    pd.DataFrame({"sensor_id": f"r{r}s{s}", "metric": metric, "region": f"r{r}", "ts": ts, "value_clean": value})
                )
    return silver_frame(spark, pd.concat(frames, ignore_index=True))


def silver_frame(spark: SparkSession, pdf: pd.DataFrame) -> DataFrame:
    pdf = pdf.assign(reading_date=pdf["ts"].dt.date, is_filled=False, is_outlier=False)
    cols = ["sensor_id", "metric", "region", "ts", "reading_date", "value_clean", "is_filled", "is_outlier"]
    schema = (
        "sensor_id string, metric string, region string, ts timestamp, reading_date date, "
        "value_clean double, is_filled boolean, is_outlier boolean"
    )
    return spark.createDataFrame(pdf[cols], schema)


def gold_of(silver: DataFrame) -> DataFrame:
    return build_features(silver, LAGS, WINDOWS, INTERVALS)


@pytest.fixture(scope="module")
def gold(spark) -> DataFrame:
    df = gold_of(synthetic_silver(spark)).cache()
    df.count()
    yield df
    df.unpersist()


@pytest.fixture(scope="module")
def trained(gold) -> dict[str, list[gbt.GBTModel]]:
    """Both engines on the same gold (2 groups each), horizon 3, trained once."""
    return {
        "local": gbt.train_gbt(gold, 3, engine="local", params=SMALL, parallelism=2),
        "spark-ml": gbt.train_gbt(gold, 3, engine="spark-ml", params=TINY, parallelism=2),
    }


def at_origin(gold: DataFrame, step: int) -> DataFrame:
    return gold.where(F.col("ts") == F.lit(START + pd.Timedelta(hours=step)))


# -- training set -----------------------------------------------------------------------


def test_targets_are_the_value_h_grid_steps_later_and_gaps_drop_rows(spark):
    # value = step index, so y must be origin value + h; step 5 is absent from silver.
    ts = pd.date_range(START, periods=10, freq="h")
    pdf = pd.DataFrame({"sensor_id": "a", "metric": "pm25", "region": "r", "ts": ts, "value_clean": np.arange(10.0)})
    silver = silver_frame(spark, pdf.drop(index=5))
    rows = training_set(gold_of(silver), 2, INTERVALS, cross_metrics=[]).toPandas()
    assert set(rows["step"]) == {1, 2}
    assert (rows["y"] == rows["value"] + rows["step"]).all()
    assert (rows["target_ts"] == rows["origin_ts"] + pd.to_timedelta(rows["step"], unit="h")).all()
    got = set(zip(rows["value"].astype(int), rows["step"]))
    # Origins 0..9 except 5; targets must exist: 5 and >= 10 are not there.
    expected = {(v, h) for v in range(10) if v != 5 for h in (1, 2) if v + h < 10 and v + h != 5}
    assert got == expected


def test_features_use_nothing_after_the_origin(spark):
    # Two silver histories identical up to step 200 and different afterwards (every
    # sensor, both metrics): rows with origin <= step 200 must have identical features.
    base = synthetic_silver(spark, regions=1, sensors=2, steps=240, metrics=("pm25", "temperature")).toPandas()
    later = base["ts"] > (START + pd.Timedelta(hours=200)).tz_localize(None)  # toPandas: naive UTC
    changed = base.assign(value_clean=np.where(later, base["value_clean"] * 3 + 100, base["value_clean"]))
    sets = [
        training_set(gold_of(silver_frame(spark, pdf)), HORIZON, INTERVALS)
        .where(F.col("origin_ts") <= F.lit(START + pd.Timedelta(hours=200)))
        .toPandas()
        .sort_values(["sensor_id", "metric", "origin_ts", "step"], ignore_index=True)
        for pdf in (base, changed)
    ]
    features = [c for c in sets[0].columns if c not in ("y",)]
    pd.testing.assert_frame_equal(sets[0][features], sets[1][features])
    assert not sets[0]["y"].equals(sets[1]["y"])  # targets beyond step 200 did change
    assert sets[0]["x_temperature"].notna().any()


def test_cross_metrics_and_target_calendar(spark):
    silver = synthetic_silver(spark, regions=1, sensors=1, steps=30, metrics=("pm25", "temperature"))
    gold = gold_of(silver)
    rows = training_set(gold, 2, INTERVALS).toPandas()
    values = gold.select("sensor_id", "metric", "ts", "value").toPandas()
    temp = values[values["metric"] == "temperature"].set_index("ts")["value"]
    pm = rows[rows["metric"] == "pm25"]
    assert np.allclose(pm["x_temperature"].to_numpy(), temp.loc[pm["origin_ts"]].to_numpy())
    assert rows["x_pm10"].isna().all()  # no station reports it
    hours = rows["target_ts"].dt.hour.to_numpy()
    assert np.allclose(rows["target_hour_sin"], np.sin(2 * np.pi * hours / 24))
    # origin_rows: the same feature columns, without the target.
    origins = origin_rows(gold.where(F.col("ts") == F.lit(START + pd.Timedelta(hours=29))), 2, INTERVALS)
    assert origins.columns == [c for c in rows.columns if c != "y"]
    assert origins.count() == 2 * 2  # two series x two steps


def test_change_cross_change_and_season_features(spark):
    silver = synthetic_silver(spark, regions=1, sensors=1, steps=60, metrics=("pm25", "temperature"))
    gold = gold_of(silver)
    rows = training_set(gold, 1, INTERVALS).toPandas()
    pm = rows[rows["metric"] == "pm25"].set_index("origin_ts")
    g = gold.toPandas()
    temp = g[g["metric"] == "temperature"].set_index("ts")
    # Own changes over every gold lag; cross changes only over lags >= 3 (LAGS = 1, 2, 24).
    assert np.allclose((pm["value"] - pm["lag_2"]).dropna(), pm["change_2"].dropna())
    assert pm["change_24"].notna().sum() == pm["lag_24"].notna().sum() > 0
    t = temp.loc[pm.index]
    assert np.allclose((t["value"] - t["lag_24"]).to_numpy(), pm["x_temperature_change_24"].to_numpy(), equal_nan=True)
    assert np.allclose(t["roll_mean_24"].to_numpy(), pm["x_temperature_mean_24"].to_numpy(), equal_nan=True)
    assert "x_temperature_change_2" not in rows.columns and "x_temperature_change_1" not in rows.columns
    # Season of the target: a fraction of the mean tropical year since the epoch.
    year = 365.2425 * 86400
    seconds = (rows["target_ts"] - pd.Timestamp("1970-01-01")).dt.total_seconds()  # toPandas: naive UTC
    angle = 2 * np.pi * (seconds % year) / year
    assert np.allclose(rows["target_doy_sin"], np.sin(angle)) and np.allclose(rows["target_doy_cos"], np.cos(angle))
    # Day of week only for metrics with a weekly cycle (catalogue): not pm25 or temperature.
    assert rows["target_dow_sin"].isna().all()
    weekly = training_set(gold, 1, INTERVALS, weekly_metrics=["pm25"]).toPandas()
    dow = ((weekly["target_ts"] - pd.Timestamp("1970-01-05")).dt.days % 7).to_numpy()  # a Monday: 0
    pm_rows = (weekly["metric"] == "pm25").to_numpy()
    assert np.allclose(weekly.loc[pm_rows, "target_dow_sin"], np.sin(2 * np.pi * dow[pm_rows] / 7))
    assert weekly.loc[~pm_rows, "target_dow_sin"].isna().all()
    # A group leaves out every x_ column of its own metric.
    plans = gbt.plan_groups(training_set(gold, 1, INTERVALS), numeric_feature_candidates(gold.columns, ["pm25", "temperature"]), "local", 10**9)
    pm_plan = [p for p in plans if p.metric == "pm25"][0]
    assert not [f for f in pm_plan.numeric_features if f.startswith("x_pm25")]
    assert "x_temperature_change_24" in pm_plan.numeric_features


def test_sample_fraction_is_deterministic_and_about_the_share(gold):
    full = training_set(gold, HORIZON, INTERVALS).count()
    half = training_set(gold, HORIZON, INTERVALS, sample_fraction=0.5)
    n1, n2 = half.count(), half.count()
    assert n1 == n2
    assert 0.45 * full < n1 < 0.55 * full
    assert set(r["step"] for r in half.select("step").distinct().collect()) == set(range(1, HORIZON + 1))


# -- routing (no training) ----------------------------------------------------------------


def test_choose_engine_routes_by_rows():
    assert gbt.choose_engine(999, "auto", 1000) == "local"
    assert gbt.choose_engine(1000, "auto", 1000) == "spark-ml"
    assert gbt.choose_engine(10**9, "local", 1000) == "local"
    assert gbt.choose_engine(1, "spark-ml", 1000) == "spark-ml"
    with pytest.raises(ValueError):
        gbt.choose_engine(1, "xgboost", 1000)


def test_plan_groups_routes_and_selects_features(spark):
    silver = synthetic_silver(spark, regions=2, sensors=2, steps=60, metrics=("pm25",))
    # Region r1 gets a second metric on one sensor, so its groups differ in size.
    extra = synthetic_silver(spark, regions=1, sensors=1, steps=60, metrics=("temperature",))
    gold = gold_of(silver.unionByName(extra))
    train = training_set(gold, 2, INTERVALS)
    candidates = numeric_feature_candidates(gold.columns, ["pm25", "temperature"])
    plans = {p.key: p for p in gbt.plan_groups(train, candidates, "auto", spark_min_rows=150)}
    sizes = {k: p.n_train for k, p in plans.items()}
    assert sizes[("r0", "temperature")] < 150 <= sizes[("r0", "pm25")]
    assert {k: p.engine for k, p in plans.items()} == {
        k: ("spark-ml" if n >= 150 else "local") for k, n in sizes.items()
    }
    pm = plans[("r0", "pm25")]
    assert "x_temperature" in pm.numeric_features and "x_pm25" not in pm.numeric_features
    assert "x_pm10" not in pm.numeric_features  # null in every row
    assert "x_temperature" not in plans[("r1", "pm25")].numeric_features  # r1 has no temperature
    assert plans[("r0", "pm25")].categories == ("r0s0", "r0s1")
    # Routing by the rows of one step-block fit: 2 blocks halve what one fit holds.
    halved = {p.key: p.engine for p in gbt.plan_groups(train, candidates, "auto", 150, n_blocks=2)}
    assert halved == {k: ("spark-ml" if (n + 1) // 2 >= 150 else "local") for k, n in sizes.items()}


def test_step_blocks_cover_the_horizon():
    assert gbt.step_blocks(4, 1) == ((1, 1), (2, 2), (3, 3), (4, 4))
    assert gbt.step_blocks(5, 2) == ((1, 2), (3, 4), (5, 5))
    assert gbt.step_blocks(3, 0) == ((1, 3),) == gbt.step_blocks(3, 7)
    blocks = gbt.step_blocks(5, 2)
    assert gbt.block_of(np.array([1, 2, 3, 5, 9]), blocks).tolist() == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError):
        gbt.step_blocks(0, 1)


def test_a_block_without_rows_is_served_by_its_nearest_fitted_block():
    assert gbt.nearest_fitted([True, False, False, True]) == [0, 0, 3, 3]
    assert gbt.nearest_fitted([False, True, False]) == [1, 1, 1]
    with pytest.raises(ValueError):
        gbt.nearest_fitted([False, False])


def test_assign_buckets_balances_rows():
    sizes = [100, 90, 50, 40, 30, 10]
    buckets = gbt.assign_buckets(sizes, 2)
    loads = [sum(s for s, b in zip(sizes, buckets) if b == k) for k in (0, 1)]
    assert buckets[0] != buckets[1]  # the two largest groups never share a task
    assert max(loads) <= 4 / 3 * sum(sizes) / 2  # LPT bound
    assert gbt.assign_buckets([5, 5], 1) == [0, 0]


def test_partition_keys_land_in_distinct_partitions(spark):
    keys = gbt.partition_keys(spark, 5)
    placed = (
        spark.createDataFrame([(k,) for k in keys], "k int")
        .repartition(5, "k")
        .select("k", F.spark_partition_id().alias("p"))
        .collect()
    )
    assert {r["k"]: r["p"] for r in placed} == {k: i for i, k in enumerate(keys)}


# -- engines ------------------------------------------------------------------------------


def test_local_engine_beats_persistence_on_a_daily_cycle(gold):
    cutoff = START + pd.Timedelta(hours=320)
    models = gbt.train_gbt(gold.where(F.col("ts") < F.lit(cutoff)), HORIZON, engine="local", params=SMALL)
    assert [(m.region, m.metric, m.engine) for m in models] == [("r0", "pm25", "local"), ("r1", "pm25", "local")]
    origins = gold.where((F.col("ts") >= F.lit(cutoff)) & (F.col("ts") < F.lit(cutoff + pd.Timedelta(hours=70))))
    pred = gbt.predict_gbt(models, origins, HORIZON).toPandas()
    actual = gold.select("sensor_id", F.col("ts").alias("target_ts"), F.col("value").alias("y")).toPandas()
    start = gold.select("sensor_id", F.col("ts").alias("origin_ts"), F.col("value").alias("y_persist")).toPandas()
    scored = pred.merge(actual, on=["sensor_id", "target_ts"]).merge(start, on=["sensor_id", "origin_ts"])
    assert len(scored) == 6 * 70 * HORIZON
    rmse_gbt = math.sqrt(((scored["y_pred"] - scored["y"]) ** 2).mean())
    rmse_persist = math.sqrt(((scored["y_persist"] - scored["y"]) ** 2).mean())
    assert rmse_gbt < 0.5 * rmse_persist, (rmse_gbt, rmse_persist)


def test_both_engines_train_and_predict_the_same_table(trained, gold):
    for engine, models in trained.items():
        assert [(m.region, m.metric, m.engine) for m in models] == [("r0", "pm25", engine), ("r1", "pm25", engine)]
        for m in models:
            assert m.n_train > 0 and m.seconds > 0 and 0 < m.rmse < 15
            assert m.features[-2:] == ("sensor", "linear_forecast") and m.categories == tuple(f"{m.region}s{i}" for i in range(3))
    tables = {e: gbt.predict_gbt(models, at_origin(gold, 300), 3) for e, models in trained.items()}
    shapes = {e: [(f.name, f.dataType) for f in t.schema] for e, t in tables.items()}  # nullability aside
    assert shapes["local"] == shapes["spark-ml"]
    assert tables["local"].columns == list(gbt.PREDICTION_COLUMNS)
    keys = {e: sorted(t.drop("y_pred").collect()) for e, t in tables.items()}
    assert keys["local"] == keys["spark-ml"] and len(keys["local"]) == 6 * 3
    # Both forecasts follow the daily cycle, so they agree far better than its amplitude.
    both = tables["local"].alias("a").join(tables["spark-ml"].alias("b"), ["sensor_id", "step"])
    assert both.select(F.max(F.abs(F.col("a.y_pred") - F.col("b.y_pred")))).first()[0] < 10


def test_one_model_per_step_by_default_and_one_for_all_on_request(trained, gold):
    local, spark_ml = trained["local"][0], trained["spark-ml"][0]
    for m in (local, spark_ml):
        assert m.blocks == ((1, 1), (2, 2), (3, 3))
    assert len(local.model) == 3 and len(set(local.model)) == 3  # three different boosters
    gbt_stages = [s for s in spark_ml.model.stages if type(s).__name__ == "GBTRegressionModel"]
    assert len(gbt_stages) == 3
    pooled = gbt.train_gbt(gold, 3, engine="local", params=gbt.GBTParams(n_trees=5, steps_per_model=0))
    assert pooled[0].blocks == ((1, 3),) and len(pooled[0].model) == 1
    assert gbt.predict_gbt(pooled, at_origin(gold, 300), 3).count() == 6 * 3


def test_steps_beyond_the_training_history_use_the_nearest_steps_model(spark):
    # Three hourly points: origins reach step 2 at most, so step 3 has no training rows.
    ts = pd.date_range(START, periods=3, freq="h")
    pdf = pd.DataFrame({"sensor_id": "a", "metric": "pm25", "region": "r", "ts": ts, "value_clean": [1.0, 2.0, 4.0]})
    gold = gold_of(silver_frame(spark, pdf))
    [model] = gbt.train_gbt(gold, 3, engine="local", params=gbt.GBTParams(n_trees=2, min_rows_per_leaf=1))
    assert model.blocks == ((1, 1), (2, 2), (3, 3)) and model.model[2] == model.model[1]
    pred = gbt.predict_gbt([model], gold.where(F.col("ts") == F.lit(ts[-1])), 3).toPandas()
    assert sorted(pred["step"]) == [1, 2, 3] and pred["y_pred"].notna().all()


def test_the_linear_stage_is_part_of_each_block_model_and_can_be_left_out(trained, gold):
    local = trained["local"][0]
    assert len(local.linear) == len(local.model) == len(local.step_blocks)
    assert all("value" in s.features and "target_hour_sin" not in s.features for s in local.linear)
    spark_stages = [type(s).__name__ for s in trained["spark-ml"][0].model.stages]
    assert spark_stages.count("LinearRegressionModel") == spark_stages.count("GBTRegressionModel") == 3
    plain = gbt.train_gbt(gold, 3, engine="local", params=replace(TINY, linear_stage=False))[0]
    assert plain.linear == () and plain.features[-1] == "sensor" and "linear_forecast" not in plain.importances
    pred = gbt.predict_gbt([plain], at_origin(gold, 300), 3).collect()
    assert len(pred) == 3 * 3 and all(math.isfinite(r["y_pred"]) for r in pred)


def test_a_group_without_linear_inputs_trains_without_the_stage_in_both_engines(gold):
    # Only the target calendar and the step as numeric features: nothing for the ridge.
    train = gbt._as_target(training_set(gold, 2, INTERVALS, [], 1.0), "change").cache()
    calendar = [c for c in numeric_feature_candidates(gold.columns, []) if c in CALENDAR_FEATURES or c == "step"]
    plans = [replace(p, numeric_features=tuple(calendar))
             for p in gbt.plan_groups(train, calendar, "local", gbt.DEFAULT_SPARK_MIN_ROWS)][:1]
    assert not gbt.uses_linear_stage(plans[0].numeric_features, TINY) and gbt.uses_linear_stage(["value"], TINY)
    [local] = gbt._train_local(train, plans, TINY, 2, 1)
    spark_ml = gbt._train_spark_group(train, plans[0], TINY, 2, "test")
    train.unpersist()
    for model in (local, spark_ml):
        assert "linear_forecast" not in model.features and model.features[-1] == "sensor"
    assert local.linear == ()
    assert not any(type(s).__name__ == "LinearRegressionModel" for s in spark_ml.model.stages)
    origins = at_origin(gold, 300).where(F.col("region") == plans[0].region)
    for model in (local, spark_ml):
        rows = gbt.predict_gbt([model], origins, 2).collect()
        assert len(rows) == 3 * 2 and all(math.isfinite(r["y_pred"]) for r in rows)


def test_unseen_sensor_still_gets_a_forecast(trained, gold):
    renamed = at_origin(gold, 300).withColumn("sensor_id", F.concat("sensor_id", F.lit("_new")))
    for models in trained.values():
        assert gbt.predict_gbt(models, renamed, 2).where(F.col("y_pred").isNotNull()).count() == 6 * 2


def test_predict_refuses_a_horizon_beyond_training(trained, gold):
    with pytest.raises(ValueError, match="horizon 4"):
        gbt.predict_gbt(trained["local"], at_origin(gold, 300), 4)


def test_importances_sum_to_one_per_group(spark, trained):
    models = trained["local"] + trained["spark-ml"]
    table = gbt.feature_importances_df(spark, models)
    assert table.schema == gbt.GOLD_FEATURE_IMPORTANCE.struct()
    sums = table.groupBy("region", "metric", "engine").agg(F.sum("importance").alias("s"), F.count("*").alias("n"))
    rows = sums.collect()
    assert len(rows) == 4
    for r in rows:
        assert r["s"] == pytest.approx(1.0)
    top = table.where("rank = 1 AND engine = 'local'").select("feature").collect()
    # The daily cycle: the target hour, or the linear stage (it reads lag_24, a day ago).
    assert {r["feature"] for r in top} <= {"target_hour_sin", "target_hour_cos", "linear_forecast"}


# -- MLflow -------------------------------------------------------------------------------


@pytest.fixture()
def mlflow_store(tmp_path):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("gbt-test", artifact_location=str(tmp_path / "artifacts")))
    yield tmp_path
    mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize("engine", ["local", "spark-ml"])
def test_mlflow_round_trip_predicts_the_same(mlflow_store, trained, gold, engine):
    import mlflow

    model = trained[engine][0]
    dfs = str(mlflow_store / "dfs")
    with mlflow.start_run():
        uri = gbt.log_model_mlflow(model, f"gbt_{engine}", dfs_tmpdir=dfs)
    loaded = gbt.load_model_mlflow(uri, engine, dfs_tmpdir=dfs)
    assert (loaded.region, loaded.metric, loaded.features, loaded.categories) == (
        model.region, model.metric, model.features, model.categories,
    )
    assert loaded.importances == pytest.approx(model.importances)
    origins = at_origin(gold, 300)
    before = gbt.predict_gbt([model], origins, 3).orderBy("sensor_id", "step").toPandas()
    after = gbt.predict_gbt([loaded], origins, 3).orderBy("sensor_id", "step").toPandas()
    assert len(before) == 3 * 3
    pd.testing.assert_frame_equal(before, after)
    assert loaded.blocks == model.blocks
    if engine == "local":  # the logged pyfunc forecasts by itself, outside Spark
        from citylake.forecast.gbt_data import origin_rows as rows_of

        frame = rows_of(origins.where(F.col("region") == model.region), 3, INTERVALS).orderBy("sensor_id", "step").toPandas()
        direct = mlflow.pyfunc.load_model(uri).predict(frame)
        assert np.allclose(direct, before[before["sensor_id"].str.startswith(model.region)]["y_pred"].to_numpy())
    with pytest.raises(ValueError, match="not"):
        gbt.load_model_mlflow(uri, "local" if engine == "spark-ml" else "spark-ml")
