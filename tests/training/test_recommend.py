"""Top-K scoring: tie order, exclusions, and results independent of the batch size."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from training.models import build_model
from training.models.base import Context
from training.recommend import known_purchases, recommend, top_k
from training.trainer import fit_model


def test_top_k_orders_by_score_then_item_index_and_never_keeps_excluded_items():
    inf = float("-inf")
    scores = torch.tensor([[0.5, 0.75, 0.5, 0.5, 0.25], [inf, 0.3, inf, inf, inf]])
    items, values = top_k(scores, 3)
    assert items.tolist() == [[1, 0, 2], [1, -1, -1]]
    assert values[0].tolist() == [0.75, 0.5, 0.5]
    # K larger than the catalogue keeps every item once.
    assert top_k(scores, 10)[0][0].tolist() == [1, 0, 2, 3, 4]


def test_top_k_agrees_with_a_full_sort_on_rows_with_and_without_boundary_ties():
    """The fast path (unique top-k set) and the exact path (ties across the k-th place, rows short
    of k finite scores) must both give the full sort's answer: score descending, item ascending."""
    gen = torch.Generator().manual_seed(7)
    smooth = torch.randn(40, 300, generator=gen)  # ties practically never: the fast path
    coarse = torch.randint(0, 6, (40, 300), generator=gen).float()  # ties everywhere: the exact path
    sparse = torch.full((10, 300), float("-inf"))
    sparse[:, :7] = torch.randint(0, 3, (10, 7), generator=gen).float()  # fewer than k finite
    scores = torch.cat([smooth, coarse, sparse])
    for k in (1, 10, 299, 300):
        items, values = top_k(scores, k)
        for row, got_items, got_values in zip(scores.numpy(), items.numpy(), values.numpy(), strict=True):
            order = np.lexsort((np.arange(len(row)), -row))[:k]
            finite = np.isfinite(row[order])
            expect = np.where(finite, order, -1)
            assert got_items.tolist() == expect.tolist()
            assert np.array_equal(got_values[finite], row[order][finite])


def test_recommendations_do_not_depend_on_the_batch_size(tiny):
    model = fit_model("als_multi", tiny, seed=1, overrides={"train": {"epochs": 2}}).model
    ctx = Context.of_training(tiny, np.arange(tiny.n_users))
    exclude = known_purchases(tiny)
    ref = recommend(model, ctx, exclude, 7, batch_size=tiny.n_users)
    for bs in (1, 5, 33):
        got = recommend(model, ctx, exclude, 7, batch_size=bs)
        assert np.array_equal(got.item_idx, ref.item_idx) and np.array_equal(got.score, ref.score)
    assert np.array_equal(ref.rank[:7], np.arange(1, 8))
    assert not np.asarray(exclude[ref.row, ref.item_idx]).any()
    assert np.array_equal(ref.visited, np.asarray(tiny.visited[ref.row, ref.item_idx]).ravel() > 0)


def test_only_allowed_items_are_recommended_and_unscorable_rows_get_none(tiny):
    model = fit_model("als_multi", tiny, seed=1).model
    ctx = Context.of_training(tiny, np.arange(6))
    ctx.users[2] = -1  # a user the model was not trained on
    allowed = np.zeros(tiny.n_items, bool)
    allowed[::3] = True
    recs = recommend(model, ctx, known_purchases(tiny)[:6], 5, allowed=allowed)
    assert allowed[recs.item_idx].all()
    assert 2 not in set(recs.row) and set(recs.row) == {0, 1, 3, 4, 5}


def test_known_purchases_cover_training_and_every_heldout_split(tiny):
    known = known_purchases(tiny)
    for u, i, _ in tiny.heldout.values():
        assert np.asarray(known[u, i]).all()
    assert (known.multiply(tiny.purchases) != tiny.purchases).nnz == 0
    assert isinstance(known, sp.csr_matrix)


def test_member_explains_each_item_by_the_expert_that_scored_it(tiny):
    model = build_model("member", tiny)
    recs = recommend(model, Context.of_training(tiny, np.arange(10)), known_purchases(tiny)[:10], 5)
    assert set(recs.weights) == {"visited", "unvisited"}
    assert np.array_equal(recs.weights["visited"] == 1.0, recs.visited)
    assert np.array_equal(recs.weights["unvisited"] == 1.0, ~recs.visited)
