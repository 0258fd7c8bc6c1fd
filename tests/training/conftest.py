"""A tiny multi-behaviour fixture built in memory: users browse items in their favourite category,
buy some of what they viewed (visited) and a few things they never viewed (unvisited)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from infra.tables import BEHAVIORS
from training.data import TrainingData
from training.sequences import EventLog

T0 = 1_700_000_000


def tiny_data(seed: int = 0, n_users: int = 80, n_items: int = 50) -> TrainingData:
    rng = np.random.default_rng(seed)
    cats = np.arange(n_items) % 5
    views, carts, buys, test, val = set(), set(), set(), [], []
    sequences = []  # per user: (item, funnel position) in time order
    for u in range(n_users):
        fav = u % 5
        pool = np.flatnonzero(cats == fav)
        seen = rng.choice(pool, 6, replace=False)
        views |= {(u, int(i)) for i in seen}
        carts |= {(u, int(i)) for i in seen[:2]}
        bought = [int(seen[0]), int(seen[1])]
        buys |= {(u, i) for i in bought}
        cart, buy = BEHAVIORS.index("cart"), BEHAVIORS.index("purchase")
        sequences.append(
            [(int(i), 0) for i in seen] + [(i, cart) for i in bought] + [(i, buy) for i in bought]
        )
        # Held out: one more viewed item (visited) for most users, an unseen one in the category for some.
        if u % 4:
            test.append((u, int(seen[2]), True))
        else:
            other = [i for i in pool if (u, int(i)) not in views]
            test.append((u, int(other[0]), False))
        if u % 3 == 0:
            val.append((u, int(seen[3]), True))

    def csr(pairs):
        pairs = sorted(pairs)
        return sp.csr_matrix(
            (np.ones(len(pairs), np.float32), ([p[0] for p in pairs], [p[1] for p in pairs])),
            shape=(n_users, n_items),
        )

    def held(rows):
        return (
            np.array([r[0] for r in rows]),
            np.array([r[1] for r in rows]),
            np.array([r[2] for r in rows]),
        )

    visited = csr(views | carts)
    data = TrainingData(
        root=Path("."),
        n_users=n_users,
        n_items=n_items,
        behaviors=["view", "cart", "purchase"],
        matrices={"view": csr(views), "cart": csr(carts), "purchase": csr(buys)},
        visited=visited,
        heldout={"test": held(test), "validation": held(val)},
        manifest=None,
        user_events=np.full(n_users, 9),
    )
    # The events sequence models read, a minute apart (what a bundle's train_events gives).
    data.events = EventLog.from_lists(
        [[i for i, _ in seq] for seq in sequences],
        [[b for _, b in seq] for seq in sequences],
        [T0 + 60 * np.arange(len(seq)) for seq in sequences],
    )
    return data


@pytest.fixture(scope="module")
def tiny():
    return tiny_data()
