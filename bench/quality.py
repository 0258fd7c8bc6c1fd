"""Benchmark: every model on two real multi-behaviour benchmarks, through the one trainer and the
one evaluator (full ranking, training purchases masked; test touched once, after selection on
validation).

    .venv/bin/python bench/quality.py --benchmark tmall --seeds 1
    .venv/bin/python bench/quality.py --benchmark retailrocket --seeds 3
    .venv/bin/python bench/quality.py --benchmark tmall --seeds 3 --resume   # after an interruption

- ``tmall``: MEMBER's split of the MBGCN Tmall files (``jobs/benchmarks.py``); no click file, so
  most test purchases are unvisited and this mainly tests the unvisited expert.
- ``retailrocket``: the bundled RetailRocket log, each user's last purchase by time as the test
  item (leave-last-purchase-out); ~94% of those items were viewed or carted first, so this mainly
  tests the visited expert. The global-time-cutoff variant (cutoff 2015-08-19) is also built and
  evaluated, and the number of users it leaves is reported.
- ``synthetic``: a seeded 1M-event log with planted structure (``SYNTH``: successor items, four
  facets, long-tail users, purchases of items not viewed in the session; ``funnelrec synth``), leave-last-purchase-out. For models whose experts
  are heads (FAME), also the facet separation: per test user, the head with the largest average
  share in its top-10; the normalised mutual information between that head and the user's planted
  dominant facet, beside the same with the facet labels shuffled.

Sequence models (SASRec, FAME) are not run on Tmall: its tables have no timestamps, and the tables
say so.

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
import functools
import json
import os
import platform
import subprocess
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
from training.models import model_class  # noqa: E402
from training.models.sequential import SequenceRecommender  # noqa: E402
from training.train_evaluate import load_views  # noqa: E402
from training.trainer import fit_and_refit  # noqa: E402

MODELS = [
    "popularity",
    "als",
    "als_multi",
    "bpr",
    "bpr_multi",
    "lightgcn",
    "member",
    "member_funnel",
    "member_no_unvisited_ssl",
    "member_no_unvisited_ssl_dim64",
    "member_no_unvisited_ssl_dim64_pop",
    "sasrec",
    "fame",
]
RR_DATE = date(2015, 9, 18)
#: The planted-structure synthetic log: successor items, four facets, a fifth of users long-tail,
#: a fifth of sessions ending in a purchase of an item not viewed in them (of a preferred facet value).
SYNTH_DATE = date(2017, 12, 3)
SYNTH = {
    "events": 1_000_000,
    "seed": 0,
    "plant_sequence": 0.2,
    "facets": 4,
    "long_tail": 0.2,
    "p_buy_unseen": 0.2,
}
#: Cut-off of the facet separation: the heads' average shares over each user's top-K.
FACET_K = 10

# Per-benchmark settings that differ from a model's defaults file, chosen on the validation split
# (standard NDCG@10, the trainer's early-stopping metric), as the paper tunes per dataset; what they
# were chosen on: bench/README.md, "MEMBER's negatives".
_RR_NEGATIVES = {"negatives": 1, "negative_candidates": 1, "train": {"lr": 5.0e-3}}
TUNED: dict[str, dict[str, dict]] = {
    table: {
        "member": _RR_NEGATIVES,
        "member_funnel": {**_RR_NEGATIVES, "visited_negatives": 0.5},
        "member_no_unvisited_ssl": _RR_NEGATIVES,
        "member_no_unvisited_ssl_dim64": _RR_NEGATIVES,
        "member_no_unvisited_ssl_dim64_pop": _RR_NEGATIVES,
    }
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
    if benchmark == "synthetic":
        w = work / "synthetic"
        root = TRAINING.dir(w, SYNTH_DATE)
        if not root.exists():
            settings = _settings(w, {"protocol": "leave_last_purchase", "observation_days": 9})
            settings = settings.model_copy(
                update={
                    "pipeline": settings.pipeline.model_copy(update={"sources": ["synthetic"]}),
                    "paths": settings.paths.model_copy(update={"data_root": w / "data"}),
                }
            )
            pipeline["synth"](settings, **SYNTH)
            pipeline.run(settings, SYNTH_DATE, until="split", checks=False)
        out["synthetic"] = root
        return out
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


#: What decides a run's metrics besides its overrides and seed: the models, trainer and evaluator,
#: and the training defaults. A saved run is reused only when these are at its commit what they are
#: in the working tree.
RESULT_PATHS = ("training", "infra/defaults.yaml")


def _commit() -> str | None:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


@functools.cache
def _same_code(commit: str | None) -> bool:
    """Whether ``RESULT_PATHS`` in the working tree are as they were at ``commit``."""
    if not commit:
        return False
    diff = subprocess.run(
        ["git", "-C", str(REPO), "diff", "--quiet", commit, "--", *RESULT_PATHS], capture_output=True
    )
    return diff.returncode == 0


def _save_done(path: Path, done: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(done, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def run(
    benchmark: str,
    seeds: list[int],
    models: list[str],
    work: Path,
    max_epochs: int | None,
    resume: bool = False,
) -> dict:
    """Fit and test every model on every seed. Each finished (table, model, seed) run is saved at
    once to ``<work>/runs_<benchmark>.json`` with its overrides and the commit it ran at (runs saved
    before are kept). With ``resume`` a run found there is taken instead of rerun (a long benchmark
    can span sessions) when its overrides are this run's and ``RESULT_PATHS`` have not changed
    since its commit; each run taken, or refused and why, is printed."""
    done_path = work / f"runs_{benchmark}.json"
    done: dict = json.loads(done_path.read_text()) if done_path.exists() else {}
    commit = _commit()
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
            if issubclass(model_class(name), SequenceRecommender) and not data.has_times:
                info["models"][name] = {
                    "skipped": "no timestamps: sequence models are not run on these tables"
                }
                print(f"  {name}: skipped (no timestamps)", flush=True)
                continue
            runs = []
            for seed in seeds:
                overrides = copy.deepcopy(TUNED.get(table_name, {}).get(name, {}))
                if max_epochs:
                    overrides.setdefault("train", {})["epochs"] = max_epochs
                key = f"{table_name}/{name}/{seed}"
                saved = done.get(key) if resume else None
                if saved is not None:
                    if saved["overrides"] != overrides:
                        print(f"  {name} seed {seed}: saved run has other overrides; rerun", flush=True)
                    elif not _same_code(saved.get("commit")):
                        print(
                            f"  {name} seed {seed}: {', '.join(RESULT_PATHS)} changed since the saved "
                            f"run's commit {saved.get('commit')}; rerun",
                            flush=True,
                        )
                    else:
                        runs.append(saved)
                        print(f"  {name} seed {seed}: resumed (ran at {saved['commit']})", flush=True)
                        continue
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
                if table_name == "synthetic" and "head_0" in getattr(r.model, "experts", ()):
                    extra["facet_separation"] = facet_separation(r.model, data, work / "synthetic" / "data")
                    print(f"  {name}: facet separation {extra['facet_separation']}", flush=True)
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
                        "commit": commit,
                    }
                )
                done[key] = runs[-1]
                _save_done(done_path, done)
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


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labelings (arithmetic normalisation, as scikit-learn's
    default): 2 I(a; b) / (H(a) + H(b)); 0 when both are constant."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    h = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum() - (pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return 2 * mi / h if h > 0 else 0.0


def facet_separation(model, data, log_dir: Path, seed: int = 0, split: str = "test") -> dict:
    """Per user held out in ``split``, the head with the largest average share over its
    top-``FACET_K``; its NMI with the user's planted dominant facet (``planted/planted_users.csv``),
    and with those labels shuffled across the same users."""
    import pandas as pd

    from training.data import ids
    from training.models.base import Context
    from training.recommend import recommend

    users = np.unique(data.heldout[split][0])
    recs = recommend(
        model, Context.of_training(data, users, model.history_length), data.mask_for(split)[users], FACET_K
    )
    heads = [e for e in model.experts if e.startswith("head_")]
    shares = pd.DataFrame({h: recs.weights[h] for h in heads}).groupby(recs.row).mean()
    top_head = shares.to_numpy().argmax(1)
    planted = pd.read_csv(log_dir / "synthetic" / "planted" / "planted_users.csv", dtype={"user_id": str})
    facet = planted.set_index("user_id")["dominant_facet"]
    user_ids = ids(data.root, "user")[users[shares.index.to_numpy()]]
    truth = facet.reindex(user_ids).to_numpy()
    known = ~pd.isna(truth)
    truth, top_head = truth[known].astype(int), top_head[known]
    shuffled = np.random.default_rng(seed).permutation(truth)
    return {
        "users": int(known.sum()),
        "nmi": nmi(top_head, truth),
        "nmi_shuffled_facets": nmi(top_head, shuffled),
        "heads_used": len(np.unique(top_head)),
        "largest_head_users": float(np.bincount(top_head).max() / max(len(top_head), 1)),
    }


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
        # Results saved before a setting existed have no row for it.
        ran = [v for v in info["models"].values() if setting in v.get("summary", {})]
        users = ran[0]["summary"][setting]["users"]["mean"] if ran else 0
        cols = [f"{m}@{k}" for m in ("HR", "NDCG") for k in KS]
        lines += [
            f"\n**{setting}** ({int(users):,} users)\n",
            "| model | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for name, v in info["models"].items():
            if "skipped" in v:
                lines.append(f"| {name} | " + " | ".join("n/a" for _ in cols) + f" |  ({v['skipped']})")
                continue
            if setting not in v["summary"]:
                lines.append(f"| {name} | " + " | ".join("-" for _ in cols) + " |  (not measured)")
                continue
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
    ap.add_argument("--benchmark", choices=["tmall", "retailrocket", "synthetic"], required=True)
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (1, 2, 3, ...)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--max-epochs", type=int, help="cap on every model's epochs")
    ap.add_argument("--work", default=str(REPO / "bench" / "results" / "tmp" / "quality"))
    ap.add_argument(
        "--resume",
        action="store_true",
        help="take the runs already finished from <work>/runs_<benchmark>.json (each run is saved there "
        "as it finishes) instead of rerunning them, when their overrides are the same and training/ and "
        "infra/defaults.yaml have not changed since their commit",
    )
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
        args.resume,
    )
    out = REPO / "bench" / "results" / f"quality_{args.benchmark}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.update and out.exists():
        results = merge(json.loads(out.read_text()), results)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {out}")
    if args.update:
        for table_name, info in results["tables"].items():
            print(markdown(table_name, info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
