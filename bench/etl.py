"""Benchmark: ingest + sessionize + split on synthetic logs, Spark (the real jobs) against the same
logic written as DuckDB SQL over the same files, in the same run.

    .venv/bin/python bench/etl.py --events 1000000 10000000 --master 'local[2]'

With ``--validate``, also runs each table's Great Expectations suite after its Spark stage and
reports validation time as a share of the jobs' time (issue: GX gates; target <= 25% at 10M).

With ``--cluster-workers N``, the same Spark stages then run again on the same files on a standalone
cluster of N one-core workers started on 127.0.0.1 from the pip wheel (``infra.spark.StandaloneCluster``),
and every table of both runs is compared by a digest of its rows (count and summed row hashes,
computed by DuckDB over the Parquet files; the training tables by their manifests' checksums).
``--no-peer`` skips DuckDB (for sizes where only Spark's own scaling is asked for).

    .venv/bin/python bench/etl.py --events 10000000 --cluster-workers 2 --out bench/results/etl_cluster.json

Prints events/s per stage for both engines, the Spark/DuckDB time ratio, the JVM's peak heap and
RSS, and DuckDB's peak RSS; saves everything to ``bench/results/etl.json``. Targets (issue: Spark
jobs): Spark within 3x of DuckDB at 10M events, time growing no faster than linearly from 1M to
10M, driver heap <= 4 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.settings import load_settings  # noqa: E402
from infra.tables import SESSIONIZED, TRAINING, events_dir, read_manifest  # noqa: E402
from jobs.synth import SynthParams, generate  # noqa: E402

END = date(2017, 12, 3)
DAYS = 9


#: A table's rows as one number: summed 64-bit row hashes, modulo 2**64 (DuckDB SQL over ``t``).
ROW_DIGEST = "sum(hash(t)::hugeint) % 18446744073709551616"


def old_generation(jvm):
    """The JVM's old-generation memory pool (the parallel, G1 or serial collector's): its usage after
    the last collection is what the heap keeps live, where used heap also counts garbage."""
    pools = jvm.java.lang.management.ManagementFactory.getMemoryPoolMXBeans()
    return next(p for p in pools if any(g in p.getName() for g in ("Old Gen", "Tenured")))


class Sampler:
    """Samples a value in a background thread and keeps the peak."""

    def __init__(self, fn, every: float = 0.25):
        self.fn, self.every, self.peak = fn, every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            # A process can vanish between samples; the peak so far stands.
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, int(self.fn()))
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


#: Events per shuffle partition. Two partitions per core ran 10M events fastest on local[2] (four of
#: 2.5M); the same four at 100M ran the split's aggregations out of execution memory, and 40 ran
#: (bench/README.md, "The Spark jobs at 100M events"), so past 10M the count grows with the log.
EVENTS_PER_PARTITION = 2_500_000


def shuffle_partitions(events: int, cores: int) -> int:
    return max(2 * cores, math.ceil(events / EVENTS_PER_PARTITION))


def run_spark(
    data_root: Path,
    wh: Path,
    master: str,
    partitions: int,
    validate: bool = False,
    extra_conf: dict | None = None,
) -> dict:
    from infra.pipeline import load_pipeline
    from infra.spark import get_spark

    settings = load_settings(
        environ={},
        overrides={
            "paths": {
                "data_root": str(data_root),
                "warehouse_root": str(wh),
                "quarantine_root": str(wh / "q"),
            },
            "pipeline": {"sources": ["synthetic"]},
            "spark": {
                "master": master,
                "conf": {
                    "spark.driver.memory": "4g",
                    "spark.sql.shuffle.partitions": str(partitions),
                    **(extra_conf or {}),
                },
            },
            "sessionize": {"history_days": DAYS},
            "split": {"protocol": "global_time", "observation_days": DAYS, "test_days": 1},
        },
    )
    t = time.perf_counter()
    spark = get_spark(settings)
    startup = time.perf_counter() - t
    jvm = spark.sparkContext._jvm
    heap = jvm.java.lang.management.ManagementFactory.getMemoryMXBean()
    java = [p for p in psutil.Process().children(recursive=True) if "java" in p.name()]
    out = {"startup_s": startup, "stages": {}}
    with (
        Sampler(lambda: heap.getHeapMemoryUsage().getUsed()) as heap_peak,
        Sampler(lambda: sum(p.memory_info().rss for p in java)) as rss_peak,
    ):
        # The nightly DAG's ETL group as declared: each job, then (with --validate) its table's suite.
        for task in load_pipeline().tasks([], dag="nightly"):
            if task.group != "etl" or (task.step.checks and not validate):
                continue
            t = time.perf_counter()
            outcome = task.run(settings, END)
            seconds = {"seconds": time.perf_counter() - t}
            if task.step.checks:
                out.setdefault("validation", {})[task.step.options["table"]] = seconds
            else:
                out["stages"][task.task_id] = seconds
            if task.task_id == "split":
                stats = outcome.data["stats"]
                out["split_stats"] = {k: stats[k] for k in ("users", "items", "train_events")}
                out["split_stats"]["test_pairs"] = stats["heldout"]["test"]["pairs"]
    out["jvm_heap_peak_bytes"] = heap_peak.peak
    out["jvm_rss_peak_bytes"] = rss_peak.peak
    out["jvm_heap_max_bytes"] = heap.getHeapMemoryUsage().getMax()
    out["jvm_old_gen_after_gc_bytes"] = old_generation(jvm).getCollectionUsage().getUsed()
    spark.stop()
    return out


def run_cluster(data_root: Path, wh: Path, workers: int, work: Path, events: int) -> dict:
    """The Spark stages on a standalone cluster of ``workers`` one-core workers on this machine."""
    from infra.spark import StandaloneCluster

    with StandaloneCluster(work / "cluster", workers=workers, cores=1, memory="5g") as cluster:
        conf = {**StandaloneCluster.driver_conf, "spark.executor.memory": "4g"}
        out = run_spark(data_root, wh, cluster.url, shuffle_partitions(events, workers), extra_conf=conf)
        out["master"] = cluster.url
        out["completed_apps"] = len(cluster.status()["completedapps"])
    return out


def table_digests(wh: Path) -> dict:
    """Each published table of the date as (rows, summed row hashes): equal digests, equal rows."""
    import duckdb

    paths = {
        "events": events_dir(wh),
        **{t.name: SESSIONIZED.table_dir(wh, END, t) for t in SESSIONIZED.tables},
    }
    con = duckdb.connect()
    out = {}
    for name, path in paths.items():
        n, h = con.execute(
            f"select count(*), {ROW_DIGEST} from read_parquet('{path}/**/*.parquet', hive_partitioning = true) t"
        ).fetchone()
        out[name] = [n, str(h)]
    con.close()
    out.update({f"training/{k}": v for k, v in read_manifest(TRAINING.dir(wh, END)).checksums.items()})
    return out


# The jobs' work, stage by stage, as DuckDB SQL. Like the jobs, each stage reads the previous
# stage's files (not DuckDB's in-memory tables), writes its outputs as sorted Parquet, and reads
# them back for its counts: per-reason quarantine counts and distinct users/items (ingest), session
# stats (sessionize), leakage counts, per-table checksums and the manifest's stats (split). Not
# mirrored: quarantine line numbers and raw lines (DuckDB's CSV reader does not expose them).
DUCK_SQL = {
    "ingest": """
        create or replace table raw as
        select * from read_csv('{files}', header = false, all_varchar = true, null_padding = true,
            columns = {{'user_id': 'VARCHAR', 'item_id': 'VARCHAR', 'category_id': 'VARCHAR',
                        'behavior_type': 'VARCHAR', 'ts': 'VARCHAR'}});
        create or replace table parsed as
        with p as (
            select nullif(trim(user_id), '') as user_id, nullif(trim(item_id), '') as item_id,
                   nullif(trim(category_id), '') as category_id,
                   case trim(behavior_type) when 'pv' then 'view' when 'fav' then 'fav' when 'cart' then 'cart'
                                            when 'buy' then 'purchase' end as behavior,
                   ts, to_timestamp(try_cast(trim(ts) as double)) as event_time
            from raw)
        select *, case when user_id is null then 'missing_user_id' when item_id is null then 'missing_item_id'
                       when ts is null then 'missing_time' when event_time is null then 'unparseable_time'
                       when behavior is null then 'unknown_behavior'
                       when event_time >= timestamp '{end_excl}' then 'after_run_date' end as reason
        from p;
        create or replace table quarantine as select * from parsed where reason is not null;
        create or replace table reasons as select reason, count(*) as n from quarantine group by reason;
        copy (select distinct user_id, item_id, category_id, behavior, event_time,
                     cast(event_time as date) as event_date
              from parsed where reason is null
              order by event_date, event_time, user_id, item_id, behavior, category_id)
            to '{out}/events' (format parquet, partition_by (event_date), overwrite_or_ignore);
        create or replace table ingest_summary as
        select count(*) as n, count(distinct user_id) as users, count(distinct item_id) as items
        from read_parquet('{out}/events/*/*.parquet', hive_partitioning = true);
    """,
    "sessionize": """
        create or replace table session_events as
        with o as (
            select *, case behavior when 'view' then 0 when 'fav' then 1 when 'cart' then 2
                                    when 'remove_from_cart' then 3 else 4 end as brank
            from read_parquet('{out}/events/*/*.parquet', hive_partitioning = true)
            where event_date >= date '{first}'),
        g as (select *, lag(event_time) over w as prev from o
              window w as (partition by user_id order by event_time, brank, item_id, category_id)),
        s as (select *, sum(case when prev is null or epoch(event_time) - epoch(prev) > 1800 then 1 else 0 end)
                   over (partition by user_id order by event_time, brank, item_id, category_id
                         rows unbounded preceding) as sno from g)
        select user_id, item_id, category_id, behavior, event_time, event_date,
               substr(sha256(user_id || '|' || epoch_us(min(event_time) over (partition by user_id, sno))), 1, 24)
                   as session_id,
               row_number() over (partition by user_id, sno order by event_time, brank, item_id, category_id)
                   as seq_in_session
        from s;
        copy (select * from session_events order by user_id, event_time, seq_in_session)
            to '{out}/session_events.parquet' (format parquet);
        copy (select session_id, user_id, min(event_time) as session_start, max(event_time) as session_end,
                     count(*) as event_count,
                     count(*) filter (behavior = 'view') as n_view, count(*) filter (behavior = 'fav') as n_fav,
                     count(*) filter (behavior = 'cart') as n_cart,
                     count(*) filter (behavior = 'remove_from_cart') as n_remove_from_cart,
                     count(*) filter (behavior = 'purchase') as n_purchase,
                     bool_or(behavior = 'purchase') as purchased
              from read_parquet('{out}/session_events.parquet') group by all order by user_id, session_start)
            to '{out}/sessions.parquet' (format parquet);
        create or replace table sessions_summary as
        select count(*) as sessions, sum(event_count) as events, count(distinct user_id) as users
        from read_parquet('{out}/sessions.parquet');
    """,
    "split": """
        create or replace table train as
        select * from read_parquet('{out}/session_events.parquet') where event_time < timestamp '{cutoff}';
        create or replace table test as
        select user_id, item_id, min(event_time) as event_time from read_parquet('{out}/session_events.parquet')
        where event_time >= timestamp '{cutoff}' and behavior = 'purchase' group by all;
        create or replace table validation as
        with w as (select user_id, item_id, min(event_time) as event_time from train
                   where behavior = 'purchase' and event_time >= timestamp '{vstart}' group by all)
        select * from w anti join (select distinct user_id, item_id from train
                                   where behavior = 'purchase' and event_time < timestamp '{vstart}')
                                  using (user_id, item_id);
        create or replace table user_map as
        select user_id, row_number() over (order by user_id) - 1 as user_idx from (select distinct user_id from train);
        create or replace table item_map as
        with c as (select item_id, category_id, count(*) as n from train where category_id is not null group by all),
        top as (select item_id, arg_max(category_id, n) as category_id from c group by item_id)
        select item_id, row_number() over (order by item_id) - 1 as item_idx, category_id
        from (select distinct item_id from train) left join top using (item_id);
        create or replace table train_idx as
        select user_idx, item_idx, behavior, event_time, session_id,
               event_time < timestamp '{vstart}' as validation_fit
        from train join user_map using (user_id) join item_map using (item_id);
        create or replace table interactions as
        select user_idx, item_idx, behavior, count(*) as count, max(event_time) as last_time
        from train_idx group by user_idx, item_idx, behavior;
        create or replace table visited as
        select distinct user_idx, item_idx from interactions where behavior <> 'purchase';
        create or replace table known as
        select distinct user_id, item_id from train where behavior = 'purchase';
        create or replace table dropped as
        select count(*) as test_repeat_purchase from test semi join known using (user_id, item_id);
        create or replace table heldout as
        with fit as (select * from train_idx where validation_fit),
        h as (select user_idx, item_idx, 'validation' as split, event_time
              from validation join user_map using (user_id) join item_map using (item_id)
              where user_idx in (select user_idx from fit) and item_idx in (select item_idx from fit)
              union all
              select user_idx, item_idx, 'test' as split, event_time
              from (select * from test anti join known using (user_id, item_id))
              join user_map using (user_id) join item_map using (item_id)),
        seen as (select user_idx, item_idx, true as any_visit, bool_or(validation_fit) as fit_visit
                 from train_idx where behavior <> 'purchase' group by user_idx, item_idx)
        select user_idx, item_idx, split, event_time,
               coalesce(case when split = 'validation' then fit_visit else any_visit end, false) as visited
        from h left join seen using (user_idx, item_idx);
        copy (select * from interactions order by user_idx, item_idx, behavior) to '{out}/interactions.parquet' (format parquet);
        copy (select * from visited order by user_idx, item_idx) to '{out}/visited.parquet' (format parquet);
        copy (select * from heldout order by split, user_idx, item_idx) to '{out}/heldout.parquet' (format parquet);
        copy (select * from user_map order by user_idx) to '{out}/user_map.parquet' (format parquet);
        copy (select * from item_map order by item_idx) to '{out}/item_map.parquet' (format parquet);
        copy (select * from train_idx order by user_idx, event_time, item_idx, behavior)
            to '{out}/train_events.parquet' (format parquet);
        create or replace table leakage as
        with i as (select * from read_parquet('{out}/interactions.parquet')),
        h as (select * from read_parquet('{out}/heldout.parquet')),
        ft as (select user_idx, min(event_time) as t from h where split = 'test' group by user_idx),
        fv as (select user_idx, min(event_time) as v from h where split = 'validation' group by user_idx),
        e as (select * from read_parquet('{out}/train_events.parquet'))
        select (select count(*) from (select * from h where split = 'test')
                semi join (select * from i where behavior = 'purchase') b
                using (user_idx, item_idx)) as heldout_in_train_purchases,
               (select count(*) from i where last_time >= timestamp '{cutoff}') as train_rows_after_cutoff,
               (select count(*) from e join ft using (user_idx)
                where e.behavior = 'purchase' and e.event_time > ft.t) as train_purchase_after_test,
               (select count(*) from e join fv using (user_idx)
                where e.validation_fit and e.event_time > fv.v) as validation_fit_after_validation;
        create or replace table checksums as
        {checksums};
        create or replace table split_stats as
        select (select list((behavior, n)) from (select behavior, count(*) as n
                from read_parquet('{out}/interactions.parquet') group by all)) as by_behavior,
               (select list((split, n, v, u)) from (select split, count(*) as n, count(*) filter (visited) as v,
                count(distinct user_idx) as u from read_parquet('{out}/heldout.parquet') group by all)) as held;
    """,
}


def run_duckdb(data_root: Path, work: Path, threads: int) -> dict:
    import duckdb

    out_dir = work / "duck"
    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(work / "bench.duckdb"))
    con.execute(f"set threads = {threads}")
    fmt = {
        "files": str(data_root / "synthetic" / "*.csv"),
        "out": str(out_dir),
        "end_excl": (END + timedelta(days=1)).isoformat(),
        "first": (END - timedelta(days=DAYS - 1)).isoformat(),
        "cutoff": END.isoformat(),
        "vstart": (END - timedelta(days=1)).isoformat(),  # split.validation_days = 1 (the default)
        "checksums": " union all ".join(
            f"select '{t}' as name, {ROW_DIGEST} as h, count(*) as n "
            f"from read_parquet('{out_dir}/{t}.parquet') t"
            for t in (table.name for table in TRAINING.tables)
        ),
    }
    proc = psutil.Process()
    out = {"stages": {}}
    with Sampler(lambda: proc.memory_info().rss) as rss_peak:
        for name, sql in DUCK_SQL.items():
            t = time.perf_counter()
            con.execute(sql.format(**fmt))
            out["stages"][name] = {"seconds": time.perf_counter() - t}
    out["rss_peak_bytes"] = rss_peak.peak
    out["events"] = con.execute("select n from ingest_summary").fetchone()[0]
    out["test_pairs"] = con.execute("select count(*) from heldout where split = 'test'").fetchone()[0]
    con.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", default=str(REPO / "bench" / "results" / "tmp"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "etl.json"))
    ap.add_argument(
        "--validate",
        action="store_true",
        help="also run the GX suite after each Spark stage and report its time as a share of the stage's",
    )
    ap.add_argument(
        "--cluster-workers",
        type=int,
        default=0,
        help="also run the Spark stages on a standalone cluster of this many one-core workers and "
        "compare every table's rows with the --master run's",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the DuckDB peer")
    args = ap.parse_args()
    threads = (
        int(args.master[len("local[") : -1])
        if args.master.startswith("local[") and args.master[6:-1].isdigit()
        else os.cpu_count()
    )
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "spark_master": args.master,
        "duckdb_threads": threads,
        "runs": [],
    }
    for n in args.events:
        work = Path(args.work) / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        data_root = work / "raw"
        t = time.perf_counter()
        synth = generate(
            data_root / "synthetic", SynthParams(events=n, seed=args.seed, end_date=END, days=DAYS)
        )
        synth_s = time.perf_counter() - t
        duck = None if args.no_peer else run_duckdb(data_root, work, threads)
        partitions = shuffle_partitions(n, threads)
        spark = run_spark(data_root, work / "wh", args.master, partitions, args.validate)
        spark_total = sum(s["seconds"] for s in spark["stages"].values())
        run = {
            "events": n,
            "users": synth.users,
            "shuffle_partitions": partitions,
            "synth_seconds": synth_s,
            "spark": spark,
            "spark_total_s": spark_total,
            "spark_events_per_s": n / spark_total,
            "spark_stage_events_per_s": {k: n / v["seconds"] for k, v in spark["stages"].items()},
        }
        results["runs"].append(run)
        print(f"\n== {n:,} events ({synth.users:,} users)")
        print(f"{'stage':<12}{'spark s':>10}{'duckdb s':>10}{'ratio':>8}")
        for stage in ("ingest", "sessionize", "split"):
            s = spark["stages"][stage]["seconds"]
            d = duck["stages"][stage]["seconds"] if duck else float("nan")
            print(f"{stage:<12}{s:>10.1f}{d:>10.1f}{s / d:>8.2f}")
        if duck:
            duck_total = sum(s["seconds"] for s in duck["stages"].values())
            run.update(
                duckdb=duck,
                duckdb_total_s=duck_total,
                duckdb_events_per_s=n / duck_total,
                ratio_spark_over_duckdb=spark_total / duck_total,
            )
            print(f"{'total':<12}{spark_total:>10.1f}{duck_total:>10.1f}{spark_total / duck_total:>8.2f}")
        print(
            f"events/s: spark {n / spark_total:,.0f}"
            + (f"  duckdb {n / run['duckdb_total_s']:,.0f}" if duck else "")
            + f"  (spark start-up {spark['startup_s']:.1f} s not counted)"
        )
        if args.validate:
            v_total = sum(v["seconds"] for v in spark["validation"].values())
            run["validation_share_of_jobs"] = v_total / spark_total
            print(
                "validation (GX): "
                + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in spark["validation"].items())
                + f"; total {v_total:.1f} s = {v_total / spark_total:.0%} of the jobs' {spark_total:.1f} s"
            )
        print(
            f"peak memory: JVM heap {spark['jvm_heap_peak_bytes'] / 2**30:.2f} GiB "
            f"(max {spark['jvm_heap_max_bytes'] / 2**30:.2f}), JVM RSS {spark['jvm_rss_peak_bytes'] / 2**30:.2f} GiB"
            + (f", DuckDB process RSS {duck['rss_peak_bytes'] / 2**30:.2f} GiB" if duck else "")
        )
        if args.cluster_workers:
            cluster = run_cluster(data_root, work / "wh_cluster", args.cluster_workers, work, n)
            local_rows, cluster_rows = table_digests(work / "wh"), table_digests(work / "wh_cluster")
            cluster_total = sum(s["seconds"] for s in cluster["stages"].values())
            run["cluster"] = {
                "workers": args.cluster_workers,
                "spark": cluster,
                "spark_total_s": cluster_total,
                "digests": cluster_rows,
                "local_digests": local_rows,
                "same_rows": cluster_rows == local_rows,
            }
            differ = sorted(k for k in local_rows if local_rows[k] != cluster_rows.get(k))
            print(
                f"standalone cluster ({args.cluster_workers} one-core workers): "
                + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in cluster["stages"].items())
                + f"; total {cluster_total:.1f} s against {spark_total:.1f} s on {args.master}; "
                + ("every table's rows the same" if not differ else f"rows DIFFER in {', '.join(differ)}")
            )
        shutil.rmtree(work, ignore_errors=True)
    if len(results["runs"]) >= 2:
        a, b = results["runs"][0], results["runs"][-1]
        scaling = results["scaling"] = {
            "events_ratio": b["events"] / a["events"],
            "spark_time_ratio": b["spark_total_s"] / a["spark_total_s"],
            # Each stage's events per second at the largest size as a share of its rate at the smallest.
            "spark_stage_rate_kept": {
                k: b["spark_stage_events_per_s"][k] / a["spark_stage_events_per_s"][k]
                for k in b["spark_stage_events_per_s"]
            },
        }
        if "duckdb_total_s" in a and "duckdb_total_s" in b:
            scaling["duckdb_time_ratio"] = b["duckdb_total_s"] / a["duckdb_total_s"]
        print(
            f"\nscaling {a['events']:,} -> {b['events']:,} (events x{scaling['events_ratio']:.0f}): "
            f"spark time x{scaling['spark_time_ratio']:.2f}"
            + (f", duckdb time x{scaling['duckdb_time_ratio']:.2f}" if "duckdb_time_ratio" in scaling else "")
            + "; events/s kept per stage: "
            + ", ".join(f"{k} {v:.0%}" for k, v in scaling["spark_stage_rate_kept"].items())
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
