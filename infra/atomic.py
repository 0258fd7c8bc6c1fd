"""Atomic publishing of a directory (a partition or a bundle) on a POSIX filesystem.

A stage writes its output into a staging directory beside the target, then swaps it in. On Linux
the swap is ``renameat2(RENAME_EXCHANGE)``: readers see either the old or the new directory,
never a missing or half-written one, and a run killed at any point leaves the previous good
directory in place. Elsewhere it falls back to two renames with a recovery step.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

STAGING = ".staging"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc >= 2.28
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths. False when the platform or filesystem cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def _trash_path(target: Path) -> Path:
    return target.parent / STAGING / f"{target.name}.previous"


def recover(target: Path) -> None:
    """Restore a target left missing by a fallback swap that was killed between its two renames."""
    trash = _trash_path(target)
    if not target.exists() and trash.exists():
        os.rename(trash, target)


def swap_in(staged: Path, target: Path) -> None:
    """Make ``staged`` the new ``target`` atomically and delete the previous content."""
    staged, target = Path(staged), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    if not target.exists():
        os.rename(staged, target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged)  # now holds the previous content
        return
    trash = _trash_path(target)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(target, trash)
    os.rename(staged, target)
    shutil.rmtree(trash)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: This host in scratch names: a warehouse shared by several hosts has scratch folders of each.
_HOST = socket.gethostname().replace(".", "_") or "host"


def _remove_orphans(staging_root: Path) -> None:
    """Delete scratch folders of this host whose process is gone (killed before its clean-up)."""
    for p in staging_root.iterdir():
        parts = p.name.rsplit(".", 3)
        if len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit() and not pid_alive(int(parts[2])):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """Yield a not-yet-existing path under ``parent/.staging`` (same filesystem); removed on exit.
    Scratch folders that a killed process of this host left there are removed first."""
    staging_root = Path(parent) / STAGING
    staging_root.mkdir(parents=True, exist_ok=True)
    _remove_orphans(staging_root)
    scratch = staging_root / f"{name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        yield scratch
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a staging path on the target's filesystem; on success swap it in as ``target``.

    If the body raises, the staging directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    with scratch_dir(target.parent, target.name) as staged:
        yield staged
        if not staged.exists():
            staged.mkdir(parents=True)
        swap_in(staged, target)


def publish_partitions(staged_root: Path, target_root: Path) -> list[Path]:
    """Swap in every leaf partition directory found under ``staged_root`` (hive layout).

    ``staged_root/event_date=2015-09-18/part-*.parquet`` replaces
    ``target_root/event_date=2015-09-18/``. Each partition is replaced atomically on its own;
    partitions of the target that the staged output does not contain are left alone.
    """
    staged_root, target_root = Path(staged_root), Path(target_root)
    published = []
    for leaf in sorted(_leaf_partitions(staged_root)):
        rel = leaf.relative_to(staged_root)
        dest = target_root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        swap_in(leaf, dest)
        published.append(dest)
    return published


def _leaf_partitions(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if "=" in d]
        if not dirnames and any(f.endswith(".parquet") for f in filenames):
            yield Path(dirpath)
