"""Retention: keep ``retention.days`` days of dated outputs and the registry's artifacts that can
still be served; prune the rest.

A night's outputs are dated directories (``<root>/ds=<date>``) under the warehouse: scores (staged
and published), serving bundles, sessionized and training tables, trained models, validation
results and reports. Those of dates before ``run_date - days + 1`` are deleted, except the training
tables and models of a **protected** version's date. The events, the quarantine, the decisions
(the promotion audit), the model runs (``model_runs``) and the MLflow runs and metrics are never
pruned.

Protected versions: every version a current alias points to (``champion``, ``challenger``) and the
last ``retention.champions`` champions of the alias history (the rollback depth). Every other
registered version of a pruned date loses its logged model's artifacts (the pyfunc, its bundled
tables and code), unless a protected version shares that logged model; the version stays in the
registry, tagged ``funnelrec.pruned``, so its metrics and decisions remain readable. Artifacts are
deleted where the artifact store is a local directory (the embedded default); with a remote store
they are tagged as prunable and left to the store's own clean-up (``mlflow gc``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import urlparse

from infra.dates import InvalidDateError, parse_run_date, window_start
from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    MODELS,
    REPORTS,
    SCORES,
    SCORES_STAGED,
    SERVING,
    SESSIONIZED,
    TRAINING,
    validation_results_dir,
)
from training.registry import STACK_TAG, aliases, as_version, model_tags
from training.tracking import call, connect

PRUNED_TAG = "funnelrec.pruned"
#: Roots holding one ``ds=<date>`` directory per night, relative to the warehouse.
DATED_ROOTS = (
    SCORES.name,
    SCORES_STAGED,
    SERVING.name,
    SESSIONIZED.name,
    TRAINING.name,
    MODELS,
    REPORTS,
)
#: Of those, the roots a protected version's date keeps.
MODEL_ROOTS = (TRAINING.name, MODELS)


@dataclass
class Retention:
    cutoff: date
    protected: dict[int, str] = field(default_factory=dict)  # version -> its date
    removed: list[str] = field(default_factory=list)
    pruned_versions: list[int] = field(default_factory=list)
    kept_remote: list[int] = field(default_factory=list)


def _dated_dirs(root: Path):
    for path in sorted(root.glob("ds=*")) if root.is_dir() else []:
        try:
            yield path, parse_run_date(path.name.removeprefix("ds="))
        except InvalidDateError:
            continue  # a benchmark's tables (ds=tmall): not a night's output


def protected_versions(settings: Settings, client) -> dict[int, str]:
    """Version -> date of every version that must stay servable (module docstring)."""
    name = settings.mlflow.registered_model
    keep = set(aliases(settings, client).values())
    if not keep:
        return {}  # no champion yet (or no registered model): nothing to serve, nothing to roll back to
    stack = json.loads(model_tags(settings, client).get(STACK_TAG, "[]"))
    keep |= {as_version(v) for v in stack[-settings.retention.champions :]}
    out = {}
    for v in sorted(keep):
        mv = call(settings, "read version", lambda v=v: client.get_model_version(name, str(v)))
        out[v] = (mv.tags or {}).get("funnelrec.ds", "")
    return out


def _local_dir(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path)
    return None


def run_retention(settings: Settings, run_date: date) -> Retention:
    """Prune what ``run_date``'s retention window no longer keeps (module docstring)."""
    wh = Path(settings.paths.warehouse_root)
    cfg = settings.retention
    out = Retention(cutoff=window_start(run_date, cfg.days))
    with stage("retention", date=run_date.isoformat(), days=cfg.days) as counts:
        client = connect(settings)
        name = settings.mlflow.registered_model
        out.protected = protected_versions(settings, client)
        keep_dates = set(out.protected.values())
        roots = [wh / r for r in DATED_ROOTS] + sorted(validation_results_dir(wh).glob("*"))
        for root in roots:
            for path, day in _dated_dirs(root):
                if day >= out.cutoff or (root.name in MODEL_ROOTS and day.isoformat() in keep_dates):
                    continue
                shutil.rmtree(path)
                out.removed.append(str(path.relative_to(wh)))
        versions = call(settings, "list versions", lambda: client.search_model_versions(f"name = '{name}'"))

        def stored_at(v: int) -> str:
            return call(
                settings, "locate artifacts", lambda: client.get_model_version_download_uri(name, str(v))
            )

        protected_uris = {stored_at(v) for v in out.protected}
        for mv in versions:
            v, tags = as_version(mv.version), mv.tags or {}
            ds = tags.get("funnelrec.ds", "")
            if v in out.protected or PRUNED_TAG in tags or not ds or ds >= out.cutoff.isoformat():
                continue
            uri = stored_at(v)
            if uri not in protected_uris:  # a protected version may share the logged model
                where = _local_dir(uri)
                if where is None:
                    out.kept_remote.append(v)
                    continue
                shutil.rmtree(where, ignore_errors=True)
            call(
                settings,
                "tag version",
                lambda v=v: client.set_model_version_tag(name, str(v), PRUNED_TAG, run_date.isoformat()),
            )
            out.pruned_versions.append(v)
        counts.update(
            removed=len(out.removed),
            pruned_versions=len(out.pruned_versions),
            protected=",".join(map(str, sorted(out.protected))) or "-",
        )
    return out
