"""The GBT's linear stage (ridge forecast fed to the trees): fit, missing values, serialisation."""

import numpy as np
import pandas as pd
import pytest

from citylake.forecast.linear_stage import LinearStage, fit_linear_stage, linear_forecast, linear_inputs


def _frame(n=400, seed=0):
    rng = np.random.default_rng(seed)
    pdf = pd.DataFrame({"value": rng.normal(50, 10, n), "lag_1": rng.normal(0, 2, n),
                        "target_hour_sin": rng.uniform(-1, 1, n), "step": 24.0, "flat": 7.0})
    y = 4.0 - 0.5 * pdf["value"] + 3.0 * pdf["lag_1"]
    return pdf, y.to_numpy()


def test_inputs_leave_out_the_target_calendar_and_the_step():
    assert linear_inputs(["value", "lag_1", "target_hour_sin", "target_doy_cos", "step", "x_dew_point"]) == [
        "value", "lag_1", "x_dew_point"]


def test_an_exact_linear_target_is_recovered():
    pdf, y = _frame()
    stage = fit_linear_stage(pdf, list(pdf.columns), y, l2=0.0)
    assert stage.features == ("value", "lag_1", "flat")
    np.testing.assert_allclose(linear_forecast(stage, pdf), y, atol=1e-8)
    # Back on the original scale: coef / scale is the slope per unit of the feature.
    slopes = np.asarray(stage.coef) / np.asarray(stage.scale)
    np.testing.assert_allclose(slopes[:2], [-0.5, 3.0], atol=1e-8)
    assert stage.coef[2] == 0.0  # a column without spread gets no weight


def test_the_ridge_matches_ordinary_least_squares_on_the_mean_filled_design():
    pdf, y = _frame(seed=1)
    y = y + np.random.default_rng(2).normal(0, 1, len(y))
    pdf.loc[::7, "lag_1"] = np.nan
    stage = fit_linear_stage(pdf, ["value", "lag_1"], y, l2=0.0)
    X = pdf[["value", "lag_1"]].fillna(pdf[["value", "lag_1"]].mean()).to_numpy()
    design = np.column_stack([np.ones(len(X)), X])
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(linear_forecast(stage, pdf), design @ beta, atol=1e-8)


def test_a_missing_input_counts_as_its_training_mean():
    pdf, y = _frame()
    stage = fit_linear_stage(pdf, ["value", "lag_1"], y)
    row = pd.DataFrame({"value": [np.nan], "lag_1": [stage.mean[1]]})
    at_means = stage.intercept
    assert linear_forecast(stage, row)[0] == pytest.approx(at_means)


def test_the_penalty_shrinks_and_exact_collinearity_stays_solvable():
    pdf, y = _frame()
    pdf["change_1"] = pdf["value"] - pdf["lag_1"]  # exactly collinear, as gold's changes are
    stage = fit_linear_stage(pdf, ["value", "lag_1", "change_1"], y)
    assert np.all(np.isfinite(stage.coef))
    np.testing.assert_allclose(linear_forecast(stage, pdf), y, atol=0.05)
    heavy = fit_linear_stage(pdf, ["value", "lag_1", "change_1"], y, l2=10.0)
    assert np.abs(heavy.coef).sum() < np.abs(stage.coef).sum()


def test_json_round_trip():
    pdf, y = _frame()
    stage = fit_linear_stage(pdf, ["value", "lag_1", "flat"], y)
    again = LinearStage.from_json(stage.to_json())
    assert again == stage
    np.testing.assert_array_equal(linear_forecast(again, pdf), linear_forecast(stage, pdf))
