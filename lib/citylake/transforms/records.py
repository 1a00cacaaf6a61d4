"""Raw records -> typed readings with a quarantine reason (pure transforms).

Every raw record, whatever its file format, is first brought to one shape:

    source_file, source_format, raw_record (the raw text), parsed (bool),
    sensor_id, ts_raw, metric, value_raw (the contract's fields as trimmed text, null
    when absent or blank), extra_json (any other fields as a JSON object, null when none)

and :func:`type_records` then checks it against the contract (``schemas/raw_reading.yaml``)
and the metric catalogue, in the order of ``schemas/quarantine_reasons.yaml``: a record
gets the first reason that applies, or none when it is accepted.

The builders take the contract's field names (``required``, in the order sensor_id, ts,
metric, value) from the catalogue. Fields are pulled out per format rather than through a
generic map: building a map and filtering it per record doubled the cost of typing a
batch (measured in ``bench/ingest_bench.py``).
"""

from __future__ import annotations

import datetime as dt
from functools import reduce
from typing import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from citylake.catalogue import Catalogue, parse_interval

#: ISO-8601 date-time with a mandatory zone (Z or +hh:mm / +hhmm). A reading without a
#: zone is rejected rather than guessed: a wrong guess shifts every reading silently.
ISO_WITH_ZONE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})$"
_OVERFLOW = "__overflow__"
#: Where each contract field lands in the record shape.
FIELD_COLUMNS = {"sensor_id": "sensor_id", "ts": "ts_raw", "metric": "metric", "value": "value_raw"}
RECORD_SHAPE = ["source_file", "source_format", "raw_record", "parsed", *FIELD_COLUMNS.values(), "extra_json"]


def _field_columns(required: Sequence[str], get) -> list[Column]:
    """The contract fields as shape columns; ``get(name)`` returns a field's raw Column."""
    if list(required) != list(FIELD_COLUMNS):
        raise ValueError(f"record shape expects fields {list(FIELD_COLUMNS)}, schema says {list(required)}")
    return [_blank_to_null(get(name)).alias(FIELD_COLUMNS[name]) for name in required]


def _extra_json(columns: dict[str, Column]) -> Column:
    """Non-contract fields as one JSON object; null when there are none or all are null."""
    if not columns:
        return F.lit(None).cast("string")
    present = F.coalesce(*[c.cast("string") for c in columns.values()]).isNotNull()
    return F.when(present, F.to_json(F.struct(*[c.alias(n) for n, c in columns.items()])))


def csv_records(lines: DataFrame, header: list[str], required: Sequence[str], delimiter: str = ",") -> DataFrame:
    """CSV data lines (``source_file, source_format, raw_record``) of files sharing ``header``.

    A line with more fields than the header is not parsed (``parsed`` false); a line with
    fewer gives nulls for the missing trailing fields (then quarantined as missing_field).
    """
    names = list(header) + [_OVERFLOW]
    schema = ", ".join(f"`{n}` STRING" for n in names)
    parsed = _parse_once(lines, F.from_csv(F.col("raw_record"), schema, {"sep": delimiter, "mode": "PERMISSIVE"}))
    row = F.col(_PARSED)
    return parsed.select(
        "source_file",
        "source_format",
        "raw_record",
        (row.isNotNull() & row[_OVERFLOW].isNull()).alias("parsed"),
        *_field_columns(required, lambda n: row[n]),
        _extra_json({n: row[n] for n in header if n not in required}).alias("extra_json"),
    )


_PARSED = "__parsed__"


def _parse_once(lines: DataFrame, parser: Column) -> DataFrame:
    """``lines`` with the parsed record as one column, so the parser runs once per line.

    Referenced several times in one projection (one per field), ``from_csv`` /
    ``from_json`` were evaluated once per reference: the plan held ten parser calls per
    line, and parsing cost 1.5x more (measured in ``bench/ingest_bench.py``).
    """
    return lines.select("source_file", "source_format", "raw_record", parser.alias(_PARSED))


def json_records(lines: DataFrame, required: Sequence[str]) -> DataFrame:
    """JSON-lines records; a line that is not one JSON object is not parsed.

    Non-string JSON values (numbers, booleans) arrive as their JSON text.
    """
    parsed = _parse_once(lines, F.from_json(F.col("raw_record"), T.MapType(T.StringType(), T.StringType())))
    obj = F.col(_PARSED)
    extra = F.map_filter(obj, lambda k, v: ~k.isin(list(required)))
    return parsed.select(
        "source_file",
        "source_format",
        "raw_record",
        obj.isNotNull().alias("parsed"),
        *_field_columns(required, lambda n: obj[n]),
        F.when(F.size(extra) > 0, F.to_json(extra)).alias("extra_json"),
    )


def _col(name: str) -> Column:
    """A column by its exact name, even with dots or spaces (``pm2.5``)."""
    return F.col("`" + name.replace("`", "``") + "`")


def _as_text(column: str, data_type: T.DataType) -> Column:
    # Instants are written back as ISO with Z so they pass the same timestamp rule as text.
    if isinstance(data_type, T.TimestampType):
        return F.date_format(_col(column), "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX")
    if isinstance(data_type, (T.StructType, T.ArrayType, T.MapType)):
        return F.to_json(_col(column))
    return _col(column).cast("string")


def parquet_records(rows: DataFrame, file_column: str, required: Sequence[str],
                    source_format: str = "parquet") -> DataFrame:
    """Parquet rows as records: every column as text, the row as JSON for ``raw_record``.

    ``file_column`` names the column holding the source file path; all others are data.
    A ``TimestampNTZ`` ts column has no zone and is therefore rejected as bad_timestamp,
    like a zone-less text timestamp.
    """
    data = [f for f in rows.schema.fields if f.name != file_column]
    names = [f.name for f in data]
    as_text = rows.select(
        _col(file_column).alias("source_file"),
        *[_as_text(f.name, f.dataType).alias(f.name) for f in data],
    )
    return as_text.select(
        "source_file",
        F.lit(source_format).alias("source_format"),
        F.to_json(F.struct(*[_col(c) for c in names])).alias("raw_record"),
        F.lit(True).alias("parsed"),
        *_field_columns(required, _col),
        _extra_json({c: _col(c) for c in names if c not in required}).alias("extra_json"),
    )


def _map_literal(values: dict[str, float]) -> Column:
    return F.create_map(*[x for k, v in values.items() for x in (F.lit(k), F.lit(float(v)))])


def _blank_to_null(col: Column) -> Column:
    trimmed = F.trim(col)
    return F.when(trimmed == "", F.lit(None)).otherwise(trimmed)


def type_records(
    records: DataFrame,
    catalogue: Catalogue,
    known_sensors: DataFrame,
    now: dt.datetime,
) -> DataFrame:
    """Type and check records; adds the reading columns and the quarantine columns.

    Output columns: the record shape plus ``ts`` (timestamp, UTC), ``value`` (double),
    ``reading_date``, ``quarantine_reason`` (null when accepted) and ``quarantine_detail``.

    ``known_sensors`` has a ``sensor_id`` column (the registry, any version); ``now`` is
    the ingest time (UTC) that bounds future timestamps.
    """
    raw = catalogue.raw
    # Aware datetimes: PySpark turns naive ones into instants with the *machine's* zone.
    min_ts = dt.datetime.fromisoformat(raw["min_ts"].replace("Z", "+00:00"))
    now_utc = now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)
    max_ts = now_utc + dt.timedelta(seconds=parse_interval(raw["max_future"]))
    metric_min = _map_literal({m.name: m.min for m in catalogue.metrics.values()})
    metric_max = _map_literal({m.name: m.max for m in catalogue.metrics.values()})
    units = F.create_map(*[x for m in catalogue.metrics.values() for x in (F.lit(m.name), F.lit(m.unit))])

    df = records.select(*RECORD_SHAPE)
    ts_ok_shape = F.col("ts_raw").rlike(ISO_WITH_ZONE)
    # translate, not regexp_replace: a character swap needs no regex engine per record.
    ts = F.when(ts_ok_shape, F.try_to_timestamp(F.translate("ts_raw", " ", "T")))
    # JSON's bare NaN/Infinity tokens arrive quoted from from_json; unquote before the cast
    # (only those few records pay for the regex).
    value_raw = F.col("value_raw")
    value = F.when(value_raw.startswith('"'), F.regexp_replace(value_raw, r'^"(.*)"$', "$1")).otherwise(
        value_raw).try_cast("double")
    df = df.withColumns({"ts": ts, "value": value})
    known = known_sensors.select("sensor_id").distinct().withColumn("_known", F.lit(True))
    df = df.join(F.broadcast(known), on="sensor_id", how="left")

    any_missing = reduce(Column.__or__, [F.col(c).isNull() for c in FIELD_COLUMNS.values()])
    # Spelled out only for the rows that need it (the detail is evaluated lazily).
    missing = F.concat_ws(",", *[F.when(F.col(c).isNull(), F.lit(n)) for n, c in FIELD_COLUMNS.items()])
    lo, hi = metric_min[F.col("metric")], metric_max[F.col("metric")]
    non_finite = F.isnan("value") | (F.abs("value") == float("inf"))
    checks: list[tuple[str, Column, Column]] = [
        ("unparseable_line", ~F.col("parsed"), F.lit("not a record of the file's format")),
        ("missing_field", any_missing, F.concat(F.lit("missing: "), missing)),
        ("bad_timestamp", F.col("ts").isNull(),
         F.concat(F.lit("not ISO-8601 with a zone: "), F.col("ts_raw"))),
        ("timestamp_out_of_range", (F.col("ts") < F.lit(min_ts)) | (F.col("ts") > F.lit(max_ts)),
         F.concat(F.lit("ts outside ["), F.lit(raw["min_ts"]), F.lit(", ingest time + "),
                  F.lit(raw["max_future"]), F.lit("]"))),
        ("unknown_metric", lo.isNull(), F.concat(F.lit("unknown metric: "), F.col("metric"))),
        ("bad_value", F.col("value").isNull(), F.concat(F.lit("not a number: "), F.col("value_raw"))),
        ("non_finite_value", non_finite, F.concat(F.lit("non-finite: "), F.col("value_raw"))),
        ("value_out_of_range", (F.col("value") < lo) | (F.col("value") > hi),
         F.format_string("%s %s outside [%s, %s] %s", F.col("metric"), F.col("value_raw"),
                         lo.cast("string"), hi.cast("string"), units[F.col("metric")])),
        ("unknown_sensor", F.col("_known").isNull(),
         F.concat(F.lit("not in sensor registry: "), F.col("sensor_id"))),
    ]
    assert [c[0] for c in checks] == catalogue.record_reasons, "reason order drifted from schemas"
    reason: Column = F.lit(None).cast("string")
    detail: Column = F.lit(None).cast("string")
    for code, failed, text in reversed(checks):
        reason = F.when(F.coalesce(failed, F.lit(False)), F.lit(code)).otherwise(reason)
        detail = F.when(F.coalesce(failed, F.lit(False)), text).otherwise(detail)
    return df.withColumns(
        {
            "quarantine_reason": reason,
            "quarantine_detail": detail,
            "reading_date": F.to_date("ts"),
        }
    ).drop("_known")


def staged_records(typed: DataFrame) -> DataFrame:
    """The typed records narrowed to what the quarantine and bronze steps read.

    An accepted record keeps its parsed fields and lineage but not its raw text
    (``raw_record``, ``ts_raw``, ``value_raw`` become null): writing the raw strings of
    every reading to the staging copy cost ~15% of staging (``bench/RESULTS.md``).
    """
    rejected = F.col("quarantine_reason").isNotNull()

    def raw_text(column: str) -> Column:
        return F.when(rejected, F.col(column)).alias(column)

    return typed.select(
        "source_file", "source_format", raw_text("raw_record"), "sensor_id", "metric",
        raw_text("ts_raw"), raw_text("value_raw"), "extra_json", "ts", "value", "reading_date",
        "quarantine_reason", "quarantine_detail",
    )


def quarantine_rows(typed: DataFrame, batch_id: int, ingest_ts: dt.datetime) -> DataFrame:
    """The rejected records of ``typed`` shaped for the quarantine table."""
    return typed.where(F.col("quarantine_reason").isNotNull()).select(
        F.lit(batch_id).cast("long").alias("batch_id"),
        "source_file",
        "source_format",
        "raw_record",
        "quarantine_reason",
        "quarantine_detail",
        "sensor_id",
        "metric",
        "ts_raw",
        "value_raw",
        F.lit(ingest_ts).alias("ingest_ts"),
    )


READING_KEY = ["sensor_id", "metric", "ts", "value"]


def collapse_exact_duplicates(typed: DataFrame) -> DataFrame:
    """Accepted records with exact duplicates collapsed: one row per (sensor_id, metric, ts,
    value), keeping the lineage of the first source file by name; ``copies`` counts them.
    """
    lineage = F.min(F.struct("source_file", "source_format", "extra_json")).alias("first")
    return (
        typed.where(F.col("quarantine_reason").isNull())
        .groupBy(*READING_KEY, "reading_date")
        .agg(lineage, F.count(F.lit(1)).alias("copies"))
        .select(*READING_KEY, "reading_date", "first.*", "copies")
    )


def flag_lake_duplicates(unique: DataFrame, existing_keys: DataFrame) -> DataFrame:
    """Adds ``in_lake``: the reading already exists in bronze (from an earlier batch).

    ``existing_keys`` holds distinct (sensor_id, metric, ts, value) of bronze rows in the
    dates the batch touches, so the join prunes to those partitions.
    """
    marked = existing_keys.select(*READING_KEY).distinct().withColumn("in_lake", F.lit(True))
    return unique.join(marked, on=READING_KEY, how="left").withColumn(
        "in_lake", F.coalesce("in_lake", F.lit(False))
    )


def bronze_rows(unique: DataFrame, batch_id: int, ingest_ts: dt.datetime) -> DataFrame:
    """New readings shaped for bronze_readings (rows not already in the lake)."""
    return unique.where(~F.col("in_lake")).select(
        "sensor_id",
        "metric",
        "ts",
        "value",
        "reading_date",
        "extra_json",
        "source_file",
        "source_format",
        F.lit(batch_id).cast("long").alias("batch_id"),
        F.lit(ingest_ts).alias("ingest_ts"),
    )
