"""The MLflow pyfunc of a trained model: all a scorer needs behind ``models:/funnelrec@champion``.

The logged model bundles the state dict and ``model.json``, the training tables it was trained on
(id maps, interaction graphs, visited sets, known purchases) and the ``training``/``infra`` code, so
loading it needs no warehouse. Input: a DataFrame with a ``user_id`` column (the source's ids) and
an optional ``k`` parameter; output: top-K rows per known user (``training.scoring.OUTPUT_COLUMNS``),
best first. Users the model has never seen get no rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from training.scoring import OUTPUT_COLUMNS

DEFAULT_K = 50
PIP_REQUIREMENTS_PACKAGES = ("torch", "numpy", "pandas", "scipy", "pyarrow", "pyyaml", "pydantic", "mlflow")


class FunnelrecModel(mlflow.pyfunc.PythonModel):
    """Top-K recommendations with item type and expert weights, ids in and out."""

    def load_context(self, context) -> None:
        from training.artifacts import load_model_dir, read_meta
        from training.data import load_training_data
        from training.scoring import known_purchases

        tables = Path(context.artifacts["tables"])
        model_path = Path(context.artifacts["model"])
        self.data = load_training_data(tables)
        self.meta = read_meta(model_path)
        self.model = load_model_dir(model_path, self.data, device=None)
        self.exclude = known_purchases(self.data)
        import pyarrow.parquet as pq

        users = pq.read_table(tables / "user_map", columns=["user_id", "user_idx"]).to_pandas()
        items = pq.read_table(tables / "item_map", columns=["item_id", "item_idx"]).to_pandas()
        self.user_ids = np.empty(self.data.n_users, dtype=object)
        self.user_ids[users["user_idx"].to_numpy()] = users["user_id"].to_numpy()
        self.item_ids = np.empty(self.data.n_items, dtype=object)
        self.item_ids[items["item_idx"].to_numpy()] = items["item_id"].to_numpy()
        self.user_index = pd.Index(self.user_ids)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from training.scoring import recommend, to_frame

        k = int((params or {}).get("k", DEFAULT_K))
        batch_size = int((params or {}).get("batch_size", 4096))
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        ids = pd.Series(model_input["user_id"]).astype(str).drop_duplicates()
        pos = self.user_index.get_indexer(ids)
        users = pos[pos >= 0]
        recs = recommend(self.model, users, self.exclude, k, batch_size)
        return to_frame(recs, self.user_ids, self.item_ids)


def signature():
    """Input: ``user_id`` (string); params ``k`` and ``batch_size``; output: ``OUTPUT_COLUMNS``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec(t, name, required=name != "expert") for name, t in OUTPUT_COLUMNS]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K), ParamSpec("batch_size", "long", 4096)]),
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
    outputs = {c.name for c in sig.outputs.inputs} if sig.outputs else set()
    missing = [name for name, _ in OUTPUT_COLUMNS if name not in outputs]
    if missing:
        problems.append(f"output lacks {missing}")
    params = {p.name for p in sig.params.params} if sig.params else set()
    if "k" not in params:
        problems.append("no `k` parameter")
    return problems


def pip_requirements() -> list[str]:
    """Exact versions of this environment: logging them skips MLflow's slow inference."""
    from importlib.metadata import version

    out = []
    for name in PIP_REQUIREMENTS_PACKAGES:
        v = version(name)
        out.append(f"{name}=={v.split('+')[0]}")
    return out


def log_pyfunc(model_path: Path, tables: Path, run_id: str, example_users: list[str]) -> str:
    """Log the pyfunc into ``run_id`` under ``model``; returns the model URI (``runs:/<id>/model``)."""
    import mlflow

    root = Path(__file__).resolve().parents[1]
    artifacts = {"model": str(model_path), "tables": str(tables)}
    # Build an output example by running the very code the logged model will run.
    ctx = mlflow.pyfunc.PythonModelContext(artifacts=artifacts, model_config={})
    impl = FunnelrecModel()
    impl.load_context(ctx)
    example_in = pd.DataFrame({"user_id": example_users})
    impl.predict(ctx, example_in, {"k": 3})  # fail here, not in the scorer, if the bundle is broken
    t0 = time.perf_counter()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=FunnelrecModel(),
            artifacts=artifacts,
            code_paths=[str(root / "training"), str(root / "infra")],
            signature=signature(),
            input_example=example_in,
            pip_requirements=pip_requirements(),
        )
        mlflow.log_metric("register.log_model_seconds", time.perf_counter() - t0)
    return info.model_uri
