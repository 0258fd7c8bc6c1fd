"""Benchmark: what MEMBER's unvisited expert learns, ablated on the validation split only (the test
split is never read here), each variant logged to MLflow.

    .venv/bin/python bench/member_ablation.py --benchmark tmall --variants member,reg_visited --max-epochs 10

Each variant is ``member`` with a few keys of ``training/models/member.yaml`` changed (``VARIANTS``),
fitted on the validation fit's view with the trainer's early stopping, then measured on the
validation split:

- the evaluator's standard, visited and unvisited settings (HR/NDCG @10/20), beside popularity's on
  the same pairs;
- what the unvisited expert recommends: over each validation user's unvisited candidates (the
  evaluator's: training purchases masked, visited items out), the mean popularity percentile of its
  top-10 (1.0 = the most popular item; popularity = distinct training users with any behaviour on
  the item) and the share of its top-10 also in popularity's top-10 of the same candidates;
- each loss term's mean over the first and the last epoch (a contrastive loss that does not move
  teaches nothing).

Results go to ``bench/results/member_ablation_<benchmark>.json`` (variants already there with the
same seed and epoch cap are kept unless ``--rerun``) and to an MLflow experiment
``member_ablation_<benchmark>`` in ``<work>/mlflow.db`` (parameters: the overrides; metrics: the
above).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.quality import build_tables  # noqa: E402
from infra.logs import configure  # noqa: E402
from training.evaluate import evaluate_scores  # noqa: E402
from training.train_evaluate import load_views  # noqa: E402
from training.trainer import fit_model  # noqa: E402

#: The chosen variant's change (``member_no_unvisited_ssl``): both self-supervised losses off.
SSL_OFF = {"gamma_unvisited_cl": 0.0, "gamma_generative": 0.0}
#: name -> overrides of ``member.yaml``.
VARIANTS: dict[str, dict] = {
    "member": {},
    # the reference code regularises the visited expert's embeddings only
    "reg_visited": {"reg_experts": ["visited"]},
    "no_unvisited_cl": {"gamma_unvisited_cl": 0.0},
    "no_generative": {"gamma_generative": 0.0},
    "no_unvisited_ssl": SSL_OFF,
    "item_bias": {"item_bias": True},
    "item_bias_reg_visited": {"item_bias": True, "reg_experts": ["visited"]},
    # the reference code's negatives: one uniform item per purchase
    "uniform_negatives": {"negatives": 1, "negative_candidates": 1, "train": {"lr": 5.0e-3}},
    # the chosen variant's capacity and regularisation (it peaks at epoch 7 of 17, then overfits)
    "no_unvisited_ssl_reg1e-3": {**SSL_OFF, "reg": 1.0e-3},
    "no_unvisited_ssl_reg3e-3": {**SSL_OFF, "reg": 3.0e-3},
    "no_unvisited_ssl_dim64": {**SSL_OFF, "dim": 64},
    "no_unvisited_ssl_dim64_reg1e-3": {**SSL_OFF, "dim": 64, "reg": 1.0e-3},
    # the chosen variant with one learned weight on log(1 + purchases) in the unvisited expert
    "no_unvisited_ssl_dim64_reg1e-3_pop": {**SSL_OFF, "dim": 64, "reg": 1.0e-3, "popularity_prior": True},
    # a sampled softmax over 1,024 shared uniform negatives in place of BPR
    "no_unvisited_ssl_softmax": {**SSL_OFF, "rank_loss": "softmax"},
    "no_unvisited_ssl_softmax_t0.5": {**SSL_OFF, "rank_loss": "softmax", "softmax_temperature": 0.5},
    "no_unvisited_ssl_lambda0.8": {**SSL_OFF, "lambda_unvisited": 0.8},
}
SETTINGS = ("standard", "visited", "unvisited")
TOP = 10


def unvisited_top_items(model, data, batch_size: int = 2048) -> dict[str, float]:
    """What the unvisited expert puts in each validation user's top-``TOP`` of unvisited candidates,
    against popularity's top-``TOP`` of the same candidates."""
    users_with, _, visited_pairs = data.heldout["validation"]
    visited_pairs = np.asarray(visited_pairs, bool)
    users = np.unique(users_with[~visited_pairs])
    popularity = np.asarray((data.union > 0).sum(0)).ravel().astype(np.float64)
    # percentile: the item's rank by popularity over n - 1 (0 least, 1 most popular), ties at their mean
    order = np.argsort(popularity, kind="stable")
    pct = np.empty(len(popularity))
    pct[order] = np.arange(len(popularity)) / max(len(popularity) - 1, 1)
    for value in np.unique(popularity):
        tied = popularity == value
        pct[tied] = pct[tied].mean()
    mask = data.mask_for("validation")
    score = model.context_scorer(data)
    pop = torch.from_numpy(popularity)
    pct_sum, overlap_sum = 0.0, 0.0
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        with torch.no_grad():
            s = score(torch.from_numpy(batch).to(model.device)).float().cpu()
        blocked = torch.from_numpy((mask[batch].toarray() > 0) | (data.visited[batch].toarray() > 0))
        s = s.masked_fill(blocked, float("-inf"))
        p = pop.expand(len(batch), -1).masked_fill(blocked, float("-inf"))
        top = s.topk(TOP, dim=1).indices.numpy()
        top_pop = p.topk(TOP, dim=1).indices.numpy()
        pct_sum += pct[top].mean(1).sum()
        overlap_sum += sum(len(set(a) & set(b)) / TOP for a, b in zip(top, top_pop, strict=True))
    n = max(len(users), 1)
    return {
        "users": len(users),
        f"top{TOP}_popularity_percentile": pct_sum / n,
        f"top{TOP}_overlap_with_popularity": overlap_sum / n,
    }


def _metrics(model, data) -> dict:
    m = evaluate_scores(
        model.context_scorer(data),
        data,
        "validation",
        settings=SETTINGS,
        batch_size=2048,
        device=model.device,
    )
    return {s: {k: m[s][k] for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "users")} for s in m}


def _losses(history: list[dict]) -> dict:
    keys = [
        k
        for k in history[0]
        if k not in ("epoch", "steps", "seconds", "train_seconds") and not k.startswith("val_")
    ]
    return {k: {"first": history[0][k], "last": history[-1][k]} for k in keys}


def run_variant(overrides: dict, val_data, seed: int, max_epochs: int | None) -> dict:
    overrides = json.loads(json.dumps(overrides))
    if max_epochs:
        overrides.setdefault("train", {})["epochs"] = max_epochs
    t = time.perf_counter()
    r = fit_model("member", val_data, seed, overrides, progress=False)
    return {
        "overrides": overrides,
        "seed": seed,
        "max_epochs": max_epochs,
        "validation": _metrics(r.model, val_data),
        "unvisited_top": unvisited_top_items(r.model, val_data),
        "losses": _losses(r.history),
        "epochs_run": r.epochs_run,
        "best_epoch": r.best_epoch,
        "seconds_per_epoch": r.seconds_per_epoch,
        "train_seconds": time.perf_counter() - t,
    }


def log_mlflow(tracking: Path, benchmark: str, name: str, row: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tracking}")
    mlflow.set_experiment(f"member_ablation_{benchmark}")
    with mlflow.start_run(run_name=name):
        flat = {}

        def walk(prefix, value):
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                flat[prefix] = value

        walk("", row["overrides"])
        mlflow.log_params({"variant": name, "seed": row["seed"], "max_epochs": row["max_epochs"], **flat})
        metrics = {
            f"val_{s}_{k.replace('@', '_at_')}": v
            for s, vals in row["validation"].items()
            for k, v in vals.items()
            if v is not None
        }
        metrics.update({f"unvisited_{k}": v for k, v in row["unvisited_top"].items()})
        for loss, ends in row["losses"].items():
            metrics.update({f"loss_{loss}_{end}": v for end, v in ends.items()})
        metrics.update({k: row[k] for k in ("epochs_run", "best_epoch", "seconds_per_epoch")})
        mlflow.log_metrics(metrics)


def popularity_row(val_data) -> dict:
    r = fit_model("popularity", val_data, 0, progress=False)
    return {
        "validation": _metrics(r.model, val_data),
        "unvisited_top": unvisited_top_items(r.model, val_data),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", choices=("tmall", "retailrocket"), default="tmall")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=None, help="cap on the epochs of every variant")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "tmp" / "quality")
    ap.add_argument("--rerun", action="store_true", help="rerun variants already saved")
    args = ap.parse_args()
    configure()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    out_path = REPO / "bench" / "results" / f"member_ablation_{args.benchmark}.json"
    saved = json.loads(out_path.read_text()) if out_path.exists() else {}
    results = {
        "benchmark": args.benchmark,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "split": "validation",
        "variants": saved.get("variants", {}),
    }
    tables = build_tables(args.benchmark, args.work)
    root = tables[args.benchmark]
    val_data, _ = load_views(root)
    held = val_data.manifest.stats["heldout"]["validation"]
    results["validation"] = held
    print(f"{args.benchmark}: validation {held}", flush=True)
    if "popularity" not in saved:
        results["popularity"] = popularity_row(val_data)
    else:
        results["popularity"] = saved["popularity"]
    print(f"popularity: {json.dumps(results['popularity'])}", flush=True)
    for name in names:
        prev = results["variants"].get(name)
        if prev and not args.rerun and prev["seed"] == args.seed and prev["max_epochs"] == args.max_epochs:
            print(f"{name}: kept from {out_path.name}", flush=True)
            continue
        row = run_variant(VARIANTS[name], val_data, args.seed, args.max_epochs)
        results["variants"][name] = row
        log_mlflow(args.work / "mlflow.db", args.benchmark, name, row)
        v = row["validation"]
        print(
            f"{name}: best epoch {row['best_epoch']}/{row['epochs_run']}, {row['seconds_per_epoch']:.1f} s/epoch; "
            f"standard NDCG@10 {v['standard']['NDCG@10']:.4f} HR@20 {v['standard']['HR@20']:.4f}; "
            f"unvisited HR@10 {v['unvisited']['HR@10']:.4f}; visited HR@10 {v['visited']['HR@10']:.4f}; "
            f"top-10 {json.dumps(row['unvisited_top'])}; losses {json.dumps(row['losses'])}",
            flush=True,
        )
        out_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    out_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
