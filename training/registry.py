"""The model registry: register trained models, gate champion/challenger promotion, roll back.

- ``register``: logs a trained model's pyfunc into its MLflow run and creates a registered version
  tagged with its date and model, which gets the alias ``challenger``. Idempotent: a run that
  already has a version is not registered twice.
- ``promote``: applies ``mlflow/promotion.yaml`` (see ``Policy``) to the challenger against the
  champion; moves ``champion`` only when every gate passes, and writes the decision and each
  gate's numbers as tags on the challenger's version, refusals included.
- ``rollback``: gives ``champion`` back to the version that held it before the current one.

The alias history lives in two registered-model tags: ``funnelrec.champion_stack`` (the versions
that became champion, in order; rollback pops it) and ``funnelrec.alias_history`` (an append-only
log of every promotion and rollback).

Concurrency: promotions and rollbacks take a lease (a registered-model tag holding a random token,
written then read back after a settle delay; only the holder of the token proceeds), then check
after every alias write that the alias holds what they wrote, and tag the outcome they observed.
Alias versions are compared as ints: SQLite stores return ints, the REST API strings.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from infra.logs import get_logger
from infra.settings import Settings
from training.tracking import call, connect

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_TAG = "funnelrec.promotion_lock"
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
    min_relative_gain: float = 0.01
    max_relative_drop: dict[str, float] = field(default_factory=lambda: {"visited": 0.05, "unvisited": 0.05})
    min_users: int = 50
    floor_model: str | None = "popularity"

    @classmethod
    def load(cls, path: Path) -> Policy:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown promotion settings {sorted(unknown)}")
        policy = cls(**raw)
        _setting, _, metric = policy.primary_metric.partition(".")
        if not metric or "_at_" not in metric:
            raise ValueError(
                f"{path}: primary_metric must look like standard.NDCG_at_20, got {policy.primary_metric!r}"
            )
        return policy

    @property
    def metric_name(self) -> str:
        """``NDCG_at_20`` of ``standard.NDCG_at_20``."""
        return self.primary_metric.partition(".")[2]

    def key(self, setting: str | None = None) -> str:
        setting = setting or self.primary_metric.partition(".")[0]
        return f"{self.split}.{setting}.{self.metric_name}"


@dataclass
class Gate:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


@dataclass
class Decision:
    action: str  # promoted | refused | lost_race | already_champion | rolled_back
    version: int
    champion_before: int | None
    champion_after: int | None
    gates: list[Gate] = field(default_factory=list)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def summary(self) -> str:
        lines = [
            f"version {self.version}: {self.action} (champion before: {self.champion_before}, "
            f"after: {self.champion_after})"
        ]
        for g in self.gates:
            mark = "pass" if g.passed else "FAIL"
            lines.append(f"  [{mark}] {g.name}: {g.detail}")
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


def version_metrics(settings: Settings, client, version: int) -> dict[str, float]:
    name = settings.mlflow.registered_model
    mv = call(settings, "read version", lambda: client.get_model_version(name, str(version)))
    run = call(settings, "read run", lambda: client.get_run(mv.run_id))
    return dict(run.data.metrics)


def _version_model(settings: Settings, client, version: int) -> str | None:
    name = settings.mlflow.registered_model
    mv = call(settings, "read version", lambda: client.get_model_version(name, str(version)))
    return (mv.tags or {}).get("funnelrec.model")


def _model_tags(settings: Settings, client) -> dict[str, str]:
    rm = call(settings, "read model", lambda: client.get_registered_model(settings.mlflow.registered_model))
    return dict(rm.tags or {})


# -- register ------------------------------------------------------------------------------------
def register(settings: Settings, ds: str, name: str) -> int:
    """Register the trained model ``name`` of ``ds`` (already evaluated); alias it ``challenger``."""
    from mlflow.exceptions import MlflowException

    from training.artifacts import model_dir, read_meta
    from training.pyfunc import log_pyfunc

    wh = Path(settings.paths.warehouse_root)
    path = model_dir(wh, ds, name)
    meta = read_meta(path)
    run_id = meta.get("mlflow_run_id")
    if not run_id:
        raise PromotionError(f"{name} {ds} has no MLflow run: retrain it with tracking on")
    if not (path / "metrics.json").is_file():
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
        tables = wh / meta["training_dir"]
        import pyarrow.parquet as pq

        users = pq.read_table(tables / "user_map", columns=["user_id"]).column("user_id").to_pylist()[:2]
        uri = log_pyfunc(path, tables, run_id, users)
        tags = {
            "funnelrec.ds": ds,
            "funnelrec.model": name,
            "funnelrec.model_family": meta.get("class", name),
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
    get_logger("registry").info(f"stage=register ds={ds} model={name} version={version} alias={CHALLENGER}")
    return version


def best_of_date(settings: Settings, client, ds: str, policy: Policy) -> int:
    """The version registered for ``ds`` with the best primary metric (ties: the lower version)."""
    model = settings.mlflow.registered_model
    found = call(settings, "search versions", lambda: client.search_model_versions(f"name = '{model}'"))
    scored = []
    for mv in found:
        if (mv.tags or {}).get("funnelrec.ds") != ds:
            continue
        v = as_version(mv.version)
        scored.append((version_metrics(settings, client, v).get(policy.key(), float("-inf")), -v, v))
    if not scored:
        raise PromotionError(f"no registered version for {ds}: run `funnelrec register --date {ds}` first")
    return max(scored)[2]


# -- gates ---------------------------------------------------------------------------------------
def evaluate_gates(
    policy: Policy,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    model_name: str | None = None,
) -> list[Gate]:
    """Every gate of ``policy`` for a challenger's metrics against the champion's (None: no champion).

    ``model_name``: the challenger's model; the floor model itself never passes the floor.
    """
    gates: list[Gate] = []
    key = policy.key()
    value = challenger.get(key)
    users = challenger.get(f"{policy.split}.standard.users")
    gates.append(
        Gate(
            "min_users",
            users is not None and users >= policy.min_users,
            users,
            policy.min_users,
            f"{policy.split} users {users if users is not None else 'not logged'} >= {policy.min_users}",
        )
    )
    if value is None:
        gates.append(
            Gate("primary_metric", False, None, None, f"{key} was not logged: evaluate the model first")
        )
        return gates
    if policy.floor_model and model_name == policy.floor_model:
        gates.append(Gate("floor", False, value, value, f"{model_name} is the floor baseline itself"))
    elif policy.floor_model:
        floor = challenger.get(f"floor.{policy.floor_model}.{key}")
        gates.append(
            Gate(
                "floor",
                floor is not None and value > floor,
                value,
                floor,
                f"{key} {value:.5f} > {policy.floor_model} {floor:.5f}"
                if floor is not None
                else f"no {policy.floor_model} floor logged for {key}",
            )
        )
    if champion is None:
        gates.append(Gate("min_relative_gain", True, value, None, "no champion yet"))
        return gates
    base = champion.get(key)
    if base is None:
        gates.append(Gate("min_relative_gain", True, value, None, f"champion has no {key}; not compared"))
    else:
        need = base * (1 + policy.min_relative_gain)
        gates.append(
            Gate(
                "min_relative_gain",
                value >= need and value > base,
                value,
                need,
                f"{key} {value:.5f} >= champion {base:.5f} x (1 + {policy.min_relative_gain}) = {need:.5f}",
            )
        )
    for setting, drop in sorted(policy.max_relative_drop.items()):
        skey = policy.key(setting)
        mine, theirs = challenger.get(skey), champion.get(skey)
        if theirs is None or not champion.get(f"{policy.split}.{setting}.users"):
            gates.append(
                Gate(
                    f"max_drop_{setting}", True, mine, None, f"champion has no {setting} users; not compared"
                )
            )
            continue
        floor = theirs * (1 - drop)
        ok = mine is not None and mine >= floor
        shown = f"{mine:.5f}" if mine is not None else "not logged"
        gates.append(
            Gate(
                f"max_drop_{setting}",
                ok,
                mine,
                floor,
                f"{skey} {shown} >= champion {theirs:.5f} x (1 - {drop}) = {floor:.5f}",
            )
        )
    return gates


# -- the lease -----------------------------------------------------------------------------------
@contextmanager
def registry_lease(settings: Settings, client, owner: str) -> Iterator[str]:
    """Hold the registered model's promotion lease (a tag) while the body runs."""
    model = settings.mlflow.registered_model
    token = f"{owner}:{uuid.uuid4().hex}"
    ttl = settings.mlflow.lock_timeout_seconds
    deadline = time.monotonic() + ttl
    delay = SETTLE_SECONDS
    while True:
        held = _model_tags(settings, client).get(LOCK_TAG)
        if held:
            holder = json.loads(held)
            if holder["until"] < time.time():
                held = None  # a crashed holder's lease expired
        if not held:
            lease = json.dumps({"token": token, "until": time.time() + ttl})
            call(settings, "take lease", lambda v=lease: client.set_registered_model_tag(model, LOCK_TAG, v))
            time.sleep(SETTLE_SECONDS)
            now = _model_tags(settings, client).get(LOCK_TAG)
            if now and json.loads(now)["token"] == token:
                break
        if time.monotonic() > deadline:
            raise PromotionError(
                f"another promotion holds the registry lease of {model} ({held}); gave up after {ttl:.0f} s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    try:
        yield token
    finally:
        now = _model_tags(settings, client).get(LOCK_TAG)
        if now and json.loads(now)["token"] == token:
            call(settings, "release lease", lambda: client.delete_registered_model_tag(model, LOCK_TAG))


def _append_history(settings: Settings, client, entry: dict[str, Any], stack: list[int]) -> None:
    model = settings.mlflow.registered_model
    tags = _model_tags(settings, client)
    history = [*json.loads(tags.get(HISTORY_TAG, "[]"))[-(HISTORY_KEEP - 1) :], entry]
    call(
        settings,
        "write history",
        lambda: client.set_registered_model_tag(model, HISTORY_TAG, json.dumps(history)),
    )
    call(
        settings, "write stack", lambda: client.set_registered_model_tag(model, STACK_TAG, json.dumps(stack))
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _tag_decision(settings: Settings, client, d: Decision, reason: str) -> None:
    model = settings.mlflow.registered_model
    tags = {
        "promotion.decision": d.action,
        "promotion.reason": reason,
        "promotion.at": _now(),
        "promotion.champion_before": str(d.champion_before),
        "promotion.champion_after": str(d.champion_after),
        "promotion.gates": json.dumps([asdict(g) for g in d.gates]),
        "promotion.failed_gates": ",".join(g.name for g in d.failed),
    }
    for key, value in tags.items():
        call(
            settings,
            "tag version",
            lambda k=key, v=value: client.set_model_version_tag(model, str(d.version), k, v),
        )


# -- promote / rollback --------------------------------------------------------------------------
def promote(settings: Settings, version: int | None = None, ds: str | None = None) -> Decision:
    """Apply the policy to a challenger: ``version``, else the best version of ``ds``, else ``@challenger``."""
    client = connect(settings)
    policy = Policy.load(settings.mlflow.promotion_policy)
    model = settings.mlflow.registered_model
    log = get_logger("registry")
    if version is None and ds is not None:
        version = best_of_date(settings, client, ds, policy)
        call(
            settings,
            "set challenger",
            lambda: client.set_registered_model_alias(model, CHALLENGER, str(version)),
        )
    if version is None:
        version = alias_version(settings, client, CHALLENGER)
        if version is None:
            raise PromotionError(f"{model} has no @{CHALLENGER}: register a model first")
    with registry_lease(settings, client, owner=f"promote-v{version}") as lease:
        champion = alias_version(settings, client, CHAMPION)
        if champion == version:
            d = Decision("already_champion", version, champion, champion)
            log.info(f"stage=promote version={version} decision=already_champion")
            return d
        mine = version_metrics(settings, client, version)
        theirs = version_metrics(settings, client, champion) if champion is not None else None
        gates = evaluate_gates(policy, mine, theirs, _version_model(settings, client, version))
        d = Decision("refused", version, champion, champion, gates)
        if d.failed:
            _tag_decision(settings, client, d, "failed gates: " + ", ".join(g.name for g in d.failed))
        else:
            held = _model_tags(settings, client).get(LOCK_TAG)
            if not held or json.loads(held)["token"] != lease:
                raise PromotionError(
                    f"lost the promotion lease of {model} before moving @{CHAMPION}; no alias changed"
                )
            call(
                settings,
                "set champion",
                lambda: client.set_registered_model_alias(model, CHAMPION, str(version)),
            )
            after = alias_version(settings, client, CHAMPION)  # check after write
            d.champion_after = after
            if after == version:
                d.action = "promoted"
                stack = json.loads(_model_tags(settings, client).get(STACK_TAG, "[]"))
                if not stack and champion is not None:
                    stack = [champion]
                stack.append(version)
                _append_history(
                    settings,
                    client,
                    {"at": _now(), "action": "promote", "from": champion, "to": version},
                    stack,
                )
                _tag_decision(settings, client, d, "every gate passed")
            else:
                d.action = "lost_race"
                _tag_decision(settings, client, d, f"another writer set @{CHAMPION} to {after}")
    log.info(
        f"stage=promote version={version} decision={d.action} champion_before={d.champion_before} "
        f"champion_after={d.champion_after} failed_gates={','.join(g.name for g in d.failed) or 'none'}"
    )
    return d


def rollback(settings: Settings) -> Decision:
    """Give ``champion`` back to the version that held it before the current one."""
    client = connect(settings)
    model = settings.mlflow.registered_model
    with registry_lease(settings, client, owner="rollback"):
        current = alias_version(settings, client, CHAMPION)
        stack = [as_version(v) for v in json.loads(_model_tags(settings, client).get(STACK_TAG, "[]"))]
        while stack and stack[-1] != current:
            stack.pop()  # alias moved by hand since: the stack's tail is stale
        if current is None or len(stack) < 2:
            raise PromotionError(
                f"nothing to roll back to: @{CHAMPION} is {current}, champion history {stack or 'empty'}"
            )
        stack.pop()
        previous = stack[-1]
        call(
            settings,
            "set champion",
            lambda: client.set_registered_model_alias(model, CHAMPION, str(previous)),
        )
        after = alias_version(settings, client, CHAMPION)
        if after != previous:
            raise PromotionError(f"rollback lost a race: @{CHAMPION} is now {after}, not {previous}")
        _append_history(
            settings, client, {"at": _now(), "action": "rollback", "from": current, "to": previous}, stack
        )
        for key, value in {"promotion.decision": "rolled_back", "promotion.rolled_back_at": _now()}.items():
            call(
                settings,
                "tag version",
                lambda k=key, v=value: client.set_model_version_tag(model, str(current), k, v),
            )
    get_logger("registry").info(f"stage=rollback from={current} to={previous}")
    return Decision("rolled_back", current, current, previous)


def history(settings: Settings) -> list[dict[str, Any]]:
    client = connect(settings)
    return json.loads(_model_tags(settings, client).get(HISTORY_TAG, "[]"))
