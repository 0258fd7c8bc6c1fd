"""The Airflow side of the pipeline: the DAGs' tasks built from the pipeline's declaration, the data
date of a run, the failure record, and the local Airflow home (``funnelrec airflow ...``).

``pipeline_tasks`` makes one task per step of a DAG (``infra/pipeline.py``): task ids, task groups,
pools, the asset a step emits and the edges all come from the declarations, and every task calls
the same stage function as the CLI. Airflow is imported only inside it, when a DAG file is parsed.

The data date of a run (the ``--date`` of every stage) is, in order:

1. ``ds`` in the run's conf (manual triggers and ``airflow dags test ... -c '{"ds": ...}'``);
2. ``ds`` in the extra of the triggering champion asset event (asset-triggered runs have no
   logical date, so the promote task carries the date in the event);
3. the start of the run's data interval (the nightly DAG's cron data intervals: the 02:00 run of
   day D+1 processes day D; backfills too);
4. the day before the run's logical date (the scoring DAG's own daily trigger).

The scoring DAG scores ``data_dates``: every date of a run. The scheduler may batch several
champion asset events into one scoring run (a backfill promotes faster than scoring runs start);
each event's date is scored, oldest first, so no date goes unscored. ``dates`` in the run's conf
(a list) does the same by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from infra.dates import parse_run_date
from infra.pipeline import Pipeline, Task, load_pipeline
from infra.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO / "dags"
#: What ``init_airflow`` last set up in an Airflow home (it skips the work while this matches).
INIT_STAMP = "funnelrec_init.json"
#: Airflow asset names: ``funnelrec_<what a step emits>``.
ASSET_PREFIX = "funnelrec_"
CHAMPION_ASSET = f"{ASSET_PREFIX}champion"


def data_dates(context: dict[str, Any]) -> list[date]:
    """Every data date of the running DAG run, oldest first: conf ``dates`` or ``ds``, else the
    dates of all triggering champion asset events, else ``data_date``'s."""
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    if conf.get("dates"):
        return sorted({parse_run_date(str(d)) for d in conf["dates"]})
    if conf.get("ds"):
        return [parse_run_date(str(conf["ds"]))]
    events = context.get("triggering_asset_events") or {}
    found = {
        parse_run_date(str(e.extra["ds"]))
        for evs in events.values()
        for e in evs
        if (getattr(e, "extra", None) or {}).get("ds")
    }
    return sorted(found) if found else [data_date(context)]


def data_date(context: dict[str, Any]) -> date:
    """The data date of the running DAG run (see the module docstring for the order)."""
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    if conf.get("ds"):
        return parse_run_date(str(conf["ds"]))
    events = context.get("triggering_asset_events") or {}
    found = [e for evs in events.values() for e in evs if (getattr(e, "extra", None) or {}).get("ds")]
    if found:
        latest = max(found, key=lambda e: getattr(e, "timestamp", None) or datetime.min.replace(tzinfo=UTC))
        return parse_run_date(str(latest.extra["ds"]))
    start = context.get("data_interval_start")
    end = context.get("data_interval_end")
    if start is not None and end is not None and end > start:
        return start.date()
    logical = context.get("logical_date") or getattr(dag_run, "run_after", None)
    if logical is None:
        raise ValueError("cannot tell the data date of this run: give it as conf {'ds': 'YYYY-MM-DD'}")
    return (logical - timedelta(days=1)).date()


def failure_record(context: dict[str, Any]) -> Path:
    """``on_failure_callback``: write the failure as JSON under ``<airflow home>/failures`` and POST it
    to ``airflow.failure_webhook`` when set. Never raises (a callback error would hide the failure)."""
    settings = load_settings()
    ti = context.get("task_instance") or context.get("ti")
    dag_run = context.get("dag_run")
    record = {
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(dag_run, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "exception": str(context.get("exception"))[:4000],
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        record["ds"] = data_date(context).isoformat()
    except (ValueError, TypeError):
        record["ds"] = None
    safe = str(record["run_id"]).replace("/", "_").replace(":", "-")
    path = (
        Path(settings.airflow.home) / "failures" / str(record["dag_id"]) / safe / f"{record['task_id']}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    if settings.airflow.failure_webhook:
        req = urllib.request.Request(
            settings.airflow.failure_webhook,
            data=json.dumps(record).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except OSError as exc:
            print(f"failure webhook {settings.airflow.failure_webhook} unreachable: {exc}", file=sys.stderr)
    return path


def dag_arguments(settings: Settings, doc: str | None) -> dict[str, Any]:
    """What both DAGs share: first date, no catch-up, one run at a time, the tasks' defaults."""
    return {
        "start_date": datetime.combine(settings.airflow.start_date, datetime.min.time(), tzinfo=UTC),
        "catchup": False,
        "max_active_runs": 1,
        "default_args": default_args(settings),
        "tags": ["funnelrec"],
        "doc_md": doc,
    }


def default_args(settings: Settings) -> dict[str, Any]:
    """Retries with exponential backoff, a timeout per task and the failure record, from ``airflow.*``."""
    cfg = settings.airflow
    return {
        "retries": cfg.retries,
        "retry_delay": timedelta(minutes=cfg.retry_delay_minutes),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=cfg.max_retry_delay_minutes),
        "execution_timeout": timedelta(minutes=cfg.task_timeout_minutes),
        "on_failure_callback": failure_record,
    }


def airflow_env(settings: Settings, config: str | None = None) -> dict[str, str]:
    """Environment for the ``airflow`` CLI: its home, metadata DB and DAGs under the warehouse.

    The metadata DB, the API server's host, the execution API's URL and, with a local Spark master,
    Spark's local address default to SQLite in the home and the loopback interface; a deployment's
    environment that sets them wins (``infra/deploy/compose.yaml``: Postgres, services reached by
    name)."""
    home = Path(settings.airflow.home)
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "GX_ANALYTICS_ENABLED": "false",
        }
    )
    local = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(settings.airflow.api_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{settings.airflow.api_port}/execution/",
    }
    if settings.spark.master.startswith("local"):
        # On a cluster the driver must be reachable from the executors: the deployment says how
        # (SPARK_LOCAL_HOSTNAME, spark.driver.host).
        local["SPARK_LOCAL_IP"] = "127.0.0.1"
    for key, value in local.items():
        env.setdefault(key, value)
    if config:
        env["FUNNELREC_CONFIG"] = str(Path(config).resolve())
    # The venv's bin first: Airflow tasks and spark-submit must find this interpreter's tools.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def init_airflow(settings: Settings, env: dict[str, str], *, in_process: bool = False) -> None:
    """Migrate the metadata DB (idempotent) and create the pools: the GPU pool the training tasks
    run in, and the one-slot pool that serialises the promote tasks.

    Each ``airflow`` call starts Airflow (seconds), so a stamp in the Airflow home records what was
    set up: the Airflow version, the metadata DB and the pools. While the stamp matches and the DB
    file exists, nothing is run; delete ``INIT_STAMP`` to force a new migration.

    ``in_process``: migrate and create the pools through Airflow's own functions in this process
    (what ``airflow db migrate`` and ``airflow pools import`` call), for a process that runs DAGs
    itself with ``env`` already in its environment: it imports Airflow anyway, and does not start
    two more Airflow processes (bench/README.md, "The demo's time"). Refused when this process's
    Airflow is configured for another metadata DB."""
    from importlib.metadata import version

    home = Path(settings.airflow.home)
    home.mkdir(parents=True, exist_ok=True)
    pools = {
        settings.airflow.gpu_pool: {
            "slots": settings.airflow.gpu_pool_slots,
            "description": "training tasks (one slot per GPU)",
        },
        settings.airflow.promote_pool: {
            "slots": 1,
            "description": "promote tasks: one date decides at a time",
        },
    }
    db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    wanted = {"airflow": version("apache-airflow"), "db": db, "pools": pools}
    stamp = home / INIT_STAMP
    db_file = Path(db.removeprefix("sqlite:///")) if db.startswith("sqlite:///") else None
    try:
        if json.loads(stamp.read_text()) == wanted and (db_file is None or db_file.is_file()):
            return
    except (OSError, ValueError):
        pass
    if in_process:
        # Airflow reads its DB once, when first imported: the environment now and what the
        # process's Airflow was configured with must both be ``db``.
        from airflow import settings as airflow_settings

        configured = {
            os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"),
            airflow_settings.SQL_ALCHEMY_CONN,
        }
        if configured != {db}:
            raise RuntimeError(
                f"init_airflow(in_process=True): this process's Airflow is configured for "
                f"{sorted(map(str, configured))}, not {db}"
            )
        from airflow.models.pool import Pool
        from airflow.utils.db import upgradedb

        # A new DB's initdb times itself with SIGALRM and disarms the process's real-time timer
        # when done; re-arm whatever timer was set (a caller's own timeout).
        timer, started = signal.getitimer(signal.ITIMER_REAL), time.monotonic()
        upgradedb()
        if timer[0] > 0:
            left = max(timer[0] - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, timer[1])
        for name, pool in pools.items():
            Pool.create_or_update_pool(
                name=name, slots=pool["slots"], description=pool["description"], include_deferred=False
            )
    else:
        airflow = str(Path(sys.executable).with_name("airflow"))
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        pools_file = home / "funnelrec_pools.json"
        pools_file.write_text(json.dumps(pools, indent=2) + "\n")
        subprocess.run(
            [airflow, "pools", "import", str(pools_file)], env=env, check=True, stdout=subprocess.DEVNULL
        )
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")


def airflow_components(settings: Settings) -> dict[str, list[str]]:
    """The Airflow components ``serve_airflow`` starts, in order: name -> ``airflow`` arguments.

    What ``airflow standalone`` runs, bound to the loopback interface: the API server (and UI) on
    127.0.0.1, and the scheduler and triggerer without the log servers they would otherwise open on
    every interface (ports 8793 and 8794; Airflow hard-codes their host). On one host the API server
    reads the task logs from ``<home>/logs`` itself."""
    return {
        "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(settings.airflow.api_port)],
        "dag-processor": ["dag-processor"],
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "triggerer": ["triggerer", "--skip-serve-logs"],
    }


def components_env(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """``env`` for the components of ``airflow_components``, which run together on this host: the
    tasks reach the execution API of the API server started beside them (whatever URL the calling
    environment carries), and the scheduler, which signs each task's token for that API, and the
    API server, which checks it, share one secret. Without it each component draws its own and
    every task fails "Invalid auth token". One secret per start, held only in the components'
    environment; a deployment's own wins."""
    env = {**env}
    env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = (
        f"http://127.0.0.1:{settings.airflow.api_port}/execution/"
    )
    env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(32))
    return env


def serve_airflow(settings: Settings, env: dict[str, str], startup_seconds: float = 300) -> int:
    """Run a local Airflow (``airflow_components``) until a component exits or this process gets
    SIGINT or SIGTERM; then stop every component (its process group: SIGTERM, SIGKILL after 30 s).

    Each component logs to ``<home>/logs/components/<name>.log``. Once the API server answers its
    health check, prints the UI's address and where Airflow's simple auth manager wrote the admin
    password. Returns 0 after a signal, 1 when a component exited by itself."""
    home = Path(settings.airflow.home)
    logs = home / "logs" / "components"
    logs.mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    env = components_env(settings, env)
    procs: dict[str, subprocess.Popen] = {}
    stopping: list[int] = []

    def on_signal(signum, frame) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    url = f"http://127.0.0.1:{settings.airflow.api_port}"
    try:
        for name, args in airflow_components(settings).items():
            with open(logs / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
                procs[name] = subprocess.Popen(
                    [airflow, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        deadline, announced = time.monotonic() + startup_seconds, False
        while not stopping:
            exited = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            if exited:
                name, code = next(iter(exited.items()))
                print(f"airflow {name} exited ({code}); stopping the others. Log: {logs / name}.log")
                return 1
            if not announced:
                try:
                    with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2) as r:
                        announced = r.status == 200
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"the API server did not answer in {startup_seconds:.0f} s: see {logs}")
                        return 1
                if announced:
                    passwords = home / "simple_auth_manager_passwords.json.generated"
                    login = f"; admin login in {passwords}" if passwords.is_file() else ""
                    print(f"Airflow is up on {url} (loopback only){login}; logs in {logs}", flush=True)
            time.sleep(1)
        return 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)


#: The DAGs ``run_dags`` runs by default: the nightly one, then the scoring one its champion asset
#: triggers under a scheduler.
DAG_IDS = ("funnelrec_nightly", "funnelrec_scoring")


def run_dags(
    settings: Settings, env: dict[str, str], ds: date, dag_ids: tuple[str, ...] = DAG_IDS
) -> list[str]:
    """Run ``dag_ids`` one after the other for ``ds`` in this process, each with Airflow's
    ``dag.test()`` (what ``airflow dags test`` runs: every task in order, in process), against the
    Airflow home of ``env`` (``airflow_env``; set here before Airflow is imported). One process
    starts Airflow, Spark and the models' libraries once for all the runs. Raises ``RuntimeError``
    on a DAG file that does not import or a run that does not succeed (the later DAGs do not run);
    returns one line per run."""
    os.environ.update(env)
    _start_spark_beside(settings)
    init_airflow(settings, env, in_process=True)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        raise RuntimeError(f"DAG files do not import: {bag.import_errors}")
    _import_beside(BESIDE_IMPORTS)
    logical = datetime(ds.year, ds.month, ds.day, tzinfo=UTC)
    lines = []
    for dag_id in dag_ids:
        dag = bag.get_dag(dag_id)
        if dag is None:
            raise RuntimeError(
                f"no DAG {dag_id} in {DAGS_FOLDER} (there are: {', '.join(sorted(bag.dag_ids))})"
            )
        run = dag.test(logical_date=logical, run_conf={"ds": ds.isoformat()})
        state = str(getattr(run.state, "value", run.state))
        lines.append(f"{dag_id} {ds}: {state} (run {run.run_id})")
        if state != "success":
            raise RuntimeError(
                f"{dag_id} for {ds} ended {state}; its task logs are above, failure records under "
                f"{Path(settings.airflow.home) / 'failures' / dag_id}"
            )
    return lines


def _start_spark_beside(settings: Settings) -> None:
    """Start this process's Spark session in a thread while Airflow sets itself up and parses the
    DAG files: Spark's JVM is a process of its own, so its start-up (15-30 s on 2 cores) runs beside
    Airflow's instead of inside the first Spark task. That task's ``get_spark`` finds the session, or
    waits for it (PySpark's builder holds a lock while it creates one). A start that fails here is
    left for that task to meet again and report. Not with ``airflow.spark_submit_conn_id``: the ETL's
    Spark stages then run in spark-submit's own drivers."""
    if settings.airflow.spark_submit_conn_id:
        return
    import threading

    from pyspark.sql import SparkSession  # imported here, not in the thread, beside Airflow's imports

    from infra.spark import get_spark

    if SparkSession.getActiveSession() is not None:
        return  # this process already has one (the test suite's)

    def start() -> None:
        with contextlib.suppress(Exception):
            get_spark(settings)

    threading.Thread(target=start, name="funnelrec-spark-start", daemon=True).start()


#: The libraries of the DAG's later tasks that take seconds each to import (bench/README.md, "The
#: demo's time"): great_expectations, torch, torch's compiler (the optimisers' constructors and
#: ``torch.use_deterministic_algorithms`` import it though no model compiles), MLflow and its SQL
#: store. ``run_dags`` imports them while its first Spark task waits on Spark's JVM.
BESIDE_IMPORTS = (
    "great_expectations",
    "torch",
    "torch._inductor",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
)


def _import_beside(modules: tuple[str, ...]) -> None:
    """Import ``modules`` in a thread, so that the first task that needs one finds it imported
    instead of paying its import. Importing is mostly Python holding the GIL, so this gains only
    while the main thread waits, as it does on Spark's JVM during the first Spark task (started
    beside Airflow's own set-up instead, it made that set-up longer).

    Python's per-module import locks make a task that imports one of these meanwhile wait for the
    thread's import to finish. They hand out a half-initialised module only when two threads import
    the same modules in opposite orders; the libraries these have in common with what the main
    thread imports meanwhile (numpy, pandas, pyarrow) are imported here first, in the calling
    thread, so that the two threads share no module still being imported. A module that fails to
    import in the thread is left for its task to import again and report."""
    import importlib
    import threading

    missing = [m for m in modules if m not in sys.modules]
    if not missing:
        return  # the test suite's process has them all
    for shared in ("numpy", "pandas", "pyarrow"):
        importlib.import_module(shared)

    def run() -> None:
        for name in missing:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    threading.Thread(target=run, name="funnelrec-imports", daemon=True).start()


def asset_name(emits: str) -> str:
    return f"{ASSET_PREFIX}{emits}"


def pipeline_tasks(
    dag: str, settings: Settings, *, batched: bool = False, pipeline: Pipeline | None = None
) -> dict[str, Any]:
    """Create the tasks of ``dag``'s steps inside the DAG being defined and wire them.

    Each task runs its step for the run's data date (``data_date``), or for every date of the run
    when ``batched`` (``data_dates``: a scoring run the scheduler triggered for several champion
    events), and returns the stage's ``Outcome.data`` (per date when batched) as its XCom. Returns
    the operators by task id (without the task group prefix)."""
    from airflow.sdk import TaskGroup

    pipeline = pipeline or load_pipeline()
    tasks = pipeline.tasks(settings.training.models, dag=dag)
    groups: dict[str, Any] = {}
    made: dict[str, Any] = {}
    for t in tasks:
        if t.group is None:
            made[t.task_id] = _operator(t, settings, batched)
            continue
        if t.group not in groups:
            groups[t.group] = TaskGroup(group_id=t.group)
        with groups[t.group]:
            made[t.task_id] = _operator(t, settings, batched)
    for task_id, ups in pipeline.upstream(tasks).items():
        for up in sorted(ups):
            made[up] >> made[task_id]
    return made


def _operator(t: Task, settings: Settings, batched: bool):
    from airflow.sdk import Asset, get_current_context, task

    # spark-submit runs one date per application: a batched DAG's steps stay in process.
    if t.stage.submit and settings.airflow.spark_submit_conn_id and not batched:
        return _spark_submit(t, settings)
    cfg = settings.airflow
    kwargs: dict[str, Any] = {"task_id": t.task_id}
    if t.stage.gpu:
        kwargs.update(pool=cfg.gpu_pool, pool_slots=1)
        if cfg.gpu_queue:
            kwargs["queue"] = cfg.gpu_queue
    elif t.step.serial:
        # One slot: two dates (a backfill) never run this step at once.
        kwargs.update(pool=cfg.promote_pool, pool_slots=1)
    asset = Asset(asset_name(t.step.emits)) if t.step.emits else None
    if asset is not None:
        kwargs["outlets"] = [asset]

    def run_step() -> dict:
        context = get_current_context()
        s = load_settings()
        dates = data_dates(context) if batched else [data_date(context)]
        data, outcome = {}, None
        for d in dates:
            outcome = t.run(s, d)
            if outcome.exit_code:
                raise RuntimeError(f"{t.task_id} {d}: {outcome.text}")
            data[d.isoformat()] = outcome.data
        if asset is not None and outcome is not None and outcome.event is not None:
            context["outlet_events"][asset].extra = outcome.event
        return data if batched else data[dates[0].isoformat()]

    return task(**kwargs)(run_step)()


def _spark_submit(t: Task, settings: Settings):
    """The step as ``spark-submit infra/cli.py <stage> --date <ds> ...`` on a Spark connection.

    The date is computed when the task runs, by the same ``data_date`` rule as the in-process tasks
    (a Jinja template could not read the triggering asset events)."""
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from infra.spark import use_this_interpreter

    class StageSubmit(SparkSubmitOperator):
        def execute(self, context):
            self.application_args = [t.stage.name, *_argv(t.options(data_date(context)))]
            use_this_interpreter()  # spark-submit's driver: the worker's venv, with the project
            return super().execute(context)

    return StageSubmit(
        task_id=t.task_id,
        conn_id=settings.airflow.spark_submit_conn_id,
        application=str(REPO / "infra" / "cli.py"),
        conf=dict(settings.spark.conf),
        name=f"funnelrec-{t.task_id}",
    )


def _argv(options: dict[str, Any]) -> list[str]:
    """Options as the CLI takes them (``date`` -> ``--date 2015-09-18``, a true flag -> ``--flag``)."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            for item in value:
                argv += [flag, str(item)]
        elif value not in (None, False):
            argv += [flag, value.isoformat() if isinstance(value, date) else str(value)]
    return argv
