"""Full-ranking evaluation: the one implementation used by training, benchmarks, MLflow and promotion.

Every user with a held-out purchase is ranked against **all** items; the user's training purchases
(and, for test, validation purchases) are masked out. Settings:

- ``standard``: rank every unmasked item; ground truth = the user's held-out items.
- ``visited``: rank only the user's visited items; users with a visited held-out item; ground truth
  = those items.
- ``unvisited``: rank only items outside the visited set; likewise.
- ``long_tail``: ``standard`` restricted to the 20% of users with the fewest training events.

Metrics for each K: ``HR@K`` (share of users with at least one hit), ``NDCG@K`` (binary gains,
ideal DCG over min(|GT|, K) items) and ``Recall@K`` (hits / |GT|).

A ground-truth item's rank is the number of candidates scored strictly higher plus the number
scored equal with a smaller item index: ties are broken by item index, never by the order a top-K
kernel happens to return. Users are processed in batches (no users x items table is ever held), and
per-user values are summed once at the end in user order, so results are identical for any batch
size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from training.data import TrainingData

KS: tuple[int, ...] = (10, 20, 50)
SETTINGS: tuple[str, ...] = ("standard", "visited", "unvisited", "long_tail")
METRICS: tuple[str, ...] = ("HR", "NDCG", "Recall")

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


def gt_ranks(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of each ground-truth (row, item) among the row's scores, ties by item index.

    Args:
        scores: (B, n_items); excluded items must be ``-inf``.
        rows: (P,) row of each ground-truth pair in ``scores``.
        items: (P,) item index of each pair.
    """
    row_scores = scores[rows]  # (P, n_items)
    s = row_scores.gather(1, items[:, None])  # (P, 1)
    higher = (row_scores > s).sum(1)
    idx = torch.arange(scores.shape[1], device=scores.device)
    tied_before = ((row_scores == s) & (idx[None, :] < items[:, None])).sum(1)
    return higher + tied_before


def _user_metrics(ranks: np.ndarray, rows: np.ndarray, n_rows: int, ks: tuple[int, ...]) -> np.ndarray:
    """Per-user metric values, shape (n_rows, len(ks) * 3) ordered K-major: HR, NDCG, Recall."""
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


def evaluate_scores(
    score_fn: ScoreFn,
    data: TrainingData,
    split: str = "test",
    ks: tuple[int, ...] = KS,
    batch_size: int = 1024,
    settings: tuple[str, ...] = SETTINGS,
    device: str | torch.device = "cpu",
    long_tail_share: float = 0.2,
) -> dict[str, dict[str, float]]:
    """Evaluate a scorer on one held-out split.

    Args:
        score_fn: scores of a batch of users against all items (see ``ScoreFn``).
        data: the training bundle (held-out pairs, masks, visited sets).
        split: ``validation`` or ``test``.
        ks: cut-offs.
        batch_size: users per scoring call; changes memory and speed, never the results.
        settings: which of ``SETTINGS`` to compute.
        device: where ranking runs.
        long_tail_share: share of users (fewest training events) in the ``long_tail`` setting.

    Returns:
        ``{setting: {"HR@10": ..., "NDCG@10": ..., "Recall@10": ..., ..., "users": n}}``.
    """
    if split not in data.heldout:
        raise ValueError(f"no held-out pairs for split {split!r}; have {sorted(data.heldout)}")
    truth = Truth.from_pairs(*data.heldout[split])
    mask = data.mask_for(split)
    long_tail = np.zeros(data.n_users, bool)
    long_tail[data.long_tail_users(long_tail_share)] = True
    n_users = len(truth.users)
    per_user = {s: np.zeros((n_users, len(ks) * 3)) for s in settings}
    counted = {s: np.zeros(n_users, bool) for s in settings}

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
        scores = scores.masked_fill(_rows_dense(mask, users, device), float("-inf"))
        visited_rows = (
            _rows_dense(data.visited, users, device) if {"visited", "unvisited"} & set(settings) else None
        )

        for setting in settings:
            keep = np.ones(len(items), bool)
            s = scores
            if setting == "visited":
                keep = vis
                s = scores.masked_fill(~visited_rows, float("-inf"))
            elif setting == "unvisited":
                keep = ~vis
                s = scores.masked_fill(visited_rows, float("-inf"))
            elif setting == "long_tail":
                keep = long_tail[users[rows]]
            if not keep.any():
                continue
            r, it = rows[keep], items[keep]
            ranks = gt_ranks(s, torch.from_numpy(r).to(device), torch.from_numpy(it).to(device)).cpu().numpy()
            values = _user_metrics(ranks.astype(np.float64), r, stop - start, ks)
            has = np.bincount(r, minlength=stop - start) > 0
            per_user[setting][start:stop] = values
            counted[setting][start:stop] = has

    out: dict[str, dict[str, float]] = {}
    for setting in settings:
        n = int(counted[setting].sum())
        total = per_user[setting][counted[setting]].sum(0) if n else np.zeros(len(ks) * 3)
        metrics = {}
        for j, k in enumerate(ks):
            for m, name in enumerate(METRICS):
                metrics[f"{name}@{k}"] = float(total[3 * j + m] / n) if n else 0.0
        metrics["users"] = n
        out[setting] = metrics
    return out


def flatten(metrics: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """``{"standard": {"HR@10": x}}`` -> ``{"<prefix>standard_HR_at_10": x}`` (MLflow-safe keys)."""
    return {
        f"{prefix}{setting}_{name.replace('@', '_at_')}": value
        for setting, values in metrics.items()
        for name, value in values.items()
    }
