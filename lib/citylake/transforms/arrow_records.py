"""Raw CSV rows -> accepted readings in Arrow, for the direct ingest (pure transforms).

The Spark transforms in :mod:`citylake.transforms.records` decide every record's fate
and hold the one written-out version of the contract's rules. This module is a fast
*pre-filter* in front of them: it accepts only the records it can prove the Spark rules
would accept, with the same typed values, and hands every other record on as its raw
line. The test is deliberately narrower than the contract (an unquoted line with exactly
the header's fields, a trimmed known sensor and metric, an ISO timestamp with seconds
and ``Z`` or ``+hh:mm``, a plain decimal number inside the metric's range, printable
ASCII extras), so a record it is unsure of is never judged here: it goes to Spark.
The limits it checks (ranges, time window, known sensors, metrics) come from the same
catalogue and registry as the Spark rules.

Also here: the exact-duplicate collapse and the lake-duplicate test of
``records.collapse_exact_duplicates`` / ``flag_lake_duplicates``, on Arrow tables.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from citylake.catalogue import Catalogue, parse_interval

#: The timestamp shapes accepted here (Spark parses each to the same instant): date,
#: ``T`` or a space, time with seconds and up to 6 decimals, ``Z`` or ``+hh:mm`` up to
#: 17:59 (Spark's limit is 18:00). Anything else is left to Spark.
FAST_TS = (r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[T ]([01]\d|2[0-3]):[0-5]\d:[0-5]\d"
           r"(\.\d{1,6})?(Z|[+-](0\d|1[0-7]):[0-5]\d)$")
#: Decimal numbers both Java's ``parseDouble`` and Arrow parse (correctly rounded, so
#: to the same double).
FAST_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
#: Extra-field text that ``to_json`` writes unchanged between quotes: printable ASCII
#: without ``"`` and ``\``.
JSON_SAFE = r"^[ !#-\[\]-~]*$"
_QUOTE_OR_BACKSLASH = r'["\\]'
READING_KEY = ["sensor_id", "metric", "ts", "value"]
TS_TYPE = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class AcceptRules:
    """The limits a record must meet to be accepted here (from catalogue and registry)."""

    metric_names: pa.Array
    metric_min: np.ndarray
    metric_max: np.ndarray
    known_sensors: pa.Array
    min_ts_us: int
    max_ts_us: int

    @classmethod
    def build(cls, catalogue: Catalogue, known_sensors: Sequence[str] | pa.Array,
              now: dt.datetime) -> "AcceptRules":
        """Rules for a batch ingested at ``now`` (UTC) against ``known_sensors``."""
        raw = catalogue.raw
        min_ts = dt.datetime.fromisoformat(raw["min_ts"].replace("Z", "+00:00"))
        now = now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)
        max_ts = now + dt.timedelta(seconds=parse_interval(raw["max_future"]))
        metrics = list(catalogue.metrics.values())
        return cls(
            metric_names=pa.array([m.name for m in metrics], pa.string()),
            metric_min=np.array([m.min for m in metrics], np.float64),
            metric_max=np.array([m.max for m in metrics], np.float64),
            known_sensors=pa.array(known_sensors, pa.string()).unique(),
            min_ts_us=epoch_us(min_ts),
            # Spark compares microsecond timestamps: the bound is floored like its literal.
            max_ts_us=epoch_us(max_ts),
        )


def epoch_us(ts: dt.datetime) -> int:
    delta = ts - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _mask(array) -> np.ndarray:
    """A boolean Arrow array as numpy, nulls as False."""
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def _trim(array: pa.Array) -> pa.Array:
    # Spark's trim() removes spaces only (not tabs or other white space).
    return pc.utf8_trim(array, characters=" ")


def _plain_dictionary(array: pa.Array) -> pa.DictionaryArray:
    encoded = pc.dictionary_encode(array)
    return encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded


def _parse_timestamps(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Timestamps of the strings matching :data:`FAST_TS` (UTC microseconds) and that mask."""
    shaped = _mask(pc.match_substring_regex(text, FAST_TS))
    candidates = pc.if_else(pa.array(shaped), text, pa.scalar("2000-01-01T00:00:00Z"))
    try:
        return pc.cast(candidates, TS_TYPE), shaped
    except pa.ArrowInvalid:
        # A day the month lacks (Feb 30): parse one by one, the bad ones left to Spark.
        values, ok = [], shaped.copy()
        for i, s in enumerate(candidates.to_pylist()):
            try:
                values.append(dt.datetime.fromisoformat(s.replace("Z", "+00:00")))
            except ValueError:
                values.append(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc))
                ok[i] = False
        return pa.array(values, TS_TYPE), ok


def _parse_numbers(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float64 of the strings that are plain decimal numbers, and that mask."""
    try:
        values = pc.cast(text, pa.float64())
        ok = np.ones(len(text), bool) if values.null_count == 0 else _mask(pc.is_valid(values))
    except pa.ArrowInvalid:
        ok = _mask(pc.match_substring_regex(text, FAST_NUMBER))
        values = pc.cast(pc.if_else(pa.array(ok), text, pa.scalar("0")), pa.float64())
    return np.asarray(values.to_numpy(zero_copy_only=False), np.float64), ok


def _extra_json(header: Sequence[str], rows: pa.Table, extras: list[int]) -> tuple[pa.Array, np.ndarray]:
    """The extra fields as Spark's ``to_json`` writes them, and which rows are safe to.

    An empty field is null in Spark's CSV reader and left out of the object; no field
    at all gives null.
    """
    n = rows.num_rows
    if not extras:
        return pa.nulls(n, pa.string()), np.ones(n, bool)
    safe = np.ones(n, bool)
    pieces = []
    for i in extras:
        value = rows.column(f"c{i}").combine_chunks()
        safe &= _mask(pc.match_substring_regex(value, JSON_SAFE))
        # '"name":"value",' or nothing for an empty field; the last comma is cut below
        # (a field holds no comma here: the line was split on every one).
        piece = pc.binary_join_element_wise(f'"{header[i]}":"', value, '",', "")
        pieces.append(pc.if_else(pc.equal(value, ""), pa.scalar(""), piece))
    joined = pieces[0] if len(pieces) == 1 else pc.binary_join_element_wise(*pieces, "")
    joined = pc.utf8_rtrim(joined, characters=",")
    present = pc.not_equal(joined, "")
    return pc.if_else(present, pc.binary_join_element_wise("{", joined, "}", ""),
                      pa.scalar(None, pa.string())), safe


def accept_csv_rows(rows: pa.Table, header: Sequence[str], header_lines: Sequence[str],
                    required: Sequence[str], rules: AcceptRules) -> tuple[pa.Table, pa.Table]:
    """Split CSV rows into readings accepted here and raw lines left to Spark.

    ``rows``: the data lines of files sharing ``header``, split on every comma, as string
    columns ``c0..c<k-1>`` (k = ``len(header)``) plus ``file_index`` (int32). Lines that
    did not split into k fields are not in ``rows``; the caller hands them on itself.
    ``header_lines``: the files' header lines as written (a data line equal to one is
    not a record; Spark drops it).

    Returns (accepted readings: sensor_id, metric, ts, value, reading_date, extra_json and
    file_index; left-over lines with
    ``file_index`` and ``raw_record``).
    """
    n = rows.num_rows
    position = {name: header.index(name) for name in required}
    column = {name: rows.column(f"c{i}").combine_chunks() for name, i in position.items()}
    ok = np.ones(n, bool)

    names_safe = all(not any(c in h for c in '"\\') and h.isascii() and h.isprintable() for h in header)
    extras = [i for i, h in enumerate(header) if h not in required]
    extra_json, extras_safe = _extra_json(header, rows, extras) if names_safe else (
        pa.nulls(n, pa.string()), np.zeros(n, bool))
    ok &= extras_safe

    sensor = _plain_dictionary(_trim(column["sensor_id"]))
    sensor_ok = _mask(pc.and_(pc.is_in(sensor.dictionary, value_set=rules.known_sensors),
                              pc.invert(pc.match_substring_regex(sensor.dictionary, _QUOTE_OR_BACKSLASH))))
    ok &= sensor_ok[sensor.indices.to_numpy()]

    metric = _plain_dictionary(_trim(column["metric"]))
    metric_at = np.asarray(pc.fill_null(pc.index_in(metric.dictionary, value_set=rules.metric_names), -1)
                           .to_numpy(zero_copy_only=False), np.int64)
    metric_codes = metric.indices.to_numpy()
    row_metric = metric_at[metric_codes]
    ok &= row_metric >= 0

    ts_text = _plain_dictionary(_trim(column["ts"]))
    ts_values, ts_ok = _parse_timestamps(ts_text.dictionary)
    ts_us = np.asarray(ts_values.cast(pa.int64()).to_numpy(zero_copy_only=False), np.int64)
    ts_ok &= (ts_us >= rules.min_ts_us) & (ts_us <= rules.max_ts_us)
    ts_codes = ts_text.indices.to_numpy()
    ok &= ts_ok[ts_codes]

    value, value_ok = _parse_numbers(_trim(column["value"]))
    lo = np.append(rules.metric_min, np.nan)[row_metric]
    hi = np.append(rules.metric_max, np.nan)[row_metric]
    with np.errstate(invalid="ignore"):
        ok &= value_ok & np.isfinite(value) & (value >= lo) & (value <= hi)

    for line in header_lines:
        fields = line.split(",")
        if len(fields) == len(header):
            same = np.ones(n, bool)
            for i, text in enumerate(fields):
                same &= _mask(pc.equal(rows.column(f"c{i}").combine_chunks(), text))
            ok &= ~same

    keep = pa.array(ok)
    file_index = rows.column("file_index").combine_chunks()
    accepted = pa.table({
        "sensor_id": sensor.dictionary.take(pc.filter(sensor.indices, keep)),
        "metric": metric.dictionary.take(pc.filter(metric.indices, keep)),
        "ts": ts_values.take(pa.array(ts_codes[ok])),
        # + 0.0 turns -0.0 into 0.0, as Spark normalises a grouping key.
        "value": pa.array(value[ok] + 0.0),
        "reading_date": pc.cast(ts_values.take(pa.array(ts_codes[ok])), pa.date32()),
        "extra_json": pc.filter(extra_json, keep),
        "file_index": pc.filter(file_index, keep),
    })
    rest = pa.array(~ok)
    raw_columns = [pc.filter(rows.column(f"c{i}").combine_chunks(), rest) for i in range(len(header))]
    raw_record = raw_columns[0] if len(raw_columns) == 1 else pc.binary_join_element_wise(*raw_columns, ",")
    left = pa.table({"file_index": pc.filter(file_index, rest), "raw_record": raw_record})
    return accepted, left


def take_chunked(values: pa.Array, indices, rows_per_chunk: int = 1 << 20) -> pa.ChunkedArray:
    """``values.take(indices)`` in chunks of ``rows_per_chunk``: one take of long strings
    over millions of rows would pass 2 GiB of string data in one array (offsets overflow)."""
    indices = indices.combine_chunks() if isinstance(indices, pa.ChunkedArray) else indices
    return pa.chunked_array([values.take(indices.slice(i, rows_per_chunk))
                             for i in range(0, len(indices), rows_per_chunk)] or [values.take(indices)],
                            type=values.type)


def _key_hash(table: pa.Table, sensors: pa.Array, metrics: pa.Array) -> np.ndarray:
    """A 64-bit hash of (sensor_id, metric, ts, value) per row; sensor and metric codes are
    positions in ``sensors`` / ``metrics`` (-1 when absent), so two tables hashed with
    the same arrays are comparable."""
    def codes(name: str, values: pa.Array) -> np.ndarray:
        at = pc.fill_null(pc.index_in(table.column(name), value_set=values), -1)
        return np.asarray(at.to_numpy(), np.int64).view(np.uint64)

    ts = np.asarray(table.column("ts").combine_chunks().cast(pa.int64()).to_numpy(), np.int64).view(np.uint64)
    value = (np.asarray(table.column("value").combine_chunks().to_numpy(), np.float64) + 0.0).view(np.uint64)
    with np.errstate(over="ignore"):
        h = codes("sensor_id", sensors) * np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(29))) + codes("metric", metrics) * np.uint64(0xC2B2AE3D27D4EB4F)
        h = (h ^ (h >> np.uint64(31))) + ts * np.uint64(0x165667B19E3779F9)
        h = (h ^ (h >> np.uint64(32))) + value * np.uint64(0x27D4EB2F165667C5)
        return h ^ (h >> np.uint64(29))


def repeated(hashes: np.ndarray) -> np.ndarray:
    """Which entries of ``hashes`` (uint64) occur more than once.

    A plain sort answers "any at all?" first (numpy's SIMD sort: ~0.06 s for 6M, where a
    hash table takes ~0.6 s); only when some repeat are they located, with one argsort.
    """
    n = len(hashes)
    out = np.zeros(n, bool)
    ordered = np.sort(hashes)
    if n < 2 or not (ordered[1:] == ordered[:-1]).any():
        return out
    order = np.argsort(hashes)
    ordered = hashes[order]
    same = ordered[1:] == ordered[:-1]
    marks = np.zeros(n, bool)
    marks[1:] |= same
    marks[:-1] |= same
    out[order] = marks
    return out


def collapse_exact_duplicates(accepted: pa.Table, source_files: pa.Array,
                              source_formats: pa.Array) -> tuple[pa.Table, int]:
    """One row per (sensor_id, metric, ts, value), keeping the lineage (source_file,
    source_format, extra_json) that sorts first, nulls first, as Spark's ``min(struct)``.

    ``accepted`` holds a ``file_index`` into ``source_files`` / ``source_formats``.
    Returns (unique rows, how many copies were dropped). Rows are first compared by a
    64-bit hash of the key; only rows whose hash repeats are compared exactly.
    """
    if accepted.num_rows == 0:
        return accepted, 0
    sensors, metrics = pc.unique(accepted.column("sensor_id")), pc.unique(accepted.column("metric"))
    suspects = repeated(_key_hash(accepted, sensors, metrics))
    if not suspects.any():
        return accepted, 0
    rows = np.flatnonzero(suspects)
    sub = accepted.take(pa.array(rows)).append_column("__row", pa.array(rows))
    sub = sub.append_column("source_file", take_chunked(source_files, sub.column("file_index")))
    sub = sub.append_column("source_format", take_chunked(source_formats, sub.column("file_index")))
    sub = sub.sort_by([(c, "ascending", "at_start")
                       for c in READING_KEY + ["source_file", "source_format", "extra_json"]])
    # After the sort, a row starts its group unless its key equals the previous row's.
    same_as_previous = np.ones(sub.num_rows - 1, bool)
    for name in READING_KEY:
        values = sub.column(name).combine_chunks()
        same_as_previous &= _mask(pc.equal(values.slice(1), values.slice(0, len(values) - 1)))
    starts_group = np.concatenate([[True], ~same_as_previous])
    dropped = np.asarray(sub.column("__row").combine_chunks().to_numpy())[~starts_group]
    keep = np.ones(accepted.num_rows, bool)
    keep[dropped] = False
    return accepted.filter(pa.array(keep)), int(len(dropped))


def in_lake(unique: pa.Table, existing: pa.Table) -> np.ndarray:
    """Which rows of ``unique`` have their (sensor_id, metric, ts, value) in ``existing``."""
    found = np.zeros(unique.num_rows, bool)
    if unique.num_rows == 0 or existing.num_rows == 0:
        return found
    sensors, metrics = pc.unique(unique.column("sensor_id")), pc.unique(unique.column("metric"))
    candidates = np.isin(_key_hash(unique, sensors, metrics), _key_hash(existing, sensors, metrics))
    if not candidates.any():
        return found
    rows = np.flatnonzero(candidates)
    sub = unique.select(READING_KEY).take(pa.array(rows)).append_column("__row", pa.array(rows))
    keys = existing.select(READING_KEY).group_by(READING_KEY).aggregate([])
    # Spark's join normalises -0.0 to 0.0; the rows of ``unique`` are already normalised.
    keys = keys.set_column(keys.schema.get_field_index("value"), "value", pc.add(keys.column("value"), 0.0))
    matched = sub.join(keys, keys=READING_KEY, join_type="left semi")
    found[np.asarray(matched.column("__row").combine_chunks().to_numpy())] = True
    return found
