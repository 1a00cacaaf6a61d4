"""The sample-city generator: determinism, formats, and a report the ingest can trust.

The files are re-read here with a small reader of their own (gzip/json/pandas) that
applies the ingest's reason order, so the report's counts are checked against the bytes,
not against the generator's own bookkeeping.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from citylake.config import GenerateConfig
from citylake.sources.generate import generate_city

SMALL = GenerateConfig(
    seed=7, start_date="2026-01-05", days=3, regions=2,
    traffic_sensors=2, energy_meters=2, air_stations=1, bad_record_share=0.002,
)
REQUIRED = ("sensor_id", "ts", "metric", "value")
ZONED_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$")
MIN_TS = datetime(2000, 1, 1, tzinfo=timezone.utc)
UNPARSEABLE = object()


@dataclass
class Rec:
    """One raw row as read back from a landing file."""

    file: str
    folder_date: str
    data: object  # a dict, or UNPARSEABLE
    columns: tuple[str, ...]


# -- an independent reader ------------------------------------------------------------


def _text(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode()


def _csv_recs(path: Path, folder: str) -> list[Rec]:
    lines = _text(path).split("\n")
    assert lines[-1] == "" and all(lines[:-1]), f"{path.name}: blank line or no final newline"
    header = lines[0].split(",")
    out = []
    for line in lines[1:-1]:
        fields = line.split(",")
        if len(fields) > len(header):
            out.append(Rec(path.name, folder, UNPARSEABLE, tuple(header)))
        else:
            fields += [""] * (len(header) - len(fields))
            out.append(Rec(path.name, folder, dict(zip(header, fields)), tuple(header)))
    return out


def _json_recs(path: Path, folder: str) -> list[Rec]:
    lines = _text(path).split("\n")
    assert lines[-1] == "" and all(lines[:-1]), f"{path.name}: blank line or no final newline"
    out = []
    for line in lines[:-1]:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = UNPARSEABLE
        out.append(Rec(path.name, folder, obj if isinstance(obj, dict) else UNPARSEABLE, ()))
    return out


def _parquet_recs(path: Path, folder: str) -> list[Rec]:
    # pyarrow rather than pandas: a null value must stay None, apart from a NaN value.
    table = pq.read_table(path)
    return [Rec(path.name, folder, row, tuple(table.column_names)) for row in table.to_pylist()]


def read_lake(root: Path) -> tuple[list[Rec], dict[str, str]]:
    """All readable rows, and the files that cannot be read (name -> reason)."""
    recs: list[Rec] = []
    rejected: dict[str, str] = {}
    for path in sorted((root / "raw" / "readings").glob("date=*/*")):
        folder = path.parent.name.removeprefix("date=")
        name = path.name
        try:
            if name.endswith((".csv", ".csv.gz")):
                recs += _csv_recs(path, folder)
            elif name.endswith((".jsonl", ".jsonl.gz")):
                recs += _json_recs(path, folder)
            elif name.endswith(".parquet"):
                recs += _parquet_recs(path, folder)
            else:
                rejected[name] = "unsupported_format"
        except (OSError, EOFError, UnicodeDecodeError, ValueError, pa.ArrowException):
            rejected[name] = "unreadable_file"
    return recs, rejected


def _registry_ids(root: Path) -> set[str]:
    ids: set[str] = set()
    for path in (root / "raw" / "sensors").glob("sensors_*.csv"):
        ids |= set(pd.read_csv(path, dtype=str)["sensor_id"])
    return ids


def _parse_ts(text: object) -> datetime | None:
    if not isinstance(text, str) or not ZONED_ISO.match(text):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def reasons_of(rec: Rec, catalogue, registry: set[str], now: datetime) -> list[str]:
    """Every record reason that applies, in the ingest's order (first one wins)."""
    if rec.data is UNPARSEABLE:
        return ["unparseable_line"]
    d = rec.data
    assert isinstance(d, dict)
    if any(d.get(f) is None or d.get(f) == "" for f in REQUIRED):
        return ["missing_field"]
    found = []
    ts = _parse_ts(d["ts"])
    if ts is None:
        found.append("bad_timestamp")
    elif ts < MIN_TS or ts > now + timedelta(days=1):
        found.append("timestamp_out_of_range")
    spec = catalogue.metrics.get(d["metric"])
    if spec is None:
        found.append("unknown_metric")
    value = _as_float(d["value"])
    if value is None:
        found.append("bad_value")
    elif not math.isfinite(value):
        found.append("non_finite_value")
    elif spec is not None and not spec.min <= value <= spec.max:
        found.append("value_out_of_range")
    if d["sensor_id"] not in registry:
        found.append("unknown_sensor")
    return found


@dataclass
class Recount:
    raw_rows: int
    reasons: Counter
    multi_reason: list[Rec]
    accepted: list[tuple[Rec, datetime, float]]
    duplicates: int
    conflicts: int
    rejected: dict[str, str]


def recount(root: Path, catalogue) -> Recount:
    recs, rejected = read_lake(root)
    registry = _registry_ids(root)
    now = datetime.now(timezone.utc)
    reasons: Counter = Counter()
    multi, accepted = [], []
    for rec in recs:
        found = reasons_of(rec, catalogue, registry, now)
        if len(found) > 1:
            multi.append(rec)
        if found:
            reasons[found[0]] += 1
        else:
            d = rec.data
            accepted.append((rec, _parse_ts(d["ts"]).astimezone(timezone.utc), float(d["value"])))
    keys = Counter((r.data["sensor_id"], r.data["metric"], ts, v) for r, ts, v in accepted)
    values_per_reading: dict[tuple, set] = {}
    for (sid, metric, ts, v) in keys:
        values_per_reading.setdefault((sid, metric, ts), set()).add(v)
    return Recount(
        raw_rows=len(recs),
        reasons=reasons,
        multi_reason=multi,
        accepted=accepted,
        duplicates=sum(n - 1 for n in keys.values()),
        conflicts=sum(len(v) - 1 for v in values_per_reading.values()),
        rejected=rejected,
    )


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def city(tmp_path_factory, catalogue):
    root = tmp_path_factory.mktemp("city")
    report = generate_city(root, SMALL, catalogue)
    return root, report, recount(root, catalogue)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- tests ----------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_reruns_overwrite(tmp_path, catalogue):
    generate_city(tmp_path / "a", SMALL, catalogue)
    generate_city(tmp_path / "b", SMALL, catalogue)
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b")
    generate_city(tmp_path / "a", SMALL, catalogue)
    assert _files(tmp_path / "a") == first  # same names, same bytes, nothing added
    other = GenerateConfig(**{**SMALL.__dict__, "seed": 8})
    generate_city(tmp_path / "c", other, catalogue)
    assert _files(tmp_path / "c") != first


def test_start_date_argument_and_composable_days(tmp_path, catalogue):
    """Day 2 of a 3-day run equals day 1 of a run started a day later."""
    generate_city(tmp_path / "full", SMALL, catalogue)
    report = generate_city(tmp_path / "late", SMALL, catalogue, start_date=date(2026, 1, 6))
    assert report.dates[0] == "2026-01-06"
    folder = Path("raw/readings/date=2026-01-07")
    full = {p.name: p.read_bytes() for p in (tmp_path / "full" / folder).iterdir()}
    late = {p.name: p.read_bytes() for p in (tmp_path / "late" / folder).iterdir()}
    assert full == late


def test_every_format_and_extra_columns_present(city):
    root, report, _ = city
    names = [p.name for p in (root / "raw" / "readings").rglob("*") if p.is_file()]
    for suffix in (".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".parquet"):
        assert any(n.endswith(suffix) and n.startswith("readings_") for n in names), suffix
    assert set(report.files_by_format) == {"csv", "csv.gz", "jsonl", "jsonl.gz", "parquet"}
    assert report.files == len(names)
    recs, _ = read_lake(root)
    extras = {c for r in recs if isinstance(r.data, dict) for c in r.data}
    assert {"quality_flag", "firmware"} <= extras
    parquet = next((root / "raw" / "readings").rglob("readings_*.parquet"))
    assert len(pd.read_parquet(parquet).columns) == 5


def test_report_matches_a_recount_of_the_files(city, catalogue):
    root, report, rc = city
    assert json.loads((root / "raw" / "_generation_report.json").read_text())["raw_rows"] == report.raw_rows
    assert rc.raw_rows == report.raw_rows
    assert set(report.expected_quarantine) == set(catalogue.record_reasons)
    for reason in catalogue.record_reasons:
        assert report.expected_quarantine[reason] >= 1, reason
        assert rc.reasons[reason] == report.expected_quarantine[reason], reason
    assert rc.duplicates == report.exact_duplicates >= 2
    assert rc.conflicts == report.conflicting_resends >= 1
    assert len(rc.accepted) - rc.duplicates == report.expected_accepted
    assert report.expected_accepted == (
        report.raw_rows - sum(report.expected_quarantine.values()) - report.exact_duplicates
    )
    assert rc.rejected == report.rejected_files
    assert sorted(report.rejected_files.values()) == ["unreadable_file", "unreadable_file", "unsupported_format"]


def test_each_bad_record_fails_exactly_one_check(city):
    _, _, rc = city
    assert rc.multi_reason == []


def test_truncated_gzip_starts_readable(city):
    """The corrupt file's damage is at the end: a reader must not trust the first lines."""
    root, report, _ = city
    name = next(n for n in report.rejected_files if n.endswith(".csv.gz"))
    path = next((root / "raw" / "readings").rglob(name))
    with gzip.open(path, "rt") as handle:
        assert handle.readline().startswith("sensor_id,ts,metric,value")
        with pytest.raises(EOFError):
            handle.read()


def test_registry_history(city):
    root, report, rc = city
    files = sorted((root / "raw" / "sensors").glob("sensors_*.csv"))
    assert [f.name for f in files] == report.registry_files and len(files) == 2
    before, after = (pd.read_csv(f, dtype=str).set_index("sensor_id") for f in files)
    moved = report.moved_sensor["sensor_id"]
    assert before.at[moved, "region"] != after.at[moved, "region"] == report.moved_sensor["to_region"]
    new = report.new_sensor["sensor_id"]
    assert new not in before.index and new in after.index
    assert {"sensor_id", "region", "lat", "lon", "kind", "install_date"} <= set(after.reset_index().columns)
    first_seen = min(ts for r, ts, _ in rc.accepted if r.data["sensor_id"] == new)
    assert first_seen.date().isoformat() == report.new_sensor["from_date"]


def test_good_values_within_physical_range(city, catalogue):
    _, _, rc = city
    assert rc.accepted
    for rec, _, value in rc.accepted:
        spec = catalogue.metric(rec.data["metric"])
        assert spec.min <= value <= spec.max


def test_signals_have_daily_shape(city):
    _, report, rc = city
    frame = pd.DataFrame(
        [(r.data["metric"], ts, v) for r, ts, v in rc.accepted], columns=["metric", "ts", "value"]
    )
    local_hour = (frame["ts"].map(lambda t: t.hour) + 1) % 24  # the city runs on UTC+1
    by_hour = frame.assign(h=local_hour).groupby(["metric", "h"])["value"].median()
    assert by_hour["traffic_flow"][8] > 4 * by_hour["traffic_flow"][3]  # morning rush
    assert by_hour["traffic_speed"][8] < by_hour["traffic_speed"][3]  # congestion
    assert by_hour["o3"][14] > by_hour["o3"][8]  # afternoon ozone, morning titration
    assert by_hour["temperature"][15] > by_hour["temperature"][5]
    assert report.incidents and report.spikes and report.outages


def test_offsets_give_the_right_instant(city, catalogue):
    root, _, rc = city
    zones = Counter(r.data["ts"][19:] for r, _, _ in rc.accepted)
    assert {"Z", "+01:00", "-05:00", "+05:30"} <= set(zones)
    crossing = 0
    for rec, ts, _ in rc.accepted:
        # The folder is the UTC date of the readings in it, whatever the written offset.
        assert ts.date().isoformat() == rec.folder_date, (rec.file, rec.data["ts"])
        assert int(ts.timestamp()) % catalogue.metric(rec.data["metric"]).interval_s == 0
        crossing += rec.data["ts"][:10] != rec.folder_date
    assert crossing > 0  # some local dates differ from the UTC folder date
    # A known instant, written at -05:00, reads back as 00:00Z.
    sample = [r for r, ts, _ in rc.accepted
              if r.data["ts"].endswith("-05:00") and ts.hour == 0 and ts.minute == 0]
    assert sample and all(r.data["ts"][11:19] == "19:00:00" for r in sample)
