"""The Beijing importer against the real source CSVs (one month, all 12 stations)."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from citylake.sources.beijing import METRIC_MAP, import_beijing

BEIJING_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "beijing_air"

pytestmark = pytest.mark.skipif(
    not BEIJING_DIR.is_dir(), reason=f"Beijing air-quality data not found at {BEIJING_DIR}"
)

START, END = date(2014, 3, 1), date(2014, 3, 31)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("beijing")
    report = import_beijing(BEIJING_DIR, root, start=START, end=END)
    return root, report


@pytest.fixture(scope="module")
def source() -> pd.DataFrame:
    """The source rows of the month, read independently (pandas' default NA handling)."""
    frames = [pd.read_csv(p) for p in sorted(BEIJING_DIR.glob("PRSA_Data_*.csv"))]
    frame = pd.concat(frames, ignore_index=True)
    return frame[(frame["year"] == 2014) & (frame["month"] == 3)]


@pytest.fixture(scope="module")
def written(imported) -> pd.DataFrame:
    root, _ = imported
    parts = []
    for path in sorted((root / "raw" / "readings").glob("date=*/*.csv")):
        part = pd.read_csv(path, dtype={"value": float, "wind_direction": str}, keep_default_na=False)
        parts.append(part.assign(folder=path.parent.name.removeprefix("date="), file=path.name))
    frame = pd.concat(parts, ignore_index=True)
    frame["instant"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
    return frame


def test_rows_per_metric_match_non_na_source_counts(imported, source, written):
    _, report = imported
    for column, metric in METRIC_MAP.items():
        non_na, na = int(source[column].notna().sum()), int(source[column].isna().sum())
        assert (written["metric"] == metric).sum() == non_na, metric
        assert report.by_metric[metric] == {"written": non_na, "na": na}, metric
    assert report.rows_written == len(written)
    assert report.na_skipped == int(source[list(METRIC_MAP)].isna().sum().sum()) > 0
    assert report.source_rows == len(source) == 12 * 31 * 24


def test_per_station_counts(imported, source, written):
    _, report = imported
    assert len(report.by_station) == 12
    for station, rows in source.groupby("station"):
        sid = f"bj-{station.lower()}"
        values = rows[list(METRIC_MAP)]
        assert report.by_station[sid] == {
            "written": int(values.notna().sum().sum()), "na": int(values.isna().sum().sum())
        }
        assert (written["sensor_id"] == sid).sum() == report.by_station[sid]["written"]


def test_values_match_the_source(source, written):
    src = source.assign(
        sensor_id="bj-" + source["station"].str.lower(),
        ts=pd.to_datetime(source[["year", "month", "day", "hour"]]).dt.strftime("%Y-%m-%dT%H:%M:%S+08:00"),
    )
    long = src.melt(id_vars=["sensor_id", "ts"], value_vars=list(METRIC_MAP), var_name="column").dropna()
    long["metric"] = long["column"].map(METRIC_MAP)
    merged = long.merge(written, on=["sensor_id", "ts", "metric"], how="outer", indicator=True,
                        suffixes=("_src", ""))
    assert (merged["_merge"] == "both").all()
    assert (merged["value_src"] == merged["value"]).all()


def test_local_time_with_offset_lands_on_the_utc_date(imported, written):
    root, report = imported
    assert written["ts"].str.endswith("+08:00").all()
    # Local 2014-03-01 00:00 is 2014-02-28 16:00 UTC, so it is in the 2014-02-28 folder.
    first = written[written["ts"] == "2014-03-01T00:00:00+08:00"]
    assert len(first) > 0
    assert (first["file"] == "beijing_20140228.csv").all() and (first["folder"] == "2014-02-28").all()
    assert first["instant"].iloc[0] == datetime(2014, 2, 28, 16, tzinfo=timezone.utc)
    assert (written["instant"].dt.strftime("%Y-%m-%d") == written["folder"]).all()
    # Local dates outside [START, END] were filtered out.
    assert written["ts"].str[:7].eq("2014-03").all()
    assert report.dates[0] == "2014-02-28" and report.dates[-1] == "2014-03-31"
    assert report.files == 32 == len(list((root / "raw" / "readings").glob("date=*/beijing_*.csv")))
    assert report.first_ts == "2014-03-01T00:00:00+08:00"


def test_registry_and_report_file(imported):
    root, report = imported
    registry = pd.read_csv(root / "raw" / "sensors" / "sensors_beijing.csv")
    assert len(registry) == 12 and registry["sensor_id"].is_unique
    suburban = set(registry.loc[registry["region"] == "beijing-suburban", "sensor_id"])
    assert suburban == {"bj-changping", "bj-dingling", "bj-huairou", "bj-shunyi"}
    assert set(registry["region"]) == {"beijing-urban", "beijing-suburban"}
    assert registry["lat"].between(39.5, 40.6).all() and registry["lon"].between(115.8, 117.0).all()
    saved = json.loads((root / "raw" / "_beijing_import_report.json").read_text())
    assert saved["rows_written"] == report.rows_written and saved["by_metric"] == report.by_metric


def test_station_filter_and_consecutive_imports_compose(tmp_path):
    """Two imports (one per local day) write the same files as one import of both days."""
    one = tmp_path / "one"
    import_beijing(BEIJING_DIR, one, start=date(2014, 3, 1), end=date(2014, 3, 1), stations=["Dongsi"])
    import_beijing(BEIJING_DIR, one, start=date(2014, 3, 2), end=date(2014, 3, 2), stations=["bj-dongsi"])
    both = tmp_path / "both"
    report = import_beijing(BEIJING_DIR, both, start=date(2014, 3, 1), end=date(2014, 3, 2), stations=["dongsi"])
    assert report.stations == ["bj-dongsi"]
    readings = both / "raw" / "readings"
    files = sorted(p.relative_to(readings) for p in readings.rglob("*.csv"))
    assert [str(f) for f in files] == [
        "date=2014-02-28/beijing_20140228.csv",
        "date=2014-03-01/beijing_20140301.csv",
        "date=2014-03-02/beijing_20140302.csv",
    ]
    for f in files:
        assert (one / "raw" / "readings" / f).read_bytes() == (readings / f).read_bytes(), f
    with pytest.raises(ValueError, match="unknown Beijing station"):
        import_beijing(BEIJING_DIR, tmp_path / "x", stations=["Atlantis"])
