"""Validate a table's rows with Great Expectations and keep the results in the lake.

The suite comes from :func:`citylake.quality.expectations.build_suite`. This module is the
edge around it: it opens the GX file project under the lake (``<lake>/<validation.gx_dir>``,
holding the suites, the validation results store and the Data Docs HTML), runs the suite
on a Spark DataFrame, appends one row per expectation to the ``validation_results`` Delta
table and returns a :class:`ValidationReport`. A failed *critical* expectation raises
:class:`ValidationFailed` (when configured to), after the results are saved.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import great_expectations as gx
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.data_context import AbstractDataContext
from great_expectations.data_context.types.base import ProgressBarsConfig
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from citylake.lake import Lake
from citylake.quality.expectations import META_KEY, ExpectationSpec, SuiteSpec, build_suite

log = logging.getLogger(__name__)

#: Names of the GX objects citylake keeps in its project (one asset/definition per table).
DATASOURCE = "citylake"
BATCH_DEFINITION = "whole_dataframe"
#: GX result format: counts without the per-expectation sample of unexpected values,
#: which costs one extra Spark job per row-level expectation (about twice the jobs).
RESULT_FORMAT: Mapping[str, Any] = {"result_format": "BASIC", "partial_unexpected_count": 0}


class ValidationFailed(Exception):
    """A critical expectation failed. ``str(exc)`` is a multi-line message for the CLI."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(failure_message(report))


@dataclass(frozen=True)
class Outcome:
    """The result of one expectation of a run."""

    spec: ExpectationSpec
    success: bool
    observed_value: Any = None
    element_count: int | None = None
    unexpected_count: int | None = None
    error: str | None = None

    def detail(self) -> str:
        """What was seen, for messages: error, observed value and/or unexpected rows."""
        if self.error:
            return f"could not be checked: {self.error}"
        parts: list[str] = []
        if self.observed_value is not None:
            parts.append(f"observed {self.observed_value}")
        if self.unexpected_count:
            of = f" of {self.element_count}" if self.element_count is not None else ""
            parts.append(f"{self.unexpected_count}{of} rows unexpected")
        return ", ".join(parts) or "failed, nothing observed (no rows?)"

    def line(self) -> str:
        """One human-readable line naming the check, its column and what was seen."""
        where = f"column {self.spec.column}, " if self.spec.column else ""
        return f"{self.spec.description} ({where}{self.spec.expectation_type}): {self.detail()}"


@dataclass(frozen=True)
class ValidationReport:
    """What one validation run found. ``success`` means no *critical* expectation failed;
    failed warnings are listed in ``warnings`` but do not affect it."""

    run_id: str
    table: str
    scope: str
    success: bool
    critical_failures: list[str]
    warnings: list[str]
    n_expectations: int
    data_docs_path: str | None
    suite_name: str = ""


def failure_message(report: ValidationReport) -> str:
    """The multi-line message of :class:`ValidationFailed` for ``report``."""
    lines = [
        f"Validation of table {report.table} ({report.scope}) failed: "
        f"{len(report.critical_failures)} critical expectation(s) of {report.n_expectations} failed:"
    ]
    lines += [f"  - {line}" for line in report.critical_failures]
    if report.warnings:
        lines.append(f"  ({len(report.warnings)} warning(s) as well)")
    lines.append(f"  run_id {report.run_id}; Data Docs: {report.data_docs_path}")
    return "\n".join(lines)


def check(report: ValidationReport) -> None:
    """Raise :class:`ValidationFailed` when a critical expectation of ``report`` failed."""
    if not report.success:
        raise ValidationFailed(report)


def validate_table(
    lake: Lake,
    table: str,
    df: DataFrame,
    scope: str,
    reference_ts: dt.datetime | None = None,
    recent_counts: Sequence[int] | None = None,
    raise_on_critical: bool | None = None,
    context: AbstractDataContext | None = None,
) -> ValidationReport:
    """Validate ``df`` (rows of ``table``) with the table's generated GX suite.

    ``scope`` says what is validated (e.g. ``"batch 7"``); ``reference_ts`` is the time
    freshness is measured from (naive = UTC; no freshness check when None);
    ``recent_counts`` are row counts of recent batches (see :func:`recent_batch_counts`).
    Results go to GX's stores and Data Docs under the lake and to ``validation_results``.
    Raises :class:`ValidationFailed` on a critical failure when ``raise_on_critical``
    (default: ``validation.fail_on_critical``) is true. ``context`` reuses an open GX
    context (from :func:`open_gx_context`).
    """
    cfg = lake.config.validation
    raise_on_critical = cfg.fail_on_critical if raise_on_critical is None else raise_on_critical
    run_ts = dt.datetime.now(dt.timezone.utc)
    run_id = f"{run_ts:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    # GX runs one Spark job per expectation domain: cache the rows for the run's duration.
    cached_here = not df.is_cached
    if cached_here:
        df = df.persist()
    try:
        suite = build_suite(
            lake.spec(table),
            lake.catalogue,
            cfg,
            reference_ts=_as_spark_local(reference_ts) if reference_ts else None,
            recent_counts=list(recent_counts or []),
            metrics_present=_distinct_metrics(df),
        )
        ctx = context if context is not None else open_gx_context(lake)
        outcomes = run_suite(ctx, suite, df, run_id, run_ts)
    finally:
        if cached_here:
            df.unpersist()
    # Saved before any raise, so a failed run is on record too.
    _save_results(lake, suite, outcomes, run_id, run_ts, scope)
    report = _report(run_id, scope, suite, outcomes, _data_docs_index(ctx))
    _log_report(report)
    if raise_on_critical:
        check(report)
    return report


def _report(
    run_id: str, scope: str, suite: SuiteSpec, outcomes: Sequence[Outcome], docs: str | None
) -> ValidationReport:
    return ValidationReport(
        run_id=run_id,
        table=suite.table,
        scope=scope,
        success=all(o.success for o in outcomes if o.spec.critical),
        critical_failures=[o.line() for o in outcomes if o.spec.critical and not o.success],
        warnings=[o.line() for o in outcomes if not o.spec.critical and not o.success],
        n_expectations=len(outcomes),
        data_docs_path=docs,
        suite_name=suite.name,
    )


def recent_batch_counts(lake: Lake, n: int, before_batch: int | None = None) -> list[int]:
    """``ingest_log.accepted`` of the last ``n`` ingest batches, newest first.

    ``before_batch`` leaves out that batch and later ones (the batch being validated).
    Empty when there is no ingest log yet.
    """
    if n <= 0 or not lake.exists("ingest_log"):
        return []
    log_df = lake.read("ingest_log")
    if before_batch is not None:
        log_df = log_df.where(F.col("batch_id") < before_batch)
    rows = log_df.orderBy(F.col("batch_id").desc()).limit(n).select("accepted").collect()
    return [int(r["accepted"]) for r in rows if r["accepted"] is not None]


# -- GX ----------------------------------------------------------------------------------
def gx_root(lake: Lake) -> str:
    """The local folder of the GX project: ``<lake root>/<validation.gx_dir>``.

    GX file projects need a local file system, so an object-store lake needs an absolute
    local ``validation.gx_dir``.
    """
    gx_dir = lake.config.validation.gx_dir
    location = gx_dir if os.path.isabs(gx_dir) else lake.sub(gx_dir)
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise ValueError(
            f"the GX project needs a local folder, not {location!r}: "
            "set validation.gx_dir to an absolute local path"
        )
    return location


def open_gx_context(lake: Lake) -> AbstractDataContext:
    """Open (creating on first use) the GX file project of ``lake``, quiet and offline."""
    _quiet_gx_logging()
    ctx = gx.get_context(mode="file", context_root_dir=gx_root(lake))
    # Saved into great_expectations.yml on first use, so `gx` tools opening the project
    # later behave the same: no analytics, no progress bars in job logs.
    bars = ctx.variables.progress_bars  # a ProgressBarsConfig, or a dict once reloaded
    bars_on = getattr(bars, "globally", None) if not isinstance(bars, Mapping) else bars.get("globally")
    if ctx.variables.analytics_enabled is not False or bars_on is not False:
        ctx.variables.analytics_enabled = False
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        ctx.variables.save()
    return ctx


def run_suite(
    ctx: AbstractDataContext, suite: SuiteSpec, df: DataFrame, run_id: str, run_ts: dt.datetime
) -> list[Outcome]:
    """Run ``suite`` on ``df`` through a GX checkpoint (storing the result and updating
    Data Docs); one :class:`Outcome` per expectation, in suite order."""
    gx_suite = ctx.suites.add_or_update(suite.to_gx())
    definition = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite.name, data=_batch_definition(ctx, suite.table), suite=gx_suite)
    )
    checkpoint = ctx.checkpoints.add_or_update(
        gx.Checkpoint(
            name=suite.name,
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="update_data_docs")],
            result_format=dict(RESULT_FORMAT),
        )
    )
    result = checkpoint.run(
        batch_parameters={"dataframe": df},
        run_id=gx.RunIdentifier(run_name=run_id, run_time=run_ts),
    )
    by_key: dict[str, Any] = {}
    for suite_result in result.run_results.values():
        for exp_result in suite_result.results:
            by_key[(exp_result.expectation_config.meta or {}).get(META_KEY)] = exp_result
    return [_outcome(spec, by_key.get(spec.key)) for spec in suite.expectations]


def _batch_definition(ctx: AbstractDataContext, table: str) -> Any:
    """The whole-DataFrame batch definition of ``table``'s asset, created if missing."""
    try:
        source = ctx.data_sources.get(DATASOURCE)
    except KeyError:
        # persist=False: GX would cache the frame and never release it; we cache per run.
        source = ctx.data_sources.add_spark(name=DATASOURCE, persist=False)
    if table in source.get_asset_names():
        asset = source.get_asset(table)
    else:
        asset = source.add_dataframe_asset(name=table)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION)
    except KeyError:
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)


def _outcome(spec: ExpectationSpec, exp_result: Any | None) -> Outcome:
    if exp_result is None:
        return Outcome(spec, success=False, error="no result from Great Expectations")
    result: Mapping[str, Any] = exp_result.result or {}
    return Outcome(
        spec=spec,
        success=bool(exp_result.success),
        observed_value=result.get("observed_value"),
        element_count=_int_or_none(result.get("element_count")),
        unexpected_count=_int_or_none(result.get("unexpected_count")),
        error=_error_message(exp_result.exception_info),
    )


def _error_message(info: Mapping[str, Any] | None) -> str | None:
    """The exception message GX caught, if any. GX nests it per metric when a metric
    failed to resolve, or gives it flat."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, Mapping)]
    messages = [str(e.get("exception_message")) for e in entries if e.get("raised_exception")]
    return "; ".join(messages) or None


def _data_docs_index(ctx: AbstractDataContext) -> str | None:
    sites = ctx.get_docs_sites_urls()
    if not sites or not sites[0].get("site_url"):
        return None
    url = sites[0]["site_url"]
    return unquote(urlparse(url).path) if url.startswith("file:") else url


def _quiet_gx_logging() -> None:
    # GX 1.x sends no usage statistics; the variable keeps older/other GX code paths off too.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # leave any level the application chose
        gx_logger.setLevel(logging.WARNING)


# -- results table ------------------------------------------------------------------------
def _save_results(
    lake: Lake,
    suite: SuiteSpec,
    outcomes: Sequence[Outcome],
    run_id: str,
    run_ts: dt.datetime,
    scope: str,
) -> None:
    rows = [_result_row(o, suite, run_id, run_ts, scope) for o in outcomes]
    schema = lake.spec("validation_results").struct()
    lake.append("validation_results", lake.spark.createDataFrame(rows, schema))


def _result_row(
    outcome: Outcome, suite: SuiteSpec, run_id: str, run_ts: dt.datetime, scope: str
) -> tuple:
    spec = outcome.spec
    kwargs = dict(spec.kwargs)
    if spec.where:
        kwargs["row_condition"] = " AND ".join(f"{c} == {v!r}" for c, v in spec.where)
    return (
        run_id,
        run_ts,
        suite.table,
        scope,
        suite.name,
        spec.expectation_type,
        spec.column,
        json.dumps(kwargs, default=str, sort_keys=True),
        spec.critical,
        outcome.success,
        _observed_text(outcome),
        outcome.element_count,
        outcome.unexpected_count,
    )


def _observed_text(outcome: Outcome) -> str | None:
    """GX's ``observed_value`` as JSON (aggregate checks), or the error that stopped the check.
    Row-level checks have none: their result is in element and unexpected counts."""
    if outcome.error:
        return f"error: {outcome.error}"
    if outcome.observed_value is not None:
        return json.dumps(outcome.observed_value, default=str)
    return None


# -- small helpers ------------------------------------------------------------------------
def _distinct_metrics(df: DataFrame) -> list[str] | None:
    """Metrics present in ``df``, so range expectations cover only those (None: no column)."""
    if "metric" not in df.columns:
        return None
    return sorted(r[0] for r in df.select("metric").distinct().collect() if r[0] is not None)


def _as_spark_local(ts: dt.datetime) -> dt.datetime:
    """``ts`` as PySpark returns timestamps: naive, in the driver's local time zone.

    GX compares the collected max of the time column with the bound, so both must use
    the same convention. Naive input is taken as UTC (the lake's convention).
    """
    aware = ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)
    return aware.astimezone().replace(tzinfo=None)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _log_report(report: ValidationReport) -> None:
    level = logging.INFO if report.success else logging.ERROR
    log.log(
        level,
        "validated %s (%s): %d expectations, %d critical failure(s), %d warning(s); docs %s",
        report.table,
        report.scope,
        report.n_expectations,
        len(report.critical_failures),
        len(report.warnings),
        report.data_docs_path,
    )
    for line in report.warnings:
        log.warning("%s: %s", report.table, line)
