"""Batch-scoring speed: the single-process path against the machine's limit, and the Spark path.

Single process, on Tmall shapes (41,738 users x 11,953 items, K = 50, seeded synthetic interactions
with Tmall's counts): users scored per second by

- ``bare``: a matmul of user and item embeddings plus ``torch.topk``, nothing else (the limit);
- ``recommend``: ``training.recommend.recommend`` (exclusions, deterministic tie order, explanations)
  for an ALS-shaped model (one matmul) and for MEMBER (two experts, gated);
- ``pyfunc``: the logged MLflow pyfunc's ``predict`` (ids in, rows out), what ``score`` runs.

Spark path (``--spark-users N``, default 200,000; the issue's shape is 1M x 50k): what ``score --path
spark`` runs (``training.score.spark_score``: the logged pyfunc broadcast to the executors, scored in
``mapInPandas`` over every user with an empty context, written to Parquet) on ``local[1]`` and
``local[2]``.

    .venv/bin/python bench/scoring.py [--users 41738 --items 11953] [--spark-users 200000 --spark-items 50000]

Prints a table and saves ``bench/results/scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.data import TrainingData  # noqa: E402
from training.models import build_model  # noqa: E402
from training.models.base import Context  # noqa: E402
from training.recommend import known_purchases, recommend  # noqa: E402


def synthetic(n_users: int, n_items: int, seed: int = 0) -> TrainingData:
    """Tmall-like counts: ~6 purchases, ~5 favs per user; popularity skewed (Zipf)."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop /= pop.sum()

    def draw(per_user: float) -> sp.csr_matrix:
        n = int(per_user * n_users)
        m = sp.csr_matrix(
            (np.ones(n, np.float32), (rng.integers(0, n_users, n), rng.choice(n_items, n, p=pop))),
            shape=(n_users, n_items),
        )
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    buys, favs = draw(6.1), draw(5.3)
    held = (np.arange(n_users), rng.choice(n_items, n_users, p=pop), np.zeros(n_users, bool))
    return TrainingData(
        root=Path("."),
        n_users=n_users,
        n_items=n_items,
        behaviors=["fav", "purchase"],
        matrices={"fav": favs, "purchase": buys},
        visited=favs,
        heldout={"test": held},
        manifest={},
        user_events=np.asarray((buys + favs).sum(1)).ravel().astype(int),
    )


def timed(fn, repeat: int = 2) -> float:
    fn()  # warm-up (allocations, caches, lazy propagation)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_single(args) -> dict:
    data = synthetic(args.users, args.items)
    exclude = known_purchases(data)
    users = np.arange(args.users)
    dim = 64
    gen = torch.Generator().manual_seed(0)
    U, V = torch.randn(args.users, dim, generator=gen), torch.randn(args.items, dim, generator=gen)

    def bare():
        for s in range(0, args.users, args.batch):
            torch.topk(U[s : s + args.batch] @ V.T, args.k, dim=1)

    out = {"bare_matmul_topk": {"seconds": timed(bare)}}
    for name, overrides in (("als_multi", {"factors": dim}), ("member", {})):
        model = build_model(name, data, overrides)
        if name == "als_multi":
            model.fit()
        model.eval()

        def run(m=model):
            recommend(
                m, Context.of_training(data, users, m.history_length), exclude, args.k, batch_size=args.batch
            )

        out[f"recommend_{name}"] = {"seconds": timed(run)}
    out["pyfunc_predict_als_multi"] = {"seconds": pyfunc_seconds(data, args)}
    for v in out.values():
        v["users_per_second"] = args.users / v["seconds"]
        v["x_bare"] = v["seconds"] / out["bare_matmul_topk"]["seconds"]
    return out


def pyfunc_seconds(data: TrainingData, args) -> float:
    """Log the real pyfunc of an ALS model trained on ``data`` and time ``predict`` for every user."""
    import mlflow
    from training.artifacts import save_trained
    from training.data import load_training_data, tables_of, write_training_bundle
    from training.pyfunc import FunnelrecModel
    from training.trainer import FitResult, fit_model

    with tempfile.TemporaryDirectory() as tmp:
        wh = Path(tmp)
        tables = write_training_bundle(
            wh, "bench", tables_of(data), protocol="synthetic", sources=["synthetic"]
        )
        data = load_training_data(tables)  # the model records the checksums of the tables it read
        result = fit_model("als_multi", data, 0, {"factors": 64})
        model_path = save_trained(wh, "bench", FitResult(result, result), data, 0)
        ctx = mlflow.pyfunc.PythonModelContext(
            artifacts={"model": str(model_path), "tables": str(tables)}, model_config={}
        )
        impl = FunnelrecModel()
        impl.load_context(ctx)
        # Every user in the training tables' own context (visited set, purchases; no history).
        frame = impl.training_context_frame([f"u{u}" for u in range(args.users)], history_length=0)
        return timed(lambda: impl.predict(ctx, frame, {"k": args.k, "batch_size": args.batch}), repeat=1)


def bench_spark(args) -> dict:
    """Run the Spark path in a subprocess per executor count (a fresh JVM each)."""
    out = {}
    for cores in (1, 2):
        code = SPARK_CHILD.format(
            repo=str(REPO), users=args.spark_users, items=args.spark_items, k=args.k, cores=cores
        )
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        got = json.loads(line[len("RESULT ") :])
        got["process_seconds"] = time.perf_counter() - t0
        got["users_per_second"] = args.spark_users / got["score_seconds"]
        out[f"local[{cores}]"] = got
    return out


SPARK_CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {repo!r})
os.environ["PYSPARK_PYTHON"] = sys.executable  # Python workers need this venv (pandas, torch)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
import pandas as pd
import mlflow
from pyspark.sql import SparkSession
from pyspark.sql import types as T
from bench.scoring import synthetic
from infra.tables import CONTEXT_INPUT, SERVING_CONTEXT
from training.artifacts import save_trained
from training.data import load_training_data, tables_of, write_training_bundle
from training.pyfunc import log_pyfunc
from training.score import Champion, spark_score
from training.trainer import FitResult, fit_model
spark = (SparkSession.builder.master("local[{cores}]").config("spark.ui.enabled", "false")
         .config("spark.sql.shuffle.partitions", "{cores}").config("spark.driver.memory", "4g").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
tmp = Path(tempfile.mkdtemp())
tables = write_training_bundle(
    tmp, "bench", tables_of(synthetic({users}, {items})), protocol="synthetic", sources=["synthetic"]
)
data = load_training_data(tables)
fitted = fit_model("als_multi", data, 0, {{"factors": 64}})
model_path = save_trained(tmp, "bench", FitResult(fitted, fitted), data, 0)
mlflow.set_tracking_uri(f"sqlite:///{{tmp}}/m.db")
with mlflow.start_run() as run:
    pass
uri = log_pyfunc(model_path, tables, run.info.run_id, ["u0", "u1"])
champion = Champion(uri, "bench", 1, run.info.run_id, "als_multi", "bench")
users = pd.DataFrame({{"user_id": [f"u{{u}}" for u in range({users})]}})
for column in ("visited", "bought", "history_items", "history_behaviors"):
    users[column] = [[] for _ in range(len(users))]
users["history_times"] = [[] for _ in range(len(users))]
schema = T.StructType([f for f in SERVING_CONTEXT.spark_schema() if f.name in CONTEXT_INPUT])
sdf = spark.createDataFrame(users[list(CONTEXT_INPUT)], schema)
catalogue = [f"i{{i}}" for i in range({items})]
t0 = time.perf_counter()
rows, _, _ = spark_score(spark, champion, sdf, catalogue, tmp / "scores", {k}, 4096)
dt = time.perf_counter() - t0
print("RESULT " + json.dumps({{"score_seconds": dt, "rows": rows}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=41738)
    ap.add_argument("--items", type=int, default=11953)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--spark-users", type=int, default=200_000)
    ap.add_argument("--spark-items", type=int, default=50_000)
    ap.add_argument("--skip-spark", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scoring.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "shape": {"users": args.users, "items": args.items, "k": args.k, "batch": args.batch},
        "single_process": bench_single(args),
    }
    print(
        f"\nsingle process, {args.users:,} users x {args.items:,} items, K={args.k} (CPU: {os.cpu_count()} cores)"
    )
    print("| path | seconds | users/s | x bare matmul+top-K |\n|---|---:|---:|---:|")
    for name, v in result["single_process"].items():
        print(f"| {name} | {v['seconds']:.2f} | {v['users_per_second']:,.0f} | {v['x_bare']:.2f} |")
    if not args.skip_spark:
        result["spark"] = {"users": args.spark_users, "items": args.spark_items, **bench_spark(args)}
        print(f"\nSpark path, {args.spark_users:,} users x {args.spark_items:,} items, K={args.k}")
        print("| master | score+write s | users/s | rows |\n|---|---:|---:|---:|")
        for name, v in result["spark"].items():
            if isinstance(v, dict):
                print(f"| {name} | {v['score_seconds']:.1f} | {v['users_per_second']:,.0f} | {v['rows']:,} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
