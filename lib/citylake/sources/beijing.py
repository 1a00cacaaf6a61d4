"""Import the Beijing Multi-Site Air-Quality data (UCI, CC BY 4.0) into the landing format.

Source: one CSV per site, ``PRSA_Data_<Site>_20130301-20170228.csv``, hourly readings
with ``year, month, day, hour`` in China Standard Time (UTC+8) and ``NA`` for missing.

Written under ``<lake_root>/raw``::

    readings/date=YYYY-MM-DD/beijing_YYYYMMDD.csv   all stations' readings of that UTC date
    sensors/sensors_beijing.csv                      the 12 stations (always all 12)
    _beijing_import_report.json                      counts written / NA skipped

Each reading row is ``sensor_id,ts,metric,value,wind_direction``: ``ts`` is the local
time with its ``+08:00`` offset (the ingest stores the UTC instant), and the source's
``wd`` (16-point compass text, empty when NA) is kept as the extra column
``wind_direction`` on every row of that station-hour. NA readings are skipped, not
written. Values are written as the source has them (real data: a few are outside the
catalogue's physical range and will be quarantined by the ingest; the report counts them).

When a target file already exists (an earlier import of a neighbouring range or another
set of stations), its rows are merged with the new ones (new rows win for the same
sensor, metric and instant), so consecutive imports compose into the same files a single
import would write.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from citylake.catalogue import Catalogue, load_catalogue

LOCAL_OFFSET = "+08:00"
LOCAL_OFFSET_HOURS = 8
#: Source column -> catalogue metric, in the order rows of one station-hour are written.
METRIC_MAP: dict[str, str] = {
    "PM2.5": "pm25",
    "PM10": "pm10",
    "SO2": "so2",
    "NO2": "no2",
    "CO": "co",
    "O3": "o3",
    "TEMP": "temperature",
    "PRES": "pressure",
    "DEWP": "dew_point",
    "RAIN": "rain",
    "WSPM": "wind_speed",
}
#: Approximate site coordinates (lat, lon in degrees) of the 12 monitoring stations.
STATIONS: dict[str, tuple[float, float]] = {
    "Aotizhongxin": (39.982, 116.397),
    "Changping": (40.217, 116.230),
    "Dingling": (40.292, 116.220),
    "Dongsi": (39.929, 116.417),
    "Guanyuan": (39.929, 116.339),
    "Gucheng": (39.914, 116.184),
    "Huairou": (40.328, 116.628),
    "Nongzhanguan": (39.937, 116.461),
    "Shunyi": (40.127, 116.655),
    "Tiantan": (39.886, 116.407),
    "Wanliu": (39.987, 116.287),
    "Wanshouxigong": (39.878, 116.352),
}
SUBURBAN = frozenset({"Changping", "Dingling", "Huairou", "Shunyi"})
FIRST_DAY = date(2013, 3, 1)  # first reading of the published data set
COLUMNS = ("sensor_id", "ts", "metric", "value", "wind_direction")
#: The source's 16 compass points; "" stands for NA.
WIND_DIRECTIONS: tuple[str, ...] = (
    "", "N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE",
    "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW",
)


@dataclass
class BeijingImportReport:
    """Counts of one import. ``by_metric`` / ``by_station``: {"written": n, "na": n}."""

    stations: list[str]
    start: str | None
    end: str | None
    first_ts: str | None
    last_ts: str | None
    source_rows: int
    rows_written: int
    na_skipped: int
    files: int
    dates: list[str]
    by_metric: dict[str, dict[str, int]]
    by_station: dict[str, dict[str, int]]
    #: Written readings outside the catalogue's physical range (the ingest quarantines them).
    out_of_range: dict[str, int] = field(default_factory=dict)
    registry_file: str = "raw/sensors/sensors_beijing.csv"

    def to_json(self) -> str:
        """The report as stable, pretty-printed JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def __str__(self) -> str:
        return (f"{len(self.stations)} station(s), local {self.first_ts} .. {self.last_ts}: "
                f"{self.rows_written} readings in {self.files} file(s), {self.na_skipped} NA skipped")


def sensor_id(station: str) -> str:
    """``'Aotizhongxin'`` -> ``'bj-aotizhongxin'``."""
    return f"bj-{station.lower()}"


def region(station: str) -> str:
    """``beijing-suburban`` for the four outer sites, else ``beijing-urban``."""
    return "beijing-suburban" if station in SUBURBAN else "beijing-urban"


def _select_stations(stations: list[str] | None) -> list[str]:
    if stations is None:
        return sorted(STATIONS)
    by_key = {k.lower(): k for k in STATIONS} | {sensor_id(k): k for k in STATIONS}
    unknown = [s for s in stations if s.lower() not in by_key]
    if unknown:
        raise ValueError(f"unknown Beijing station(s) {unknown}; known: {sorted(STATIONS)}")
    return sorted({by_key[s.lower()] for s in stations})


def _source_file(src_dir: Path, station: str) -> Path:
    matches = sorted(src_dir.glob(f"PRSA_Data_{station}_*.csv"))
    if not matches:
        raise FileNotFoundError(f"no source CSV for station {station} in {src_dir}")
    return matches[0]


def _read_station(path: Path, start: date | None, end: date | None) -> pd.DataFrame:
    """One station's rows within the local-date range, with a UTC epoch-hour column."""
    frame = pd.read_csv(
        path,
        usecols=["year", "month", "day", "hour", *METRIC_MAP, "wd"],
        na_values=["NA"],
        keep_default_na=False,
        dtype={c: "float64" for c in METRIC_MAP} | {"wd": "string"},
    )
    ymd = frame["year"] * 10000 + frame["month"] * 100 + frame["day"]
    keep = np.ones(len(frame), dtype=bool)
    if start is not None:
        keep &= ymd.to_numpy() >= start.year * 10000 + start.month * 100 + start.day
    if end is not None:
        keep &= ymd.to_numpy() <= end.year * 10000 + end.month * 100 + end.day
    frame = frame.loc[keep].reset_index(drop=True)
    local = pd.to_datetime(frame[["year", "month", "day", "hour"]])
    frame["local_hour"] = local.to_numpy().astype("datetime64[h]").astype(np.int64)
    return frame


def _long_rows(frame: pd.DataFrame, station_idx: int) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """Non-NA readings of one station as columnar arrays, and (written, na) per metric."""
    parts: dict[str, list[np.ndarray]] = {"hour": [], "metric": [], "value": [], "wd": []}
    counts: dict[str, tuple[int, int]] = {}
    wd = pd.Categorical(frame["wd"].fillna("").astype(str), categories=WIND_DIRECTIONS).codes
    if (wd < 0).any():
        raise ValueError(f"unexpected wind direction(s): {sorted(set(frame['wd'].dropna()) - set(WIND_DIRECTIONS))}")
    for m_idx, (column, metric) in enumerate(METRIC_MAP.items()):
        values = frame[column].to_numpy()
        ok = ~np.isnan(values)
        counts[metric] = (int(ok.sum()), int((~ok).sum()))
        parts["hour"].append(frame["local_hour"].to_numpy()[ok])
        parts["metric"].append(np.full(int(ok.sum()), m_idx, dtype=np.int32))
        parts["value"].append(values[ok])
        parts["wd"].append(wd[ok].astype(np.int32))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["station"] = np.full(len(arrays["hour"]), station_idx, dtype=np.int32)
    return arrays, counts


def _dictionary(codes: np.ndarray, words: list[str]) -> pa.Array:
    """Strings from small vocabularies, expanded in Arrow (no per-row Python objects)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(words)).cast(pa.string())


def _table(arrays: dict[str, np.ndarray], station_names: list[str]) -> tuple[pa.Table, np.ndarray]:
    """All readings sorted by (UTC instant, station, metric order), and their UTC day numbers."""
    order = np.lexsort((arrays["metric"], arrays["station"], arrays["hour"]))
    hours = arrays["hour"][order]
    first = int(hours.min()) if len(hours) else 0
    span = np.arange(first, (int(hours.max()) + 1) if len(hours) else first, dtype=np.int64)
    # +08:00 local clock text: one string per hour of the range, indexed per row.
    hour_text = [t + LOCAL_OFFSET for t in span.astype("datetime64[h]").astype("datetime64[s]").astype(str).tolist()]
    table = pa.table({
        "sensor_id": _dictionary(arrays["station"][order], [sensor_id(s) for s in station_names]),
        "ts": _dictionary(hours - first, hour_text),
        "metric": _dictionary(arrays["metric"][order], list(METRIC_MAP.values())),
        "value": pa.array(arrays["value"][order], type=pa.float64()),
        "wind_direction": _dictionary(arrays["wd"][order], list(WIND_DIRECTIONS)),
    })
    return table, (hours - LOCAL_OFFSET_HOURS) // 24


def _csv_bytes(table: pa.Table) -> bytes:
    """Header-less CSV; nothing needs quoting (no commas or quotes in any field)."""
    sink = io.BytesIO()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return sink.getvalue()


def _merge_existing(path: Path, new: pa.Table) -> bytes:
    """CSV body: an existing file's rows united with ``new`` (new wins), canonical order."""
    # Round-trip the new rows through the same CSV text so both sides compare as strings.
    fresh = pd.read_csv(io.BytesIO(_csv_bytes(new)), names=list(COLUMNS), dtype=str, keep_default_na=False)
    old = pd.read_csv(path, dtype=str, keep_default_na=False)
    both = pd.concat([old, fresh], ignore_index=True).drop_duplicates(["sensor_id", "metric", "ts"], keep="last")
    rank = {m: i for i, m in enumerate(METRIC_MAP.values())}
    both = both.assign(
        _instant=pd.to_datetime(both["ts"], utc=True, format="ISO8601"),
        _rank=both["metric"].map(rank).fillna(len(rank)),
    ).sort_values(["_instant", "sensor_id", "_rank"], kind="mergesort")
    return both.to_csv(index=False, header=False, columns=list(COLUMNS), lineterminator="\n").encode()


def _write(path: Path, data: bytes) -> None:
    """Write atomically; the temporary name starts with '.' so a lister skips it.

    An identical existing file is left alone, so a re-import does not even touch mtimes
    (the registry file's mtime is its effective date for the ingest).
    """
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_days(table: pa.Table, utc_day: np.ndarray, readings: Path) -> list[str]:
    """One CSV per UTC date; returns the ISO dates written."""
    header = (",".join(COLUMNS) + "\n").encode()
    body = _csv_bytes(table)
    # Rows are sorted by instant, so each UTC date is one contiguous block of lines:
    # cut the text at line ends instead of formatting every day separately.
    ends = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == ord("\n"))
    day_values, starts = np.unique(utc_day, return_index=True)
    bounds = [int(b) for b in starts] + [len(utc_day)]
    dates = []
    for k, day_num in enumerate(day_values):
        lo, hi = bounds[k], bounds[k + 1]
        day = str(np.datetime64(int(day_num), "D"))
        path = readings / f"date={day}" / f"beijing_{day.replace('-', '')}.csv"
        if path.exists():
            _write(path, header + _merge_existing(path, table.slice(lo, hi - lo)))
        else:
            first = 0 if lo == 0 else int(ends[lo - 1]) + 1
            _write(path, header + body[first: int(ends[hi - 1]) + 1])
        dates.append(day)
    return dates


def _registry_csv() -> bytes:
    lines = ["sensor_id,region,lat,lon,kind,install_date,station"]
    for name, (lat, lon) in sorted(STATIONS.items()):
        lines.append(f"{sensor_id(name)},{region(name)},{lat:.3f},{lon:.3f},air,{FIRST_DAY.isoformat()},{name}")
    return ("\n".join(lines) + "\n").encode()


def _out_of_range(arrays: dict[str, np.ndarray], catalogue: Catalogue) -> dict[str, int]:
    counts = {}
    for m_idx, metric in enumerate(METRIC_MAP.values()):
        spec = catalogue.metric(metric)
        values = arrays["value"][arrays["metric"] == m_idx]
        counts[metric] = int(((values < spec.min) | (values > spec.max)).sum())
    return counts


def import_beijing(
    src_dir: str | Path,
    lake_root: str | Path,
    start: date | None = None,
    end: date | None = None,
    stations: list[str] | None = None,
    catalogue: Catalogue | None = None,
) -> BeijingImportReport:
    """Convert the Beijing CSVs in ``src_dir`` to landing files under ``<lake_root>/raw``.

    ``start``/``end`` are inclusive **local** (UTC+8) dates filtering the source rows;
    ``stations`` are site names (``'Dongsi'``) or sensor ids (``'bj-dongsi'``), default all
    12. Units are the catalogue's (ug/m3, degC, hPa, mm, m/s). NA readings are skipped and
    counted. Returns the report, also written to ``raw/_beijing_import_report.json``.
    """
    src, root = Path(src_dir), Path(lake_root)
    catalogue = catalogue or load_catalogue()
    names = _select_stations(stations)
    if not names:
        raise ValueError("import_beijing: no stations selected")
    by_metric = {m: {"written": 0, "na": 0} for m in METRIC_MAP.values()}
    by_station: dict[str, dict[str, int]] = {}
    parts = []
    source_rows = 0
    for idx, name in enumerate(names):
        frame = _read_station(_source_file(src, name), start, end)
        source_rows += len(frame)
        arrays, counts = _long_rows(frame, idx)
        parts.append(arrays)
        for metric, (written, na) in counts.items():
            by_metric[metric]["written"] += written
            by_metric[metric]["na"] += na
        by_station[sensor_id(name)] = {"written": sum(c[0] for c in counts.values()),
                                       "na": sum(c[1] for c in counts.values())}
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    table, utc_day = _table(arrays, names)
    dates = _write_days(table, utc_day, root / "raw" / "readings") if table.num_rows else []
    _write(root / "raw" / "sensors" / "sensors_beijing.csv", _registry_csv())
    ts = table.column("ts")
    report = BeijingImportReport(
        stations=[sensor_id(n) for n in names],
        start=start.isoformat() if start else None,
        end=end.isoformat() if end else None,
        first_ts=ts[0].as_py() if table.num_rows else None,
        last_ts=ts[-1].as_py() if table.num_rows else None,
        source_rows=source_rows,
        rows_written=table.num_rows,
        na_skipped=sum(v["na"] for v in by_metric.values()),
        files=len(dates),
        dates=dates,
        by_metric=by_metric,
        by_station=by_station,
        out_of_range=_out_of_range(arrays, catalogue),
    )
    _write(root / "raw" / "_beijing_import_report.json", report.to_json().encode())
    return report
