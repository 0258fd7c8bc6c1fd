"""Seven nights in a row, as production runs them: a real Airflow scheduler, a backfill of the
nightly DAG over consecutive dates (``--max-active-runs 1``), each night's promotion triggering
its scoring run through the champion asset, and retention pruning inside the soak.

What it starts (all in their own process groups, stopped at the end): the components
``funnelrec airflow standalone`` runs (``infra.orchestration.airflow_components``: the API server
on 127.0.0.1, which tasks talk to, DAG processor, scheduler and triggerer without log servers),
with a LocalExecutor on a SQLite metadata DB in a work folder; the warehouse lives there too. The
nightly DAG gets ``airflow.end_date`` = the last date and the scoring DAG no cron
(``scoring_schedule: null``), so the only runs are the backfill's and the ones its promotions
trigger.

Per date it saves (``--out``, default ``bench/results/soak.json``): the champion after the night
(version, model), the decision (per candidate: kind, outcome, the gates that failed), the champion's
and the challenger's primary metric on the date's held-out users and how many users, scored users
and the fallback's share, catalogue coverage, the outcome hit rate (where later nights are known),
the wall time of the nightly and the scoring run, and the disk under the warehouse when the date's
scoring finished. At the end it checks that no process it started is left.

    .venv/bin/python bench/soak.py                      # 2015-09-12 .. 2015-09-18, retention 3 days
    .venv/bin/python bench/soak.py --first 2015-09-10 --nights 5 --models popularity,als_multi

``--kill-task etl.split`` (any task id of either DAG) SIGKILLs that task's process on the first
night once it has run for ``--kill-after`` seconds (the ``pid`` Airflow records for the running
task instance), with ``airflow.retries`` 1 and a 6-second retry delay: Airflow marks the try failed
and runs it again. Each night's figures then carry the training manifest's checksums and a digest
of the published scores (``scores_digest``), so a killed soak compares row for row with an
uninterrupted one (``--compare OTHER.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from infra.tables import CATALOGUE, SERVING, decisions_dir, scores_partition_dir  # noqa: E402

NIGHTLY, SCORING = "funnelrec_nightly", "funnelrec_scoring"


def soak_config(work: Path, first: date, last: date, args) -> Path:
    """The demo's settings (bundled RetailRocket slice, leave-last-purchase) for a run of nights."""
    demo = yaml.safe_load((REPO / "infra" / "demo.yaml").read_text())
    wh = work / "warehouse"
    cfg = {
        **demo,
        "paths": {
            "data_root": str(REPO / "jobs" / "sample_data"),
            "warehouse_root": str(wh),
            "quarantine_root": str(wh / "quarantine"),
        },
        "training": {"models": args.models.split(","), "max_epochs": args.max_epochs},
        "retention": {"days": args.retention_days, "champions": 3},
        "airflow": {
            "home": str(work / "airflow"),
            "start_date": first.isoformat(),
            "end_date": last.isoformat(),
            "scoring_schedule": None,
            # A killed task is retried once, a few seconds later; otherwise a failure ends the soak.
            "retries": 1 if args.kill_task else 0,
            "retry_delay_minutes": 0.1,
        },
    }
    path = work / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def runs(db: Path) -> list[dict]:
    """Every DAG run of the metadata DB (read-only), oldest first."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            "SELECT dag_id, run_id, state, run_type, conf, start_date, end_date FROM dag_run ORDER BY id"
        ).fetchall()
    finally:
        con.close()
    keys = ("dag_id", "run_id", "state", "run_type", "conf", "start_date", "end_date")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def paused(db: Path) -> dict[str, bool]:
    """``{dag_id: is_paused}`` of the parsed DAGs (empty until the dag-processor has run)."""
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {d: bool(p) for d, p in con.execute("SELECT dag_id, is_paused FROM dag")}
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def _rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a read-only query of the metadata DB ([] while its tables do not exist yet)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def running_task_pid(db: Path, task_id: str) -> tuple[int, int] | None:
    """``(pid, try_number)`` of ``task_id`` while it runs (any DAG run), else None."""
    rows = _rows(
        db,
        "SELECT pid, try_number FROM task_instance WHERE task_id = ? AND state = 'running' AND pid IS NOT NULL",
        (task_id,),
    )
    return (int(rows[0][0]), int(rows[0][1])) if rows else None


def task_tries(db: Path, task_id: str) -> list[dict]:
    """Every task instance of ``task_id``: its DAG run, state and how many tries it took."""
    rows = _rows(
        db,
        "SELECT run_id, state, try_number FROM task_instance WHERE task_id = ? ORDER BY run_id",
        (task_id,),
    )
    return [{"run_id": r, "state": s, "try_number": t} for r, s, t in rows]


class TaskKiller:
    """SIGKILLs the process of one task the first time it has run ``after`` seconds."""

    def __init__(self, db: Path, task_id: str, after: float):
        self.db, self.task_id, self.after = db, task_id, after
        self.seen_at: float | None = None
        self.killed: dict | None = None

    def poll(self) -> None:
        if self.killed is not None:
            return
        running = running_task_pid(self.db, self.task_id)
        if running is None:
            self.seen_at = None
            return
        if self.seen_at is None:
            self.seen_at = time.monotonic()
        if time.monotonic() - self.seen_at < self.after:
            return
        pid, try_number = running
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.killed = {
            "task_id": self.task_id,
            "pid": pid,
            "try_number": try_number,
            "after_seconds": self.after,
        }
        print(f"soak: SIGKILL to {self.task_id} (pid {pid}, try {try_number})", flush=True)


def rows_digest(settings, ds: str) -> dict:
    """The training manifest's checksums and an order-free digest of the published scores of ``ds``
    (what must not change when a task is killed and retried)."""
    import hashlib

    import pyarrow.parquet as pq

    from infra.tables import TRAINING, read_manifest

    wh = settings.paths.warehouse_root
    out: dict = {}
    bundle = TRAINING.dir(wh, ds)
    if bundle.exists():
        out["training_checksums"] = read_manifest(bundle).checksums
    published = scores_partition_dir(wh, ds)
    if published.exists():
        # the MLflow run id and the scoring time differ between two soaks by construction
        frame = pq.read_table(published).to_pandas().drop(columns=["scored_at", "run_id"], errors="ignore")
        lines = sorted(frame.astype(str).apply("|".join, axis=1))
        out["scores_digest"] = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return out


def seconds(run: dict) -> float | None:
    from datetime import datetime

    if not run.get("start_date") or not run.get("end_date"):
        return None
    start, end = (datetime.fromisoformat(str(run[k])) for k in ("start_date", "end_date"))
    return round((end - start).total_seconds(), 1)


def disk_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return round(total / 2**20, 1)


def date_figures(settings, ds: str) -> dict:
    """What the warehouse says about ``ds`` right after its scoring run (before retention prunes it)."""
    import pyarrow.parquet as pq

    wh = Path(settings.paths.warehouse_root)
    out: dict = {}
    scores = scores_partition_dir(wh, ds)
    if scores.exists():
        t = pq.read_table(
            scores, columns=["user_id", "item_id", "expert", "model", "model_version"]
        ).to_pandas()
        users = t["user_id"].nunique()
        fallback_users = t.loc[t["expert"] == "fallback", "user_id"].nunique()
        catalogue = SERVING.table_dir(wh, ds, CATALOGUE)
        items = pq.read_table(catalogue).num_rows if catalogue.exists() else None
        out.update(
            scored_users=users,
            fallback_share=round(fallback_users / users, 4) if users else None,
            coverage=round(t["item_id"].nunique() / items, 4) if items else None,
            served_version=int(t["model_version"].iloc[0]) if len(t) else None,
            served_model=t["model"].iloc[0] if len(t) else None,
        )
    decisions = decisions_dir(wh, ds)
    if decisions.exists():
        d = pq.read_table(decisions).to_pandas()
        candidates = []
        for version, g in d.groupby("version"):
            paired = g[g["gate"].isin(["min_relative_gain", "refresh_non_inferiority"])]
            row = paired.iloc[0] if len(paired) else g.iloc[0]
            candidates.append(
                {
                    "version": int(version),
                    "model": g["model"].iloc[0],
                    "kind": g["kind"].iloc[0],
                    "outcome": g["outcome"].iloc[0],
                    "failed_gates": sorted(g.loc[g["status"] == "fail", "gate"]),
                    "value": _num(g["candidate_value"].iloc[0]),
                    "champion_value": _num(row["champion_value"]),
                    "users": _num(row["users"]),
                }
            )
        out["decision"] = {
            "champion_before": _num(d["champion_before"].iloc[0]),
            "champion_after": _num(d["champion_after"].iloc[0]),
            "candidates": candidates,
        }
    return out


def _num(v):
    import math
    import numbers

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def outcome_rates(settings) -> dict[str, dict]:
    import duckdb

    from infra.tables import analytics_db

    db = analytics_db(settings.paths.warehouse_root)
    if not db.exists():
        return {}
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT CAST(ds AS VARCHAR), hit_rate_at_10, hit_rate_at_k, days_observed, complete "
            "FROM agg_recommendation_outcomes WHERE slice = 'all'"
        ).fetchall()
    return {
        r[0]: {"hit_rate_at_10": r[1], "hit_rate_at_k": r[2], "days_observed": r[3], "complete": r[4]}
        for r in rows
    }


def stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    for p in procs.values():
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def leftovers(work: Path) -> list[str]:
    """Processes still running whose command line names the work folder (ours, if any)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            text = (
                " ".join(proc.info["cmdline"] or [])
                + " "
                + str((proc.info["environ"] or {}).get("AIRFLOW_HOME", ""))
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(work) in text and proc.pid != os.getpid():
            out.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
    return out


def markdown(result: dict) -> str:
    """The per-night table of ``bench/README.md``."""
    head = (
        "| date | decision | champion after | champion / challenger primary (users) | scored users | "
        "fallback | coverage | hit rate @K (days seen) | nightly s | warehouse MB |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for n in result["nights"]:
        d = n.get("decision") or {}
        cands = d.get("candidates", [])
        promoted = [c for c in cands if c["outcome"] == "promoted"]
        refused = [f"v{c['version']} {c['model']} {c['kind']}: {','.join(c['failed_gates']) or c['outcome']}"
                   for c in cands if c["outcome"] != "promoted"]  # fmt: skip
        decision = (
            f"{promoted[0]['kind']} v{promoted[0]['version']} {promoted[0]['model']}" if promoted else "kept"
        ) + (f"; refused {'; '.join(refused)}" if refused else "")
        best = promoted[0] if promoted else max(cands, key=lambda c: c["value"] or 0, default=None)
        primary = "-"
        if best:
            champ = best["champion_value"]
            primary = (
                f"{champ:.4f} / {best['value']:.4f} ({best['users']})"
                if champ
                else f"- / {best['value']:.4f}"
            )
        out = n.get("outcome") or {}
        hit = (
            f"{out['hit_rate_at_k']:.3f} ({out['days_observed']})"
            if out and out.get("days_observed")
            else "-"
        )
        lines.append(
            f"| {n['ds']} | {decision} | v{d.get('champion_after')} {n.get('served_model', '')} | {primary} | "
            f"{n.get('scored_users')} | {n.get('fallback_share')} | {n.get('coverage')} | {hit} | "
            f"{n.get('nightly_seconds')} | {n.get('warehouse_mb_after_scoring')} |"
        )
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--first", default="2015-09-12", help="first nightly date (default: 2015-09-12)")
    p.add_argument("--nights", type=int, default=7)
    p.add_argument("--models", default="popularity,als_multi,member_funnel")
    p.add_argument("--max-epochs", type=int, default=15)
    p.add_argument("--retention-days", type=int, default=3)
    p.add_argument("--timeout-minutes", type=float, default=120)
    p.add_argument("--work", help="work folder (default: a new temporary folder)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    p.add_argument("--table", metavar="JSON", help="print the markdown table of a saved soak and exit")
    p.add_argument("--kill-task", metavar="TASK_ID", help="SIGKILL this task's process on the first night")
    p.add_argument("--kill-after", type=float, default=5.0, help="seconds the task runs before the kill")
    p.add_argument(
        "--compare", metavar="JSON", help="a saved soak of the same dates whose rows must be equal"
    )
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0

    from infra.orchestration import airflow_components, airflow_env, components_env, init_airflow
    from infra.settings import load_settings

    first = date.fromisoformat(args.first)
    last = first + timedelta(days=args.nights - 1)
    dates = [(first + timedelta(days=i)).isoformat() for i in range(args.nights)]
    work = Path(args.work or tempfile.mkdtemp(prefix="funnelrec-soak-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = soak_config(work, first, last, args)
    settings = load_settings(config, environ={})
    env = components_env(settings, airflow_env(settings, str(config)))
    env["AIRFLOW__CORE__PARALLELISM"] = "4"  # two cores: a few task processes at a time
    env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
    signal.signal(signal.SIGTERM, _interrupt)  # a killed soak still stops what it started
    init_airflow(settings, env)
    airflow = str(Path(sys.executable).with_name("airflow"))
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    per_date: dict[str, dict] = {d: {"ds": d} for d in dates}
    t0 = time.monotonic()
    try:
        # The components `funnelrec airflow standalone` runs, on the loopback interface only.
        for name, component in airflow_components(settings).items():
            cmd = [airflow, *component]
            with open(logs / f"{name}.log", "w") as log:  # the child keeps its own descriptor
                procs[name] = subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        db = Path(settings.airflow.home) / "airflow.db"
        deadline = time.monotonic() + 300
        while paused(db) != {NIGHTLY: False, SCORING: False}:  # parsed by the dag-processor, unpaused
            if time.monotonic() > deadline:
                raise RuntimeError(f"the DAGs were not parsed and unpaused in 5 minutes: see {logs}")
            for dag_id, is_paused in paused(db).items():
                if is_paused:
                    subprocess.run([airflow, "dags", "unpause", dag_id], env=env, capture_output=True)
            time.sleep(5)
        # The backfill creates the runs whose logical date (the day processed) is in [from, to).
        to = (last + timedelta(days=1)).isoformat()
        backfill = [airflow, "backfill", "create", "--dag-id", NIGHTLY, "--from-date", dates[0],
                    "--to-date", to, "--max-active-runs", "1"]  # fmt: skip
        for attempt in range(6):  # the first parse may not have stored the serialized DAG yet
            made = subprocess.run(backfill, env=env, capture_output=True, text=True)
            if made.returncode == 0:
                break
            if attempt == 5:
                raise RuntimeError(
                    f"airflow backfill create failed: {made.stdout[-2000:]} {made.stderr[-2000:]}"
                )
            time.sleep(10)
        print(f"soak: backfill of {dates[0]}..{dates[-1]} created; work folder {work}", flush=True)
        done: set[str] = set()
        finished = 0
        killer = TaskKiller(db, args.kill_task, args.kill_after) if args.kill_task else None
        while len(done) < len(dates):
            if time.monotonic() - t0 > args.timeout_minutes * 60:
                raise TimeoutError(f"soak did not finish in {args.timeout_minutes} minutes")
            all_runs = runs(db)
            nightly = [r for r in all_runs if r["dag_id"] == NIGHTLY]
            if any(r["state"] == "failed" for r in nightly):
                failed = [r["run_id"] for r in nightly if r["state"] == "failed"]
                raise RuntimeError(
                    f"nightly runs failed: {failed}; task logs under {settings.airflow.home}/logs"
                )
            scoring = [r for r in all_runs if r["dag_id"] == SCORING and r["state"] in ("success", "failed")]
            if any(r["state"] == "failed" for r in scoring):
                raise RuntimeError(f"a scoring run failed; task logs under {settings.airflow.home}/logs")
            if len(scoring) == finished:
                for _ in range(20 if killer and killer.killed is None else 1):
                    if killer:
                        killer.poll()
                    time.sleep(1 if killer and killer.killed is None else 20)
                continue
            finished = len(scoring)  # a scoring run ended (published, then pruned): read its dates
            for ds in dates:
                published = scores_partition_dir(settings.paths.warehouse_root, ds)
                if ds in done or not published.exists():
                    continue
                per_date[ds].update(date_figures(settings, ds))
                per_date[ds]["warehouse_mb_after_scoring"] = disk_mb(Path(settings.paths.warehouse_root))
                per_date[ds]["elapsed_minutes"] = round((time.monotonic() - t0) / 60, 1)
                done.add(ds)
                print(f"soak: {ds} scored: {json.dumps(per_date[ds], default=str)}", flush=True)
        # The last scoring run prunes after publishing: wait for every run to end.
        while any(r["state"] in ("queued", "running") for r in runs(db)):
            time.sleep(10)
    finally:
        stop(procs)
    all_runs = runs(db)
    nightly = sorted((r for r in all_runs if r["dag_id"] == NIGHTLY), key=lambda r: r["run_id"])
    for r, ds in zip(nightly, dates, strict=False):
        per_date[ds]["nightly_seconds"] = seconds(r)
    scoring = [r for r in all_runs if r["dag_id"] == SCORING]
    rates = outcome_rates(settings)
    for ds in dates:
        per_date[ds]["outcome"] = rates.get(ds)
    left = leftovers(work)
    for ds in dates:
        per_date[ds].update(rows_digest(settings, ds))
    result = {
        "what": "bench/soak.py: consecutive nightly dates as one Airflow backfill under a real scheduler",
        "dates": dates,
        "models": args.models.split(","),
        "max_epochs": args.max_epochs,
        "retention_days": args.retention_days,
        "nights": [per_date[d] for d in dates],
        "scoring_runs": [
            {"run_id": r["run_id"], "state": r["state"], "seconds": seconds(r)} for r in scoring
        ],
        "warehouse_mb_end": disk_mb(Path(settings.paths.warehouse_root)),
        "total_minutes": round((time.monotonic() - t0) / 60, 1),
        "leftover_processes": left,
        "work": str(work),
    }
    if args.kill_task:
        result["killed"] = killer.killed if killer else None
        result["killed_task_tries"] = task_tries(db, args.kill_task)
    if args.compare:
        other = {n["ds"]: n for n in json.loads(Path(args.compare).read_text())["nights"]}
        keys = ("training_checksums", "scores_digest")
        result["compared_with"] = args.compare
        result["same_rows_as_compared"] = {
            ds: all(per_date[ds].get(k) == other.get(ds, {}).get(k) for k in keys) for ds in dates
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(markdown(result))
    print(f"leftover processes: {left or 'none'}; warehouse {result['warehouse_mb_end']} MB at the end")
    if args.kill_task:
        print(f"killed: {result['killed']}; tries: {result['killed_task_tries']}")
    if args.compare:
        print(f"same rows as {args.compare}: {result['same_rows_as_compared']}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
