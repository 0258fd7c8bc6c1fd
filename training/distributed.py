"""``funnelrec train --processes N``: the one trainer (``training/trainer.py``) in N processes of a
data-parallel group, started by Spark's ``TorchDistributor``.

On a ``local[...]`` master the processes are ``torchrun`` children of this process (one host, one
per core or GPU); on a cluster they are the tasks of one Spark barrier job on the executors, which
must read the warehouse at the same path (a shared filesystem, as every Spark stage needs). The
backend is gloo on the CPU (``use_gpu=False``: the distributor's default refuses to start on a host
without GPUs) and NCCL on CUDA.

Every rank loads the training bundle itself and runs ``fit_and_refit`` with its ``Ranks``: the same
seeded batches, its share of them, gradients averaged by DistributedDataParallel, rank 0's
validation metric deciding when all stop. Rank 0 alone writes what it trained (both fits' state
dicts, histories and timings) to a file whose path every rank returns (in local mode every rank
writes the distributor's return value, and the last writer wins); this process then loads the
state dicts into models it builds from the same data, and the ``train`` stage goes on as for one
process: artifacts, MLflow, metrics.

A request for more processes than the master can run at once fails before anything trains: in local
mode against the cores (or GPUs) of this host, on a cluster through Spark's barrier check, which
``infra/defaults.yaml`` makes give up after a few seconds instead of retrying for minutes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from infra.settings import Settings
from training.data import TrainingData
from training.models import build_model
from training.trainer import FitResult, Ranks, TrainResult, refit_overrides


class DistributedTrainingError(RuntimeError):
    """Distributed training could not start or did not finish (the message says why)."""


@dataclass(frozen=True)
class _Job:
    """What every rank needs, picklable: the bundle's folder and the fit's arguments."""

    bundle: str
    name: str
    seed: int
    overrides: dict[str, Any]
    device: str | None
    out: str


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of ``model``'s state dict (names, dtypes, shapes and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _result_fields(result: TrainResult) -> dict[str, Any]:
    return {f.name: getattr(result, f.name) for f in fields(TrainResult) if f.name != "model"}


def _rank_main(job: _Job) -> str:
    """One rank: join the group, train, and (rank 0) write what was trained to ``job.out``."""
    import torch.distributed as dist

    from training.train_evaluate import load_views
    from training.trainer import fit_and_refit

    cuda = torch.cuda.is_available() and job.device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        ranks = Ranks(dist.get_rank(), dist.get_world_size())
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
        val_data, data = load_views(job.bundle)
        fit = fit_and_refit(
            job.name, val_data, data, job.seed, job.overrides, device=device, progress=False, ranks=ranks
        )
        # Every rank leaves a fingerprint of the weights it ended with: DDP keeps them identical.
        Path(f"{job.out}.rank{ranks.rank}").write_text(weights_digest(fit.final.model))
        if ranks.rank == 0:
            fits = {"validation": fit.validation, "final": fit.final}
            payload = {
                split: {**_result_fields(r), "state": {k: v.cpu() for k, v in r.model.state_dict().items()}}
                for split, r in fits.items()
            }
            payload["world"] = ranks.world
            payload["refitted"] = fit.refitted
            tmp = Path(job.out).with_suffix(".partial")
            torch.save(payload, tmp)
            tmp.replace(job.out)
        dist.barrier()  # the file is whole before any rank returns its path
    finally:
        dist.destroy_process_group()
    return job.out


def _local_slots(gpu: bool) -> int:
    return torch.cuda.device_count() if gpu else (os.cpu_count() or 1)


def fit_distributed(
    settings: Settings,
    bundle: Path,
    name: str,
    val_data: TrainingData,
    data: TrainingData,
    overrides: dict[str, Any],
    processes: int,
) -> FitResult:
    """``fit_and_refit`` of ``name`` on ``bundle`` in ``processes`` ranks under TorchDistributor on
    ``settings.spark.master``; returns the fits with models built here from ``val_data`` / ``data``
    and rank 0's weights."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from infra.spark import get_spark

    spark = get_spark(settings)
    master = spark.sparkContext.master
    local = master.startswith("local")
    gpu = torch.cuda.is_available() and settings.training.device != "cpu"
    slots = _local_slots(gpu)
    if local and processes > slots:
        unit = "GPUs" if gpu else "CPU cores"
        raise DistributedTrainingError(
            f"--processes {processes}: this host has {slots} {unit} for a local master ({master}); "
            f"ask for at most {slots}, or point spark.master at a cluster"
        )
    seed = settings.seeds.train
    with tempfile.TemporaryDirectory(prefix="funnelrec-ddp-", dir=settings.paths.warehouse_root) as tmp:
        job = _Job(str(bundle), name, seed, overrides, settings.training.device, str(Path(tmp) / "fit.pt"))
        distributor = TorchDistributor(num_processes=processes, local_mode=local, use_gpu=gpu)
        try:
            distributor.run(_rank_main, job)
        except Exception as exc:  # the distributor wraps Spark's and torchrun's failures alike
            text = str(exc)
            if "BarrierJobSlotsNumberCheckFailed" in text:
                executors = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1
                raise DistributedTrainingError(
                    f"--processes {processes}: the cluster at {master} has fewer free task slots than "
                    f"that ({executors} executors now); the processes run as one barrier job, one task "
                    f"each: ask for fewer, or add executors"
                ) from None
            raise DistributedTrainingError(
                f"distributed training of {name} failed: {text.splitlines()[0]}"
            ) from exc
        if not Path(job.out).is_file():
            raise DistributedTrainingError(f"distributed training of {name} returned no model from rank 0")
        payload = torch.load(job.out, map_location="cpu", weights_only=True)
        digests = {Path(f"{job.out}.rank{r}").read_text() for r in range(payload["world"])}

    def rebuilt(split: str, view: TrainingData, ovr: dict[str, Any]) -> TrainResult:
        saved = dict(payload[split])
        model = build_model(name, view, {**ovr, "seed": seed})
        model.load_state_dict(saved.pop("state"))
        model.eval()
        return TrainResult(model=model, **saved)

    first = rebuilt("validation", val_data, overrides)
    final = rebuilt("final", data, refit_overrides(first, overrides)) if payload["refitted"] else first
    if digests != {weights_digest(final.model)}:
        raise DistributedTrainingError(f"the {processes} ranks of {name} ended with different weights")
    return FitResult(first, final)
