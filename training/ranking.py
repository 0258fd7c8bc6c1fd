"""The second stage's training: which purchases a ranker learns from, and from which retriever.

A ranker must never learn from candidates of a retriever that saw the purchase they are labelled
with: a retriever ranks its own training purchases far higher than it will ever rank a purchase it
has not seen, and a ranker trained on that learns to trust the retriever too much. The pipeline's
two fits give a clean pair without a third fit:

- **labels**: the validation split's held-out purchases (one per validation shopper);
- **their candidates**: the retriever's *validation fit*, trained on the validation view (each
  validation shopper's events before the validation purchase, ``jobs/split.py``), which holds none
  of those purchases (``label_leaks`` checks it from the tables);
- **the ranker's early stopping**: the two-stage list's NDCG@10 on a share ``holdout`` of the
  validation shoppers whose purchases are not among its labels (chosen by a fixed hash of the user
  index, the same for every seed);
- **test and serving**: the same ranker weights over the retriever's *refit* (every training
  event, none of the test purchases). The ranker's inputs are the retriever's candidates, their
  standardised scores and ranks, so they read the same from either fit.

``RankerFit.manifest`` records which fit of which retriever each part saw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from infra.logs import stage
from infra.settings import Settings
from infra.tables import HELDOUT, PURCHASE, TRAIN_EVENTS
from training.data import TrainingData, read_table
from training.models import merged_config, model_class
from training.models.base import Recommender
from training.trainer import FitResult, TrainResult, seed_everything, train

#: Knuth's multiplicative hash: the holdout split of shoppers depends on the user index only.
_HASH = 2654435761


def holdout_users(users: np.ndarray, share: float) -> np.ndarray:
    """(n,) bool: which of ``users`` (indices) are kept for the ranker's early stopping."""
    return ((np.asarray(users, np.uint64) * np.uint64(_HASH)) % np.uint64(2**32)) < np.uint64(share * 2**32)


def with_heldout(data: TrainingData, heldout: dict[str, tuple]) -> TrainingData:
    """``data`` with other held-out pairs; the events and matrices are shared, not re-read."""
    out = dataclasses.replace(data, heldout=heldout)
    for cached in ("events", "has_times", "union"):
        if cached in data.__dict__:
            out.__dict__[cached] = data.__dict__[cached]
    return out


def label_leaks(data: TrainingData, split: str, users: np.ndarray) -> int | None:
    """How many held-out purchases of ``split`` by ``users`` are themselves among ``data``'s
    training events (the same user, item and time; this view's events): 0 for a clean pair of
    labels and retriever. None when the bundle has no times to tell the same purchase from a repeat."""
    held = read_table(data.root / HELDOUT.name, ["user_idx", "item_idx", "split", "event_time"]).to_pandas()
    held = held[(held["split"] == split) & held["user_idx"].isin(users)]
    if held["event_time"].isna().any() or not data.has_times:
        return None
    cols = ["user_idx", "item_idx", "behavior", "event_time", "validation_fit"]
    ev = read_table(data.root / TRAIN_EVENTS.name, cols).to_pandas()
    if data.view == "validation" and data.refit:
        ev = ev[ev["validation_fit"]]
    ev = ev[(ev["behavior"] == PURCHASE) & ev["user_idx"].isin(users)]
    same = held.merge(ev, on=["user_idx", "item_idx", "event_time"])
    return len(same)


def on_retriever(ranker: Recommender, retriever: Recommender, data: TrainingData) -> Recommender:
    """The ranker's weights over another fit of its retriever (the refit), on ``data``."""
    config = {**ranker.config, "retriever_config": retriever.config}
    out = type(ranker)(data, config, retriever=retriever).to(ranker.device)
    own = {k: v for k, v in ranker.state_dict().items() if not k.startswith("retriever.")}
    missing, unexpected = out.load_state_dict(own, strict=False)
    if unexpected or any(not k.startswith("retriever.") for k in missing):
        raise ValueError(f"ranker weights do not fit: missing {missing}, unexpected {unexpected}")
    return out.eval()


@dataclass
class RankerFit:
    """The ranker as trained (over the retriever's validation fit) and as tested and served (the
    same weights over the refit), with what each saw."""

    validation: TrainResult
    final: Recommender
    #: The validation view whose validation split is only the held-out shoppers.
    stopping: TrainingData
    manifest: dict[str, Any]


def fit_ranker(
    name: str,
    retriever_validation: Recommender,
    retriever_final: Recommender,
    validation_data: TrainingData,
    full_data: TrainingData,
    seed: int,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    progress: bool | None = None,
) -> RankerFit:
    """Train ranker ``name`` on the validation purchases over ``retriever_validation``'s candidates,
    early-stopped on the held-out shoppers; return it over ``retriever_final`` (the refit) too (the
    same object for a bundle without a separate validation fit)."""
    cls = model_class(name)
    if not cls.ranker:
        raise ValueError(f"{name} is not a ranker")
    first = retriever_validation
    config = merged_config(name, {**(overrides or {}), "seed": seed})
    config.update(retriever=first.name, retriever_config=first.config)
    users, items, _ = validation_data.heldout["validation"]
    held = holdout_users(users, cls.Config.model_validate(config).holdout)
    if held.all() or not held.any():
        raise ValueError(
            f"{len(users)} validation purchases: too few to hold some out for the ranker's early stopping"
        )
    leaks = label_leaks(validation_data, "validation", users[~held])
    if leaks:
        raise ValueError(f"{leaks} ranker labels are purchases the retriever's validation fit trained on")
    stopping = stopping_view(validation_data, held)
    seed_everything(seed)
    model = cls(stopping, config, retriever=first, labels=(users[~held], items[~held]))
    result = train(model, stopping, seed, None, device, progress)
    ex = model.examples()
    refitted = retriever_final is not retriever_validation
    final = on_retriever(result.model, retriever_final, full_data) if refitted else result.model
    manifest = {
        "ranker": name,
        "retriever": first.config["name"],
        "labels": f"validation held-out {PURCHASE}s",
        "label_users": int((~held).sum()),
        "examples": len(ex["users"]),
        "candidate_recall": float(ex["recall"]),
        "early_stopping_users": int(held.sum()),
        "label_leaks": leaks,  # None: no times to check with
        "trained_over": "the retriever's validation fit (validation view)",
        "tested_over": "the retriever's refit (full view)" if refitted else "the same fit",
    }
    return RankerFit(result, final, stopping, manifest)


def stopping_view(validation_data: TrainingData, held: np.ndarray) -> TrainingData:
    """The validation view whose validation split is only the ``held`` purchases (the ranker's
    early stopping and its promotion gate, never its labels)."""
    return with_heldout(
        validation_data, {"validation": tuple(x[held] for x in validation_data.heldout["validation"])}
    )


# -- the `rank` stage ----------------------------------------------------------------------------
def ranker_settings(settings: Settings) -> Settings:
    """``settings`` with the ranker's registered model in place of the retriever's: the registry's
    functions (register, aliases, lease, history, rollback) then act on the ranker's."""
    mlflow = settings.mlflow.model_copy(update={"registered_model": settings.ranking.registered_model})
    return settings.model_copy(update={"mlflow": mlflow})


def run_rank(settings: Settings, ds: str) -> dict[str, Any]:
    """Train ``ranking.model`` over the retrieval champion of ``ds``, register it in the ranker's
    registry and make it its champion when the two-stage list beats the retriever's own list on the
    same held-out shoppers (the promotion policy's gates, the retriever's list in the champion's place)."""
    from infra.tables import (
        MODEL_RANKER,
        ModelMetrics,
        document_json,
        model_dir,
        read_meta,
        read_metrics,
        write_metrics,
    )
    from training import tracking
    from training.artifacts import load_trained, save_trained, training_dir
    from training.comparison import Measured
    from training.evaluate import evaluate_per_user, evaluate_scores, summarize
    from training.registry import (
        CHAMPION,
        Candidate,
        Decision,
        Policy,
        alias_version,
        carry_out,
        evaluate_gates,
        register,
        registry_lease,
        version_tags,
    )
    from training.train_evaluate import load_views, record_model_run, training_overrides

    name = settings.ranking.model
    if name is not None and not model_class(name).ranker:
        raise ValueError(
            f"ranking.model is {name}, which ranks the whole catalogue itself: name a ranker (awmoe)"
        )
    wh = settings.paths.warehouse_root
    client = tracking.connect(settings)
    retriever_version = alias_version(settings, client, CHAMPION)
    if name is None:
        return {"action": "off", "why": "ranking.model is null: one stage", "champion": retriever_version}
    if retriever_version is None:
        return {
            "action": "skipped",
            "why": f"{settings.mlflow.registered_model} has no @{CHAMPION} to re-rank",
        }
    tags = version_tags(settings, client, retriever_version)
    if tags.get("funnelrec.ds") != ds:
        return {
            "action": "skipped",
            "champion": retriever_version,
            "why": (
                f"the retrieval champion, version {retriever_version}, was trained on {tags.get('funnelrec.ds')}, "
                f"not {ds}: a ranker is trained only over a retriever fitted on the same tables (its labels "
                "are those tables' validation purchases)"
            ),
        }
    retriever_name = tags["funnelrec.model"]
    val_data, data = load_views(training_dir(wh, ds))
    overrides = {**training_overrides(settings, name), "candidates": settings.ranking.candidates}
    seed = settings.seeds.train
    config = {**merged_config(name, overrides), "seed": seed}
    labels = val_data.heldout.get("validation", (np.zeros(0, np.int64),))[0]
    held = holdout_users(labels, model_class(name).Config.model_validate(config).holdout)
    if held.all() or not held.any():
        return {
            "action": "skipped",
            "champion": retriever_version,
            "why": (
                f"{len(labels)} validation purchases in training/ds={ds}: too few to train a ranker and "
                "hold shoppers out for its early stopping and gate"
            ),
        }
    device = settings.training.device
    first, _, _ = load_trained(wh, ds, retriever_name, device, data=val_data)
    final = first if data is val_data else load_trained(wh, ds, retriever_name, device, data=data)[0]
    with (
        stage("rank", ds=ds, model=name, retriever_version=retriever_version) as counts,
        tracking.train_run(settings, ds, name, config, data.manifest, model_class(name).name) as run,
    ):
        fit = fit_ranker(name, first, final, val_data, data, seed, overrides, device=device)
        fit.manifest.update(retriever_version=retriever_version, retriever_ds=ds)
        # The gate: the two-stage list against the retriever's own, on the held-out shoppers.
        policy = dataclasses.replace(Policy.load(settings.mlflow.promotion_policy), floor_model=None)
        batch = settings.training.eval_batch_size
        ranked = fit.validation.model
        mine = Measured(
            evaluate_per_user(
                ranked.context_scorer(fit.stopping), fit.stopping, "validation", batch_size=batch
            )
        )
        theirs = Measured(
            evaluate_per_user(
                first.context_scorer(fit.stopping), fit.stopping, "validation", batch_size=batch
            )
        )
        test = (
            evaluate_scores(fit.final.context_scorer(data), data, "test", batch_size=batch)
            if "test" in data.heldout
            else None
        )
        validation = summarize(mine.per_user)
        # The retriever's own test metrics: what its `evaluate` step wrote, not measured again.
        retriever_test = read_metrics(model_dir(wh, ds, retriever_name)).test
        fit.manifest.update(
            validation={"two_stage": validation, "retriever": summarize(theirs.per_user)},
            test={"two_stage": test, "retriever": retriever_test},
        )
        trained = FitResult(fit.validation, dataclasses.replace(fit.validation, model=fit.final))
        path = save_trained(
            wh, ds, trained, data, seed, run_id=run.info.run_id, documents={MODEL_RANKER: fit.manifest}
        )
        tracking.log_training(
            run.info.run_id, settings, ds, fit.validation.history, document_json(read_meta(path))
        )
        write_metrics(
            model_dir(wh, ds, name),
            ModelMetrics(
                model=name,
                ds=ds,
                eval_mask=data.manifest.eval_mask,
                validation=validation,
                test=test,
            ),
        )
        counts["run_id"] = run.info.run_id
    tracking.log_evaluation(run.info.run_id, {"validation": validation, **({"test": test} if test else {})})
    record_model_run(settings, ds, name)
    rs = ranker_settings(settings)
    version = register(rs, ds, name)
    rclient = tracking.connect(rs)
    for key, value in {
        "funnelrec.retriever_version": str(retriever_version),
        "funnelrec.retriever_model": retriever_name,
    }.items():
        tracking.call(
            rs,
            "tag version",
            lambda k=key, v=value: rclient.set_model_version_tag(
                rs.mlflow.registered_model, str(version), k, v
            ),
        )
    gates = evaluate_gates(policy, "challenge", mine, theirs, None, name)
    with registry_lease(rs, rclient, owner=f"rank-{ds}") as lease:
        before = alias_version(rs, rclient, CHAMPION)
        candidate = Candidate(version, name, "challenge", None, gates)
        chosen = None if candidate.failed else candidate
        if chosen is not None:
            candidate.outcome = "promoted"
        decision = carry_out(
            rs,
            rclient,
            lease,
            ds,
            Decision("refused", version, before, before, gates, [candidate]),
            chosen,
            table=False,
        )
    return {
        "action": decision.action,
        "version": version,
        "champion": retriever_version,
        "ranker_champion": decision.champion_after,
        "summary": decision.summary(),
        "manifest": fit.manifest,
    }
