"""Lake maintenance (``citylake maintain``): compact and Z-order, vacuum, audit.

For every table of ``schemas/tables.yaml`` that exists:

1. **OPTIMIZE**: small files (one per task and commit, many per day of ingest) are
   compacted; tables with ``zorder_by`` in the schema are Z-ordered by those columns
   (the keys analysts filter on: sensor and metric, region and target time). Skipped
   for tables with fewer than ``maintenance.optimize_min_files`` files.
2. **VACUUM** with ``maintenance.vacuum_retain_hours`` (default 168 h = 7 days, Delta's
   own safety floor, so readers of recent versions and time travel keep working).
3. **Audit**: one ``table_audit`` row per table: version, files, bytes, the commits of
   the last 7 days by operation, and what this run did.

Safe to re-run: OPTIMIZE of an optimized table and VACUUM with nothing to remove are
no-ops.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from dataclasses import dataclass, field

from delta.tables import DeltaTable
from pyspark.sql import functions as F

from citylake.lake import Lake

log = logging.getLogger(__name__)


@dataclass
class MaintenanceReport:
    tables: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        optimized = [t["table_name"] for t in self.tables if t["optimized"]]
        removed = sum(t["files_removed_by_vacuum"] or 0 for t in self.tables)
        return (f"{len(self.tables)} tables audited, {len(optimized)} optimized "
                f"({', '.join(optimized) or 'none'}), {removed} old files vacuumed")


def _audit_history(table: DeltaTable, now: dt.datetime) -> tuple[int, str]:
    since = now - dt.timedelta(days=7)
    ops = Counter(r["operation"] for r in table.history().where(F.col("timestamp") >= F.lit(since))
                  .select("operation").collect())
    return sum(ops.values()), ",".join(f"{op}:{n}" for op, n in sorted(ops.items()))


def maintain_table(lake: Lake, name: str, now: dt.datetime) -> dict:
    """OPTIMIZE (+ Z-order), VACUUM and audit one existing table; returns its audit row."""
    spec = lake.spec(name)
    cfg = lake.config.maintenance
    table = DeltaTable.forPath(lake.spark, lake.path(name))
    detail = table.detail().select("numFiles", "sizeInBytes").first()
    optimized = False
    zorder = [c for c in spec.zorder_by if c not in spec.partition_by]
    if detail["numFiles"] >= cfg.optimize_min_files:
        builder = table.optimize()
        if zorder:
            builder.executeZOrderBy(*zorder)
        else:
            builder.executeCompaction()
        optimized = True
        log.info("optimized %s%s", name, f" (Z-order by {', '.join(zorder)})" if zorder else "")
    table.vacuum(float(cfg.vacuum_retain_hours))
    # The Python API returns no count; Delta logs it in a "VACUUM END" commit.
    last = table.history(1).select("operation", "operationMetrics").first()
    removed = 0
    if last and last["operation"] == "VACUUM END":
        removed = int((last["operationMetrics"] or {}).get("numDeletedFiles", 0))
    after = table.detail().select("numFiles", "sizeInBytes").first()
    commits, operations = _audit_history(table, now)
    return {
        "table_name": name,
        "version": lake.version(name),
        "num_files": int(after["numFiles"]),
        "size_bytes": int(after["sizeInBytes"]),
        "commits_7d": commits,
        "operations_7d": operations,
        "optimized": optimized,
        "zorder_by": ",".join(zorder) or None,
        "files_removed_by_vacuum": removed,
        "audited_ts": now,
    }


def run_maintain(lake: Lake) -> MaintenanceReport:
    """Maintain every existing table and append the audit rows to ``table_audit``."""
    now = dt.datetime.now(dt.timezone.utc)
    report = MaintenanceReport()
    for name in lake.catalogue.tables:
        if name == "table_audit" or not lake.exists(name):
            continue
        report.tables.append(maintain_table(lake, name, now))
    if report.tables:
        spec = lake.spec("table_audit")
        rows = [tuple(t[c] for c in spec.column_names) for t in report.tables]
        lake.append("table_audit", lake.spark.createDataFrame(rows, spec.struct()))
    return report
