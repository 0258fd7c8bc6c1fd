"""The model registry: register trained models, gate champion/challenger promotion, roll back.

- ``register``: logs a trained model's pyfunc into its MLflow run and creates a registered version
  tagged with its date, model and configuration fingerprint, which gets the alias ``challenger``,
  and records the version in the run's ``model_runs`` row. Idempotent: a run that already has a
  version is not registered twice.
- ``promote``: applies ``mlflow/promotion.yaml`` (see ``Policy``). Every candidate (the versions
  registered for a date, best first) and the champion are measured on the *same* held-out
  purchases, those of the date, by the same evaluator (``training.comparison``); the gates read
  per-user paired differences with a seeded bootstrap interval. A candidate of the champion's own
  model and configuration is a *refresh*, kept unless it is shown worse beyond a margin; any other
  is a *challenge* and must win. The first candidate that passes every gate becomes ``champion``.
  Each candidate's gates are tagged on its version and written to the ``decisions`` table.
- ``rollback``: gives ``champion`` back to the version that held it before the current one.

The alias history lives in two registered-model tags: ``funnelrec.champion_stack`` (the versions
that became champion, in order; rollback pops it) and ``funnelrec.alias_history`` (an append-only
log of every promotion and rollback).

Failures: every move of ``champion`` is journalled first. The order of the writes is (1) the
journal, a registered-model tag ``funnelrec.promotion_pending`` holding the whole decision (the
alias move, the history entry and stack it leads to, every version tag, the decisions table's
rows); (2) the alias; (3) the alias read back; (4) the history, the stack, the version tags and the
decisions table; (5) the journal deleted. So the alias never moves without its decision recorded:
if the store goes away at any one call, the journal is left behind, and whoever next takes the
lease (the next promotion or rollback) settles it: when the alias points where the journal says,
it writes (4) again (each write is idempotent) and deletes the journal; when it does not (the move
never reached the store), it deletes the journal and records nothing, and the next ``promote`` of
the date decides again.

Concurrency: promotions and rollbacks take a lease (a registered-model tag holding a random token,
written then read back after a settle delay; only the holder of the token proceeds), then check
after every alias write that the alias holds what they wrote, and tag the outcome they observed.
In Airflow the promote tasks also share a pool of one slot. Alias versions are compared as ints:
SQLite stores return ints, the REST API strings.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tenacity
import yaml

from infra.logs import get_logger
from infra.settings import Settings
from training.tracking import call, connect, exception_chain

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_TAG = "funnelrec.promotion_lock"
PENDING_TAG = "funnelrec.promotion_pending"
STACK_TAG = "funnelrec.champion_stack"
HISTORY_TAG = "funnelrec.alias_history"
HISTORY_KEEP = 200
SETTLE_SECONDS = 0.3


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot be carried out (no challenger, nothing to roll back...)."""


@dataclass(frozen=True)
class Policy:
    """The gates of ``mlflow/promotion.yaml`` (documented there)."""

    split: str = "validation"
    primary_metric: str = "standard.NDCG_at_20"
    min_users: int = 50
    min_relative_gain: float = 0.01
    refresh_margin: float = 0.05
    max_relative_drop: dict[str, float] = field(default_factory=lambda: {"visited": 0.05, "unvisited": 0.05})
    drop_min_users: int = 50
    confidence: float = 0.9
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 20240611
    floor_model: str | None = "popularity"

    @classmethod
    def load(cls, path: Path) -> Policy:
        from training.evaluate import KS, METRICS, SETTINGS

        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown promotion settings {sorted(unknown)}")
        policy = cls(**raw)
        setting, _, metric = policy.primary_metric.partition(".")
        name, _, k = metric.partition("_at_")
        if setting not in SETTINGS or name not in METRICS or k not in {str(x) for x in KS}:
            raise ValueError(
                f"{path}: primary_metric must be <setting>.<metric>_at_<K> like standard.NDCG_at_20 "
                f"(settings {', '.join(SETTINGS)}; metrics {', '.join(METRICS)}; K {KS}), "
                f"got {policy.primary_metric!r}"
            )
        unknown_settings = set(policy.max_relative_drop) - set(SETTINGS)
        if unknown_settings:
            raise ValueError(f"{path}: max_relative_drop names unknown settings {sorted(unknown_settings)}")
        if not 0 < policy.confidence < 1 or policy.bootstrap_resamples < 100:
            raise ValueError(f"{path}: confidence must be in (0, 1) and bootstrap_resamples >= 100")
        return policy

    @property
    def setting(self) -> str:
        """``standard`` of ``standard.NDCG_at_20``."""
        return self.primary_metric.partition(".")[0]

    @property
    def metric_name(self) -> str:
        """``NDCG_at_20`` of ``standard.NDCG_at_20``."""
        return self.primary_metric.partition(".")[2]

    def key(self, setting: str | None = None) -> str:
        return f"{self.split}.{setting or self.setting}.{self.metric_name}"


PASS, FAIL, NOT_EVALUABLE = "pass", "fail", "not_evaluable"


@dataclass
class Gate:
    """One gate's outcome. ``status``: pass | fail | not_evaluable (too few users to judge: recorded,
    neither passing nor refusing). ``value``/``champion_value``: the two means on the same users;
    ``change``: relative change; ``low``/``high``: its bootstrap interval."""

    name: str
    status: str
    detail: str
    setting: str | None = None
    users: int | None = None
    value: float | None = None
    champion_value: float | None = None
    change: float | None = None
    low: float | None = None
    high: float | None = None
    threshold: float | None = None


@dataclass
class Candidate:
    """One version considered for a date, with its kind (first | refresh | challenge) and gates."""

    version: int
    model: str | None
    kind: str
    value: float | None  # its primary metric on the date's split
    gates: list[Gate] = field(default_factory=list)
    outcome: str = "refused"  # promoted | refused | not_reached (a better candidate passed first)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if g.status == FAIL]


@dataclass
class Decision:
    action: str  # promoted | refused | lost_race | already_champion | rolled_back
    version: int
    champion_before: int | None
    champion_after: int | None
    gates: list[Gate] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if g.status == FAIL]

    def summary(self) -> str:
        lines = [
            f"version {self.version}: {self.action} (champion before: {self.champion_before}, "
            f"after: {self.champion_after})"
        ]
        for c in self.candidates or [Candidate(self.version, None, "", None, self.gates, self.action)]:
            if self.candidates:
                shown = "-" if c.value is None else f"{c.value:.5f}"
                lines.append(f"  version {c.version} ({c.model}, {c.kind}, {shown}): {c.outcome}")
            for g in c.gates:
                mark = {PASS: "pass", FAIL: "FAIL", NOT_EVALUABLE: "n/a "}[g.status]
                lines.append(f"    [{mark}] {g.name}: {g.detail}")
        return "\n".join(lines)


def as_version(value: Any) -> int | None:
    """Registry versions as ints, whether the store returned an int or a str."""
    return None if value is None or value == "" else int(value)


# -- reading the registry ------------------------------------------------------------------------
def alias_version(settings: Settings, client, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    name = settings.mlflow.registered_model
    try:
        mv = call(settings, f"read alias {alias}", lambda: client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return as_version(mv.version)


def aliases(settings: Settings, client) -> dict[str, int]:
    """``{alias: version}`` of the registered model, versions as ints."""
    from mlflow.exceptions import MlflowException

    try:
        rm = call(
            settings, "read model", lambda: client.get_registered_model(settings.mlflow.registered_model)
        )
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {a: as_version(v) for a, v in (rm.aliases or {}).items()}


def version_tags(settings: Settings, client, version: int) -> dict[str, str]:
    name = settings.mlflow.registered_model
    mv = call(settings, "read version", lambda: client.get_model_version(name, str(version)))
    return dict(mv.tags or {})


def config_fingerprint(config: dict[str, Any]) -> str:
    """What makes two trainings the same model and configuration: the config without the epoch
    count (a refit trains for the validation fit's best epochs) and its name."""
    import hashlib

    cfg = {k: v for k, v in config.items() if k != "name"}
    cfg["train"] = {k: v for k, v in (cfg.get("train") or {}).items() if k != "epochs"}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_tags(settings: Settings, client) -> dict[str, str]:
    rm = call(settings, "read model", lambda: client.get_registered_model(settings.mlflow.registered_model))
    return dict(rm.tags or {})


# -- register ------------------------------------------------------------------------------------
def register(settings: Settings, ds: str, name: str) -> int:
    """Register the trained model ``name`` of ``ds`` (already evaluated); alias it ``challenger``."""
    from mlflow.exceptions import MlflowException

    from infra.tables import MODEL_METRICS, model_dir, read_meta
    from training.data import ids
    from training.pyfunc import log_pyfunc
    from training.train_evaluate import record_registration

    wh = Path(settings.paths.warehouse_root)
    path = model_dir(wh, ds, name)
    meta = read_meta(path)
    run_id = meta.mlflow_run_id
    if not run_id:
        raise PromotionError(f"{name} {ds} has no MLflow run: retrain it with tracking on")
    if not (path / MODEL_METRICS.name).is_file():
        raise PromotionError(f"{name} {ds} is not evaluated: run `funnelrec evaluate` before registering it")
    client = connect(settings)
    model = settings.mlflow.registered_model
    try:
        call(settings, "create model", lambda: client.create_registered_model(model))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = call(settings, "search versions", lambda: client.search_model_versions(f"run_id = '{run_id}'"))
    existing = [v for v in existing if v.name == model]
    if existing:
        version = as_version(existing[0].version)
    else:
        tables = wh / meta.training_dir
        uri = log_pyfunc(path, tables, run_id, list(ids(tables, "user")[:2]))
        tags = {
            "funnelrec.ds": ds,
            "funnelrec.model": name,
            "funnelrec.model_family": meta.model_class or name,
            "funnelrec.config": config_fingerprint(meta.config),
        }
        mv = call(
            settings,
            "create version",
            lambda: client.create_model_version(
                model, uri, run_id=run_id, tags=tags, model_id=uri.rsplit("/", 1)[-1]
            ),
        )
        version = as_version(mv.version)
    call(
        settings, "set challenger", lambda: client.set_registered_model_alias(model, CHALLENGER, str(version))
    )
    record_registration(settings, ds, name, version)
    get_logger("registry").info("register", ds=ds, model=name, version=version, alias=CHALLENGER)
    return version


def date_versions(settings: Settings, client, ds: str) -> list[int]:
    """Every version registered for ``ds``, ascending."""
    model = settings.mlflow.registered_model
    found = call(settings, "search versions", lambda: client.search_model_versions(f"name = '{model}'"))
    out = sorted(as_version(mv.version) for mv in found if (mv.tags or {}).get("funnelrec.ds") == ds)
    if not out:
        raise PromotionError(f"no registered version for {ds}: run `funnelrec register --date {ds}` first")
    return out


# -- measuring versions on the same data ---------------------------------------------------------
def version_files(settings: Settings, version: int, dst: Path) -> tuple[Path, Path]:
    """Download a version's logged model into ``dst``; returns (model directory, training tables)."""
    from mlflow.models import Model

    import mlflow

    uri = f"models:/{settings.mlflow.registered_model}/{version}"
    local = Path(
        call(settings, "download model", lambda: mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
    )
    arts = Model.load(str(local)).flavors["python_function"]["artifacts"]
    return local / arts["model"]["path"], local / arts["tables"]["path"]


def measure_version(settings: Settings, version: int, target, split: str, work: Path):
    """``training.comparison.Measured`` of ``version`` on ``target`` (the date's data for ``split``)."""
    from training.comparison import measure_model_dir

    model_dir, tables = version_files(settings, version, work / f"v{version}")
    return measure_model_dir(model_dir, tables, target, split, settings.training.eval_batch_size)


def _measure_or_why(settings: Settings, version: int, target, split: str, work: Path):
    """``(Measured, None)``, or ``(None, why)`` when the version's files cannot be read or do not fit
    the tables (a refusal by name follows); an unreachable registry is raised, for a retry."""
    from mlflow.exceptions import MlflowException

    from training.tracking import RegistryUnavailable

    try:
        return measure_version(settings, version, target, split, work), None
    except RegistryUnavailable:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, MlflowException) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def measure_floor(name: str, target, split: str, batch_size: int):
    """The floor baseline fitted on ``target`` (seconds: it is closed-form) and measured there."""
    from training.comparison import Measured
    from training.evaluate import evaluate_per_user
    from training.models import fitted_closed_form

    floor = fitted_closed_form(name, target)
    return Measured(evaluate_per_user(floor.context_scorer(target), target, split, batch_size=batch_size))


# -- gates ---------------------------------------------------------------------------------------
def _paired_gate(name: str, setting: str, mine, theirs, policy: Policy):
    from training.comparison import paired

    stats = paired(mine, theirs, policy.bootstrap_seed, policy.bootstrap_resamples, policy.confidence)
    gate = Gate(
        name,
        PASS,
        "",
        setting=setting,
        users=stats.users,
        value=stats.mine,
        champion_value=stats.theirs,
        change=stats.relative_change,
        low=stats.change_low,
        high=stats.change_high,
    )
    return gate, stats


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2%}"


def evaluate_gates(
    policy: Policy,
    kind: str,
    mine,
    champion=None,
    floor=None,
    model_name: str | None = None,
    champion_error: str | None = None,
    mine_error: str | None = None,
) -> list[Gate]:
    """Every gate of ``policy`` for one candidate, all on the same users of the same split.

    Args:
        kind: ``first`` (no champion yet), ``refresh`` (the champion's model and configuration
            retrained) or ``challenge``.
        mine, champion, floor: ``training.comparison.Measured`` of the candidate, the champion and
            the floor baseline on the date's split (``mine`` None: the candidate could not be
            measured; ``champion`` None with ``champion_error``: the champion could not be).
        model_name: the candidate's model; the floor model itself never passes the floor.

    Refusals are explicit: a missing measurement, a missing metric or too few users refuse by name;
    a drop gate whose setting has fewer than ``drop_min_users`` users is ``not_evaluable``.
    """
    key, setting, metric = policy.key(), policy.setting, policy.metric_name
    values = mine.values(setting, metric) if mine is not None else None
    if values is None:
        why = (
            f"the candidate could not be measured ({mine_error})"
            if mine is None
            else f"{key} is not computed"
        )
        return [Gate("primary_metric", FAIL, f"{why}: refused")]
    n = len(values)
    gates = [
        Gate(
            "min_users",
            PASS if n >= policy.min_users else FAIL,
            f"{key}: {n} users >= {policy.min_users}",
            setting=setting,
            users=n,
            threshold=policy.min_users,
        )
    ]
    if n == 0:
        return gates
    mean = float(values.mean())
    if kind in ("first", "challenge") and policy.floor_model:
        if model_name == policy.floor_model:
            gates.append(Gate("floor", FAIL, f"{model_name} is the floor baseline itself", setting, n, mean))
        else:
            base = floor.values(setting, metric) if floor is not None else None
            if base is None:
                gates.append(
                    Gate("floor", FAIL, f"no {policy.floor_model} floor measured for {key}: refused")
                )
            else:
                b = float(base.mean())
                gates.append(
                    Gate(
                        "floor",
                        PASS if mean > b else FAIL,
                        f"{key} {mean:.5f} > {policy.floor_model} {b:.5f}",
                        setting,
                        n,
                        mean,
                        threshold=b,
                    )
                )
    if kind == "first":
        return gates
    theirs = champion.values(setting, metric) if champion is not None else None
    if theirs is None:
        why = champion_error or f"{key} of the champion is not computed"
        gates.append(Gate("champion_measured", FAIL, f"the champion could not be measured ({why}): refused"))
        return gates
    level = f"{policy.confidence:.0%}"
    if kind == "refresh":
        gate, st = _paired_gate("refresh_non_inferiority", setting, values, theirs, policy)
        worse = st.change_high is not None and st.change_high < -policy.refresh_margin
        gate.status, gate.threshold = (FAIL if worse else PASS), -policy.refresh_margin
        gate.detail = (
            f"{key} {st.mine:.5f} vs champion {st.theirs:.5f} on the same {n} users: change "
            f"{_pct(st.relative_change)}, {level} interval [{_pct(st.change_low)}, {_pct(st.change_high)}]; "
            f"refused only when the whole interval is below -{policy.refresh_margin:.0%}"
        )
        gates.append(gate)
        return gates
    gate, st = _paired_gate("min_relative_gain", setting, values, theirs, policy)
    if st.theirs > 0:
        ok = st.relative_change >= policy.min_relative_gain and st.diff_low > 0
    else:
        ok = st.mine > 0 and st.diff_low > 0
    gate.status, gate.threshold = (PASS if ok else FAIL), policy.min_relative_gain
    gate.detail = (
        f"{key} {st.mine:.5f} vs champion {st.theirs:.5f} on the same {n} users: change "
        f"{_pct(st.relative_change)} >= {policy.min_relative_gain:+.0%}, and the {level} interval of the "
        f"difference [{st.diff_low:+.5f}, {st.diff_high:+.5f}] excludes a loss"
    )
    gates.append(gate)
    for drop_setting, drop in sorted(policy.max_relative_drop.items()):
        name, skey = f"max_drop_{drop_setting}", policy.key(drop_setting)
        a, b = mine.values(drop_setting, metric), champion.values(drop_setting, metric)
        if a is None or b is None:
            gates.append(Gate(name, FAIL, f"{skey} is not computed: refused", drop_setting))
            continue
        if len(a) < policy.drop_min_users:
            gates.append(
                Gate(
                    name,
                    NOT_EVALUABLE,
                    f"{skey}: {len(a)} users < drop_min_users {policy.drop_min_users}: not evaluable",
                    drop_setting,
                    len(a),
                    threshold=-drop,
                )
            )
            continue
        gate, st = _paired_gate(name, drop_setting, a, b, policy)
        too_far = st.relative_change is not None and st.relative_change < -drop
        gate.status, gate.threshold = (FAIL if too_far else PASS), -drop
        gate.detail = (
            f"{skey} {st.mine:.5f} vs champion {st.theirs:.5f} on the same {st.users} users: change "
            f"{_pct(st.relative_change)} >= -{drop:.0%} ({level} interval [{_pct(st.change_low)}, "
            f"{_pct(st.change_high)}])"
        )
        gates.append(gate)
    return gates


# -- the lease -----------------------------------------------------------------------------------
@contextmanager
def registry_lease(settings: Settings, client, owner: str) -> Iterator[str]:
    """Hold the registered model's promotion lease (a tag) while the body runs; wait for it up to
    ``mlflow.lock_timeout_seconds``, trying again after 0.3 s, doubling up to 5 s."""
    model = settings.mlflow.registered_model
    token = f"{owner}:{uuid.uuid4().hex}"
    ttl = settings.mlflow.lock_timeout_seconds
    waiting = tenacity.Retrying(
        stop=tenacity.stop_after_delay(ttl),
        wait=tenacity.wait_exponential(multiplier=SETTLE_SECONDS, max=5.0),
        retry=tenacity.retry_if_result(lambda outcome: not outcome[0]),
        before_sleep=lambda state: get_logger("registry").info(
            "lease_wait",
            owner=owner,
            held_by=_lease_holder(state.outcome.result()[1]),
            wait_seconds=state.upcoming_sleep,
        ),
    )
    try:
        waiting(_take_lease, settings, client, token, ttl)
    except tenacity.RetryError as gave_up:
        held = gave_up.last_attempt.result()[1]
        raise PromotionError(
            f"another promotion holds the registry lease of {model} ({held}); gave up after {ttl:.0f} s"
        ) from None

    def release() -> None:
        now = model_tags(settings, client).get(LOCK_TAG)
        if now and json.loads(now)["token"] == token:
            call(settings, "release lease", lambda: client.delete_registered_model_tag(model, LOCK_TAG))

    try:
        settle_pending(settings, client)
        yield token
    except BaseException:
        # The body's error is the one to report; a store that is away keeps the lease until it
        # expires (``lock_timeout_seconds``), and the next holder settles what was left.
        with suppress(Exception):
            release()
        raise
    release()


def _take_lease(settings: Settings, client, token: str, ttl: float) -> tuple[bool, str | None]:
    """One try at the lease: ``(True, lease)`` once ``token`` holds it, else ``(False, the lease seen)``."""
    from mlflow.exceptions import MlflowException

    model = settings.mlflow.registered_model
    held = model_tags(settings, client).get(LOCK_TAG)
    if held and json.loads(held)["until"] < time.time():
        held = None  # a crashed holder's lease expired
    if held:
        return False, held
    lease = json.dumps({"token": token, "until": time.time() + ttl})
    try:
        call(settings, "take lease", lambda: client.set_registered_model_tag(model, LOCK_TAG, lease))
    except MlflowException as exc:
        if not _lost_insert_race(exc):
            raise
        # Both saw no lease and inserted the tag at once: the store refused one insert.
        # The re-read below says who holds it.
    time.sleep(SETTLE_SECONDS)
    now = model_tags(settings, client).get(LOCK_TAG)
    return bool(now and json.loads(now)["token"] == token), now


def _lease_holder(lease: str | None) -> str | None:
    return json.loads(lease)["token"] if lease else None


def _lost_insert_race(exc: BaseException) -> bool:
    """Whether a tag write failed only because another writer inserted the same key first (a
    database store's unique key: SQLAlchemy's IntegrityError under MLflow's exception).

    In-process the IntegrityError is in the exception's chain. A tracking server sends only
    ``BAD_REQUEST`` and the error's text, so there the text is what names it."""
    from mlflow.exceptions import RestException
    from sqlalchemy.exc import IntegrityError

    if any(isinstance(e, IntegrityError) for e in exception_chain(exc)):
        return True
    return (
        isinstance(exc, RestException) and exc.error_code == "BAD_REQUEST" and "IntegrityError" in exc.message
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def candidate_tags(c: Candidate, d: Decision, ds: str) -> dict[str, str]:
    """The ``promotion.*`` tags that record a decision on a candidate's version."""
    return {
        "promotion.decision": c.outcome,
        "promotion.kind": c.kind,
        "promotion.date": ds,
        "promotion.reason": (
            "every gate passed"
            if c.outcome == "promoted"
            else "a better candidate passed first"
            if c.outcome == "not_reached" and not c.failed
            else "failed gates: " + ", ".join(g.name for g in c.failed)
        ),
        "promotion.at": _now(),
        "promotion.champion_before": str(d.champion_before),
        "promotion.champion_after": str(d.champion_after),
        "promotion.gates": json.dumps([asdict(g) for g in c.gates]),
        "promotion.failed_gates": ",".join(g.name for g in c.failed),
        "promotion.not_evaluable": ",".join(g.name for g in c.gates if g.status == NOT_EVALUABLE),
        "promotion.candidates": ",".join(f"{o.version}:{o.outcome}" for o in d.candidates),
    }


def _tag_versions(settings: Settings, client, tags: dict[str, dict[str, str]]) -> None:
    model = settings.mlflow.registered_model
    for version, kv in tags.items():
        for key, value in kv.items():
            call(
                settings,
                "tag version",
                lambda v=version, k=key, x=value: client.set_model_version_tag(model, str(v), k, x),
            )


def write_decisions(settings: Settings, ds: str, d: Decision) -> Path:
    """Publish the date's decision as the ``decisions`` table (one row per candidate and gate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from infra import atomic
    from infra.tables import DECISIONS, decisions_dir

    at = _now()
    rows = [
        {
            "ds": ds,
            "decided_at": at,
            "version": c.version,
            "model": c.model,
            "kind": c.kind,
            "candidate_value": c.value,
            "outcome": c.outcome,
            "champion_before": d.champion_before,
            "champion_after": d.champion_after,
            "gate": g.name,
            "status": g.status,
            "setting": g.setting,
            "users": g.users,
            "value": g.value,
            "champion_value": g.champion_value,
            "change": g.change,
            "change_low": g.low,
            "change_high": g.high,
            "threshold": None if g.threshold is None else float(g.threshold),
            "detail": g.detail,
        }
        for c in d.candidates
        for g in c.gates
    ]
    table = pa.Table.from_pylist(rows, schema=DECISIONS.arrow_schema())
    target = decisions_dir(settings.paths.warehouse_root, ds)
    with atomic.staged_dir(target) as staged:
        staged.mkdir(parents=True)
        pq.write_table(table, staged / "part-00000.parquet")
    return target


def _newer_champion(champion_ds: str | None, ds: str) -> str | None:
    """Why candidates of ``ds`` may not replace a champion trained on a later date (its validation
    fit saw ``ds``'s validation window, and serving would go back in time), else None. Names that
    are not dates (benchmarks) are not ordered."""
    from datetime import date

    try:
        theirs, mine = date.fromisoformat(champion_ds or ""), date.fromisoformat(ds)
    except ValueError:
        return None
    if theirs <= mine:
        return None
    return (
        f"the champion was trained on {theirs}, after {mine}: it saw this date's validation window and "
        "is newer; promote dates in order (a backfill runs them oldest first)"
    )


def _kind(champion: int | None, champion_tags: dict[str, str], tags: dict[str, str]) -> str:
    if champion is None:
        return "first"
    same = ("funnelrec.model", "funnelrec.config")
    if all(tags.get(k) and tags.get(k) == champion_tags.get(k) for k in same):
        return "refresh"
    return "challenge"


def _decision_of(raw: dict[str, Any]) -> Decision:
    gates = [Gate(**g) for g in raw["gates"]]
    candidates = [Candidate(**{**c, "gates": [Gate(**g) for g in c["gates"]]}) for c in raw["candidates"]]
    return Decision(**{**raw, "gates": gates, "candidates": candidates})


def _finish(settings: Settings, client, pending: dict[str, Any]) -> None:
    """Everything a journalled move writes after the alias, then the journal's deletion. Each write
    is idempotent (the history entry carries the journal's id), so settling may repeat it."""
    model = settings.mlflow.registered_model
    history = json.loads(model_tags(settings, client).get(HISTORY_TAG, "[]"))
    if not any(e.get("id") == pending["id"] for e in history):
        history = [*history[-(HISTORY_KEEP - 1) :], pending["history"]]
        call(
            settings,
            "write history",
            lambda: client.set_registered_model_tag(model, HISTORY_TAG, json.dumps(history)),
        )
    call(
        settings,
        "write stack",
        lambda: client.set_registered_model_tag(model, STACK_TAG, json.dumps(pending["stack"])),
    )
    tags = dict(pending.get("version_tags") or {})
    decision = _decision_of(pending["decision"]) if pending.get("decision") else None
    if decision is not None:
        tags.update({str(c.version): candidate_tags(c, decision, pending["ds"]) for c in decision.candidates})
    _tag_versions(settings, client, tags)
    if decision is not None and pending.get("table"):
        write_decisions(settings, pending["ds"], decision)
    call(settings, "delete journal", lambda: client.delete_registered_model_tag(model, PENDING_TAG))


def settle_pending(settings: Settings, client) -> str | None:
    """Settle a move that a failure interrupted (see the module's docstring); the lease must be
    held. Returns what was done: ``completed``, ``dropped`` or None (nothing pending)."""
    raw = model_tags(settings, client).get(PENDING_TAG)
    if not raw:
        return None
    pending = json.loads(raw)
    now = alias_version(settings, client, CHAMPION)
    log = get_logger("registry")
    if now == pending["to"]:
        _finish(settings, client, pending)
        log.warning("settled", action=pending["action"], ds=pending.get("ds"), to=now, outcome="completed")
        return "completed"
    model = settings.mlflow.registered_model
    call(settings, "delete journal", lambda: client.delete_registered_model_tag(model, PENDING_TAG))
    log.warning(
        "settled",
        action=pending["action"],
        ds=pending.get("ds"),
        to=pending["to"],
        champion=now,
        outcome="dropped",
    )
    return "dropped"


def _journalled_move(settings: Settings, client, lease: str | None, pending: dict[str, Any]) -> int | None:
    """Write the journal, move ``champion`` to ``pending["to"]``, and read it back. Returns the alias
    as read back: when another writer won, the journal is deleted and nothing else written."""
    model = settings.mlflow.registered_model
    if lease is not None:
        held = model_tags(settings, client).get(LOCK_TAG)
        if not held or json.loads(held)["token"] != lease:
            raise PromotionError(
                f"lost the promotion lease of {model} before moving @{CHAMPION}; no alias changed"
            )
    call(
        settings,
        "write journal",
        lambda: client.set_registered_model_tag(model, PENDING_TAG, json.dumps(pending, default=float)),
    )
    to = str(pending["to"])
    call(settings, "set champion", lambda: client.set_registered_model_alias(model, CHAMPION, to))
    after = alias_version(settings, client, CHAMPION)  # check after write
    if after != pending["to"]:
        call(settings, "delete journal", lambda: client.delete_registered_model_tag(model, PENDING_TAG))
    return after


def carry_out(
    settings: Settings, client, lease: str, ds: str, d: Decision, chosen: Candidate | None, table: bool = True
) -> Decision:
    """Record decision ``d`` on the registry (and, with ``table``, as the date's ``decisions`` table),
    moving ``champion`` to ``chosen`` if there is one, in the journalled order of the module's
    docstring. Sets ``d.champion_after`` and ``d.action`` (promoted | lost_race | refused)."""
    model = settings.mlflow.registered_model
    if chosen is None:
        _tag_versions(settings, client, {str(c.version): candidate_tags(c, d, ds) for c in d.candidates})
        if table:
            write_decisions(settings, ds, d)
        return d
    stack = [as_version(v) for v in json.loads(model_tags(settings, client).get(STACK_TAG, "[]"))]
    if not stack and d.champion_before is not None:
        stack = [d.champion_before]
    d.champion_after, d.action = chosen.version, "promoted"
    pending = {
        "id": uuid.uuid4().hex,
        "action": "promote",
        "ds": ds,
        "from": d.champion_before,
        "to": chosen.version,
        "history": {
            "at": _now(),
            "action": "promote",
            "from": d.champion_before,
            "to": chosen.version,
            "kind": chosen.kind,
        },
        "stack": [*stack, chosen.version],
        "decision": asdict(d),
        "table": table,
    }
    pending["history"]["id"] = pending["id"]
    after = _journalled_move(settings, client, lease, pending)
    if after != chosen.version:
        d.champion_after, d.action, chosen.outcome = after, "lost_race", "lost_race"
        get_logger("registry").warning("lost_race", model=model, wanted=chosen.version, champion=after)
        return carry_out(settings, client, lease, ds, d, None, table)
    _finish(settings, client, pending)
    return d


# -- promote / rollback --------------------------------------------------------------------------
def promote(settings: Settings, version: int | None = None, ds: str | None = None) -> Decision:
    """Apply the policy to the candidates: ``version``, else every version registered for ``ds``,
    else ``@challenger``; promote the best one that passes every gate.

    All candidates must be of one date: the champion and each of them are measured on that date's
    held-out purchases (``policy.split``). A date whose version is already the champion is decided:
    promoting it again changes nothing (``already_champion``).
    """
    import tempfile

    from infra.tables import TRAINING
    from training.data import load_training_data

    client = connect(settings)
    policy = Policy.load(settings.mlflow.promotion_policy)
    model = settings.mlflow.registered_model
    log = get_logger("registry")
    if version is not None:
        versions = [version]
    elif ds is not None:
        versions = date_versions(settings, client, ds)
    else:
        challenger = alias_version(settings, client, CHALLENGER)
        if challenger is None:
            raise PromotionError(f"{model} has no @{CHALLENGER}: register a model first")
        versions = [challenger]
    tags = {v: version_tags(settings, client, v) for v in versions}
    dates = {t.get("funnelrec.ds") for t in tags.values()}
    if len(dates) != 1 or None in dates:
        raise PromotionError(
            f"candidates {versions} must be registered for one date; found {sorted(map(str, dates))}"
        )
    date = dates.pop()
    with registry_lease(settings, client, owner=f"promote-{date}") as lease:
        champion = alias_version(settings, client, CHAMPION)
        if champion in versions:
            log.info("promote", ds=date, version=champion, decision="already_champion")
            return Decision("already_champion", champion, champion, champion)
        root = TRAINING.dir(settings.paths.warehouse_root, date)
        if not root.is_dir():
            raise PromotionError(f"no training tables for {date} at {root}: candidates are measured on them")
        view = "validation" if policy.split == "validation" else "full"
        target = load_training_data(root, view)
        champion_tags = version_tags(settings, client, champion) if champion is not None else {}
        with tempfile.TemporaryDirectory(prefix="funnelrec-promote-") as tmp:
            work = Path(tmp)
            measured, errors = {}, {}
            for v in [*versions, *([champion] if champion is not None else [])]:
                measured[v], errors[v] = _measure_or_why(settings, v, target, policy.split, work)
                if errors[v]:
                    log.warning("promote", version=v, measure="failed", error=errors[v])
            theirs = measured.get(champion) if champion is not None else None
            champion_error = errors.get(champion) if champion is not None else None
        floor = (
            measure_floor(policy.floor_model, target, policy.split, settings.training.eval_batch_size)
            if policy.floor_model
            else None
        )

        def primary(v: int) -> float | None:
            m = measured[v]
            values = m.values(policy.setting, policy.metric_name) if m is not None else None
            return float(values.mean()) if values is not None and len(values) else None

        order = sorted(versions, key=lambda v: (primary(v) is None, -(primary(v) or 0.0), v))
        newer = _newer_champion(champion_tags.get("funnelrec.ds"), date)
        candidates = []
        for v in order:
            kind = _kind(champion, champion_tags, tags[v])
            model_name = tags[v].get("funnelrec.model")
            gates = evaluate_gates(
                policy, kind, measured[v], theirs, floor, model_name, champion_error, errors[v]
            )
            if newer:
                gates.append(Gate("date_order", FAIL, newer))
            candidates.append(Candidate(v, model_name, kind, primary(v), gates))
        chosen = next((c for c in candidates if not c.failed), None)
        for c in candidates:
            c.outcome = (
                "promoted" if c is chosen else ("not_reached" if chosen and not c.failed else "refused")
            )
        top = chosen or candidates[0]
        d = carry_out(
            settings,
            client,
            lease,
            date,
            Decision("refused", top.version, champion, champion, top.gates, candidates),
            chosen,
        )
    log.info(
        "promote",
        ds=date,
        candidates=len(candidates),
        decision=d.action,
        version=d.version,
        champion_before=d.champion_before,
        champion_after=d.champion_after,
        failed_gates=",".join(g.name for g in d.failed) or "none",
    )
    return d


def rollback(settings: Settings) -> Decision:
    """Give ``champion`` back to the version that held it before the current one."""
    client = connect(settings)
    with registry_lease(settings, client, owner="rollback"):
        current = alias_version(settings, client, CHAMPION)
        stack = [as_version(v) for v in json.loads(model_tags(settings, client).get(STACK_TAG, "[]"))]
        while stack and stack[-1] != current:
            stack.pop()  # alias moved by hand since: the stack's tail is stale
        if current is None or len(stack) < 2:
            raise PromotionError(
                f"nothing to roll back to: @{CHAMPION} is {current}, champion history {stack or 'empty'}"
            )
        stack.pop()
        previous = stack[-1]
        at = _now()
        pending = {
            "id": uuid.uuid4().hex,
            "action": "rollback",
            "from": current,
            "to": previous,
            "history": {"at": at, "action": "rollback", "from": current, "to": previous},
            "stack": stack,
            "version_tags": {
                str(current): {"promotion.decision": "rolled_back", "promotion.rolled_back_at": at}
            },
        }
        pending["history"]["id"] = pending["id"]
        after = _journalled_move(settings, client, None, pending)
        if after != previous:
            raise PromotionError(f"rollback lost a race: @{CHAMPION} is now {after}, not {previous}")
        _finish(settings, client, pending)
    get_logger("registry").info("rollback", champion_before=current, champion_after=previous)
    return Decision("rolled_back", current, current, previous)


def history(settings: Settings) -> list[dict[str, Any]]:
    client = connect(settings)
    return json.loads(model_tags(settings, client).get(HISTORY_TAG, "[]"))
