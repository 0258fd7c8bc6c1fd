"""Champion/challenger promotion against a real MLflow store: the SQLite file and an `mlflow server`.

The gates are exercised with versions whose evaluation metrics are set by the test (a run per
version, metrics logged to it, a registered version pointing at a real logged pyfunc), so each case
hits exactly the gate it is about; `test_pyfunc.py` covers the real train -> register path.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.exceptions import MlflowException

from tests.conftest import REPO, settings_under
from tests.registry.conftest import DS, write_bundle
from tests.training.conftest import tiny_data
from training import registry, tracking
from training.registry import CHAMPION, PromotionError, aliases, promote, rollback

BASE = {"standard": 0.30, "visited": 0.40, "unvisited": 0.10}


def metrics(standard=1.0, visited=1.0, unvisited=1.0, users=200, floor=0.05) -> dict[str, float]:
    scale = {"standard": standard, "visited": visited, "unvisited": unvisited}
    out = {f"validation.{s}.NDCG_at_20": BASE[s] * scale[s] for s in BASE}
    out.update(
        {
            "validation.standard.users": users,
            "validation.visited.users": 150,
            "validation.unvisited.users": 50,
        }
    )
    out["floor.popularity.validation.standard.NDCG_at_20"] = floor
    return out


class Versions:
    """Registers versions with given metrics; the first one logs a real pyfunc the others reuse."""

    def __init__(self, settings, model_dir, tables):
        self.settings, self.model_dir, self.tables = settings, model_dir, tables
        self.client = tracking.connect(settings)
        self.exp = tracking.experiment_id(settings, self.client)
        self.source = None

    def add(self, values: dict[str, float], model: str = "als_multi") -> int:
        from mlflow.entities import Metric

        from training.pyfunc import log_pyfunc

        name = self.settings.mlflow.registered_model
        run = self.client.create_run(self.exp)
        self.client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in values.items()])
        if self.source is None:
            self.source = log_pyfunc(self.model_dir, self.tables, run.info.run_id, ["u0", "u1"])
        self.client.set_terminated(run.info.run_id)
        with contextlib.suppress(MlflowException):  # exists already
            self.client.create_registered_model(name)
        mv = self.client.create_model_version(
            name,
            self.source,
            run_id=run.info.run_id,
            tags={"funnelrec.ds": DS, "funnelrec.model": model},
            model_id=self.source.rsplit("/", 1)[-1],
        )
        return int(mv.version)

    def tags(self, version: int) -> dict[str, str]:
        return self.client.get_model_version(self.settings.mlflow.registered_model, str(version)).tags


@pytest.fixture
def versions(store, trained):
    model_dir = trained.paths.warehouse_root / "models" / f"ds={DS}" / "als_multi"
    tables = trained.paths.warehouse_root / "training" / f"ds={DS}"
    return Versions(store, model_dir, tables)


def champion(settings) -> int | None:
    return aliases(settings, tracking.connect(settings)).get(CHAMPION)


def test_better_challenger_is_promoted_and_rollback_restores_the_previous_champion(store, versions):
    v1 = versions.add(metrics())
    first = promote(store, version=v1)
    assert first.action == "promoted" and champion(store) == v1
    v2 = versions.add(metrics(standard=1.05, visited=1.02, unvisited=1.0))
    second = promote(store, version=v2)
    assert second.action == "promoted", second.summary()
    assert (second.champion_before, second.champion_after) == (v1, v2) and champion(store) == v2
    tags = versions.tags(v2)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.failed_gates"] == ""
    gates = {g["name"]: g for g in json.loads(tags["promotion.gates"])}
    assert gates["min_relative_gain"]["value"] == pytest.approx(0.315)
    assert gates["min_relative_gain"]["threshold"] == pytest.approx(0.303)

    back = rollback(store)
    assert (back.version, back.champion_after) == (v2, v1) and champion(store) == v1
    assert versions.tags(v2)["promotion.decision"] == "rolled_back"
    log = registry.history(store)
    assert [(e["action"], e["from"], e["to"]) for e in log] == [
        ("promote", None, v1),
        ("promote", v1, v2),
        ("rollback", v2, v1),
    ]
    with pytest.raises(PromotionError, match="nothing to roll back"):
        rollback(store)
    assert champion(store) == v1


def test_degraded_challenger_is_refused_naming_the_gate(store, versions):
    v1 = versions.add(metrics())
    promote(store, version=v1)
    v2 = versions.add(metrics(standard=0.8, visited=0.8, unvisited=0.8))
    d = promote(store, version=v2)
    assert d.action == "refused" and champion(store) == v1
    tags = versions.tags(v2)
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.failed_gates"] == "min_relative_gain,max_drop_unvisited,max_drop_visited"
    assert "failed gates: min_relative_gain" in tags["promotion.reason"]


def test_overall_gain_with_an_unvisited_regression_is_refused(store, versions):
    v1 = versions.add(metrics())
    promote(store, version=v1)
    v2 = versions.add(metrics(standard=1.10, visited=1.10, unvisited=0.90))
    d = promote(store, version=v2)
    assert d.action == "refused" and [g.name for g in d.failed] == ["max_drop_unvisited"]
    assert champion(store) == v1
    gate = {g["name"]: g for g in json.loads(versions.tags(v2)["promotion.gates"])}["max_drop_unvisited"]
    assert gate["passed"] is False
    assert gate["value"] == pytest.approx(0.09) and gate["threshold"] == pytest.approx(0.095)
    # Within the tolerance it passes.
    v3 = versions.add(metrics(standard=1.10, visited=1.10, unvisited=0.97))
    assert promote(store, version=v3).action == "promoted"


def test_first_champion_must_beat_the_floor_and_cover_enough_users(store, versions):
    below_floor = versions.add(metrics(floor=0.5))
    d = promote(store, version=below_floor)
    assert d.action == "refused" and [g.name for g in d.failed] == ["floor"]
    too_few = versions.add(metrics(users=10))
    assert [g.name for g in promote(store, version=too_few).failed] == ["min_users"]
    floor_itself = versions.add(metrics(), model="popularity")
    assert [g.name for g in promote(store, version=floor_itself).failed] == ["floor"]
    assert champion(store) is None


def test_alias_versions_are_ints_whether_the_store_returns_int_or_str(store, versions):
    v1 = versions.add(metrics())
    promote(store, version=v1)
    raw = versions.client.get_registered_model(store.mlflow.registered_model).aliases[CHAMPION]
    assert isinstance(raw, str if store.mlflow.tracking_uri else int)  # SQLite: int, REST: str
    assert aliases(store, versions.client)[CHAMPION] == v1 and isinstance(champion(store), int)
    # Re-promoting the champion is a no-op, not a refusal against itself.
    assert promote(store, version=v1).action == "already_champion"
    assert registry.as_version("7") == registry.as_version(7) == 7


def test_two_promotions_at_once_leave_exactly_one_outcome(tmp_path, trained):
    settings = settings_under(tmp_path, {"mlflow": {"lock_timeout_seconds": 60}})
    model_dir = trained.paths.warehouse_root / "models" / f"ds={DS}" / "als_multi"
    v = Versions(settings, model_dir, trained.paths.warehouse_root / "training" / f"ds={DS}")
    v1 = v.add(metrics())
    promote(settings, version=v1)
    a, b = v.add(metrics(standard=1.05)), v.add(metrics(standard=1.05))
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "paths": {"warehouse_root": str(settings.paths.warehouse_root)},
                "mlflow": {"lock_timeout_seconds": 60},
            }
        )
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "--config", str(cfg), "promote", "--version", str(x)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for x in (a, b)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    decisions = {x: v.tags(x)["promotion.decision"] for x in (a, b)}
    assert sorted(decisions.values()) == ["promoted", "refused"], decisions
    winner = next(x for x, d in decisions.items() if d == "promoted")
    loser = next(x for x in (a, b) if x != winner)
    assert champion(settings) == winner
    # The loser was judged against the winner (serialised by the lease), and its tags say so.
    assert v.tags(loser)["promotion.champion_before"] == str(winner)
    assert [e["to"] for e in registry.history(settings)] == [v1, winner]


def test_unreachable_registry_fails_clearly_after_bounded_retries(tmp_path):
    from tests.registry.conftest import _free_port

    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    settings = settings_under(
        tmp_path, {"mlflow": {"tracking_uri": uri, "max_retries": 2, "backoff_seconds": 0}}
    )
    start = time.monotonic()
    with pytest.raises(tracking.RegistryUnavailable, match=r"unreachable .* after 2 retries"):
        promote(settings, version=1)
    assert time.monotonic() - start < 60


def test_no_challenger_is_a_clear_error(store):
    with pytest.raises(PromotionError, match="no @challenger"):
        promote(store)


def test_mlproject_entry_points_call_the_cli():
    from infra.cli import build_parser

    spec = yaml.safe_load((REPO / "mlflow" / "MLproject").read_text())
    assert set(spec["entry_points"]) >= {"train", "evaluate"}
    for name, entry in spec["entry_points"].items():
        command = entry["command"].split("&& ", 1)[1]
        values = {p: "2015-09-18" if p == "date" else "member" for p in entry.get("parameters", {})}
        argv = command.format(**values).split()
        assert argv[0] == "funnelrec", name
        args = build_parser().parse_args(argv[1:])
        assert args.command == name


def test_policy_file_is_the_documented_default():
    from infra.settings import load_settings

    policy = registry.Policy.load(load_settings(environ={}).mlflow.promotion_policy)
    assert policy.key() == "validation.standard.NDCG_at_20"
    assert policy.floor_model == "popularity" and set(policy.max_relative_drop) == {"visited", "unvisited"}


def test_bundle_fixture_round_trips(tmp_path):
    from training.data import load_training_data

    data = tiny_data()
    loaded = load_training_data(write_bundle(data, tmp_path))
    assert (loaded.purchases != data.purchases).nnz == 0 and (loaded.visited != data.visited).nnz == 0
    assert {s: len(v[0]) for s, v in loaded.heldout.items()} == {
        s: len(v[0]) for s, v in data.heldout.items()
    }
