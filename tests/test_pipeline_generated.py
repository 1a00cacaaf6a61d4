"""Integration: the CLI's stages on a generated city in a temporary lake.

The generator knows what it injected, so every count of the ingest is checked against
it: raw = accepted + quarantined + duplicates, each bad kind in its reason, each broken
file rejected with its reason.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from citylake.cli import main
from citylake.lake import Lake

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def city(spark, tmp_path_factory):
    """A small generated city (2 days, 2 regions), ingested once through the CLI."""
    from conftest import make_config

    root = tmp_path_factory.mktemp("city") / "lake"
    args = ["--lake", str(root), "-q"]
    assert main([*args, "generate", "--days", "2", "--regions", "2", "--start-date", "2026-01-05"]) == 0
    report = json.loads((root / "raw" / "_generation_report.json").read_text())
    assert main([*args, "ingest"]) == 0
    return Lake(spark, make_config(root)), report, args


def test_ingest_counts_match_what_the_generator_injected(city):
    lake, expected, _ = city
    log = lake.read("ingest_log").collect()
    assert len(log) == 1
    (batch,) = log
    assert batch["raw_rows"] == expected["raw_rows"]
    assert batch["raw_rows"] == batch["accepted"] + batch["quarantined"] + batch["duplicates"]
    assert batch["accepted"] == expected["expected_accepted"]
    assert batch["duplicates"] == expected["exact_duplicates"]
    by_reason = {r["quarantine_reason"]: r["count"] for r in
                 lake.read("quarantine").groupBy("quarantine_reason").count().collect()}
    assert by_reason == {k: v for k, v in expected["expected_quarantine"].items() if v}
    assert set(by_reason) == set(lake.catalogue.record_reasons)  # every kind shows up
    rejected = {Path(r["file_path"]).name: r["reject_reason"] for r in lake.read("ingest_rejected_files").collect()}
    assert rejected == expected["rejected_files"]
    assert lake.read("bronze_readings").count() == batch["accepted"]
    # Quarantine rows keep the raw text and the file they came from.
    assert lake.read("quarantine").where(F.col("raw_record").isNull() | F.col("source_file").isNull()).count() == 0


def test_second_ingest_is_a_no_op(city):
    lake, _, args = city
    before = lake.read("bronze_readings").count()
    assert main([*args, "ingest"]) == 0
    assert lake.read("bronze_readings").count() == before
    assert lake.read("ingest_log").count() == 1


def test_rest_of_pipeline_runs_and_validates(city):
    lake, expected, args = city
    assert main([*args, "run"]) == 0
    silver = lake.read("silver_readings")
    assert silver.count() > 0
    # One row per series and grid step: the silver key is unique.
    assert silver.groupBy("sensor_id", "metric", "ts").count().where("count > 1").count() == 0
    assert silver.where("is_outlier").count() > 0  # the generator's spikes are flagged
    assert lake.read("gold_features").count() > 0
    assert lake.read("gold_region_hourly").count() > 0
    results = lake.read("validation_results")
    assert {r[0] for r in results.select("table_name").distinct().collect()} == {
        "bronze_readings", "silver_readings", "gold_features"}
    assert (Path(lake.root) / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").is_file()


def test_bad_cli_input_is_a_message_not_a_trace(city, capsys):
    _, _, args = city
    with pytest.raises(SystemExit) as exc:
        main([*args, "ingest", "--date", "2026-02-30"])
    assert exc.value.code == 2
    assert "not a date" in capsys.readouterr().err
