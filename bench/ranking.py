"""Benchmark: the second stage. A retriever alone against the same retriever re-ranked by AW-MoE,
by AW-MoE without its contrastive loss, and by the ungated ranker of the same size (one MLP over
the same inputs), through the one evaluator (full ranking, training purchases masked; the test
split touched once, after the ranker's early stopping on held-out validation shoppers).

    .venv/bin/python bench/ranking.py --benchmark retailrocket --seeds 3
    .venv/bin/python bench/ranking.py --benchmark synthetic --seeds 3 --retriever sasrec
    .venv/bin/python bench/ranking.py --benchmark retailrocket --seeds 3 --resume   # only missing seeds

Per seed the retriever is fitted once as the pipeline fits it (validation fit, refit) and every
ranker variant re-ranks that same retriever (``training.ranking.fit_ranker``: labels are the
validation purchases, candidates from the retriever's validation fit; test over its refit). The
tables are ``bench/quality.py``'s. Prints a markdown table per benchmark (mean ± std over seeds,
standard and long-tail users: the 20% of evaluated users with the fewest events) and saves
``bench/results/ranking_<benchmark>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import build_tables  # noqa: E402

from infra.logs import configure  # noqa: E402
from training.evaluate import evaluate_scores  # noqa: E402
from training.ranking import fit_ranker  # noqa: E402
from training.train_evaluate import load_views  # noqa: E402
from training.trainer import fit_and_refit  # noqa: E402

#: name -> ranker overrides (None: the retriever alone).
VARIANTS: dict[str, dict | None] = {
    "retriever": None,
    "awmoe": {},
    "awmoe_no_contrastive": {"contrastive_weight": 0.0},
    "ungated_mlp": {"gate": False, "contrastive_weight": 0.0},
}
SETTINGS = ("standard", "long_tail", "visited", "unvisited")
COLUMNS = ("HR@10", "NDCG@10", "NDCG@20")


def run(
    benchmark: str,
    seeds: list[int],
    retriever: str,
    variants: list[str],
    work: Path,
    epochs: int | None,
    save: Callable[[dict], None] = lambda results: None,
    previous: dict | None = None,
) -> dict:
    """Every variant over one retriever fit per seed; ``save`` gets the results after each seed (a
    long run that is stopped keeps the seeds it finished). Seeds that ``previous`` (a saved run of the
    same benchmark, retriever, variants and epoch cap) holds for every variant are kept, not rerun."""
    root = build_tables(benchmark, work)[benchmark]
    val, full = load_views(root)
    out = {
        "benchmark": benchmark,
        "retriever": retriever,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "seeds": seeds,
        "max_epochs": epochs,
        "users": full.n_users,
        "items": full.n_items,
        "validation_users": len(np.unique(val.heldout["validation"][0])),
        "variants": {v: {"runs": []} for v in variants},
    }
    done: set[int] = set()
    if previous is not None:
        same = (
            previous["benchmark"] == benchmark
            and previous["retriever"] == retriever
            and list(previous["variants"]) == list(variants)
            and previous.get("max_epochs") == epochs
            and (previous["users"], previous["items"]) == (full.n_users, full.n_items)
        )
        if not same:
            raise SystemExit(
                "--resume: the saved run has another benchmark, retriever, variants or epoch cap"
            )
        done = set.intersection(*({r["seed"] for r in v["runs"]} for v in previous["variants"].values()))
        for name in variants:
            runs = [r for r in previous["variants"][name]["runs"] if r["seed"] in done and r["seed"] in seeds]
            out["variants"][name]["runs"] = runs
        print(f"resuming: seeds {sorted(done & set(seeds))} kept from the saved run", flush=True)
    cap = {"train": {"epochs": epochs}} if epochs else {}
    for seed in seeds:
        if seed in done:
            continue
        t = time.perf_counter()
        fit = fit_and_refit(retriever, val, full, seed, cap, progress=False)
        retriever_seconds = time.perf_counter() - t
        print(f"{retriever} seed {seed}: fitted in {retriever_seconds:.0f} s", flush=True)
        for name in variants:
            overrides = VARIANTS[name]
            t = time.perf_counter()
            if overrides is None:
                model, extra = fit.final.model, {"seconds": retriever_seconds}
            else:
                r = fit_ranker(
                    "awmoe",
                    fit.validation.model,
                    fit.final.model,
                    val,
                    full,
                    seed,
                    {**overrides, **cap},
                    progress=False,
                )
                model = r.final
                extra = {
                    "seconds": time.perf_counter() - t,
                    "manifest": r.manifest,
                    "best_epoch": r.validation.best_epoch,
                    "epochs_run": r.validation.epochs_run,
                    "seconds_per_epoch": r.validation.seconds_per_epoch,
                    "validation_metric": r.validation.best_metric,
                    "history": r.validation.history,
                }
            t = time.perf_counter()
            m = evaluate_scores(model.context_scorer(full), full, "test", settings=SETTINGS, batch_size=512)
            extra["eval_seconds"] = time.perf_counter() - t
            out["variants"][name]["runs"].append({"seed": seed, "metrics": m, **extra})
            s = m["standard"]
            print(
                f"  {name} seed {seed}: NDCG@10 {s['NDCG@10']:.4f}, long-tail NDCG@10 "
                f"{m['long_tail']['NDCG@10'] or 0:.4f} ({extra['seconds']:.0f} s, eval {extra['eval_seconds']:.0f} s)",
                flush=True,
            )
        save(out)
    return out


def markdown(results: dict) -> str:
    first = results["variants"][next(iter(results["variants"]))]["runs"][0]["metrics"]
    lines = [
        f"\n### {results['benchmark']}: retriever {results['retriever']}, test (mean ± std over seeds "
        f"{results['seeds']})\n",
        "| variant | "
        + " | ".join(
            f"{s} {c} ({first[s]['users']:,} users)" if c == COLUMNS[0] else f"{s} {c}"
            for s in ("standard", "long_tail")
            for c in COLUMNS
        )
        + " |",
        "|---|" + "---:|" * (2 * len(COLUMNS)),
    ]
    for name, v in results["variants"].items():
        cells = []
        for s in ("standard", "long_tail"):
            for c in COLUMNS:
                vals = np.array([r["metrics"][s][c] or 0.0 for r in v["runs"]], float)
                cells.append(f"{vals.mean():.4f} ± {vals.std():.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", choices=["retailrocket", "synthetic"], required=True)
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (1, 2, 3, ...)")
    ap.add_argument("--retriever", default="sasrec", help="the first stage's model")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    ap.add_argument("--max-epochs", type=int, help="cap on every model's epochs")
    ap.add_argument("--work", default=str(REPO / "bench" / "results" / "tmp" / "quality"))
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds the saved results already hold for every variant; run only the others",
    )
    args = ap.parse_args()
    configure("WARNING")
    path = REPO / "bench" / "results" / f"ranking_{args.benchmark}.json"

    def save(results: dict) -> None:
        path.write_text(json.dumps(results, indent=1, default=float) + "\n")

    results = run(
        args.benchmark,
        list(range(1, args.seeds + 1)),
        args.retriever,
        args.variants.split(","),
        Path(args.work),
        args.max_epochs,
        save,
        json.loads(path.read_text()) if args.resume and path.exists() else None,
    )
    save(results)
    print(markdown(results))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
