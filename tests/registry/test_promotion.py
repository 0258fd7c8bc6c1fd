"""Champion/challenger promotion against a real MLflow store: the SQLite file and an `mlflow server`.

The gates themselves are checked on per-user values set by the test (``evaluate_gates``), so each
case hits exactly the gate it is about. The registry paths run against real registered versions:
where a case needs chosen per-user values, ``measure_version`` (our measurement of a version,
tested on its own below) returns the test's values; where it is about measuring, real models are
measured on real bundles and checked against an independent evaluator run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.exceptions import MlflowException

from tests.conftest import REPO, settings_under
from tests.registry.conftest import DS, copy_models, write_bundle
from tests.training.conftest import tiny_data
from training import registry, tracking
from training.comparison import Measured, paired
from training.evaluate import KS, PerUser, evaluate_scores
from training.registry import (
    CHAMPION,
    FAIL,
    NOT_EVALUABLE,
    PASS,
    Policy,
    PromotionError,
    aliases,
    evaluate_gates,
    promote,
    rollback,
)

POLICY = Policy(floor_model=None)
RNG_BASE = np.random.default_rng(7).uniform(0.05, 0.6, 400)  # a champion's per-user NDCG@20


def measured(
    scale: float = 1.0,
    visited: float | None = None,
    unvisited: float | None = None,
    users=200,
    n_visited=150,
    n_unvisited=50,
) -> Measured:
    """Per-user values: the fixed base values times ``scale`` (per setting), every metric and K alike."""

    def setting(n: int, factor: float) -> PerUser:
        v = np.repeat((RNG_BASE[:n] * factor)[:, None], 3 * len(KS), axis=1)
        return PerUser(np.arange(n), v, np.full(n, 100), np.full((n, len(KS)), 0.1))

    return Measured(
        {
            "standard": setting(users, scale),
            "visited": setting(n_visited, scale if visited is None else visited),
            "unvisited": setting(n_unvisited, scale if unvisited is None else unvisited),
        }
    )


def by_name(gates):
    return {g.name: g for g in gates}


# -- the gates on chosen per-user values ------------------------------------------------------------
def test_the_champion_against_itself_fails_the_gain_gate_and_passes_the_refresh_gate():
    m = measured()
    challenge = by_name(evaluate_gates(POLICY, "challenge", m, m))
    assert challenge["min_relative_gain"].status == FAIL
    assert challenge["min_relative_gain"].change == 0.0 and challenge["min_relative_gain"].low == 0.0
    refresh = by_name(evaluate_gates(POLICY, "refresh", m, m))
    assert refresh["refresh_non_inferiority"].status == PASS and "min_relative_gain" not in refresh
    # A refresh clearly worse beyond the margin is refused; a slightly worse one is kept.
    assert (
        by_name(evaluate_gates(POLICY, "refresh", measured(0.8), m))["refresh_non_inferiority"].status == FAIL
    )
    assert (
        by_name(evaluate_gates(POLICY, "refresh", measured(0.99), m))["refresh_non_inferiority"].status
        == PASS
    )


def test_the_bootstrap_interval_is_identical_for_a_seed_and_differs_for_another():
    rng = np.random.default_rng(3)
    theirs = rng.uniform(0, 1, 300)
    mine = theirs + rng.normal(0.02, 0.1, 300)
    a, b, c = paired(mine, theirs, seed=1), paired(mine, theirs, seed=1), paired(mine, theirs, seed=2)
    assert (a.diff_low, a.diff_high, a.change_low) == (b.diff_low, b.diff_high, b.change_low)
    assert (a.diff_low, a.diff_high) != (c.diff_low, c.diff_high)
    assert a.diff_low < mine.mean() - theirs.mean() < a.diff_high
    assert a.mine == pytest.approx(mine.mean()) and a.users == 300


def test_gain_needs_the_relative_gain_and_an_interval_that_excludes_a_loss():
    gates = by_name(evaluate_gates(POLICY, "challenge", measured(1.05), measured()))
    g = gates["min_relative_gain"]
    assert g.status == PASS and g.change == pytest.approx(0.05) and g.users == 200
    assert g.value == pytest.approx(RNG_BASE[:200].mean() * 1.05) and g.champion_value == pytest.approx(
        RNG_BASE[:200].mean()
    )
    # +5% on average, but +-0.3 user by user (summing to zero): the interval no longer excludes a loss.
    noisy = measured(1.05)
    pu = noisy.per_user["standard"]
    swing = np.where(np.arange(len(pu.users)) % 2 == 0, 0.3, -0.3)[:, None]
    noisy.per_user["standard"] = PerUser(pu.users, pu.values + swing, pu.candidates, pu.chance)
    g = by_name(evaluate_gates(POLICY, "challenge", noisy, measured()))["min_relative_gain"]
    assert g.status == FAIL and g.low < 0


def test_drops_are_judged_on_the_same_users_and_thin_settings_are_not_evaluable():
    gates = by_name(evaluate_gates(POLICY, "challenge", measured(1.10, unvisited=0.90), measured()))
    assert gates["max_drop_unvisited"].status == FAIL and gates["max_drop_unvisited"].change == pytest.approx(
        -0.10
    )
    assert gates["max_drop_visited"].status == PASS
    thin = by_name(
        evaluate_gates(
            POLICY, "challenge", measured(1.10, unvisited=0.5, n_unvisited=7), measured(n_unvisited=7)
        )
    )
    assert thin["max_drop_unvisited"].status == NOT_EVALUABLE and thin["max_drop_unvisited"].users == 7
    assert "not evaluable" in thin["max_drop_unvisited"].detail
    assert not [g for g in thin.values() if g.status == FAIL]


def test_missing_measurements_and_too_few_users_refuse_by_name():
    assert [(g.name, g.status) for g in evaluate_gates(POLICY, "challenge", None, measured())] == [
        ("primary_metric", FAIL)
    ]
    bad_metric = Policy(floor_model=None, primary_metric="standard.NDCG_at_15")
    assert evaluate_gates(bad_metric, "first", measured())[0].name == "primary_metric"
    gates = by_name(evaluate_gates(POLICY, "challenge", measured(1.2), None, champion_error="OSError: gone"))
    assert gates["champion_measured"].status == FAIL and "OSError: gone" in gates["champion_measured"].detail
    few = by_name(evaluate_gates(POLICY, "first", measured(users=10)))
    assert few["min_users"].status == FAIL


def test_the_floor_is_beaten_on_the_same_users_and_never_by_itself():
    policy = Policy()
    gates = by_name(evaluate_gates(policy, "first", measured(), floor=measured(1.2), model_name="als"))
    assert gates["floor"].status == FAIL
    assert by_name(evaluate_gates(policy, "first", measured(), floor=measured(0.5)))["floor"].status == PASS
    own = by_name(evaluate_gates(policy, "first", measured(), floor=measured(0.5), model_name="popularity"))
    assert own["floor"].status == FAIL
    assert by_name(evaluate_gates(policy, "first", measured()))["floor"].status == FAIL  # no floor measured


# -- the registry ------------------------------------------------------------------------------------
class Versions:
    """Registers real versions (one logged pyfunc reused) tagged with a date, model and config."""

    def __init__(self, settings, model_dir, tables):
        self.settings, self.model_dir, self.tables = settings, model_dir, tables
        self.client = tracking.connect(settings)
        self.exp = tracking.experiment_id(settings, self.client)
        self.source = None

    def add(self, model: str = "als_multi", ds: str = DS, config: str = "c1", own_model: bool = False) -> int:
        """``own_model``: log a pyfunc for this version alone (else one logged model is shared)."""
        from training.pyfunc import log_pyfunc

        name = self.settings.mlflow.registered_model
        if not (self.settings.paths.warehouse_root / "training" / f"ds={ds}").is_dir():
            write_bundle(tiny_data(), self.settings.paths.warehouse_root, ds)  # the date's held-out pairs
        run = self.client.create_run(self.exp)
        source = self.source
        if source is None or own_model:
            source = log_pyfunc(self.model_dir, self.tables, run.info.run_id, ["u0", "u1"])
            self.source = self.source or source
        self.client.set_terminated(run.info.run_id)
        with contextlib.suppress(MlflowException):  # exists already
            self.client.create_registered_model(name)
        mv = self.client.create_model_version(
            name,
            source,
            run_id=run.info.run_id,
            tags={"funnelrec.ds": ds, "funnelrec.model": model, "funnelrec.config": config},
            model_id=source.rsplit("/", 1)[-1],
        )
        return int(mv.version)

    def tags(self, version: int) -> dict[str, str]:
        return self.client.get_model_version(self.settings.mlflow.registered_model, str(version)).tags


def _with_policy(settings, tmp_path, **policy):
    base = yaml.safe_load((REPO / "mlflow" / "promotion.yaml").read_text())
    base.update(policy)
    path = tmp_path / "promotion.yaml"
    path.write_text(yaml.safe_dump(base))
    return settings.model_copy(
        update={"mlflow": settings.mlflow.model_copy(update={"promotion_policy": path})}
    )


@pytest.fixture
def versions(store, trained):
    copy_models(trained, store)
    model_dir = trained.paths.warehouse_root / "models" / f"ds={DS}" / "als_multi"
    tables = trained.paths.warehouse_root / "training" / f"ds={DS}"
    return Versions(store, model_dir, tables)


@pytest.fixture
def chosen(monkeypatch):
    """``measure_version`` returns the test's per-user values for each version."""
    values: dict[int, Measured | None] = {}

    def fake(settings, version, target, split, work):
        if values.get(version) is None:
            raise OSError(f"version {version} could not be read")
        return values[version]

    monkeypatch.setattr(registry, "measure_version", fake)
    return values


def first_champion(settings, versions, chosen, ds: str) -> int:
    """Register a version for ``ds`` with the base per-user values and promote it (no champion yet)."""
    v = versions.add(ds=ds)
    chosen[v] = measured()
    d = promote(settings, ds=ds)
    assert d.action == "promoted" and d.candidates[0].kind == "first", d.summary()
    return v


#: For tests of the gates' decisions: they make the same store calls as the promotion and rollback test,
#: which runs on both stores (with the alias, no-challenger and goes-away tests on the server).
ON_SQLITE = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


def champion(settings) -> int | None:
    return aliases(settings, tracking.connect(settings)).get(CHAMPION)


def test_better_challenger_is_promoted_and_rollback_restores_the_previous_champion(
    store, versions, chosen, tmp_path
):
    settings = _with_policy(store, tmp_path, floor_model=None)
    v1 = first_champion(settings, versions, chosen, "2026-01-04")
    assert champion(store) == v1
    v2 = versions.add(model="member")
    chosen[v2] = measured(1.05)
    second = promote(settings, ds=DS)
    assert second.action == "promoted", second.summary()
    assert (second.champion_before, second.champion_after) == (v1, v2) and champion(store) == v2
    tags = versions.tags(v2)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.failed_gates"] == ""
    assert tags["promotion.kind"] == "challenge"
    gate = {g["name"]: g for g in json.loads(tags["promotion.gates"])}["min_relative_gain"]
    assert gate["change"] == pytest.approx(0.05) and gate["threshold"] == pytest.approx(0.01)

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


@ON_SQLITE
def test_the_best_version_that_passes_is_promoted_and_the_decisions_table_says_why(
    store, versions, chosen, tmp_path
):
    settings = _with_policy(store, tmp_path, floor_model=None)
    v1 = first_champion(settings, versions, chosen, "2026-01-04")
    best = versions.add(model="member")  # best on the primary metric, but loses 10% on unvisited
    chosen[best] = measured(1.10, unvisited=0.90)
    second = versions.add(model="lightgcn")  # a smaller gain, no drop
    chosen[second] = measured(1.04)
    worse = versions.add(model="popularity")
    chosen[worse] = measured(0.7)
    thin = versions.add(model="bpr")  # unreadable: refused by name, never silently dropped
    chosen[thin] = None
    d = promote(settings, ds=DS)
    assert d.action == "promoted" and champion(store) == second, d.summary()
    assert [(c.version, c.outcome) for c in d.candidates] == [
        (best, "refused"),
        (second, "promoted"),
        (worse, "refused"),
        (thin, "refused"),
    ]
    assert versions.tags(best)["promotion.failed_gates"] == "max_drop_unvisited"
    assert versions.tags(thin)["promotion.failed_gates"] == "primary_metric"
    rows = pq.read_table(store.paths.warehouse_root / "decisions" / f"ds={DS}").to_pylist()
    assert {(r["version"], r["gate"], r["status"]) for r in rows} >= {
        (best, "max_drop_unvisited", "fail"),
        (second, "min_relative_gain", "pass"),
        (worse, "min_relative_gain", "fail"),
        (thin, "primary_metric", "fail"),
    }
    assert {r["champion_before"] for r in rows} == {v1} and {r["champion_after"] for r in rows} == {second}
    # The date is decided: promoting it again changes nothing.
    assert promote(settings, ds=DS).action == "already_champion" and champion(store) == second


@ON_SQLITE
def test_a_refresh_replaces_the_champion_unless_shown_worse_and_a_champion_that_cannot_be_read_refuses(
    store, versions, chosen, tmp_path
):
    settings = _with_policy(store, tmp_path, floor_model=None)
    first_champion(settings, versions, chosen, "2026-01-03")
    refresh = versions.add(ds="2026-01-04")  # same model and config, retrained: slightly worse is fine
    chosen[refresh] = measured(0.98)
    d = promote(settings, ds="2026-01-04")
    assert d.action == "promoted" and d.candidates[0].kind == "refresh" and champion(store) == refresh
    challenger = versions.add(model="member")
    chosen[challenger] = measured(1.5)
    chosen[refresh] = None  # the champion's files are gone
    d = promote(settings, ds=DS)
    assert d.action == "refused" and champion(store) == refresh
    assert versions.tags(challenger)["promotion.failed_gates"] == "champion_measured"


@ON_SQLITE
def test_a_date_older_than_the_champions_never_replaces_it(store, versions, chosen, tmp_path):
    settings = _with_policy(store, tmp_path, floor_model=None)
    newer = first_champion(settings, versions, chosen, "2026-01-09")
    older = versions.add(model="member")  # a backfill of an earlier date, however good
    chosen[older] = measured(2.0)
    d = promote(settings, ds=DS)
    assert d.action == "refused" and [g.name for g in d.failed] == ["date_order"] and champion(store) == newer


@ON_SQLITE
def test_first_champion_must_beat_the_floor_and_cover_enough_users(store, versions, chosen):
    below_floor = versions.add()
    chosen[below_floor] = measured(0.0)  # the real popularity floor, fitted on the tiny bundle, is above 0
    d = promote(store, version=below_floor)
    assert d.action == "refused" and [g.name for g in d.failed] == ["floor"]
    too_few = versions.add()
    chosen[too_few] = measured(users=10)
    assert "min_users" in [g.name for g in promote(store, version=too_few).failed]
    floor_itself = versions.add(model="popularity")
    chosen[floor_itself] = measured()
    assert [g.name for g in promote(store, version=floor_itself).failed] == ["floor"]
    assert champion(store) is None


# -- measuring real versions ------------------------------------------------------------------------
def test_a_version_measured_on_its_own_date_reproduces_its_logged_metrics(trained, tmp_path):
    from training.data import load_training_data
    from training.evaluate import summarize

    version = registry.register(trained, DS, "als_multi")
    target = load_training_data(trained.paths.warehouse_root / "training" / f"ds={DS}", "validation")
    again = summarize(registry.measure_version(trained, version, target, "validation", tmp_path).per_user)
    logged = json.loads(
        (trained.paths.warehouse_root / "models" / f"ds={DS}" / "als_multi" / "metrics.json").read_text()
    )
    assert again == logged["validation"]


def test_the_champion_is_measured_on_the_challengers_split_as_an_independent_evaluator_measures_it(
    trained, tmp_path
):
    from training.artifacts import load_trained
    from training.data import load_training_data
    from training.train_evaluate import run_evaluate, run_train

    # A warehouse of its own, on the trained fixture's store (its runs), under another model name.
    store = {"tracking_uri": trained.mlflow_tracking_uri, "registered_model": "funnelrec_sameday"}
    settings = settings_under(
        tmp_path, {"mlflow": {**store, "promotion_policy": str(trained.mlflow.promotion_policy)}}
    )
    copy_models(trained, settings)
    champ = registry.register(settings, DS, "als_multi")
    assert promote(settings, version=champ).action == "promoted"
    # The next date: 60 of the 80 users, other histories; its own popularity model challenges.
    later = "2026-01-06"
    write_bundle(tiny_data(seed=1, n_users=60), settings.paths.warehouse_root, later)
    run_train(settings, later, "popularity")
    run_evaluate(settings, later, "popularity")
    challenger = registry.register(settings, later, "popularity")
    d = promote(settings, version=challenger)
    gate = by_name(d.candidates[0].gates)
    assert "min_relative_gain" in gate, d.summary()
    # Independently: the champion's own model on the later date's validation split. The user and
    # item ids u0..u59 / i0..i49 have the same indices in both bundles.
    target = load_training_data(settings.paths.warehouse_root / "training" / f"ds={later}", "validation")
    model, _, _ = load_trained(trained.paths.warehouse_root, DS, "als_multi")
    want = evaluate_scores(model.context_scorer(target), target, "validation")
    assert gate["min_relative_gain"].champion_value == pytest.approx(want["standard"]["NDCG@20"], abs=1e-12)
    assert gate["min_relative_gain"].users == want["standard"]["users"]
    tags = tracking.connect(settings).get_model_version("funnelrec_sameday", str(challenger)).tags
    logged = {g["name"]: g for g in json.loads(tags["promotion.gates"])}["min_relative_gain"]
    assert logged["champion_value"] == pytest.approx(want["standard"]["NDCG@20"], abs=1e-12)


def test_alias_versions_are_ints_whether_the_store_returns_int_or_str(store, versions, chosen, tmp_path):
    v1 = versions.add()
    chosen[v1] = measured()
    promote(_with_policy(store, tmp_path, floor_model=None), version=v1)
    raw = versions.client.get_registered_model(store.mlflow.registered_model).aliases[CHAMPION]
    assert isinstance(raw, str if store.mlflow.tracking_uri else int)  # SQLite: int, REST: str
    assert aliases(store, versions.client)[CHAMPION] == v1 and isinstance(champion(store), int)
    # Re-promoting the champion is a no-op, not a refusal against itself.
    assert promote(store, version=v1).action == "already_champion"
    assert registry.as_version("7") == registry.as_version(7) == 7


def test_a_lease_insert_lost_to_another_writer_is_told_apart_from_other_store_errors():
    """Two promotions that both saw no lease insert the tag at once; a database store refuses one
    insert on its unique key (seen once in CI as an IntegrityError). That one waits; others raise."""
    from sqlalchemy.exc import IntegrityError

    from training.registry import _lost_insert_race

    try:
        try:
            raise IntegrityError(
                "INSERT INTO registered_model_tags", {}, Exception("UNIQUE constraint failed")
            )
        except IntegrityError as cause:
            raise MlflowException(str(cause)) from cause
    except MlflowException as exc:
        assert _lost_insert_race(exc)
    assert not _lost_insert_race(MlflowException("RESOURCE_DOES_NOT_EXIST: no model funnelrec"))


def test_two_promotions_of_a_date_at_once_decide_it_once(tmp_path, trained):
    mlflow_cfg = {"lock_timeout_seconds": 60, "promotion_policy": str(trained.mlflow.promotion_policy)}
    settings = settings_under(tmp_path, {"mlflow": mlflow_cfg})
    copy_models(trained, settings)
    model_dir = trained.paths.warehouse_root / "models" / f"ds={DS}" / "als_multi"
    v = Versions(settings, model_dir, trained.paths.warehouse_root / "training" / f"ds={DS}")
    v1 = v.add(ds="2026-01-04")
    assert promote(settings, version=v1).action == "promoted"
    a, b = v.add(), v.add()  # two refreshes of the champion for DS, measured for real
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "paths": {"warehouse_root": str(settings.paths.warehouse_root)},
                "mlflow": mlflow_cfg,
            }
        )
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "--config", str(cfg), "promote", "--date", DS],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # One run decided the date (serialised by the lease); the other found it decided.
    assert sorted("already_champion" in out for out, _ in outs) == [False, True], outs
    winner = champion(settings)
    assert winner in (a, b) and v.tags(winner)["promotion.kind"] == "refresh"
    assert v.tags(winner)["promotion.champion_before"] == str(v1)
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
    import typer

    from infra.cli import build_app

    commands = typer.main.get_command(build_app()).commands
    spec = yaml.safe_load((REPO / "mlflow" / "MLproject").read_text())
    assert set(spec["entry_points"]) >= {"train", "evaluate"}
    for name, entry in spec["entry_points"].items():
        command = entry["command"].split("&& ", 1)[1]
        values = {p: "2015-09-18" if p == "date" else "member" for p in entry.get("parameters", {})}
        argv = command.format(**values).split()
        assert argv[0] == "funnelrec" and argv[1] == name, name
        parsed = commands[name].make_context(name, argv[2:])  # raises on an option the CLI lacks
        assert parsed.params["date"].isoformat() == "2015-09-18"


def test_policy_file_is_the_documented_default():
    from infra.settings import load_settings

    policy = registry.Policy.load(load_settings(environ={}).mlflow.promotion_policy)
    assert policy.key() == "validation.standard.NDCG_at_20"
    assert policy.floor_model == "popularity" and set(policy.max_relative_drop) == {"visited", "unvisited"}
    assert policy == registry.Policy()  # the file and the code's defaults agree


@pytest.mark.parametrize("metric", ["standard.NDCG_at_15", "standard.MRR_at_20", "everyone.NDCG_at_20"])
def test_a_policy_naming_a_metric_the_evaluator_does_not_compute_is_refused_at_load(tmp_path, metric):
    path = tmp_path / "promotion.yaml"
    path.write_text(yaml.safe_dump({"primary_metric": metric}))
    with pytest.raises(ValueError, match="primary_metric must be"):
        registry.Policy.load(path)


def test_bundle_fixture_round_trips(tmp_path):
    from training.data import load_training_data

    data = tiny_data()
    loaded = load_training_data(write_bundle(data, tmp_path))
    assert (loaded.purchases != data.purchases).nnz == 0 and (loaded.visited != data.visited).nnz == 0
    assert {s: len(v[0]) for s, v in loaded.heldout.items()} == {
        s: len(v[0]) for s, v in data.heldout.items()
    }


# The embedded store: its artifacts are a local folder retention deletes (a server's are left to mlflow gc).
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_retention_prunes_old_nights_and_unserved_artifacts_but_never_the_champions(
    store, versions, chosen, tmp_path
):
    import mlflow
    from training.retention import PRUNED_TAG, run_retention

    settings = _with_policy(store, tmp_path, floor_model=None)
    settings = settings.model_copy(
        update={"retention": settings.retention.model_copy(update={"days": 3, "champions": 1})}
    )
    wh = settings.paths.warehouse_root
    old = versions.add(ds="2026-01-01", own_model=True)
    chosen[old] = measured()
    assert promote(settings, ds="2026-01-01").champion_after == old  # an old champion, still serving
    stale = versions.add(ds="2026-01-02", own_model=True)  # never promoted, date past retention
    recent = versions.add(ds="2026-01-09", own_model=True)
    for day in ("2026-01-01", "2026-01-02", "2026-01-08", "2026-01-10"):
        for root in ("scores", "serving", "models", "reports", "validation/scores"):
            (wh / root / f"ds={day}").mkdir(parents=True, exist_ok=True)
    (wh / "training" / "ds=tmall").mkdir(parents=True)  # a benchmark's tables: not a night

    def artifacts(v):
        client = tracking.connect(settings)
        uri = client.get_model_version_download_uri(settings.mlflow.registered_model, str(v))
        return Path(uri.removeprefix("file://"))

    assert all(artifacts(v).is_dir() for v in (old, stale, recent))
    result = run_retention(settings, date(2026, 1, 10))
    assert str(result.cutoff) == "2026-01-08" and set(result.protected) == {old}

    def kept(root, day):
        return (wh / root / f"ds={day}").is_dir()

    for root in ("scores", "serving", "reports", "validation/scores"):
        assert not kept(root, "2026-01-01") and not kept(root, "2026-01-02"), root
        assert kept(root, "2026-01-08") and kept(root, "2026-01-10"), root
    # The champion's date keeps its model and training tables; the stale date loses both.
    assert kept("models", "2026-01-01") and kept("training", "2026-01-01")
    assert not kept("models", "2026-01-02") and not kept("training", "2026-01-02")
    assert kept("training", "tmall") and kept("training", "2026-01-09")
    assert result.pruned_versions == [stale] and not artifacts(stale).exists()
    assert PRUNED_TAG in versions.tags(stale) and PRUNED_TAG not in versions.tags(old)
    assert artifacts(old).is_dir() and artifacts(recent).is_dir()
    champion_model = mlflow.pyfunc.load_model(f"models:/{settings.mlflow.registered_model}@champion")
    assert champion_model.metadata.signature is not None
    # A second run changes nothing.
    again = run_retention(settings, date(2026, 1, 10))
    assert again.removed == [] and again.pruned_versions == []


def test_a_registry_that_goes_away_at_any_write_of_a_promotion_or_rollback_is_left_consistent(
    trained, gone_away, chosen, tmp_path, monkeypatch
):
    """The MLflow server goes away at each kind of write of a promotion in turn; the registry is
    consistent after the failure and the next run settles it. Consistent: ``champion`` is the old or
    the new version, and if it moved, the move's decision is recorded (the journal, or the finished
    history and tags).

    The store's state after a failure depends only on which writes reached it, so "write n lost" for
    every n, plus "the last write applied and its answer lost", covers "write n applied" too (it
    leaves what "write n+1 lost" leaves)."""
    from training.registry import HISTORY_TAG, LOCK_TAG, PENDING_TAG, STACK_TAG, model_tags

    monkeypatch.setattr(registry, "SETTLE_SECONDS", 0.02)
    model_dir = trained.paths.warehouse_root / "models" / f"ds={DS}" / "als_multi"
    tables = trained.paths.warehouse_root / "training" / f"ds={DS}"
    source = None

    def fresh(name: str):
        """A registered model whose champion v1 (of the day before) was promoted first, and a better
        v2 registered for DS."""
        nonlocal source
        mlflow_cfg = {
            "tracking_uri": gone_away.upstream.geturl(),
            "registered_model": name,
            "experiment": "faults",
            "max_retries": 0,
            "backoff_seconds": 0,
            "lock_timeout_seconds": 0.3,  # the lease a failed run leaves is stale this soon
        }
        direct = _with_policy(
            settings_under(tmp_path / name, {"mlflow": mlflow_cfg}), tmp_path, floor_model=None
        )
        via_proxy = direct.model_copy(
            update={"mlflow": direct.mlflow.model_copy(update={"tracking_uri": gone_away.uri})}
        )
        copy_models(trained, direct)
        v = Versions(direct, model_dir, tables)
        v.source = source
        v1 = v.add(ds="2026-01-04")
        source = v.source
        v2 = v.add(model="member")
        chosen[v1], chosen[v2] = measured(), measured(1.05)
        # What promoting v1 first leaves (tested above), written directly: the alias, stack, history.
        v.client.set_registered_model_alias(name, CHAMPION, str(v1))
        v.client.set_registered_model_tag(name, STACK_TAG, json.dumps([v1]))
        entry = {"at": "2026-01-04T00:00:00+00:00", "action": "promote", "from": None, "to": v1}
        v.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([entry]))
        return direct, via_proxy, v, v1, v2

    def state(settings):
        tags = model_tags(settings, tracking.connect(settings))
        return champion(settings), tags, json.loads(tags.get(HISTORY_TAG, "[]"))

    # A clean run through the proxy lists the promotion's writes.
    direct, via_proxy, v, v1, v2 = fresh("faults_clean")
    gone_away.arm(None)
    assert promote(via_proxy, ds=DS).action == "promoted"
    writes = list(gone_away.writes)
    assert [w for w in writes if w.endswith("/alias")] == ["POST /api/2.0/mlflow/registered-models/alias"]
    kinds = [w.rsplit(" ", 1)[0] if "model-versions/set-tag" in w else w for w in writes]
    picked = [(i, False) for i in range(len(writes)) if i == 0 or kinds[i] != kinds[i - 1]]
    picked = sorted({*picked, (len(writes) - 2, False), (len(writes) - 1, True)})
    assert len(picked) >= 9, writes

    for i, applied in picked:
        direct, via_proxy, v, v1, v2 = fresh(f"faults_{i}_{int(applied)}")
        gone_away.arm(i + 1, applied)
        with pytest.raises(tracking.RegistryUnavailable):
            promote(via_proxy, ds=DS)
        gone_away.restore()
        now, tags, history = state(direct)
        where = f"gone at write {i + 1} ({writes[i]}), applied={applied}"
        assert now in (v1, v2), where
        if now == v2:  # moved: its decision is recorded, as the journal or as finished
            pending = json.loads(tags.get(PENDING_TAG, "null"))
            finished = history[-1]["to"] == v2 and v.tags(v2).get("promotion.decision") == "promoted"
            assert (pending and pending["to"] == v2) or finished, where
        again = promote(direct, ds=DS)  # the next run
        assert again.action in ("promoted", "already_champion"), where
        now, tags, history = state(direct)
        assert now == v2 and PENDING_TAG not in tags and LOCK_TAG not in tags, where
        assert [(e["action"], e["from"], e["to"]) for e in history] == [
            ("promote", None, v1),
            ("promote", v1, v2),
        ], where
        assert json.loads(tags[STACK_TAG]) == [v1, v2], where
        t = v.tags(v2)
        assert (t["promotion.decision"], t["promotion.champion_before"]) == ("promoted", str(v1)), where
        rows = pq.read_table(direct.paths.warehouse_root / "decisions" / f"ds={DS}").to_pylist()
        assert {(r["version"], r["outcome"]) for r in rows} == {(v2, "promoted")}, where

    # A rollback that loses the store at its alias write, the write applied or not, is settled alike.
    for applied in (False, True):
        direct, via_proxy, v, v1, v2 = fresh(f"faults_rollback_{int(applied)}")
        assert promote(direct, ds=DS).champion_after == v2
        gone_away.arm(3, applied)  # the lease, the journal, then the alias
        with pytest.raises(tracking.RegistryUnavailable):
            rollback(via_proxy)
        rollback_writes = list(gone_away.writes)
        gone_away.restore()
        assert rollback_writes[-1].endswith("/alias"), rollback_writes
        now, tags, history = state(direct)
        assert now == (v1 if applied else v2) and json.loads(tags[PENDING_TAG])["to"] == v1
        # The operator runs the rollback again: it settles the interrupted one first, so an applied
        # rollback is not done twice.
        if applied:
            with pytest.raises(PromotionError, match="nothing to roll back"):
                rollback(direct)
        else:
            rollback(direct)
        now, tags, history = state(direct)
        assert now == v1 and PENDING_TAG not in tags
        assert [(e["action"], e["to"]) for e in history][-1] == ("rollback", v1)
        assert v.tags(v2)["promotion.decision"] == "rolled_back"
