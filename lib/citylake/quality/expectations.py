"""Great Expectations suites generated from the table schemas and the metric catalogue.

Nothing here is written per table: every expectation follows from ``schemas/tables.yaml``
(``nullable``, ``keys``, ``unique_keys``, ``time_column``) and ``schemas/metrics.yaml``
(metric names and physical ranges), plus the validation settings in config.

A suite is plain data first (:class:`SuiteSpec` of :class:`ExpectationSpec`), so what is
checked and what is *critical* (a failure stops the job) can be tested without running
GX; :meth:`SuiteSpec.to_gx` turns it into a GX ``ExpectationSuite``. No I/O happens here.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.expectations.metadata_types import FailureSeverity
from great_expectations.expectations.row_conditions import Column, Condition

from citylake.catalogue import Catalogue, TableSpec
from citylake.config import ValidationConfig

#: Columns holding a reading in its metric's unit, range-checked per metric when present.
VALUE_COLUMNS: tuple[str, ...] = ("value", "value_clean")
#: Meta key carrying :attr:`ExpectationSpec.key` through GX, to match results back.
META_KEY = "citylake_key"


@dataclass(frozen=True)
class ExpectationSpec:
    """One expectation as data.

    ``expectation_type`` is the GX snake_case name, ``kwargs`` its arguments (without a
    row condition), ``where`` an optional row filter as ``(column, value)`` equalities that
    are ANDed. ``key`` is unique within a suite and stable across runs.
    """

    key: str
    expectation_type: str
    kwargs: Mapping[str, Any]
    critical: bool
    description: str
    where: tuple[tuple[str, Any], ...] = ()
    notes: str = ""

    @property
    def column(self) -> str | None:
        """The column checked, or the key columns joined by commas (None for table-level)."""
        if "column" in self.kwargs:
            return str(self.kwargs["column"])
        if "column_list" in self.kwargs:
            return ",".join(self.kwargs["column_list"])
        return None

    @property
    def severity(self) -> str:
        return "critical" if self.critical else "warning"

    def row_condition(self) -> Condition | None:
        """``where`` as a GX 1.x Condition (``Column("metric") == "pm25"``), or None."""
        conditions = [Column(col) == value for col, value in self.where]
        if not conditions:
            return None
        combined = conditions[0]
        for cond in conditions[1:]:
            combined = combined & cond
        return combined

    def to_gx(self) -> gxe.Expectation:
        """The GX expectation object, tagged with its key and severity."""
        cls = getattr(gxe, _camel(self.expectation_type))
        extra: dict[str, Any] = {}
        condition = self.row_condition()
        if condition is not None:
            extra["row_condition"] = condition
        if self.notes:
            extra["notes"] = self.notes
        return cls(
            **dict(self.kwargs),
            **extra,
            # GX's own severity shows in Data Docs; `critical` stays the source of truth.
            severity=FailureSeverity.CRITICAL if self.critical else FailureSeverity.WARNING,
            meta={META_KEY: self.key, "critical": self.critical},
            # One expectation that cannot run (e.g. a missing column) is reported as failed
            # instead of aborting the whole validation.
            catch_exceptions=True,
        )


@dataclass(frozen=True)
class SuiteSpec:
    """The expectations for one table, in a stable order."""

    name: str
    table: str
    expectations: tuple[ExpectationSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        keys = [e.key for e in self.expectations]
        if len(keys) != len(set(keys)):
            raise ValueError(f"suite {self.name}: duplicate expectation keys {keys}")

    def __len__(self) -> int:
        return len(self.expectations)

    def by_key(self) -> dict[str, ExpectationSpec]:
        return {e.key: e for e in self.expectations}

    @property
    def critical(self) -> list[ExpectationSpec]:
        return [e for e in self.expectations if e.critical]

    def to_gx(self) -> gx.ExpectationSuite:
        """A fresh GX ``ExpectationSuite`` holding every expectation."""
        # Passed to the constructor: ``add_expectation`` needs an active GX context.
        suite = gx.ExpectationSuite(
            name=self.name,
            expectations=[spec.to_gx() for spec in self.expectations],
            meta={"generated_by": "citylake"},
        )
        # GX logs and drops an invalid expectation instead of raising; refuse that here.
        if len(suite.expectations) != len(self.expectations):
            raise ValueError(f"suite {self.name}: GX rejected some expectations (see log)")
        return suite


def suite_name(table: str) -> str:
    """The GX suite name of a table: the table name (no dots: GX stores nest on them)."""
    return table


def build_suite(
    table: TableSpec,
    catalogue: Catalogue,
    cfg: ValidationConfig,
    reference_ts: datetime | None = None,
    recent_counts: Sequence[int] = (),
    metrics_present: Collection[str] | None = None,
) -> SuiteSpec:
    """Generate the suite of ``table`` from its schema and the metric catalogue.

    * not-null for every ``nullable: false`` column (critical);
    * metric names within the catalogue (critical), when the table has ``metric``;
    * each value column between the metric's min and max, one expectation per metric
      (critical), when the table has ``metric`` and a value column. ``metrics_present``
      (the distinct metrics of the data) limits this to metrics that occur; None means
      every catalogue metric;
    * ``keys`` unique together, with the table's ``unique_keys`` criticality (skipped
      when the table declares none);
    * freshness: max of ``time_column`` at least ``reference_ts - freshness_hours``
      (warning; skipped without ``reference_ts``). ``reference_ts`` must be in the form the
      time column is read back in (naive, as PySpark returns timestamps);
    * row count within [mean / f, mean * f] of ``recent_counts`` (warning; skipped with no
      history or an all-zero one).
    """
    columns = set(table.column_names)
    specs: list[ExpectationSpec] = []
    specs += _not_null(table)
    if "metric" in columns:
        specs.append(_metric_names(catalogue))
        specs += _value_ranges(table, catalogue, metrics_present)
    specs += _uniqueness(table)
    if reference_ts is not None and table.time_column:
        specs.append(_freshness(table.time_column, reference_ts, cfg.freshness_hours))
    row_count = _row_count(recent_counts, cfg.row_count_factor)
    if row_count is not None:
        specs.append(row_count)
    return SuiteSpec(name=suite_name(table.name), table=table.name, expectations=tuple(specs))


def _not_null(table: TableSpec) -> list[ExpectationSpec]:
    return [
        ExpectationSpec(
            key=f"not_null:{col.name}",
            expectation_type="expect_column_values_to_not_be_null",
            kwargs={"column": col.name},
            critical=True,
            description=f"{col.name} is not null",
            notes="Declared nullable: false in tables.yaml.",
        )
        for col in table.columns
        if not col.nullable
    ]


def _metric_names(catalogue: Catalogue) -> ExpectationSpec:
    names = sorted(catalogue.metrics)
    return ExpectationSpec(
        key="metric_in_catalogue",
        expectation_type="expect_column_values_to_be_in_set",
        kwargs={"column": "metric", "value_set": names},
        critical=True,
        description=f"metric is one of the {len(names)} catalogue metrics",
        notes="Metric names from metrics.yaml.",
    )


def _value_ranges(
    table: TableSpec, catalogue: Catalogue, metrics_present: Collection[str] | None
) -> list[ExpectationSpec]:
    value_columns = [c for c in VALUE_COLUMNS if c in table.column_names]
    wanted = set(catalogue.metrics) if metrics_present is None else set(metrics_present)
    # Unknown metrics get no range: the metric-name expectation already reports them.
    metrics = [catalogue.metrics[m] for m in sorted(wanted & set(catalogue.metrics))]
    return [
        ExpectationSpec(
            key=f"range:{column}:{metric.name}",
            expectation_type="expect_column_values_to_be_between",
            kwargs={"column": column, "min_value": metric.min, "max_value": metric.max},
            critical=True,
            where=(("metric", metric.name),),
            description=(
                f"{column} of {metric.name} between {metric.min:g} and {metric.max:g} {metric.unit}"
            ),
            notes=f"Physical range of {metric.name} in metrics.yaml.",
        )
        for metric in metrics
        for column in value_columns
    ]


def _uniqueness(table: TableSpec) -> list[ExpectationSpec]:
    if not table.keys or table.unique_keys is None:
        return []
    if table.unique_keys not in ("critical", "warning"):
        raise ValueError(
            f"table {table.name}: unique_keys must be critical or warning, not {table.unique_keys!r}"
        )
    keys = list(table.keys)
    return [
        ExpectationSpec(
            key="unique_keys",
            expectation_type="expect_compound_columns_to_be_unique",
            kwargs={"column_list": keys},
            critical=table.unique_keys == "critical",
            description=f"({', '.join(keys)}) unique",
            notes=f"Table keys, unique_keys: {table.unique_keys} in tables.yaml.",
        )
    ]


def _freshness(time_column: str, reference_ts: datetime, hours: float) -> ExpectationSpec:
    oldest_ok = reference_ts - timedelta(hours=hours)
    return ExpectationSpec(
        key="freshness",
        expectation_type="expect_column_max_to_be_between",
        kwargs={"column": time_column, "min_value": oldest_ok},
        # Backfills of old data are normal, so stale data only warns.
        critical=False,
        description=(
            f"newest {time_column} not older than {hours:g}h before {reference_ts:%Y-%m-%d %H:%M:%S}"
        ),
    )


def _row_count(recent_counts: Sequence[int], factor: float) -> ExpectationSpec | None:
    if factor < 1:
        raise ValueError(f"validation.row_count_factor must be >= 1, not {factor}")
    if not recent_counts:
        return None
    mean = sum(recent_counts) / len(recent_counts)
    if mean <= 0:
        return None  # only empty batches so far: no meaningful size to compare with
    low, high = math.floor(mean / factor), math.ceil(mean * factor)
    return ExpectationSpec(
        key="row_count",
        expectation_type="expect_table_row_count_to_be_between",
        kwargs={"min_value": low, "max_value": high},
        critical=False,
        description=(
            f"row count between {low} and {high} "
            f"(mean {mean:g} of {len(recent_counts)} recent batches, factor {factor:g})"
        ),
    )


def _camel(snake: str) -> str:
    """``expect_column_values_to_be_between`` -> ``ExpectColumnValuesToBeBetween``."""
    return "".join(part.capitalize() for part in snake.split("_"))
