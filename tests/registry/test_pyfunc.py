"""The real path: train -> evaluate (tracked) -> register -> promote -> load by alias -> predict."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import mlflow
from infra.tables import FALLBACK
from tests.registry.conftest import DS
from training import tracking
from training.artifacts import load_trained
from training.evaluate import KS, METRICS, SETTINGS
from training.models.base import Context
from training.pyfunc import SignatureMismatch, load_for_scoring
from training.registry import promote, register
from training.scoring import known_purchases, recommend, to_frame


@pytest.fixture(scope="module")
def champion(trained):
    version = register(trained, DS, "als_multi")
    decision = promote(trained, ds=DS)
    assert decision.action == "promoted", decision.summary()
    return version


def test_tracked_run_has_params_tags_curves_metrics_and_artifacts(trained):
    client = tracking.connect(trained)
    meta = json.loads(
        (trained.paths.warehouse_root / "models" / f"ds={DS}" / "als_multi" / "model.json").read_text()
    )
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params, tags, values = run.data.params, run.data.tags, run.data.metrics
    assert params["factors"] == str(meta["config"]["factors"]) and params["seed"] == "42"
    assert params["data.ds"] == DS and params["data.checksum.interactions"] == f"fixture-{DS}-interactions"
    assert tags["funnelrec.model_family"] == "als" and tags["funnelrec.dataset"] == "tiny"
    assert tags["eval.mask"] == "train_purchases" and tags["eval.split"] == "fixture"
    assert len(tags["mlflow.source.git.commit"]) == 40
    for split in ("validation", "test"):
        for setting in SETTINGS:
            # A setting without users has no metrics (null, not 0); every other has all of them.
            has_users = values[f"{split}.{setting}.users"] > 0
            for k in KS:
                assert (f"{split}.{setting}.chance_HR_at_{k}" in values) == has_users
                for m in METRICS:
                    assert (f"{split}.{setting}.{m}_at_{k}" in values) == has_users
    on_disk = json.loads(
        (trained.paths.warehouse_root / "models" / f"ds={DS}" / "als_multi" / "metrics.json").read_text()
    )
    assert values["test.standard.NDCG_at_10"] == pytest.approx(on_disk["test"]["standard"]["NDCG@10"])
    assert values["floor.popularity.validation.standard.NDCG_at_20"] >= 0
    curve = client.get_metric_history(run.info.run_id, "train.loss")
    assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and len(curve) == meta["epochs_run"]
    files = {a.path for d in ("plots", "evaluation") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/training_curves.png", "plots/metrics_by_k_test.png", "evaluation/metrics.json"} <= files


def _context_rows(data, users: np.ndarray, bought) -> pd.DataFrame:
    """Input rows of fixture users in the fixture's own context (ids u<idx> / i<idx>)."""

    def ids(m, u):
        return [f"i{i}" for i in m.indices[m.indptr[u] : m.indptr[u + 1]]]

    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "visited": [ids(data.visited, u) for u in users],
            "bought": [ids(bought, u) for u in users],
            "history_items": [[] for _ in users],
            "history_behaviors": [[] for _ in users],
        }
    )


def test_pyfunc_by_alias_predicts_the_in_process_top_k_from_the_context_it_is_given(trained, champion):
    tracking.connect(trained)
    model = load_for_scoring(f"models:/{trained.mlflow.registered_model}@champion")
    local, data, _ = load_trained(trained.paths.warehouse_root, DS, "als_multi")
    bought = known_purchases(data)
    frame = _context_rows(data, np.arange(80), bought)
    got = model.predict(frame, params={"k": 10})

    recs = recommend(local, Context.of_training(data, np.arange(80)), bought, 10, batch_size=7)
    want = to_frame(
        recs, np.array([f"u{u}" for u in range(80)], object), np.array([f"i{i}" for i in range(50)], object)
    )
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_exact=True)
    # Bought items are never recommended; item_type follows the visited set it was given.
    u = got.user_id.str[1:].astype(int).to_numpy()
    i = got.item_id.str[1:].astype(int).to_numpy()
    assert not np.asarray(bought[u, i]).any()
    assert (got.item_type == "visited").to_numpy().tolist() == (
        np.asarray(data.visited[u, i]).ravel() > 0
    ).tolist()

    # A later night: u0 has viewed one more item and bought another; the model reads that context.
    row = frame.iloc[[0]].copy()
    top = got[got.user_id == "u0"].item_id.tolist()
    seen, buys = top[0], top[1]
    row.at[row.index[0], "visited"] = [*row.iloc[0]["visited"], seen]
    row.at[row.index[0], "bought"] = [*row.iloc[0]["bought"], buys]
    later = model.predict(row, params={"k": 10})
    assert buys not in set(later.item_id) and len(later) == 10
    assert later.set_index("item_id").loc[seen, "item_type"] == "visited"


def test_every_user_gets_k_rows_and_the_fallback_serves_unknown_users_from_the_catalogue(trained, champion):
    tracking.connect(trained)
    model = load_for_scoring(f"models:/{trained.mlflow.registered_model}@champion")
    newcomer = pd.DataFrame(
        {
            "user_id": ["never-seen", "u1"],
            "visited": [["i7", "zz-new-item"], []],
            "bought": [["i3"], []],
            "history_items": [["i7"], []],
            "history_behaviors": [["view"], []],
        }
    )
    catalogue = [f"i{i}" for i in (3, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27)] + ["zz-new-item"]
    got = model.predict(newcomer, params={"k": 10, "catalogue": catalogue})
    assert got.groupby("user_id").size().to_dict() == {"never-seen": 10, "u1": 10}
    new = got[got.user_id == "never-seen"]
    # The catalogue's popularity order, minus what the user bought.
    assert new.item_id.tolist() == catalogue[1:11] and set(new.expert) == {FALLBACK}
    assert new.set_index("item_id").loc["i7", "item_type"] == "visited"
    assert (new.set_index("item_id").drop(index="i7").item_type == "unvisited").all()
    # A known user ranks only catalogue items the model knows; the model's own rows come first.
    known = got[got.user_id == "u1"]
    assert set(known.item_id) <= set(catalogue) and "zz-new-item" not in set(known.item_id)
    assert (known.expert != FALLBACK).all() or known.expert.tolist().index(FALLBACK) == (
        known.expert != FALLBACK
    ).sum()


def test_registering_the_same_run_again_reuses_its_version(trained, champion):
    assert register(trained, DS, "als_multi") == champion


def test_a_model_whose_signature_does_not_fit_the_scorer_is_refused(trained, tmp_path):
    from mlflow.models import infer_signature

    class ByCustomer(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    tracking.connect(trained)
    example = pd.DataFrame({"customer": ["a"]})
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ByCustomer(),
            signature=infer_signature(example, example),
            pip_requirements=["mlflow"],
        )
    with pytest.raises(SignatureMismatch, match="string column user_id"):
        load_for_scoring(info.model_uri)
