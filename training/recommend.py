"""Top-K recommendations of a trained model: the one scoring function behind the MLflow pyfunc,
the batched ``score`` path and the Spark path (which calls the pyfunc on executors).

Every call ranks a batch of users, each in its ``Context`` (as of the scoring date), against every
allowed item (the date's catalogue), excludes each user's purchases, and keeps the top K with ties
broken by item index (the evaluator's rule), so results do not
depend on the batch size, the device or which path produced them. No users x items table is held
beyond one batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from training.data import TrainingData
from training.models.base import Context, Recommender


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row, ordered by score then item index; ``-inf`` entries are never kept.

    Returns ``(items, values)``, both (B, k'), k' = min(k, n_items); a row with fewer than k'
    finite scores is padded with item -1 and value ``-inf``.
    """
    n = scores.shape[1]
    k = min(k, n)
    if k == 0:
        empty = torch.empty((scores.shape[0], 0), device=scores.device)
        return empty.long(), empty
    # One top-(k+1): where the k-th best beats the (k+1)-th the top-k set is unique and only its
    # order needs the tie rule, on (B, k). Rows tied across the boundary (rare with real scores,
    # but every row short of k finite scores) take the exact path, which scans the whole row.
    values, items = scores.topk(min(k + 1, n), dim=1)
    clear = values[:, k - 1] > values[:, k] if k < n else torch.ones_like(values[:, 0], dtype=torch.bool)
    items, values = _by_score_then_index(items[:, :k], values[:, :k])
    if not bool(clear.all()):
        rows = (~clear).nonzero()[:, 0]
        items[rows], values[rows] = _top_k_exact(scores[rows], k)
    items = torch.where(torch.isfinite(values), items, torch.full_like(items, -1))
    return items, values


def _by_score_then_index(items: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    items, perm = items.sort(dim=1)
    values = values.gather(1, perm)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return items.gather(1, order), values.gather(1, order)


def _top_k_exact(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    kth = scores.topk(k, dim=1).values[:, -1:]  # (B, 1) the k-th best score
    above = scores > kth
    tied = scores == kth
    # Among items tied with the k-th score keep the smallest indices: exactly k per row.
    room = k - above.sum(1, keepdim=True)
    keep = above | (tied & (tied.cumsum(1) <= room))
    items = keep.nonzero()[:, 1].view(-1, k)  # ascending item index within each row
    return _by_score_then_index(items, scores.gather(1, items))


@dataclass
class Recommendations:
    """Flat top-K rows (one per context row and rank) in index space; ``row`` indexes the context."""

    row: np.ndarray
    rank: np.ndarray
    item_idx: np.ndarray
    score: np.ndarray
    visited: np.ndarray
    weights: dict[str, np.ndarray]
    #: ``model.details`` -> (rows,) values (NaN where a row has none).
    details: dict[str, np.ndarray] = field(default_factory=dict)


def known_purchases(data: TrainingData) -> sp.csr_matrix:
    """Every purchase the bundle knows: training purchases plus all held-out ones."""
    out = data.purchases.copy().astype(np.float32)
    for u, i, _ in data.heldout.values():
        out = out + sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=out.shape)
    out = out.tocsr()
    out.data[:] = 1.0
    return out


#: Batches are padded to at least this many rows: BLAS takes a different (differently rounded) path
#: for tiny matrices (MKL: fewer than 12 rows), and a user's scores must not depend on how many
#: other users share its batch, or the pyfunc, the batched path and the Spark path could disagree.
MIN_ROWS = 16


def _scores(model: Recommender, context: Context) -> torch.Tensor:
    n = len(context)
    if n < MIN_ROWS:
        # Copies of row 0 after the n rows.
        context = context.rows(np.r_[np.arange(n), np.zeros(MIN_ROWS - n, np.int64)])
    out = model.scores(context)[:n].float()
    # Masked in place below: a broadcast or strided view must become its own tensor first.
    return out if out.is_contiguous() else out.clone()


@torch.no_grad()
def recommend(
    model: Recommender,
    context: Context,
    exclude: sp.csr_matrix,
    k: int,
    batch_size: int = 4096,
    allowed: np.ndarray | None = None,
) -> Recommendations:
    """Top-``k`` items for each row of ``context`` that the model can score (``can_score``), in row
    order; ``exclude`` (one row per context row) masked, and only ``allowed`` items ((n_items,) bool,
    None = all) ranked. A row with fewer than ``k`` rankable items gets fewer rows."""
    dev = model.device
    barred = None if allowed is None else torch.as_tensor(~np.asarray(allowed, bool), device=dev)
    parts: list[tuple] = []
    for start in range(0, len(context), batch_size):
        ctx = context.rows(slice(start, start + batch_size)).to(dev)
        ctx.exclude = exclude[start : start + batch_size]
        scores = _scores(model, ctx)
        ex = ctx.exclude.tocoo()
        if ex.nnz:
            rows = torch.as_tensor(ex.row, dtype=torch.long, device=dev)
            cols = torch.as_tensor(ex.col, dtype=torch.long, device=dev)
            scores[rows, cols] = float("-inf")
        if barred is not None:
            scores[:, barred] = float("-inf")
        items, values = top_k(scores, k)
        valid = (items >= 0) & model.can_score(ctx).to(dev)[:, None]
        local = torch.arange(len(ctx), device=dev)[:, None].expand_as(items)[valid]
        flat_items = items[valid]
        ranks = (torch.arange(items.shape[1], device=dev)[None, :].expand_as(items) + 1)[valid]
        why = model.explain(ctx, local, flat_items)
        parts.append(
            (
                local.cpu().numpy() + start,
                ranks.cpu().numpy(),
                flat_items.cpu().numpy(),
                values[valid].double().cpu().numpy(),
                why["visited"].cpu().numpy().astype(bool),
                {e: why[f"w_{e}"].float().cpu().numpy() for e in model.experts},
                {d: why[d].double().cpu().numpy() for d in model.details},
            )
        )
    if not parts:
        z = np.zeros(0, np.int64)
        return Recommendations(
            z,
            z,
            z,
            np.zeros(0),
            np.zeros(0, bool),
            {e: np.zeros(0) for e in model.experts},
            {d: np.zeros(0) for d in model.details},
        )
    return Recommendations(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
        np.concatenate([p[3] for p in parts]),
        np.concatenate([p[4] for p in parts]),
        {e: np.concatenate([p[5][e] for p in parts]) for e in model.experts},
        {d: np.concatenate([p[6][d] for p in parts]) for d in model.details},
    )


def to_frame(recs: Recommendations, user_ids: np.ndarray, item_ids: np.ndarray) -> pd.DataFrame:
    """Index space -> the pyfunc's output rows (``infra.tables.SCORES_PREDICTED``): ``user_ids`` per
    context row, ``item_ids`` per model item."""
    experts = list(recs.weights)
    if experts:
        w = np.stack([recs.weights[e] for e in experts], axis=1)
        expert = np.asarray(experts, dtype=object)[w.argmax(1)]
        weights = [json.dumps(dict(zip(experts, map(float, row), strict=True))) for row in w]
    else:
        expert = np.full(len(recs.rank), None, dtype=object)
        weights = ["{}"] * len(recs.rank)
    return pd.DataFrame(
        {
            "user_id": user_ids[recs.row],
            "rank": recs.rank.astype(np.int64),
            "item_id": item_ids[recs.item_idx],
            "score": recs.score.astype(np.float64),
            "item_type": np.where(recs.visited, "visited", "unvisited"),
            "expert": expert,
            "expert_weights": weights,
            **{name: _detail(recs, name) for name in DETAIL_COLUMNS},
        }
    )


#: The ``SCORES_PREDICTED`` columns a model's ``details`` fill (null for models without them).
DETAIL_COLUMNS = ("retriever_rank", "retriever_score", "ranker_score")


def _detail(recs: Recommendations, name: str) -> np.ndarray:
    values = recs.details.get(name)
    out = np.full(len(recs.rank), None, dtype=object)
    if values is not None:
        known = ~np.isnan(values)
        cast = int if name == "retriever_rank" else float
        out[known] = [cast(v) for v in values[known]]
    return out
