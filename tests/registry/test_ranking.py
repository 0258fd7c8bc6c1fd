"""The second stage through the real registry: `rank` trains AW-MoE over the retrieval champion,
registers it in its own registered model tagged with the retriever version, promotes it only when
the two-stage list beats the retriever's own; scoring serves it only over that retriever."""

from __future__ import annotations

import json

import pytest
import yaml

from infra.settings import DEFAULT_PROMOTION_POLICY
from infra.tables import MODEL_RANKER, model_dir
from tests.conftest import settings_under
from tests.registry.conftest import DS
from tests.training.test_awmoe import SMALL
from tests.training.test_sequence_models import planted_tables
from training import tracking
from training.data import write_training_bundle
from training.pyfunc import load_for_scoring
from training.ranking import ranker_settings, run_rank
from training.registry import alias_version, promote, register
from training.score import serving_champion
from training.train_evaluate import run_evaluate, run_train

#: test_awmoe's small ranker; its candidates come from the setting (all 48 items here).
RANKER = {
    **{k: v for k, v in SMALL.items() if k != "candidates"},
    "train": {"epochs": 15, "patience": 15, "batch_size": 32, "lr": 1e-2},
}


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """Popularity as the retrieval champion of a planted log (a view of A is followed by a purchase
    of B(A)), then `rank` with AW-MoE re-ranking all 48 items."""
    base = tmp_path_factory.mktemp("ranking")
    policy = yaml.safe_load(DEFAULT_PROMOTION_POLICY.read_text())
    policy["floor_model"] = None  # popularity is the retriever here, and the floor would refuse it
    (base / "promotion.yaml").write_text(yaml.safe_dump(policy))
    settings = settings_under(
        base,
        {
            "ranking": {"model": "awmoe", "candidates": 48},
            "training": {"model_overrides": {"awmoe": RANKER}},
            "mlflow": {"promotion_policy": str(base / "promotion.yaml")},
        },
    )
    write_training_bundle(
        settings.paths.warehouse_root,
        DS,
        planted_tables(0, n_users=900),
        "planted",
        ["validation", "test"],
        validation_design="refit",
    )
    run_train(settings, DS, "popularity")
    run_evaluate(settings, DS, "popularity")
    retriever = register(settings, DS, "popularity")
    assert promote(settings, ds=DS).action == "promoted"
    return settings, retriever, run_rank(settings, DS)


def test_the_ranker_is_its_own_registered_model_tagged_with_its_retriever(ranked):
    settings, retriever, result = ranked
    rs = ranker_settings(settings)
    client = tracking.connect(rs)
    assert result["action"] == "promoted", result["summary"]
    assert alias_version(rs, client, "champion") == result["version"] == result["ranker_champion"]
    assert result["champion"] == retriever
    tags = client.get_model_version(rs.mlflow.registered_model, str(result["version"])).tags
    assert tags["funnelrec.retriever_version"] == str(retriever) and tags["funnelrec.model"] == "awmoe"
    assert json.loads(tags["promotion.gates"])  # the gates it passed are recorded on the version
    manifest = json.loads(
        (model_dir(settings.paths.warehouse_root, DS, "awmoe") / MODEL_RANKER.name).read_text()
    )
    assert manifest["label_leaks"] == 0 and manifest["retriever_version"] == retriever
    both = manifest["validation"]
    # The gate's own numbers: B after A is what the ranker learnt and popularity cannot know.
    assert both["two_stage"]["standard"]["NDCG@10"] > both["retriever"]["standard"]["NDCG@10"] + 0.1


def test_scoring_serves_the_ranker_only_over_the_retriever_it_was_trained_on(ranked):
    settings, retriever, result = ranked
    champ, why = serving_champion(settings)
    assert champ.version == result["version"] and champ.retriever_version == retriever, why
    model = load_for_scoring(champ.uri)
    frame = model.unwrap_python_model().training_context_frame([f"u{u}" for u in range(300, 320)], 10)
    rows = model.predict(frame, params={"k": 5})
    assert rows.groupby("user_id").size().eq(5).all() and len(rows) == 100
    assert rows["retriever_rank"].between(1, 48).all() and rows["ranker_score"].notna().all()
    assert rows["expert"].str.match(r"expert_\d").all()

    rs = ranker_settings(settings)
    client = tracking.connect(rs)
    client.set_model_version_tag(
        rs.mlflow.registered_model, str(result["version"]), "funnelrec.retriever_version", "999"
    )
    try:
        champ, why = serving_champion(settings)
        assert champ.version == retriever and "not the champion" in why
    finally:
        client.set_model_version_tag(
            rs.mlflow.registered_model, str(result["version"]), "funnelrec.retriever_version", str(retriever)
        )


def test_a_date_whose_retriever_is_not_the_champion_trains_no_ranker(ranked):
    settings, _, _ = ranked
    out = run_rank(settings, "2026-01-06")
    assert out["action"] == "skipped" and "was trained on 2026-01-05" in out["why"]
