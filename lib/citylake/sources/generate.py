"""The sample city: deterministic synthetic sensor readings in the raw landing format.

``generate_city`` writes, under ``<lake_root>/raw``::

    sensors/sensors_YYYYMMDD.csv                       registry snapshot before the run
    sensors/sensors_YYYYMMDD.csv (a later date)        one sensor moved, one sensor added
    readings/date=YYYY-MM-DD/
        readings_<kind>_<region>_<YYYYMMDD>_<HH>.<ext> one file per kind, region and UTC
                                                       half day (HH = 00 or 12; more, shorter
                                                       parts in a city of < 3 kind-regions)
        resend_<YYYYMMDD>.<ext>                        conflicting re-sends and copies of
                                                       readings already sent (exact duplicates)
        upload_truncated_<YYYYMMDD>.csv.gz             first day only: corrupt gzip
        export_<YYYYMMDD>.parquet                      first day only: CSV text, not Parquet
        summary_<YYYYMMDD>.xlsx                        first day only: unsupported suffix
    _generation_report.json                            what was injected, for tests

``<ext>`` cycles through csv, csv.gz, jsonl, jsonl.gz and parquet, so every format holds
every kind of sensor over the days. Within a date folder, file-name order is arrival
order (``readings_*`` before ``resend_*``).

Sensor counts in :class:`~citylake.config.GenerateConfig` are **per region**.
Everything is a pure function of the seed, the configured city start date and the
day: a date folder has the same bytes whichever run window produced it (the run-level
rejected files aside), so runs over consecutive windows compose.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from citylake.catalogue import Catalogue, MetricSpec
from citylake.config import GenerateConfig

# -- constant tables ------------------------------------------------------------------

KINDS: tuple[str, ...] = ("traffic", "energy", "air")
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "traffic": ("traffic_flow", "traffic_speed"),
    "energy": ("energy_kwh",),
    "air": ("pm25", "pm10", "no2", "o3", "temperature"),
}
REGION_NAMES: tuple[str, ...] = ("north", "centre", "south", "east", "west", "harbour")
#: Degrees (lat, lon) from the city centre of each named region.
REGION_OFFSETS: dict[str, tuple[float, float]] = {
    "north": (0.06, 0.0), "centre": (0.0, 0.0), "south": (-0.06, 0.0),
    "east": (0.0, 0.09), "west": (0.0, -0.09), "harbour": (-0.04, 0.07),
}
FORMATS: tuple[str, ...] = ("csv", "csv.gz", "jsonl", "jsonl.gz", "parquet")
TEXT_FORMATS = frozenset({"csv", "csv.gz", "jsonl", "jsonl.gz"})
REQUIRED: tuple[str, ...] = ("sensor_id", "ts", "metric", "value")
#: Zone suffixes of the ts strings, one per file. Length 6 so it does not cycle in step
#: with the 5 formats.
OFFSETS: tuple[str, ...] = ("Z", "+01:00", "+00:00", "-05:00", "Z", "+05:30")
EXTRA_COLUMNS: tuple[str | None, ...] = (None, "quality_flag", "firmware")
#: Record reasons in the order the ingest checks them (quarantine_reasons.yaml).
RECORD_REASONS: tuple[str, ...] = (
    "unparseable_line",
    "missing_field",
    "bad_timestamp",
    "timestamp_out_of_range",
    "unknown_metric",
    "bad_value",
    "non_finite_value",
    "value_out_of_range",
    "unknown_sensor",
)
#: Reasons that can only be written in text files (Parquet rows always parse, and its
#: value column is a double).
TEXT_ONLY_REASONS = frozenset({"unparseable_line", "bad_value"})
DECIMALS: dict[str, int] = {"traffic_flow": 0, "traffic_speed": 1, "energy_kwh": 3, "temperature": 2}
#: The city's clock (winter time in central Europe) drives the daily cycles.
CITY_UTC_OFFSET_H = 1.0
CITY_CENTRE: tuple[float, float] = (50.0, 10.0)
UNKNOWN_METRICS: tuple[str, ...] = ("humidity", "noise_db", "traffic_flw", "co2")
BAD_VALUES: tuple[str, ...] = ("abc", "12.5.1", "--", "one")
OUT_OF_RANGE_TS: tuple[str, ...] = (
    "1999-12-31T23:00:00Z",
    "1970-01-01T00:00:00Z",
    "2099-01-05T08:00:00Z",
    "1999-06-15T12:00:00+02:00",
)
SECONDS_PER_DAY = 86_400


# -- report ---------------------------------------------------------------------------


@dataclass
class GenerationReport:
    """What ``generate_city`` wrote and what the ingest stage should make of it.

    Counting rules: a raw row is one data line of a CSV/JSON file (the CSV header is not a
    row; no blank lines are written) or one Parquet row, in readable files only.
    ``expected_accepted = raw_rows - sum(expected_quarantine) - exact_duplicates``;
    conflicting re-sends are accepted rows (bronze keeps them, silver resolves them).
    An exact duplicate has the same sensor_id, ts (same string, so the same instant),
    metric and value as an earlier row; its extra columns may differ.
    """

    seed: int
    start_date: str
    days: int
    dates: list[str]
    sensors: int
    files: int
    files_by_format: dict[str, int]
    raw_rows: int
    expected_quarantine: dict[str, int]
    exact_duplicates: int
    conflicting_resends: int
    rejected_files: dict[str, str]
    expected_accepted: int
    registry_files: list[str]
    moved_sensor: dict[str, str]
    new_sensor: dict[str, str]
    #: Informational event lists (UTC ISO times) for silver/gold tests.
    outages: list[dict[str, str]] = field(default_factory=list)
    incidents: list[dict[str, str]] = field(default_factory=list)
    spikes: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """The report as stable, pretty-printed JSON (sorted keys, trailing newline)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def __str__(self) -> str:
        return (f"{self.files} files, {self.raw_rows} raw rows ({self.expected_accepted} to accept, "
                f"{sum(self.expected_quarantine.values())} to quarantine, {self.exact_duplicates} duplicates), "
                f"{self.sensors} sensors, {len(self.dates)} day(s) from {self.start_date}")


# -- sensors and registry ---------------------------------------------------------------


@dataclass(frozen=True)
class Sensor:
    """One registry entry. ``lat``/``lon`` in degrees."""

    sensor_id: str
    kind: str
    region: str
    lat: float
    lon: float
    install_date: date


@dataclass(frozen=True)
class Registry:
    """The two registry snapshots: before and from ``event_date`` on."""

    before: tuple[Sensor, ...]
    after: tuple[Sensor, ...]
    initial_file_date: date
    event_date: date
    moved_id: str
    moved_from: str
    moved_to: str
    new_id: str

    def on(self, day: date) -> list[Sensor]:
        """Sensors reporting on ``day``, with the region they had that day."""
        sensors = self.after if day >= self.event_date else self.before
        return [s for s in sensors if s.install_date <= day]


@dataclass(frozen=True)
class FileSpec:
    """Shape of one landing file: name, format, ts zone suffix and column order."""

    name: str
    fmt: str
    offset: str
    columns: tuple[str, ...]

    @property
    def extra(self) -> str | None:
        extras = [c for c in self.columns if c not in REQUIRED]
        return extras[0] if extras else None


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator keyed by ``keys``, so one sensor's draws do not shift when others change."""
    words = [seed & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def _region_names(n: int) -> list[str]:
    if n <= len(REGION_NAMES):
        return list(REGION_NAMES[:n])
    return [f"region-{i + 1:02d}" for i in range(n)]


def _region_centre(region: str, index: int, n: int) -> tuple[float, float]:
    """Named regions sit where their name says; numbered ones on a ring around the centre."""
    lat0, lon0 = CITY_CENTRE
    if region in REGION_OFFSETS:
        dlat, dlon = REGION_OFFSETS[region]
        return lat0 + dlat, lon0 + dlon
    angle = 2 * math.pi * index / max(1, n)
    return lat0 + 0.06 * math.cos(angle), lon0 + 0.09 * math.sin(angle)


def _place(seed: int, sensor_id: str, region: str, centre: tuple[float, float], kind: str,
           install: date) -> Sensor:
    rng = _rng(seed, "place", sensor_id, region)
    lat = round(centre[0] + rng.uniform(-0.015, 0.015), 5)
    lon = round(centre[1] + rng.uniform(-0.02, 0.02), 5)
    return Sensor(sensor_id, kind, region, lat, lon, install)


def build_registry(cfg: GenerateConfig, city_start: date) -> Registry:
    """The sample city's sensors: ``cfg`` counts are per region.

    On ``event_date`` (``city_start + days // 2``) one sensor (the first air station, else
    the first energy meter or traffic detector) moves to the next region and a new traffic
    detector appears in the first region; it reports from that date on.
    """
    names = _region_names(cfg.regions)
    per_kind = {"traffic": cfg.traffic_sensors, "energy": cfg.energy_meters, "air": cfg.air_stations}
    before: list[Sensor] = []
    for r, region in enumerate(names):
        centre = _region_centre(region, r, len(names))
        for kind in KINDS:
            for i in range(per_kind[kind]):
                sid = f"{kind}-{region}-{i + 1:02d}"
                install = city_start - timedelta(days=int(_rng(cfg.seed, "install", sid).integers(30, 2000)))
                before.append(_place(cfg.seed, sid, region, centre, kind, install))
    event_date = city_start + timedelta(days=max(0, cfg.days) // 2)
    mover = next((s for kind in ("air", "energy", "traffic") for s in before if s.kind == kind), None)
    if mover is None:
        raise ValueError("generate: the city needs at least one sensor (check the per-region counts)")
    # A one-region city still needs somewhere to move to: the second name of the list.
    targets = _region_names(max(2, cfg.regions))
    t_idx = (names.index(mover.region) + 1) % len(targets)
    target = targets[t_idx]
    moved = _place(cfg.seed, mover.sensor_id, target, _region_centre(target, t_idx, len(targets)),
                   mover.kind, mover.install_date)
    new_id = f"traffic-{names[0]}-{cfg.traffic_sensors + 1:02d}"
    new = _place(cfg.seed, new_id, names[0], _region_centre(names[0], 0, len(names)), "traffic", event_date)
    after = [moved if s.sensor_id == mover.sensor_id else s for s in before] + [new]
    return Registry(
        before=tuple(sorted(before, key=lambda s: s.sensor_id)),
        after=tuple(sorted(after, key=lambda s: s.sensor_id)),
        initial_file_date=city_start - timedelta(days=1),
        event_date=event_date,
        moved_id=mover.sensor_id,
        moved_from=mover.region,
        moved_to=target,
        new_id=new_id,
    )


def _registry_csv(sensors: tuple[Sensor, ...]) -> bytes:
    lines = ["sensor_id,region,lat,lon,kind,install_date"]
    lines += [
        f"{s.sensor_id},{s.region},{s.lat:.5f},{s.lon:.5f},{s.kind},{s.install_date.isoformat()}"
        for s in sensors
    ]
    return ("\n".join(lines) + "\n").encode()


# -- signals --------------------------------------------------------------------------


def _local_clock(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local hour of day (float h), weekend flag and day of year for UTC epoch seconds."""
    local = t.astype(np.float64) + CITY_UTC_OFFSET_H * 3600.0
    hour = (local % SECONDS_PER_DAY) / 3600.0
    weekday = ((local // SECONDS_PER_DAY).astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    doy = (local / SECONDS_PER_DAY) % 365.2425
    return hour, weekday >= 5, doy


def _bump(hour: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A Gaussian bump on the 24 h circle (so a peak near midnight wraps)."""
    d = (hour - centre + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (d / width) ** 2)


def _traffic_profile(hour: np.ndarray, weekend: np.ndarray) -> np.ndarray:
    """Relative traffic load: two weekday rush hours, a flatter, lower weekend."""
    weekday = 0.05 + 0.95 * _bump(hour, 8.0, 1.1) + 0.85 * _bump(hour, 17.5, 1.5) + 0.45 * _bump(hour, 13.0, 3.5)
    holiday = 0.05 + 0.55 * _bump(hour, 13.5, 3.2) + 0.15 * _bump(hour, 20.5, 1.5)
    return np.where(weekend, holiday, weekday)


def _energy_profile(hour: np.ndarray, weekend: np.ndarray) -> np.ndarray:
    """Relative consumption: base load, morning shoulder, evening peak."""
    weekday = 0.45 + 0.30 * _bump(hour, 8.0, 1.5) + 0.55 * _bump(hour, 19.0, 2.0) + 0.25 * _bump(hour, 13.0, 3.0)
    holiday = 0.50 + 0.30 * _bump(hour, 11.0, 2.5) + 0.60 * _bump(hour, 19.0, 2.2)
    return np.where(weekend, holiday, weekday)


def _seasonal_temperature(doy: np.ndarray) -> np.ndarray:
    """Daily mean temperature in degC: about -2 in mid January, 22 in mid July."""
    return 10.0 - 12.0 * np.cos(2 * np.pi * (doy - 15.0) / 365.25)


def _sun(doy: np.ndarray) -> np.ndarray:
    """Relative solar strength over the year, 0.1 in winter to 1 in summer."""
    return 0.55 + 0.45 * np.sin(2 * np.pi * (doy - 80.0) / 365.25)


def _slow(seed: int, key: str, t: np.ndarray) -> np.ndarray:
    """Unit-variance weather/pollution episodes lasting days: a few slow sinusoids.

    A closed form of time (not a recursion), so every day is continuous with its
    neighbours whichever run window generates it.
    """
    rng = _rng(seed, "slow", key)
    periods = rng.uniform(20.0, 150.0, 3) * 3600.0
    phases = rng.uniform(0.0, 2 * np.pi, 3)
    amps = rng.uniform(0.5, 1.0, 3)
    amps = amps / np.sqrt((amps**2).sum() / 2.0)
    return sum(a * np.sin(2 * np.pi * t / p + f) for a, p, f in zip(amps, periods, phases))


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """Stationary unit-variance AR(1) noise: short-term persistence within a day."""
    shocks = rng.standard_normal(n) * math.sqrt(1.0 - phi * phi)
    out = np.empty(n)
    prev = rng.standard_normal()
    for i in range(n):
        prev = phi * prev + shocks[i]
        out[i] = prev
    return out


def _sensor_params(seed: int, sensor_id: str) -> dict[str, Any]:
    """Static per-sensor parameters (capacity, free speed, meter size, ...)."""
    rng = _rng(seed, "params", sensor_id)
    return {
        "cap": rng.uniform(40.0, 140.0),  # vehicles per 5 min at the peak
        "vf": rng.uniform(45.0, 100.0),  # free-flow speed, km/h
        "base": rng.uniform(15.0, 250.0),  # kWh per 15 min at full profile
        "sf": rng.uniform(0.8, 1.25),  # site factor for pollutants
        "coarse": rng.uniform(1.3, 1.8),  # pm10 / pm25
        "t_off": rng.uniform(-0.6, 0.6),  # degC, site vs region
        "firmware": f"fw-{rng.integers(1, 4)}.{rng.integers(0, 10)}.{rng.integers(0, 20)}",
    }


def _traffic_values(p: dict[str, Any], t: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    hour, weekend, _ = _local_clock(t)
    n = len(t)
    flow = p["cap"] * _traffic_profile(hour, weekend) * np.exp(
        0.12 * rng.standard_normal(n) + 0.08 * _ar1(rng, n, 0.9)
    )
    # Speed falls as the road fills (a crude speed-flow curve).
    load = np.clip(flow / (p["cap"] * 1.1), 0.0, 1.3)
    speed = p["vf"] * (1.0 - 0.55 * load**2) * np.exp(0.05 * rng.standard_normal(n))
    return {"traffic_flow": flow, "traffic_speed": speed}


def _energy_values(p: dict[str, Any], t: np.ndarray, rng: np.random.Generator, seed: int,
                   region: str) -> dict[str, np.ndarray]:
    hour, weekend, doy = _local_clock(t)
    n = len(t)
    temp = _seasonal_temperature(doy) + 3.0 * _slow(seed, f"weather-{region}", t)
    heating = 1.0 + 0.025 * np.clip(15.0 - temp, 0.0, None)
    energy = p["base"] * _energy_profile(hour, weekend) * heating * np.exp(
        0.06 * rng.standard_normal(n) + 0.05 * _ar1(rng, n, 0.8)
    )
    return {"energy_kwh": energy}


def _air_values(p: dict[str, Any], t: np.ndarray, rng: np.random.Generator, seed: int,
                region: str) -> dict[str, np.ndarray]:
    hour, weekend, doy = _local_clock(t)
    n = len(t)
    # Pollutants lag the traffic by an hour or two (emission builds up, disperses slowly).
    tidx = (0.5 * _traffic_profile(hour, weekend) + 0.3 * _traffic_profile((hour - 1) % 24, weekend)
            + 0.2 * _traffic_profile((hour - 2) % 24, weekend))
    episode = _slow(seed, f"episode-{region}", t)
    sun = _sun(doy)
    no2 = (10.0 + 45.0 * tidx) * p["sf"] * np.exp(0.3 * episode + 0.12 * _ar1(rng, n, 0.8)
                                                 + 0.06 * rng.standard_normal(n))
    pm25 = ((5.0 + 18.0 * tidx) * p["sf"] * np.exp(0.55 * episode) * (1.0 + 0.35 * _bump(hour, 22.0, 3.0))
            * (1.0 + 0.4 * (1.0 - sun)) * np.exp(0.15 * _ar1(rng, n, 0.85) + 0.08 * rng.standard_normal(n)))
    pm10 = pm25 * p["coarse"] * np.exp(0.08 * rng.standard_normal(n)) + 4.0
    daylight = np.clip(np.sin(np.pi * (hour - 8.0) / 13.0), 0.0, 1.0) ** 1.5
    # NO2 titrates ozone; sunshine makes it (afternoon peak).
    o3 = ((30.0 + 20.0 * sun) * np.exp(-0.012 * no2) + 80.0 * sun * daylight) * np.exp(
        0.1 * rng.standard_normal(n)
    )
    temperature = (_seasonal_temperature(doy) + 3.0 * _slow(seed, f"weather-{region}", t)
                   + 4.0 * np.sin(2 * np.pi * (hour - 9.0) / 24.0) + p["t_off"]
                   + 0.3 * rng.standard_normal(n))
    return {"pm25": pm25, "pm10": pm10, "no2": no2, "o3": o3, "temperature": temperature}


def _finish(values: np.ndarray, spec: MetricSpec) -> np.ndarray:
    """Clip to the physical range and round to the metric's resolution (no -0.0)."""
    return np.round(np.clip(values, spec.min, spec.max), DECIMALS.get(spec.name, 1)) + 0.0


def _day_grid(day: date, interval_s: int) -> np.ndarray:
    t0 = _epoch(day)
    return t0 + np.arange(SECONDS_PER_DAY // interval_s, dtype=np.int64) * interval_s


def _epoch(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp())


def _good_readings(day: date, sensors: list[Sensor], seed: int, catalogue: Catalogue) -> pd.DataFrame:
    """Every reading the sensors of ``day`` would send, before events and defects."""
    parts: list[pd.DataFrame] = []
    for s in sensors:
        p = _sensor_params(seed, s.sensor_id)
        rng = _rng(seed, "values", s.sensor_id, day.isoformat())
        metrics = KIND_METRICS[s.kind]
        t = _day_grid(day, catalogue.metric(metrics[0]).interval_s)
        if any(catalogue.metric(m).interval_s != catalogue.metric(metrics[0]).interval_s for m in metrics):
            raise ValueError(f"generate: metrics of kind {s.kind} must share one interval")
        if s.kind == "traffic":
            values = _traffic_values(p, t, rng)
        elif s.kind == "energy":
            values = _energy_values(p, t, rng, seed, s.region)
        else:
            values = _air_values(p, t, rng, seed, s.region)
        for metric in metrics:
            parts.append(pd.DataFrame({
                "sensor_id": s.sensor_id, "kind": s.kind, "region": s.region, "metric": metric,
                "t": t, "value": _finish(values[metric], catalogue.metric(metric)),
            }))
    if not parts:
        return pd.DataFrame(columns=["sensor_id", "kind", "region", "metric", "t", "value", "event"])
    frame = pd.concat(parts, ignore_index=True)
    frame["event"] = False
    return frame


# -- events: outages, incidents, spikes ---------------------------------------------------


def _iso(t: int) -> str:
    return datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _apply_outages(frame: pd.DataFrame, rng: np.random.Generator, day: date) -> tuple[pd.DataFrame, list[dict]]:
    """Some sensors send nothing for 2-6 hours (all their metrics): real gaps."""
    sensors = sorted(frame["sensor_id"].unique())
    n = min(len(sensors), max(1, round(0.04 * len(sensors))))
    events = []
    drop = np.zeros(len(frame), dtype=bool)
    for sid in rng.choice(sensors, size=n, replace=False) if n else []:
        hours = int(rng.integers(2, 7))
        start = _epoch(day) + int(rng.integers(0, 24 - hours + 1)) * 3600
        end = start + hours * 3600
        drop |= (frame["sensor_id"].to_numpy() == sid) & (frame["t"].to_numpy() >= start) & (frame["t"].to_numpy() < end)
        events.append({"sensor_id": str(sid), "start": _iso(start), "end": _iso(end)})
    return frame.loc[~drop].reset_index(drop=True), events


def _apply_incidents(frame: pd.DataFrame, rng: np.random.Generator, day: date,
                     down: set[str]) -> list[dict]:
    """A traffic detector's speed collapses for an hour (an accident); flow drops too."""
    candidates = sorted(set(frame.loc[frame["kind"] == "traffic", "sensor_id"]) - down)
    if not candidates:
        return []
    events = []
    for sid in rng.choice(candidates, size=min(len(candidates), max(1, len(candidates) // 15)), replace=False):
        # Daytime in local time, aligned to 5 minutes.
        start = _epoch(day) + int(rng.integers(7 * 12, 18 * 12)) * 300 - int(CITY_UTC_OFFSET_H * 3600)
        in_window = (frame["sensor_id"] == sid) & (frame["t"] >= start) & (frame["t"] < start + 3600)
        speed = in_window & (frame["metric"] == "traffic_speed")
        flow = in_window & (frame["metric"] == "traffic_flow")
        frame.loc[speed, "value"] = np.round(rng.uniform(3.0, 12.0, int(speed.sum())), 1)
        frame.loc[flow, "value"] = np.round(frame.loc[flow, "value"] * 0.35, 0) + 0.0
        frame.loc[in_window, "event"] = True
        events.append({"sensor_id": str(sid), "start": _iso(start), "end": _iso(start + 3600)})
    return events


def _spike_value(value: float, spec: MetricSpec) -> float:
    """A jump far beyond the outlier threshold, still inside the physical range."""
    jump = max(4.0 * spec.outlier_min_dev, 1.5 * abs(value))
    up = min(spec.max, value + jump)
    if up - value >= 2.0 * spec.outlier_min_dev:
        return round(up, DECIMALS.get(spec.name, 1)) + 0.0
    return round(max(spec.min, value - jump), DECIMALS.get(spec.name, 1)) + 0.0


def _apply_spikes(frame: pd.DataFrame, rng: np.random.Generator, catalogue: Catalogue) -> list[dict]:
    """Single-point outliers for silver's median/MAD rule to flag."""
    series = sorted(frame.loc[~frame["event"], ["sensor_id", "metric"]].drop_duplicates().itertuples(index=False))
    if not series:
        return []
    events = []
    for k in rng.choice(len(series), size=min(len(series), max(2, round(len(series) / 15))), replace=False):
        sid, metric = series[int(k)]
        idx = frame.index[(frame["sensor_id"] == sid) & (frame["metric"] == metric) & ~frame["event"]]
        if len(idx) < 7:
            continue
        row = idx[int(rng.integers(3, len(idx) - 3))]
        old = float(frame.at[row, "value"])
        new = _spike_value(old, catalogue.metric(metric))
        frame.at[row, "value"] = new
        frame.at[row, "event"] = True
        events.append({"sensor_id": sid, "metric": metric, "ts": _iso(frame.at[row, "t"]),
                       "value": new, "normal_value": old})
    return events


# -- files ------------------------------------------------------------------------------


def _columns(fmt: str, extra: str | None, variant: int) -> tuple[str, ...]:
    base = REQUIRED if not (fmt.startswith("csv") and variant % 2) else ("ts", "sensor_id", "metric", "value")
    if fmt == "parquet" and extra is None:
        extra = "firmware"  # the Parquet files always carry one non-contract column
    return base + ((extra,) if extra else ())


def _assign_files(frame: pd.DataFrame, day: date) -> tuple[pd.DataFrame, dict[str, FileSpec]]:
    """One file per (kind, region, UTC part of the day); format, zone and extras cycle.

    A day is split in two halves, or in more parts when the city is so small that fewer
    than ``len(FORMATS)`` files would leave a format out.
    """
    groups = frame[["kind", "region"]].drop_duplicates()
    parts = max(2, math.ceil(len(FORMATS) / max(1, len(groups))))
    part = ((frame["t"] - _epoch(day)) // 3600 * parts // 24).astype(int)
    keys = frame["kind"].map(KINDS.index).astype(str) + "|" + frame["region"] + "|" + part.astype(str)
    specs: dict[str, FileSpec] = {}
    names: dict[str, str] = {}
    stamp = day.strftime("%Y%m%d")
    for i, key in enumerate(sorted(keys.unique(), key=lambda k: (k.split("|")[:2], int(k.split("|")[2])))):
        kind_idx, region, p = key.split("|")
        s = day.toordinal() + i
        fmt = FORMATS[s % len(FORMATS)]
        first_hour = math.ceil(24 * int(p) / parts)
        name = f"readings_{KINDS[int(kind_idx)]}_{region}_{stamp}_{first_hour:02d}.{fmt}"
        specs[name] = FileSpec(name, fmt, OFFSETS[(day.toordinal() + 2 * i) % len(OFFSETS)],
                               _columns(fmt, EXTRA_COLUMNS[s % len(EXTRA_COLUMNS)], i // len(FORMATS)))
        names[key] = name
    out = frame.assign(file=keys.map(names))
    return out, specs


def _ts_strings(t: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """ISO strings of UTC instants ``t`` written in the local time of each zone suffix."""
    seconds = {o: _offset_seconds(o) for o in set(offsets.tolist())}
    shift = np.array([seconds[o] for o in offsets.tolist()], dtype=np.int64)
    local = (t + shift).astype("datetime64[s]").astype(str)
    return np.char.add(local.astype(str), offsets.astype(str))


def _offset_seconds(suffix: str) -> int:
    if suffix == "Z":
        return 0
    sign = -1 if suffix[0] == "-" else 1
    hh, mm = suffix[1:].split(":")
    return sign * (int(hh) * 3600 + int(mm) * 60)


def _to_rows(frame: pd.DataFrame, specs: dict[str, FileSpec], seed: int, day: date) -> pd.DataFrame:
    """Readings as landing records: ts strings, extras, and bookkeeping columns."""
    frame = frame.sort_values(["file", "t", "sensor_id", "metric"], kind="mergesort").reset_index(drop=True)
    spec_of = frame["file"].map(specs)
    offsets = spec_of.map(lambda s: s.offset).to_numpy(dtype=str)
    extra_name = spec_of.map(lambda s: s.extra)
    versions = {sid: _sensor_params(seed, sid)["firmware"] for sid in frame["sensor_id"].unique()}
    firmware = frame["sensor_id"].map(versions)
    rng = _rng(seed, "quality", day.isoformat())
    flags = np.where(rng.random(len(frame)) < 0.03, "est", "ok")
    extra = np.where(extra_name == "firmware", firmware, np.where(extra_name == "quality_flag", flags, None))
    return pd.DataFrame({
        "file": frame["file"],
        "fmt": spec_of.map(lambda s: s.fmt),
        "order": np.arange(len(frame), dtype=np.float64) * 2.0,
        "t": frame["t"].to_numpy(),
        "sensor_id": frame["sensor_id"].astype(object),
        "ts": pd.Series(_ts_strings(frame["t"].to_numpy(), offsets), dtype=object),
        "metric": frame["metric"].astype(object),
        "value": frame["value"].astype(object),
        "extra": pd.Series(extra, dtype=object),
        "region": frame["region"],
        "event": frame["event"].to_numpy(),
        "reason": pd.Series([None] * len(frame), dtype=object),
        "variant": 0,
        "absent": False,
        "dup": False,
        "conflict": False,
    })


# -- defects ------------------------------------------------------------------------------


def _eligible(rows: pd.DataFrame, text_only: bool) -> np.ndarray:
    ok = rows["reason"].isna() & ~rows["event"]
    if text_only:
        ok &= rows["fmt"].isin(TEXT_FORMATS)
    return np.flatnonzero(ok.to_numpy())


def _out_of_range_value(spec: MetricSpec, above: bool) -> float:
    span = spec.max - spec.min
    return round(spec.max + max(1.0, 0.5 * span), 1) if above else round(spec.min - max(1.0, 0.1 * span), 1)


def _corrupt(rows: pd.DataFrame, i: int, reason: str, variant: int, catalogue: Catalogue) -> None:
    """Turn row ``i`` into a record that fails ``reason`` and no earlier check."""
    rows.at[i, "reason"] = reason
    rows.at[i, "variant"] = variant
    ts = str(rows.at[i, "ts"])
    if reason == "missing_field":
        rows.at[i, REQUIRED[variant % 4]] = None
        rows.at[i, "absent"] = bool(variant // 4 % 2)  # JSON: key absent or null
    elif reason == "bad_timestamp":
        year = ts[:4]
        # Zone-less (shape fails) or impossible date with a zone (parse fails).
        choices = (f"{year}-13-45T99:00", ts[:19].replace("T", " "), ts[:19],
                   f"{ts[8:10]}/{ts[5:7]}/{year} {ts[11:16]}", f"{year}-13-45T99:00:00Z")
        rows.at[i, "ts"] = choices[variant % len(choices)]
    elif reason == "timestamp_out_of_range":
        rows.at[i, "ts"] = OUT_OF_RANGE_TS[variant % len(OUT_OF_RANGE_TS)]
    elif reason == "unknown_metric":
        rows.at[i, "metric"] = UNKNOWN_METRICS[variant % len(UNKNOWN_METRICS)]
    elif reason == "bad_value":
        rows.at[i, "value"] = BAD_VALUES[variant % len(BAD_VALUES)]
    elif reason == "non_finite_value":
        rows.at[i, "value"] = (math.nan, math.inf, -math.inf)[variant % 3]
    elif reason == "value_out_of_range":
        rows.at[i, "value"] = _out_of_range_value(catalogue.metric(str(rows.at[i, "metric"])), variant % 2 == 0)
    elif reason == "unknown_sensor":
        rows.at[i, "sensor_id"] = f"ghost-{rows.at[i, 'region']}-{variant % 7 + 1:02d}"
    # unparseable_line is shaped by the renderer (it depends on the file format).


def _inject_bad(rows: pd.DataFrame, rng: np.random.Generator, share: float, catalogue: Catalogue) -> None:
    """Replace about ``share`` of the day's readings by each kind of bad record (>= 1 each)."""
    n = max(1, round(share * len(rows)))
    for reason in RECORD_REASONS:
        pool = _eligible(rows, reason in TEXT_ONLY_REASONS)
        for k, i in enumerate(sorted(rng.choice(pool, size=min(n, len(pool)), replace=False))):
            _corrupt(rows, int(i), reason, k, catalogue)


def _conflict_value(value: float, spec: MetricSpec) -> float:
    """A plausible but different value (a corrected re-send), inside the physical range."""
    digits = DECIMALS.get(spec.name, 1)
    delta = max(10.0**-digits, round(0.08 * abs(value) + 10.0**-digits, digits))
    new = value + delta if value + delta <= spec.max else value - delta
    return round(new, digits) + 0.0


def _add_resends(rows: pd.DataFrame, rng: np.random.Generator, share: float, day: date,
                 catalogue: Catalogue) -> tuple[pd.DataFrame, FileSpec, list[dict]]:
    """Exact duplicates (half in the same file, half re-sent) and conflicting re-sends."""
    n = max(1, round(share * len(rows)))
    fmt = FORMATS[(day.toordinal() + 2) % len(FORMATS)]
    spec = FileSpec(f"resend_{day.strftime('%Y%m%d')}.{fmt}", fmt, "Z", _columns(fmt, None, 0))
    pool = _eligible(rows, False)
    n_dups = max(2, n)  # at least one in the same file and one in the re-send file
    picks = rng.choice(pool, size=min(len(pool), n_dups + n), replace=False)
    dups, conflicts = picks[:n_dups], sorted(picks[n_dups:])
    same_file = rows.loc[sorted(dups[::2])].assign(order=lambda d: d["order"] + 1.0, dup=True)
    copies = rows.loc[sorted(dups[1::2])].assign(file=spec.name, fmt=fmt, dup=True)
    resent = rows.loc[conflicts].copy()
    resent["file"], resent["fmt"], resent["conflict"] = spec.name, fmt, True
    resent["ts"] = [_iso(t) for t in resent["t"]]
    resent["value"] = [_conflict_value(float(v), catalogue.metric(m)) for v, m in zip(resent["value"], resent["metric"])]
    listed = [{"sensor_id": r.sensor_id, "metric": r.metric, "ts": _iso(r.t), "original": float(rows.at[i, "value"]),
               "resent": float(r.value)} for i, r in zip(conflicts, resent.itertuples())]
    tail = pd.concat([copies, resent]).sort_values(["t", "sensor_id", "metric", "conflict"], kind="mergesort")
    # The re-send file has its own extra column (if any), unlike the originals.
    tail["extra"] = [f"resend-{fmt.replace('.', '-')}" if spec.extra else None] * len(tail)
    tail["order"] = np.arange(len(tail), dtype=np.float64) * 2.0
    return pd.concat([rows, same_file, tail], ignore_index=True), spec, listed


# -- rendering ----------------------------------------------------------------------------


def _text_cell(value: Any) -> str:
    """A CSV cell. Non-finite values use several common spellings on purpose."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-Infinity"
        return repr(value)
    return str(value)


def _field(record: Any, column: str) -> Any:
    return getattr(record, column) if column in REQUIRED else record.extra


def _csv_lines(spec: FileSpec, records: list[Any]) -> list[str]:
    lines = [",".join(spec.columns)]
    for r in records:
        line = ",".join(_text_cell(_field(r, c)) for c in spec.columns)
        # Two records glued by a lost newline: more fields than the header.
        lines.append(line + line if r.reason == "unparseable_line" else line)
    return lines


def _json_lines(spec: FileSpec, records: list[Any]) -> list[str]:
    lines = []
    for r in records:
        obj = {c: _field(r, c) for c in spec.columns if not (r.absent and _field(r, c) is None)}
        text = json.dumps(obj)
        if r.reason == "unparseable_line":
            text = text[: len(text) // 2] if r.variant % 2 == 0 else "<html><body>502 Bad Gateway</body></html>"
        lines.append(text)
    return lines


def _parquet_bytes(spec: FileSpec, records: list[Any]) -> bytes:
    arrays = {}
    for c in spec.columns:
        values = [_field(r, c) for r in records]
        arrays[c] = pa.array(values, type=pa.float64() if c == "value" else pa.string())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(arrays), sink, compression="snappy")
    return sink.getvalue().to_pybytes()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)  # mtime=0: same bytes every run


def render(spec: FileSpec, records: list[Any]) -> bytes:
    """The bytes of one landing file holding ``records`` (rows of the record frame)."""
    if spec.fmt == "parquet":
        return _parquet_bytes(spec, records)
    lines = _csv_lines(spec, records) if spec.fmt.startswith("csv") else _json_lines(spec, records)
    data = ("\n".join(lines) + "\n").encode()
    return _gzip(data) if spec.fmt.endswith(".gz") else data


def _rejected_files(rows: pd.DataFrame, day: date) -> dict[str, tuple[bytes, str]]:
    """The three broken files of a run, built from copies of good readings."""
    stamp = day.strftime("%Y%m%d")
    good = rows.loc[rows["reason"].isna() & ~rows["dup"] & ~rows["conflict"]].head(60)
    text = render(FileSpec("x.csv", "csv", "Z", REQUIRED), list(good.itertuples()))
    packed = _gzip(text)
    # Cut inside the deflate stream: the first lines still decompress, the end fails.
    truncated = packed[: max(20, int(len(packed) * 0.6))]
    return {
        f"upload_truncated_{stamp}.csv.gz": (truncated, "unreadable_file"),
        f"export_{stamp}.parquet": (text, "unreadable_file"),
        f"summary_{stamp}.xlsx": (b"PK\x03\x04" + text, "unsupported_format"),
    }


def _write(path: Path, data: bytes) -> None:
    """Write atomically; the temporary name starts with '.' so a lister skips it.

    An identical existing file is left alone, so a re-run does not even touch mtimes.
    """
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- one day ------------------------------------------------------------------------------


@dataclass
class _DayResult:
    files: dict[str, bytes]
    formats: Counter
    rows: pd.DataFrame
    outages: list[dict]
    incidents: list[dict]
    spikes: list[dict]
    conflicts: list[dict]


def _generate_day(day: date, registry: Registry, cfg: GenerateConfig, catalogue: Catalogue) -> _DayResult:
    events_rng = _rng(cfg.seed, "events", day.isoformat())
    frame = _good_readings(day, registry.on(day), cfg.seed, catalogue)
    frame, outages = _apply_outages(frame, events_rng, day)
    incidents = _apply_incidents(frame, events_rng, day, {o["sensor_id"] for o in outages})
    spikes = _apply_spikes(frame, events_rng, catalogue)
    frame, specs = _assign_files(frame, day)
    rows = _to_rows(frame, specs, cfg.seed, day)
    defects_rng = _rng(cfg.seed, "defects", day.isoformat())
    _inject_bad(rows, defects_rng, cfg.bad_record_share, catalogue)
    rows, resend_spec, conflicts = _add_resends(rows, defects_rng, cfg.bad_record_share, day, catalogue)
    specs[resend_spec.name] = resend_spec
    rows = rows.sort_values(["file", "order"], kind="mergesort").reset_index(drop=True)
    files: dict[str, bytes] = {}
    formats: Counter = Counter()
    for name, group in rows.groupby("file", sort=True):
        files[str(name)] = render(specs[str(name)], list(group.itertuples(index=False)))
        formats[specs[str(name)].fmt] += 1
    return _DayResult(files, formats, rows, outages, incidents, spikes, conflicts)


# -- public API -----------------------------------------------------------------------------


def _city_start(cfg: GenerateConfig) -> date:
    if cfg.start_date:
        return date.fromisoformat(str(cfg.start_date))
    return datetime.now(timezone.utc).date() - timedelta(days=cfg.days)


def _check(cfg: GenerateConfig, catalogue: Catalogue) -> None:
    if cfg.regions < 1 or cfg.days < 0:
        raise ValueError(f"generate: need regions >= 1 and days >= 0, got {cfg.regions}, {cfg.days}")
    if min(cfg.traffic_sensors, cfg.energy_meters, cfg.air_stations) < 0:
        raise ValueError("generate: sensor counts must be >= 0")
    if not 0.0 <= cfg.bad_record_share <= 0.05:
        raise ValueError(f"generate: bad_record_share must be in [0, 0.05], got {cfg.bad_record_share}")
    unknown = [r for r in RECORD_REASONS if r not in catalogue.record_reasons]
    if unknown:
        raise ValueError(f"generate: reasons {unknown} are not in quarantine_reasons.yaml")
    for metrics in KIND_METRICS.values():
        for m in metrics:
            catalogue.metric(m)


def generate_city(
    lake_root: str | Path,
    cfg: GenerateConfig,
    catalogue: Catalogue,
    start_date: date | None = None,
) -> GenerationReport:
    """Write ``cfg.days`` UTC days of sample-city landing files under ``<lake_root>/raw``.

    ``start_date`` (first UTC day) overrides ``cfg.start_date``; when both are empty the
    run starts ``cfg.days`` days before today (UTC). Sensor counts in ``cfg`` are per
    region. Values are in the catalogue's units (vehicles per 5 min, km/h, kWh per 15 min,
    ug/m3, degC) and inside its physical ranges, except the injected bad records.
    Deterministic: the same arguments give byte-identical files; re-running overwrites the
    same file names. Returns the report, also written to ``raw/_generation_report.json``.
    """
    _check(cfg, catalogue)
    root = Path(lake_root)
    city_start = _city_start(cfg)
    first = start_date or city_start
    registry = build_registry(cfg, city_start)
    registry_files = {
        f"sensors_{registry.initial_file_date.strftime('%Y%m%d')}.csv": _registry_csv(registry.before),
        f"sensors_{registry.event_date.strftime('%Y%m%d')}.csv": _registry_csv(registry.after),
    }
    for name, data in registry_files.items():
        _write(root / "raw" / "sensors" / name, data)

    days = [first + timedelta(days=i) for i in range(cfg.days)]
    quarantine = {reason: 0 for reason in catalogue.record_reasons}
    formats: Counter = Counter()
    totals = Counter()
    rejected: dict[str, str] = {}
    outages, incidents, spikes, conflicts = [], [], [], []
    for i, day in enumerate(days):
        result = _generate_day(day, registry, cfg, catalogue)
        folder = root / "raw" / "readings" / f"date={day.isoformat()}"
        for name, data in result.files.items():
            _write(folder / name, data)
        if i == 0:
            for name, (data, reason) in _rejected_files(result.rows, day).items():
                _write(folder / name, data)
                rejected[name] = reason
        rows = result.rows
        for reason, count in rows["reason"].value_counts().items():
            quarantine[str(reason)] += int(count)
        totals["raw_rows"] += len(rows)
        totals["dups"] += int(rows["dup"].sum())
        totals["conflicts"] += int(rows["conflict"].sum())
        totals["files"] += len(result.files)
        formats.update(result.formats)
        outages += result.outages
        incidents += result.incidents
        spikes += result.spikes
        conflicts += result.conflicts

    mover = next(s for s in registry.after if s.sensor_id == registry.moved_id)
    report = GenerationReport(
        seed=cfg.seed,
        start_date=first.isoformat(),
        days=cfg.days,
        dates=[d.isoformat() for d in days],
        sensors=len(registry.after),
        files=totals["files"] + len(rejected),
        files_by_format=dict(sorted(formats.items())),
        raw_rows=totals["raw_rows"],
        expected_quarantine=quarantine,
        exact_duplicates=totals["dups"],
        conflicting_resends=totals["conflicts"],
        rejected_files=rejected,
        expected_accepted=totals["raw_rows"] - sum(quarantine.values()) - totals["dups"],
        registry_files=sorted(registry_files),
        moved_sensor={"sensor_id": mover.sensor_id, "from_region": registry.moved_from,
                      "to_region": registry.moved_to, "from_date": registry.event_date.isoformat()},
        new_sensor={"sensor_id": registry.new_id, "region": _region_names(cfg.regions)[0],
                    "from_date": registry.event_date.isoformat()},
        outages=outages,
        incidents=incidents,
        spikes=spikes,
        conflicts=conflicts,
    )
    _write(root / "raw" / "_generation_report.json", report.to_json().encode())
    return report
