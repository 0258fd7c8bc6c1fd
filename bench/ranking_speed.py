"""Speed and memory of the ranking stage (issue #24): AW-MoE re-ranking its retriever's top-N
candidates for U shoppers with L events each, beside the retrieval stage for the same shoppers and
beside a bare activation unit of the same shapes, in one process on one device.

    .venv/bin/python bench/ranking_speed.py [--users 20000] [--candidates 100] [--events 50] [--device cuda]

The phases, each over the U shoppers in scoring batches (``scoring.batch_size`` of the defaults),
each timed after one warm-up batch, with the process's RSS before it and its peak while it ran (on
CUDA also the device's peak allocation):

- **retrieval**: ``AWMoE.candidates``: the retriever's scores over the whole catalogue from the
  shopper's window, and its top-N (what the shopper bought skipped);
- **ranking**: ``AWMoE.rank_candidates`` over those candidates, in eval mode: the activation unit,
  the gate unit and the experts, ``CHUNK_ROWS`` shoppers at a time, as scoring runs it (the
  contrastive branch is training-only);
- **bare unit**: ``ActivationUnit`` alone, the module the ranker uses, on random inputs of the
  same shapes (N candidates over L events, the ranker's ``dim`` and ``attention_hidden``, softmax):
  the floor the issue's target is measured against;
- **DIN's unit as written**: the same MLP over the materialised concatenation
  ``[e, h, e - h, e * h]``, for the issue's reference (about 15,600 pairs/s on this CPU for d 64).

Both models are untrained (their speed does not depend on the weights): SASRec at its defaults as
the retriever and AW-MoE at its defaults, over the catalogue and users of the planted synthetic log
(the tables ``bench/quality.py --benchmark synthetic`` builds, built here when missing). Every
shopper gets L events (random items and behaviours, a minute apart), so no window is shorter.
Target (issue #24): the ranking phase within 1.5x the bare unit's time.

Saves ``bench/results/ranking_speed.json`` (``ranking_speed_cuda.json`` on CUDA).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from etl import Sampler  # noqa: E402

from infra.logs import configure  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from infra.tables import BEHAVIORS  # noqa: E402
from training.models import build_model, merged_config, model_class  # noqa: E402
from training.models.awmoe import CHUNK_ROWS, ActivationUnit  # noqa: E402
from training.models.base import Context  # noqa: E402


class ConcatUnit(nn.Module):
    """DIN's activation unit as its code writes it: one MLP over ``[e, h, e - h, e * h]``."""

    def __init__(self, dim: int, hidden: list[int]):
        super().__init__()
        sizes = [4 * dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.Sigmoid()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden[-1], 1))

    def forward(self, cand: torch.Tensor, events: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n, d = cand.shape
        e = cand.unsqueeze(2).expand(b, n, events.shape[1], d)
        h = events.unsqueeze(1).expand_as(e)
        logits = self.mlp(torch.cat([e, h, e - h, e * h], -1)).squeeze(-1)
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
        return torch.softmax(logits, -1)


def contexts(data, users: int, events: int, history: int, batch: int, seed: int):
    """Scoring batches of ``users`` shoppers (the data's users, cycled), each with ``events``
    events left-padded to the model's ``history`` columns."""
    rng = np.random.default_rng(seed)
    idx = np.arange(users) % data.n_users
    t0 = 1_700_000_000
    for start in range(0, users, batch):
        rows = idx[start : start + batch]
        b = len(rows)
        items = np.full((b, history), -1, np.int64)
        kinds = np.full((b, history), -1, np.int64)
        times = np.full((b, history), -1, np.int64)
        items[:, -events:] = rng.integers(0, data.n_items, (b, events))
        kinds[:, -events:] = rng.integers(0, len(BEHAVIORS), (b, events))
        times[:, -events:] = t0 + 60 * np.arange(events)
        yield Context(
            torch.from_numpy(rows),
            data.visited[rows],
            torch.from_numpy(items),
            torch.from_numpy(kinds),
            torch.from_numpy(times),
            data.purchases[rows],
        )


class Phase:
    """Times a phase and keeps its peak RSS (and CUDA peak allocation)."""

    def __init__(self, device: torch.device):
        self.device, self.me = device, psutil.Process()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.rss_before = self.me.memory_info().rss
        self.rss = Sampler(lambda: self.me.memory_info().rss, every=0.05).__enter__()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t
        self.rss.__exit__(*exc)
        self.cuda_peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None


def measure(args) -> dict:
    from quality import build_tables

    from training.train_evaluate import load_views

    settings = load_settings()
    batch = settings.scoring.batch_size
    root = build_tables("synthetic", args.work)["synthetic"]
    _, data = load_views(root)
    device = torch.device(args.device)
    torch.manual_seed(0)
    retriever = build_model("sasrec", data).to(device).eval()
    config = merged_config("awmoe", {"candidates": args.candidates, "max_len": args.events})
    ranker = model_class("awmoe")(data, config, retriever=retriever).to(device).eval()
    cfg = ranker.cfg
    history = ranker.history_length
    pairs = args.users * args.candidates
    out: dict = {
        "users": args.users,
        "candidates": args.candidates,
        "events": args.events,
        "scoring_batch": batch,
        "chunk_rows": CHUNK_ROWS,
        "catalogue": data.n_items,
        "dim": cfg.dim,
        "attention_hidden": cfg.attention_hidden,
        "experts": cfg.experts,
        "retriever": retriever.name,
        "phases": {},
    }

    def record(name: str, phase: Phase) -> None:
        row = {
            "seconds": phase.seconds,
            "pairs_per_second": pairs / phase.seconds,
            "peak_rss_mib": phase.rss.peak / 2**20,
            "rss_before_mib": phase.rss_before / 2**20,
        }
        if phase.cuda_peak is not None:
            row["cuda_peak_mib"] = phase.cuda_peak / 2**20
        out["phases"][name] = row
        print(
            f"{name}: {phase.seconds:.1f} s, {row['pairs_per_second']:,.0f} (user, candidate) pairs/s, "
            f"peak RSS {row['peak_rss_mib']:,.0f} MiB ({row['rss_before_mib']:,.0f} before)",
            flush=True,
        )

    with torch.no_grad():
        warm = next(contexts(data, min(batch, args.users), args.events, history, batch, 1)).to(device)
        c, r = ranker.candidates(warm)[1:]
        ranker.rank_candidates(warm, c, r)
        del warm, c, r
        kept = []  # the candidates, for the ranking phase (a few MB: U x N items and scores)
        with Phase(device) as p:
            for ctx in contexts(data, args.users, args.events, history, batch, 0):
                ctx = ctx.to(device)
                _, cands, retr = ranker.candidates(ctx)
                kept.append((ctx, cands, retr))
        record("retrieval", p)
        with Phase(device) as p:
            for ctx, cands, retr in kept:
                ranker.rank_candidates(ctx, cands, retr)
        record("ranking", p)
        del kept

        rng = torch.Generator(device="cpu").manual_seed(0)
        d, n, length = cfg.dim, args.candidates, args.events
        units = {
            "bare_unit": ActivationUnit(d, cfg.attention_hidden, "softmax"),
            "din_concat_unit": ConcatUnit(d, cfg.attention_hidden),
        }
        for name, unit in units.items():
            unit = unit.to(device).eval()
            cand = torch.randn(CHUNK_ROWS, n, d, generator=rng).to(device)
            ev = torch.randn(CHUNK_ROWS, length, d, generator=rng).to(device)
            valid = torch.ones(CHUNK_ROWS, length, dtype=torch.bool, device=device)
            unit(cand, ev, valid)
            with Phase(device) as p:
                for start in range(0, args.users, CHUNK_ROWS):
                    rows = min(CHUNK_ROWS, args.users - start)
                    unit(cand[:rows], ev[:rows], valid[:rows])
            record(name, p)
    phases = out["phases"]
    out["ranking_over_bare_unit"] = phases["ranking"]["seconds"] / phases["bare_unit"]["seconds"]
    out["ranking_over_retrieval"] = phases["ranking"]["seconds"] / phases["retrieval"]["seconds"]
    out["target_met"] = out["ranking_over_bare_unit"] <= 1.5
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--events", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "tmp" / "quality")
    ap.add_argument(
        "--out", type=Path, default=None, help="results file (default: results/ranking_speed[_cuda].json)"
    )
    args = ap.parse_args()
    configure("WARNING")
    result = measure(args)
    result["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
    }
    print(
        f"ranking / bare unit: {result['ranking_over_bare_unit']:.2f}x (target 1.5x: "
        f"{'met' if result['target_met'] else 'missed'}); ranking / retrieval: {result['ranking_over_retrieval']:.2f}x",
        flush=True,
    )
    suffix = "_cuda" if args.device.startswith("cuda") else ""
    path = args.out or REPO / "bench" / "results" / f"ranking_speed{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
