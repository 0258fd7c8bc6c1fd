"""Every model through the one trainer: losses fall, seeds reproduce, MEMBER's gate routes items."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from infra.keys import UnknownSettingError
from training.evaluate import evaluate_scores, flatten
from training.models import available_models, default_config, merged_config, model_class
from training.models.base import Context
from training.trainer import fit_model

#: Retrieval models (a ranker trains on a retriever's candidates: tests/training/test_awmoe.py).
TRAINABLE = [m for m in available_models() if model_class(m).trainable and not model_class(m).ranker]
FITTED = [m for m in available_models() if not model_class(m).trainable]
FAST = {"train": {"batch_size": 64, "epochs": 2, "patience": 5, "lr": 0.01}}


def test_registry_finds_every_model_with_commented_defaults():
    assert {"popularity", "als", "als_multi", "bpr", "bpr_multi", "lightgcn", "member"} <= set(
        available_models()
    )
    for name in available_models():
        assert model_class(name).name == default_config(name).get("class", name)


@pytest.mark.parametrize("name", TRAINABLE)
def test_loss_falls_over_two_epochs(name, tiny):
    r = fit_model(name, tiny, seed=3, overrides=FAST, progress=False)
    losses = [row["loss"] for row in r.history]
    assert len(losses) == 2 and losses[1] < losses[0], losses


@pytest.mark.parametrize("name", ["als", "als_multi"])
def test_als_loss_falls_over_two_iterations(name, tiny):
    """implicit's ALS reports its weighted squared loss per iteration. (Popularity has no loss: it is a count.)"""
    r = fit_model(name, tiny, seed=3, overrides={"iterations": 2}, progress=False)
    losses = [row["loss"] for row in r.history]
    assert len(losses) == 2 and losses[1] < losses[0], losses


@pytest.mark.parametrize("name, lr", [("bpr", 1.0), ("bpr_multi", 0.3)])
def test_bpr_loss_falls(name, lr, tiny):
    """implicit's BPR reports the share of sampled pairs ranked wrongly; one iteration on the tiny fixture is
    only ~160 samples, so compare the first two iterations with the last two of eight."""
    r = fit_model(
        name, tiny, seed=3, overrides={"iterations": 8, "learning_rate": lr, "factors": 16}, progress=False
    )
    losses = [row["loss"] for row in r.history]
    assert len(losses) == 8 and sum(losses[-2:]) < 0.6 * sum(losses[:2]), losses


@pytest.mark.parametrize("name", [m for m in FITTED if m != "popularity"])
def test_fitted_models_rank_better_than_chance(name, tiny):
    r = fit_model(name, tiny, seed=3, progress=False)
    m = evaluate_scores(r.model.context_scorer(tiny), tiny, "test", ks=(10,))
    # 50 items, 2 masked purchases: a random ranking finds the item in the top 10 about 21% of the time.
    assert m["standard"]["HR@10"] > 0.3


def test_popularity_ranks_items_by_purchases(tiny):
    import numpy as np

    model = fit_model("popularity", tiny, seed=0, progress=False).model
    counts = np.asarray(tiny.purchases.sum(0)).ravel()
    s = model.scores(Context.of_training(tiny, [0, 5]))
    assert torch.equal(s[0], s[1])  # not personalised
    order = torch.argsort(s[0], descending=True, stable=True).numpy()
    assert (np.diff(counts[order]) <= 0).all()


@pytest.mark.parametrize("name", ["member", "lightgcn", "als"])
def test_same_seed_same_metrics(name, tiny):
    runs = [fit_model(name, tiny, seed=s, overrides=FAST, progress=False) for s in (5, 5, 6)]
    metrics = [flatten(evaluate_scores(r.model.context_scorer(tiny), tiny, "test")) for r in runs]
    assert metrics[0] == metrics[1]
    states = [r.model.state_dict() for r in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


@pytest.mark.parametrize("name", ["member", "member_funnel"])
def test_member_gate_sends_visited_items_to_the_visited_expert(name, tiny):
    model = fit_model(name, tiny, seed=1, overrides=FAST, progress=False).model
    ctx = Context.of_training(tiny, torch.arange(tiny.n_users))
    experts = model.expert_scores(ctx)
    gated = model.scores(ctx)
    visited = torch.from_numpy(tiny.visited.toarray() > 0)
    assert visited.any() and (~visited).any()
    # Per-pair dot products for visited items, a matmul elsewhere: equal up to float rounding.
    torch.testing.assert_close(gated[visited], experts["visited"][visited], rtol=1e-5, atol=1e-6)
    assert torch.equal(gated[~visited], experts["unvisited"][~visited])
    assert not torch.equal(experts["visited"], experts["unvisited"])  # no shared parameters
    u, i = (
        torch.tensor([0, 0]),
        torch.tensor([int(tiny.visited[0].indices[0]), int((~visited[0]).nonzero()[0])]),
    )
    ex = model.explain(ctx, u, i)
    assert ex["visited"].tolist() == [True, False]
    assert ex["w_visited"].tolist() == [1.0, 0.0] and ex["w_unvisited"].tolist() == [0.0, 1.0]


def test_member_gate_reads_the_visited_sets_of_the_context_it_is_given(tiny):
    """Scoring on a later night: the user's visited set then, not the one MEMBER was trained with."""
    import scipy.sparse as sp

    model = fit_model("member", tiny, seed=1, overrides=FAST, progress=False).model
    trained = Context.of_training(tiny, torch.tensor([0, 1]))
    new_item = int(np.flatnonzero(tiny.visited[0].toarray().ravel() == 0)[0])
    later = Context(
        trained.users,
        (trained.visited + sp.csr_matrix(([1.0], ([0], [new_item])), shape=trained.visited.shape)).tocsr(),
        trained.history,
        trained.history_behavior,
        trained.history_time,
    )
    experts, before, after = model.expert_scores(later), model.scores(trained), model.scores(later)
    torch.testing.assert_close(after[0, new_item], experts["visited"][0, new_item])
    assert before[0, new_item] == experts["unvisited"][0, new_item] != after[0, new_item]
    assert torch.equal(after[1], before[1])
    ex = model.explain(later, torch.tensor([0]), torch.tensor([new_item]))
    assert ex["visited"].tolist() == [True] and ex["w_visited"].tolist() == [1.0]


def test_variant_file_holds_only_its_differences_from_the_base_model():
    base, variant = default_config("member"), default_config("member_funnel")
    assert variant["class"] == "member" and variant["funnel_bias"] is True and base["funnel_bias"] is False
    assert {k: v for k, v in variant.items() if k not in ("class", "funnel_bias")} == {
        k: v for k, v in base.items() if k != "funnel_bias"
    }


@pytest.mark.parametrize("name", available_models())
def test_every_shipped_config_validates_and_stays_a_plain_dict(name):
    config = merged_config(name)
    typed = model_class(name).Config.model_validate(config)
    assert typed.name == name
    assert json.loads(json.dumps(config)) == config  # what MLflow logs and the model folder keeps


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        (
            "lightgcn",
            {"train": {"epochz": 3}},
            "unknown setting train.epochz of model lightgcn (from overrides); did you mean train.epochs?",
        ),
        (
            "member_funnel",
            {"negative_candidate": 4},
            "unknown setting negative_candidate of model member_funnel (from overrides); "
            "did you mean negative_candidates?",
        ),
        (
            # a fitted model takes the pipeline's epoch cap, but not a misspelt one
            "als",
            {"train": {"epoch": 3}},
            "unknown setting train.epoch of model als (from overrides); did you mean train.epochs?",
        ),
    ],
)
def test_misspelt_override_names_the_key_the_model_and_the_nearest(name, overrides, message):
    with pytest.raises(UnknownSettingError) as err:
        merged_config(name, overrides)
    assert str(err.value) == message


def test_misspelt_key_in_a_model_yaml_names_the_file_it_is_in(tmp_path, monkeypatch):
    import training.models as models

    for f in ("member.yaml", "member_funnel.yaml"):
        shutil.copy(models.MODELS_DIR / f, tmp_path / f)
    member = tmp_path / "member.yaml"
    member.write_text(member.read_text().replace("  patience: 10", "  patiense: 10"))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    with pytest.raises(UnknownSettingError) as err:
        merged_config("member_funnel")
    assert str(err.value) == (
        f"unknown setting train.patiense of model member_funnel (from {member}); did you mean train.patience?"
    )


def test_config_values_are_typed_and_checked():
    assert model_class("member").Config.model_validate(merged_config("member", {"dim": "16"})).dim == 16
    with pytest.raises(ValidationError, match="did you mean purchase"):
        merged_config("popularity", {"behavior_weights": {"purchse": 1.0}})
    with pytest.raises(ValidationError, match=r"train\.optimizer"):
        merged_config("lightgcn", {"train": {"optimizer": "sgd"}})


def test_funnel_bias_adds_the_weights_of_the_users_own_behaviours_to_visited_items_only(tiny):
    from training.models import build_model

    plain = build_model("member", tiny, {"seed": 4})
    model = build_model("member_funnel", tiny, {"seed": 4})
    model.load_state_dict({**plain.state_dict(), "funnel": torch.tensor([0.5, 2.0])}, strict=True)
    assert model._funnel_behaviors == ["view", "cart"]
    plain.eval()
    model.eval()
    ctx = Context.of_training(tiny, torch.arange(tiny.n_users))
    got, want = model.scores(ctx), plain.scores(ctx)
    views = torch.from_numpy(tiny.matrices["view"].toarray() > 0)
    carts = torch.from_numpy(tiny.matrices["cart"].toarray() > 0)
    assert (carts & ~views).sum() == 0 and carts.any()  # the fixture carts only viewed items
    torch.testing.assert_close(got[views & ~carts], want[views & ~carts] + 0.5)
    torch.testing.assert_close(got[carts], want[carts] + 2.5)
    assert torch.equal(got[~views], want[~views])
    # Training scores (the gated pair scores BPR sees) carry the same bias.
    u, i = carts.nonzero()[0]
    with torch.no_grad():
        out = model.propagate_all()
        pair = model._gated_pair_scores(out, u.view(1), i.view(1))
    torch.testing.assert_close(pair, got[u, i].view(1))


def test_member_experts_share_no_parameters(tiny):
    from training.models import build_model

    model = build_model("member", tiny)
    v = {id(p) for p in model.V.parameters()}
    u = {id(p) for p in model.U.parameters()}
    assert v and u and not (v & u)
    # The visited expert's contrastive loss touches only the visited expert's parameters.
    batch = next(iter(model.batches(__import__("numpy").random.default_rng(0), 32)))
    model.train()
    losses = model.loss(batch)
    losses["visited_cl"].backward()
    assert model.V.loc.grad is not None and model.V.loc.grad.abs().sum() > 0
    for p in model.U.parameters():
        assert p.grad is None or not p.grad.any()


def test_bpr_negatives_are_never_bought_and_hard_ones_come_from_the_hard_row():
    import numpy as np
    import scipy.sparse as sp

    from training.models.base import bpr_triplets

    rng = np.random.default_rng(0)
    n_users, n_items = 30, 200
    bought = sp.random(n_users, n_items, density=0.05, random_state=1, format="csr")
    bought.data[:] = 1
    visited = sp.random(n_users, n_items, density=0.05, random_state=2, format="csr")
    visited.data[:] = 1
    batches = list(bpr_triplets(bought, rng, 16, "cpu", hard=visited, hard_fraction=1.0, negatives=4))
    assert sum(len(b["users"]) for b in batches) == bought.nnz
    hard_hits = total = 0
    for b in batches:
        assert b["neg"].shape == (len(b["users"]), 4)
        users = b["users"].numpy().repeat(4)
        neg = b["neg"].numpy().ravel()
        assert not np.asarray(bought[users, neg]).ravel().any()
        # Every row whose visited set has an item it did not buy gets a visited negative.
        can = np.array([(visited[u].toarray() > bought[u].toarray()).any() for u in users])
        in_visited = np.asarray(visited[users, neg]).ravel() > 0
        assert in_visited[can].all()
        hard_hits += in_visited.sum()
        total += len(neg)
    assert hard_hits > total // 2
    # Default: one uniform negative per purchase, a flat (B,) tensor.
    plain = next(bpr_triplets(bought, np.random.default_rng(0), 16, "cpu"))
    assert plain["neg"].shape == plain["users"].shape


def test_member_trains_with_several_and_visited_negatives(tiny):
    overrides = {**FAST, "negatives": 3, "visited_negatives": 0.5}
    r = fit_model("member", tiny, seed=3, overrides=overrides, progress=False)
    losses = [row["loss"] for row in r.history]
    assert len(losses) == 2 and losses[1] < losses[0], losses


@pytest.mark.parametrize("keep", [1, 2])
def test_member_dynamic_negatives_keep_each_slots_highest_scored_candidate(tiny, keep):
    import numpy as np

    from training.models import build_model

    model = build_model("member", tiny, {"negatives": keep, "negative_candidates": 3})
    batch = next(iter(model.batches(np.random.default_rng(0), 16)))
    assert batch["neg"].shape == (16, keep, 3)
    model.eval()
    with torch.no_grad():
        out = model.propagate_all()
        kept = model.pick_negatives(out, batch["users"], batch["neg"])
        assert kept.shape == ((16,) if keep == 1 else (16, keep))
        kept = kept.reshape(16, keep)
        for slot in range(keep):
            cands = batch["neg"][:, slot]
            every = torch.stack(
                [model._gated_pair_scores(out, batch["users"], cands[:, j]) for j in range(3)], 1
            )
            best = every.argmax(1)
            assert torch.equal(kept[:, slot], cands[torch.arange(16), best])


def test_bpr_candidates_of_a_slot_come_from_one_pool():
    import numpy as np
    import scipy.sparse as sp

    from training.models.base import bpr_triplets

    n_users, n_items = 40, 300
    bought = sp.random(n_users, n_items, density=0.03, random_state=1, format="csr")
    bought.data[:] = 1
    visited = sp.random(n_users, n_items, density=0.2, random_state=2, format="csr")
    visited.data[:] = 1
    visited_slots = slots = 0
    for b in bpr_triplets(
        bought, np.random.default_rng(0), 32, "cpu", visited, 0.5, negatives=2, candidates=4
    ):
        assert b["neg"].shape == (len(b["users"]), 2, 4)
        users = b["users"].numpy()[:, None, None].repeat(2, 1).repeat(4, 2)
        in_visited = np.asarray(visited[users.ravel(), b["neg"].numpy().ravel()]).reshape(users.shape) > 0
        # A visited slot draws all four candidates from the visited set (20% of items); a uniform
        # slot does so with probability 0.2**4. Drawing the pool per candidate instead of per slot
        # would give about (0.5 + 0.5 * 0.2)**4 = 13% all-visited slots, not half.
        all_visited = in_visited.all(2)
        visited_slots += all_visited.sum()
        slots += all_visited.size
    assert 0.4 < visited_slots / slots < 0.6


def test_per_model_overrides_reach_only_their_model_and_the_epoch_cap_still_holds():
    from infra.keys import UnknownSettingError
    from infra.settings import load_settings
    from training.train_evaluate import training_overrides

    settings = load_settings(
        environ={},
        overrides={
            "training": {
                "max_epochs": 5,
                "model_overrides": {"sasrec": {"dim": 32, "train": {"epochs": 8, "lr": 0.003}}},
            }
        },
    )
    assert training_overrides(settings, "sasrec") == {"dim": 32, "train": {"epochs": 5, "lr": 0.003}}
    assert training_overrides(settings, "sasrec", epochs=2)["train"]["epochs"] == 2
    assert training_overrides(settings, "fame") == {"train": {"epochs": 5}}
    with pytest.raises(UnknownSettingError, match=r"dimm.*from overrides"):
        merged_config("sasrec", {"dimm": 32})


def test_member_item_bias_moves_unvisited_scores_only_and_reg_covers_the_experts_it_names(tiny):
    from training.models import build_model

    plain = build_model("member", tiny, {"seed": 4})
    model = build_model("member", tiny, {"seed": 4, "item_bias": True})
    bias = torch.linspace(-1.0, 1.0, tiny.n_items)
    model.load_state_dict({**plain.state_dict(), "item_bias": bias}, strict=True)
    plain.eval()
    model.eval()
    ctx = Context.of_training(tiny, torch.arange(tiny.n_users))
    got, want = model.scores(ctx), plain.scores(ctx)
    visited = torch.from_numpy(tiny.visited.toarray() > 0)
    assert visited.any() and (~visited).any()
    torch.testing.assert_close(got[visited], want[visited])
    torch.testing.assert_close(got - want, torch.where(visited, 0.0, bias.expand_as(got)))
    torch.testing.assert_close(
        model.expert_scores(ctx)["unvisited"], plain.expert_scores(ctx)["unvisited"] + bias
    )

    # Trained, the bias moves; with the L2 term on the visited expert only, the unvisited
    # expert's embeddings and the bias get no gradient from it.
    r = fit_model("member", tiny, seed=3, overrides={**FAST, "item_bias": True}, progress=False)
    assert r.model.item_bias.abs().sum() > 0
    only_visited = build_model(
        "member", tiny, {"seed": 4, "item_bias": True, "reg_experts": ["visited"], "reg": 1.0}
    )
    batch = next(iter(only_visited.batches(np.random.default_rng(0), 32)))
    only_visited.train()
    only_visited.loss(batch)["reg"].backward()
    assert only_visited.V.glob.grad.abs().sum() > 0
    assert only_visited.U.glob.grad is None and only_visited.item_bias.grad is None


def test_member_popularity_prior_adds_its_weight_times_log_purchases_to_unvisited_scores_and_learns(tiny):
    from training.models import build_model

    plain = build_model("member", tiny, {"seed": 4})
    model = build_model("member", tiny, {"seed": 4, "popularity_prior": True})
    log_pop = torch.from_numpy(np.log1p(np.asarray(tiny.purchases.sum(0)).ravel())).float()
    assert log_pop.max() > log_pop.min()
    model.load_state_dict({**model.state_dict(), **plain.state_dict(), "pop_weight": torch.tensor(0.5)})
    plain.eval()
    model.eval()
    ctx = Context.of_training(tiny, torch.arange(tiny.n_users))
    got, want = model.scores(ctx), plain.scores(ctx)
    visited = torch.from_numpy(tiny.visited.toarray() > 0)
    torch.testing.assert_close(got - want, torch.where(visited, 0.0, 0.5 * log_pop.expand_as(got)))
    torch.testing.assert_close(
        model.expert_scores(ctx)["unvisited"], plain.expert_scores(ctx)["unvisited"] + 0.5 * log_pop
    )

    # Its weight learns from purchases of items new to the shopper against new negatives only: a
    # batch of visited purchases gives it no gradient; one of new purchases of the most bought
    # items, against the least bought, a positive weight.
    model.train()
    lp = model.log_popularity
    new_u = np.nonzero(~visited.numpy())[0]
    top, low = torch.argsort(lp, descending=True), torch.argsort(lp)
    vis_u, vis_i = np.nonzero(visited.numpy())
    out = model.propagate_all()
    loss_visited = model._prior_loss(out, torch.from_numpy(vis_u[:8]), torch.from_numpy(vis_i[:8]), low[:8])
    grad = torch.autograd.grad(loss_visited, model.pop_weight, allow_unused=True)[0]
    assert grad is None or grad == 0
    users = torch.from_numpy(new_u)
    pos = top[0].expand(len(users))
    neg = low[0].expand(len(users))
    keep = ~model.is_visited(users, pos) & ~model.is_visited(users, neg)
    assert keep.any()
    grad = torch.autograd.grad(model._prior_loss(out, users[keep], pos[keep], neg[keep]), model.pop_weight)[0]
    assert grad < 0  # descent raises w
    r = fit_model("member", tiny, seed=3, overrides={**FAST, "popularity_prior": True}, progress=False)
    assert "popularity_prior" in r.history[-1]  # the trainer logs its loss


@pytest.mark.parametrize("name", ["member", "member_funnel"])
def test_member_softmax_loss_scores_its_shared_negatives_as_the_model_scores_pairs_and_learns(name, tiny):
    from training.models import build_model
    from training.models.member import pair_block

    model = build_model(name, tiny, {"seed": 4, "rank_loss": "softmax", "softmax_negatives": 7})
    if model.funnel is not None:
        model.load_state_dict({**model.state_dict(), "funnel": torch.tensor([0.5, 2.0])})
    users = torch.arange(tiny.n_users)
    items = torch.from_numpy(np.random.default_rng(1).choice(tiny.n_items, 7, replace=False))
    with torch.no_grad():
        out = model.propagate_all()
        block = model._gated_block_scores(out, users, items)
        pairs = model._gated_pair_scores(out, users.repeat_interleave(7), items.repeat(tiny.n_users))
    # Both experts score the block, the gate picks per pair: visited pairs are in it.
    assert pair_block(tiny.visited, users.numpy(), items.numpy()).any()
    torch.testing.assert_close(block.reshape(-1), pairs)
    np.testing.assert_array_equal(
        pair_block(tiny.visited, np.array([2, 0]), items.numpy()),
        tiny.visited.toarray()[[2, 0]][:, items.numpy()],
    )

    # With every item drawn, each purchase is in the draw: masked there, it is counted once, so the
    # loss is the full softmax over the catalogue.
    batch = next(iter(model.batches(np.random.default_rng(0), 32)))
    every = build_model(name, tiny, {"seed": 4, "rank_loss": "softmax", "softmax_negatives": tiny.n_items})
    every.load_state_dict(model.state_dict())
    u, p = batch["users"], batch["pos"]
    with torch.no_grad():
        loss, drawn = every._softmax_rank_loss(out, u, p)
        full = every._gated_block_scores(out, u, torch.arange(tiny.n_items))
    assert sorted(drawn.tolist()) == list(range(tiny.n_items))
    want = (torch.logsumexp(full, 1) - full[torch.arange(len(u)), p]).mean()
    torch.testing.assert_close(loss, want)
    model.train()
    losses = model.loss(batch)
    assert "softmax" in losses and "bpr" not in losses and torch.isfinite(losses["softmax"])
    # The loss falls over training.
    r = fit_model(
        name,
        tiny,
        seed=3,
        overrides={**FAST, "rank_loss": "softmax", "softmax_negatives": 16},
        progress=False,
    )
    softmax = [row["softmax"] for row in r.history]
    assert len(softmax) == 2 and softmax[1] < softmax[0], softmax
