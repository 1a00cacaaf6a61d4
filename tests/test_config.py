from pathlib import Path

import pytest

from citylake.config import ConfigError, load_config
from citylake.session import spark_conf

CONF = Path(__file__).resolve().parent.parent / "conf"


def test_files_then_env_then_overrides():
    env = {"CITYLAKE__LAKE__ROOT": "/data/lake", "CITYLAKE__FEATURES__LAGS": "[1, 2]",
           "CITYLAKE__SPARK__SHUFFLE_PARTITIONS": "8"}
    cfg = load_config(env="local", conf_dir=CONF, environ=env)
    assert cfg.lake_root == "/data/lake"
    assert cfg.features.lags == [1, 2]
    assert cfg.spark.shuffle_partitions == 8
    assert cfg.spark.master == "local[2]"  # from local.yaml
    cfg = load_config(env="local", conf_dir=CONF, environ=env, overrides={"lake": {"root": "/x"}})
    assert cfg.lake_root == "/x"


def test_relative_lake_is_under_project_root():
    cfg = load_config(env="local", conf_dir=CONF, environ={})
    assert cfg.lake_root == str(CONF.parent / "lake")


def test_cluster_config_uses_packages_and_object_store():
    cfg = load_config(env="cluster", conf_dir=CONF, environ={})
    assert cfg.lake_root.startswith("s3a://")
    conf = spark_conf(cfg)
    assert conf["spark.jars.packages"].startswith("io.delta:delta-spark_4.2_2.13:")
    assert "spark.jars" not in conf and "spark.master" not in conf


@pytest.mark.parametrize("env,message", [
    ({"CITYLAKE__LAKE__ROOTT": "x"}, "unknown key"),
    ({"CITYLAKE__SPARK__SHUFFLE_PARTITIONS": "many"}, "expected int"),
])
def test_bad_config_is_a_clear_error(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env="local", conf_dir=CONF, environ=env)


def test_unknown_env_is_a_clear_error():
    with pytest.raises(ConfigError, match="no config for env 'prod'"):
        load_config(env="prod", conf_dir=CONF, environ={})
