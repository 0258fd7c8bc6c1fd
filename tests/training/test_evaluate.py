"""Metrics against hand-computed examples, batch-size invariance and masking."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from infra.tables import FRAMES_BUNDLE, REFIT, TrainingManifest
from training.data import TrainingData
from training.evaluate import (
    chance_hr,
    evaluate_per_user,
    evaluate_scores,
    flatten,
    gt_ranks,
    long_tail_users,
    popular_items,
)


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
        None,
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


def G(rank: float) -> float:  # gain at a (possibly fractional) 0-based rank
    return 1 / math.log2(rank + 2)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_hand_computed_metrics_with_ties_masks_and_several_items(batch_size):
    m = evaluate_scores(hand_fn, HAND, "test", ks=(1, 2, 3, 10), batch_size=batch_size)
    std = m["standard"]
    # user 0: item 0 (score 9) is a training purchase and is masked; item2 7 | item1 5 = item4 5:
    # items 1 and 4 share ranks 1 and 2, so each has the expected rank 1.5.
    # user 1: all six scores tied -> item 5 has the expected rank (6 - 1) / 2 = 2.5.
    assert std["users"] == 2
    assert std["HR@1"] == 0.0
    assert std["HR@2"] == pytest.approx(0.5)
    assert std["NDCG@2"] == pytest.approx((2 * G(1.5) / (L2[0] + L2[1])) / 2)
    assert std["Recall@2"] == pytest.approx(0.5)
    assert std["HR@3"] == 1.0
    assert std["NDCG@3"] == pytest.approx((2 * G(1.5) / (L2[0] + L2[1]) + G(2.5)) / 2)
    assert std["candidates"] == pytest.approx((5 + 6) / 2)

    vis = m["visited"]  # only user 0 has a visited test item; candidates {1, 2}
    assert vis["users"] == 1 and vis["HR@1"] == 0.0 and vis["HR@2"] == 1.0
    assert vis["NDCG@2"] == pytest.approx(L2[1])
    assert vis["candidates"] == 2 and vis["chance_HR@1"] == pytest.approx(0.5) and vis["chance_HR@2"] == 1.0
    unv = m["unvisited"]  # user 0 ranks {3, 4, 5}: item4 first; user 1 ranks all six, tied
    assert unv["users"] == 2 and unv["HR@1"] == pytest.approx(0.5) and unv["NDCG@1"] == pytest.approx(0.5)
    assert unv["HR@10"] == 1.0
    # chance of HR@1: user 0 has 1 of 3 candidates, user 1 one of 6
    assert unv["chance_HR@1"] == pytest.approx((1 / 3 + 1 / 6) / 2)
    # 20% of two evaluated users is nobody: the setting is empty, and says so with None, not 0.0.
    lt = m["long_tail"]
    assert lt["users"] == 0 and lt["HR@10"] is None and lt["candidates"] is None


def test_expected_rank_under_ties_by_hand():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, float("-inf")]])
    cand = torch.tensor([[True, True, True, True, True, False]])
    rows, items = torch.tensor([0, 0, 0]), torch.tensor([0, 2, 4])
    # item 0 first; items 1-3 share ranks 1..3 (expected 2); item 4 after them; item 5 is no candidate.
    assert gt_ranks(scores, cand, rows, items).tolist() == [0.0, 2.0, 4.0]
    # The order of the tied items' indices changes nothing: item 3 has the same expected rank as item 1.
    assert gt_ranks(scores, cand, torch.tensor([0, 0]), torch.tensor([1, 3])).tolist() == [2.0, 2.0]


def test_chance_levels_by_hand():
    # 10 candidates, 2 of them relevant, top 3: 1 - C(8, 3) / C(10, 3) = 1 - 56 / 120
    assert chance_hr(np.array([10]), np.array([2]), 3)[0] == pytest.approx(1 - 56 / 120)
    # fewer candidates than K: a random list always hits
    assert chance_hr(np.array([5]), np.array([1]), 10)[0] == 1.0
    assert chance_hr(np.array([20]), np.array([1]), 10)[0] == pytest.approx(0.5)


def test_long_tail_is_a_share_of_the_evaluated_users_and_tail_items_the_unpopular_items():
    # 10 users, 10 items. Users 0-4 are evaluated; their training events 5, 1, 4, 2, 3: the 20% of
    # the evaluated users with the fewest events is user 1 (users 5-9, with fewer events, are not
    # evaluated). Item popularity: item 0 is touched by 6 users, item 1 by 4, items 2-9 by nobody
    # but user 5 on item 2: the 20% most popular items are 0 and 1.
    purchases = [(u, 0) for u in range(5, 10)] + [(6, 1), (7, 1), (8, 1)]
    visited = [(0, 0), (5, 1), (5, 2)]
    test = [(0, 1, False), (1, 2, False), (2, 0, False), (3, 5, False), (4, 1, False)]
    d = _data(10, 10, purchases, visited, test, [5, 1, 4, 2, 3, 0, 0, 0, 0, 0])
    m = evaluate_per_user(lambda u: torch.zeros(len(u), 10), d, "test", ks=(10,))
    assert m["long_tail"].users.tolist() == [1]
    assert m["tail_items"].users.tolist() == [1, 3]  # their held-out items 2 and 5 are not popular
    assert popular_items(d).nonzero()[0].tolist() == [0, 1]
    assert long_tail_users(d, np.arange(5)).tolist() == [1]


def test_unscorable_users_are_counted_as_misses():
    d = _data(2, 4, purchases=[], visited=[], test=[(0, 2, False), (1, 2, False)], user_events=[1, 1])
    fn = lambda u: torch.tensor([[0.0, 1.0, 5.0, 3.0]]).expand(len(u), -1)  # noqa: E731
    assert evaluate_scores(fn, d, "test", ks=(1,))["standard"]["HR@1"] == 1.0
    m = evaluate_scores(fn, d, "test", ks=(1,), unscorable=np.array([False, True]))["standard"]
    assert m["users"] == 2 and m["HR@1"] == 0.5


def test_a_refit_bundle_refuses_the_wrong_view():
    d = _data(
        1, 4, purchases=[], visited=[], test=[(0, 2, False)], user_events=[1], validation=[(0, 3, False)]
    )
    d.manifest = TrainingManifest(ds="t", kind=FRAMES_BUNDLE, protocol="test", validation_design=REFIT)
    fn = lambda u: torch.zeros(len(u), 4)  # noqa: E731
    evaluate_scores(fn, d, "test", ks=(1,))
    with pytest.raises(ValueError, match="validation view"):
        evaluate_scores(fn, d, "validation", ks=(1,))


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
    # long_tail is standard restricted to some users: their values are their standard values.
    pu = evaluate_per_user(fn, d, "test", batch_size=7)
    tail, std = pu["long_tail"], pu["standard"]
    assert 0 < len(tail.users) < len(std.users)
    np.testing.assert_array_equal(tail.values, std.values[np.searchsorted(std.users, tail.users)])
