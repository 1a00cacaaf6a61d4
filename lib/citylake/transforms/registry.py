"""Sensor registry files -> type-2 history (pure transforms).

Registry files are applied in file-name order. A sensor gets a new version when any of
its attributes differ from its previous version; the previous version then ends
(``valid_to``) where the new one starts. A sensor absent from a later file stays as it
was: files may be partial updates.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

REGISTRY_COLUMNS = ["sensor_id", "region", "lat", "lon"]


def registry_rows(raw: DataFrame, required: list[str]) -> DataFrame:
    """Typed registry rows from a raw registry CSV read as strings.

    Expects the required columns plus ``source_file`` and ``effective_ts``; every other
    column goes to ``attributes_json``.
    """
    extras = [c for c in raw.columns if c not in required + ["source_file", "effective_ts"]]
    attributes = F.to_json(F.create_map(*[x for c in extras for x in (F.lit(c), F.col(c))])) if extras else F.lit(None)
    return raw.select(
        F.trim("sensor_id").alias("sensor_id"),
        F.trim("region").alias("region"),
        F.trim("lat").try_cast("double").alias("lat"),
        F.trim("lon").try_cast("double").alias("lon"),
        attributes.cast("string").alias("attributes_json"),
        "source_file",
        "effective_ts",
    )


def invalid_registry_rows(rows: DataFrame) -> DataFrame:
    """Rows that break the registry contract (empty id/region, non-numeric or impossible lat/lon)."""
    bad = (
        F.col("sensor_id").isNull() | (F.col("sensor_id") == "")
        | F.col("region").isNull() | (F.col("region") == "")
        | F.col("lat").isNull() | F.col("lon").isNull()
        | (F.abs("lat") > 90) | (F.abs("lon") > 180)
    )
    return rows.where(bad)


def registry_history(rows: DataFrame) -> DataFrame:
    """Type-2 history: one row per sensor version with valid_from/valid_to/is_current."""
    by_sensor = Window.partitionBy("sensor_id").orderBy("effective_ts", "source_file")
    content = F.struct("region", "lat", "lon", "attributes_json")
    versions = (
        rows.withColumn("_content", content)
        .withColumn("_previous", F.lag("_content").over(by_sensor))
        .where(F.col("_previous").isNull() | (F.col("_previous") != F.col("_content")))
        .drop("_content", "_previous")
    )
    return versions.select(
        "sensor_id",
        "region",
        "lat",
        "lon",
        "attributes_json",
        F.col("effective_ts").alias("valid_from"),
        F.lead("effective_ts").over(by_sensor).alias("valid_to"),
        F.lead("effective_ts").over(by_sensor).isNull().alias("is_current"),
        "source_file",
    )
