"""Benchmark: the sequence models' documented options, measured on the validation split only (the
way their defaults in ``training/models/sasrec.yaml`` and ``fame.yaml`` are chosen).

    .venv/bin/python bench/sequence_options.py                 # RetailRocket, leave-last-purchase
    .venv/bin/python bench/sequence_options.py --variants sasrec,sasrec_no_repeat
    .venv/bin/python bench/sequence_options.py --benchmark synthetic --variants fame,fame_balanced

Each variant is a model with overrides, fitted once per seed as the pipeline's validation fit
(early stopping on validation standard NDCG@10); test is not touched. Prints one row per variant
(best validation NDCG@10 and HR@10, mean over seeds, epochs, seconds per epoch) and saves
``bench/results/sequence_options.json`` (``sequence_options_synthetic.json`` for the planted log of
``bench/quality.py``, where FAME's variants also report their facet separation over the validation
users: a diagnostic against the planted truth, not what a default is chosen on).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import build_tables, facet_separation  # noqa: E402

from infra.logs import configure  # noqa: E402
from training.evaluate import evaluate_scores  # noqa: E402
from training.train_evaluate import load_views  # noqa: E402
from training.trainer import fit_model  # noqa: E402

#: name -> (model, overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "sasrec": ("sasrec", {}),
    "sasrec_no_repeat": ("sasrec", {"repeat": False}),
    "sasrec_all_targets": ("sasrec", {"targets": "all"}),
    "sasrec_all_targets_no_repeat": ("sasrec", {"targets": "all", "repeat": False}),
    "sasrec_bce": ("sasrec", {"loss": "bce"}),
    "sasrec_no_time": ("sasrec", {"time_features": False}),
    "sasrec_no_behavior": ("sasrec", {"behavior_embedding": False}),
    "fame": ("fame", {}),
    "fame_project": ("fame", {"residual": "project"}),
    "fame_no_repeat": ("fame", {"repeat": False}),
    "fame_balanced": ("fame", {"gate_balance": 0.1}),
    "fame_balanced_strong": ("fame", {"gate_balance": 1.0}),
    # every next event a target (purchases weighted): more facet-consistent examples than purchases
    "fame_all_targets": ("fame", {"targets": "all"}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    ap.add_argument("--benchmark", choices=["retailrocket", "synthetic"], default="retailrocket")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--work", default=str(REPO / "bench" / "results" / "tmp" / "quality"))
    ap.add_argument("--out", help="default: bench/results/sequence_options[_synthetic].json")
    args = ap.parse_args()
    configure("WARNING")
    suffix = "" if args.benchmark == "retailrocket" else f"_{args.benchmark}"
    args.out = args.out or str(REPO / "bench" / "results" / f"sequence_options{suffix}.json")
    root = build_tables(args.benchmark, Path(args.work))[args.benchmark]
    val_data, _ = load_views(root)
    out_path = Path(args.out)
    saved = json.loads(out_path.read_text()) if out_path.exists() else {"variants": {}}
    for name in args.variants.split(","):
        model, overrides = VARIANTS[name]
        runs = []
        for seed in range(args.seeds):
            cfg = {**overrides, "train": {**overrides.get("train", {}), "epochs": args.max_epochs}}
            t = time.perf_counter()
            r = fit_model(model, val_data, seed, cfg, progress=False)
            m = evaluate_scores(
                r.model.context_scorer(val_data), val_data, "validation", settings=("standard",)
            )
            extra = {}
            if args.benchmark == "synthetic" and "head_0" in getattr(r.model, "experts", ()):
                log_dir = Path(args.work) / "synthetic" / "data"
                extra["facet_separation"] = facet_separation(r.model, val_data, log_dir, split="validation")
                print(f"  {name} seed {seed}: facet separation {extra['facet_separation']}", flush=True)
            runs.append(
                {
                    "seed": seed,
                    **extra,
                    "validation": m["standard"],
                    "best_epoch": r.best_epoch,
                    "epochs_run": r.epochs_run,
                    "seconds_per_epoch": r.seconds_per_epoch,
                    "seconds": time.perf_counter() - t,
                    "peak_rss_mb": r.peak_rss_mb,
                }
            )
        ndcg = [x["validation"]["NDCG@10"] for x in runs]
        hr = [x["validation"]["HR@10"] for x in runs]
        saved["variants"][name] = {"model": model, "overrides": overrides, "runs": runs}
        print(
            f"| {name} | {np.mean(ndcg):.4f} ± {np.std(ndcg):.4f} | {np.mean(hr):.4f} | "
            f"{np.mean([x['best_epoch'] for x in runs]):.0f}/{np.mean([x['epochs_run'] for x in runs]):.0f} | "
            f"{np.mean([x['seconds_per_epoch'] for x in runs]):.1f} s |",
            flush=True,
        )
        saved["validation_users"] = runs[0]["validation"]["users"]
        out_path.write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
