"""MLflow for citylake: where runs go, how they are nested, and batched logging.

The tracking store defaults to a sqlite file and an artifact folder under the project
(``mlflow.tracking_uri`` / ``mlflow.artifact_root`` in config); point
``CITYLAKE__MLFLOW__TRACKING_URI`` at a server to share runs. One *parent* run per job
(train, backtest) carries the job's config as params; *child* runs per region and model
family carry their params, per-step metrics and artifacts. Metrics are sent with
``log_batch`` (one call per child run), so thousands of series never mean thousands of
MLflow calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from citylake.config import Config

log = logging.getLogger(__name__)

#: MLflow's log_batch accepts at most 1000 metrics per call.
BATCH = 1000


def tracking_uri(config: Config) -> str:
    """The tracking URI with a relative sqlite path made absolute against the project."""
    uri = config.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + config.resolve(uri[len(prefix):])
    return uri


def artifact_location(config: Config) -> str:
    root = config.mlflow.artifact_root
    if "://" in root:
        return root
    return Path(config.resolve(root)).as_uri()


def setup(config: Config) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(config))
    name = config.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location(config))
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flat_params(prefix: str, obj: Any) -> dict[str, str]:
    """A dataclass (or mapping) as flat ``prefix.key`` -> string params."""
    items = dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else dict(obj).items()
    return {f"{prefix}.{k}": str(v)[:500] for k, v in items}


@contextlib.contextmanager
def parent_run(config: Config, job: str, params: Mapping[str, Any]) -> Iterator[Any]:
    """A parent run for one job, tagged ``citylake.job``; yields the active run."""
    import mlflow

    setup(config)
    with mlflow.start_run(run_name=f"{job}-{time.strftime('%Y%m%dT%H%M%S')}",
                          tags={"citylake.job": job}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        log.info("MLflow run %s (%s) at %s", run.info.run_id, job, tracking_uri(config))
        yield run


@contextlib.contextmanager
def child_run(name: str, tags: Mapping[str, str]) -> Iterator[Any]:
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, tags=dict(tags)) as run:
        yield run


def log_batch(run_id: str, params: Mapping[str, Any] | None = None,
              metrics: Mapping[str, float] | None = None,
              step_metrics: list[tuple[str, float, int]] | None = None) -> None:
    """Params, plain metrics and (name, value, step) metrics in as few calls as MLflow allows."""
    import math

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()
               if v is not None and math.isfinite(float(v))]
    entries += [Metric(k, float(v), now, int(s)) for k, v, s in (step_metrics or [])
                if v is not None and math.isfinite(float(v))]
    param_list = [Param(k, str(v)[:500]) for k, v in (params or {}).items()]
    for i in range(0, max(len(entries), 1), BATCH):
        client.log_batch(run_id, metrics=entries[i:i + BATCH], params=param_list if i == 0 else [])
