"""The schemas folder as Python objects: metric catalogue, raw contract, table schemas.

Everything here is read from ``schemas/*.yaml`` (shipped inside the package as
``citylake/schemas``), so parsing, validation and cleaning share one definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pyspark.sql import types as T

_INTERVAL = re.compile(r"^\s*(\d+)\s*(s|sec|min|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> int:
    """``'5min'`` -> 300. Units: s, min (or m), h, d. Returns seconds."""
    match = _INTERVAL.match(str(text))
    if not match:
        raise ValueError(f"bad interval {text!r}: use e.g. 30s, 5min, 1h, 1d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


_SIMPLE_TYPES: dict[str, T.DataType] = {
    "string": T.StringType(),
    "double": T.DoubleType(),
    "float": T.FloatType(),
    "bigint": T.LongType(),
    "long": T.LongType(),
    "int": T.IntegerType(),
    "integer": T.IntegerType(),
    "boolean": T.BooleanType(),
    "timestamp": T.TimestampType(),
    "date": T.DateType(),
}


def spark_type(name: str) -> T.DataType:
    """A Spark type from the DDL names used in ``tables.yaml`` (no session needed)."""
    text = name.strip().lower()
    if text.startswith("array<") and text.endswith(">"):
        return T.ArrayType(spark_type(text[6:-1]))
    try:
        return _SIMPLE_TYPES[text]
    except KeyError:
        raise ValueError(f"unsupported column type {name!r} in tables.yaml") from None


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the catalogue. Ranges are in ``unit``; ``interval_s`` in seconds."""

    name: str
    unit: str
    description: str
    min: float
    max: float
    interval_s: int
    aggregate: str  # "mean" | "sum"
    max_fill_gap: int
    outlier_window: int
    outlier_k: float
    outlier_min_dev: float
    domain: str
    #: Follows the days of the week (traffic, energy); false where weather drives it.
    weekly_cycle: bool = True


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: str
    nullable: bool = True
    description: str = ""


@dataclass(frozen=True)
class TableSpec:
    """A Delta table: where it lives under the lake root and its columns."""

    name: str
    path: str
    layer: str
    description: str
    columns: tuple[ColumnSpec, ...]
    partition_by: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    unique_keys: str | None = None  # "critical" | "warning" | None
    time_column: str | None = None
    dynamic_columns: tuple[dict, ...] = ()
    #: Columns OPTIMIZE clusters files by (Z-order), the keys analysts filter on.
    zorder_by: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def struct(self, extra: list[ColumnSpec] | None = None) -> T.StructType:
        """The Spark schema of the table (``extra`` appends dynamic columns)."""
        cols = list(self.columns) + list(extra or [])
        return T.StructType(
            [T.StructField(c.name, spark_type(c.type), c.nullable) for c in cols]
        )


@dataclass(frozen=True)
class Catalogue:
    """The whole schemas folder."""

    metrics: dict[str, MetricSpec]
    tables: dict[str, TableSpec]
    raw: dict[str, Any]
    sensor_registry: dict[str, Any]
    reasons: dict[str, dict[str, str]]

    def metric(self, name: str) -> MetricSpec:
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(f"unknown metric {name!r}; known: {sorted(self.metrics)}") from None

    def table(self, name: str) -> TableSpec:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"unknown table {name!r}; known: {sorted(self.tables)}") from None

    @property
    def required_fields(self) -> list[str]:
        return [f["name"] for f in self.raw["required_fields"]]

    @property
    def record_reasons(self) -> list[str]:
        """Record reason codes in the order they are checked."""
        return list(self.reasons["record_reasons"])

    def format_of(self, file_name: str) -> str | None:
        """The landing format (csv/json/parquet) of a file name, or None if unsupported."""
        lower = file_name.lower()
        # Longest suffix first so ".csv.gz" wins over ".gz"-less rules.
        pairs = [(suf, fmt) for fmt, sufs in self.raw["formats"].items() for suf in sufs]
        for suffix, fmt in sorted(pairs, key=lambda p: -len(p[0])):
            if lower.endswith(suffix):
                return fmt
        return None


def schemas_dir() -> resources.abc.Traversable:
    """The folder holding the schema YAML files, inside the installed package.

    A ``Traversable``, not a ``Path``: under ``spark-submit --py-files citylake.zip`` the
    package lives inside a zip file, where only ``importlib.resources`` can read it.
    """
    return resources.files("citylake") / "schemas"


def _metric(name: str, raw: dict[str, Any]) -> MetricSpec:
    if raw["aggregate"] not in ("mean", "sum"):
        raise ValueError(f"metric {name}: aggregate must be mean or sum, not {raw['aggregate']!r}")
    if int(raw["outlier_window"]) % 2 != 1:
        raise ValueError(f"metric {name}: outlier_window must be odd")
    return MetricSpec(
        name=name,
        unit=raw["unit"],
        description=raw.get("description", ""),
        min=float(raw["min"]),
        max=float(raw["max"]),
        interval_s=parse_interval(raw["interval"]),
        aggregate=raw["aggregate"],
        max_fill_gap=int(raw["max_fill_gap"]),
        outlier_window=int(raw["outlier_window"]),
        outlier_k=float(raw["outlier_k"]),
        outlier_min_dev=float(raw["outlier_min_dev"]),
        domain=raw.get("domain", ""),
        weekly_cycle=bool(raw.get("weekly_cycle", True)),
    )


def _table(name: str, raw: dict[str, Any]) -> TableSpec:
    return TableSpec(
        name=name,
        path=raw["path"],
        layer=raw["layer"],
        description=raw.get("description", ""),
        columns=tuple(
            ColumnSpec(c["name"], c["type"], c.get("nullable", True), c.get("description", ""))
            for c in raw["columns"]
        ),
        partition_by=tuple(raw.get("partition_by", [])),
        keys=tuple(raw.get("keys", [])),
        unique_keys=raw.get("unique_keys"),
        time_column=raw.get("time_column"),
        dynamic_columns=tuple(raw.get("dynamic_columns", [])),
        zorder_by=tuple(raw.get("zorder_by", [])),
    )


@lru_cache(maxsize=4)
def load_catalogue(folder: str | None = None) -> Catalogue:
    """Read every schema file of ``folder`` (default: the packaged ``schemas``)."""
    base = Path(folder) if folder else schemas_dir()

    def read(name: str) -> dict[str, Any]:
        return yaml.safe_load((base / name).read_text(encoding="utf-8"))

    metrics = {n: _metric(n, m) for n, m in read("metrics.yaml")["metrics"].items()}
    tables = {n: _table(n, t) for n, t in read("tables.yaml")["tables"].items()}
    return Catalogue(
        metrics=metrics,
        tables=tables,
        raw=read("raw_reading.yaml"),
        sensor_registry=read("sensor_registry.yaml"),
        reasons=read("quarantine_reasons.yaml"),
    )
