"""Metrics against hand-computed examples, batch-size invariance and masking."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from training.data import TrainingData
from training.evaluate import evaluate_scores, flatten


def _data(n_users, n_items, purchases, visited, test, user_events, validation=()):
    def csr(pairs):
        pairs = list(pairs)
        u = np.array([p[0] for p in pairs], int)
        i = np.array([p[1] for p in pairs], int)
        return sp.csr_matrix((np.ones(len(pairs), np.float32), (u, i)), shape=(n_users, n_items))

    def held(rows):
        rows = list(rows)
        return (
            np.array([r[0] for r in rows], np.int64),
            np.array([r[1] for r in rows], np.int64),
            np.array([r[2] for r in rows], bool),
        )

    heldout = {"test": held(test)}
    if validation:
        heldout["validation"] = held(validation)
    return TrainingData(
        Path("."),
        n_users,
        n_items,
        ["view", "purchase"],
        {"purchase": csr(purchases), "view": csr(visited)},
        csr(visited),
        heldout,
        {},
        np.array(user_events),
    )


# user 0: bought item 0 (masked), visited {1, 2}, test items 1 (visited) and 4 (unvisited)
# user 1: nothing in training, test item 5, every score tied
# user 2: no held-out purchase (not evaluated)
HAND = _data(
    3,
    6,
    purchases=[(0, 0)],
    visited=[(0, 1), (0, 2)],
    test=[(0, 1, True), (0, 4, False), (1, 5, False)],
    user_events=[3, 0, 1],
)
HAND_SCORES = torch.tensor([[9, 5, 7, 1, 5, 0], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]], dtype=torch.float32)


def hand_fn(users):
    return HAND_SCORES[users]


L2 = {r: 1 / math.log2(r + 2) for r in range(10)}  # gain at 0-based rank r


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_hand_computed_metrics_with_ties_masks_and_several_items(batch_size):
    m = evaluate_scores(hand_fn, HAND, "test", ks=(1, 2, 3, 10), batch_size=batch_size)
    std = m["standard"]
    # user 0: item 0 (score 9) is a training purchase and is masked; ranks: item2 7 | item1 5 | item4 5
    # (tie broken by index) -> item1 rank 1, item4 rank 2. user 1: all tied -> item5 rank 5.
    assert std["users"] == 2
    assert std["HR@1"] == 0.0
    assert std["HR@2"] == pytest.approx(0.5)
    assert std["NDCG@2"] == pytest.approx((L2[1] / (L2[0] + L2[1])) / 2)
    assert std["NDCG@3"] == pytest.approx(((L2[1] + L2[2]) / (L2[0] + L2[1])) / 2)
    assert std["Recall@2"] == pytest.approx(0.25)
    assert std["Recall@3"] == pytest.approx(0.5)
    # K larger than the catalogue left after masking: user 1's item is found at rank 5.
    assert std["HR@10"] == 1.0
    assert std["NDCG@10"] == pytest.approx((((L2[1] + L2[2]) / (L2[0] + L2[1])) + L2[5]) / 2)

    vis = m["visited"]  # only user 0 has a visited test item; candidates {1, 2}
    assert vis["users"] == 1 and vis["HR@1"] == 0.0 and vis["HR@2"] == 1.0
    assert vis["NDCG@2"] == pytest.approx(L2[1])
    unv = m["unvisited"]  # user 0 ranks {3, 4, 5}: item4 first; user 1 ranks all: item5 at 5
    assert unv["users"] == 2 and unv["HR@1"] == pytest.approx(0.5) and unv["NDCG@1"] == pytest.approx(0.5)
    assert unv["HR@10"] == 1.0
    lt = m["long_tail"]  # round(0.2 * 3) = 1 user with the fewest training events: user 1
    assert lt["users"] == 1 and lt["HR@3"] == 0.0 and lt["HR@10"] == 1.0


def test_masked_training_purchases_never_count_as_hits():
    # The model puts the already-bought item first; it must not push the held-out item down.
    d = _data(1, 4, purchases=[(0, 3)], visited=[], test=[(0, 2, False)], user_events=[1])
    m = evaluate_scores(lambda u: torch.tensor([[0.0, 1.0, 5.0, 9.0]]), d, "test", ks=(1,))
    assert m["standard"]["HR@1"] == 1.0


def test_test_split_also_masks_validation_purchases():
    d = _data(
        1, 4, purchases=[], visited=[], test=[(0, 2, False)], user_events=[1], validation=[(0, 3, False)]
    )
    scores = lambda u: torch.tensor([[0.0, 1.0, 5.0, 9.0]])  # noqa: E731
    assert evaluate_scores(scores, d, "test", ks=(1,))["standard"]["HR@1"] == 1.0
    assert evaluate_scores(scores, d, "validation", ks=(1,))["standard"]["HR@1"] == 1.0  # item 3 is the truth


def test_results_identical_for_any_batch_size():
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 80
    purchases = {
        (u, i) for u, i in zip(rng.integers(0, n_users, 600), rng.integers(0, n_items, 600), strict=True)
    }
    visited = {
        (u, i) for u, i in zip(rng.integers(0, n_users, 2000), rng.integers(0, n_items, 2000), strict=True)
    }
    test = []
    for u in range(0, n_users, 2):
        for i in rng.choice(n_items, rng.integers(1, 4), replace=False):
            if (u, i) not in purchases:
                test.append((u, int(i), (u, int(i)) in visited))
    d = _data(n_users, n_items, purchases, visited, test, rng.integers(0, 50, n_users).tolist())
    table = torch.from_numpy(np.round(rng.normal(size=(n_users, n_items)), 1).astype(np.float32))  # many ties
    fn = lambda u: table[u]  # noqa: E731
    results = [flatten(evaluate_scores(fn, d, "test", batch_size=b)) for b in (1, 7, 64, 10_000)]
    assert all(r == results[0] for r in results[1:])
    assert results[0]["standard_users"] == len({t[0] for t in test})
