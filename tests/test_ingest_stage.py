"""Integration tests of the ingest stage on a temporary lake with hand-made landing files."""

from __future__ import annotations

import datetime as dt
import gzip
import random
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from citylake.lake import Lake
from citylake.stages.ingest import IngestError, claim_files, plan_batches, run_ingest

pytestmark = pytest.mark.integration


@pytest.fixture(params=["auto", "spark"])
def config(request, tmp_path):
    """Every test here runs on both ingest paths: direct (pyarrow + delta-rs) and Spark."""
    from conftest import make_config

    return make_config(tmp_path / "lake", ingest={"reader": request.param})

NOW = dt.datetime(2026, 1, 10, tzinfo=dt.timezone.utc)
HEADER = "sensor_id,ts,metric,value\n"


def land(lake: Lake, date: str, name: str, text: str | bytes) -> Path:
    folder = Path(lake.root) / "raw" / "readings" / f"date={date}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def registry(lake: Lake, name: str = "sensors_20260101.csv", rows: str = "s1,north,52.1,4.3\ns2,south,52.0,4.4\n"):
    folder = Path(lake.root) / "raw" / "sensors"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("sensor_id,region,lat,lon,kind\n" + "".join(
        r + ",loop\n" for r in rows.strip().splitlines()))


def readings(n: int, sensor="s1", day="2026-01-05", start_minute=0) -> str:
    rnd = random.Random(n)
    return "".join(f"{sensor},{day}T{(start_minute + 5 * i) // 60 % 24:02d}:{(start_minute + 5 * i) % 60:02d}:00Z,"
                   f"traffic_flow,{rnd.randint(0, 300)}\n" for i in range(n))


def totals(lake: Lake) -> dict[str, int]:
    log = lake.read("ingest_log").agg(*[F.sum(c).alias(c) for c in
                                        ("raw_rows", "accepted", "quarantined", "duplicates")]).first()
    return {k: int(log[k] or 0) for k in ("raw_rows", "accepted", "quarantined", "duplicates")}


def test_mixed_batch_accounting_and_rejected_files(lake: Lake):
    registry(lake)
    twenty = readings(20)
    first_three = "".join(twenty.splitlines(keepends=True)[:3])
    land(lake, "2026-01-05", "a.csv", HEADER + twenty + first_three + "s9,2026-01-05T00:00:00Z,pm25,3\n")
    land(lake, "2026-01-05", "b.jsonl.gz", gzip.compress(
        b'{"sensor_id":"s2","ts":"2026-01-05T01:00:00+01:00","metric":"pm25","value":7.5}\nnot json\n'))
    good = gzip.compress((HEADER + readings(2000, "s2")).encode())
    land(lake, "2026-01-05", "c.csv.gz", good[: len(good) // 2])  # truncated: unreadable
    land(lake, "2026-01-05", "d.parquet", "plain text")
    land(lake, "2026-01-05", "e.xlsx", "x")
    land(lake, "2026-01-05", "f.csv", "id,when,what\n1,2,3\n")
    report = run_ingest(lake, now=NOW)
    (batch,) = report.batches
    assert {Path(k).name: v for k, v in batch.rejected.items()} == {
        "c.csv.gz": "unreadable_file", "d.parquet": "unreadable_file",
        "e.xlsx": "unsupported_format", "f.csv": "missing_required_columns"}
    # a.csv: 20 + 3 (exact duplicates of the first 3) + 1 unknown sensor; b: 1 good + 1 bad line.
    assert (batch.raw_rows, batch.accepted, batch.quarantined, batch.duplicates) == (26, 21, 2, 3)
    assert batch.quarantine_by_reason == {"unknown_sensor": 1, "unparseable_line": 1}
    assert lake.read("bronze_readings").count() == 21
    assert lake.read("quarantine").count() == 2
    assert lake.read("ingest_rejected_files").count() == 4
    t = totals(lake)
    assert t["raw_rows"] == t["accepted"] + t["quarantined"] + t["duplicates"]
    # The JSON reading at 01:00+01:00 is stored as 00:00 UTC.
    row = lake.read("bronze_readings").where("sensor_id = 's2'").first()
    assert row["ts"] == dt.datetime(2026, 1, 5, 0, 0) and row["source_format"] == "json"
    assert row["reading_date"] == dt.date(2026, 1, 5) and row["batch_id"] == 1


def test_rerun_ingests_nothing_and_late_files_are_picked_up(lake: Lake):
    registry(lake)
    land(lake, "2026-01-05", "a.csv", HEADER + readings(10))
    first = run_ingest(lake, now=NOW)
    assert [b.accepted for b in first.batches] == [10]
    assert run_ingest(lake, now=NOW).batches == []
    # A late file for the old date, repeating 4 readings already in bronze plus 5 new ones.
    repeated = "".join(readings(10).splitlines(keepends=True)[:4])
    land(lake, "2026-01-05", "late.csv", HEADER + repeated + readings(5, start_minute=600))
    late = run_ingest(lake, now=NOW)
    (batch,) = late.batches
    assert (batch.raw_rows, batch.accepted, batch.duplicates_of_lake) == (9, 5, 4)
    assert batch.reading_dates == [dt.date(2026, 1, 5)]
    assert lake.read("bronze_readings").count() == 15


def test_date_option_limits_new_files_to_that_folder(lake: Lake):
    registry(lake)
    land(lake, "2026-01-05", "a.csv", HEADER + readings(3))
    land(lake, "2026-01-06", "b.csv", HEADER + readings(4, day="2026-01-06"))
    only = run_ingest(lake, date=dt.date(2026, 1, 6), now=NOW)
    assert [b.accepted for b in only.batches] == [4]
    rest = run_ingest(lake, now=NOW)
    assert [b.accepted for b in rest.batches] == [3]


def test_crash_after_bronze_write_is_resumed_without_double_rows(lake: Lake, monkeypatch):
    registry(lake)
    twelve = readings(12)
    land(lake, "2026-01-05", "a.csv", HEADER + twelve + "".join(twelve.splitlines(keepends=True)[:2]))

    import citylake.stages.ingest as ingest

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the log row")

    monkeypatch.setattr(ingest, "_log_batch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ingest(lake, now=NOW)
    assert lake.read("bronze_readings").count() == 12  # data committed, log not
    assert lake.read("ingest_log").count() == 0
    monkeypatch.undo()
    # A new file landed meanwhile goes to a new batch; the dead batch is resumed as is.
    land(lake, "2026-01-05", "b.csv", HEADER + readings(3, sensor="s2"))
    plans = plan_batches(lake)
    assert [(p.batch_id, len(p.files), p.resumed) for p in plans] == [(1, 1, True), (2, 1, False)]
    report = run_ingest(lake, now=NOW)
    first = report.batches[0]
    assert (first.batch_id, first.raw_rows, first.accepted, first.duplicates) == (1, 14, 12, 2)
    assert lake.read("bronze_readings").count() == 15
    assert lake.read("ingest_log").count() == 2
    assert run_ingest(lake, now=NOW).batches == []


def test_claimed_batch_that_died_before_any_data_is_resumed(lake: Lake):
    registry(lake)
    land(lake, "2026-01-05", "a.csv", HEADER + readings(5))
    (plan,) = plan_batches(lake)
    claim_files(lake, plan.batch_id, plan.files, NOW, lake.version("sensors"))
    report = run_ingest(lake, now=NOW)
    assert [(b.batch_id, b.accepted) for b in report.batches] == [(1, 5)]


def test_registry_history_keeps_versions(lake: Lake):
    registry(lake)
    registry(lake, "sensors_20260201.csv", "s1,centre,52.1,4.3\ns3,north,52.2,4.5\n")
    run_ingest(lake, now=NOW)
    rows = {(r["sensor_id"], r["region"], r["is_current"]) for r in lake.read("sensors").collect()}
    assert rows == {("s1", "north", False), ("s1", "centre", True), ("s2", "south", True), ("s3", "north", True)}
    closed = lake.read("sensors").where("sensor_id = 's1' and not is_current").first()
    assert closed["valid_to"] == dt.datetime(2026, 2, 1)
    # Re-running with the same files writes no new table version.
    version = lake.version("sensors")
    run_ingest(lake, now=NOW)
    assert lake.version("sensors") == version


def test_bad_registry_row_is_a_clear_error(lake: Lake):
    registry(lake, rows="s1,north,52.1,4.3\ns2,,52.0,4.4\n")
    with pytest.raises(IngestError, match="s2"):
        run_ingest(lake, now=NOW)


def test_resumed_batch_is_judged_as_at_its_claim(lake: Lake, monkeypatch):
    """A reading just inside 'now + 1 day' at the first attempt stays quarantined on resume,
    however late the resume runs: it must not end up in both quarantine and bronze."""
    registry(lake)
    land(lake, "2026-01-05", "a.csv", HEADER + "s1,2026-01-11T00:30:00Z,traffic_flow,5\n" + readings(3))
    import citylake.stages.ingest as ingest

    monkeypatch.setattr(ingest, "_log_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        run_ingest(lake, now=NOW)
    monkeypatch.undo()
    later = NOW + dt.timedelta(days=2)  # the future reading would now be in range
    (batch,) = run_ingest(lake, now=later).batches
    assert (batch.accepted, batch.quarantined) == (3, 1)
    assert lake.read("bronze_readings").count() == 3
    assert lake.read("quarantine").count() == 1


def test_odd_files_do_not_block_the_batch(lake: Lake):
    registry(lake)
    land(lake, "2026-01-05", "dup_header.csv", "sensor_id,ts,metric,value,note,note\ns1,2026-01-05T00:00:00Z,pm25,1,a,b\n")
    pd.DataFrame({"sensor_id": ["s1"], "ts": ["2026-01-05T01:00:00Z"], "metric": ["pm25"], "value": [2.0],
                  "pm2.5": [2.0]}).to_parquet(land(lake, "2026-01-05", "dotted.parquet", b""))
    land(lake, "2026-01-05", "_temporary/0/part-0.csv", HEADER + readings(2))  # a writer's scratch
    (batch,) = run_ingest(lake, now=NOW).batches
    assert {Path(k).name: v for k, v in batch.rejected.items()} == {"dup_header.csv": "bad_header"}
    assert (batch.files, batch.raw_rows, batch.accepted) == (2, 1, 1)
    extra = lake.read("bronze_readings").first()["extra_json"]
    assert extra == '{"pm2.5":"2.0"}'


def test_listing_sees_empty_and_oddly_named_files_and_skips_hidden_ones(lake: Lake):
    registry(lake)
    land(lake, "2026-01-05", "empty.csv", "")
    land(lake, "2026-01-05", "with space ü.csv", HEADER + readings(3))
    land(lake, "2026-01-05", "not-gzip.csv.gz", "plain text, not gzip")
    land(lake, "2026-01-05", ".hidden.csv", HEADER + readings(4))
    land(lake, "2026-01-05", "_scratch/x.csv", HEADER + readings(5))
    listed = sorted(Path(f.path.replace("file:", "")).name for f in lake.list_files(lake.raw_readings))
    assert listed == ["empty.csv", "not-gzip.csv.gz", "with space ü.csv"]
    assert {f.size for f in lake.list_files(lake.raw_readings) if f.path.endswith("empty.csv")} == {0}
    (batch,) = run_ingest(lake, now=NOW).batches
    assert {Path(k).name: v for k, v in batch.rejected.items()} == {
        "empty.csv": "empty_file", "not-gzip.csv.gz": "unreadable_file"}
    assert (batch.files, batch.raw_rows, batch.accepted) == (3, 3, 3)
