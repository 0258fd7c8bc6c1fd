"""Train and evaluate stages on the real training tables of the demo chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from infra.tables import MODEL_HISTORY, model_dir, read_metrics
from tests.conftest import DEMO_DATE
from training.artifacts import load_trained
from training.models import build_model
from training.models.base import Context
from training.train_evaluate import run_evaluate, run_train
from training.trainer import fit_model

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def trained(retailrocket) -> dict[str, tuple[dict, dict]]:
    """``popularity`` and ``member`` trained and evaluated on the demo's split once for the module:
    name -> (the training's metadata, the evaluation's metrics)."""
    settings, *_ = retailrocket
    out = {}
    for name in ("popularity", "member"):
        meta = run_train(settings, DEMO_DATE, name)
        out[name] = meta, run_evaluate(settings, DEMO_DATE, name)
    return out


@pytest.mark.parametrize("name", ["popularity", "member"])
def test_train_evaluate_and_reload(retailrocket, trained, name):
    settings, _, manifest = retailrocket
    meta, metrics = trained[name]
    assert meta["epochs_run"] <= 2
    test = metrics["test"]
    assert test["standard"]["users"] == manifest["stats"]["heldout"]["test"]["users"]
    assert test["visited"]["users"] + test["unvisited"]["users"] >= test["standard"]["users"]
    assert 0 <= test["standard"]["HR@10"] <= test["standard"]["HR@20"] <= test["standard"]["HR@50"] <= 1
    saved = read_metrics(model_dir(settings.paths.warehouse_root, DEMO_DATE, name))
    assert saved.test == test and saved.eval_mask["test"] == "train_purchases"
    assert saved.validation["standard"]["users"] == manifest["stats"]["heldout"]["validation"]["users"]

    # Both saved state dicts rebuild their models: the same scores as training them again in memory
    # (training is deterministic for a seed), and not those of an untrained one. The validation fit
    # early-stopped on the validation view; the refit ran its best epoch count on every event.
    wh, seed = settings.paths.warehouse_root, settings.seeds.train
    users = torch.arange(0, manifest["stats"]["users"], 97)
    fit, val_data, _ = load_trained(wh, DEMO_DATE, name, view="validation")
    again = fit_model(name, val_data, seed, {"train": {"epochs": 2}}, progress=False).model
    val_ctx = Context.of_training(val_data, users)
    assert torch.equal(fit.scores(val_ctx), again.scores(val_ctx))
    model, data, meta = load_trained(wh, DEMO_DATE, name)
    ctx = Context.of_training(data, users)
    assert meta.refit_epochs == (meta.best_epoch if model.trainable else 1)
    trained = fit_model(name, data, seed, {"train": {"epochs": meta.refit_epochs}}, progress=False).model
    assert torch.equal(model.scores(ctx), trained.scores(ctx))
    assert not torch.equal(model.scores(ctx), fit.scores(ctx))  # the refit saw more
    if trained.trainable:
        fresh = build_model(name, data, {"seed": settings.seeds.train})
        fresh.eval()
        assert not torch.equal(model.scores(ctx), fresh.scores(ctx))


def test_member_beats_popularity_on_the_visited_heavy_demo(trained):
    m = {name: metrics["test"]["standard"] for name, (_, metrics) in trained.items()}
    assert m["member"]["HR@20"] > m["popularity"]["HR@20"]


def test_member_trains_in_two_processes_under_torch_distributor_and_rank_0_publishes(
    retailrocket, spark, tmp_path
):
    """`train --processes 2` on local[2]: two gloo ranks under TorchDistributor, each stepping half
    of every epoch's batches, end with the same weights, which are the ones published; a request for
    more processes than the host has cores fails at once with one clear line."""
    import shutil

    from infra.tables import TRAINING
    from tests.conftest import settings_under
    from training.distributed import DistributedTrainingError, weights_digest

    source, *_ = retailrocket
    settings = settings_under(tmp_path, {"training": {"max_epochs": 2}})
    shutil.copytree(
        TRAINING.dir(source.paths.warehouse_root, DEMO_DATE),
        TRAINING.dir(settings.paths.warehouse_root, DEMO_DATE),
    )
    wh = settings.paths.warehouse_root
    meta = run_train(settings, DEMO_DATE, "member", processes=2)
    model, data, _ = load_trained(wh, DEMO_DATE, "member")
    history = json.loads((model_dir(wh, DEMO_DATE, "member") / MODEL_HISTORY.name).read_text())
    fresh = build_model("member", data, {"seed": settings.seeds.train})
    assert weights_digest(model) != weights_digest(fresh)  # trained
    # The steps one process takes in an epoch of the validation fit (history.json's fit).
    from training.train_evaluate import load_views

    val_data, _ = load_views(TRAINING.dir(wh, DEMO_DATE))
    solo = build_model("member", val_data, {"seed": settings.seeds.train})
    rng = np.random.default_rng([settings.seeds.train, 1])
    plain_steps = len(list(solo.batches(rng, solo.cfg.train.batch_size)))
    shared = [row["steps"] for row in history]
    assert shared and all(n == plain_steps // 2 for n in shared), (shared, plain_steps)
    metrics = run_evaluate(settings, DEMO_DATE, "member", splits=("test",))["test"]["standard"]
    popularity = fit_model("popularity", data, settings.seeds.train, progress=False).model
    from training.evaluate import evaluate_scores

    floor = evaluate_scores(popularity.context_scorer(data), data, "test", settings=("standard",))["standard"]
    assert metrics["HR@20"] > floor["HR@20"]  # it learned what one process learns: more than popularity
    assert meta["device"] == "cpu"

    with pytest.raises(DistributedTrainingError, match="ask for at most"):
        run_train(settings, DEMO_DATE, "member", processes=512)
