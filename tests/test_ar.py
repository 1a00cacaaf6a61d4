"""AR models: numpy core against statsmodels, and the Spark side against the numpy core."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.tsa.ar_model import AutoReg, ar_select_order
from statsmodels.tsa.arima_process import ArmaProcess
from statsmodels.tsa.tsatools import lagmat

from citylake.forecast import ar

TOL = 1e-6


def simulate(coefs: list[float], n: int, intercept: float = 1.0, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """One AR path of length n after a burn-in."""
    rng = np.random.default_rng(seed)
    p, burn = len(coefs), 300
    y = np.zeros(n + burn)
    e = rng.normal(scale=scale, size=n + burn)
    for t in range(p, n + burn):
        y[t] = intercept + np.dot(coefs, y[t - p : t][::-1]) + e[t]
    return y[burn:]


def autoreg(y: np.ndarray, p: int):
    return AutoReg(y, lags=p, trend="c").fit()


# -- fit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 1, 3, 12])
def test_fit_matches_autoreg(p):
    # A large level with small variation (like air pressure) tests the centring.
    y = simulate([0.5, -0.2, 0.1], 400, intercept=300.0, seed=p) + 700.0
    fit = ar.fit_many(y[None, :], p)
    ref = autoreg(y, p)
    np.testing.assert_allclose(np.r_[fit.intercept, fit.coefs[0]], ref.params, rtol=0, atol=TOL)
    assert fit.nobs[0] == ref.nobs == len(y) - p
    # statsmodels' sigma2 is SSR / nobs; ours is SSR / (nobs - p - 1).
    np.testing.assert_allclose(fit.sigma2_mle[0], ref.sigma2, rtol=1e-9)
    np.testing.assert_allclose(fit.sigma[0] ** 2, ref.sigma2 * ref.nobs / (ref.nobs - p - 1), rtol=1e-9)
    # AutoRegResults counts sigma2 as a parameter: +2 (aic), +ln(nobs) (bic).
    np.testing.assert_allclose(fit.aic[0] + 2, ref.aic, rtol=1e-10)
    np.testing.assert_allclose(fit.bic[0] + np.log(ref.nobs), ref.bic, rtol=1e-10)
    assert fit.ok[0] and fit.first_target[0] == p and fit.last_target[0] == len(y) - 1


def test_many_series_of_different_lengths_left_padded():
    lengths = [120, 250, 400]
    series = [simulate([0.6, -0.3], n, seed=i) for i, n in enumerate(lengths)]
    values = np.full((3, 400), np.nan)
    for i, y in enumerate(series):
        values[i, 400 - len(y) :] = y
    fit = ar.fit_many(values, 2, chunk_bytes=1)  # one series per chunk: chunking is exercised
    for i, y in enumerate(series):
        ref = autoreg(y, 2)
        np.testing.assert_allclose(np.r_[fit.intercept[i], fit.coefs[i]], ref.params, atol=TOL)
        assert fit.nobs[i] == ref.nobs


def lag_design(y: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """statsmodels' own lag matrix with a constant, rows with any NaN dropped."""
    x, target = lagmat(y, p, trim="both", original="sep")
    x = sm.add_constant(x, has_constant="add")
    keep = np.isfinite(x).all(axis=1) & np.isfinite(target[:, 0])
    return x[keep], target[keep, 0]


def test_gap_drops_exactly_the_rows_touching_it():
    p = 3
    y = simulate([0.5, 0.2, -0.1], 300, seed=4)
    gapped = y.copy()
    gapped[100:105] = np.nan  # 5 missing steps
    fit = ar.fit_many(gapped[None, :], p)
    x, target = lag_design(gapped, p)
    ref = sm.OLS(target, x).fit()
    np.testing.assert_allclose(np.r_[fit.intercept, fit.coefs[0]], ref.params, atol=TOL)
    # Targets 100 .. 107 are unusable (5 missing + the p = 3 after them): 5 + p rows.
    assert fit.nobs[0] == (len(y) - p) - (5 + p) == len(target)
    np.testing.assert_allclose(fit.sigma[0] ** 2, ref.scale, rtol=1e-9)  # OLS scale = SSR/(n-k)


def test_single_missing_step_removes_p_plus_one_rows():
    p = 4
    y = simulate([0.4, 0.1], 200, seed=5)
    y[50] = np.nan
    assert ar.fit_many(y[None, :], p).nobs[0] == (200 - p) - (p + 1)


def test_filled_points_are_observations():
    """A linearly filled run is used like measured values: same fit as AutoReg on the
    filled series; set them to NaN to exclude them (then it is a gap)."""
    p = 2
    y = simulate([0.6, -0.2], 300, seed=6)
    filled = y.copy()
    filled[80:83] = np.linspace(y[79], y[83], 5)[1:-1]
    fit = ar.fit_many(filled[None, :], p)
    np.testing.assert_allclose(np.r_[fit.intercept, fit.coefs[0]], autoreg(filled, p).params, atol=TOL)
    excluded = filled.copy()
    excluded[80:83] = np.nan
    x, target = lag_design(excluded, p)
    fit_excl = ar.fit_many(excluded[None, :], p)
    np.testing.assert_allclose(
        np.r_[fit_excl.intercept, fit_excl.coefs[0]], sm.OLS(target, x).fit().params, atol=TOL
    )


# -- order selection ---------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["aic", "bic"])
def test_select_order_matches_ar_select_order(criterion):
    series = [
        simulate([0.5, -0.3], 500, seed=10),
        simulate([0.3, 0.1, 0.0, 0.0, 0.25], 500, seed=11),
        simulate([0.7], 300, seed=12),
    ]
    max_lag = 8
    values = np.full((3, 500), np.nan)
    for i, y in enumerate(series):
        values[i, 500 - len(y) :] = y
    orders, fit = ar.select_order(values, list(range(max_lag + 1)), criterion)
    aic, bic = ar.information_criteria(values, range(max_lag + 1))
    table = aic if criterion == "aic" else bic
    for i, y in enumerate(series):
        ref = ar_select_order(y, max_lag, ic=criterion, trend="c")
        ref_order = len(ref.ar_lags) if ref.ar_lags is not None else 0
        assert orders[i] == ref_order
        ref_ics = getattr(ref, criterion)  # {lags tuple (or 0): value}
        for p in range(max_lag + 1):
            key = tuple(range(1, p + 1)) if p else 0
            np.testing.assert_allclose(table[i, p], ref_ics[key], rtol=1e-9)
        # The chosen order is refitted on its own sample, like ar_select_order's model.
        ref_fit = ref.model.fit()
        np.testing.assert_allclose(np.r_[fit.intercept[i], fit.coefs[i, : orders[i]]], ref_fit.params, atol=TOL)
        assert np.all(fit.coefs[i, orders[i] :] == 0)
    assert fit.coefs.shape == (3, max_lag)


def test_select_order_subset_of_candidates():
    y = simulate([0.5, -0.3], 400, seed=13)
    orders, fit = ar.select_order(y[None, :], [1, 4, 6], "bic")
    aic, bic = ar.information_criteria(y[None, :], [1, 4, 6])
    assert orders[0] == [1, 4, 6][int(np.argmin(bic[0]))]
    assert fit.order[0] == orders[0]


# -- forecasting ---------------------------------------------------------------------------


def test_forecast_ar1_by_hand():
    fit = ar.ARFit.from_params(np.array([2.0]), np.array([[0.5]]), np.array([1.0]))
    mean, se = ar.forecast(fit, np.array([[0.0, 10.0]]), 3)
    # 2 + 0.5 * 10 = 7; 2 + 0.5 * 7 = 5.5; 2 + 0.5 * 5.5 = 4.75
    np.testing.assert_allclose(mean, [[7.0, 5.5, 4.75]])
    np.testing.assert_allclose(se, [[1.0, np.sqrt(1.25), np.sqrt(1.3125)]])


def test_forecast_ar2_by_hand():
    fit = ar.ARFit.from_params(np.array([1.0]), np.array([[0.5, 0.25]]), np.array([2.0]))
    mean, se = ar.forecast(fit, np.array([[4.0, 8.0]]), 3)  # y_(T-1) = 4, y_T = 8
    # 1 + .5*8 + .25*4 = 6; 1 + .5*6 + .25*8 = 6; 1 + .5*6 + .25*6 = 5.5
    np.testing.assert_allclose(mean, [[6.0, 6.0, 5.5]])
    # psi = 1, .5, .5*.5 + .25 = .5 -> var = 4 * (1, 1.25, 1.5)
    np.testing.assert_allclose(se**2, [[4.0, 5.0, 6.0]])


def test_psi_weights_match_statsmodels():
    coefs = np.array([[0.5, -0.3, 0.1], [0.9, 0.0, 0.0], [0.2, 0.2, 0.2]])
    psi = ar.psi_weights(coefs, 15)
    for row, b in zip(psi, coefs):
        np.testing.assert_allclose(row, ArmaProcess(np.r_[1, -b]).arma2ma(15), atol=1e-12)
    np.testing.assert_allclose(ar.psi_weights(coefs[0], 15), psi[0])


def test_h_step_variance_is_psi_weighted_not_sqrt_h():
    phi, sigma, h = 0.8, 1.5, 10
    fit = ar.ARFit.from_params(np.array([0.0]), np.array([[phi]]), np.array([sigma]))
    _, se = ar.forecast(fit, np.array([[1.0]]), h)
    k = np.arange(1, h + 1)
    np.testing.assert_allclose(se[0] ** 2, sigma**2 * (1 - phi ** (2 * k)) / (1 - phi**2))
    assert not np.allclose(se[0], sigma * np.sqrt(k))


def test_forecast_matches_autoreg_prediction():
    p, h = 3, 12
    y = simulate([0.5, -0.2, 0.1], 400, seed=20)
    fit = ar.fit_many(y[None, :], p)
    mean, se = ar.forecast(fit, y[None, :], h)
    pred = autoreg(y, p).get_prediction(start=len(y), end=len(y) + h - 1)
    np.testing.assert_allclose(mean[0], pred.predicted_mean, atol=1e-8)
    # Same psi recursion; only the sigma2 convention differs.
    ratio = np.sqrt(fit.nobs[0] / (fit.nobs[0] - p - 1))
    np.testing.assert_allclose(se[0], np.sqrt(pred.var_pred_mean) * ratio, rtol=1e-8)


def test_interval_uses_the_normal_quantile():
    lower, upper = ar.interval(np.array([10.0]), np.array([2.0]), level=0.9)
    np.testing.assert_allclose([lower[0], upper[0]], [10 - 2 * 1.6448536269514722, 10 + 2 * 1.6448536269514722])
    with pytest.raises(ValueError):
        ar.interval(np.array([0.0]), np.array([1.0]), level=1.0)


# -- degenerate input ------------------------------------------------------------------------


def test_short_constant_and_missing_series_do_not_crash():
    good = simulate([0.5], 60, seed=30)
    values = np.vstack(
        [
            good,
            np.full(60, np.nan),  # nothing usable
            np.r_[np.full(56, np.nan), good[:4]],  # 4 points: nobs = 2 <= p + 1
            np.full(60, 7.0),  # constant: singular design
            np.r_[good[:30], np.full(30, np.inf)],  # inf counts as missing
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        fit = ar.fit_many(values, 2)
        orders, sel = ar.select_order(values, [1, 2, 3], "aic")
        mean, se = ar.forecast(fit, values, 4)
    assert fit.ok.tolist() == [True, False, False, False, True]
    assert np.isnan(fit.coefs[1:4]).all() and np.isnan(fit.intercept[1:4]).all()
    assert fit.nobs[1] == 0 and fit.first_target[1] == -1
    assert np.isnan(mean[1:4]).all() and np.isfinite(mean[0]).all()
    assert sel.ok[0] and not sel.ok[1] and len(orders) == 5
    np.testing.assert_allclose(fit.coefs[4], autoreg(good[:30], 2).params[1:], atol=TOL)
    # Fewer steps than the order, and no series at all.
    assert not ar.fit_many(values[:, :2], 3).ok.any()
    assert len(ar.fit_many(np.zeros((0, 50)), 2)) == 0
    assert ar.select_order(np.zeros((0, 50)), [1, 2])[0].shape == (0,)


# -- Spark ------------------------------------------------------------------------------------

N_SERIES, N_POINTS, P = 6, 300, 2
START = pd.Timestamp("2026-01-05", tz="UTC")
STEP = pd.Timedelta(minutes=5)  # traffic_flow's grid


def simulated_panel(seed: int = 42) -> np.ndarray:
    """(6, 300) AR(2) paths; row 2 has a 4-step gap, row 4 a silent stretch (rows absent)."""
    return np.vstack([simulate([0.6, -0.25], N_POINTS, intercept=5.0, seed=seed + i) for i in range(N_SERIES)])


def silver_frame(values: np.ndarray) -> pd.DataFrame:
    """Silver-like rows: gaps as null value_clean (is_gap), a filled run, absent rows."""
    frames = []
    for i, y in enumerate(values):
        frame = pd.DataFrame(
            {
                "sensor_id": f"s{i}",
                "metric": "traffic_flow",
                "region": "north" if i < 3 else "south",
                "ts": START + STEP * np.arange(len(y)),
                "value_clean": y,
                "is_filled": False,
                "is_gap": False,
            }
        )
        if i == 2:
            frame.loc[100:103, ["value_clean", "is_gap"]] = [np.nan, True]
        if i == 3:
            frame.loc[150:152, "is_filled"] = True
        if i == 4:
            frame = frame.drop(index=range(200, 230))  # grid rows absent, like a silent day
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def reference_matrix(values: np.ndarray) -> np.ndarray:
    matrix = values.copy()
    matrix[2, 100:104] = np.nan
    matrix[4, 200:230] = np.nan
    return matrix


@pytest.fixture(scope="module")
def panel(spark):
    values = simulated_panel()
    frame = silver_frame(values)
    df = spark.createDataFrame(frame).cache()
    return values, frame, df


@pytest.fixture(scope="module")
def fitted(panel):
    from citylake.forecast import ar_spark

    _, _, df = panel
    return ar_spark.fit_ar(df, p=P, n_buckets=4).orderBy("sensor_id").toPandas()


def test_spark_fit_equals_numpy(panel, fitted):
    from citylake.forecast import ar_spark

    values, _, _ = panel
    ref = ar.fit_many(reference_matrix(values), P)
    assert list(fitted.columns) == list(ar_spark.GOLD_AR_COEFFICIENTS.column_names)
    assert fitted["sensor_id"].tolist() == [f"s{i}" for i in range(N_SERIES)]
    np.testing.assert_allclose(np.stack(fitted["coefs"].to_numpy()), ref.coefs, atol=1e-9)
    np.testing.assert_allclose(fitted["intercept"], ref.intercept, atol=1e-9)
    np.testing.assert_allclose(fitted["sigma"], ref.sigma, rtol=1e-9)
    assert fitted["n_train"].tolist() == ref.nobs.tolist()
    assert fitted["n_train"][2] == (N_POINTS - P) - (4 + P)
    assert fitted["fit_ok"].all() and (fitted["p"] == P).all() and (fitted["criterion"] == "fixed").all()
    assert (fitted["region"] == ["north"] * 3 + ["south"] * 3).all()
    assert (fitted["interval_s"] == 300).all()
    first_ts = (START + STEP * P).tz_convert(None)
    last_ts = (START + STEP * (N_POINTS - 1)).tz_convert(None)
    assert (fitted["train_start"] == first_ts).all() and (fitted["train_end"] == last_ts).all()


def test_spark_fit_matches_statsmodels_on_a_clean_series(panel, fitted):
    values, _, _ = panel
    ref = autoreg(values[0], P)
    np.testing.assert_allclose(np.r_[fitted["intercept"][0], fitted["coefs"][0]], ref.params, atol=TOL)


def test_spark_schema_matches_table_spec(spark, panel):
    from citylake.forecast import ar_spark

    _, _, df = panel
    schema = ar_spark.fit_ar(df, p=P).schema
    expected = ar_spark.GOLD_AR_COEFFICIENTS.struct()
    assert [(f.name, f.dataType) for f in schema.fields] == [(f.name, f.dataType) for f in expected.fields]
    assert "gold_ar_coefficients:" in ar_spark.TABLES_YAML_ENTRY


def test_spark_order_selection_and_unfilled(panel):
    from citylake.forecast import ar_spark

    values, _, df = panel
    matrix = reference_matrix(values)
    out = ar_spark.fit_ar(df, candidates=[1, 2, 3, 4], criterion="bic", n_buckets=3).orderBy("sensor_id").toPandas()
    orders, ref = ar.select_order(matrix, [1, 2, 3, 4], "bic")
    assert out["p"].tolist() == orders.tolist() and (out["criterion"] == "bic").all()
    for i, coefs in enumerate(out["coefs"]):
        np.testing.assert_allclose(coefs, ref.coefs[i, : orders[i]], atol=1e-9)
    # use_filled=False: filled points become gaps.
    unfilled = ar_spark.fit_ar(df, p=P, use_filled=False).where("sensor_id = 's3'").toPandas()
    masked = matrix[3:4].copy()
    masked[0, 150:153] = np.nan
    np.testing.assert_allclose(unfilled["coefs"][0], ar.fit_many(masked, P).coefs[0], atol=1e-9)
    # max_steps: only each series' newest 100 steps train the model.
    recent = ar_spark.fit_ar(df, p=P, max_steps=100).where("sensor_id = 's0'").toPandas()
    np.testing.assert_allclose(recent["coefs"][0], ar.fit_many(matrix[:1, -100:], P).coefs[0], atol=1e-9)
    assert recent["n_train"][0] == 100 - P
    with pytest.raises(ValueError):
        ar_spark.fit_ar(df, p=-1)


def test_coefficients_long(spark, panel):
    from citylake.forecast import ar_spark

    _, _, df = panel
    long = ar_spark.coefficients_long(ar_spark.fit_ar(df, p=P)).toPandas()
    assert list(long.columns) == ["sensor_id", "metric", "region", "lag", "coef"]
    assert len(long) == N_SERIES * P and sorted(long["lag"].unique()) == [1, 2]


def test_forecast_spark_from_newest_step(spark, panel, fitted):
    from citylake.forecast import ar_spark

    values, _, df = panel
    schema = ar_spark.GOLD_AR_COEFFICIENTS.struct()
    models = fitted.assign(coefs=fitted["coefs"].apply(list))[schema.names]
    out = ar_spark.forecast_spark(spark.createDataFrame(models, schema), df, 5).toPandas()
    assert list(out.columns) == list(ar_spark.FORECAST_COLUMNS)
    assert len(out) == N_SERIES * 5 and sorted(out["step"].unique()) == [1, 2, 3, 4, 5]
    assert (out["origin_ts"] == (START + STEP * (N_POINTS - 1)).tz_convert(None)).all()
    assert ((out["target_ts"] - out["origin_ts"]) == out["step"] * STEP).all()
    assert (out["y_lower"] < out["y_pred"]).all() and (out["y_pred"] < out["y_upper"]).all()
    fit = ar.fit_many(reference_matrix(values), P)
    mean, se = ar.forecast(fit, reference_matrix(values), 5)
    mine = out.sort_values(["sensor_id", "step"])
    np.testing.assert_allclose(mine["y_pred"].to_numpy().reshape(N_SERIES, 5), mean, atol=1e-9)
    lower, _ = ar.interval(mean, se, 0.9)
    np.testing.assert_allclose(mine["y_lower"].to_numpy().reshape(N_SERIES, 5), lower, atol=1e-9)


def test_forecast_spark_coverage_over_many_origins(spark, panel):
    """Fit on the first 150 steps, forecast 8 steps ahead from 20 origins per series and
    count how often the 90% interval holds the truth."""
    from pyspark.sql import functions as F

    from citylake.forecast import ar_spark

    values, frame, _ = panel
    clean = frame[frame["sensor_id"].isin(["s0", "s1", "s3", "s5"])]
    history = spark.createDataFrame(clean)
    coeffs = ar_spark.fit_ar(history.where(F.col("ts") < F.lit(START + STEP * 150)), p=P)
    horizon, steps = 8, list(range(150, 290, 7))
    origins = pd.DataFrame(
        [(s, "traffic_flow", START + STEP * o) for s in ["s0", "s1", "s3", "s5"] for o in steps],
        columns=["sensor_id", "metric", "origin_ts"],
    )
    out = ar_spark.forecast_spark(coeffs, history, horizon, level=0.9, origins=spark.createDataFrame(origins))
    out = out.toPandas()
    assert len(out) == 4 * len(steps) * horizon and out["y_pred"].notna().all()
    origin_step = ((out["origin_ts"] - START.tz_convert(None)) / STEP).astype(int)
    assert set(origin_step) == set(steps)
    series = out["sensor_id"].str[1:].astype(int).to_numpy()
    actual = values[series, (origin_step + out["step"]).to_numpy()]
    covered = (out["y_lower"] <= actual) & (actual <= out["y_upper"])
    assert 0.8 <= covered.mean() <= 0.97, covered.mean()
    # One origin against the numpy forecast from the same coefficients.
    row = coeffs.where("sensor_id = 's0'").first()
    fit = ar.ARFit.from_params(np.array([row["intercept"]]), np.array([row["coefs"]]), np.array([row["sigma"]]))
    mean, _ = ar.forecast(fit, values[:1, : steps[0] + 1], horizon)
    mine = out[(out["sensor_id"] == "s0") & (origin_step == steps[0])].sort_values("step")["y_pred"]
    np.testing.assert_allclose(mine.to_numpy(), mean[0], atol=1e-9)


def test_spark_fit_reads_gold_features_value_column(panel, fitted):
    """gold_features carries the silver value as ``value`` (no is_gap column)."""
    from citylake.forecast import ar_spark

    _, _, df = panel
    gold = df.where("sensor_id = 's0'").drop("is_gap").withColumnRenamed("value_clean", "value")
    out = ar_spark.fit_ar(gold, p=P).toPandas()
    np.testing.assert_allclose(out["coefs"][0], fitted["coefs"][0], atol=1e-12)


def test_spark_fit_assembles_shuffled_split_series_with_duplicates(spark, panel, fitted):
    """Rows in random order over many partitions (so block rows are merged from several
    tasks), a duplicated step (the larger value wins), and a series that moved region
    inside its newest block (its block rows merge, the newest step's region is reported)."""
    from citylake.forecast import ar_spark

    values, frame, _ = panel
    one = frame[frame["sensor_id"] == "s1"].copy()
    one.loc[one.index[-5:], "region"] = "east"  # moved region for its last 5 steps
    duplicate = one.iloc[[40]].copy()
    duplicate["value_clean"] = duplicate["value_clean"] - 1000.0  # smaller: must lose
    rows = pd.concat([one, duplicate]).sample(frac=1.0, random_state=3)
    df = spark.createDataFrame(rows).repartition(7)
    out = ar_spark.fit_ar(df, p=P).toPandas()
    assert len(out) == 1 and out["region"][0] == "east"
    np.testing.assert_allclose(out["coefs"][0], fitted["coefs"][1], atol=1e-9)
    assert out["n_train"][0] == fitted["n_train"][1]

    bigger = duplicate.copy()
    bigger["value_clean"] = bigger["value_clean"] + 2000.0  # larger: must win
    df = spark.createDataFrame(pd.concat([one, bigger]).sample(frac=1.0, random_state=4)).repartition(5)
    changed = ar_spark.fit_ar(df, p=P).toPandas()
    edited = values[1].copy()
    edited[40] += 1000.0
    ref = ar.fit_many(edited[None, :], P)
    np.testing.assert_allclose(changed["coefs"][0], ref.coefs[0], atol=1e-9)


def test_merge_split_blocks_keeps_larger_value_and_newest_row_labels():
    """Block rows of one (series, block) from two regions merge into one row: a cell in
    both keeps the larger value, and the labels come from the row with the newest value;
    other rows pass through unchanged."""
    from citylake.forecast import ar_spark

    nan = np.nan
    cells = np.array(
        [
            [1.0, 2.0, nan, nan],  # series 0, block 5, region "north": steps 0-1
            [9.0, 1.0, nan, nan],  # series 1, block 5 (other series, not merged)
            [0.5, nan, 3.0, 4.0],  # series 0, block 5, region "east": steps 0, 2-3 (newest)
            [7.0, nan, nan, nan],  # series 0, block 4
        ]
    )
    row_series = np.array([0, 1, 0, 0])
    block = np.array([5, 5, 5, 4])
    merged, series, blocks, labels = ar_spark._merge_split_blocks(cells, row_series, block)
    assert list(zip(series, blocks)) == [(0, 4), (0, 5), (1, 5)]
    np.testing.assert_array_equal(merged[1], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(merged[0], cells[3])
    np.testing.assert_array_equal(merged[2], cells[1])
    assert list(labels) == [3, 2, 1]  # the "east" row (index 2) labels the merged block

    same, *_, own = ar_spark._merge_split_blocks(cells[:2], row_series[:2], block[:2])
    np.testing.assert_array_equal(same, cells[:2])
    assert list(own) == [0, 1]


def test_block_aggregate_is_planned_as_hash_aggregate(spark, panel):
    """The block packing must stay a hash aggregate: a non-fixed-width buffer (e.g. a
    string from ``max_by(region, ...)``) silently turns it into a sort of every row,
    which measured 1.7x slower for the whole fit (bench/RESULTS_AR.md, session 10)."""
    from citylake.forecast import ar_spark

    _, _, df = panel
    plan = ar_spark._blocks(ar_spark.prepare_series(df))._jdf.queryExecution().executedPlan().toString()
    assert "HashAggregate" in plan
    assert "SortAggregate" not in plan and "ObjectHashAggregate" not in plan
