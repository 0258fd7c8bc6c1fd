"""AW-MoE as the second stage: the activation unit, the masked view, the contrastive loss, the
ranker's labels against its retriever's training data, and the two-stage lists."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from infra.tables import HELDOUT, TRAIN_EVENTS
from tests.training.test_sequence_models import T0, planted_tables
from training.data import load_training_data, write_training_bundle
from training.models.awmoe import AWMoE, mask_events
from training.models.base import Context
from training.ranking import fit_ranker, holdout_users, label_leaks
from training.recommend import recommend
from training.trainer import fit_and_refit, train

SMALL = {
    "candidates": 20,
    "max_len": 10,
    "dim": 16,
    "experts": 2,
    "expert_hidden": 8,
    "attention_hidden": [16, 8],
    "gate_hidden": 8,
    "train": {"epochs": 12, "patience": 12, "batch_size": 16, "lr": 1e-2},
}


def bundle(tmp_path, name: str, tables=None):
    tables = tables or planted_tables(0)
    write_training_bundle(
        tmp_path, name, tables, "planted", ["validation", "test"], validation_design="refit"
    )
    root = tmp_path / "training" / f"ds={name}"
    return load_training_data(root, "validation"), load_training_data(root)


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    return bundle(tmp_path_factory.mktemp("awmoe"), "planted")


@pytest.fixture(scope="module")
def retriever(views):
    val, full = views
    return fit_and_refit("popularity", val, full, seed=0, progress=False)


def ranker(views, retriever, **overrides) -> AWMoE:
    val, _ = views
    model = retriever.validation.model
    config = {**SMALL, **overrides, "retriever": model.name, "retriever_config": model.config}
    from training.models import merged_config

    torch.manual_seed(0)
    return AWMoE(val, merged_config("awmoe", config), retriever=model)


def test_the_activation_unit_attends_differently_for_two_candidates(views, retriever):
    model = ranker(views, retriever).eval()
    ctx = Context.of_training(views[0], np.array([0]), model.history_length)
    f = model._events(ctx)
    h = model._embed_events(f, f.valid)
    cands = model.items(torch.tensor([[3, 40]]))  # two candidates, one window
    att = model.attention(cands, h, f.valid)[0]
    assert f.valid.sum() >= 2
    assert not torch.allclose(att[0], att[1])
    assert torch.allclose(att.sum(1), torch.ones(2))  # softmax over the window's events
    assert (att[:, ~f.valid[0]] == 0).all()  # padding gets no weight


def test_masking_drops_only_the_masked_events_and_keeps_one(views, retriever):
    model = ranker(views, retriever).eval()
    valid = torch.tensor([[False, True, True, True, True], [False, False, False, False, True]])
    masked = mask_events(valid, 0.5, torch.Generator().manual_seed(1))
    assert masked.sum(1).tolist() == [2, 1]  # floor(4 x 0.5) dropped; the lone event kept
    assert not (masked & ~valid).any()
    items = torch.tensor([[0, 5, 6, 7, 8], [0, 0, 0, 0, 9]])
    f = model._events(
        Context(
            torch.zeros(2, dtype=torch.long),
            sp.csr_matrix((2, views[0].n_items)),
            (items - 1).clamp(min=-1),
            torch.where(items > 0, 0, -1),
            torch.where(items > 0, T0 + 60 * torch.arange(5), -1),
        )
    )
    full, view = model._embed_events(f, f.valid), model._embed_events(f, masked)
    assert torch.equal(full[masked], view[masked])  # the kept events are untouched
    assert (view[f.valid & ~masked] == 0).all() and (full[f.valid & ~masked] != 0).any()


@pytest.fixture(scope="module")
def warm(views, retriever):
    """A ranker trained without the contrastive loss, its gates already shaped by the candidates."""
    val, full = views
    overrides = {**SMALL, "contrastive_weight": 0.0, "mask_ratio": 0.6}
    return fit_ranker(
        "awmoe", retriever.validation.model, retriever.final.model, val, full, 0, overrides, progress=False
    )


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_the_contrastive_loss_brings_the_two_views_gates_together_and_only_it(warm, weight):
    """From the same trained state: 12 more epochs with the loss on bring each shopper's full and
    masked views' gates closer (relative to other shoppers'); with it off they drift apart."""
    before = warm.validation.model
    train_cfg = {**before.config["train"], "epochs": 12, "patience": 12, "lr": 3e-3}
    config = {**before.config, "contrastive_weight": weight, "train": train_cfg}
    model = AWMoE(before._data, config, retriever=before.retriever, labels=before._labels)
    model.load_state_dict(before.state_dict())
    history = train(model, before._data, seed=1, progress=False).history
    distance = [row["gate_view_distance"] for row in history]
    first, last = np.mean(distance[:2]), np.mean(distance[-2:])
    if weight:
        assert last < 0.6 * first, distance
    else:
        assert last > first, distance


def test_no_label_of_the_ranker_was_in_its_retrievers_training_data(views, warm, tmp_path):
    val, _ = views
    fit = warm
    m = fit.manifest
    assert m["label_leaks"] == 0 and m["label_users"] + m["early_stopping_users"] == len(
        np.unique(val.heldout["validation"][0])
    )
    assert m["examples"] > 0 and 0 < m["candidate_recall"] <= 1
    labels = fit.validation.model._labels[0]
    assert not holdout_users(labels, 0.2).any()  # early stopping never reads a label
    # The check can fail: a bundle whose training events hold a validation purchase itself.
    tables = planted_tables(0)
    held = tables[HELDOUT.name]
    leak = held[held["split"] == "validation"].iloc[[0]]
    ev = tables[TRAIN_EVENTS.name]
    row = ev[ev["user_idx"] == leak["user_idx"].iloc[0]].iloc[[-1]].copy()
    row[["item_idx", "behavior", "event_time"]] = [
        leak["item_idx"].iloc[0],
        "purchase",
        leak["event_time"].iloc[0],
    ]
    row["event_seq"] += 1
    tables[TRAIN_EVENTS.name] = ev._append(row, ignore_index=True)
    leaky, _ = bundle(tmp_path, "leaky", tables)
    assert label_leaks(leaky, "validation", leak["user_idx"].to_numpy()) == 1


def test_two_stage_lists_have_k_rows_none_bought_whatever_the_batch(views, warm):
    _, full = views
    model = warm.final
    users = np.arange(full.n_users)
    ctx = Context.of_training(full, users, model.history_length)
    bought = full.mask_for("test")
    a = recommend(model, ctx, bought, 10, batch_size=7)
    b = recommend(model, ctx, bought, 10, batch_size=4096)
    assert np.array_equal(np.bincount(a.row, minlength=len(users)), np.full(len(users), 10))
    assert not np.asarray(bought[a.row, a.item_idx]).any()
    assert np.array_equal(a.item_idx, b.item_idx) and np.array_equal(a.row, b.row)
    why = model.explain(
        ctx.rows(slice(0, 3)), torch.tensor([0, 1, 2]), torch.from_numpy(a.item_idx[[0, 10, 20]])
    )
    assert (why["retriever_rank"] >= 1).all() and torch.isfinite(why["ranker_score"]).all()
    shares = torch.stack([why[f"w_{e}"] for e in model.experts], 1)
    torch.testing.assert_close(shares.abs().sum(1), torch.ones(3))


def test_a_retrieval_model_is_not_a_ranker(views, retriever):
    with pytest.raises(ValueError, match="not a ranker"):
        fit_ranker("popularity", retriever.validation.model, retriever.final.model, *views, seed=0)


def test_a_ranker_listed_as_a_retrieval_model_is_refused_with_the_setting_to_use(make_settings):
    from training.train_evaluate import run_train

    with pytest.raises(ValueError, match=r"set ranking\.model: awmoe"):
        run_train(make_settings(), "2026-01-05", "awmoe")
