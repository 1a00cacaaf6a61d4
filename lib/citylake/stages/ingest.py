"""Ingest stage: raw landing files -> bronze readings, quarantine and the ingest log.

How a run works (and why it is safe to re-run, or to run after a crash):

1. The sensor registry is synced from ``raw/sensors`` (type-2 history).
2. Planning: files under ``raw/readings`` that no batch has claimed yet are claimed by a
   new batch in ``ingest_files`` *before* any data is written. Late files for old dates
   are simply new files. A batch claimed but never logged (the job died) is resumed
   first, with exactly the same files.
3. Each data table is appended with Delta's idempotent-write options
   (``txnAppId``/``txnVersion`` = batch id), so a resumed batch never appends twice.
4. ``ingest_log`` is written last: a batch is complete iff it has a log row.

For every batch: raw rows = accepted + quarantined + duplicates (exact duplicates in the
batch, or of readings already in bronze). The stage checks it and fails loudly if not.

Two paths run this contract: the direct path (:mod:`citylake.stages.ingest_direct`:
pyarrow and delta-rs, for local lakes; the default) and the Spark path below (every step a
Spark job; object stores, HDFS, tables delta-rs cannot write, very large batches, or
``ingest.reader: spark``). Both write the same rows (``tests/test_ingest_direct.py``).
"""

from __future__ import annotations

import csv
import hashlib
import datetime as dt
import logging
import re
import time
from functools import reduce
from dataclasses import dataclass, field

import pyarrow.compute as pc
import pyarrow.dataset as ds
from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F

from citylake.errors import CitylakeError
from citylake.lake import Lake, RawFile, in_list
from citylake.stages import ingest_direct
from citylake.transforms import records as R
from citylake.transforms.registry import invalid_registry_rows, registry_history, registry_rows

log = logging.getLogger(__name__)

TXN_PREFIX = "citylake.ingest"


class IngestError(CitylakeError):
    """Ingest cannot go on; the message says what to fix."""


@dataclass
class BatchReport:
    """Counts for one ingest batch (rows are raw records)."""

    batch_id: int
    files: int
    rejected_files: int
    raw_rows: int
    accepted: int
    quarantined: int
    duplicates_in_batch: int
    duplicates_of_lake: int
    reading_dates: list[dt.date]
    seconds: float
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    #: Which ingest path ran the batch: "direct" (pyarrow + delta-rs) or "spark".
    path: str = "spark"

    @property
    def duplicates(self) -> int:
        return self.duplicates_in_batch + self.duplicates_of_lake


@dataclass
class IngestReport:
    """What one ``citylake ingest`` run did."""

    sensors_current: int
    registry_changed: bool
    batches: list[BatchReport]

    @property
    def totals(self) -> dict[str, int]:
        keys = ["files", "rejected_files", "raw_rows", "accepted", "quarantined", "duplicates"]
        return {k: sum(getattr(b, k) for b in self.batches) for k in keys}


def landed(lake: Lake):
    """Spark's reader for landed files: a path is a file name, never a glob pattern
    (``a[1].csv`` would otherwise match nothing, ``a?.csv`` other files too)."""
    return lake.spark.read.option("__globPaths__", "false")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(ts: dt.datetime | None) -> dt.datetime | None:
    """A naive datetime is taken as UTC."""
    return ts if ts is None or ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


# -- sensor registry ------------------------------------------------------------------------
_FILE_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")


def _effective_ts(f: RawFile) -> dt.datetime:
    """When a registry file takes effect: the date in its name, else its modification time."""
    match = _FILE_DATE.search(f.path.rsplit("/", 1)[-1])
    if match:
        try:
            return dt.datetime(*map(int, match.groups()), tzinfo=dt.timezone.utc)
        except ValueError:
            pass
    return f.mtime


def sync_registry(lake: Lake, direct: bool | None = None) -> tuple[int, bool]:
    """Rebuild the sensors history from every registry file; write it only if it changed.

    Returns (current sensors, changed). Raises :class:`IngestError` naming the file and
    sensors when a registry file breaks its contract (registries are curated by people:
    a clear stop beats guessing). ``direct``: write and count with delta-rs rather than
    Spark jobs (default: when the lake allows it, see :func:`direct_reason`).
    """
    if direct is None:
        direct = direct_reason(lake) is None
    spark = lake.spark
    required = [f["name"] for f in lake.catalogue.sensor_registry["required_fields"]]
    files = [f for f in lake.list_files(lake.raw_sensors)]
    if not files:
        log.warning("no sensor registry under %s: every reading will be quarantined as unknown_sensor",
                    lake.raw_sensors)
        return 0, False
    # The files' names, sizes and times, kept in the sensors commit: when they have not
    # changed since, the history cannot have either, and the rebuild is skipped.
    fingerprint = "registry-files:" + hashlib.sha256(
        "\n".join(f"{f.path}|{f.size}|{f.mtime.isoformat()}" for f in files).encode()).hexdigest()
    if lake.last_commit_metadata("sensors") == fingerprint:
        if direct:
            return int(pc.sum(lake.read_arrow("sensors", ["is_current"]).column("is_current")).as_py() or 0), False
        return lake.read("sensors").where("is_current").count(), False
    parts = []
    for f in files:
        if not f.path.lower().endswith((".csv", ".csv.gz")):
            raise IngestError(f"sensor registry file {f.path} is not CSV (.csv/.csv.gz)")
        raw = landed(lake).option("header", True).option("inferSchema", False).csv(f.path)
        missing = [c for c in required if c not in raw.columns]
        if missing:
            raise IngestError(f"sensor registry file {f.path} lacks column(s) {missing}")
        parts.append(raw.withColumns({"source_file": F.lit(f.path),
                                      "effective_ts": F.lit(_effective_ts(f))}))
    raw_all = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), parts)
    # Registries are small (one row per sensor and file): cached, the checks and the
    # history below are cheap jobs instead of re-reading every file for each.
    rows = registry_rows(raw_all, required).persist()
    repeated = rows.groupBy("source_file", "sensor_id").count().where("count > 1").limit(20).collect()
    bad = [] if repeated else invalid_registry_rows(rows).select(
        "source_file", "sensor_id", "region", "lat", "lon").collect()
    if repeated or bad:
        rows.unpersist()
    if repeated:
        listed = ", ".join(f"{r['sensor_id']} in {r['source_file']}" for r in repeated)
        raise IngestError(f"sensor registry lists a sensor twice in one file: {listed}")
    if bad:
        listed = "\n".join(f"  {r['source_file']}: sensor_id={r['sensor_id']!r} region={r['region']!r} "
                           f"lat={r['lat']} lon={r['lon']}" for r in bad[:20])
        raise IngestError(f"{len(bad)} invalid sensor registry row(s) (empty id/region or bad lat/lon):\n{listed}")
    history = registry_history(rows).persist()
    cols = lake.spec("sensors").column_names
    if lake.version("sensors") <= 0:  # created empty, never written: no comparison needed
        changed = True
    else:
        current = lake.read("sensors")
        changed = (history.count() != current.count()
                   or history.select(cols).exceptAll(current.select(cols)).limit(1).count() > 0)
    # The fingerprint is stored with every write, so unchanged files skip all of this next time.
    if direct:
        # A registry is small: collected, it is written without a Spark write job (~1 s).
        collected = lake.conform("sensors", history).toArrow()
        lake.overwrite_arrow("sensors", collected, user_metadata=fingerprint)
        n_current = int(pc.sum(collected.column("is_current")).as_py() or 0)
    else:
        lake.overwrite("sensors", history, user_metadata=fingerprint)
        n_current = history.where("is_current").count()
    if changed:
        log.info("sensor registry updated from %d file(s)", len(files))
    history.unpersist()
    rows.unpersist()
    return n_current, changed


# -- planning -------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """Files of one batch; ``resumed`` batches reuse their claim's time and registry."""

    batch_id: int
    files: list[RawFile]
    resumed: bool
    planned_ts: dt.datetime | None = None
    registry_version: int | None = None


def plan_batches(lake: Lake, date: dt.date | None = None, direct: bool | None = None) -> list[BatchPlan]:
    """Batches to run: unfinished claimed batches first (resume), then one or more new ones.

    ``date`` limits *new* files to the landing folder ``date=YYYY-MM-DD``; without it
    every folder is scanned, which is what picks up late files for old dates.
    A resumed batch keeps its claim's ingest time and sensor-registry version, so its
    records are judged exactly as in the attempt that died (some tables may already hold
    that attempt's rows). ``direct``: read the ingest tables with delta-rs rather than
    Spark jobs (default: when the lake allows it).
    """
    if direct is None:
        direct = direct_reason(lake) is None
    # Only what planning needs reaches the driver, in two small queries: the logged batch
    # ids (one row per batch), then the claims of unfinished batches plus the claims under
    # the folder being listed (ingest_files grows with every file ever landed; a daily
    # `--date` run should not collect all of it).
    if direct:
        logged = sorted(lake.read_arrow("ingest_log", ["batch_id"]).column("batch_id").to_pylist())
    else:
        logged = sorted(r["batch_id"] for r in lake.read("ingest_log").select("batch_id").collect())
    folder = lake.raw_readings + (f"/date={date.isoformat()}" if date else "")
    listed = lake.list_files(folder, lake.config.ingest.min_file_age_s)
    prefix = None  # claims of every folder when listed without a date
    if listed and date:
        # Claimed paths are stored as listed (fully qualified): cut the folder out of one.
        marker = f"/date={date.isoformat()}/"
        prefix = listed[0].path[: listed[0].path.index(marker) + len(marker)]
    columns = ["batch_id", "file_path", "file_size", "file_mtime", "planned_ts", "registry_version"]
    if direct:
        wanted = ~ds.field("batch_id").isin(logged) if logged else None
        if listed:
            in_folder = ds.scalar(True) if prefix is None else pc.starts_with(ds.field("file_path"), prefix)
            wanted = in_folder if wanted is None else wanted | in_folder
        claimed = lake.read_arrow("ingest_files", columns, filter=wanted).to_pylist()
    else:
        unfinished_or_listed = ~in_list("batch_id", logged)
        if listed:
            in_folder = F.lit(True) if prefix is None else F.col("file_path").startswith(prefix)
            unfinished_or_listed = unfinished_or_listed | in_folder
        claimed = lake.read("ingest_files").where(unfinished_or_listed).select(*columns).collect()
    done = set(logged)
    plans: list[BatchPlan] = []
    unfinished: dict[int, BatchPlan] = {}
    for r in claimed:
        if r["batch_id"] in done:
            continue
        mtime = r["file_mtime"].replace(tzinfo=dt.timezone.utc) if r["file_mtime"] else None
        plan = unfinished.setdefault(r["batch_id"], BatchPlan(
            r["batch_id"], [], True, r["planned_ts"].replace(tzinfo=dt.timezone.utc), r["registry_version"]))
        plan.files.append(RawFile(r["file_path"], r["file_size"], mtime))
    for batch_id in sorted(unfinished):
        unfinished[batch_id].files.sort(key=lambda f: f.path)
        plans.append(unfinished[batch_id])

    seen = {r["file_path"]: r for r in claimed}
    # Every claimed batch is logged or unfinished, so this is above every id ever used.
    next_id = max([0, *logged, *unfinished]) + 1
    new_files = []
    for f in listed:
        old = seen.get(f.path)
        if old is None:
            new_files.append(f)
        elif old["file_size"] != f.size:
            log.warning("%s changed size after it was ingested (batch %s); it is not re-ingested: "
                        "land corrections as new files", f.path, old["batch_id"])
    step = lake.config.ingest.max_files_per_batch
    for i in range(0, len(new_files), step):
        plans.append(BatchPlan(next_id, new_files[i:i + step], False))
        next_id += 1
    return plans


def claim_files(lake: Lake, batch_id: int, files: list[RawFile], now: dt.datetime,
                registry_version: int | None = None, direct: bool = False) -> None:
    """Record that ``batch_id`` owns ``files`` (idempotent per batch); ``direct``: with
    delta-rs instead of a Spark job."""
    rows = [(batch_id, f.path, f.size, f.mtime, now, registry_version) for f in files]
    _append_rows(lake, "ingest_files", rows, (f"{TXN_PREFIX}.files", batch_id), direct)


def _append_rows(lake: Lake, table: str, rows: list[tuple], txn: tuple[str, int], direct: bool) -> None:
    if direct:
        ingest_direct.append_rows(lake, table, rows, txn)
    else:
        lake.append(table, lake.spark.createDataFrame(rows, lake.spec(table).struct()), txn=txn)


# -- reading files --------------------------------------------------------------------------
@dataclass
class _FileGroups:
    csv: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    #: The exact header lines seen per CSV header shape (quoting and BOM as in the file).
    csv_header_lines: dict[tuple[str, ...], set[str]] = field(default_factory=dict)
    json: list[str] = field(default_factory=list)
    parquet: dict[str, list[str]] = field(default_factory=dict)
    rejected: dict[str, tuple[str, str]] = field(default_factory=dict)


def _short(exc: BaseException) -> str:
    """A one-line reason from a (possibly Java) exception: its message and root cause."""
    lines = [ln.strip().lstrip(": ").strip() for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("An error occurred while calling", "at "))]
    head = lines[0] if lines else type(exc).__name__
    causes = [ln[len("Caused by: "):] for ln in lines if ln.startswith("Caused by: ")]
    return (head + (f" (cause: {causes[-1]})" if causes else ""))[:500]


def _classify(lake: Lake, files: list[RawFile]) -> _FileGroups:
    """Sort files by format and header/schema; reject what cannot be read at all."""
    groups = _FileGroups()
    required = lake.catalogue.required_fields
    formats = {f.path: lake.catalogue.format_of(f.path) for f in files}
    first_lines = lake.read_first_lines([p for p, fmt in formats.items() if fmt in ("csv", "json")])
    for f in files:
        fmt = formats[f.path]
        if fmt is None:
            groups.rejected[f.path] = ("unsupported_format", "suffix not in schemas/raw_reading.yaml formats")
        elif fmt == "parquet":
            try:
                # Magic bytes first: cheap, and spares the log a Spark stack trace per bad file.
                if not lake.has_parquet_magic(f.path):
                    groups.rejected[f.path] = ("unreadable_file", "not a Parquet file (no PAR1 magic at both ends)")
                    continue
                schema = landed(lake).parquet(f.path).schema
            except Exception as exc:  # noqa: BLE001 - any read failure means "not Parquet"
                groups.rejected[f.path] = ("unreadable_file", _short(exc))
                continue
            missing = [c for c in required if c not in schema.fieldNames()]
            if missing:
                groups.rejected[f.path] = ("missing_required_columns", f"missing {missing}")
            else:
                groups.parquet.setdefault(schema.json(), []).append(f.path)
        else:
            first = first_lines[f.path]
            if isinstance(first, Exception):  # corrupt compression, permissions...
                groups.rejected[f.path] = ("unreadable_file", _short(first))
                continue
            if "\x00" in (first or ""):
                groups.rejected[f.path] = ("unreadable_file", "binary content in a text format")
            elif fmt == "json":
                groups.json.append(f.path)
            elif not first or not first.strip():
                groups.rejected[f.path] = ("empty_file", "no CSV header line")
            else:
                header = tuple(h.strip() for h in next(csv.reader([first.lstrip("\ufeff")])))
                missing = [c for c in required if c not in header]
                # Spark resolves column names case-insensitively: `value,Value` is a repeat.
                folded = [h.lower() for h in header]
                repeated = sorted({h for h in header if folded.count(h.lower()) > 1})
                if "" in header or repeated:
                    groups.rejected[f.path] = ("bad_header", f"empty or repeated column names {repeated}")
                elif missing:
                    groups.rejected[f.path] = ("missing_required_columns", f"header lacks {missing}")
                else:
                    groups.csv.setdefault(header, []).append(f.path)
                    # Spark's text reader drops a byte-order mark from a file's first line;
                    # the header line is a header with or without one.
                    groups.csv_header_lines.setdefault(header, set()).update({first, first.lstrip("\ufeff")})
    return groups


def _text_lines(lake: Lake, paths: list[str], fmt: str) -> DataFrame:
    lines = landed(lake).text(paths).select(
        F.col("_metadata.file_path").alias("source_file"),
        F.lit(fmt).alias("source_format"),
        F.col("value").alias("raw_record"),
    )
    return _non_blank(lines)


def _non_blank(lines: DataFrame) -> DataFrame:
    # Blank lines are not records (trailing newlines, editors); they are not counted.
    return lines.where(F.trim("raw_record") != "")


def _csv_part(lines: DataFrame, header: tuple[str, ...], header_lines: set[str], required: list[str]) -> DataFrame:
    # The header is the first line of each file; a line equal to it is not a record.
    lines = lines.where(~F.col("raw_record").isin(sorted(header_lines)))
    return R.csv_records(lines, list(header), required)


def _records(lake: Lake, groups: _FileGroups,
             csv_lines: dict[tuple[str, ...], DataFrame] | None = None) -> DataFrame | None:
    """All records of the readable files, in the common record shape.

    ``csv_lines``: lines of CSV files already read (``source_file, source_format,
    raw_record``; the direct reader's left-overs) per header, beside ``groups.csv``.
    """
    parts: list[DataFrame] = []
    required = lake.catalogue.required_fields
    for header, paths in groups.csv.items():
        parts.append(_csv_part(_text_lines(lake, paths, "csv"), header, groups.csv_header_lines[header], required))
    for header, lines in (csv_lines or {}).items():
        parts.append(_csv_part(_non_blank(lines), header, groups.csv_header_lines[header], required))
    if groups.json:
        parts.append(R.json_records(_text_lines(lake, groups.json, "json"), required))
    for paths in groups.parquet.values():
        rows = landed(lake).parquet(*paths).withColumn("__file", F.col("_metadata.file_path"))
        parts.append(R.parquet_records(rows, "__file", required))
    if not parts:
        return None
    return reduce(DataFrame.unionByName, parts)


def _isolate_unreadable(lake: Lake, groups: _FileGroups) -> int:
    """After a read failed mid-job, find the files that cannot be read in full.

    A truncated gzip is only noticed at its end, a corrupt Parquet page when it is read,
    a file may vanish after it was claimed: every file of the batch is re-read on its own
    (this path runs only after a failure). Returns how many moved to ``groups.rejected``.
    """
    suspects = [p for paths in groups.csv.values() for p in paths]
    suspects += list(groups.json)
    suspects += [p for paths in groups.parquet.values() for p in paths]
    found = 0
    for path in suspects:
        try:
            reader = landed(lake).parquet if path.endswith(".parquet") else landed(lake).text
            reader(path).count()
        except Exception as exc:  # noqa: BLE001 - the point is to catch the read failure
            groups.rejected[path] = ("unreadable_file", _short(exc))
            found += 1
    for header in list(groups.csv):
        groups.csv[header] = [p for p in groups.csv[header] if p not in groups.rejected]
        if not groups.csv[header]:
            del groups.csv[header]
    groups.json = [p for p in groups.json if p not in groups.rejected]
    for key in list(groups.parquet):
        groups.parquet[key] = [p for p in groups.parquet[key] if p not in groups.rejected]
        if not groups.parquet[key]:
            del groups.parquet[key]
    return found


def _known_sensors(lake: Lake, registry_version: int | None) -> DataFrame:
    """Sensor ids of the registry (at ``registry_version`` when one is pinned)."""
    known = lake.read("sensors")
    if registry_version is not None and registry_version >= 0:
        known = lake.spark.read.format("delta").option("versionAsOf", registry_version).load(lake.path("sensors"))
    return known.select("sensor_id")


def _stage_typed(lake: Lake, groups: _FileGroups, now: dt.datetime, registry_version: int | None,
                 out: str) -> tuple[DataFrame | None, dict]:
    """Parse and check every record once, writing them to the Parquet folder ``out``.

    Returns (the staged records, counts): ``raw_rows``, one count per quarantine reason
    that occurred, and ``dates``, the reading dates of accepted records. The counts are
    gathered by ``observe`` while the staging file is written, so the batch's records
    are parsed exactly once (a cached DataFrame cost more than this write and re-read).
    """
    known = _known_sensors(lake, registry_version)
    reasons = lake.catalogue.record_reasons
    reason = F.col("quarantine_reason")
    for attempt in (1, 2):
        records = _records(lake, groups)
        if records is None:
            return None, {"raw_rows": 0, "dates": []}
        typed = R.type_records(records, lake.catalogue, known, now)
        observed = Observation()
        metrics = [F.count(F.lit(1)).alias("raw_rows"),
                   F.collect_set(F.when(reason.isNull(), F.col("reading_date"))).alias("dates")]
        metrics += [F.sum((reason == code).cast("long")).alias(code) for code in reasons]
        staged = R.staged_records(typed.observe(observed, *metrics))
        try:
            staged.write.mode("overwrite").parquet(out)
        except Exception:
            if attempt == 2 or _isolate_unreadable(lake, groups) == 0:
                raise
            log.warning("some files failed mid-read; rejected them and re-reading the batch")
            continue
        got = observed.get
        counts = {"raw_rows": int(got["raw_rows"]), "dates": sorted(got["dates"])}
        counts.update({code: int(got[code] or 0) for code in reasons if got[code]})
        return lake.spark.read.parquet(out), counts
    raise AssertionError("unreachable")


def _append_bronze(lake: Lake, typed: DataFrame, batch_id: int, dates: list[dt.date],
                   now: dt.datetime) -> dict:
    """Collapse exact duplicates, drop readings already in bronze, append the rest.

    One pass from the staged records to the bronze commit: the counts (``dup_in_batch``,
    ``dup_of_lake``, ``accepted``) are observed while bronze is written (staging the
    unique readings first cost a write and a read of every reading). Only bronze
    partitions of ``dates`` are read for the lake check.

    A resumed batch whose bronze append already committed (Delta skips it by its txn id,
    so nothing is observed) gets its counts from the same DataFrame by an aggregation;
    the commit's ``userMetadata`` marker says which case it is.
    """
    bronze = lake.read("bronze_readings")
    # Same-batch rows are excluded so a resumed batch does not count itself as a duplicate.
    existing = bronze.where(in_list("reading_date", dates) & (F.col("batch_id") != batch_id))
    flagged = R.flag_lake_duplicates(R.collapse_exact_duplicates(typed), existing)
    metrics = [
        F.sum(F.col("copies") - 1).alias("dup_in_batch"),
        F.sum(F.col("in_lake").cast("long")).alias("dup_of_lake"),
        F.sum((~F.col("in_lake")).cast("long")).alias("accepted"),
    ]
    marker = f"{TXN_PREFIX}.bronze batch {batch_id}"
    before = lake.version("bronze_readings")
    observed = Observation()
    lake.append("bronze_readings", R.bronze_rows(flagged.observe(observed, *metrics), batch_id, now),
                txn=(f"{TXN_PREFIX}.bronze", batch_id), user_metadata=marker)
    if marker in lake.commit_metadata_since("bronze_readings", before):
        counts = observed.get
    else:
        log.info("batch %d: bronze append was already committed; counting it again", batch_id)
        counts = flagged.agg(*metrics).first().asDict()
    return {k: int(v or 0) for k, v in counts.items()}


def direct_reason(lake: Lake, files: list[RawFile] | None = None) -> str | None:
    """Why a batch of ``files`` cannot take the direct path (None: it can); see
    :mod:`citylake.stages.ingest_direct`. Without ``files``, only the lake is checked."""
    reason = ingest_direct.unsupported_reason(lake)
    return reason or (ingest_direct.too_large_reason(lake, files) if files is not None else None)


def ingest_batch(lake: Lake, batch_id: int, files: list[RawFile], now: dt.datetime | None = None,
                 registry_version: int | None = None, direct: bool | None = None) -> BatchReport:
    """Ingest one claimed batch of files; safe to call again for the same batch.

    ``registry_version`` pins the sensors table version records are checked against.
    ``direct``: parse CSV with pyarrow and write with delta-rs (``ingest_direct``), or
    use Spark for all of it; default: direct whenever :func:`direct_reason` allows.
    On the Spark path intermediate files live under ``<lake>/_staging/ingest/batch-<id>``
    and are removed when the batch is logged; a resumed batch rebuilds them.
    """
    now = _aware(now) or utc_now()
    if direct is None:
        reason = direct_reason(lake, files)
        if reason:
            log.info("batch %d on the Spark path: %s", batch_id, reason)
        direct = reason is None
    if direct:
        report = ingest_direct.ingest_batch(lake, batch_id, files, now, registry_version)
        _log_batch(lake, report, now, direct=True)
        return report
    started = time.monotonic()
    groups = _classify(lake, files)
    scratch = lake.staging("ingest", f"batch-{batch_id}")
    typed, summary = _stage_typed(lake, groups, now, registry_version, f"{scratch}/typed")
    raw_rows = summary.pop("raw_rows")
    reading_dates = summary.pop("dates")
    quarantined = sum(summary.values())

    dup_in_batch = dup_of_lake = accepted = 0
    if typed is not None:
        lake.append("quarantine", R.quarantine_rows(typed, batch_id, now), txn=(f"{TXN_PREFIX}.quarantine", batch_id))
        counts = _append_bronze(lake, typed, batch_id, reading_dates, now)
        dup_in_batch, dup_of_lake, accepted = counts["dup_in_batch"], counts["dup_of_lake"], counts["accepted"]
        # Checked before the log row: a batch that breaks it is never logged as done, and
        # the message says so (it would be a bug in citylake, not in the data).
        if raw_rows != accepted + quarantined + dup_in_batch + dup_of_lake:
            raise IngestError(
                f"batch {batch_id}: accounting broken: raw {raw_rows} != accepted {accepted} + "
                f"quarantined {quarantined} + duplicates {dup_in_batch + dup_of_lake}"
            )
    if groups.rejected:
        _append_rows(lake, "ingest_rejected_files",
                     [(batch_id, p, reason, detail, now) for p, (reason, detail) in sorted(groups.rejected.items())],
                     (f"{TXN_PREFIX}.rejected", batch_id), direct=False)
    report = BatchReport(
        batch_id=batch_id,
        files=len(files),
        rejected_files=len(groups.rejected),
        raw_rows=raw_rows,
        accepted=accepted,
        quarantined=quarantined,
        duplicates_in_batch=dup_in_batch,
        duplicates_of_lake=dup_of_lake,
        reading_dates=reading_dates,
        seconds=time.monotonic() - started,
        quarantine_by_reason=dict(sorted(summary.items())),
        rejected={p: r for p, (r, _) in groups.rejected.items()},
    )
    _log_batch(lake, report, now)
    lake.remove(scratch)
    return report


def _log_batch(lake: Lake, report: BatchReport, started: dt.datetime, direct: bool = False) -> None:
    row = (
        report.batch_id, started, utc_now(), report.files, report.rejected_files, report.raw_rows,
        report.accepted, report.quarantined, report.duplicates, report.duplicates_in_batch,
        report.duplicates_of_lake, report.reading_dates,
    )
    _append_rows(lake, "ingest_log", [row], (f"{TXN_PREFIX}.log", report.batch_id), direct)


def run_ingest(lake: Lake, date: dt.date | None = None, now: dt.datetime | None = None) -> IngestReport:
    """Sync the registry, then ingest every unclaimed raw file (and resume unfinished batches).

    ``date`` restricts new files to that landing folder. ``now`` (UTC) is the ingest time
    used for lineage and the future-timestamp bound; default: the wall clock.
    """
    # Checked once per run: the direct path also reads and writes the registry, plans and
    # claims with delta-rs when the lake allows it.
    lake_reason = direct_reason(lake)
    n_sensors, changed = sync_registry(lake, direct=lake_reason is None)
    plans = plan_batches(lake, date, direct=lake_reason is None)
    if not plans:
        log.info("nothing to ingest: every landed file is already in a batch")
    reports = []
    for plan in plans:
        batch_id, files = plan.batch_id, plan.files
        if plan.resumed:
            batch_now, registry_version = plan.planned_ts, plan.registry_version
        else:
            batch_now, registry_version = _aware(now) or utc_now(), lake.version("sensors")
            claim_files(lake, batch_id, files, batch_now, registry_version, direct=lake_reason is None)
        log.info("%s batch %d: %d file(s)", "resuming" if plan.resumed else "ingesting", batch_id, len(files))
        reason = lake_reason or ingest_direct.too_large_reason(lake, files)
        if reason:
            log.info("batch %d on the Spark path: %s", batch_id, reason)
        report = ingest_batch(lake, batch_id, files, batch_now, registry_version, direct=reason is None)
        log.info(
            "batch %d (%s path): raw %d = accepted %d + quarantined %d + duplicates %d; %d file(s) rejected (%.1fs)",
            batch_id, report.path, report.raw_rows, report.accepted, report.quarantined, report.duplicates,
            report.rejected_files, report.seconds,
        )
        reports.append(report)
    return IngestReport(sensors_current=n_sensors, registry_changed=changed, batches=reports)
