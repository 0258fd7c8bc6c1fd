"""The catalogue's JSON documents: one way in and out, undeclared or mistyped keys refused."""

from __future__ import annotations

import json

import pytest

from infra.tables import (
    BENCHMARK_BUNDLE,
    EVENTS_BUNDLE,
    HOLDOUT,
    MODEL_RUNS,
    REFIT,
    RUN_KS,
    RUN_SETTINGS,
    ModelMeta,
    ModelMetrics,
    TrainingManifest,
    read_manifest,
    read_meta,
    read_metrics,
    run_metric_column,
    write_manifest,
    write_meta,
    write_metrics,
)


def _events_manifest() -> TrainingManifest:
    return TrainingManifest(
        ds="2020-01-03",
        kind=EVENTS_BUNDLE,
        protocol="global_time",
        validation_design=REFIT,
        cutoff="2020-01-03T00:00:00+00:00",
        seed=1,
        val_user_fraction=0.5,
        observation_window=["2020-01-01", "2020-01-03"],
        sources=["shop"],
        validation_start="2020-01-02T00:00:00+00:00",
        checksums={"interactions": "00ff-3"},
    )


def test_a_manifest_round_trips_and_writes_only_its_kinds_keys(tmp_path):
    manifest = _events_manifest()
    write_manifest(tmp_path, manifest)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert "benchmark" not in raw and "declared_size" not in raw
    assert raw["sources"] == ["shop"] and raw["eval_mask"]["test"] == "train_purchases"
    back = read_manifest(tmp_path)
    assert back == manifest and back.cutoff_time.isoformat() == manifest.cutoff
    bench = TrainingManifest(
        ds="tmall", kind=BENCHMARK_BUNDLE, protocol="member_tmall", validation_design=HOLDOUT
    )
    write_manifest(tmp_path, bench)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert "benchmark" in raw and "observation_window" not in raw and "sources" not in raw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stat": {}}, "not declared"),
        ({"seed": "1"}, "seed must be int"),
        ({"seed": True}, "seed must be int"),
        ({"checksums": None}, "checksums must be object"),
    ],
)
def test_a_manifest_with_an_undeclared_or_mistyped_key_is_refused(tmp_path, change, message):
    write_manifest(tmp_path, _events_manifest())
    raw = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(ValueError, match=message):
        read_manifest(tmp_path)


def test_model_json_keeps_its_class_key_and_reads_older_files(tmp_path):
    write_meta(tmp_path, ModelMeta(name="als", model_class="als", config={"factors": 8}, training_dir="t"))
    raw = json.loads((tmp_path / "model.json").read_text())
    assert raw["class"] == "als" and "model_class" not in raw
    # A model trained before refitted and refit_epochs were written still loads.
    (tmp_path / "model.json").write_text(json.dumps({"name": "als", "config": {}, "training_dir": "t"}))
    assert read_meta(tmp_path).refit_epochs is None


def test_metrics_leave_out_a_split_that_was_not_evaluated(tmp_path):
    write_metrics(tmp_path, ModelMetrics(model="als", ds="d", test={"standard": {"users": 3}}))
    raw = json.loads((tmp_path / "metrics.json").read_text())
    assert list(raw) == ["model", "ds", "eval_mask", "test"]
    assert read_metrics(tmp_path).splits() == {"test": {"standard": {"users": 3}}}


def test_model_runs_columns_name_metrics_the_evaluator_computes():
    from training.evaluate import KS, SETTINGS

    assert set(RUN_SETTINGS) <= set(SETTINGS) and set(RUN_KS) <= set(KS)
    assert run_metric_column("test", "standard", "NDCG@20") in MODEL_RUNS.column_names
    assert run_metric_column("validation", "tail_items", "users") in MODEL_RUNS.column_names
