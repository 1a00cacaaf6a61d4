"""A throw-away Spark standalone cluster on 127.0.0.1 for tests, and what goes with it.

The pyspark wheel has no ``sbin/start-master.sh``; the master and workers are started
with ``bin/spark-class`` directly, each in its own process group, and stopped through
the ``Popen`` handles kept here (SIGTERM to the group, then SIGKILL), so the executors
and Python workers they forked go with them and nothing else is touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

HOST = "127.0.0.1"
SPARK_HOME = Path(pyspark.__file__).resolve().parent
#: Variables that would leak this process's Python or Spark setup into the cluster.
_LEAKY = ("PYSPARK_", "PYTHONPATH", "PYTHONHOME", "SPARK_", "CITYLAKE", "JAVA_TOOL_OPTIONS")

#: Stages running Python on executors: SQL operators of pandas/Arrow UDFs (RDD scope names)
#: and ``PythonRDD`` (Python functions on RDDs, e.g. createDataFrame from local rows).
PYTHON_OPS = re.compile(
    r"^(MapInPandas|MapInArrow|FlatMapGroupsIn(Pandas|Arrow)|FlatMapCoGroupsIn(Pandas|Arrow)|"
    r"ArrowEvalPython|BatchEvalPython|AggregateInPandas|WindowInPandas|ArrowEvalPythonUDTF|"
    r"BatchEvalPythonUDTF|PythonRDD)$"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without Python/Spark/citylake settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY)}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP=HOST)
    env.update(extra)
    return env


def write_python_wrapper(path: Path, python: str, log: Path) -> Path:
    """A python for drivers and executors that cannot see an editable citylake install.

    Runs ``python -S`` (no ``site``: no ``.pth`` files, so the venv's editable install of
    citylake is invisible) with the venv's site-packages appended to whatever PYTHONPATH
    Spark passes (pyspark.zip, py4j, the --py-files). Each start is logged to ``log``
    (pid, working directory, arguments) so a test can see where Python ran.
    """
    site = sysconfig.get_paths()["purelib"]
    path.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\t%s\\t%s\\t%s\\n' \"$$\" \"$PWD\" \"$*\" \"$PYTHONPATH\" >> '{log}'\n"
        f"PYTHONPATH=\"${{PYTHONPATH:+$PYTHONPATH:}}{site}\"\n"
        "export PYTHONPATH\n"
        f"exec '{python}' -S \"$@\"\n"
    )
    path.chmod(0o755)
    return path


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop ``proc`` and everything in its process group (started with a new session)."""
    if proc.poll() is None or _group_alive(proc.pid):
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if proc.poll() is not None and not _group_alive(proc.pid):
                    break
                time.sleep(0.2)
            else:
                continue
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
        proc.kill()
        proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log: Path
    work_dir: Path | None = None
    webui_port: int | None = None


@dataclass
class StandaloneCluster:
    """Master + ``workers`` workers (``cores`` cores, ``memory`` each) on 127.0.0.1."""

    root: Path
    workers: int = 2
    cores: int = 1
    memory: str = "2g"
    daemon_memory: str = "384m"
    port: int = 0
    webui_port: int = 0
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    @property
    def worker_dirs(self) -> list[Path]:
        return [d.work_dir for d in self.daemons if d.work_dir is not None]

    def __enter__(self) -> "StandaloneCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        conf_dir = self.root / "spark-conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        log4j = conf_dir / "log4j2.properties"
        if not log4j.exists():
            log4j.write_text("rootLogger.level = warn\nrootLogger.appenderRef.stderr.ref = console\n"
                             "appender.console.type = Console\nappender.console.name = console\n"
                             "appender.console.target = SYSTEM_ERR\nappender.console.layout.type = PatternLayout\n"
                             "appender.console.layout.pattern = %d{HH:mm:ss} %-5p %c{1}: %m%n\n")
        return clean_env(
            SPARK_CONF_DIR=str(conf_dir),
            SPARK_DAEMON_MEMORY=self.daemon_memory,
            SPARK_LOG_DIR=str(self.root / "logs"),
            SPARK_LOCAL_DIRS=str(self.root / "local"),
        )

    def _spawn(self, name: str, args: list[str], **kw) -> Daemon:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), *args], env=self._env(),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.root, start_new_session=True)
        daemon = Daemon(name, proc, log, **kw)
        self.daemons.append(daemon)
        return daemon

    def start(self, timeout: float = 180.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        props = self.root / "daemon.properties"
        props.write_text("spark.master.rest.enabled false\nspark.worker.cleanup.enabled false\n"
                         "spark.ui.reverseProxy false\n")
        self.port, self.webui_port = free_port(), free_port()
        self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", HOST, "--port", str(self.port),
                               "--webui-port", str(self.webui_port), "--properties-file", str(props)],
                    webui_port=self.webui_port)
        self._wait(lambda s: s is not None, timeout, "master web UI")
        for i in range(self.workers):
            work_dir = self.root / f"worker{i}"
            work_dir.mkdir(exist_ok=True)
            ui = free_port()
            self._spawn(f"worker{i}", ["org.apache.spark.deploy.worker.Worker", self.url, "--host", HOST,
                                       "--cores", str(self.cores), "--memory", self.memory,
                                       "--webui-port", str(ui), "--work-dir", str(work_dir),
                                       "--properties-file", str(props)],
                        work_dir=work_dir, webui_port=ui)
        self._wait(lambda s: s is not None and s.get("aliveworkers", 0) >= self.workers, timeout,
                   f"{self.workers} alive workers")

    def status(self) -> dict | None:
        """The master's JSON status, or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.webui_port}/json/", timeout=5) as r:
                return json.load(r)
        except OSError:
            return None

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [d for d in self.daemons if d.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited ({dead[0].proc.returncode}):\n{_tail(dead[0].log)}")
            if ready(self.status()):
                return
            time.sleep(1.0)
        raise TimeoutError(f"no {what} after {timeout:.0f}s:\n" + "\n".join(
            f"--- {d.name}\n{_tail(d.log, 15)}" for d in self.daemons))

    def stop(self) -> None:
        """Workers first (they take their executors along), then the master."""
        for daemon in reversed(self.daemons):
            stop_group(daemon.proc)

    def executor_logs(self, lines: int = 30) -> str:
        """The tail of every executor's stderr, for failure messages."""
        parts = []
        for work_dir in self.worker_dirs:
            for stderr in sorted(work_dir.glob("app-*/*/stderr")):
                parts.append(f"--- {stderr.relative_to(self.root)}\n{_tail(stderr, lines)}")
        return "\n".join(parts) or "(no executor logs)"


def run_logged(cmd: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float) -> int:
    """Run ``cmd`` in its own process group, output to ``log``; kill the group on timeout."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc, timeout=5)
            raise
        finally:
            if _group_alive(proc.pid):  # stray children (a Python worker) of a finished job
                stop_group(proc, timeout=5)


@dataclass
class AppEvents:
    """What one application's event log says about where its tasks ran."""

    app_id: str
    app_name: str
    executors: dict[str, str]  # executor id -> worker web UI port (from its log URLs)
    tasks_by_executor: dict[str, int]
    #: operator -> executor id -> tasks of stages running that Python operator
    python_tasks: dict[str, dict[str, int]]


def read_event_log(path: Path) -> AppEvents:
    """Parse an uncompressed, non-rolling Spark event log."""
    app_id = app_name = ""
    executors: dict[str, str] = {}
    stage_ops: dict[int, set[str]] = {}
    tasks: dict[str, int] = {}
    python_tasks: dict[str, dict[str, int]] = {}
    task_stages: list[tuple[int, str]] = []
    with open(path) as lines:
        for line in lines:
            ev = json.loads(line)
            kind = ev.get("Event", "")
            if kind == "SparkListenerApplicationStart":
                app_id, app_name = ev.get("App ID", ""), ev.get("App Name", "")
            elif kind == "SparkListenerExecutorAdded":
                urls = ev.get("Executor Info", {}).get("Log Urls", {})
                port = re.search(r":(\d+)/", " ".join(urls.values()))
                executors[ev["Executor ID"]] = port.group(1) if port else ""
            elif kind == "SparkListenerStageSubmitted":
                info = ev["Stage Info"]
                ops = stage_ops.setdefault(info["Stage ID"], set())
                for rdd in info.get("RDD Info", []):
                    scope = json.loads(rdd["Scope"]).get("name", "") if rdd.get("Scope") else ""
                    ops.update(n for n in (rdd.get("Name", ""), scope) if PYTHON_OPS.match(n))
            elif kind == "SparkListenerTaskEnd":
                executor = ev["Task Info"]["Executor ID"]
                tasks[executor] = tasks.get(executor, 0) + 1
                task_stages.append((ev["Stage ID"], executor))
    for stage, executor in task_stages:
        for op in stage_ops.get(stage, ()):
            per = python_tasks.setdefault(op, {})
            per[executor] = per.get(executor, 0) + 1
    return AppEvents(app_id, app_name, executors, tasks, python_tasks)
