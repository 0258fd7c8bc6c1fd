"""The MLflow pyfunc of a trained model: all a scorer needs behind ``models:/funnelrec@champion``.

The logged model bundles the state dict and ``model.json``, the training tables it was trained on
(id maps and the interaction graphs its embeddings are propagated over) and the modules of
``training``/``infra`` that loading and serving import (``bundled_modules``), so loading it needs
no warehouse and no checkout; its pip requirements are exact pins of every distribution those
modules import (``PIP_REQUIREMENTS_PACKAGES``).

**It scores from the context it is given, never from its training tables.** Input: one row per
user, with the user's context as of the scoring date (the ``serving_context`` table's columns):

- ``user_id`` (string, the source's id);
- ``visited`` (array of item ids): the visited set; it gates MEMBER's experts and types each row
  ``visited`` / ``unvisited``;
- ``bought`` (array of item ids): never recommended;
- ``history_items`` / ``history_behaviors`` / ``history_times`` (arrays, oldest first; times in
  epoch seconds, optional): recent events, for models that read them (``history_length``).

Params: ``k``; ``batch_size`` (memory only); ``catalogue``: the item ids that may be recommended, most
popular first (the ``catalogue`` table in ``popularity_rank`` order). Empty (the default): every
item the model knows, in its training purchases' popularity order.

Output: exactly ``k`` rows per input user, best first (``OUTPUT_COLUMNS``: the catalogue's
``SCORES_PREDICTED``), when
the catalogue has ``k`` items the user has not bought. Users the model cannot score (``can_score``:
trained without them) and the ranks a model leaves short (too few catalogue items it knows) are
filled by the **fallback**: the catalogue's popularity order, skipping bought and already listed
items, with ``expert = "fallback"``, ``expert_weights = "{}"`` and ``score`` = 1 / the item's
position in that order (1-based).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from infra.tables import CONTEXT_INPUT, CONTEXT_OPTIONAL, FALLBACK, SCORES_ADDED_LATER, SCORES_PREDICTED

DEFAULT_K = 50
#: Input columns besides ``user_id``: the user's context as of the scoring date.
CONTEXT_COLUMNS = CONTEXT_INPUT[1:]
#: Output columns and their MLflow types: the catalogue's ``SCORES_PREDICTED``, with ranks as the
#: int64 pandas gives them (``score`` narrows them to the table's int).
OUTPUT_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (c.name, "long" if c.dtype == "int" else c.dtype) for c in SCORES_PREDICTED
)
#: Output columns that may hold nulls (not ``required`` in the signature).
OPTIONAL_OUTPUTS = frozenset(c.name for c in SCORES_PREDICTED if c.nullable)
#: Distributions the bundled code imports (``bundled_modules``), besides the standard library.
#: ``tests/registry/test_pyfunc.py`` checks the list against the bundle's imports and loads the
#: bundle with only these distributions (and what they depend on) importable.
PIP_REQUIREMENTS_PACKAGES = (
    "torch",
    "numpy",
    "pandas",
    "scipy",
    "pyarrow",
    "pyyaml",
    "pydantic",
    "mlflow",
    "implicit",
    "threadpoolctl",
    "tqdm",
    "structlog",
)
#: Imports inside functions the pyfunc never calls, so not required to serve: top-level module ->
#: where and why.
NOT_SERVED_IMPORTS = {
    "pyspark": "infra.tables: Table.spark_schema and read_events, for the Spark jobs and validation"
}
#: Where loading starts: the pyfunc, and every model (found by name at load, not by an import).
ENTRY_MODULES = ("training.pyfunc", "training.models.*")
BUNDLED_PACKAGES = ("training", "infra")


class FunnelrecModel(mlflow.pyfunc.PythonModel):
    """Top-K recommendations with item type and expert weights, ids and context in, ids out."""

    def load_context(self, context) -> None:
        from infra.tables import read_meta
        from training.artifacts import load_model_dir
        from training.data import ids, load_training_data

        tables = Path(context.artifacts["tables"])
        model_path = Path(context.artifacts["model"])
        self.data = load_training_data(tables)
        self.meta = read_meta(model_path)
        self.model = load_model_dir(model_path, self.data, device=None)
        self.user_ids, self.item_ids = ids(tables, "user"), ids(tables, "item")
        self.user_index = pd.Index(self.user_ids)
        self.item_index = pd.Index(self.item_ids)
        bought = np.asarray(self.data.purchases.sum(0)).ravel()
        self.popular = self.item_ids[np.lexsort((np.arange(len(bought)), -bought))]

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from training.recommend import recommend, to_frame

        params = params or {}
        k = int(params.get("k", DEFAULT_K))
        batch_size = int(params.get("batch_size", 4096))
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        catalogue = params.get("catalogue")
        given = catalogue is not None and len(catalogue) > 0
        order = np.asarray(catalogue if given else self.popular, object)
        frame = pd.DataFrame(model_input).drop_duplicates("user_id").reset_index(drop=True)
        frame["user_id"] = frame["user_id"].astype(str)
        ctx = self.context_of(frame)
        exclude = self._matrix(frame["bought"])
        allowed = None
        if given:
            allowed = np.zeros(self.data.n_items, bool)
            pos = self.item_index.get_indexer(order)
            allowed[pos[pos >= 0]] = True
        recs = recommend(self.model, ctx, exclude, k, batch_size, allowed)
        out = to_frame(recs, frame["user_id"].to_numpy(object), self.item_ids)
        return fill_with_fallback(out, frame, order, k)

    def training_context_frame(self, user_ids: list[str], history_length: int = 5) -> pd.DataFrame:
        """Input rows of known users in the context of the bundled training tables (the input
        example logged with the model; the nightly scorer passes the date's context instead)."""
        from infra.tables import BEHAVIORS

        idx = self.user_index.get_indexer(pd.Index(user_ids))
        idx = idx[idx >= 0]

        def ids(m, u):
            return list(self.item_ids[m.indices[m.indptr[u] : m.indptr[u + 1]]])

        items, behaviors, times = self.data.history(idx, history_length)
        return pd.DataFrame(
            {
                "user_id": list(self.user_ids[idx]),
                "visited": [ids(self.data.visited, u) for u in idx],
                "bought": [ids(self.data.purchases, u) for u in idx],
                "history_items": [list(self.item_ids[r[r >= 0]]) for r in items],
                "history_behaviors": [[BEHAVIORS[b] for b in r[r >= 0]] for r in behaviors],
                "history_times": [[int(t) for t in r[r >= 0]] for r in times],
            }
        )

    def context_of(self, frame: pd.DataFrame):
        """The model's ``Context`` of the input rows (ids it does not know dropped or -1); history
        cut by the sequence builder training uses (``EventLog.windows``)."""
        import torch

        from infra.tables import BEHAVIORS
        from training.models.base import Context
        from training.sequences import NO_TIME, EventLog

        users = self.user_index.get_indexer(frame["user_id"])
        length = self.model.history_length
        funnel = {b: i for i, b in enumerate(BEHAVIORS)}
        items = [self.item_index.get_indexer(list(x)) if len(x) else [] for x in frame["history_items"]]
        behaviors = [[funnel.get(b, -1) for b in x] for x in frame["history_behaviors"]]
        if "history_times" in frame:
            times = [
                [NO_TIME if t is None or t != t else int(t) for t in x] if x is not None else []
                for x in frame["history_times"]
            ]
            # A row whose times do not match its items (a hand-made input) is read without times.
            times = [t if len(t) == len(i) else [NO_TIME] * len(i) for t, i in zip(times, items, strict=True)]
        else:
            times = None
        log = EventLog.from_lists(items, behaviors, times)
        items, behaviors, times = log.windows(np.arange(len(frame)), length)
        behaviors[items < 0] = -1
        times[items < 0] = NO_TIME
        return Context(
            torch.from_numpy(users.astype(np.int64)),
            self._matrix(frame["visited"]),
            torch.from_numpy(items),
            torch.from_numpy(behaviors),
            torch.from_numpy(times),
        )

    def _matrix(self, lists: pd.Series):
        """(rows, n_items) 0/1 CSR of each row's list of item ids (ids the model does not know dropped)."""
        from training.data import binary_csr

        lengths = lists.map(len).to_numpy()
        flat = (
            np.concatenate([np.asarray(v, object) for v in lists]) if lengths.sum() else np.zeros(0, object)
        )
        rows = np.repeat(np.arange(len(lists)), lengths)
        cols = self.item_index.get_indexer(flat) if len(flat) else np.zeros(0, np.int64)
        keep = cols >= 0
        return binary_csr(rows[keep], cols[keep], len(lists), self.data.n_items)


def fill_with_fallback(recs: pd.DataFrame, frame: pd.DataFrame, order: np.ndarray, k: int) -> pd.DataFrame:
    """``recs`` with every user of ``frame`` topped up to ``k`` rows from ``order`` (most popular
    first), skipping each user's bought and already listed items: the fallback rows."""
    have = recs.groupby("user_id", sort=False).size()
    short = frame[frame["user_id"].map(have).fillna(0).to_numpy() < k]
    if short.empty:
        return recs
    listed = recs[recs["user_id"].isin(short["user_id"])].groupby("user_id")["item_id"].agg(set)
    rows = []
    for user, visited, bought in zip(short["user_id"], short["visited"], short["bought"], strict=True):
        skip = set(bought) | listed.get(user, set())
        visited = set(visited)
        rank = int(have.get(user, 0))
        for pos, item in enumerate(order):
            if rank >= k:
                break
            if item in skip:
                continue
            rank += 1
            rows.append((user, rank, item, 1.0 / (pos + 1), "visited" if item in visited else "unvisited"))
    fill = pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score", "item_type"])
    fill = fill.assign(expert=FALLBACK, expert_weights=json.dumps({}))
    # Column by column: concat would warn about (and one day retype) an all-null expert column.
    none = np.full(len(fill), None, dtype=object)
    out = pd.DataFrame(
        {
            c: np.concatenate([recs[c].to_numpy(object), fill[c].to_numpy(object) if c in fill else none])
            for c in recs.columns
        }
    )
    out = out.astype({"rank": np.int64, "score": np.float64})
    order_of = {u: i for i, u in enumerate(frame["user_id"])}
    out = out.assign(_o=out["user_id"].map(order_of)).sort_values(["_o", "rank"], kind="stable")
    return out.drop(columns="_o").reset_index(drop=True)


def signature():
    """Input: ``user_id`` and the context columns; params ``k``, ``batch_size``, ``catalogue``;
    output: ``OUTPUT_COLUMNS``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    outputs = [ColSpec(t, name, required=name not in OPTIONAL_OUTPUTS) for name, t in OUTPUT_COLUMNS]
    inputs = [
        ColSpec("string", "user_id"),
        *(
            ColSpec(
                Array(DataType.long if c == "history_times" else DataType.string),
                c,
                required=c not in CONTEXT_OPTIONAL,
            )
            for c in CONTEXT_COLUMNS
        ),
    ]
    return ModelSignature(
        inputs=Schema(inputs),
        outputs=Schema(outputs),
        params=ParamSchema(
            [
                ParamSpec("k", "long", DEFAULT_K),
                ParamSpec("batch_size", "long", 4096),
                ParamSpec("catalogue", DataType.string, [], (-1,)),
            ]
        ),
    )


class SignatureMismatch(RuntimeError):
    """A registered model that cannot serve the scorer's input; refused before scoring starts."""


def load_for_scoring(uri: str):
    """Load a registered pyfunc and check its signature against the scorer's input and output."""
    import mlflow

    model = mlflow.pyfunc.load_model(uri)
    problems = expected_signature_problems(model.metadata.signature)
    if problems:
        raise SignatureMismatch(f"{uri} cannot be used for scoring: " + "; ".join(problems))
    return model


def expected_signature_problems(sig) -> list[str]:
    """What keeps a logged model from serving the scorer's input (empty when it can)."""
    if sig is None:
        return ["the model has no signature"]
    problems = []
    inputs = {c.name: getattr(c.type, "name", str(c.type)) for c in sig.inputs.inputs} if sig.inputs else {}
    if inputs.get("user_id") != "string":
        problems.append(f"input must have a string column user_id; has {inputs or 'none'}")
    lacking = [c for c in CONTEXT_COLUMNS if c not in inputs and c not in CONTEXT_OPTIONAL]
    if lacking:
        problems.append(
            f"input lacks the context columns {lacking} (a model that scores from its training tables)"
        )
    outputs = {c.name for c in sig.outputs.inputs} if sig.outputs else set()
    missing = [name for name, _ in OUTPUT_COLUMNS if name not in outputs and name not in SCORES_ADDED_LATER]
    if missing:
        problems.append(f"output lacks {missing}")
    params = {p.name for p in sig.params.params} if sig.params else set()
    for p in ("k", "catalogue"):
        if p not in params:
            problems.append(f"no `{p}` parameter")
    return problems


def pip_requirements() -> list[str]:
    """Exact versions of this environment: logging them skips MLflow's slow inference."""
    from importlib.metadata import version

    out = []
    for name in PIP_REQUIREMENTS_PACKAGES:
        v = version(name)
        out.append(f"{name}=={v.split('+')[0]}")
    return out


def _module_file(root: Path, name: str) -> Path | None:
    path = root.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def bundled_modules(root: Path | None = None) -> tuple[dict[str, Path], dict[str, set[str]]]:
    """The modules of ``training``/``infra`` that loading and serving the pyfunc can import (every
    import statement, at module level or inside a function, followed from ``ENTRY_MODULES``), and
    the other top-level modules they import (name -> importing modules), standard library aside."""
    import ast
    import sys

    root = Path(root or Path(__file__).resolve().parents[1])
    todo = [m for m in ENTRY_MODULES if not m.endswith("*")]
    for pattern in (m for m in ENTRY_MODULES if m.endswith("*")):
        pkg = pattern[:-2]
        todo += [
            f"{pkg}.{p.stem}" for p in root.joinpath(*pkg.split(".")).glob("*.py") if p.stem != "__init__"
        ]
    found: dict[str, Path] = {}
    external: dict[str, set[str]] = {}
    while todo:
        name = todo.pop()
        path = _module_file(root, name)
        if name in found or path is None:
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for imported in names:
                top = imported.split(".")[0]
                if top in BUNDLED_PACKAGES or _module_file(root, top):
                    todo.append(imported)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    external.setdefault(top, set()).add(name)
    return found, external


def bundle_code(dest: Path) -> list[str]:
    """Copy ``bundled_modules`` into ``dest`` as packages, with the YAML files beside them (the
    models' defaults); returns the ``code_paths`` to log."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    modules, _ = bundled_modules(root)
    folders = {path.parent for path in modules.values()}
    files = [*modules.values(), *(y for folder in folders for y in folder.glob("*.yaml"))]
    for path in files:
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return [str(dest / pkg) for pkg in BUNDLED_PACKAGES]


def log_pyfunc(model_path: Path, tables: Path, run_id: str, example_users: list[str]) -> str:
    """Log the pyfunc into ``run_id`` under ``model``; returns the model URI (``runs:/<id>/model``)."""
    import mlflow

    artifacts = {"model": str(model_path), "tables": str(tables)}
    # Build an output example by running the very code the logged model will run.
    ctx = mlflow.pyfunc.PythonModelContext(artifacts=artifacts, model_config={})
    impl = FunnelrecModel()
    impl.load_context(ctx)
    example_in = impl.training_context_frame(example_users)
    impl.predict(ctx, example_in, {"k": 3})  # fail here, not in the scorer, if the bundle is broken
    t0 = time.perf_counter()
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="funnelrec-code-") as code:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=FunnelrecModel(),
            artifacts=artifacts,
            code_paths=bundle_code(Path(code)),
            signature=signature(),
            input_example=example_in,
            pip_requirements=pip_requirements(),
        )
        mlflow.log_metric("register.log_model_seconds", time.perf_counter() - t0)
    return info.model_uri
