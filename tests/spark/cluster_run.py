"""Run by ``tests/spark/test_cluster.py`` in a process of its own (a process has one SparkContext,
and the test session's is on ``local[2]``): the Spark stages of a date on the standalone cluster
the settings name, then one job during which a worker is killed, then a distributed training that
asks for more processes than the one worker left can run. Prints what it saw as JSON.

    python -m tests.spark.cluster_run --config CFG --date D --kill-pgid PID
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from infra.settings import load_settings
from infra.spark import get_spark
from infra.tables import events_dir

KILL_GROUP = "killed-worker"


def _executors(sc) -> int:
    return sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # less the driver


def killed_worker_job(spark, events: Path, pgid: int) -> dict:
    """Copy the events through four slow tasks on the cluster's two one-core workers; once two
    tasks run, SIGKILL the process group ``pgid`` (a worker and its executor). Returns the
    executors before and after, how many task runs started (each writes a file: a lost task that
    runs again counts twice), and the row checksums of the input and the output."""
    import os
    import signal

    from pyspark.sql import functions as F

    sc = spark.sparkContext
    tracker = sc.statusTracker()
    rows = spark.read.parquet(str(events)).repartition(4, "user_id")
    partitions = rows.rdd.getNumPartitions()
    executors_before = _executors(sc)
    killed: dict = {}

    def kill_when_running() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for job in tracker.getJobIdsForGroup(KILL_GROUP):
                info = tracker.getJobInfo(job)
                for stage_id in info.stageIds if info else ():
                    stage = tracker.getStageInfo(stage_id)
                    # Two unfinished task runs have marked their start: both slots are inside their
                    # tasks' sleep (a task merely scheduled may not have reached its Python worker
                    # yet, and a kill then would leave nothing to run again).
                    started = sum(1 for _ in marks.iterdir())
                    slow_stage = stage and stage.numTasks == partitions  # the tasks that sleep
                    if slow_stage and started - stage.numCompletedTasks >= 2:
                        os.killpg(pgid, signal.SIGKILL)
                        killed.update(stage=stage_id, at_completed=stage.numCompletedTasks)
                        return
            time.sleep(0.1)

    marks = Path(tempfile.mkdtemp(prefix="funnelrec-task-runs-"))

    def slow(batch):
        import uuid

        from pyspark import TaskContext

        tc = TaskContext.get()  # one file per task run: a re-run of a lost task adds one
        (marks / f"p{tc.partitionId()}-a{tc.attemptNumber()}-{uuid.uuid4().hex[:6]}").touch()
        time.sleep(1.0)
        yield from batch

    def checksum(df) -> int:
        h = F.xxhash64(*df.columns)
        r = df.agg(F.sum(h.bitwiseAND(F.lit(0xFFFFFFFF))), F.sum(F.shiftrightunsigned(h, 32)), F.count("*"))
        lo, hi, n = r.first()
        return [(lo + (hi << 32)) % (1 << 64), n]

    expected = checksum(rows)
    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    sc.setJobGroup(KILL_GROUP, "a worker is killed during this job")
    copied = spark.createDataFrame(rows.rdd.mapPartitions(slow), rows.schema)
    got = checksum(copied)
    sc.setLocalProperty("spark.jobGroup.id", None)
    killer.join(timeout=5)
    stages = [
        tracker.getStageInfo(s)
        for job in tracker.getJobIdsForGroup(KILL_GROUP)
        for s in (tracker.getJobInfo(job).stageIds if tracker.getJobInfo(job) else ())
    ]
    return {
        "killed": killed,
        "executors_before": executors_before,
        "executors_after": _executors(sc),
        "failed_tasks": sum(s.numFailedTasks for s in stages if s),
        "partitions": copied.rdd.getNumPartitions(),
        "task_runs": len(list(marks.iterdir())),
        "expected": expected,
        "got": got,
    }


def too_many_processes(settings, ds: date) -> dict:
    """``train --processes 2`` with one one-core worker left: Spark's barrier check refuses the job.
    Returns how long the refusal took and its message."""
    from training.distributed import DistributedTrainingError
    from training.train_evaluate import run_train

    t = time.monotonic()
    try:
        run_train(settings, ds.isoformat(), "member", processes=2)
    except DistributedTrainingError as exc:
        return {"error": str(exc), "seconds": round(time.monotonic() - t, 1)}
    return {"error": None, "seconds": round(time.monotonic() - t, 1)}


def main() -> int:
    from jobs.context import run_context
    from jobs.ingest import run_ingest
    from jobs.sessionize import run_sessionize
    from jobs.split import run_split
    from training.score import run_score

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--date", required=True)
    ap.add_argument("--kill-pgid", type=int, required=True)
    args = ap.parse_args()
    settings = load_settings(args.config, environ={})
    ds = date.fromisoformat(args.date)
    spark = get_spark(settings)
    seconds = {}
    for name, step in (
        ("ingest", lambda: run_ingest(spark, settings, ds)),
        ("sessionize", lambda: run_sessionize(spark, settings, ds)),
        ("split", lambda: run_split(spark, settings, ds)),
        ("context", lambda: run_context(spark, settings, ds)),
        ("score", lambda: run_score(settings, ds, path="spark", spark=spark)),
    ):
        t = time.monotonic()
        step()
        seconds[name] = round(time.monotonic() - t, 1)
    out = {
        "master": spark.sparkContext.master,
        "seconds": seconds,
        "kill": killed_worker_job(spark, events_dir(settings.paths.warehouse_root), args.kill_pgid),
        "too_many_processes": too_many_processes(settings, ds),
    }
    print(json.dumps(out))
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
