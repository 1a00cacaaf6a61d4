from citylake.lake import Lake


def test_append_is_idempotent_with_txn(lake: Lake, spark):
    import datetime as dt

    rows = [(1, "f", 10, dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 1))]
    df = spark.createDataFrame(rows, "batch_id long, file_path string, file_size long, file_mtime timestamp, planned_ts timestamp")
    assert lake.append("ingest_files", df, txn=("test", 1)) == 1
    assert lake.append("ingest_files", df, txn=("test", 1)) == 0
    assert lake.read("ingest_files").count() == 1
