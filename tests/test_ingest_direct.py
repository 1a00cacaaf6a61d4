"""The direct ingest path (pyarrow + delta-rs) against the Spark path, and its pieces.

The main guarantee: on the same landing files, both paths write the same rows to every
ingest table and report the same counts, whatever the files hold.
"""

from __future__ import annotations

import datetime as dt
import gzip
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from citylake.catalogue import load_catalogue
from citylake.config import GenerateConfig
from citylake.lake import Lake, local_file_path
from citylake.sources.generate import generate_city
from citylake.stages.ingest import direct_reason, run_ingest
from citylake.transforms import arrow_records as A
from conftest import make_config

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 1, 10, tzinfo=dt.timezone.utc)
TABLES = ["bronze_readings", "quarantine", "ingest_rejected_files", "ingest_log", "ingest_files", "sensors"]

HEADER = "sensor_id,ts,metric,value,quality"
#: Lines meant to sit on the edge between "surely fine" and "ask Spark".
EDGE_LINES = [
    "s1,2026-01-05T00:00:00Z,traffic_flow,5,ok",
    '"s1",2026-01-05T00:10:00Z,traffic_flow,6,ok',            # quoted: Spark unquotes it
    " s1 , 2026-01-05T00:15:00Z , traffic_flow , 7 ,",        # spaces, empty extra
    "s1\t,2026-01-05T00:20:00Z,traffic_flow,8,ok",            # a tab is not trimmed
    "s1,2026-02-30T00:00:00Z,traffic_flow,5,x",               # no such day
    "s1,2026-01-05T08:00:00+08:00,traffic_flow,9,x",          # offset
    "s1,2026-01-05T08:30:00-03:30,traffic_flow,9,x",
    "s1,2026-01-05 01:00:00Z,traffic_flow,10,x",              # space for T
    "s1,2026-01-05T01:05:00.1234567Z,traffic_flow,11,x",      # 7 decimals
    "s1,2026-01-05T01:10:00.25Z,traffic_flow,11,x",
    "s1,2026-01-05T01:15Z,traffic_flow,12,x",                 # no seconds
    "s1,2026-01-05T01:20:00+0100,traffic_flow,13,x",          # +hhmm
    "s1,2026-01-05T01:25:00-18:00,traffic_flow,14,x",
    "s1,2026-01-05T01:30:00,traffic_flow,14,x",               # no zone
    "s1,2026-01-05T01:35:00Z,traffic_flow,-0,x",
    "s1,2026-01-05T01:35:00Z,traffic_flow,0,y",               # same reading as -0
    "s1,2026-01-05T01:40:00Z,traffic_flow,+5,x",
    "s1,2026-01-05T01:45:00Z,traffic_flow,5.,x",
    "s1,2026-01-05T01:50:00Z,traffic_flow,.5,x",
    "s1,2026-01-05T01:55:00Z,traffic_flow,1e1,x",
    "s1,2026-01-05T02:00:00Z,traffic_flow,1.5d,x",
    "s1,2026-01-05T02:05:00Z,traffic_flow,0x10,x",
    "s1,2026-01-05T02:10:00Z,traffic_flow,inf,x",
    "s1,2026-01-05T02:15:00Z,traffic_flow,NaN,x",
    "s1,2026-01-05T02:20:00Z,traffic_flow,1e400,x",
    's1,2026-01-05T02:25:00Z,traffic_flow,"5",x',
    "s1,2026-01-05T02:30:00Z,traffic_flow,99999999,x",         # out of range
    'pm,2026-01-05T02:35:00Z,traffic_flow,5,a"b',              # unknown sensor
    's1,2026-01-05T02:40:00Z,traffic_flow,5,a"b',              # quote in an extra
    "s1,2026-01-05T02:45:00Z,traffic_flow,5,a\\b",
    "s1,2026-01-05T02:50:00Z,traffic_flow,5,caf\u00e9",
    's1,2026-01-05T02:55:00Z,traffic_flow,5,"x,y"',            # quoted comma
    "s1,2026-01-05T03:00:00Z,traffic_flow",                   # short
    "s1,2026-01-05T03:05:00Z,traffic_flow,5,x,y",             # long
    HEADER,                                                    # header again mid-file
    "   ",
    "",
    "s1,1999-12-31T23:59:59Z,traffic_flow,5,x",
    "s1,2026-01-11T00:00:01Z,traffic_flow,5,x",               # > ingest time + 1 day
    "s1,2026-01-11T00:00:00Z,traffic_flow,5,x",               # exactly the bound
    "s1,2026-01-05T03:10:00Z,no_such_metric,5,x",
    "s1,2026-01-05T03:15:00Z,TRAFFIC_FLOW,5,x",
    ",2026-01-05T03:20:00Z,traffic_flow,5,x",
    "s1,2026-01-05T03:25:00Z,traffic_flow,-1,x",
    "s1,2026-01-05T00:00:00Z,traffic_flow,5,ok",              # exact duplicate of line 1
    "s1,2026-01-05T00:00:00Z,traffic_flow,5,other",           # same reading, other extra
]


def _land(root: Path, date: str, name: str, data: str | bytes) -> None:
    folder = root / "raw" / "readings" / f"date={date}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def _registry(root: Path) -> None:
    folder = root / "raw" / "sensors"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sensors_20260101.csv").write_text("sensor_id,region,lat,lon\ns1,north,52.1,4.3\ns2,south,52.0,4.4\n")


def _edge_landing(root: Path) -> None:
    _registry(root)
    _land(root, "2026-01-05", "edge.csv", "\n".join([HEADER, *EDGE_LINES]) + "\n")
    _land(root, "2026-01-05", "crlf.csv", "\ufeff" + "\r\n".join(
        ["sensor_id,ts,metric,value", "s2,2026-01-05T04:00:00Z,pm25,3", "s1,2026-01-05T00:00:00Z,traffic_flow,5"]) + "\r\n")
    _land(root, "2026-01-05", "late upload %20 #1.csv", "ts,value,metric,sensor_id\n2026-01-05T05:00:00Z,4,pm25,s2\n")
    _land(root, "2026-01-05", "b.csv.gz", gzip.compress(b"sensor_id,ts,metric,value\ns2,2026-01-05T06:00:00Z,pm25,8\n"))
    _land(root, "2026-01-05", "latin1.csv", "sensor_id,ts,metric,value,note\ns2,2026-01-05T07:00:00Z,pm25,8,caf\u00e9\n"
          .encode("latin-1"))
    _land(root, "2026-01-05", "cut.csv.gz", gzip.compress(b"sensor_id,ts,metric,value\n" + b"s2,2026-01-05T08:00:00Z,pm25,8\n" * 50)[:60])
    _land(root, "2026-01-05", "bom only[1].csv", "\ufeffsensor_id,ts,metric,value,site\n"
          "s2,2026-01-05T10:00:00Z,pm25,2,x\n")
    _land(root, "2026-01-05", "cases.csv", "sensor_id,ts,metric,value,Value\ns2,2026-01-05T11:00:00Z,pm25,2,3\n")
    _land(root, "2026-01-05", "j?.jsonl", '{"sensor_id":"s2","ts":"2026-01-05T12:00:00Z","metric":"pm25","value":1}\n')
    _land(root, "2026-01-05", "c.jsonl", '{"sensor_id":"s2","ts":"2026-01-05T09:00:00Z","metric":"pm25","value":3}\nnope\n')


def _tables(lake: Lake) -> dict:
    """Every ingest table as sorted rows, with the lake root and run times taken out."""
    out = {}
    for table in TABLES:
        df = lake.read(table)
        for column in ("source_file", "file_path"):
            if column in df.columns:
                df = df.withColumn(column, F.regexp_replace(column, r"^.*/raw/", "<raw>/"))
        df = df.drop("started_ts", "finished_ts", "file_mtime")
        out[table] = sorted(tuple(r) for r in df.collect())
    return out


def _both_paths(tmp_path: Path, spark, land, runs) -> tuple[Lake, Lake, list, list]:
    """Land the same files in two lakes, ingest one with each path, ``runs`` times."""
    lakes, reports = [], []
    for reader in ("spark", "auto"):
        root = tmp_path / reader
        land(root)
        lake = Lake(spark, make_config(root, ingest={"reader": reader}), load_catalogue())
        reports.append([run(lake, root) for run in runs])
        lakes.append(lake)
    return lakes[0], lakes[1], reports[0], reports[1]


def _same_reports(a, b) -> None:
    for run_a, run_b in zip(a, b):
        assert len(run_a.batches) == len(run_b.batches)
        for x, y in zip(run_a.batches, run_b.batches):
            fields = ["batch_id", "files", "rejected_files", "raw_rows", "accepted", "quarantined",
                      "duplicates_in_batch", "duplicates_of_lake", "reading_dates", "quarantine_by_reason"]
            assert {f: getattr(x, f) for f in fields} == {f: getattr(y, f) for f in fields}
            assert sorted(p.rsplit("/", 1)[-1] for p in x.rejected) == sorted(p.rsplit("/", 1)[-1] for p in y.rejected)


def test_edge_lines_give_the_same_tables_on_both_paths(tmp_path, spark):
    def late(lake: Lake, root: Path):
        # A late file for the same day: one reading already in bronze, one new.
        _land(root, "2026-01-05", "zz_late.csv", "sensor_id,ts,metric,value\n"
              "s1,2026-01-05T00:00:00Z,traffic_flow,5\ns1,2026-01-05T23:55:00Z,traffic_flow,5\n")
        return run_ingest(lake, now=NOW)

    spark_lake, direct_lake, spark_runs, direct_runs = _both_paths(
        tmp_path, spark, _edge_landing,
        [lambda lake, root: run_ingest(lake, now=NOW), late, lambda lake, root: run_ingest(lake, now=NOW)])
    assert direct_reason(direct_lake) is None and direct_reason(spark_lake) == "ingest.reader is spark"
    _same_reports(spark_runs, direct_runs)
    assert [b.path for r in direct_runs for b in r.batches] == ["direct", "direct"]
    assert [b.path for r in spark_runs for b in r.batches] == ["spark", "spark"]
    first, second, third = direct_runs
    batch = first.batches[0]
    assert batch.raw_rows == batch.accepted + batch.quarantined + batch.duplicates
    assert batch.accepted > 20 and batch.quarantined > 15 and batch.duplicates_in_batch >= 2
    assert sorted(batch.rejected.values()) == ["bad_header", "unreadable_file"]  # value/Value, the cut gzip
    # A header after a byte-order mark is not a record on either path.
    assert not [r for r in direct_lake.read("quarantine").collect() if r["raw_record"].startswith("sensor_id,")]
    assert (second.batches[0].accepted, second.batches[0].duplicates_of_lake) == (1, 1)
    assert third.batches == []  # idempotent
    assert _tables(spark_lake) == _tables(direct_lake)
    # The file name with a space, %20 and # is written as Spark's lineage writes it: a URI.
    names = {r[0] for r in direct_lake.read("bronze_readings").select("source_file").distinct().collect()}
    assert any(n.endswith("/late%20upload%20%2520%20%231.csv") for n in names)


def test_sample_city_gives_the_same_tables_on_both_paths(tmp_path, spark):
    gen = GenerateConfig(days=2, traffic_sensors=4, energy_meters=2, air_stations=2, bad_record_share=0.01)
    spark_lake, direct_lake, spark_runs, direct_runs = _both_paths(
        tmp_path, spark, lambda root: generate_city(root, gen, load_catalogue()),
        [lambda lake, root: run_ingest(lake, now=NOW)])
    _same_reports(spark_runs, direct_runs)
    batch = direct_runs[0].batches[0]
    assert len(batch.quarantine_by_reason) == len(load_catalogue().record_reasons)  # every kind
    assert batch.rejected_files >= 2
    assert _tables(spark_lake) == _tables(direct_lake)


def test_a_batch_resumed_on_the_other_path_is_not_appended_twice(tmp_path, spark, monkeypatch):
    import citylake.stages.ingest as ingest

    root = tmp_path / "lake"
    _registry(root)
    _land(root, "2026-01-05", "a.csv", "sensor_id,ts,metric,value\n" + "".join(
        f"s1,2026-01-05T{h:02d}:00:00Z,traffic_flow,{h}\n" for h in range(12)))
    for first, second in (("spark", "auto"), ("auto", "spark")):
        shutil.rmtree(root / "bronze", ignore_errors=True)
        shutil.rmtree(root / "meta", ignore_errors=True)
        shutil.rmtree(root / "quarantine", ignore_errors=True)
        crashed = Lake(spark, make_config(root, ingest={"reader": first}), load_catalogue())

        def crash(*args, **kwargs):
            raise RuntimeError("simulated crash before the log row")

        monkeypatch.setattr(ingest, "_log_batch", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_ingest(crashed, now=NOW)
        monkeypatch.undo()
        resumed = Lake(spark, make_config(root, ingest={"reader": second}), load_catalogue())
        report = run_ingest(resumed, now=NOW)
        assert [(b.batch_id, b.accepted, b.duplicates) for b in report.batches] == [(1, 12, 0)], (first, second)
        assert resumed.read("bronze_readings").count() == 12
        assert resumed.read("ingest_log").count() == 1


def test_tables_delta_rs_cannot_write_take_the_spark_path(tmp_path, spark):
    root = tmp_path / "lake"
    _registry(root)
    _land(root, "2026-01-05", "a.csv", "sensor_id,ts,metric,value\ns1,2026-01-05T00:00:00Z,traffic_flow,1\n")
    lake = Lake(spark, make_config(root), load_catalogue())
    assert direct_reason(lake) is None
    lake.ensure("quarantine")
    spark.sql(f"ALTER TABLE delta.`{lake.path('quarantine')}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = true)")
    assert "quarantine has Delta protocol reader 3" in direct_reason(lake)
    report = run_ingest(lake, now=NOW)
    assert report.batches[0].accepted == 1
    small = Lake(spark, make_config(tmp_path / "other", ingest={"direct_max_mb": 0}), load_catalogue())
    _registry(tmp_path / "other")
    _land(tmp_path / "other", "2026-01-05", "a.csv", "sensor_id,ts,metric,value\ns1,2026-01-05T00:00:00Z,traffic_flow,1\n")
    assert "ingest.direct_max_mb" in direct_reason(small, small.list_files(small.raw_readings))
    assert run_ingest(small, now=NOW).batches[0].accepted == 1
    with pytest.raises(ValueError, match="ingest.reader must be auto or spark"):
        direct_reason(Lake(spark, make_config(tmp_path / "x", ingest={"reader": "fast"}), load_catalogue()))


def test_append_arrow_honours_spark_txn_ids(tmp_path, spark):
    lake = Lake(spark, make_config(tmp_path / "lake"), load_catalogue())
    rows = pa.table({"batch_id": [7], "file_path": ["file:/x.csv"], "reject_reason": ["empty_file"],
                     "reject_detail": [None], "ingest_ts": pa.array([NOW], pa.timestamp("us", "UTC"))})
    assert lake.append_arrow("ingest_rejected_files", rows, txn=("test.app", 7), user_metadata="first")
    assert not lake.append_arrow("ingest_rejected_files", rows, txn=("test.app", 7))
    assert not lake.append_arrow("ingest_rejected_files", rows, txn=("test.app", 6))
    # Spark sees the delta-rs txn id and skips its own write of the same version.
    lake.append("ingest_rejected_files", lake.read("ingest_rejected_files"), txn=("test.app", 7))
    assert lake.read("ingest_rejected_files").count() == 1
    assert lake.last_commit_metadata("ingest_rejected_files") == "first"
    assert lake.version("ingest_rejected_files") == 1
    assert local_file_path("file:/tmp/a b%20.csv") == "/tmp/a b%20.csv"
    assert local_file_path("file:///tmp/x") == "/tmp/x" and local_file_path("s3a://b/x") is None


# -- the Arrow transforms on tiny tables ---------------------------------------------------------
def _rules(known=("s1", "s2")) -> A.AcceptRules:
    return A.AcceptRules.build(load_catalogue(), list(known), NOW)


def _rows(lines: list[str], width: int) -> pa.Table:
    cols = list(zip(*[line.split(",") for line in lines]))
    table = pa.table({f"c{i}": pa.array(list(cols[i]), pa.string()) for i in range(width)})
    return table.append_column("file_index", pa.array([0] * len(lines), pa.int32()))


def test_accept_csv_rows_takes_only_what_it_is_sure_of():
    header = ("sensor_id", "ts", "metric", "value", "quality")
    lines = [line for line in EDGE_LINES if line.count(",") == 4]
    accepted, rest = A.accept_csv_rows(_rows(lines, 5), header, [HEADER], ["sensor_id", "ts", "metric", "value"], _rules())
    assert accepted.num_rows + rest.num_rows == len(lines)
    got = {(r["ts"].isoformat(), r["value"], r["extra_json"]) for r in accepted.to_pylist()}
    assert ("2026-01-05T00:00:00+00:00", 5.0, '{"quality":"ok"}') in got
    assert ("2026-01-05T00:15:00+00:00", 7.0, None) in got                 # trimmed, empty extra
    assert ("2026-01-05T00:00:00+00:00", 9.0, '{"quality":"x"}') in got    # +08:00 -> UTC
    assert ("2026-01-05T01:35:00+00:00", 0.0, '{"quality":"y"}') in got
    assert ("2026-01-05T01:35:00+00:00", 0.0, '{"quality":"x"}') in got    # -0 -> 0.0
    assert ("2026-01-11T00:00:00+00:00", 5.0, '{"quality":"x"}') in got    # the bound itself
    left = set(rest.column("raw_record").to_pylist())
    for line in ['"s1",2026-01-05T00:10:00Z,traffic_flow,6,ok', "s1,2026-02-30T00:00:00Z,traffic_flow,5,x",
                 "s1,2026-01-05T01:15Z,traffic_flow,12,x", "s1,2026-01-05T02:00:00Z,traffic_flow,1.5d,x",
                 "s1,2026-01-05T02:10:00Z,traffic_flow,inf,x", 's1,2026-01-05T02:40:00Z,traffic_flow,5,a"b',
                 "s1,2026-01-05T02:50:00Z,traffic_flow,5,caf\u00e9", HEADER,
                 "s1,2026-01-11T00:00:01Z,traffic_flow,5,x", "s1,2026-01-05T03:25:00Z,traffic_flow,-1,x",
                 "s1\t,2026-01-05T00:20:00Z,traffic_flow,8,ok", "s1,2026-01-05T01:30:00,traffic_flow,14,x"]:
        assert line in left, line


def test_collapse_keeps_the_first_lineage_nulls_first_and_counts_copies():
    ts = pa.array([NOW] * 4, pa.timestamp("us", "UTC"))
    table = pa.table({"sensor_id": ["s1"] * 4, "metric": ["pm25"] * 4, "ts": ts, "value": [1.0, 1.0, 1.0, 2.0],
                      "reading_date": pa.array([NOW.date()] * 4), "extra_json": ['{"q":"b"}', None, '{"q":"a"}', None],
                      "file_index": pa.array([1, 1, 0, 1], pa.int32())})
    files, formats = pa.array(["b.csv", "a.csv"]), pa.array(["csv", "csv"])
    unique, dropped = A.collapse_exact_duplicates(table, files, formats)
    assert dropped == 2
    # a.csv (index 1) sorts before b.csv whatever the extra; within a.csv null comes first.
    assert sorted((r["value"], r["file_index"], r["extra_json"]) for r in unique.to_pylist()) == [
        (1.0, 1, None), (2.0, 1, None)]
    existing = pa.table({"sensor_id": ["s1", "s2"], "metric": ["pm25", "pm25"], "ts": ts[:2], "value": [2.0, 1.0]})
    found = A.in_lake(unique, existing)
    assert [(r["value"], f) for r, f in zip(unique.to_pylist(), found)] == [(1.0, False), (2.0, True)]


def test_repeated_finds_every_repeated_hash_and_only_those():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(5)
    for n, copies in ((0, 0), (1, 0), (5000, 0), (5000, 40), (5000, 2500)):
        hashes = rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64)
        if copies:
            hashes[:copies] = hashes[n - copies:]
        expected = pd.Series(hashes).duplicated(keep=False).to_numpy()
        assert (A.repeated(hashes) == expected).all()
        assert A.repeated(hashes).sum() == (2 * copies if copies <= n // 2 else expected.sum())
