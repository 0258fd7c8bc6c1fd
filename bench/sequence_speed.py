"""Speed and memory of the sequence models on the planted 1M-event synthetic log (the tables
``bench/quality.py --benchmark synthetic`` builds), each model in its own process so that its peak
memory is its own:

- training: seconds per epoch of the trainer's loop (windows cut, forward, backward, Adam step; the
  validation evaluation excluded) and the process's peak RSS (CUDA peak when on a GPU);
- scoring: every user's top-50 over the whole catalogue from its own window, against the bare
  matmul + ``torch.topk`` of the same shapes (users x dim @ dim x items), the limit.

    .venv/bin/python bench/sequence_speed.py [--models sasrec,fame] [--device cuda]

Prints a table and saves ``bench/results/sequence_speed.json`` (``sequence_speed_cuda.json`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

K = 50
BATCH = 4096


def measure(name: str, work: Path, device: str | None) -> dict:
    """One model, in this process: an epoch of training, then full scoring and the bare limit."""
    import torch
    from quality import build_tables, time_full_scoring

    from infra.logs import configure
    from training.train_evaluate import load_views
    from training.trainer import fit_model

    configure("WARNING")
    root = build_tables("synthetic", work)["synthetic"]
    _, data = load_views(root)
    r = fit_model(name, data, seed=0, overrides={"train": {"epochs": 1}}, device=device, progress=False)
    model = r.model
    dev = model.device
    examples = len(model.examples()[0])
    score_s = time_full_scoring(model, data, K, BATCH)
    users = torch.randn(data.n_users, model.cfg.dim, device=dev)
    items = torch.randn(data.n_items, model.cfg.dim, device=dev)
    t = time.perf_counter()
    with torch.no_grad():
        for start in range(0, data.n_users, BATCH):
            torch.topk(users[start : start + BATCH] @ items.T, K, dim=1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bare_s = time.perf_counter() - t
    return {
        "model": name,
        "device": str(dev),
        "users": data.n_users,
        "items": data.n_items,
        "train_events": int(data.manifest.stats["train_events"]),
        "training_windows": examples,
        "epoch_seconds": r.seconds_per_epoch,
        "peak_rss_mb": r.peak_rss_mb,
        "peak_cuda_mb": r.peak_cuda_mb,
        "score_all_users_top50_seconds": score_s,
        "score_users_per_second": data.n_users / score_s,
        "bare_matmul_topk_seconds": bare_s,
        "bare_users_per_second": data.n_users / bare_s,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sasrec,fame")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: CUDA when present)")
    ap.add_argument("--work", default=str(REPO / "bench" / "results" / "tmp" / "quality"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, Path(args.work), args.device)))
        return 0
    rows = []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--work", args.work]
        if args.device:
            cmd += ["--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"| {name} | {r['device']} | {r['training_windows']:,} | {r['epoch_seconds']:.1f} s | "
            f"{r['peak_rss_mb']:.0f} MB | {r['score_users_per_second']:,.0f} | {r['bare_users_per_second']:,.0f} |",
            flush=True,
        )
    cuda = any(r["device"].startswith("cuda") for r in rows)
    out = REPO / "bench" / "results" / f"sequence_speed{'_cuda' if cuda else ''}.json"
    info = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "k": K, "rows": rows}
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
