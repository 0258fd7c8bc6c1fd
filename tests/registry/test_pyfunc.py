"""The real path: train -> evaluate (tracked) -> register -> promote -> load by alias -> predict."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlflow
from infra.tables import EVAL_MASK, FALLBACK, TRAINING, model_dir, read_manifest, read_meta, read_metrics
from tests.registry.conftest import DS
from training import tracking
from training.artifacts import load_trained
from training.evaluate import KS, METRICS, SETTINGS
from training.models.base import Context
from training.pyfunc import (
    NOT_SERVED_IMPORTS,
    PIP_REQUIREMENTS_PACKAGES,
    SignatureMismatch,
    bundled_modules,
    load_for_scoring,
)
from training.recommend import known_purchases, recommend, to_frame
from training.registry import promote, register


@pytest.fixture(scope="module")
def champion(trained):
    version = register(trained, DS, "als_multi")
    decision = promote(trained, ds=DS)
    assert decision.action == "promoted", decision.summary()
    return version


def test_tracked_run_has_params_tags_curves_metrics_and_artifacts(trained):
    client = tracking.connect(trained)
    model_path = model_dir(trained.paths.warehouse_root, DS, "als_multi")
    meta = read_meta(model_path)
    run = client.get_run(meta.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params, tags, values = run.data.params, run.data.tags, run.data.metrics
    assert params["factors"] == str(meta.config["factors"]) and params["seed"] == "42"
    checksums = read_manifest(TRAINING.dir(trained.paths.warehouse_root, DS)).checksums
    assert params["data.ds"] == DS and params["data.checksum.interactions"] == checksums["interactions"]
    assert tags["funnelrec.model_family"] == "als" and tags["funnelrec.dataset"] == "tiny"
    assert tags["eval.mask"] == str(EVAL_MASK) and tags["eval.split"] == "fixture"
    assert len(tags["mlflow.source.git.commit"]) == 40
    for split in ("validation", "test"):
        for setting in SETTINGS:
            # A setting without users has no metrics (null, not 0); every other has all of them.
            has_users = values[f"{split}.{setting}.users"] > 0
            for k in KS:
                assert (f"{split}.{setting}.chance_HR_at_{k}" in values) == has_users
                for m in METRICS:
                    assert (f"{split}.{setting}.{m}_at_{k}" in values) == has_users
    on_disk = read_metrics(model_path)
    assert values["test.standard.NDCG_at_10"] == pytest.approx(on_disk.test["standard"]["NDCG@10"])
    assert values["floor.popularity.validation.standard.NDCG_at_20"] >= 0
    curve = client.get_metric_history(run.info.run_id, "train.loss")
    assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and len(curve) == meta.epochs_run
    files = {a.path for d in ("plots", "evaluation") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/training_curves.png", "plots/metrics_by_k_test.png", "evaluation/metrics.json"} <= files


def test_the_floor_is_measured_once_per_date_and_bundle(trained):
    from infra.tables import floor_metrics_path
    from training.artifacts import training_dir
    from training.train_evaluate import _floor_metrics, load_views

    wh = trained.paths.warehouse_root
    path = floor_metrics_path(wh, DS, "popularity")
    saved = json.loads(path.read_text())  # written by the tracked evaluate of the fixture
    run = tracking.connect(trained).get_run(read_meta(model_dir(wh, DS, "als_multi")).mlflow_run_id)
    logged = run.data.metrics["floor.popularity.validation.standard.NDCG_at_20"]
    assert saved["metrics"]["validation"]["standard"]["NDCG@20"] == pytest.approx(logged)
    views = dict(zip(("validation", "test"), load_views(training_dir(wh, DS)), strict=True))
    splits = ("validation", "test")
    saved["metrics"]["test"]["standard"]["NDCG@20"] = -1.0  # a marker only the saved file holds
    path.write_text(json.dumps(saved))
    assert _floor_metrics(trained, DS, "popularity", views, splits)["test"]["standard"]["NDCG@20"] == -1.0
    saved["key"]["checksums"] = {"interactions": "another-bundle"}  # the tables were rebuilt
    path.write_text(json.dumps(saved))
    fresh = _floor_metrics(trained, DS, "popularity", views, splits)
    assert fresh["validation"]["standard"]["NDCG@20"] == pytest.approx(logged)
    assert fresh["test"]["standard"]["NDCG@20"] >= 0
    assert json.loads(path.read_text())["metrics"] == json.loads(json.dumps(fresh))


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
    # A known user ranks only catalogue items the model knows.
    known = got[got.user_id == "u1"]
    assert set(known.item_id) <= set(catalogue) and (known.expert != FALLBACK).all()
    # With K = 13 the model runs out after the 12 catalogue items it knows: the fallback adds the
    # one it does not, ranked after them.
    longer = model.predict(newcomer[newcomer.user_id == "u1"], params={"k": 13, "catalogue": catalogue})
    assert longer["rank"].tolist() == list(range(1, 14))
    assert (longer.expert.iloc[:12] != FALLBACK).all() and longer.iloc[12][
        ["item_id", "expert"]
    ].tolist() == [
        "zz-new-item",
        FALLBACK,
    ]


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


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_with(names) -> set[str]:
    """The distributions ``names`` install: themselves and their dependencies, transitively
    (extras left out), as far as this environment has them."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    todo, seen = [_canonical(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_canonical(req.name))
    return seen


def test_pip_requirements_name_every_distribution_the_bundled_code_imports(trained, champion):
    from importlib.metadata import packages_distributions

    modules, external = bundled_modules()
    assert {"training.pyfunc", "training.models.member", "training.trainer", "infra.tables"} <= set(modules)
    assert "infra.cli" not in modules and "training.registry" not in modules  # not needed to serve
    owners = packages_distributions()
    required = {_canonical(p) for p in PIP_REQUIREMENTS_PACKAGES}
    missing = {
        top: sorted(where)
        for top, where in external.items()
        if top not in NOT_SERVED_IMPORTS and not {_canonical(d) for d in owners.get(top, [])} & required
    }
    assert not missing, f"imported by the bundle but not in its pip requirements: {missing}"
    assert {"implicit", "tqdm", "threadpoolctl"} <= set(external)
    tracking.connect(trained)
    local = mlflow.artifacts.download_artifacts(f"models:/{trained.mlflow.registered_model}@champion")
    logged = {line.split("==")[0] for line in (Path(local) / "requirements.txt").read_text().split()}
    assert {_canonical(p) for p in logged} == required


BLOCKED_LOAD = """
import importlib.abc, importlib.machinery, json, sys, sysconfig
allowed = set(json.loads(sys.argv[2]))
stdlib = tuple(sysconfig.get_paths(vars={"installed_base": sys.base_prefix, "platbase": sys.base_exec_prefix,
    "base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix})[k] for k in ("stdlib", "platstdlib"))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in allowed or top in sys.stdlib_module_names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        origin = str(getattr(spec, "origin", ""))
        if origin.startswith(stdlib) and "site-packages" not in origin:  # private stdlib modules
            return None
        raise ModuleNotFoundError(f"{name} is not in the logged model's requirements", name=name)
# The checkout is installed in editable mode: without its finder only the bundled code is importable.
sys.meta_path = [Blocker()] + [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path = [p for p in sys.path if p not in ("", ".") and "__editable__" not in p]
import mlflow.pyfunc
import pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame(json.loads(sys.argv[3]))
out = model.predict(frame, params={"k": 5})
print(json.dumps({"rows": len(out), "pyfunc": sys.modules["training.pyfunc"].__file__}))
"""


def test_the_logged_model_loads_and_predicts_with_only_its_requirements_importable(
    trained, champion, tmp_path
):
    from importlib.metadata import packages_distributions

    tracking.connect(trained)
    local = mlflow.artifacts.download_artifacts(
        f"models:/{trained.mlflow.registered_model}@champion", dst_path=str(tmp_path / "model")
    )
    installed = _installed_with(PIP_REQUIREMENTS_PACKAGES)
    allowed = sorted(
        top for top, dists in packages_distributions().items() if {_canonical(d) for d in dists} & installed
    )
    frame = {"user_id": ["u1", "stranger"], "visited": [["i1"], []], "bought": [[], ["i2"]]}
    frame.update(history_items=[["i1"], []], history_behaviors=[["view"], []])
    script = tmp_path / "load.py"
    script.write_text(BLOCKED_LOAD)
    done = subprocess.run(
        [sys.executable, str(script), local, json.dumps([*allowed, "training", "infra"]), json.dumps(frame)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["rows"] == 10 and out["pyfunc"].startswith(str(tmp_path / "model"))
