"""Benchmark: every model on two real multi-behaviour benchmarks, through the one trainer and the
one evaluator (full ranking, training purchases masked; test touched once, after selection on
validation).

    .venv/bin/python bench/quality.py --benchmark tmall --seeds 1
    .venv/bin/python bench/quality.py --benchmark retailrocket --seeds 3

- ``tmall``: MEMBER's split of the MBGCN Tmall files (``jobs/benchmarks.py``); no click file, so
  most test purchases are unvisited and this mainly tests the unvisited expert.
- ``retailrocket``: the bundled RetailRocket log, each user's last purchase by time as the test
  item (leave-last-purchase-out); ~94% of those items were viewed or carted first, so this mainly
  tests the visited expert. The global-time-cutoff variant (cutoff 2015-08-19) is also built and
  evaluated, and the number of users it leaves is reported.

Models train with their defaults files, except the per-benchmark settings in ``TUNED`` (chosen on
validation; each run's overrides are saved with it). Each is fitted as the pipeline fits it: a
validation fit with early stopping on the validation split, then (tables with times) a refit on
every training event for the chosen epochs, which is what the test split measures. ``--update`` reruns some models and keeps the
others' saved results.

Prints a markdown table per benchmark (mean ± std over seeds of HR/NDCG @10/20/50 for the
standard, visited, unvisited and long-tail settings) and saves
``bench/results/quality_<benchmark>.json`` (models -> settings -> metrics).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.logs import configure  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from infra.tables import TRAINING  # noqa: E402
from training.evaluate import KS, SETTINGS, evaluate_scores  # noqa: E402
from training.train_evaluate import load_views  # noqa: E402
from training.trainer import fit_and_refit  # noqa: E402

MODELS = ["popularity", "als", "als_multi", "bpr", "bpr_multi", "lightgcn", "member", "member_funnel"]
RR_DATE = date(2015, 9, 18)

# Per-benchmark settings that differ from a model's defaults file, chosen on the validation split
# (standard NDCG@10, the trainer's early-stopping metric), as the paper tunes per dataset; what they
# were chosen on: bench/README.md, "MEMBER's negatives".
_RR_NEGATIVES = {"negatives": 1, "negative_candidates": 1, "train": {"lr": 5.0e-3}}
TUNED: dict[str, dict[str, dict]] = {
    table: {"member": _RR_NEGATIVES, "member_funnel": {**_RR_NEGATIVES, "visited_negatives": 0.5}}
    for table in ("retailrocket", "retailrocket_global_cutoff")
}


def _settings(work: Path, split: dict):
    return load_settings(
        environ={},
        overrides={
            "paths": {"warehouse_root": str(work), "quarantine_root": str(work / "quarantine")},
            "pipeline": {"sources": ["retailrocket_mb"]},
            "spark": {"master": "local[2]", "conf": {"spark.sql.shuffle.partitions": "4"}},
            "sessionize": {"history_days": 140},
            "split": {"observation_days": 140, "val_user_fraction": 1.0, **split},
        },
    )


def build_tables(benchmark: str, work: Path) -> dict[str, Path]:
    """Training bundles to evaluate on: name -> bundle dir (built once, reused on later runs), by
    the pipeline's declared stages: the benchmark split for Tmall, the steps up to ``split`` for
    RetailRocket."""
    from infra.pipeline import load_pipeline

    pipeline = load_pipeline()
    out = {}
    if benchmark == "tmall":
        root = TRAINING.dir(work, "tmall_mbgcn")
        if not root.exists():
            settings = _settings(work, {"protocol": "global_time"})
            pipeline["split"](settings, benchmark=str(REPO / "jobs" / "sample_data" / "tmall_mbgcn"))
        out["tmall"] = root
        return out
    for name, split in {
        "retailrocket": {"protocol": "leave_last_purchase"},
        "retailrocket_global_cutoff": {"protocol": "global_time", "test_days": 31},  # cutoff 2015-08-19
    }.items():
        w = work / name
        root = TRAINING.dir(w, RR_DATE)
        if not root.exists():
            pipeline.run(_settings(w, split), RR_DATE, until="split", checks=False)
        out[name] = root
    return out


def run(benchmark: str, seeds: list[int], models: list[str], work: Path, max_epochs: int | None) -> dict:
    results: dict = {
        "benchmark": benchmark,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "seeds": seeds,
        "tables": {},
    }
    for table_name, root in build_tables(benchmark, work).items():
        val_data, data = load_views(root)  # the validation fit's view and every training event's
        held = data.manifest.stats["heldout"]
        info = {
            "users": data.n_users,
            "items": data.n_items,
            "test": held["test"],
            "validation": held["validation"],
            "protocol": data.manifest.protocol,
            "models": {},
        }
        print(
            f"\n## {table_name}: {data.n_users:,} users, {data.n_items:,} items, test pairs {held['test']['pairs']:,} "
            f"over {held['test']['users']:,} users ({held['test']['visited']:,} visited), "
            f"validation {held['validation']['pairs']:,}",
            flush=True,
        )
        for name in models:
            runs = []
            for seed in seeds:
                overrides = copy.deepcopy(TUNED.get(table_name, {}).get(name, {}))
                if max_epochs:
                    overrides.setdefault("train", {})["epochs"] = max_epochs
                t = time.perf_counter()
                fit = fit_and_refit(name, val_data, data, seed, overrides, progress=False)
                r, chosen = fit.final, fit.validation  # tested: the refit; chosen on validation
                train_s = time.perf_counter() - t
                t = time.perf_counter()
                m = evaluate_scores(
                    r.model.context_scorer(data), data, "test", batch_size=2048, device=r.model.device
                )
                extra = {}
                if name == "member" and seed == seeds[0]:
                    extra["score_all_users_top50_seconds"] = time_full_scoring(r.model, data)
                    print(
                        f"  {name}: top-50 for all {data.n_users:,} users in "
                        f"{extra['score_all_users_top50_seconds']:.1f} s",
                        flush=True,
                    )
                runs.append(
                    {
                        "seed": seed,
                        "overrides": overrides,
                        "metrics": m,
                        "train_seconds": train_s,
                        **extra,
                        "eval_seconds": time.perf_counter() - t,
                        "epochs_run": chosen.epochs_run,
                        "best_epoch": chosen.best_epoch,
                        "refit_epochs": r.epochs_run if fit.refitted else None,
                        "validation_metric": chosen.best_metric,
                        "seconds_per_epoch": chosen.seconds_per_epoch,
                        "peak_rss_mb": r.peak_rss_mb,
                        "device": r.device,
                    }
                )
                print(
                    f"  {name} seed {seed}: {chosen.epochs_run} epochs (best {chosen.best_epoch}), "
                    f"{chosen.seconds_per_epoch:.1f} s/epoch, train {train_s:.0f} s, peak RSS {r.peak_rss_mb:.0f} MB, "
                    f"HR@20 {m['standard']['HR@20']:.4f}",
                    flush=True,
                )
            info["models"][name] = {"runs": runs, "summary": summarize([x["metrics"] for x in runs])}
        results["tables"][table_name] = info
        print(markdown(table_name, info), flush=True)
    return results


def time_full_scoring(model, data, k: int = 50, batch: int = 4096) -> float:
    """Seconds to score every user (in the data's own context) against every item and keep the
    top-k (batched; no dense table)."""
    score = model.context_scorer(data)
    t = time.perf_counter()
    with torch.no_grad():
        for start in range(0, data.n_users, batch):
            users = torch.arange(start, min(start + batch, data.n_users), device=model.device)
            torch.topk(score(users), k, dim=1)
    return time.perf_counter() - t


def summarize(metric_runs: list[dict]) -> dict:
    out = {}
    for setting in SETTINGS:
        out[setting] = {}
        for key in metric_runs[0][setting]:
            vals = np.array([r[setting][key] for r in metric_runs], float)
            out[setting][key] = {"mean": float(vals.mean()), "std": float(vals.std())}
    return out


def markdown(table_name: str, info: dict) -> str:
    lines = [f"\n### {table_name} (test; mean ± std over seeds)"]
    for setting in SETTINGS:
        users = next(iter(info["models"].values()))["summary"][setting]["users"]["mean"]
        cols = [f"{m}@{k}" for m in ("HR", "NDCG") for k in KS]
        lines += [
            f"\n**{setting}** ({int(users):,} users)\n",
            "| model | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for name, v in info["models"].items():
            s = v["summary"][setting]
            lines.append(
                f"| {name} | " + " | ".join(f"{s[c]['mean']:.4f} ± {s[c]['std']:.4f}" for c in cols) + " |"
            )
    return "\n".join(lines)


def merge(saved: dict, new: dict) -> dict:
    """``saved`` with the tables' models of ``new`` replaced or added (same seeds, or it refuses)."""
    if saved.get("seeds") != new["seeds"]:
        raise SystemExit(f"--update: saved results used seeds {saved.get('seeds')}, this run {new['seeds']}")
    out = {**saved, "machine": new["machine"], "tables": dict(saved["tables"])}
    for table_name, info in new["tables"].items():
        old = saved["tables"].get(table_name)
        if old is None:
            out["tables"][table_name] = info
            continue
        out["tables"][table_name] = {**info, "models": {**old["models"], **info["models"]}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", choices=["tmall", "retailrocket"], required=True)
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (1, 2, 3, ...)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--max-epochs", type=int, help="cap on every model's epochs")
    ap.add_argument("--work", default=str(REPO / "bench" / "results" / "tmp" / "quality"))
    ap.add_argument(
        "--update",
        action="store_true",
        help="replace only the models run in the saved JSON, keeping the other models' results "
        "(their seeds must match)",
    )
    args = ap.parse_args()
    configure("WARNING")
    results = run(
        args.benchmark,
        list(range(1, args.seeds + 1)),
        args.models.split(","),
        Path(args.work),
        args.max_epochs,
    )
    out = REPO / "bench" / "results" / f"quality_{args.benchmark}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.update and out.exists():
        results = merge(json.loads(out.read_text()), results)
        for table_name, info in results["tables"].items():
            print(markdown(table_name, info), flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
