"""Same-data comparison: any registered version measured on a date's held-out split, user by user.

Promotion compares the champion and each challenger on the *same* held-out purchases: those of the
challenger's date. ``measure_version`` loads a version from the registry (its logged model and the
training tables it was trained on), scores the date's users through its own id maps *from the
date's context* (the date's visited sets gate MEMBER's experts, as they will when it serves that
date), and runs the one evaluator on the date's split with that split's mask:

- for ``validation`` it scores with the version's *validation fit*, which never saw anything at or
  after its own date's validation window; a later date's validation window starts no earlier, so
  an older champion has not seen those purchases either (``training/README.md``); for ``test`` it
  scores with the refit;
- users of the date the version cannot score (``can_score``: for most models, users it never saw)
  are counted as misses (every metric 0), never dropped;
- items of the date the version never saw get ``-inf`` (ranked last, tied among themselves).

On its own date the maps are the identity and the result equals the version's logged metrics.
``paired`` turns two versions' per-user values into the paired statistics the gates read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from training.data import TrainingData, ids, load_training_data
from training.evaluate import KS, PerUser, ScoreFn, evaluate_per_user
from training.models.base import Context
from training.sequences import NO_TIME


@dataclass(frozen=True)
class Measured:
    """One version's per-user values on a date's split, per setting (``evaluate_per_user``)."""

    per_user: dict[str, PerUser]
    ks: tuple[int, ...] = KS

    def values(self, setting: str, metric: str) -> np.ndarray | None:
        """(U,) values of ``metric`` (``NDCG_at_20``) in ``setting``; None if not computed."""
        name, _, k = metric.partition("_at_")
        pu = self.per_user.get(setting)
        if pu is None or not k.isdigit() or int(k) not in self.ks or name not in ("HR", "NDCG", "Recall"):
            return None
        return pu.metric(name, int(k), self.ks)


def _index_map(src_ids: np.ndarray, dst_ids: np.ndarray) -> np.ndarray:
    """For each id of ``src_ids``, its position in ``dst_ids`` (-1 when absent)."""
    import pandas as pd

    return pd.Index(dst_ids).get_indexer(src_ids).astype(np.int64)


def mapped_scorer(model, own_tables: Path, target: TrainingData) -> tuple[ScoreFn, np.ndarray]:
    """A scorer of the target bundle's users over its items, backed by ``model`` (trained on
    ``own_tables``) scoring each user from the target's context (its visited sets and events,
    mapped into the model's ids), and the target users it cannot score ((n_target_users,) bool)."""
    own_users, own_items = ids(own_tables, "user"), ids(own_tables, "item")
    tgt_users, tgt_items = ids(target.root, "user"), ids(target.root, "item")
    user_to_own = _index_map(tgt_users, own_users)  # target user idx -> own idx (-1: unknown)
    item_to_own = _index_map(tgt_items, own_items)  # target item idx -> own idx (-1: unknown)
    identity = np.array_equal(user_to_own, np.arange(len(own_users))) and np.array_equal(
        item_to_own, np.arange(len(own_items))
    )
    if identity:
        everyone = Context.of_training(target, np.arange(target.n_users), model.history_length)
        return model.context_scorer(target), ~model.can_score(everyone.to(model.device)).cpu().numpy()
    known_items = torch.from_numpy(np.flatnonzero(item_to_own >= 0))
    own_cols = torch.from_numpy(item_to_own[item_to_own >= 0])

    def context(users: np.ndarray) -> Context:
        vis = target.visited[users].tocoo()
        keep = item_to_own[vis.col] >= 0
        visited = sp.csr_matrix(
            (vis.data[keep], (vis.row[keep], item_to_own[vis.col[keep]])), shape=(len(users), len(own_items))
        )
        items, behaviors, times = target.history(users, model.history_length)
        items = np.where(items >= 0, item_to_own[np.maximum(items, 0)], -1)
        behaviors[items < 0] = -1
        times[items < 0] = NO_TIME
        return Context(
            torch.from_numpy(user_to_own[users]),
            visited,
            torch.from_numpy(items),
            torch.from_numpy(behaviors),
            torch.from_numpy(times),
        ).to(model.device)

    unscorable = ~model.can_score(context(np.arange(target.n_users))).cpu().numpy()

    def score(users: torch.Tensor) -> torch.Tensor:
        ctx = context(users.cpu().numpy())
        out = torch.full((len(users), len(tgt_items)), float("-inf"), device=users.device)
        s = model.scores(ctx).to(users.device, torch.float32)
        out[:, known_items.to(users.device)] = s[:, own_cols.to(users.device)]
        out[~model.can_score(ctx).to(users.device)] = 0.0  # counted as misses by the evaluator
        return out

    return score, unscorable


def measure(
    model,
    own_tables: Path,
    target: TrainingData,
    split: str,
    batch_size: int = 2048,
    device: str | torch.device = "cpu",
) -> Measured:
    """``model`` (trained on ``own_tables``) on ``target``'s ``split``, per user."""
    fn, unscorable = mapped_scorer(model, Path(own_tables), target)
    return Measured(
        evaluate_per_user(fn, target, split, batch_size=batch_size, device=device, unscorable=unscorable)
    )


def measure_model_dir(
    model_dir: Path, own_tables: Path, target: TrainingData, split: str, batch_size: int = 2048
) -> Measured:
    """The model saved in ``model_dir`` (its validation fit for ``validation``, its refit for
    ``test``) on ``target``'s ``split``."""
    from training.artifacts import load_model_dir

    view = "validation" if split == "validation" else "full"
    own = load_training_data(own_tables, view)
    model = load_model_dir(model_dir, own)
    return measure(model, own_tables, target, split, batch_size, model.device)


@dataclass(frozen=True)
class Paired:
    """Two versions on the same users: means, relative change and its bootstrap interval."""

    users: int
    mine: float
    theirs: float
    relative_change: float | None  # mine / theirs - 1; None when theirs is 0
    diff_low: float
    diff_high: float
    change_low: float | None
    change_high: float | None
    level: float


def paired(
    mine: np.ndarray, theirs: np.ndarray, seed: int, resamples: int = 1000, level: float = 0.9
) -> Paired:
    """Paired statistics of per-user values on the same users, with a seeded percentile bootstrap
    (users resampled with replacement) of the mean difference and of the relative change."""
    mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
    if mine.shape != theirs.shape:
        raise ValueError(f"paired values must cover the same users: {mine.shape} vs {theirs.shape}")
    n = len(mine)
    if n == 0:
        raise ValueError("no users to compare")
    rng = np.random.default_rng(seed)
    diffs, changes = np.empty(resamples), np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # resample indices in blocks of about 16 MB
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, n, (stop - start, n))
        m, t = mine[idx].mean(1), theirs[idx].mean(1)
        diffs[start:stop] = m - t
        with np.errstate(divide="ignore", invalid="ignore"):
            changes[start:stop] = np.where(t > 0, m / t - 1.0, np.nan)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    theirs_mean, mine_mean = float(theirs.mean()), float(mine.mean())
    finite = changes[np.isfinite(changes)]
    c_lo, c_hi = np.percentile(finite, [tail, 100 - tail]) if len(finite) else (None, None)
    return Paired(
        users=n,
        mine=mine_mean,
        theirs=theirs_mean,
        relative_change=mine_mean / theirs_mean - 1.0 if theirs_mean > 0 else None,
        diff_low=float(lo),
        diff_high=float(hi),
        change_low=None if c_lo is None else float(c_lo),
        change_high=None if c_hi is None else float(c_hi),
        level=level,
    )
