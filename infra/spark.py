"""The SparkSession every Spark stage uses, built from the settings.

One session per process: the CLI, an Airflow task and the test suite each call ``get_spark`` and
share whatever session is already active.
"""

from __future__ import annotations

import os
import sys
from typing import ClassVar

from infra.settings import Settings


def use_this_interpreter() -> None:
    """Make Spark's Python driver and executors this interpreter (the project's venv) unless set."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def get_spark(settings: Settings):
    """Return the active SparkSession, creating it on ``settings.spark.master`` with its conf (or,
    inside ``spark-submit``, on the submit's master and conf)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if settings.spark.master.startswith("local"):
        # Binding to loopback avoids the hostname lookup warning and never exposes the driver.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    use_this_interpreter()
    builder = SparkSession.builder.appName(settings.spark.app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        # Under spark-submit (which starts the JVM and sets the gateway port) the master and conf
        # are the submit's own: the Spark connection's, with ``spark.conf`` passed by the DAG.
        builder = builder.master(settings.spark.master)
        for key, value in settings.spark.conf.items():
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


class StandaloneCluster:
    """A Spark standalone master and ``workers`` workers on 127.0.0.1, started from the pip wheel's
    classes (the wheel ships no ``sbin/start-*.sh``; ``spark-class`` runs them), for the tests and
    benchmarks that are about a cluster. Ports are free ones, work and log folders are under
    ``root`` (by default Spark would write inside site-packages), and every process is stopped by
    its own process group, which holds the executors a worker launched.

    ``start()`` returns the master URL once the master's status page lists every worker alive;
    ``driver_conf`` is the Spark conf a driver on this machine needs to be reached by the executors.
    """

    driver_conf: ClassVar[dict[str, str]] = {
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.executor.memory": "768m",
        "spark.executor.cores": "1",
    }

    def __init__(self, root, workers: int = 2, cores: int = 1, memory: str = "1g", java_opts: str = ""):
        from pathlib import Path

        self.root = Path(root)
        self.n_workers, self.cores, self.memory = workers, cores, memory
        self.java_opts = java_opts  # the master's and workers' JVM options
        self.master = None
        self.workers: list = []
        self.url = ""
        self.ui = ""

    def _env(self) -> dict[str, str]:
        from pathlib import Path

        import pyspark

        home = Path(pyspark.__file__).parent
        env = dict(os.environ)
        env.update(
            {
                "SPARK_HOME": str(home),
                "SPARK_LOCAL_IP": "127.0.0.1",
                "SPARK_LOG_DIR": str(self.root / "logs"),
                "SPARK_WORKER_DIR": str(self.root / "work"),
                "PYSPARK_PYTHON": sys.executable,
            }
        )
        if self.java_opts:
            env["SPARK_DAEMON_JAVA_OPTS"] = self.java_opts
        return env

    def _spawn(self, name: str, args: list[str]):
        import subprocess
        from pathlib import Path

        import pyspark

        spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.root / "logs" / f"{name}.out", "ab") as log:
            return subprocess.Popen(
                [str(spark_class), *args],
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def status(self) -> dict:
        """The master's JSON status page (``aliveworkers``, ``activeapps``, ...)."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.ui}/json/", timeout=5) as r:
            return json.load(r)

    def start(self, timeout: float = 180) -> str:
        import socket
        import time

        def free_port() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        port, ui = free_port(), free_port()
        self.url, self.ui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui}"
        self.master = self._spawn(
            "master",
            [
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--webui-port",
                str(ui),
            ],
        )
        for i in range(self.n_workers):
            work = self.root / "work" / f"worker-{i}"
            work.mkdir(parents=True, exist_ok=True)
            self.workers.append(
                self._spawn(
                    f"worker-{i}",
                    [
                        "org.apache.spark.deploy.worker.Worker",
                        self.url,
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        str(self.cores),
                        "--memory",
                        self.memory,
                        "--webui-port",
                        str(free_port()),
                        "--work-dir",
                        str(work),
                    ],
                )
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.status().get("aliveworkers") == self.n_workers:
                    return self.url
            # Not up yet: refused, or (seen once under load, as the UI was starting) its HTML page
            # served for /json/.
            except (OSError, ValueError):
                pass
            dead = [p for p in (self.master, *self.workers) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the standalone cluster did not come up ({'a process exited' if dead else 'timeout'}): "
                    f"see {self.root / 'logs'}"
                )
            time.sleep(0.5)

    def kill_worker(self, i: int) -> None:
        """SIGKILL worker ``i`` and its executors (its process group): a machine lost mid-job."""
        import signal

        with _suppress_lookup():
            os.killpg(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait()

    def stop(self) -> None:
        import signal
        import subprocess

        procs = [p for p in (*self.workers, self.master) if p is not None]
        for p in procs:
            if p.poll() is None:
                with _suppress_lookup():
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def __enter__(self) -> StandaloneCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _suppress_lookup():
    import contextlib

    return contextlib.suppress(ProcessLookupError)
