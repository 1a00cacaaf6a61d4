import datetime as dt

from citylake.lake import Lake


def test_append_is_idempotent_with_txn(lake: Lake, spark):
    rows = [(1, "f", 10, dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 1), 0)]
    df = spark.createDataFrame(rows, lake.spec("ingest_files").struct())
    lake.append("ingest_files", df, txn=("test", 1))
    lake.append("ingest_files", df, txn=("test", 1))
    assert lake.read("ingest_files").count() == 1
    lake.append("ingest_files", df, txn=("test", 2))
    assert lake.read("ingest_files").count() == 2
