"""Shared fixtures: one local[2] Spark session for the whole run, temporary lakes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from citylake.catalogue import load_catalogue
from citylake.config import Config, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BEIJING_DIR = PROJECT_ROOT.parent / "shared" / "data" / "beijing_air"


def make_config(lake_root: Path | str, **sections) -> Config:
    """The local config pointed at ``lake_root``, with small-test Spark settings."""
    overrides = {"lake": {"root": str(lake_root)}, "spark": {"shuffle_partitions": 2}}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(env="local", conf_dir=PROJECT_ROOT / "conf", overrides=overrides, environ={})


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from citylake.session import build_spark

    os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
    config = make_config(tmp_path_factory.mktemp("lake-session"))
    session = build_spark(config)
    session.conf.set("spark.sql.shuffle.partitions", "2")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def catalogue():
    return load_catalogue()


@pytest.fixture()
def config(tmp_path) -> Config:
    """A config whose lake is a fresh temporary folder."""
    return make_config(tmp_path / "lake")


@pytest.fixture()
def lake(spark, config, catalogue):
    from citylake.lake import Lake

    return Lake(spark, config, catalogue)
