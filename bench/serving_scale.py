"""Benchmark: the scoring driver's memory as the active users grow (issue: drivers that do not hold
the world).

    .venv/bin/python bench/serving_scale.py --users 1000000 10000000 [--model sasrec] [--path local]

Once: the bundled RetailRocket slice through the nightly pipeline up to ``promote`` with one model
(the demo's settings; SASRec by default, a champion that scores shoppers it never saw from their
events; ``als_multi`` knows none of them and serves them the fallback, the same path at a fraction
of the model's cost; ``popularity`` never passes the policy's floor, so it never becomes champion). Then, per user count N, in a fresh Python process (the driver) with a fresh JVM:
N synthetic shoppers with ``--events-per-user`` events each on the day after the slice's last
(items drawn from the champion's catalogue, skewed towards a few), written into the events table
as ingest would; then the two stages the scoring DAG runs on them through the real code,
``context`` (Spark) and ``score --path spark`` (``training.score.run_score``: the champion
broadcast to the Python workers, ``mapInPandas`` over every active user), or with ``--path local``
``score --path local`` (the driver's own process reads the serving context in bounded batches and
scores them with the champion it loaded). Sampled every 0.25 s
over those two stages: the driver's Python RSS, the JVM's RSS, its used heap (garbage included,
so it says how fast the JVM allocates more than what it keeps) and its old generation as the last
collection left it (what the JVM keeps live), with the collectors' time. On ``local[N]`` the JVM is
the driver *and* the executors, so its heap holds the tasks' buffers too: Spark's memory manager
bounds them, and spills beyond. The Python workers (the JVM's children, holding the model and
one Arrow batch each) are not sampled.

The targets: the driver's Python memory and the JVM's old generation after collections flat from
1M to 10M users (nothing per user reaches the driver). Prints a table and saves
``bench/results/serving_scale_<model>.json`` (``serving_scale_<model>_local.json`` for the local path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from etl import Sampler, old_generation  # noqa: E402

from infra.settings import load_settings  # noqa: E402

#: The slice's last day: the champion is trained on it; the synthetic shoppers arrive a day later.
TRAIN_DATE = date(2015, 9, 18)
SCORE_DATE = TRAIN_DATE + timedelta(days=1)
SOURCE = "retailrocket_mb"


def settings_for(work: Path, cores: int, k: int, model: str, path: str = "spark"):
    """The demo's settings under ``work``, ``model`` alone and one stage, with Spark set for real
    volumes (``infra/defaults.yaml``'s adaptive execution, 4 GB of driver heap) instead of the
    demo's tiny tables."""
    return load_settings(
        REPO / "infra" / "demo.yaml",
        environ={},
        cwd=REPO,  # the bundled data's relative paths
        overrides={
            "paths": {"warehouse_root": str(work / "wh"), "quarantine_root": str(work / "wh" / "q")},
            "training": {"models": [model]},
            "ranking": {"model": None},
            "scoring": {"k": k, "path": path},
            "spark": {
                "master": f"local[{cores}]",
                "conf": {
                    "spark.driver.memory": "4g",
                    "spark.sql.adaptive.enabled": "true",
                    "spark.sql.shuffle.partitions": str(2 * cores),
                    "spark.driver.extraJavaOptions": "-XX:+UseParallelGC",
                },
            },
        },
    )


def prepare(settings) -> dict:
    """The slice up to ``promote`` (validations left out: the scored tables are what is measured);
    stops this process's Spark session after it, so that no second JVM holds memory while the
    measured runs go."""
    from pyspark.sql import SparkSession

    from infra.pipeline import load_pipeline

    t = time.perf_counter()
    done = load_pipeline().run(settings, TRAIN_DATE, until="promote", checks=False)
    decision = done["promote"].data
    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()
    if not decision.get("champion"):
        raise SystemExit(f"the promotion gates refused {settings.training.models[0]}: {decision}")
    return {"seconds": time.perf_counter() - t, "promote": decision}


def write_shoppers(spark, settings, users: int, per_user: int, seed: int = 0) -> int:
    """``users`` new shoppers with ``per_user`` events each on ``SCORE_DATE`` (views, the last one
    a cart), into the events table's partition of that day, replacing what it held. Items come from
    the trained catalogue (one row per item reaches the driver, none per shopper), the
    ``abs(hash) ** 3`` skew putting most events on a few items."""
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    from infra.tables import EVENTS, ITEM_MAP, TRAINING, events_dir

    item_ids = pq.read_table(TRAINING.dir(settings.paths.warehouse_root, TRAIN_DATE) / ITEM_MAP.name,
                             columns=["item_id"]).column("item_id").to_pylist()  # fmt: skip
    items = spark.createDataFrame(list(enumerate(item_ids)), "_idx long, item_id string")
    day = int(datetime(SCORE_DATE.year, SCORE_DATE.month, SCORE_DATE.day, tzinfo=UTC).timestamp())
    # Shoppers start within the day's first ``spread`` seconds, so that their last event (a minute
    # after the one before) is still on the partition's UTC date.
    spread = 86_400 - 60 * per_user
    if spread <= 0:
        raise SystemExit(f"--events-per-user {per_user}: a minute apart they do not fit in one day")
    u = (F.col("id") / per_user).cast("long")
    n = F.col("id") % per_user
    skew = F.pow((F.abs(F.xxhash64("id", F.lit(seed))) % 1_000_000) / 1e6, 3)
    events = (
        spark.range(users * per_user)
        .withColumn("_idx", F.floor(skew * len(item_ids)).cast("long"))
        .join(F.broadcast(items), "_idx")
        .select(
            # Each shopper's events a minute apart, shoppers spread over the day.
            F.timestamp_seconds(F.lit(day) + (u % spread) + n * 60).alias("event_time"),
            F.concat(F.lit("synth"), u.cast("string")).alias("user_id"),
            "item_id",
            F.when(n == per_user - 1, F.lit("cart")).otherwise(F.lit("view")).alias("behavior"),
            *(
                F.lit(None).cast(f.dataType).alias(f.name)
                for f in EVENTS.spark_schema()
                if f.name in ("category_id", "brand", "price", "source_session_id")
            ),
        )
    )
    target = events_dir(settings.paths.warehouse_root) / f"source={SOURCE}" / f"event_date={SCORE_DATE}"
    events.select(*EVENTS.data_columns).write.mode("overwrite").parquet(str(target))
    return users * per_user


def measure(work: Path, users: int, per_user: int, cores: int, k: int, model: str, path: str) -> dict:
    """In this process (the driver): write the shoppers, then time and sample ``context`` and
    ``score --path <path>`` of ``SCORE_DATE``."""
    from infra.spark import get_spark
    from jobs.context import run_context
    from training.score import run_score

    settings = settings_for(work, cores, k, model, path)
    spark = get_spark(settings)
    t = time.perf_counter()
    events = write_shoppers(spark, settings, users, per_user)
    out: dict = {"users": users, "events": events, "write_seconds": time.perf_counter() - t}
    mx = spark.sparkContext._jvm.java.lang.management.ManagementFactory
    heap = mx.getMemoryMXBean()
    old = old_generation(spark.sparkContext._jvm)
    collectors = list(mx.getGarbageCollectorMXBeans())

    def gc_seconds() -> float:
        return sum(c.getCollectionTime() for c in collectors) / 1000

    me = psutil.Process()
    java = [p for p in me.children(recursive=True) if "java" in p.name()]
    out["python_rss_before_bytes"] = me.memory_info().rss
    gc_before = gc_seconds()
    with (
        Sampler(lambda: old.getCollectionUsage().getUsed()) as old_peak,
        Sampler(lambda: me.memory_info().rss) as py_peak,
        Sampler(lambda: heap.getHeapMemoryUsage().getUsed()) as heap_peak,
        Sampler(lambda: sum(p.memory_info().rss for p in java)) as jvm_rss_peak,
    ):
        t = time.perf_counter()
        ctx = run_context(spark, settings, SCORE_DATE)
        out["context_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        scored = run_score(settings, SCORE_DATE, path=path, spark=spark)
        out["score_seconds"] = time.perf_counter() - t
    out.update(
        active_users=ctx.users,
        catalogue_items=ctx.items,
        scored_users=scored["scored_users"],
        rows=scored["rows"],
        fallback_rows=scored["fallback_rows"],
        python_rss_peak_bytes=py_peak.peak,
        jvm_heap_peak_bytes=heap_peak.peak,
        jvm_heap_max_bytes=heap.getHeapMemoryUsage().getMax(),
        jvm_rss_peak_bytes=jvm_rss_peak.peak,
        jvm_old_gen_after_gc_peak_bytes=old_peak.peak,
        jvm_gc_seconds=gc_seconds() - gc_before,
    )
    spark.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--events-per-user", type=int, default=4)
    ap.add_argument("--cores", type=int, default=2, help="local[N]")
    ap.add_argument("--k", type=int, default=10, help="rows per shopper")
    ap.add_argument("--model", default="sasrec", help="the champion's model (training/models/<name>.yaml)")
    ap.add_argument("--path", default="spark", choices=["spark", "local"], help="the scoring path measured")
    ap.add_argument("--work", default=str(REPO / "bench" / "results" / "tmp" / "serving_scale"),
                    help="working folder (a subfolder per model)")  # fmt: skip
    ap.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one user count, in this process
    args = ap.parse_args()
    if args.measure:  # --work is the model's own folder here
        print(
            json.dumps(
                measure(
                    Path(args.work),
                    args.measure,
                    args.events_per_user,
                    args.cores,
                    args.k,
                    args.model,
                    args.path,
                )
            )
        )
        return 0
    # A folder per model: another model trained into the same registry would not take the
    # champion from the first (the promotion gates), so it would never be measured.
    work = Path(args.work) / args.model

    from infra.logs import configure

    configure("WARNING")
    out = {
        "model": args.model,
        "path": args.path,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "events_per_user": args.events_per_user,
        "k": args.k,
        "cores": args.cores,
        "prepare": prepare(settings_for(work, args.cores, args.k, args.model)),
        "runs": [],
    }
    print(f"prepared in {out['prepare']['seconds']:.0f} s", flush=True)
    for users in args.users:
        run = subprocess.run(
            [
                sys.executable,
                __file__,
                "--work",
                str(work),
                "--measure",
                str(users),
                "--events-per-user",
                str(args.events_per_user),
                "--cores",
                str(args.cores),
                "--k",
                str(args.k),
                "--model",
                args.model,
                "--path",
                args.path,
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise SystemExit(f"{users:,} users failed:\n{run.stderr[-3000:]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        out["runs"].append(r)
        print(
            f"{users:>11,} users: context {r['context_seconds']:.0f} s, score {r['score_seconds']:.0f} s "
            f"({r['scored_users'] / r['score_seconds']:,.0f} users/s), driver Python RSS peak "
            f"{r['python_rss_peak_bytes'] / 2**20:,.0f} MiB, JVM heap peak {r['jvm_heap_peak_bytes'] / 2**30:.2f} "
            f"of {r['jvm_heap_max_bytes'] / 2**30:.2f} GiB (old generation after GC "
            f"{r['jvm_old_gen_after_gc_peak_bytes'] / 2**30:.2f} GiB, GC {r['jvm_gc_seconds']:.0f} s), "
            f"JVM RSS peak {r['jvm_rss_peak_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
    suffix = "" if args.path == "spark" else f"_{args.path}"
    saved = REPO / "bench" / "results" / f"serving_scale_{args.model}{suffix}.json"
    saved.write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
