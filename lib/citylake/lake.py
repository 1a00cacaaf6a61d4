"""The lake's edges: where every table lives, and the only place tables are read or written.

A :class:`Lake` binds a SparkSession, the config and the catalogue. Stages ask it for a
table by name (``lake.read("bronze_readings")``) and hand DataFrames back to it to
append or merge; transforms in between never touch storage.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from citylake.catalogue import Catalogue, ColumnSpec, TableSpec, load_catalogue
from citylake.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawFile:
    """A file found in the landing area. ``size`` in bytes, ``mtime`` in UTC."""

    path: str
    size: int
    mtime: dt.datetime


#: Paths made only of these characters are their own URI (Hadoop's ``Path.toUri``).
_URI_SAFE = re.compile(r"^[A-Za-z0-9/._~:@&=+$,;!*'()-]*$")


def _path_of_uri(uri: str) -> str:
    """Hadoop's ``Path.toString()`` of a file URI as Spark's file index gives it, for the
    usual cases (``file:///x`` -> ``file:/x``, %-escapes decoded)."""
    path = urllib.parse.unquote(uri)
    return "file:/" + path[len("file:///"):] if path.startswith("file:///") else path


class Lake:
    """Table access for one lake root."""

    def __init__(self, spark: SparkSession, config: Config, catalogue: Catalogue | None = None):
        self.spark = spark
        self.config = config
        self.catalogue = catalogue or load_catalogue()
        self.root = config.lake_root
        # Tables known to exist: a table is never dropped under a running job, and the
        # check costs a Delta log lookup, so each is checked until first seen.
        self._existing: set[str] = set()

    # -- locations -------------------------------------------------------------------
    def path(self, table: str) -> str:
        """Absolute path (or URI) of a Delta table named in ``schemas/tables.yaml``."""
        return f"{self.root}/{self.catalogue.table(table).path}"

    @property
    def raw_readings(self) -> str:
        return f"{self.root}/raw/readings"

    @property
    def raw_sensors(self) -> str:
        return f"{self.root}/raw/sensors"

    def sub(self, *parts: str) -> str:
        """A path under the lake root (for non-table folders such as ``gx``)."""
        return "/".join([self.root, *parts])

    # -- schema ------------------------------------------------------------------------
    def spec(self, table: str) -> TableSpec:
        return self.catalogue.table(table)

    def exists(self, table: str) -> bool:
        if table not in self._existing and DeltaTable.isDeltaTable(self.spark, self.path(table)):
            self._existing.add(table)
        return table in self._existing

    def ensure(self, table: str, extra_columns: list[ColumnSpec] | None = None) -> None:
        """Create the table empty, with its declared schema and partitioning, if missing."""
        if self.exists(table):
            return
        spec = self.spec(table)
        if spec.dynamic_columns and extra_columns is None:
            # Created from config so a read before the features stage gets the real shape.
            from citylake.transforms.features import feature_columns

            extra_columns = feature_columns(self.config.features.lags, self.config.features.windows, self.catalogue)
        builder = (
            DeltaTable.createIfNotExists(self.spark)
            .location(self.path(table))
            .addColumns(spec.struct(extra_columns))
        )
        if spec.description:
            builder = builder.comment(spec.description)
        if spec.partition_by:
            builder = builder.partitionedBy(*spec.partition_by)
        builder.execute()
        self._existing.add(table)
        log.info("created table %s at %s", table, self.path(table))

    def conform(self, table: str, df: DataFrame, extra_columns: list[ColumnSpec] | None = None) -> DataFrame:
        """Select and cast ``df`` to the table's declared columns, in order.

        A column the table declares but ``df`` lacks is an error here, not a silent null.
        """
        struct = self.spec(table).struct(extra_columns)
        missing = [f.name for f in struct.fields if f.name not in df.columns]
        if missing:
            raise ValueError(f"{table}: DataFrame lacks column(s) {missing}")
        return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in struct.fields])

    # -- reads ---------------------------------------------------------------------------
    def read(self, table: str) -> DataFrame:
        """The current version of a table (created empty first if it does not exist)."""
        self.ensure(table)
        return self.spark.read.format("delta").load(self.path(table))

    def delta(self, table: str) -> DeltaTable:
        self.ensure(table)
        return DeltaTable.forPath(self.spark, self.path(table))

    # -- writes --------------------------------------------------------------------------
    def append(
        self,
        table: str,
        df: DataFrame,
        txn: tuple[str, int] | None = None,
        extra_columns: list[ColumnSpec] | None = None,
        user_metadata: str | None = None,
    ) -> None:
        """Append ``df`` to ``table``.

        ``txn=(app_id, version)`` makes the append idempotent: Delta skips a write whose
        app id already committed that version, so a job resumed after a crash cannot
        append the same batch twice. ``user_metadata`` is stored in the commit.
        """
        self.ensure(table, extra_columns)
        writer = self.conform(table, df, extra_columns).write.format("delta").mode("append")
        if txn:
            writer = writer.option("txnAppId", txn[0]).option("txnVersion", txn[1])
        if user_metadata is not None:
            writer = writer.option("userMetadata", user_metadata)
        writer.save(self.path(table))

    def overwrite(self, table: str, df: DataFrame, user_metadata: str | None = None) -> int:
        """Replace the whole content of ``table`` with ``df`` in one commit.

        ``user_metadata`` is stored in the commit (see :meth:`last_commit_metadata`).
        """
        self.ensure(table)
        before = self.version(table)
        writer = (self.conform(table, df).write.format("delta").mode("overwrite")
                  # static: the whole table, even partitions absent from df (session default is dynamic)
                  .option("partitionOverwriteMode", "static"))
        if user_metadata is not None:
            writer = writer.option("userMetadata", user_metadata)
        writer.save(self.path(table))
        return self.rows_written_since(table, before)

    def last_commit_metadata(self, table: str) -> str | None:
        """The ``userMetadata`` of the table's newest commit (None if none or no table)."""
        if not self.exists(table):
            return None
        newest = self._rs_call(table, lambda t: t.history(1))
        if newest is not None:  # the log read directly: a Spark history query costs a job
            return newest[0].get("userMetadata") if newest else None
        row = DeltaTable.forPath(self.spark, self.path(table)).history(1).select("userMetadata").first()
        return row[0] if row else None

    def commit_metadata_since(self, table: str, version: int, limit: int = 20) -> list[str]:
        """The ``userMetadata`` of the table's commits after ``version`` (newest ``limit``)."""
        rows = (DeltaTable.forPath(self.spark, self.path(table)).history(limit)
                .where(F.col("version") > version).select("userMetadata").collect())
        return [r[0] for r in rows if r[0] is not None]

    def replace_where(self, table: str, df: DataFrame, condition: str,
                      extra_columns: list[ColumnSpec] | None = None) -> int:
        """Overwrite exactly the rows matching ``condition`` with ``df`` (atomic)."""
        self.ensure(table, extra_columns)
        before = self.version(table)
        (
            self.conform(table, df, extra_columns)
            .write.format("delta")
            .mode("overwrite")
            .option("replaceWhere", condition)
            .save(self.path(table))
        )
        return self.rows_written_since(table, before)

    def version(self, table: str) -> int:
        """Latest committed version of the table (-1 when it does not exist)."""
        if not self.exists(table):
            return -1
        version = self._rs_call(table, lambda t: t.version())
        if version is not None:
            return int(version)
        return int(
            DeltaTable.forPath(self.spark, self.path(table)).history(1).select("version").first()[0]
        )

    def rows_written_since(self, table: str, version: int) -> int:
        """Sum of ``numOutputRows`` over the commits after ``version`` (0 if none)."""
        hist = (
            DeltaTable.forPath(self.spark, self.path(table))
            .history(20)
            .where(F.col("version") > version)
            .select(F.col("operationMetrics")["numOutputRows"].alias("n"))
            .collect()
        )
        return sum(int(r["n"] or 0) for r in hist)

    # -- local tables through the deltalake package (delta-rs) ---------------------------
    def local_path(self, table: str) -> str | None:
        """The table's folder on the local file system, or None when the lake is elsewhere
        (``s3a://``, ``hdfs://``...), where only Spark reads and writes it."""
        return local_file_path(self.path(table))

    def arrow_schema(self, table: str):
        """The table's schema as Delta stores it, as a ``pyarrow.Schema`` (local lakes)."""
        from deltalake import DeltaTable as RsTable

        self.ensure(table)
        return pa_schema(RsTable(self._local(table)).schema().to_arrow())

    def read_arrow(self, table: str, columns: list[str] | None = None, filter=None,
                   version: int | None = None):
        """A table (or one ``version`` of it) as a ``pyarrow.Table``, without Spark.

        ``filter`` is a ``pyarrow.dataset`` expression; on partition columns it prunes
        whole folders. Local lakes only (:meth:`local_path`).
        """
        from deltalake import DeltaTable as RsTable

        self.ensure(table)
        delta = RsTable(self._local(table), version=version)
        return delta.to_pyarrow_dataset().to_table(columns=columns, filter=filter)

    def txn_version(self, table: str, app_id: str) -> int | None:
        """The newest ``txnVersion`` committed for ``app_id`` (None if none), as Spark's
        idempotent writes and :meth:`append_arrow` record it."""
        from deltalake import DeltaTable as RsTable

        self.ensure(table)
        return RsTable(self._local(table)).transaction_version(app_id)

    def append_arrow(self, table: str, data, txn: tuple[str, int] | None = None,
                     user_metadata: str | None = None) -> bool:
        """Append a ``pyarrow.Table`` with delta-rs: the same commit as :meth:`append`
        (``txn`` and ``userMetadata`` included, which Spark honours), without a Spark job.

        Returns False when ``txn`` shows the append already committed (nothing written).
        Local lakes only; ``data`` is cast to the table's schema (a missing column raises).
        """
        from deltalake import CommitProperties, DeltaTable as RsTable, Transaction, write_deltalake

        self.ensure(table)
        # One snapshot for the txn check and the write: delta-rs refuses the commit when
        # another writer committed since (two runs resuming the same batch at once), where
        # a fresh snapshot at write time would let both append.
        snapshot = RsTable(self._local(table))
        if txn is not None:
            done = snapshot.transaction_version(txn[0])
            if done is not None and done >= txn[1]:
                return False
        schema = pa_schema(snapshot.schema().to_arrow())
        missing = [n for n in schema.names if n not in data.column_names]
        if missing:
            raise ValueError(f"{table}: Arrow table lacks column(s) {missing}")
        props = CommitProperties(
            custom_metadata={"userMetadata": user_metadata} if user_metadata is not None else None,
            app_transactions=[Transaction(txn[0], txn[1])] if txn is not None else None,
        )
        write_deltalake(snapshot, _conformed(data, schema), mode="append", commit_properties=props)
        return True

    def overwrite_arrow(self, table: str, data, user_metadata: str | None = None) -> None:
        """Replace the whole table with a ``pyarrow.Table`` in one delta-rs commit (the
        same commit as :meth:`overwrite`, without a Spark job). Local lakes only."""
        from deltalake import CommitProperties, write_deltalake

        self.ensure(table)
        schema = self.arrow_schema(table)
        props = CommitProperties(custom_metadata={"userMetadata": user_metadata} if user_metadata is not None else None)
        write_deltalake(self._local(table), _conformed(data, schema), mode="overwrite", commit_properties=props)

    def _rs_call(self, table: str, call):
        """``call(deltalake.DeltaTable)`` for a local table; None when the table is not
        local or delta-rs cannot open it (a protocol it lacks): the caller asks Spark."""
        path = self.local_path(table)
        if path is None:
            return None
        from deltalake import DeltaTable as RsTable

        try:
            return call(RsTable(path))
        except Exception as exc:  # noqa: BLE001 - any failure falls back to Spark
            log.debug("delta-rs cannot read %s (%s); asking Spark", table, exc)
            return None

    def _local(self, table: str) -> str:
        path = self.local_path(table)
        if path is None:
            raise ValueError(f"{table} is not on the local file system: {self.path(table)}")
        return path

    # -- scratch space -------------------------------------------------------------------
    def staging(self, *parts: str) -> str:
        """A scratch folder under ``<lake>/_staging`` for a job's intermediate files.

        On the lake's own file system, so it works on a cluster; the leading ``_`` hides
        it from Spark and Delta readers.
        """
        return self.sub("_staging", *parts)

    def remove(self, path: str) -> None:
        """Delete ``path`` recursively if it exists (scratch folders only)."""
        _, _, hpath, fs = self._open(path)
        if fs.exists(hpath):
            fs.delete(hpath, True)

    # -- landing area ----------------------------------------------------------------------
    def list_files(self, folder: str, min_age_s: float = 0.0) -> list[RawFile]:
        """Every file below ``folder`` (recursive), through Hadoop's FileSystem, so local
        paths, HDFS and object stores behave alike. Hidden files and anything under a
        hidden folder (``.`` / ``_``, e.g. a writer's ``_temporary``) are skipped, and so
        are files modified less than ``min_age_s`` seconds ago (still being written).

        The listing is one Spark ``binaryFile`` scan of names, sizes and times (file
        contents are not read): walking Hadoop's iterator through py4j cost ~8 ms per
        file, seconds for a day of landed files.
        """
        jvm = self.spark.sparkContext._jvm
        conf = self.spark.sparkContext._jsc.hadoopConfiguration()
        path = jvm.org.apache.hadoop.fs.Path(folder)
        fs = path.getFileSystem(conf)
        if not fs.exists(path):
            return []
        base = path.makeQualified(fs.getUri(), fs.getWorkingDirectory()).toString().rstrip("/")
        newest_ms = (dt.datetime.now(dt.timezone.utc).timestamp() - min_age_s) * 1000
        listing = self.spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(folder)
        rows = [(r["path"], int(r["length"]), r["mtime_ms"]) for r in listing.select(
            "path", "length", F.unix_millis("modificationTime").alias("mtime_ms")).collect()]
        indexed = listing.inputFiles()
        if len(indexed) > len(rows):
            # The scan leaves out empty files; the index has them (as URIs). An empty landed
            # file must still be seen (and rejected as empty_file), so look those few up.
            scanned = {r[0] for r in rows}
            for uri in indexed:
                if _path_of_uri(uri) in scanned:  # a cheap guess first; exact check below
                    continue
                status = fs.getFileStatus(jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri)))
                if status.getLen() == 0 and status.getPath().toString() not in scanned:
                    rows.append((status.getPath().toString(), 0, status.getModificationTime()))
        found: list[RawFile] = []
        for file_path, size, mtime_ms in rows:
            relative = file_path[len(base):].strip("/")
            if any(part.startswith((".", "_")) for part in relative.split("/")):
                continue
            if min_age_s and mtime_ms > newest_ms:
                continue
            found.append(RawFile(path=file_path, size=size,
                                 mtime=dt.datetime.fromtimestamp(mtime_ms / 1000, dt.timezone.utc)))
        return sorted(found, key=lambda f: f.path)

    def _open(self, file_path: str):
        jvm = self.spark.sparkContext._jvm
        conf = self.spark.sparkContext._jsc.hadoopConfiguration()
        path = jvm.org.apache.hadoop.fs.Path(file_path)
        return jvm, conf, path, path.getFileSystem(conf)

    def has_parquet_magic(self, file_path: str) -> bool:
        """True when the file starts and ends with Parquet's ``PAR1`` magic bytes."""
        jvm, _, path, fs = self._open(file_path)
        size = fs.getFileStatus(path).getLen()
        if size < 12:
            return False
        stream = fs.open(path)
        try:
            # Byte by byte: py4j copies Java byte arrays, so a buffer cannot be filled in place.
            head = bytes(stream.read() for _ in range(4))
            stream.seek(size - 4)
            tail = bytes(stream.read() for _ in range(4))
        finally:
            stream.close()
        return head == b"PAR1" and tail == b"PAR1"

    def file_uri(self, file_path: str) -> str:
        """A listed path as Spark names it in ``_metadata.file_path`` (and so in the
        lineage columns): its URI, with spaces, ``%``, ``#``, ``?``, brackets... escaped."""
        if _URI_SAFE.match(file_path):
            return file_path
        return str(self.spark.sparkContext._jvm.org.apache.hadoop.fs.Path(file_path).toUri().toString())

    def read_first_lines(self, file_paths: list[str], threads: int = 8) -> dict[str, str | None | Exception]:
        """First line of each text file (decompressing by suffix; None for an empty file).
        A file that cannot be read (corrupt gzip, permissions...) maps to its exception
        instead of raising.

        Each file takes a handful of py4j round trips (~12 ms locally), so files are read
        by ``threads`` threads at once (py4j gives each thread its own connection).
        """
        jvm = self.spark.sparkContext._jvm
        conf = self.spark.sparkContext._jsc.hadoopConfiguration()
        codecs = jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(conf)

        def first_line(file_path: str) -> str | None | Exception:
            try:
                path = jvm.org.apache.hadoop.fs.Path(file_path)
                stream = path.getFileSystem(conf).open(path)
                try:
                    codec = codecs.getCodec(path)
                    source = codec.createInputStream(stream) if codec is not None else stream
                    reader = jvm.java.io.BufferedReader(jvm.java.io.InputStreamReader(source, "UTF-8"))
                    return reader.readLine()
                finally:
                    stream.close()
            except Exception as exc:  # noqa: BLE001 - returned to the caller, per file
                return exc

        if len(file_paths) <= 1:
            return {p: first_line(p) for p in file_paths}
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return dict(zip(file_paths, pool.map(first_line, file_paths)))


def local_file_path(path: str) -> str | None:
    """``path`` as an OS path when it is on the local file system (a plain path or a
    ``file:`` path as Hadoop prints it, unescaped: ``file:/x`` or ``file:///x``), else None."""
    if path.startswith("file://"):
        # file:///x is local; file://host/x names another machine.
        return path[len("file://"):] if path.startswith("file:///") else None
    if path.startswith("file:"):
        return path[len("file:"):]
    return None if "://" in path else path


def pa_schema(schema):
    """A schema from delta-rs' ``to_arrow()`` (an Arrow C stream object) as ``pyarrow``'s."""
    import pyarrow as pa

    return schema if isinstance(schema, pa.Schema) else pa.schema(schema)


def _conformed(data, schema):
    """``data`` with the table's columns, in order, cast to their types. A dictionary-encoded
    column of the right value type stays encoded: delta-rs writes it as plain strings, and
    skips materialising millions of repeated lineage paths (~0.6 s per 6M rows)."""
    import pyarrow as pa

    fields = []
    for field in schema:
        given = data.schema.field(field.name).type
        if pa.types.is_dictionary(given) and given.value_type == field.type:
            field = field.with_type(given)
        fields.append(field)
    return data.select(schema.names).cast(pa.schema(fields))


def in_list(column: str, values: Iterable) -> Column:
    """``column IN (values)`` as a Column (False for an empty list)."""
    values = list(values)
    return F.col(column).isin(values) if values else F.lit(False)
