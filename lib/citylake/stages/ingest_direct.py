"""The direct ingest of one batch: CSV files parsed with pyarrow, tables written with delta-rs.

Same contract, same tables and the same rows as the Spark path in
:mod:`citylake.stages.ingest` (``tests/test_ingest_direct.py`` compares the two on the
sample city, every bad-record kind included). Why it exists: Spark's per-row work
(text lines, ``from_csv``, the duplicate aggregate, the partitioned Delta write) cost
~7x a plain CSV-to-Parquet copy, and pyarrow parses the same files several times faster
(``bench/RESULTS.md``, session 12).

How a batch runs:

1. CSV files are split on commas by pyarrow, one thread per core. Rows the narrow test
   of :func:`citylake.transforms.arrow_records.accept_csv_rows` accepts become readings
   here; every other line (quoted, short, long, bad in any way) goes to Spark as raw text.
2. Spark types those lines, and every JSON and Parquet file, with the one set of record
   rules (``records.type_records``); the result (few rows: mostly rejects) is collected.
3. Exact duplicates are collapsed and readings already in bronze dropped, in Arrow.
4. quarantine, bronze, rejected files and the log row are appended by delta-rs, each with
   the batch's Delta ``txn`` id, exactly as the Spark path writes them: a batch resumed by
   either path after a crash never appends twice.

The direct path is taken for local lakes whose tables delta-rs can write (checked in
:func:`unsupported_reason`), and for batches small enough for the driver's memory
(``ingest.direct_max_mb``: the peak is several times the text); anything else runs on the Spark path.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.dataset as ds

from citylake.lake import Lake, RawFile, local_file_path
from citylake.transforms import arrow_records as A
from citylake.transforms import records as R

log = logging.getLogger(__name__)

#: Tables the ingest writes; all must be writable by delta-rs for the direct path.
TABLES = ("sensors", "ingest_files", "quarantine", "bronze_readings", "ingest_rejected_files", "ingest_log")
#: Compressed files (gzip, Parquet) count this many times their size towards
#: ``direct_max_mb``: what they hold is larger in memory than on disk.
COMPRESSED_EXPANSION = 8
ACCEPTED_SCHEMA = pa.schema([
    ("sensor_id", pa.string()), ("metric", pa.string()), ("ts", A.TS_TYPE), ("value", pa.float64()),
    ("reading_date", pa.date32()), ("extra_json", pa.string()), ("file_index", pa.int32()),
])


def unsupported_reason(lake: Lake) -> str | None:
    """Why the direct path cannot write this lake's ingest tables (None: it can)."""
    if lake.config.ingest.reader == "spark":
        return "ingest.reader is spark"
    if lake.config.ingest.reader != "auto":
        raise ValueError(f"ingest.reader must be auto or spark, not {lake.config.ingest.reader!r}")
    if lake.local_path("bronze_readings") is None:
        return f"the lake is not on the local file system ({lake.root})"
    from deltalake import DeltaTable

    for table in TABLES:
        if not lake.exists(table):
            continue  # created by citylake when first needed, with a protocol delta-rs writes
        try:
            protocol = DeltaTable(lake.local_path(table)).protocol()
        except Exception as exc:  # noqa: BLE001 - any table delta-rs cannot open is Spark's
            return f"the deltalake package cannot open {table} ({type(exc).__name__}: {exc})"
        # Reader 1 / writer 2 is what citylake creates (NOT NULL columns); a table
        # upgraded since (deletion vectors, column mapping...) is left to Spark.
        if protocol.min_reader_version > 1 or protocol.min_writer_version > 2:
            return (f"{table} has Delta protocol reader {protocol.min_reader_version} / "
                    f"writer {protocol.min_writer_version}")
    return None


def too_large_reason(lake: Lake, files: list[RawFile]) -> str | None:
    """Why this batch is too large to hold in the driver's memory (None: it is not)."""
    estimate = sum(f.size * (COMPRESSED_EXPANSION if f.path.endswith((".gz", ".parquet")) else 1) for f in files)
    limit = lake.config.ingest.direct_max_mb * 1024 * 1024
    if estimate > limit:
        return f"the batch holds ~{estimate / 2**20:.0f} MB of text (ingest.direct_max_mb: {limit / 2**20:.0f})"
    return None


def append_rows(lake: Lake, table: str, rows: list[tuple], txn: tuple[str, int]) -> None:
    """Append plain rows (in the table's column order) with delta-rs."""
    schema = lake.arrow_schema(table)
    data = pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema)
    lake.append_arrow(table, data, txn=txn)


# -- reading CSV files ------------------------------------------------------------------------
def _read_csv_file(path: str, width: int) -> tuple[pa.Table, list[str]]:
    """The data lines of one CSV file split on every comma: rows of ``width`` fields as
    string columns ``c0..``, and the raw text of lines with another number of fields."""
    odd_lines: list[str] = []

    def keep_text(row) -> str:
        odd_lines.append(row.text)
        return "skip"

    table = pcsv.read_csv(
        local_file_path(path),  # a .gz name is decompressed by pyarrow
        read_options=pcsv.ReadOptions(column_names=[f"c{i}" for i in range(width)], skip_rows=1,
                                      use_threads=False),
        parse_options=pcsv.ParseOptions(quote_char=False, escape_char=False, newlines_in_values=False,
                                        ignore_empty_lines=True, invalid_row_handler=keep_text),
        convert_options=pcsv.ConvertOptions(column_types={f"c{i}": pa.string() for i in range(width)},
                                             strings_can_be_null=False, quoted_strings_can_be_null=False),
    )
    return table, odd_lines


class SourceFiles:
    """The batch's source files by index: readings carry a ``file_index`` into these
    instead of two strings per row, until bronze is written."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.formats: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, path: str, source_format: str) -> int:
        if path not in self._index:
            self._index[path] = len(self.paths)
            self.paths.append(path)
            self.formats.append(source_format)
        return self._index[path]

    def index_of(self, source_file: pa.Array, source_format: pa.Array) -> pa.Array:
        """``file_index`` for rows that carry their lineage as strings (Spark's rows)."""
        pairs = pa.table({"f": source_file, "s": source_format}).group_by(["f", "s"]).aggregate([])
        for row in pairs.to_pylist():
            self.add(row["f"], row["s"])
        return pc.index_in(source_file, value_set=pa.array(self.paths, pa.string())).cast(pa.int32())

    def lineage(self, file_index, encoded: bool = False) -> dict[str, pa.Array]:
        """``source_file`` and ``source_format`` of each row; ``encoded``: as dictionary
        arrays over the batch's files (no copy per row; for delta-rs, not for Spark)."""
        columns = {"source_file": pa.array(self.paths, pa.string()), "source_format": pa.array(self.formats, pa.string())}
        if encoded:
            index = file_index.combine_chunks() if isinstance(file_index, pa.ChunkedArray) else file_index
            return {name: pa.DictionaryArray.from_arrays(index, values) for name, values in columns.items()}
        return {name: A.take_chunked(values, file_index) for name, values in columns.items()}


def accept_csv_group(lake: Lake, paths: list[str], header: tuple[str, ...], header_lines: list[str], required: list[str],
                     rules: A.AcceptRules, files: SourceFiles, threads: int
                     ) -> tuple[list[pa.Table], pa.Table, list[str]]:
    """Read and pre-filter the CSV files of one header shape, ``threads`` files at a time.

    Returns (accepted readings per file, with ``file_index``; the lines left to Spark,
    with ``file_index`` and ``raw_record``; paths pyarrow could not read, which Spark
    reads instead: corrupt gzip, invalid UTF-8... so they are judged, or rejected,
    exactly as on the Spark path).
    """
    indexes = [files.add(lake.file_uri(path), "csv") for path in paths]

    def one_file(i: int):
        index = np.int32(indexes[i])
        try:
            rows, odd_lines = _read_csv_file(paths[i], len(header))
            rows = rows.append_column("file_index", pa.array(np.full(rows.num_rows, index, np.int32)))
            accepted, rest = A.accept_csv_rows(rows, header, header_lines, required, rules)
        except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
            # Unreadable here (corrupt gzip, invalid UTF-8) or a column past 2 GiB.
            log.debug("pyarrow cannot read %s (%s); Spark reads it", paths[i], exc)
            return None
        if odd_lines:
            rest = pa.concat_tables([rest, pa.table({
                "file_index": pa.array(np.full(len(odd_lines), index, np.int32)),
                "raw_record": pa.array(odd_lines, pa.string())})])
        return accepted, rest

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(one_file, range(len(paths))))
    unread = [paths[i] for i, r in enumerate(results) if r is None]
    done = [r for r in results if r is not None]
    rest_schema = pa.schema([("file_index", pa.int32()), ("raw_record", pa.string())])
    rest = pa.concat_tables([r[1] for r in done]) if done else rest_schema.empty_table()
    return [r[0] for r in done], rest, unread


# -- the batch ---------------------------------------------------------------------------------
def _partition_filter(dates: list[dt.date], batch_id: int):
    return ds.field("reading_date").isin(pa.array(dates, pa.date32())) & (ds.field("batch_id") != batch_id)


def ingest_batch(lake: Lake, batch_id: int, files: list[RawFile], now: dt.datetime,
                 registry_version: int | None):
    """Ingest one claimed batch on the direct path; same result as the Spark path's
    :func:`citylake.stages.ingest.ingest_batch`, and safe to call again."""
    from citylake.stages import ingest as I

    started = time.monotonic()
    groups = I._classify(lake, files)
    required = lake.catalogue.required_fields
    version = registry_version if registry_version is not None and registry_version >= 0 else None
    known = lake.read_arrow("sensors", ["sensor_id"], version=version).column("sensor_id")
    rules = A.AcceptRules.build(lake.catalogue, known, now)
    threads = max(1, lake.spark.sparkContext.defaultParallelism)

    sources = SourceFiles()
    accepted_parts: list[pa.Table] = []
    left_over: dict[tuple[str, ...], pa.Table] = {}
    spark_groups = I._FileGroups(json=groups.json, parquet=groups.parquet, rejected=groups.rejected,
                                 csv_header_lines=groups.csv_header_lines)
    for header, paths in groups.csv.items():
        accepted, rest, unread = accept_csv_group(lake, paths, header, sorted(groups.csv_header_lines[header]),
                                                  required, rules, sources, threads)
        if unread:
            spark_groups.csv[header] = unread
        accepted_parts += accepted
        if rest.num_rows:
            lineage = sources.lineage(rest.column("file_index"))
            left_over[header] = pa.table({**lineage, "raw_record": rest.column("raw_record")})
    fast_rows = sum(t.num_rows for t in accepted_parts)

    staged = _spark_typed(lake, spark_groups, left_over, now, registry_version)
    rejected_rows = pc.is_valid(staged.column("quarantine_reason"))
    by_reason = {k["values"]: int(k["counts"]) for k in
                 pc.value_counts(pc.filter(staged.column("quarantine_reason"), rejected_rows)).to_pylist()}
    slow = staged.filter(pc.invert(rejected_rows))
    slow_accepted = pa.table({
        **{c: slow.column(c) for c in ("sensor_id", "metric", "ts")},
        # + 0.0: -0.0 becomes 0.0, as in Spark's duplicate aggregate (a grouping key).
        "value": pc.add(slow.column("value"), 0.0),
        **{c: slow.column(c) for c in ("reading_date", "extra_json")},
        "file_index": sources.index_of(slow.column("source_file"), slow.column("source_format")),
    })
    accepted_all = pa.concat_tables([t.cast(ACCEPTED_SCHEMA) for t in [*accepted_parts, slow_accepted]])
    raw_rows = fast_rows + staged.num_rows
    quarantined = staged.num_rows - slow_accepted.num_rows
    reading_dates = sorted(pc.unique(accepted_all.column("reading_date")).to_pylist())

    source_files = pa.array(sources.paths, pa.string())
    unique, dup_in_batch = A.collapse_exact_duplicates(accepted_all, source_files,
                                                       pa.array(sources.formats, pa.string()))
    existing = (lake.read_arrow("bronze_readings", A.READING_KEY, filter=_partition_filter(reading_dates, batch_id))
                if reading_dates else None)
    found = A.in_lake(unique, existing) if existing is not None else np.zeros(unique.num_rows, bool)
    new_rows = unique.filter(pa.array(~found))
    bronze = new_rows.drop_columns(["file_index"])
    for name, column in sources.lineage(new_rows.column("file_index"), encoded=True).items():
        bronze = bronze.append_column(name, column)
    accepted, dup_of_lake = bronze.num_rows, int(found.sum())
    if raw_rows != accepted + quarantined + dup_in_batch + dup_of_lake:
        raise I.IngestError(
            f"batch {batch_id}: accounting broken: raw {raw_rows} != accepted {accepted} + "
            f"quarantined {quarantined} + duplicates {dup_in_batch + dup_of_lake}")

    def stamped(table: pa.Table) -> pa.Table:
        n = table.num_rows
        table = table.append_column("batch_id", pa.array(np.full(n, batch_id, np.int64)))
        return table.append_column("ingest_ts", pa.array(np.full(n, A.epoch_us(now), np.int64)).cast(A.TS_TYPE))

    if quarantined:
        lake.append_arrow("quarantine", stamped(staged.filter(rejected_rows)), txn=(f"{I.TXN_PREFIX}.quarantine", batch_id))
    if not lake.append_arrow("bronze_readings", stamped(bronze), txn=(f"{I.TXN_PREFIX}.bronze", batch_id),
                             user_metadata=f"{I.TXN_PREFIX}.bronze batch {batch_id}"):
        log.info("batch %d: bronze append was already committed; counted it again", batch_id)
    if groups.rejected:
        append_rows(lake, "ingest_rejected_files",
                    [(batch_id, p, reason, detail, now) for p, (reason, detail) in sorted(groups.rejected.items())],
                    txn=(f"{I.TXN_PREFIX}.rejected", batch_id))
    return I.BatchReport(
        batch_id=batch_id, files=len(files), rejected_files=len(groups.rejected), raw_rows=raw_rows,
        accepted=accepted, quarantined=quarantined, duplicates_in_batch=dup_in_batch,
        duplicates_of_lake=dup_of_lake, reading_dates=reading_dates, seconds=time.monotonic() - started,
        quarantine_by_reason=dict(sorted(by_reason.items())),
        rejected={p: r for p, (r, _) in groups.rejected.items()}, path="direct",
    )


def _spark_typed(lake: Lake, groups, csv_lines: dict[tuple[str, ...], pa.Table], now: dt.datetime,
                 registry_version: int | None) -> pa.Table:
    """The records only Spark can judge (CSV left-overs, JSON, Parquet, unread CSV files),
    typed and checked by ``records.type_records``, as one Arrow table of staged records."""
    from citylake.stages import ingest as I

    empty = _STAGED_SCHEMA.empty_table()
    if not (groups.csv or groups.json or groups.parquet or csv_lines):
        return empty
    known = I._known_sensors(lake, registry_version)
    lines = {h: lake.spark.createDataFrame(t) for h, t in csv_lines.items()}
    for attempt in (1, 2):
        records = I._records(lake, groups, lines)
        if records is None:
            return empty
        staged = R.staged_records(R.type_records(records, lake.catalogue, known, now))
        try:
            return staged.toArrow().cast(_STAGED_SCHEMA)
        except Exception:
            if attempt == 2 or I._isolate_unreadable(lake, groups) == 0:
                raise
            log.warning("some files failed mid-read; rejected them and re-reading the batch")
    raise AssertionError("unreachable")


_STAGED_SCHEMA = pa.schema([
    ("source_file", pa.string()), ("source_format", pa.string()), ("raw_record", pa.string()),
    ("sensor_id", pa.string()), ("metric", pa.string()), ("ts_raw", pa.string()), ("value_raw", pa.string()),
    ("extra_json", pa.string()), ("ts", A.TS_TYPE), ("value", pa.float64()), ("reading_date", pa.date32()),
    ("quarantine_reason", pa.string()), ("quarantine_detail", pa.string()),
])
