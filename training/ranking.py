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
    manifest: dict[str, Any]


def fit_ranker(
    name: str,
    retriever: FitResult,
    validation_data: TrainingData,
    full_data: TrainingData,
    seed: int,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    progress: bool | None = None,
) -> RankerFit:
    """Train ranker ``name`` on the validation purchases over ``retriever.validation``'s candidates,
    early-stopped on the held-out shoppers; return it over ``retriever.final`` too."""
    cls = model_class(name)
    if not cls.ranker:
        raise ValueError(f"{name} is not a ranker")
    first = retriever.validation.model
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
    stopping = with_heldout(
        validation_data, {"validation": tuple(x[held] for x in validation_data.heldout["validation"])}
    )
    seed_everything(seed)
    model = cls(stopping, config, retriever=first, labels=(users[~held], items[~held]))
    result = train(model, stopping, seed, None, device, progress)
    ex = model.examples()
    final = (
        on_retriever(result.model, retriever.final.model, full_data) if retriever.refitted else result.model
    )
    manifest = {
        "ranker": name,
        "retriever": first.name,
        "labels": f"validation held-out {PURCHASE}s",
        "label_users": int((~held).sum()),
        "examples": len(ex["users"]),
        "candidate_recall": float(ex["recall"]),
        "early_stopping_users": int(held.sum()),
        "label_leaks": leaks,  # None: no times to check with
        "trained_over": "the retriever's validation fit (validation view)",
        "tested_over": "the retriever's refit (full view)" if retriever.refitted else "the same fit",
    }
    return RankerFit(result, final, manifest)
