"""Train and evaluate stages on the real training tables of the demo chain."""

from __future__ import annotations

import pytest
import torch

from infra.tables import model_dir, read_metrics
from tests.conftest import DEMO_DATE
from training.artifacts import load_trained
from training.models import build_model
from training.models.base import Context
from training.train_evaluate import run_evaluate, run_train
from training.trainer import fit_model

pytestmark = pytest.mark.spark


@pytest.mark.parametrize("name", ["popularity", "member"])
def test_train_evaluate_and_reload(retailrocket, name):
    settings, _, manifest = retailrocket
    meta = run_train(settings, DEMO_DATE, name)
    assert meta["epochs_run"] <= 2
    metrics = run_evaluate(settings, DEMO_DATE, name)
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


def test_member_beats_popularity_on_the_visited_heavy_demo(retailrocket):
    settings, *_ = retailrocket
    for name in ("popularity", "member"):
        run_train(settings, DEMO_DATE, name)
    m = {
        n: run_evaluate(settings, DEMO_DATE, n, splits=("test",))["test"]["standard"]
        for n in ("popularity", "member")
    }
    assert m["member"]["HR@20"] > m["popularity"]["HR@20"]
