"""Train and evaluate stages on the real training tables of the demo chain."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import DEMO_DATE
from training.artifacts import METRICS, load_trained, model_dir
from training.models import build_model
from training.stages import run_evaluate, run_train
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
    saved = json.loads((model_dir(settings.paths.warehouse_root, DEMO_DATE, name) / METRICS).read_text())
    assert saved["test"] == test and saved["eval_mask"]["test"] == "train_and_validation_purchases"

    # The saved state dict rebuilds the trained model: the same scores as training it again in memory
    # (training is deterministic for a seed), and not those of an untrained one.
    model, data, _ = load_trained(settings.paths.warehouse_root, DEMO_DATE, name)
    trained = fit_model(name, data, settings.seeds.train, {"train": {"epochs": 2}}, progress=False).model
    users = torch.arange(0, data.n_users, 97)
    assert torch.equal(model.scores(users), trained.scores(users))
    if trained.trainable:
        fresh = build_model(name, data, {"seed": settings.seeds.train})
        fresh.eval()
        assert not torch.equal(model.scores(users), fresh.scores(users))


def test_member_beats_popularity_on_the_visited_heavy_demo(retailrocket):
    settings, *_ = retailrocket
    for name in ("popularity", "member"):
        run_train(settings, DEMO_DATE, name)
    m = {
        n: run_evaluate(settings, DEMO_DATE, n, splits=("test",))["test"]["standard"]
        for n in ("popularity", "member")
    }
    assert m["member"]["HR@20"] > m["popularity"]["HR@20"]
