"""Full-ranking evaluation: the one implementation used by training, benchmarks, MLflow and promotion.

Every user with a held-out purchase is ranked against **all** items; the user's training purchases
(and, for test, validation purchases) are masked out. Settings:

- ``standard``: rank every unmasked item; ground truth = the user's held-out items.
- ``visited``: rank only the user's visited items; users with a visited held-out item; ground truth
  = those items.
- ``unvisited``: rank only items outside the visited set; likewise.
- ``long_tail``: ``standard`` restricted to the 20% of the *evaluated* users (those with a held-out
  item in the split) with the fewest training events.
- ``tail_items``: ``standard`` restricted to held-out purchases of items outside the 20% most
  popular in training (popularity: distinct users with any training behaviour on the item; items
  tied with the last one of the 20% count as popular too).

Metrics for each K: ``HR@K`` (share of users with at least one hit), ``NDCG@K`` (binary gains,
ideal DCG over min(|GT|, K) items) and ``Recall@K`` (hits / |GT|). Beside them, per setting:
``users``, ``candidates`` (the mean number of items ranked per user) and ``chance_HR@K``, the HR@K
a uniformly random ranking of the same candidates would have on average: read a figure against it
(a visited list of five items gives 1.0 at K = 10 by chance alone). A setting without users has
``users`` 0 and every other value ``None`` (null in JSON, not logged to MLflow), never 0.0.

A ground-truth item's rank is its *expected* rank under a random order of ties: the number of
candidates scored strictly higher plus half the other candidates scored equal (a fractional rank;
an item tied with everything sits in the middle). So ties never favour an index order. Users are
processed in batches (no users x items table is ever held), and per-user values are kept in user
order, so results are identical for any batch size.

``evaluate_per_user`` returns each user's values, which promotion compares user by user;
``evaluate_scores`` averages them. Users that a scorer cannot score (``unscorable``: a champion
that never saw them) are counted with every metric 0: a miss, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict, Unpack

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import gammaln

from training.data import TrainingData
from training.metric_names import KS, METRICS, SETTINGS

#: Share of evaluated users in ``long_tail`` and of items counted as popular for ``tail_items``.
TAIL_SHARE = 0.2

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""Scores of a batch of users against all items: LongTensor (B,) -> FloatTensor (B, n_items)."""


@dataclass(frozen=True)
class Truth:
    """Ground truth of one split: per-user lists of held-out items, flattened as CSR."""

    users: np.ndarray  # (U,) sorted user indices with at least one held-out item
    indptr: np.ndarray  # (U+1,)
    items: np.ndarray  # (P,)
    visited: np.ndarray  # (P,) bool

    @classmethod
    def from_pairs(cls, user: np.ndarray, item: np.ndarray, visited: np.ndarray) -> Truth:
        order = np.lexsort((item, user))
        user, item, visited = user[order], item[order], visited[order]
        users, starts = np.unique(user, return_index=True)
        indptr = np.r_[starts, len(user)].astype(np.int64)
        return cls(users, indptr, item.astype(np.int64), visited.astype(bool))


@dataclass(frozen=True)
class PerUser:
    """One setting's per-user values: ``users`` (U,) user indices, ascending; ``values`` (U, 3 * len(ks))
    ordered K-major (HR, NDCG, Recall); ``candidates`` (U,) items ranked; ``chance`` (U, len(ks))
    HR@K of a random ranking."""

    users: np.ndarray
    values: np.ndarray
    candidates: np.ndarray
    chance: np.ndarray

    def metric(self, name: str, k: int, ks: tuple[int, ...]) -> np.ndarray:
        """(U,) values of ``name`` (HR | NDCG | Recall) at ``k``."""
        return self.values[:, 3 * ks.index(k) + METRICS.index(name)]


def gt_ranks(
    scores: torch.Tensor, candidates: torch.Tensor, rows: torch.Tensor, items: torch.Tensor
) -> torch.Tensor:
    """Expected 0-based rank of each ground-truth (row, item) among the row's candidates.

    Args:
        scores: (B, n_items) float scores (``-inf`` allowed: an item the scorer cannot rank).
        candidates: (B, n_items) bool, the items ranked in each row (the ground truth among them).
        rows: (P,) row of each ground-truth pair.
        items: (P,) item index of each pair.

    Returns:
        (P,) float64: candidates scored strictly higher + (candidates scored equal - 1) / 2.
    """
    row_scores, row_cand = scores[rows], candidates[rows]  # (P, n_items)
    s = row_scores.gather(1, items[:, None])  # (P, 1)
    higher = ((row_scores > s) & row_cand).sum(1)
    tied = ((row_scores == s) & row_cand).sum(1)  # the item itself included
    return higher.double() + (tied.double() - 1.0) / 2.0


def chance_hr(n_candidates: np.ndarray, n_gt: np.ndarray, k: int) -> np.ndarray:
    """HR@k of a uniformly random ranking: 1 - C(n - g, k) / C(n, k) per user (1 when n - g < k)."""
    n, g = n_candidates.astype(np.float64), n_gt.astype(np.float64)
    ok = n - g >= k
    log_miss = np.zeros_like(n)
    nn, gg = n[ok], g[ok]
    log_miss[ok] = gammaln(nn - gg + 1) - gammaln(nn - gg - k + 1) - gammaln(nn + 1) + gammaln(nn - k + 1)
    return np.where(ok, 1.0 - np.exp(log_miss), 1.0)


def _user_metrics(ranks: np.ndarray, rows: np.ndarray, n_rows: int, ks: tuple[int, ...]) -> np.ndarray:
    """Per-row metric values, shape (n_rows, len(ks) * 3) ordered K-major: HR, NDCG, Recall."""
    n_gt = np.bincount(rows, minlength=n_rows).astype(np.float64)
    out = np.zeros((n_rows, len(ks) * 3), np.float64)
    gain = 1.0 / np.log2(ranks + 2.0)
    for j, k in enumerate(ks):
        hit = ranks < k
        hits = np.bincount(rows, weights=hit, minlength=n_rows)
        dcg = np.bincount(rows, weights=np.where(hit, gain, 0.0), minlength=n_rows)
        ideal_n = np.minimum(n_gt, k).astype(np.int64)
        idcg_table = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))]
        idcg = idcg_table[ideal_n]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, 3 * j] = hits > 0
            out[:, 3 * j + 1] = np.where(idcg > 0, dcg / idcg, 0.0)
            out[:, 3 * j + 2] = np.where(n_gt > 0, hits / n_gt, 0.0)
    return out


def _rows_dense(m: sp.csr_matrix, users: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(m[users].toarray() > 0).to(device)


def long_tail_users(data: TrainingData, users: np.ndarray, share: float = TAIL_SHARE) -> np.ndarray:
    """The ``share`` of ``users`` with the fewest training events (ties: lower user index), sorted."""
    users = np.asarray(users, np.int64)
    order = np.lexsort((users, data.user_events[users]))
    return np.sort(users[order[: round(share * len(users))]])


def popular_items(data: TrainingData, share: float = TAIL_SHARE) -> np.ndarray:
    """(n_items,) bool: the ``share`` most popular items in training (distinct users with any
    behaviour on the item), plus every item tied with the last of them."""
    popularity = np.asarray((data.union > 0).sum(0)).ravel()
    n_head = round(share * data.n_items)
    if n_head == 0:
        return np.zeros(data.n_items, bool)
    threshold = np.sort(popularity)[::-1][n_head - 1]
    return (popularity >= threshold) & (popularity > 0)


def evaluate_per_user(
    score_fn: ScoreFn,
    data: TrainingData,
    split: str = "test",
    ks: tuple[int, ...] = KS,
    batch_size: int = 1024,
    settings: tuple[str, ...] = SETTINGS,
    device: str | torch.device = "cpu",
    unscorable: np.ndarray | None = None,
) -> dict[str, PerUser]:
    """Each evaluated user's metric values per setting.

    Args:
        score_fn: scores of a batch of users against all items (see ``ScoreFn``).
        data: the training data the split is evaluated on: for ``validation``, the bundle's
            validation view (``load_training_data(root, "validation")``); for ``test``, the full one.
        split: ``validation`` or ``test``.
        ks: cut-offs.
        batch_size: users per scoring call; changes memory and speed, never the results.
        settings: which of ``SETTINGS`` to compute.
        device: where ranking runs.
        unscorable: (n_users,) bool of users counted as misses (every metric 0) whatever their scores.
    """
    data.check_evaluable(split)
    truth = Truth.from_pairs(*data.heldout[split])
    mask = data.mask_for(split)
    in_long_tail = np.zeros(data.n_users, bool)
    in_long_tail[long_tail_users(data, truth.users)] = True
    popular = popular_items(data) if "tail_items" in settings else None
    n_users = len(truth.users)
    width = len(ks) * 3
    per_user = {s: np.zeros((n_users, width)) for s in settings}
    n_cand = {s: np.zeros(n_users, np.int64) for s in settings}
    n_gt = {s: np.zeros(n_users, np.int64) for s in settings}

    for start in range(0, n_users, batch_size):
        stop = min(start + batch_size, n_users)
        users = truth.users[start:stop]
        lo, hi = truth.indptr[start], truth.indptr[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(truth.indptr[start : stop + 1]))
        items, vis = truth.items[lo:hi], truth.visited[lo:hi]
        with torch.no_grad():
            scores = score_fn(torch.from_numpy(users).to(device)).to(device=device, dtype=torch.float32)
        if scores.shape != (len(users), data.n_items):
            raise ValueError(
                f"score_fn returned {tuple(scores.shape)}, expected {(len(users), data.n_items)}"
            )
        if torch.isnan(scores).any():
            raise ValueError("score_fn returned NaN scores")
        unmasked = ~_rows_dense(mask, users, device)
        # A held-out item is always ranked, even if a table lists it among the masked purchases.
        unmasked[torch.from_numpy(rows).to(device), torch.from_numpy(items).to(device)] = True
        visited_rows = (
            _rows_dense(data.visited, users, device) if {"visited", "unvisited"} & set(settings) else None
        )
        dead = unscorable[users] if unscorable is not None else None
        # standard, long_tail and tail_items rank the same candidates: one ranking serves all three.
        every: tuple[np.ndarray, np.ndarray] | None = None

        for setting in settings:
            keep = np.ones(len(items), bool)
            cand = unmasked
            if setting == "visited":
                keep, cand = vis, unmasked & visited_rows
            elif setting == "unvisited":
                keep, cand = ~vis, unmasked & ~visited_rows
            elif setting == "long_tail":
                keep = in_long_tail[users[rows]]
            elif setting == "tail_items":
                keep = ~popular[items]
            if not keep.any():
                continue
            r, it = rows[keep], items[keep]
            if cand is unmasked:
                if every is None:
                    all_ranks = gt_ranks(
                        scores,
                        unmasked,
                        torch.from_numpy(rows).to(device),
                        torch.from_numpy(items).to(device),
                    )
                    every = all_ranks.cpu().numpy(), unmasked.sum(1).cpu().numpy()
                ranks, counts = every[0][keep], every[1]
            else:
                dev_r, dev_it = torch.from_numpy(r).to(device), torch.from_numpy(it).to(device)
                ranks, counts = gt_ranks(scores, cand, dev_r, dev_it).cpu().numpy(), cand.sum(1).cpu().numpy()
            values = _user_metrics(ranks, r, stop - start, ks)
            if dead is not None:
                values[dead] = 0.0
            per_user[setting][start:stop] = values
            n_gt[setting][start:stop] = np.bincount(r, minlength=stop - start)
            n_cand[setting][start:stop] = counts

    out = {}
    for setting in settings:
        has = n_gt[setting] > 0
        chance = np.stack([chance_hr(n_cand[setting][has], n_gt[setting][has], k) for k in ks], axis=1)
        out[setting] = PerUser(
            truth.users[has],
            per_user[setting][has],
            n_cand[setting][has],
            chance.reshape(int(has.sum()), len(ks)),
        )
    return out


def summarize(per_user: dict[str, PerUser], ks: tuple[int, ...] = KS) -> dict[str, dict[str, float | None]]:
    """Means over each setting's users: ``{setting: {"HR@10": ..., "users": n, "candidates": ...,
    "chance_HR@10": ...}}``; ``None`` for every value of a setting without users."""
    out: dict[str, dict[str, float | None]] = {}
    for setting, pu in per_user.items():
        n = len(pu.users)
        metrics: dict[str, float | None] = {}
        mean = pu.values.mean(0) if n else None
        for j, k in enumerate(ks):
            for m, name in enumerate(METRICS):
                metrics[f"{name}@{k}"] = float(mean[3 * j + m]) if n else None
        metrics["users"] = n
        metrics["candidates"] = float(pu.candidates.mean()) if n else None
        for j, k in enumerate(ks):
            metrics[f"chance_HR@{k}"] = float(pu.chance[:, j].mean()) if n else None
        out[setting] = metrics
    return out


class EvalOptions(TypedDict, total=False):
    """``evaluate_per_user``'s keyword arguments, which ``evaluate_scores`` passes on."""

    ks: tuple[int, ...]
    batch_size: int
    settings: tuple[str, ...]
    device: str | torch.device
    unscorable: np.ndarray | None


def evaluate_scores(
    score_fn: ScoreFn, data: TrainingData, split: str = "test", **options: Unpack[EvalOptions]
) -> dict[str, dict[str, float | None]]:
    """Evaluate a scorer on one held-out split (arguments: ``evaluate_per_user``).

    Returns:
        ``{setting: {"HR@10": ..., "NDCG@10": ..., "Recall@10": ..., ..., "users": n,
        "candidates": mean, "chance_HR@10": ...}}`` (see ``summarize``).
    """
    return summarize(evaluate_per_user(score_fn, data, split, **options), options.get("ks", KS))


def flatten(metrics: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """``{"standard": {"HR@10": x}}`` -> ``{"<prefix>standard_HR_at_10": x}`` (MLflow-safe keys)."""
    return {
        f"{prefix}{setting}_{name.replace('@', '_at_')}": value
        for setting, values in metrics.items()
        for name, value in values.items()
    }
