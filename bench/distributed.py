"""Benchmark: one model trained by the plain trainer and through Spark's TorchDistributor with 1 and
2 processes (``funnelrec train --processes N``; ``training/distributed.py``), on one benchmark's
tables, on ``local[2]``.

    .venv/bin/python bench/distributed.py --benchmark tmall --model member --max-epochs 8 --seeds 0,1

For each seed of ``--seeds`` the plain trainer's fit (the seed-to-seed spread of single-process
runs); for the first seed also the distributor with 1 process (whose weights should be the plain
trainer's: same loop, same seed, no gradient averaging) and with 2 processes (gloo on the CPU: each
rank steps half of every epoch's batches, gradients averaged, so an epoch is half as many steps of
twice the batch). Reports test metrics (standard, visited, unvisited), the weights' digest, seconds
per epoch and wall time, and saves ``bench/results/distributed_<benchmark>.json``.

``--runs`` picks which fits run (``plain``, ``x1``, ``x2``); for example the 2-process fit alone, to its
early stop, to set beside the single-process runs of ``bench/quality.py`` on the same tables:

    .venv/bin/python bench/distributed.py --benchmark tmall --max-epochs 40 --seeds 1 --runs x2 \
        --out bench/results/distributed_tmall_early_stop.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.quality import build_tables  # noqa: E402
from infra.logs import configure  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from training.distributed import fit_distributed, weights_digest  # noqa: E402
from training.evaluate import evaluate_scores  # noqa: E402
from training.train_evaluate import load_views  # noqa: E402
from training.trainer import fit_and_refit  # noqa: E402


def _metrics(model, data) -> dict:
    m = evaluate_scores(
        model.context_scorer(data),
        data,
        "test",
        settings=("standard", "visited", "unvisited"),
        batch_size=2048,
        device=model.device,
    )
    return {s: {k: m[s][k] for k in ("HR@10", "NDCG@10", "HR@20", "users")} for s in m}


def _row(how: str, seed: int, fit, data, wall: float) -> dict:
    r = fit.final
    row = {
        "how": how,
        "seed": seed,
        "digest": weights_digest(r.model)[:16],
        "epochs_run": fit.validation.epochs_run,
        "best_epoch": fit.validation.best_epoch,
        "seconds_per_epoch": round(fit.validation.seconds_per_epoch, 2),
        "steps_per_epoch": fit.validation.history[0].get("steps"),
        "wall_seconds": round(wall, 1),
        "test": _metrics(r.model, data),
    }
    t = row["test"]
    print(
        f"  {how:<14} seed {seed}: {row['seconds_per_epoch']:6.1f} s/epoch, {row['steps_per_epoch']} steps, "
        f"best {row['best_epoch']}/{row['epochs_run']}, NDCG@10 {t['standard']['NDCG@10']:.4f}, "
        f"unvisited HR@10 {t['unvisited']['HR@10']:.4f}, digest {row['digest']}, wall {wall:.0f} s",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", default="tmall", choices=["tmall", "retailrocket", "synthetic"])
    ap.add_argument("--model", default="member")
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--seeds", default="0,1", help="comma-separated; the first is also run distributed")
    ap.add_argument(
        "--runs",
        default="plain,x1,x2",
        help="comma-separated, of plain (every seed), x1 and x2 (the first seed)",
    )
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "tmp" / "quality")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    configure()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = set(args.runs.split(","))
    if not runs <= {"plain", "x1", "x2"}:
        ap.error(f"--runs: unknown {sorted(runs - {'plain', 'x1', 'x2'})}")
    tables = build_tables(args.benchmark, args.work)
    table, root = next(iter(tables.items()))
    val_data, data = load_views(root)
    overrides = {"train": {"epochs": args.max_epochs}}
    rows = []
    print(
        f"## {table}: {data.n_users:,} users, {data.n_items:,} items; {args.model}, at most {args.max_epochs} epochs"
    )
    for seed in seeds if "plain" in runs else ():
        t = time.perf_counter()
        fit = fit_and_refit(args.model, val_data, data, seed, overrides, progress=False)
        rows.append(_row("plain", seed, fit, data, time.perf_counter() - t))
    for processes in [p for p in (1, 2) if f"x{p}" in runs]:
        settings = load_settings(
            environ={},
            overrides={
                "paths": {"warehouse_root": str(args.work), "quarantine_root": str(args.work / "quarantine")},
                "spark": {"master": "local[2]"},
                "seeds": {"train": seeds[0]},
            },
        )
        t = time.perf_counter()
        fit = fit_distributed(settings, root, args.model, val_data, data, overrides, processes)
        rows.append(_row(f"distributor x{processes}", seeds[0], fit, data, time.perf_counter() - t))
    plain = next((r for r in rows if r["how"] == "plain" and r["seed"] == seeds[0]), None)
    one = next((r for r in rows if r["how"] == "distributor x1"), None)
    same = plain["digest"] == one["digest"] if plain and one else None
    if same is not None:
        print(f"  distributor x1 weights == plain trainer's (seed {seeds[0]}): {same}")
    out = args.out or REPO / "bench" / "results" / f"distributed_{args.benchmark}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": args.benchmark,
                "model": args.model,
                "max_epochs": args.max_epochs,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "one_process_equals_plain": same,
                "runs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
