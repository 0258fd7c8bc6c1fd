"""Structured logging: one line per stage with its counts and seconds (logfmt or JSON)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

LOGGER_NAME = "funnelrec"
_FORMAT = "logfmt"


def configure(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Route funnelrec's log lines to stderr; safe to call more than once."""
    global _FORMAT
    _FORMAT = fmt
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(getattr(h, "_funnelrec", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._funnelrec = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def _render(value: Any) -> str:
    if isinstance(value, float):
        value = round(value, 3)
    text = str(value)
    return json.dumps(text) if (" " in text or "=" in text or not text) else text


def format_fields(fields: dict[str, Any]) -> str:
    if _FORMAT == "json":
        return json.dumps(fields, default=str, sort_keys=False)
    return " ".join(f"{k}={_render(v)}" for k, v in fields.items())


@contextlib.contextmanager
def stage(name: str, **context: Any) -> Iterator[dict[str, Any]]:
    """Time a stage and log one summary line when it ends.

    The body fills the yielded dict with counts; the line carries ``status=ok`` or
    ``status=failed`` with the error type, plus ``seconds``.
    """
    counts: dict[str, Any] = {}
    start = time.perf_counter()
    log = get_logger()
    try:
        yield counts
    except BaseException as exc:
        fields = {"stage": name, **context, "status": "failed", "error": type(exc).__name__, **counts}
        fields["seconds"] = time.perf_counter() - start
        log.error(format_fields(fields))
        raise
    fields = {"stage": name, **context, "status": "ok", **counts, "seconds": time.perf_counter() - start}
    log.info(format_fields(fields))
