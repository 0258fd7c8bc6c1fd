"""SASRec and FAME: masks, the tie rule, what they learn from a planted sequential log (and do not
from the same log shuffled), users first seen at scoring, seeds."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import torch

from infra.tables import BEHAVIORS, HELDOUT, INTERACTIONS, ITEM_MAP, TRAIN_EVENTS, USER_MAP, VISITED
from training.data import load_training_data, write_training_bundle
from training.evaluate import evaluate_scores
from training.models import build_model
from training.models.base import Context
from training.models.sequential import attention_mask
from training.sequences import NO_TIME, EventLog, SequenceFeatures
from training.trainer import fit_model

SEQUENCE_MODELS = ["sasrec", "fame"]
#: Small and quick: the planted rule is learnt in a few epochs.
FAST = {
    "dim": 32,
    "layers": 1,
    "heads": 2,
    "dropout": 0.0,
    "train": {"epochs": 25, "patience": 4, "batch_size": 64, "lr": 5e-3},
}
FAME_FAST = {**FAST, "layers": 2, "experts": 2}
N_PAIRS, N_NOISE = 12, 24  # items 0..11 are A's, 12..23 their B's, 24.. noise
T0 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())


def overrides(name: str) -> dict:
    return FAME_FAST if name == "fame" else FAST


def planted_tables(seed: int, n_users: int = 240, shuffle: bool = False) -> dict[str, pd.DataFrame]:
    """Users view noise items and item A's; a purchase of B(A) = A + N_PAIRS always follows a view
    of A. Each user's last event is a view of an A whose B it never bought: the held-out purchase is
    that B (validation for the first third of the users, test for the rest). ``shuffle`` permutes
    each user's training events in time: the same events, no order."""
    rng = np.random.default_rng(seed)
    n_items = 2 * N_PAIRS + N_NOISE
    rows, held = [], []
    for u in range(n_users):
        events, bought = [], set()
        for _ in range(rng.integers(3, 7)):
            events += [
                (int(i), "view") for i in rng.choice(np.arange(2 * N_PAIRS, n_items), rng.integers(1, 4))
            ]
            a = int(rng.integers(0, N_PAIRS))
            events += [(a, "view"), (a + N_PAIRS, "purchase")]
            bought.add(a + N_PAIRS)
        last = int(rng.choice([a for a in range(N_PAIRS) if a + N_PAIRS not in bought]))
        events.append((last, "view"))
        times = T0 + 60 * np.arange(len(events))
        if shuffle:
            times = rng.permutation(times)
        rows += [(u, i, b, t) for (i, b), t in zip(events, times, strict=True)]
        held.append((u, last + N_PAIRS, "validation" if u < n_users // 3 else "test"))
    ev = pd.DataFrame(rows, columns=["user_idx", "item_idx", "behavior", "t"])
    ev = ev.sort_values(["user_idx", "t"], kind="stable").reset_index(drop=True)
    ev["event_seq"] = ev.groupby("user_idx").cumcount()
    ev["event_time"] = pd.to_datetime(ev["t"], unit="s", utc=True)
    inter = ev.groupby(["user_idx", "item_idx", "behavior"]).agg(
        count=("t", "size"), last_time=("event_time", "max")
    )
    inter = inter.reset_index()
    visited = ev[ev["behavior"] != "purchase"][["user_idx", "item_idx"]].drop_duplicates()
    heldout = pd.DataFrame(held, columns=["user_idx", "item_idx", "split"])
    heldout["visited"] = False
    heldout["event_time"] = pd.to_datetime(T0 + 10**6, unit="s", utc=True)
    return {
        USER_MAP.name: pd.DataFrame(
            {"user_id": [f"u{u}" for u in range(n_users)], "user_idx": range(n_users)}
        ),
        ITEM_MAP.name: pd.DataFrame(
            {"item_id": [f"i{i}" for i in range(n_items)], "item_idx": range(n_items), "category_id": None}
        ),
        INTERACTIONS.name: inter,
        VISITED.name: visited,
        HELDOUT.name: heldout,
        TRAIN_EVENTS.name: ev.assign(session_id=None, validation_fit=True),
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    def build(shuffle: bool):
        root = tmp_path_factory.mktemp("shuffled" if shuffle else "planted")
        write_training_bundle(root, "planted", planted_tables(0, shuffle=shuffle), "planted", ["test"])
        return load_training_data(root / "training" / "ds=planted")

    return {False: build(False), True: build(True)}


def test_one_window_builder_pads_left_and_cuts_before_a_position():
    log = EventLog.from_lists([[5, 6, 7], [], [9]], [[0, 0, 4], [], [2]], [[10, 20, 30], [], [40]])
    items, behaviors, times = log.windows(np.array([0, 1, 2]), 4)
    assert items.tolist() == [[-1, 5, 6, 7], [-1, -1, -1, -1], [-1, -1, -1, 9]]
    assert behaviors[0].tolist() == [-1, 0, 0, 4] and times[2].tolist() == [NO_TIME] * 3 + [40]
    before_third, _, _ = log.windows(np.array([0]), 2, ends=np.array([2]))
    assert before_third.tolist() == [[5, 6]]


def test_features_drop_unknown_items_and_mark_sessions():
    f = SequenceFeatures.of(
        torch.tensor([[3, -1, 4, 5]]),
        torch.tensor([[0, 0, 2, 4]]),
        torch.tensor([[0, 5, 10, 10_000]]),
        1800.0,
    )
    assert f.items.tolist() == [[0, 4, 5, 6]] and f.behaviors.tolist() == [[0, 1, 3, 5]]
    assert f.session_start.tolist() == [[0, 1, 0, 1]]  # the first event and the 9,990 s gap
    assert f.gaps[0, 2] == 2 + int(np.floor(np.log2(11)))


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_a_later_event_never_changes_an_earlier_position_and_padding_gives_no_nan(planted, name):
    torch.manual_seed(0)
    model = build_model(name, planted[False], overrides(name)).eval()
    items = torch.tensor([[-1, -1, 1, 2, 3, 4], [-1, -1, -1, -1, -1, -1]])
    behaviors = torch.zeros_like(items).masked_fill(items < 0, -1)
    times = torch.where(items >= 0, T0 + 60 * torch.arange(6), NO_TIME)
    f = model.features(items, behaviors, times)
    encoded, _ = model.encoder(f)
    changed = items.clone()
    changed[0, 5] = 7
    encoded2, _ = model.encoder(model.features(changed, behaviors, times))
    assert torch.equal(encoded[0, :5], encoded2[0, :5]) and not torch.equal(encoded[0, 5], encoded2[0, 5])
    scores = model.item_scores(f)
    assert torch.isfinite(scores).all() and torch.isfinite(encoded).all()
    assert not attention_mask(f.valid)[1, 0].any(-1).logical_not().any()  # every query has a key


def test_the_training_event_order_is_the_splits_never_the_item_id(tmp_path):
    """Two events of one second: the bundle's event_seq orders them, whatever their item ids."""
    tables = planted_tables(1, n_users=3)
    ev = tables[TRAIN_EVENTS.name]
    first = ev[ev["user_idx"] == 0].index[:2]
    ev.loc[first, "item_idx"] = [30, 40]
    ev.loc[first, "event_time"] = ev.loc[first[0], "event_time"]
    ev.loc[first, "event_seq"] = [1, 0]  # the split put item 40 first: neither row nor item order
    write_training_bundle(tmp_path, "tie", tables, "planted", ["test"])
    data = load_training_data(tmp_path / "training" / "ds=tie")
    items, _, _ = data.history(np.array([0]), 50)
    assert items[0][items[0] >= 0][:2].tolist() == [40, 30]


@pytest.fixture(scope="module")
def fitted(planted):
    """Each model trained once on the planted log and once on its shuffled control."""
    return {
        (name, shuffled): fit_model(name, data, seed=0, overrides=overrides(name), progress=False)
        for name in SEQUENCE_MODELS
        for shuffled, data in planted.items()
    }


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_b_follows_a_is_learnt_and_the_shuffled_control_is_not(planted, fitted, name):
    hr = {}
    for shuffled, data in planted.items():
        model = fitted[name, shuffled].model
        m = evaluate_scores(model.context_scorer(data), data, "test", ks=(1, 10), settings=("standard",))
        hr[shuffled] = m["standard"]["HR@1"]
    assert hr[False] >= 0.9, hr
    assert hr[True] < 0.5, hr


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_same_seed_same_metrics(planted, name):
    data = planted[False]
    short = {**overrides(name), "train": {**overrides(name)["train"], "epochs": 2}}

    def run():
        history = fit_model(name, data, seed=3, overrides=short, progress=False).history
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]

    assert run() == run()


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_a_user_never_trained_on_is_scored_from_its_events(planted, fitted, name):
    model = fitted[name, False].model

    def context(item_list):
        n = len(item_list)
        return Context(
            torch.full((1,), -1),
            planted[False].visited[:1] * 0,
            torch.tensor([[-1] * (50 - n) + item_list]),
            torch.tensor([[-1] * (50 - n) + [BEHAVIORS.index("view")] * n]),
            torch.tensor([[NO_TIME] * (50 - n) + [T0 + 60 * j for j in range(n)]]),
        )

    a, b, empty = context([30, 3]), context([30, 5]), context([])
    assert model.can_score(a).item() and not model.can_score(empty).item()
    top_a, top_b = model.scores(a).argmax(1).item(), model.scores(b).argmax(1).item()
    assert (top_a, top_b) == (3 + N_PAIRS, 5 + N_PAIRS)


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_the_pyfunc_gives_a_shopper_first_seen_at_scoring_k_model_rows_that_follow_its_events(
    planted, fitted, name
):
    from mlflow.pyfunc import PythonModelContext

    from infra.tables import FALLBACK
    from training.artifacts import save_trained
    from training.pyfunc import FunnelrecModel
    from training.trainer import FitResult

    data, result = planted[False], fitted[name, False]
    path = save_trained(data.root.parents[1], "planted", FitResult(result, result), data, seed=0)
    impl = FunnelrecModel()
    impl.load_context(
        PythonModelContext(artifacts={"model": str(path), "tables": str(data.root)}, model_config={})
    )

    def top(a: int) -> pd.DataFrame:
        items = ["i30", f"i{a}"]
        frame = pd.DataFrame(
            {
                "user_id": ["first-seen-today"],
                "visited": [items],
                "bought": [[]],
                "history_items": [items],
                "history_behaviors": [["view", "view"]],
                "history_times": [[T0, T0 + 60]],
            }
        )
        return impl.predict(None, frame, {"k": 5})

    after_3, after_5 = top(3), top(5)
    for rows in (after_3, after_5):
        assert len(rows) == 5 and not (rows["expert"] == FALLBACK).any()
    assert after_3["item_id"].iloc[0] == f"i{3 + N_PAIRS}" and after_5["item_id"].iloc[0] == f"i{5 + N_PAIRS}"
    assert after_3["item_id"].tolist() != after_5["item_id"].tolist()
    if name == "fame":  # the scored rows say which head (or the repeat path) drove each item
        assert after_3["expert"].str.match(r"head_\d|repeat").all()


def test_fame_explains_an_item_by_its_heads_and_by_the_repeat_path_only_within_its_own_window(
    planted, fitted
):
    model = fitted["fame", False].model
    ctx = Context.of_training(planted[False], np.arange(3), model.history_length)
    windows = [set(ctx.history[r][ctx.history[r] >= 0].tolist()) for r in range(3)]
    own = [max(w) for w in windows]  # an item in each row's window
    absent = [next(i for i in range(planted[False].n_items) if i not in w) for w in windows]
    rows = torch.tensor([0, 1, 2, 0, 1, 2])
    why = model.explain(ctx, rows, torch.tensor(own + absent))
    shares = torch.stack([why[f"w_{e}"] for e in model.experts], 1)
    torch.testing.assert_close(shares.abs().sum(1), torch.ones(6))
    assert (why["w_repeat"][:3] != 0).all() and (why["w_repeat"][3:] == 0).all()


def test_fames_gate_balance_term_is_zero_for_even_heads_and_h_minus_1_for_one_head(planted):
    torch.manual_seed(0)
    model = build_model("fame", planted[False], {**FAME_FAST, "gate_balance": 0.5}).train()
    batch = next(model.batches(np.random.default_rng(0), 32))
    gate = model.facet.gate
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.zero_()
    even = model.loss(batch)
    assert float(even["gate_balance"]) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([30.0, 0.0]))  # every row's gate on head 0
    one = model.loss(batch)
    assert float(one["gate_balance"]) == pytest.approx(1.0, abs=1e-4)  # H - 1, H = 2
    torch.testing.assert_close(one["loss"], one["ce"] + 0.5 * one["gate_balance"])
    model.eval()
    model.scores(Context.of_training(planted[False], np.arange(2), model.history_length))
    assert model.auxiliary_losses() == {}  # scoring leaves no term behind for a later batch
