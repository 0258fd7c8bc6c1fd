"""One trainer for every model: seeded, Adam/AdamW, early stopping on a validation metric,
CUDA with mixed precision when present (CPU otherwise), a progress bar with loss and ETA, and
checkpoints saved as state dicts and loaded with ``weights_only=True``.

Models that are not gradient-trained (``trainable = False``) are fitted once with ``fit()`` and
evaluated the same way, so callers never special-case a model.

``fit_and_refit`` is what the pipeline runs: the *validation fit* is trained on the bundle's
validation view with early stopping on the validation split; the *refit* is trained from the same
seed on every training event for the validation fit's best number of epochs, without looking at
any held-out purchase, and is what is tested and served (``training/README.md``).

The same loop runs as one rank of a data-parallel group (``Ranks``; ``training/distributed.py``
starts the group under Spark's TorchDistributor): every rank draws the epoch's batches from the same
seed and steps through its share (``batches[rank::world]``, the same count on every rank), the
gradients are averaged by DistributedDataParallel, and rank 0 alone computes the validation metric
and tells the others whether to stop. A group of one is the plain loop.
"""

from __future__ import annotations

import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from infra.logs import get_logger
from training.data import TrainingData
from training.evaluate import evaluate_scores
from training.models import build_model
from training.models.base import EVAL_BATCH_SIZE, VALIDATION_METRIC, Recommender, TrainConfig

CHECKPOINT = "best.pt"


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel group (``torch.distributed`` initialised)."""

    rank: int = 0
    world: int = 1

    def share(self, batches: list) -> list:
        """This rank's batches of an epoch: every ``world``-th from ``rank``, truncated so that every
        rank steps the same number of times (each step is an all-reduce all ranks join)."""
        if self.world == 1:
            return batches
        return batches[self.rank : len(batches) // self.world * self.world : self.world]

    def decide(self, value):
        """Rank 0's ``value`` on every rank (the validation metric only rank 0 computes)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SOLO = Ranks()


class _Loss(torch.nn.Module):
    """``model.loss`` as a module's forward, which DistributedDataParallel wraps."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


@dataclass
class TrainResult:
    model: Recommender
    device: str
    best_epoch: int
    best_metric: float | None
    epochs_run: int
    seconds: float
    seconds_per_epoch: float
    peak_rss_mb: float
    peak_cuda_mb: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def pick_device(prefer: str | None = None) -> torch.device:
    """``prefer`` if given, else CUDA when present, else the CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed every generator and ask torch for deterministic kernels.

    Without the latter, multi-threaded CPU scatter-adds (embedding gradients with repeated indices)
    differ in the last bits from run to run, and so do the trained weights.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _optimizer(model: Recommender, cfg: TrainConfig) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return kinds[cfg.optimizer](model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class FitResult:
    """The validation fit (model selection) and the refit (test and serving); one object for
    bundles without a separate validation fit."""

    validation: TrainResult
    final: TrainResult

    @property
    def refitted(self) -> bool:
        return self.final is not self.validation


def validation_metric(
    model: Recommender,
    data: TrainingData,
    device,
    metric: str = VALIDATION_METRIC,
    batch_size: int = EVAL_BATCH_SIZE,
) -> float | None:
    """``metric`` (standard setting) on the validation split, the early-stopping metric, or None when
    ``data`` has no validation to look at (no validation pairs, or the full view of a bundle whose
    validation belongs to the validation fit)."""
    if "validation" not in data.heldout or len(data.heldout["validation"][0]) == 0:
        return None
    if data.refit and data.view != "validation":
        return None
    model.eval()
    m = evaluate_scores(
        model.context_scorer(data),
        data,
        "validation",
        settings=("standard",),
        batch_size=batch_size,
        device=device,
    )
    return m["standard"][metric]


def fit_model(
    name: str,
    data: TrainingData,
    seed: int,
    overrides: dict[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    device: str | None = None,
    progress: bool | None = None,
    ranks: Ranks = SOLO,
) -> TrainResult:
    """Seed, build ``name`` with its defaults (+ ``overrides``) and train it on ``data``."""
    seed_everything(seed)
    overrides = {**(overrides or {}), "seed": seed}
    model = build_model(name, data, overrides)
    return train(model, data, seed, checkpoint_dir, device, progress, ranks)


def refit_overrides(first: TrainResult, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The refit's overrides: ``overrides`` with the validation fit's best epoch count."""
    out = dict(overrides or {})
    if first.model.trainable:
        out["train"] = {**out.get("train", {}), "epochs": max(first.best_epoch, 1)}
    return out


def fit_and_refit(
    name: str,
    validation_data: TrainingData,
    full_data: TrainingData,
    seed: int,
    overrides: dict[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    device: str | None = None,
    progress: bool | None = None,
    ranks: Ranks = SOLO,
) -> FitResult:
    """The validation fit on ``validation_data``, then (when ``full_data`` is another view) the refit
    on ``full_data`` for the validation fit's best number of epochs, from the same seed."""
    first = fit_model(name, validation_data, seed, overrides, checkpoint_dir, device, progress, ranks)
    if full_data is validation_data:
        return FitResult(first, first)
    refit = refit_overrides(first, overrides)
    final = fit_model(name, full_data, seed, refit, None, device, progress, ranks)
    return FitResult(first, final)


def train(
    model: Recommender,
    data: TrainingData,
    seed: int,
    checkpoint_dir: Path | None = None,
    device: str | None = None,
    progress: bool | None = None,
    ranks: Ranks = SOLO,
) -> TrainResult:
    """Train ``model`` with early stopping on the validation split; return it at its best epoch.
    With ``ranks`` of a group, this process trains its share of every epoch's batches (above)."""
    log = get_logger("train")
    dev = pick_device(device)
    model.to(dev)
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if not model.trainable:
        model.fit()
        metric = validation_metric(model, data, dev)
        seconds = time.perf_counter() - start
        # Iterative external fits (implicit's ALS/BPR) report their own per-iteration loss.
        history = list(getattr(model, "fit_history", [])) or [{"epoch": 1, "seconds": seconds}]
        if metric is not None:
            history[-1][f"val_{VALIDATION_METRIC}"] = metric
        n = len(history)
        return TrainResult(
            model, str(dev), n, metric, n, seconds, seconds / n, _peak_rss_mb(), _cuda_peak(dev), history
        )

    cfg: TrainConfig = model.cfg.train
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if checkpoint_dir:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    opt = _optimizer(model, cfg)
    step = model.loss
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Every rank starts from rank 0's weights; find_unused_parameters: a model may leave a
        # parameter out of a step's graph (a behaviour absent from the batch), which plain
        # training allows.
        step = DistributedDataParallel(
            _Loss(model),
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=True,
        )
    amp = dev.type == "cuda"
    best, best_epoch, bad, epoch = None, 0, 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    show = sys.stderr.isatty() if progress is None else progress
    epoch_seconds = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        batches = ranks.share(list(model.batches(np.random.default_rng([seed, epoch]), cfg.batch_size)))
        parts: dict[str, float] = {}
        bar = tqdm(batches, desc=f"{model.name} epoch {epoch}", disable=not show, leave=False, unit="step")
        for batch in bar:
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                losses = step(batch)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step_loss = float(losses["loss"].detach())
            for k, v in losses.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        row = {
            "epoch": epoch,
            "steps": len(batches),
            **{k: v / max(len(batches), 1) for k, v in parts.items()},
        }
        train_seconds = time.perf_counter() - t0
        metric = None
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            metric = ranks.decide(
                validation_metric(model, data, dev, cfg.metric, cfg.eval_batch_size)
                if ranks.rank == 0
                else None
            )
            if metric is not None:
                row[f"val_{cfg.metric}"] = metric
                if best is None or metric > best:
                    best, best_epoch, bad = metric, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if checkpoint_dir and ranks.rank == 0:
                        torch.save(best_state, checkpoint_dir / CHECKPOINT)
                else:
                    bad += 1
        row["train_seconds"] = train_seconds
        row["seconds"] = time.perf_counter() - t0
        epoch_seconds.append(train_seconds)
        history.append(row)
        log.info(
            "epoch",
            model=model.name,
            **{k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in row.items()},
        )
        if best is not None and bad >= cfg.patience:
            break
    if best_state is not None:
        if checkpoint_dir and ranks.world == 1:
            best_state = torch.load(checkpoint_dir / CHECKPOINT, map_location=dev, weights_only=True)
        model.load_state_dict(best_state)
    else:
        best_epoch = epoch
    model.eval()
    seconds = time.perf_counter() - start
    return TrainResult(
        model,
        str(dev),
        best_epoch,
        best,
        epoch,
        seconds,
        float(np.mean(epoch_seconds)),
        _peak_rss_mb(),
        _cuda_peak(dev),
        history,
    )


def _cuda_peak(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
