"""AR fit of a Delta table whose Parquet files are read by the Python workers themselves.

:func:`citylake.forecast.ar_spark.fit_ar` takes any DataFrame, so every value crosses
from the JVM into Python row by row (after a Spark aggregate packs them into blocks).
Measured on 10k series x 2,000 points (``bench/RESULTS_AR.md``, session 11), that
transfer and the packing cost far more than the fit: a no-op ``mapInArrow`` of three
numeric columns alone took 5.9 s against 1.4 s for the bench's whole floor (Spark reads
Parquet column-wise but hands rows to Python). This module skips it for the common case
of fitting a Delta table as it is (optionally up to a cutoff and for some metrics):

1. The driver lists the table's current data files (its Delta log, read with the
   ``deltalake`` package) and checks that they can be read as plain Parquet (:func:`plan_direct`); otherwise the
   fit falls back to ``fit_ar`` with the same result.
2. ``N`` Spark tasks (one per core by default) each read the needed columns of *every*
   file with pyarrow, batch by batch, and keep the rows of their share of the series
   (a deterministic hash of ``(sensor_id, metric)`` modulo N). So every series is whole
   inside one task, whatever the file layout (date partitions, late files, duplicates),
   and there is no shuffle. Each file is decoded N times; Parquet decoding in pyarrow is
   cheap next to the fit (0.12 s per 10M rows warm), so this pays while N is small,
   which is why N is capped (:data:`MAX_TASKS`) and large clusters keep ``fit_ar``.
3. Each task builds its series' value matrices and fits them with the same numpy code
   as ``fit_ar`` (:func:`citylake.forecast.ar_spark.fit_groups`), so coefficients,
   conventions (gaps, filled points, duplicates keep the larger value, region of the
   newest value) and output columns are the same.

The rules of :func:`citylake.forecast.ar_spark.prepare_series` (value column, ``is_gap``,
``is_filled``, NaN, grid step) are applied here to Arrow batches; a test checks both
paths give the same table.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from citylake.forecast import ar, ar_spark

log = logging.getLogger(__name__)

#: Upper bound on reading tasks: each one decodes every file, so the total decoding work
#: grows with N. 8 keeps it below the fit's own cost on 10k x 2,000 (bench/RESULTS_AR.md).
MAX_TASKS = 8
#: Rows one task may hold. A task peaks at ~100 bytes per row kept (the row arrays, their
#: concatenation, series and group indices, value matrices): ~3 GB at this bound. A table
#: that needs more than MAX_TASKS such tasks is fitted by Spark's reader.
MAX_ROWS_PER_TASK = 30_000_000
#: Rows per Arrow batch while reading; small enough to stay in cache, large enough that
#: the per-batch Python overhead is negligible.
BATCH_ROWS = 1 << 17
#: Distinct Arrow dictionaries remembered per column and task (oldest dropped first).
DICTIONARY_CACHE = 64
#: URI schemes whose files pyarrow can open in every task without extra credentials.
LOCAL_SCHEMES = ("file",)

_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_HASH_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class DirectPlan:
    """What each reading task needs: the files and how to read them."""

    files: tuple[str, ...]  #: absolute paths (or URIs) of the table's current files
    value_column: str  #: ``value_clean`` (silver) or ``value`` (gold)
    columns: tuple[str, ...]  #: Parquet columns read
    tasks: int  #: reading tasks, each fitting its share of the series


@dataclass
class _Dictionary:
    """Strings seen by one task, each with a dense id, cached per Arrow dictionary."""

    ids: dict[str, int] = field(default_factory=dict)
    _seen: dict[tuple[int, int], tuple[pa.Array, np.ndarray]] = field(default_factory=dict)

    def lookup(self, dictionary: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(dense ids, hashes) of every entry of an Arrow string dictionary.

        pyarrow hands every batch a new copy of the file's dictionary, so the cache finds
        a dictionary by its length and an order-sensitive sum of its entries' hashes, and
        a hit counts only when the cached dictionary is equal entry by entry (hashes
        can collide). At most :data:`DICTIONARY_CACHE` dictionaries are kept.
        """
        hashes = string_hash(dictionary)
        weights = np.arange(1, len(hashes) + 1, dtype=np.uint64)
        key = (len(hashes), int(np.sum(hashes * weights, dtype=np.uint64)))
        cached = self._seen.get(key)
        if cached is not None and cached[0].equals(dictionary):
            return cached[1], hashes
        ids = np.array([self.ids.setdefault(s, len(self.ids)) for s in dictionary.to_pylist()], dtype=np.int64)
        if len(self._seen) >= DICTIONARY_CACHE:
            self._seen.pop(next(iter(self._seen)))
        self._seen[key] = (dictionary, ids)
        return ids, hashes

    def names(self) -> list[str]:
        out = [""] * len(self.ids)
        for name, i in self.ids.items():
            out[i] = name
        return out


# -- planning (driver) --------------------------------------------------------------------


def plan_direct(spark: SparkSession, path: str, tasks: int | None = None) -> tuple[DirectPlan | None, str]:
    """How to read the Delta table at ``path`` directly, or ``(None, reason)`` when it
    cannot be (the caller then uses :func:`citylake.forecast.ar_spark.fit_ar`).

    The table's current files come from its Delta log, read with the ``deltalake``
    package (not from Spark: a DataFrame of the table that is cached elsewhere in the
    job lists no files). Direct reading needs plain Parquet files (no deletion vectors,
    no column mapping), the fit's columns stored in the files (not partition columns),
    and a local file system (object stores need credentials in every worker; use
    ``fit_ar`` there). ``tasks``: reading tasks (default: Spark's default parallelism,
    at most :data:`MAX_TASKS`); more when the table has over :data:`MAX_ROWS_PER_TASK`
    rows per task, and no direct plan when that would take more than :data:`MAX_TASKS`.
    """
    from deltalake import DeltaTable

    scheme = path.split("://", 1)[0] if "://" in path else "file"
    if scheme not in LOCAL_SCHEMES:  # checked first: opening a remote log may wait on credentials
        return None, f"the table is on {scheme}:// (direct reading is for local file systems)"
    try:
        table = DeltaTable(path)
        protocol, metadata = table.protocol(), table.metadata()
        names = set(table.schema().to_arrow().names)
        files = tuple(table.file_uris())
        actions = table.get_add_actions(flatten=True)
        counts = np.array(actions.column("num_records").to_pylist(), np.float64)
        sizes = np.array(actions.column("size_bytes").to_pylist(), np.float64)
    except Exception as exc:  # any table delta-rs cannot open is read by Spark instead
        return None, f"the deltalake package cannot read the table ({type(exc).__name__}: {exc})"
    features = set(protocol.reader_features or []) | set(protocol.writer_features or [])
    configuration = metadata.configuration or {}
    if "columnMapping" in features or configuration.get("delta.columnMapping.mode", "none") != "none":
        return None, "the table uses column mapping"
    if "deletionVectors" in features or configuration.get("delta.enableDeletionVectors") == "true":
        return None, "the table may hold deletion vectors"
    value_column = "value_clean" if "value_clean" in names else "value"
    required = {"sensor_id", "metric", "ts", value_column}
    if not required <= names:
        return None, f"the table lacks {sorted(required - names)}"
    columns = tuple(c for c in ("sensor_id", "metric", "region", "ts", value_column, "is_gap", "is_filled")
                    if c in names)
    partitioned = set(metadata.partition_columns or []) & set(columns)
    if partitioned:
        return None, f"fit columns {sorted(partitioned)} are partition columns"
    schemes = {f.split("://", 1)[0] if "://" in f else "file" for f in files}
    if not schemes <= set(LOCAL_SCHEMES):
        return None, f"files on {sorted(schemes)} (direct reading is for local file systems)"
    # A file without a row count in the log counts one row per 8 bytes (Parquet of the
    # bench's table takes 8.3 bytes per row, so this over- rather than underestimates).
    rows = int(np.where(np.isfinite(counts), counts, sizes / 8).sum()) if len(counts) else 0
    wanted = int(tasks) if tasks else min(int(spark.sparkContext.defaultParallelism), MAX_TASKS)
    n = max(1, wanted, -(-rows // MAX_ROWS_PER_TASK))
    if n > MAX_TASKS:
        return None, (f"{rows:,} rows need {n} reading tasks of at most {MAX_ROWS_PER_TASK:,} rows, "
                      f"more than {MAX_TASKS}")
    return DirectPlan(files, value_column, columns, n), "ok"


# -- reading (each task) ------------------------------------------------------------------


def string_hash(strings: pa.Array) -> np.ndarray:
    """64-bit hash of each UTF-8 string (nulls hash to 0), the same in every process.

    A polynomial hash over the bytes (vectorised, no Python call per string) followed by a
    multiplicative mix. It deals series to reading tasks (a collision only puts two series
    in the same task) and finds cached dictionaries (checked by content); it never
    identifies a series.
    """
    strings = strings.cast(pa.string())
    n = len(strings)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(strings.buffers()[1], np.int32, n + 1, strings.offset * 4)  # offset in bytes
    data_buffer = strings.buffers()[2]
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    data = data[offsets[0] : offsets[-1]].astype(np.uint64)
    starts = (offsets[:-1] - offsets[0]).astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    out = np.zeros(n, np.uint64)
    if data.size:
        position = np.arange(data.size) - np.repeat(starts, lengths)
        powers = np.cumprod(np.r_[np.uint64(1), np.full(int(lengths.max()), _HASH_MULTIPLIER)])
        terms = (data + np.uint64(1)) * powers[position]
        nonempty = lengths > 0
        out[nonempty] = np.add.reduceat(terms, starts[nonempty])
    out = (out ^ (out >> np.uint64(29))) * _MIX
    out[pc.is_null(strings).to_numpy(zero_copy_only=False)] = 0
    return out ^ (out >> np.uint64(32))


def _dictionary(column: pa.Array) -> pa.DictionaryArray:
    if pa.types.is_dictionary(column.type):
        return column
    return pc.dictionary_encode(column)


def _indices(column: pa.DictionaryArray) -> np.ndarray:
    return column.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class _TaskRows:
    """The rows one task keeps, as growing lists of numpy arrays."""

    sensors: _Dictionary = field(default_factory=_Dictionary)
    metrics: _Dictionary = field(default_factory=_Dictionary)
    regions: _Dictionary = field(default_factory=_Dictionary)
    parts: list[tuple[np.ndarray, ...]] = field(default_factory=list)


def _numpy(column: pa.Array, null: object) -> np.ndarray:
    """A numpy view of ``column`` (a copy with ``null`` for nulls when it has any)."""
    if column.null_count:
        column = column.fill_null(null)
    return column.to_numpy(zero_copy_only=False)


def _read_batch(batch: pa.RecordBatch, rows: _TaskRows, plan: DirectPlan, share: int,
                intervals: Mapping[str, int], use_filled: bool, ts_max: int | None,
                metrics: frozenset[str] | None) -> None:
    """Keep the batch's usable rows of this task's series (the rules of
    :func:`citylake.forecast.ar_spark.prepare_series`). Per-row work is a few gathers:
    the share and metric tests are made once per dictionary entry pair."""
    names = batch.schema.names
    if not {"sensor_id", "metric", "ts", plan.value_column} <= set(names):
        return  # a file from before the column existed: Spark reads it as null, unusable
    sensor = _dictionary(batch.column("sensor_id"))
    metric = _dictionary(batch.column("metric"))
    sensor_ids, sensor_hash = rows.sensors.lookup(sensor.dictionary)
    metric_ids, metric_hash = rows.metrics.lookup(metric.dictionary)
    metric_names = metric.dictionary.to_pylist()
    allowed = np.array([m in intervals and (metrics is None or m in metrics) for m in metric_names], bool)
    if plan.tasks > 1:
        mixed = (sensor_hash[:, None] * _HASH_MULTIPLIER) ^ metric_hash[None, :]
        mine = ((mixed ^ (mixed >> np.uint64(31))) % np.uint64(plan.tasks)) == share
        pair_ok = (mine & allowed[None, :]).ravel()
    else:
        pair_ok = np.broadcast_to(allowed, (len(sensor_ids), len(metric_ids))).ravel()
    si, mi = _indices(sensor), _indices(metric)
    keep = pair_ok[si * len(metric_ids) + mi]
    for labels in (sensor, metric):
        if labels.null_count:
            keep &= labels.is_valid().to_numpy(zero_copy_only=False)
    ts = batch.column("ts")
    if ts.null_count:
        keep &= ts.is_valid().to_numpy(zero_copy_only=False)
    picked = np.flatnonzero(keep)
    if not picked.size:
        return
    y = _numpy(batch.column(plan.value_column).cast(pa.float64()), np.nan)[picked]
    usable = ~np.isnan(y)
    for flag, applies in (("is_gap", True), ("is_filled", not use_filled)):
        if applies and flag in names:
            usable &= ~_numpy(batch.column(flag), False)[picked]
    raw = _numpy(ts.cast(pa.int64()), 0)[picked]
    per_second = _PER_SECOND[ts.type.unit]
    if ts_max is not None:  # Spark compares microseconds (a ns timestamp floored to us)
        if per_second >= 1_000_000:
            usable &= raw // (per_second // 1_000_000) <= ts_max
        else:
            usable &= raw <= ts_max // (1_000_000 // per_second)
    if not usable.all():
        picked, y, raw = picked[usable], y[usable], raw[usable]
    interval = np.array([intervals.get(m, 0) for m in metric_names], np.int64)[mi[picked]]
    if "region" in names:
        region = _dictionary(batch.column("region"))
        region_ids, _ = rows.regions.lookup(region.dictionary)
        region_row = np.append(region_ids, -1)[np.where(_numpy(region.is_valid(), False)[picked],
                                                        _indices(region)[picked], -1)]
    else:
        region_row = np.full(picked.size, -1, np.int64)
    rows.parts.append((sensor_ids[si[picked]].astype(np.int32), metric_ids[mi[picked]].astype(np.int32),
                       region_row.astype(np.int32), raw // per_second // interval, y))


def _fit_rows(rows: _TaskRows, spec: ar_spark.FitSpec, intervals: Mapping[str, int]) -> pa.Table:
    """Fit every series kept by one task; one row of ``FIT_SCHEMA`` per series."""
    if not rows.parts:
        empty = pa.array([], pa.string())
        labels = {"sensor_id": empty, "metric": empty, "region": empty, "interval_s": pa.array([], pa.int64())}
        return ar_spark.fit_table(labels, ar.combine_fits([], 0, 0), np.zeros(0, np.int64))
    sensor, metric, region, step, y = (np.concatenate(c) for c in zip(*rows.parts))
    rows.parts.clear()
    n_metrics = len(rows.metrics.ids)
    code = sensor.astype(np.int64) * n_metrics + metric
    if len(rows.sensors.ids) * n_metrics <= 4 * len(code) + 1024:  # a dense table of codes is small
        present = np.bincount(code, minlength=len(rows.sensors.ids) * n_metrics) > 0
        row_series = (np.cumsum(present) - 1)[code]
        n_series = int(present.sum())
    else:
        _, row_series = np.unique(code, return_inverse=True)
        n_series = int(row_series.max()) + 1
    first, last, label_row = ar_spark.series_extent(row_series, n_series, step)
    spans = last - first + 1
    group_of_series = np.zeros(n_series, np.int64)
    groups = ar_spark._series_groups(spans, ar_spark.MAX_MATRIX_CELLS)
    for g, members in enumerate(groups):
        group_of_series[members] = g
    row_group = group_of_series[row_series]
    if len(groups) <= 8:  # a mask per group is cheaper than sorting the rows
        slot = {g: np.flatnonzero(row_group == g) for g in range(len(groups))}
    else:
        order = np.argsort(row_group, kind="stable")
        bounds = np.searchsorted(row_group[order], np.arange(len(groups) + 1))
        slot = {g: order[bounds[g]:bounds[g + 1]] for g in range(len(groups))}

    def matrix_of(series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        picked = slot[int(group_of_series[series[0]])]
        width = int(spans[series].max())
        position = np.full(n_series, -1)
        position[series] = np.arange(len(series))
        s = row_series[picked]
        flat = position[s] * width + (width - 1 - (last[s] - step[picked]))
        matrix = np.full(len(series) * width, np.nan)
        matrix[flat] = y[picked]
        if np.count_nonzero(~np.isnan(matrix)) != len(picked):  # a duplicated step: keep the larger
            matrix[:] = np.nan
            np.fmax.at(matrix, flat, y[picked])
        return matrix.reshape(len(series), width), last[series] - width + 1

    fit, base = ar_spark.fit_groups(spans, matrix_of, spec)
    sensor_names = np.array(rows.sensors.names(), dtype=object)
    metric_names = np.array(rows.metrics.names(), dtype=object)
    region_names = np.array(rows.regions.names() + [None], dtype=object)  # -1: no region
    labels = {
        "sensor_id": pa.array(sensor_names[sensor[label_row]], pa.string()),
        "metric": pa.array(metric_names[metric[label_row]], pa.string()),
        "region": pa.array(region_names[region[label_row]], pa.string()),
        "interval_s": pa.array(np.array([intervals.get(m, 0) for m in rows.metrics.names()],
                                        np.int64)[metric[label_row]], pa.int64()),
    }
    return ar_spark.fit_table(labels, fit, base)


def _file_batches(uri: str, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    filesystem, path = pafs.FileSystem.from_uri(uri)
    with filesystem.open_input_file(path) as handle:
        # INT96 (Spark's default timestamp encoding) read as microseconds, like Spark: as
        # nanoseconds pyarrow would wrap dates outside 1677-2262 silently.
        parquet = pq.ParquetFile(handle, read_dictionary=[c for c in ("sensor_id", "metric", "region")
                                                          if c in columns],
                                 coerce_int96_timestamp_unit="us")
        present = [c for c in columns if c in parquet.schema_arrow.names]
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=present)


def fit_share(plan: DirectPlan, share: int, spec: ar_spark.FitSpec, intervals: Mapping[str, int],
              use_filled: bool = True, ts_max: int | None = None,
              metrics: Sequence[str] | None = None) -> pa.Table:
    """One reading task: read every file of ``plan``, keep series of hash share ``share``
    (0 <= share < plan.tasks), fit them. ``ts_max``: keep ``ts <= ts_max`` (epoch
    microseconds). Returns rows of :data:`citylake.forecast.ar_spark.FIT_SCHEMA`."""
    rows = _TaskRows()
    wanted = frozenset(metrics) if metrics else None
    for uri in plan.files:
        for batch in _file_batches(uri, plan.columns):
            _read_batch(batch, rows, plan, share, intervals, use_filled, ts_max, wanted)
    return _fit_rows(rows, spec, intervals)


# -- public Spark API ---------------------------------------------------------------------


def _epoch_us(ts: dt.datetime) -> int:
    """Microseconds since 1970 of an aware datetime."""
    delta = ts - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def fit_ar_table(
    spark: SparkSession,
    path: str,
    p: int = ar_spark.DEFAULT_ORDER,
    candidates: Sequence[int] | None = None,
    criterion: str = "aic",
    intervals: Mapping[str, int] | None = None,
    use_filled: bool = True,
    max_steps: int | None = None,
    fitted_ts: Column | None = None,
    ts_max: dt.datetime | None = None,
    metrics: Sequence[str] | None = None,
    tasks: int | None = None,
    reader: str = "auto",
) -> DataFrame:
    """AR models of every series of the Delta table at ``path`` (silver or gold).

    The same result as ``fit_ar(table filtered to ts <= ts_max and metric in metrics)``
    (see that function for ``p``, ``candidates``, ``criterion``, ``intervals``,
    ``use_filled``, ``max_steps``, ``fitted_ts``). ``ts_max``: inclusive cutoff (naive =
    UTC). ``metrics``: only these (None or empty: all). ``reader``: "auto" reads the files
    directly when :func:`plan_direct` allows it and falls back to ``fit_ar`` otherwise;
    "spark" always uses ``fit_ar``. ``tasks``: direct reading tasks (default: one per core).
    """
    spec = ar_spark.fit_spec(p, candidates, criterion, max_steps)
    if reader not in ("auto", "spark"):
        raise ValueError(f"reader must be 'auto' or 'spark', got {reader!r}")
    if ts_max is not None and ts_max.tzinfo is None:  # naive means UTC, not the driver's local time
        ts_max = ts_max.replace(tzinfo=dt.timezone.utc)
    plan, reason = plan_direct(spark, path, tasks) if reader == "auto" else (None, "reader 'spark' configured")
    if plan is None:
        log.info("AR: Spark reader (%s)", reason)
        df = spark.read.format("delta").load(path)
        if ts_max is not None:
            df = df.where(F.col("ts") <= F.lit(ts_max))
        if metrics:
            df = df.where(F.col("metric").isin(list(metrics)))
        return ar_spark.fit_ar(df, p, candidates, criterion, intervals=intervals, use_filled=use_filled,
                               max_steps=max_steps, fitted_ts=fitted_ts)
    log.info("AR: direct reader, %d files in %d tasks", len(plan.files), plan.tasks)
    grid = dict(intervals or ar_spark._catalogue_intervals())
    cutoff = _epoch_us(ts_max) if ts_max is not None else None
    wanted = tuple(metrics) if metrics else None

    def fit_udf(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for share in batch.column(0).to_pylist():
                yield from fit_share(plan, share, spec, grid, use_filled, cutoff, wanted).to_batches()

    shares = spark.range(plan.tasks, numPartitions=plan.tasks)
    fitted = shares.mapInArrow(fit_udf, ar_spark.FIT_SCHEMA)
    return ar_spark.finish_fit(fitted, spec, fitted_ts)
