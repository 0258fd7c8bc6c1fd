"""The GX project lock: one validation per warehouse at a time, and a clear error after the timeout."""

from __future__ import annotations

import pytest
from filelock import FileLock

from validation.runner import run_checkpoint


def test_a_validation_that_cannot_get_the_gx_lock_fails_clearly_and_writes_nothing(tmp_path):
    gx_root, result = tmp_path / "gx", tmp_path / "result.json"
    gx_root.mkdir()
    with (
        FileLock(gx_root / ".lock"),
        pytest.raises(
            TimeoutError, match=r"waited 0\.2 s for the GX project lock .*held by another validation"
        ),
    ):
        run_checkpoint("events", "2015-09-18", [], gx_root, tmp_path / "docs", result, lock_timeout=0.2)
    assert not result.exists()
