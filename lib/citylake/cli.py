"""The ``citylake`` command: every stage, locally or under spark-submit (via ``jobs/``).

    citylake generate                 # write a sample city into the lake's landing area
    citylake ingest --date 2026-01-05 # raw -> bronze (+ quarantine, ingest log)
    citylake validate --layer bronze  # Great Expectations on new bronze rows
    citylake clean                    # bronze -> silver for the dates new data touched
    citylake features                 # silver -> gold
    citylake run                      # all of the above, in order
    citylake train                    # AR per series + GBT per region, tracked in MLflow
    citylake backtest --horizon 24    # score every model on the last 20% of the data
    citylake forecast                 # serve each region's champion
    citylake score --date 2026-01-08  # forecasts of that day vs actuals -> forecast_accuracy
    citylake maintain                 # OPTIMIZE + Z-order, VACUUM, table audit
    citylake demo                     # generate (if empty) + run + train/backtest/forecast
    citylake status                   # tables, row counts, last batches

Exit codes: 0 ok, 1 unexpected error, 2 bad input or configuration, 3 a critical
validation failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("citylake")

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_VALIDATION = 0, 1, 2, 3


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before or after the sub-command (``citylake ingest --lake X``)."""
    # Sub-command copies default to SUPPRESS so they never overwrite a value given earlier.
    kw = {"default": argparse.SUPPRESS} if suppress else {}
    flag = {"default": argparse.SUPPRESS} if suppress else {"default": False}
    parser.add_argument("--env", help="config environment: conf/<env>.yaml (default: $CITYLAKE_ENV or local)", **kw)
    parser.add_argument("--conf-dir", help="config folder (default: $CITYLAKE_CONF_DIR or ./conf)", **kw)
    parser.add_argument("--lake", help="lake root, overriding config (path or URI)", **kw)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging", **flag)
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only", **flag)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors", **flag)


def _timestamp(text: str) -> dt.datetime:
    try:
        ts = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="citylake",
        description="Smart-city sensor lakehouse: raw readings -> Delta bronze/silver/gold.",
        epilog="Config: conf/base.yaml + conf/<env>.yaml; override any key with "
        "CITYLAKE__SECTION__KEY (e.g. CITYLAKE__LAKE__ROOT=/data/lake).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, suppress=True)

    gen = sub.add_parser("generate", help="write a sample city (readings + sensor registry) to raw/", parents=[common])
    gen.add_argument("--start-date", type=_date, help="first UTC day (default: config, else today - days)")
    gen.add_argument("--days", type=int, help="number of days (default: config generate.days)")
    gen.add_argument("--seed", type=int, help="random seed (default: config generate.seed)")
    gen.add_argument("--regions", type=int, help="number of regions")

    bj = sub.add_parser("import-beijing", help="convert the Beijing air-quality CSVs into raw/ landing files", parents=[common])
    bj.add_argument("--src", default=None, help="folder of PRSA_Data_*.csv (default: ../shared/data/beijing_air)")
    bj.add_argument("--start", type=_date, help="first local date (inclusive)")
    bj.add_argument("--end", type=_date, help="last local date (inclusive)")

    ing = sub.add_parser("ingest", help="raw -> bronze: every landed file not yet ingested", parents=[common])
    ing.add_argument("--date", type=_date, help="only new files of landing folder date=YYYY-MM-DD")

    val = sub.add_parser("validate", help="validate a layer with Great Expectations", parents=[common])
    val.add_argument("--layer", choices=["bronze", "silver", "gold"], required=True)
    val.add_argument("--date", type=_date, help="validate the rows of this UTC date (default: what is new)")

    for name, text in (("clean", "bronze -> silver for the dates new data touched"),
                       ("features", "silver -> gold features and region-hourly aggregates")):
        p = sub.add_parser(name, help=text, parents=[common])
        p.add_argument("--date", type=_date, help="recompute this UTC date (default: dates with new data)")

    tr = sub.add_parser("train", help="fit AR per series and GBT per region on gold features", parents=[common])
    tr.add_argument("--cutoff", type=_timestamp, help="train on data up to this UTC time (default: all)")

    bt = sub.add_parser("backtest", help="train up to a cutoff, forecast every origin after it, score, pick champions",
                        parents=[common])
    bt.add_argument("--cutoff", type=_timestamp,
                    help="UTC time training data ends (ISO-8601; default: the last "
                         "forecast.backtest_test_fraction of the data is the test period)")
    bt.add_argument("--horizon", type=int, help="steps ahead (default: config forecast.horizon)")
    bt.add_argument("--stride", type=int, help="forecast from every K-th grid step after the cutoff (default 1)")

    fo = sub.add_parser("forecast", help="serve forecasts from each region's champion", parents=[common])
    fo.add_argument("--horizon", type=int, help="steps ahead (default: config forecast.horizon)")
    fo.add_argument("--date", type=_date,
                    help="issue the forecast as at the end of this UTC day: origins are each series' "
                         "newest step on or before it (default: the newest data)")
    fo.add_argument("--model", choices=["ar", "gbt", "persistence", "seasonal_naive"],
                    help="use this model family instead of the champions")

    sc = sub.add_parser("score", help="score served forecasts against the actuals of a day -> forecast_accuracy",
                        parents=[common])
    sc.add_argument("--date", type=_date, help="UTC date of the forecast targets (default: newest date in gold)")

    sub.add_parser("maintain", help="OPTIMIZE + Z-order, VACUUM (7 days kept) and audit every table",
                   parents=[common])

    run = sub.add_parser("run", help="ingest, validate, clean, validate, features, validate", parents=[common])
    run.add_argument("--date", type=_date, help="restrict every stage to this date")

    demo = sub.add_parser("demo", help="generate a sample city if the landing area is empty, run every stage, "
                          "then train, backtest and forecast", parents=[common])
    demo.add_argument("--days", type=int, help="days of sample data (default: config)")

    sub.add_parser("status", help="tables, row counts and the last ingest batches", parents=[common])
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("py4j", "great_expectations", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _print_stage(name: str, report: Any) -> None:
    """One or a few human lines per stage report."""
    if report is None:
        _say(f"[{name}] nothing new")
        return
    if hasattr(report, "batches"):
        if not report.batches:
            _say(f"[{name}] nothing new to ingest ({report.sensors_current} sensors in registry)")
        for b in report.batches:
            _say(f"[{name}] batch {b.batch_id} ({b.path} path): {b.files} files ({b.rejected_files} rejected), "
                 f"raw {b.raw_rows} = accepted {b.accepted} + quarantined {b.quarantined} "
                 f"+ duplicates {b.duplicates}  [{b.seconds:.1f}s]")
            if b.quarantine_by_reason:
                _say("        quarantined by reason: " + ", ".join(f"{k} {v}" for k, v in b.quarantine_by_reason.items()))
            for path, reason in sorted(b.rejected.items()):
                _say(f"        rejected file: {path.rsplit('/', 1)[-1]} ({reason})")
        return
    if hasattr(report, "critical_failures"):
        state = "passed" if report.success else "FAILED"
        _say(f"[{name}] {report.table} ({report.scope}): {state}, {report.n_expectations} expectations, "
             f"{len(report.warnings)} warning(s)")
        for w in report.warnings:
            _say(f"        warning: {w}")
        if report.data_docs_path:
            _say(f"        Data Docs: {report.data_docs_path}")
        return
    summary = getattr(report, "summary", None)
    if callable(summary):
        _say(f"[{name}] {summary()}")
        return
    fields = dict(vars(report))
    dates = fields.pop("dates", None)
    text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items() if not isinstance(v, (list, dict)))
    span = f"dates {dates[0]}..{dates[-1]} ({len(dates)}): " if dates else "no dates to process: "
    _say(f"[{name}] {span}{text}")


def _status(lake) -> None:
    from pyspark.sql import functions as F

    _say(f"lake: {lake.root}")
    for name, spec in lake.catalogue.tables.items():
        if lake.exists(name):
            n = lake.spark.read.format("delta").load(lake.path(name)).count()
            _say(f"  {name:<24} {n:>10} rows  {lake.path(name)}")
        else:
            _say(f"  {name:<24} {'-':>10}       (not created yet)")
    if lake.exists("ingest_log"):
        last = lake.read("ingest_log").orderBy(F.col("batch_id").desc()).limit(5).collect()
        for r in last:
            _say(f"  batch {r['batch_id']}: raw {r['raw_rows']} = accepted {r['accepted']} + "
                 f"quarantined {r['quarantined']} + duplicates {r['duplicates']}; "
                 f"{r['rejected_files']} file(s) rejected")


def _lake_has_landing(lake) -> bool:
    return bool(lake.list_files(lake.raw_readings))


def _dispatch(args: argparse.Namespace, config) -> int:
    from citylake.catalogue import load_catalogue

    catalogue = load_catalogue()
    if args.command == "generate":
        return _generate(args, config, catalogue)
    if args.command == "import-beijing":
        from citylake.sources.beijing import import_beijing

        src = Path(args.src) if args.src else Path(config.project_root).parent / "shared" / "data" / "beijing_air"
        report = import_beijing(src, config.lake_root, start=args.start, end=args.end)
        _say(f"[import-beijing] {report}")
        return EXIT_OK

    from citylake.lake import Lake
    from citylake.session import build_spark
    from citylake import pipeline

    spark = build_spark(config)
    lake = Lake(spark, config, catalogue)
    date = getattr(args, "date", None)
    if args.command == "status":
        _status(lake)
    elif args.command == "ingest":
        _print_stage("ingest", pipeline.ingest_stage(lake, date))
    elif args.command == "validate":
        _print_stage(f"validate-{args.layer}", pipeline.validate_stage(lake, args.layer, date))
    elif args.command == "clean":
        _print_stage("clean", pipeline.clean_stage(lake, date))
    elif args.command == "features":
        _print_stage("features", pipeline.features_stage(lake, date))
    elif args.command in ("train", "backtest", "forecast"):
        from citylake.stages import forecasting

        if args.command == "train":
            result = forecasting.run_train(lake, cutoff=args.cutoff)
        elif args.command == "backtest":
            result = forecasting.run_backtest(lake, args.cutoff, horizon=args.horizon, stride=args.stride)
        else:
            result = forecasting.run_forecast(lake, horizon=args.horizon, model=args.model, date=args.date)
        _print_stage(args.command, result)
    elif args.command == "score":
        from citylake.stages.monitoring import run_score

        _print_stage("score", run_score(lake, date))
    elif args.command == "maintain":
        from citylake.stages.maintenance import run_maintain

        _print_stage("maintain", run_maintain(lake))
    elif args.command in ("run", "demo"):
        if args.command == "demo" and not _lake_has_landing(lake):
            if args.days:
                config.generate.days = args.days
            _generate(args, config, catalogue)
        pipeline.run_pipeline(lake, date=date, progress=_print_stage)
        if args.command == "demo":
            from citylake.stages import forecasting

            for name, job in (("train", forecasting.run_train), ("backtest", forecasting.run_backtest),
                              ("forecast", forecasting.run_forecast)):
                _print_stage(name, job(lake))
            _say(f"MLflow: {config.mlflow.tracking_uri} (open the UI: make mlflow-ui)")
        _say()
        _status(lake)
    return EXIT_OK


def _generate(args: argparse.Namespace, config, catalogue) -> int:
    from citylake.sources.generate import generate_city

    cfg = config.generate
    for key in ("days", "seed", "regions"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    report = generate_city(config.lake_root, cfg, catalogue, start_date=getattr(args, "start_date", None))
    _say(f"[generate] sample city in {config.lake_root}/raw: {report.files} files, {report.raw_rows} readings, "
         f"{report.sensors} sensors, {len(report.dates)} days from {report.dates[0]}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``citylake`` command and of every ``jobs/*.py``."""
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    from citylake.config import ConfigError, load_config

    started = time.monotonic()
    try:
        overrides = {"lake": {"root": args.lake}} if args.lake else None
        config = load_config(env=args.env, conf_dir=args.conf_dir, overrides=overrides)
        code = _dispatch(args, config)
    except ConfigError as exc:
        log.error("configuration: %s", exc)
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - turn known failures into messages, not traces
        return _report_failure(exc, args.debug)
    log.info("%s finished in %.1fs", args.command, time.monotonic() - started)
    return code


def _report_failure(exc: Exception, debug: bool) -> int:
    from citylake.config import ConfigError
    from citylake.errors import CitylakeError

    try:
        from citylake.stages.validate import ValidationFailed
    except ImportError:  # pragma: no cover - validation extras missing
        ValidationFailed = ()  # type: ignore[assignment]
    if isinstance(exc, ValidationFailed):
        log.error("%s", exc)
        return EXIT_VALIDATION
    if isinstance(exc, (CitylakeError, ConfigError, FileNotFoundError)):
        log.error("%s", exc)
        if debug:
            log.exception("traceback")
        return EXIT_INPUT
    try:
        message = str(exc).splitlines()[0] if str(exc) else ""
    except Exception:  # noqa: BLE001 - a Py4J error whose JVM is gone cannot even print itself
        message = "(no message: the Spark JVM is gone, probably out of memory)"
    log.error("unexpected error: %s: %s", type(exc).__name__, message)
    if debug:
        log.exception("traceback")
    else:
        log.error("run again with --debug for the traceback")
    return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
