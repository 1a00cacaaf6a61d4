"""Forecast accuracy on the real Beijing air-quality data (PM2.5, 12 stations).

    make beijing-accuracy          # = .venv/bin/python bench/beijing_accuracy.py

Runs citylake itself, stage by stage, on a lake of its own (``lake-beijing/`` under the
project, git-ignored; re-runs reuse what is there): import the CSVs of
``../shared/data/beijing_air`` -> ingest -> clean -> features -> backtest of PM2.5 with
the last 20% of the time as the test period, horizons 1-24 h, every model and baseline.
Then prints RMSE by step for AR, GBT, persistence and the seasonal naive over all
stations, each model's RMSE relative to persistence, and writes the table to
``bench/RESULTS_BEIJING.md``.

Settings (environment overrides as for any citylake command): ``forecast.metrics =
[pm25]`` (the other pollutants and the weather still feed the GBT as ``x_*``
features), ``backtest_stride`` 3 (an origin every third hour of the test period; every
hour of the day still appears); the GBT uses every training origin and the default
tree settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from pyspark.sql import functions as F  # noqa: E402

from citylake.cli import main as citylake  # noqa: E402

OVERRIDES = {
    "CITYLAKE__FORECAST__METRICS": "[pm25]",
    "CITYLAKE__FORECAST__BACKTEST_STRIDE": "3",
    "CITYLAKE__FORECAST__HORIZON": "24",
    "CITYLAKE__MLFLOW__EXPERIMENT": "citylake-beijing",
    # 35,000 hourly origins x 12 stations x 24 steps of GBT training rows: more than the
    # 3g of conf/local.yaml holds (Java heap space on the first try).
    "CITYLAKE__SPARK__DRIVER_MEMORY": "8g",
}
MODELS = ["ar", "gbt", "persistence", "seasonal_naive"]


def table(lake) -> tuple[str, dict]:
    """Markdown table of RMSE by step (region ALL) and the checks of the accuracy target."""
    rows = (lake.read("backtest_metrics").where((F.col("region") == "ALL") & (F.col("metric") == "pm25"))
            .select("model", "step", "rmse", "coverage", "n").collect())
    rmse = {(r["model"], r["step"]): r["rmse"] for r in rows}
    coverage = {(r["model"], r["step"]): r["coverage"] for r in rows}
    steps = sorted({r["step"] for r in rows})
    lines = ["| step (h) | " + " | ".join(MODELS) + " | AR vs persistence | GBT vs persistence |",
             "|---|" + "---|" * (len(MODELS) + 2)]
    for h in steps:
        p = rmse[("persistence", h)]
        cells = [f"{rmse.get((m, h), float('nan')):.2f}" for m in MODELS]
        rel = [f"{100 * (rmse[(m, h)] / p - 1):+.1f}%" for m in ("ar", "gbt")]
        lines.append(f"| {h} | " + " | ".join(cells) + " | " + " | ".join(rel) + " |")
    from3 = [h for h in steps if h >= 3]
    checks = {
        "AR beats persistence and seasonal naive at every step >= 3":
            all(rmse[("ar", h)] < min(rmse[("persistence", h)], rmse[("seasonal_naive", h)]) for h in from3),
        "GBT beats persistence and seasonal naive at every step >= 3":
            all(rmse[("gbt", h)] < min(rmse[("persistence", h)], rmse[("seasonal_naive", h)]) for h in from3),
        "best model at 24 h at least 20% below persistence":
            min(rmse[("ar", 24)], rmse[("gbt", 24)]) <= 0.8 * rmse[("persistence", 24)],
    }
    cover = {m: sum(coverage[(m, h)] or 0 for h in steps) / len(steps) for m in MODELS}
    return "\n".join(lines), {"checks": checks, "coverage": cover,
                              "n": sum(r["n"] for r in rows if r["model"] == "ar")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lake", default=str(ROOT / "lake-beijing"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS_BEIJING.md"))
    args = parser.parse_args()
    import os

    os.environ.update({k: v for k, v in OVERRIDES.items() if k not in os.environ})
    common = ["--lake", args.lake]
    started = time.monotonic()
    timings = {}
    for step in (["import-beijing"], ["ingest"], ["clean"], ["features"], ["backtest", "--horizon", "24"]):
        t = time.monotonic()
        code = citylake([*common, *step])
        timings[step[0]] = time.monotonic() - t
        if code != 0:
            print(f"citylake {' '.join(step)} failed (exit {code})", file=sys.stderr)
            return code

    from citylake.config import load_config
    from citylake.lake import Lake
    from citylake.session import build_spark

    config = load_config(conf_dir=ROOT / "conf", overrides={"lake": {"root": args.lake}})
    lake = Lake(build_spark(config), config)
    text, summary = table(lake)
    cutoff = lake.read("backtest_metrics").select("cutoff_ts").first()[0]
    report = [
        "# Forecast accuracy on the Beijing air-quality data (PM2.5)",
        "",
        "Command: `make beijing-accuracy` (= `.venv/bin/python bench/beijing_accuracy.py`).",
        f"12 stations, hourly, 2013-03-01 .. 2017-02-28 (local time); test period: the last 20% "
        f"(origins after {cutoff} UTC, every 3rd hour), horizons 1-24 h; "
        f"{summary['n']:,} AR forecasts scored. RMSE in ug/m3 over all stations (region ALL).",
        "",
        text,
        "",
        "Target checks:",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in summary["checks"].items()],
        "",
        "Mean empirical coverage of the 90% intervals over the steps: "
        + ", ".join(f"{m} {v:.3f}" for m, v in summary["coverage"].items()) + ".",
        "",
        "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; total {time.monotonic() - started:.0f} s on local[2].",
        "",
    ]
    Path(args.out).write_text("\n".join(report))
    print("\n".join(report))
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
