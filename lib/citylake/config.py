"""Typed configuration: ``conf/base.yaml`` + ``conf/<env>.yaml`` + environment variables.

Precedence, lowest first: dataclass defaults, ``base.yaml``, ``<env>.yaml`` (env chosen by
``--env`` or ``CITYLAKE_ENV``, default ``local``), then environment variables named
``CITYLAKE__<SECTION>__<KEY>`` (for example ``CITYLAKE__LAKE__ROOT=s3a://bucket/lake`` or
``CITYLAKE__SPARK__MASTER=local[4]``). Values from the environment are parsed as YAML, so
``CITYLAKE__FEATURES__LAGS=[1,2,3]`` gives a list.

Relative paths (lake root, jar folder, MLflow store) are resolved against the project
root: the parent of the config folder.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "CITYLAKE__"


@dataclass
class SparkConfig:
    """How the SparkSession is built (see :mod:`citylake.session`)."""

    master: str | None = "local[2]"
    app_name: str = "citylake"
    shuffle_partitions: int = 4
    driver_memory: str | None = "2g"
    #: Local jar files for Delta (fetched by ``make jars``); used when no packages are set.
    jars_dir: str | None = ".jars"
    #: Maven coordinates for Delta, resolved by Spark itself (cluster use).
    packages: list[str] = field(default_factory=list)
    log_level: str = "WARN"
    #: Any other Spark settings, passed through unchanged.
    conf: dict[str, str] = field(default_factory=dict)


@dataclass
class LakeConfig:
    """Where the lake lives. A local path or any Hadoop URI (s3a://, abfss://, hdfs://)."""

    root: str = "lake"


@dataclass
class IngestConfig:
    """Raw -> bronze."""

    #: Files per batch at most; more new files are split over several batches.
    max_files_per_batch: int = 5000
    #: Files modified less than this many seconds ago are left for the next run (they
    #: may still be being written). 0 for local use; set it on shared landing areas.
    min_file_age_s: float = 0.0
    #: "auto": parse CSV with pyarrow and write the tables with delta-rs when the lake
    #: allows it (stages/ingest_direct.py; bench/RESULTS.md); "spark": Spark for all of it.
    reader: str = "auto"
    #: Batches estimated above this much data (MB; gzip and Parquet counted 8x) take the Spark path:
    #: the direct path holds a batch's readings in the driver's memory.
    direct_max_mb: int = 1024


@dataclass
class SilverConfig:
    """Bronze -> silver. Per-metric rules live in ``schemas/metrics.yaml``."""

    #: Days of neighbouring bronze read around each recomputed day (windows cross midnight).
    context_days: int = 1


@dataclass
class FeaturesConfig:
    """Silver -> gold features. Lags and windows are in grid steps of each series."""

    lags: list[int] = field(default_factory=lambda: [1, 2, 3, 6, 12, 24])
    windows: list[int] = field(default_factory=lambda: [3, 12, 24])


@dataclass
class ValidationConfig:
    """Great Expectations validation."""

    #: Great Expectations project folder (stores, Data Docs); relative to the lake root.
    gx_dir: str = "gx"
    #: Fail the job when a critical expectation fails.
    fail_on_critical: bool = True
    #: Bronze/silver must hold data newer than this many hours before the newest landing.
    freshness_hours: float = 48.0
    #: Row count of a batch must be within [recent mean / f, recent mean * f].
    row_count_factor: float = 10.0
    #: How many recent batches the row count is compared with.
    row_count_history: int = 7


@dataclass
class GenerateConfig:
    """The sample city (``citylake generate``)."""

    seed: int = 42
    start_date: str = "2026-01-05"
    days: int = 3
    regions: int = 3
    traffic_sensors: int = 6
    energy_meters: int = 4
    air_stations: int = 3
    #: Share of readings replaced by each kind of bad record.
    bad_record_share: float = 0.002


@dataclass
class ForecastConfig:
    """Forecasting (train / backtest / forecast). Horizons and orders are in grid steps."""

    #: AR order when ``ar_candidates`` is empty.
    ar_order: int = 12
    #: Candidate orders chosen per series by ``ar_criterion`` on one estimation sample.
    ar_candidates: list[int] = field(default_factory=list)
    ar_criterion: str = "bic"
    #: "auto": read gold's Parquet files in the Python workers when the table allows it
    #: (forecast/ar_direct.py; 2-3x faster, bench/RESULTS_AR.md), else Spark's reader;
    #: "spark": always Spark's reader.
    ar_reader: str = "auto"
    #: Reading tasks of the direct reader (0: one per core, at most 8).
    ar_tasks: int = 0
    horizon: int = 24
    #: Nominal coverage of every interval (AR analytic, others split-conformal).
    interval_level: float = 0.9
    #: "auto" | "local" | "spark-ml"; auto routes each region by its training rows.
    gbt_engine: str = "auto"
    #: Regions with at least this many training rows per step model go to Spark ML (bench/RESULTS_GBT.md).
    gbt_spark_min_rows: int = 5_000_000
    #: Tree settings (bench/RESULTS_BEIJING.md: small trees, one model per step, row and
    #: feature subsampling beat bigger pooled models on real data).
    gbt_trees: int = 300
    gbt_max_depth: int = 4
    gbt_learning_rate: float = 0.05
    gbt_min_rows_per_leaf: int = 50
    gbt_subsample: float = 0.8
    gbt_feature_fraction: float = 0.8
    #: Histogram bins per feature (64 instead of 255 cost 1 point of RMSE at 24 h on Beijing).
    gbt_max_bins: int = 255
    #: Consecutive steps sharing one model: 1 = one model per step (direct strategy),
    #: 0 = one model for every step with the step as a feature.
    gbt_steps_per_model: int = 1
    #: A ridge regression's forecast as one more input of the trees (forecast/linear_stage.py).
    gbt_linear_stage: bool = True
    #: Regions trained at once by the spark-ml engine (threads submitting Spark jobs).
    gbt_parallelism: int = 2
    #: Origins per series kept for GBT training rows (every k-th grid step).
    gbt_origin_stride: int = 1
    #: Backtest origins: every k-th grid step after the cutoff.
    backtest_stride: int = 1
    #: Without ``--cutoff``, the backtest tests on this last share of gold's time span.
    backtest_test_fraction: float = 0.2
    #: Seasonal naive season: "day", "week" or "auto".
    season: str = "auto"
    #: ``citylake score`` warns when a region's RMSE over a day exceeds this many times
    #: its latest backtest RMSE (same model and steps).
    drift_ratio: float = 1.5
    #: Metrics to model (empty: every metric in gold).
    metrics: list[str] = field(default_factory=list)


@dataclass
class MaintenanceConfig:
    """``citylake maintain``: OPTIMIZE / Z-order, VACUUM and the history audit."""

    #: VACUUM keeps files newer than this (hours). Delta refuses less than 168 (7 days)
    #: unless told otherwise: readers of older versions and time travel need them.
    vacuum_retain_hours: int = 168
    #: Tables with fewer data files than this are not optimized (nothing to compact).
    optimize_min_files: int = 8


@dataclass
class MlflowConfig:
    """MLflow tracking (used by the forecasting stages)."""

    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "citylake"


@dataclass
class Config:
    """The whole citylake configuration."""

    env: str = "local"
    project_root: str = "."
    spark: SparkConfig = field(default_factory=SparkConfig)
    lake: LakeConfig = field(default_factory=LakeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    silver: SilverConfig = field(default_factory=SilverConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def resolve(self, path: str) -> str:
        """Return ``path`` made absolute against the project root, unless it is a URI."""
        if "://" in path or path.startswith("/"):
            return path
        return str((Path(self.project_root) / path).resolve())

    @property
    def lake_root(self) -> str:
        """Absolute lake root (path or URI), without a trailing slash."""
        return self.resolve(self.lake.root).rstrip("/")


class ConfigError(ValueError):
    """A configuration file or variable is wrong; the message says which and why."""


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return tree


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys with a clear message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(hint, value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    base = origin or hint
    if base is dict and isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def default_conf_dir() -> Path:
    """``CITYLAKE_CONF_DIR`` if set, else ``./conf`` when it exists, else the package's."""
    if os.environ.get("CITYLAKE_CONF_DIR"):
        return Path(os.environ["CITYLAKE_CONF_DIR"])
    here = Path.cwd() / "conf"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent.parent / "conf"


def load_config(
    env: str | None = None,
    conf_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> Config:
    """Load the configuration for ``env`` (default ``CITYLAKE_ENV`` or ``local``).

    ``overrides`` (a nested dict, e.g. ``{"lake": {"root": "/tmp/lake"}}``) wins over
    files and environment; tests use it to point at a temporary lake.
    """
    environ = os.environ if environ is None else environ
    env = env or environ.get("CITYLAKE_ENV") or "local"
    conf_path = Path(conf_dir) if conf_dir else default_conf_dir()
    data: dict[str, Any] = {}
    for name in ("base.yaml", f"{env}.yaml"):
        file = conf_path / name
        if file.is_file():
            try:
                loaded = yaml.safe_load(file.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
            data = _merge(data, loaded)
        elif name != "base.yaml":
            raise ConfigError(f"no config for env {env!r}: {file} does not exist")
    data = _merge(data, _env_overrides(environ))
    if overrides:
        data = _merge(data, overrides)
    data["env"] = env
    data.setdefault("project_root", str(conf_path.resolve().parent))
    return _build(Config, data, "config")
