"""Structured logging (structlog): one line per stage with its counts and seconds, logfmt or JSON.

Every line is an event with key-value pairs (``log.info("register", ds=ds, version=3)``), rendered
with a UTC timestamp and its level::

    timestamp=2026-05-01T02:00:03.412345Z level=info event=sessionize date=2015-09-18 status=ok events=97381 seconds=8.9
    {"date": "2015-09-18", "status": "ok", "events": 97381, "seconds": 8.9, "event": "sessionize", "level": "info", "timestamp": "2026-05-01T02:00:03.412345Z"}

A stage's line (``stage``) has the stage's name as its event.

The loggers go through the standard library's ``funnelrec`` logger, never through structlog's
global configuration: Airflow's task processes configure that for their own task logs. There, with
``configure`` not called, funnelrec's lines propagate to the root logger and Airflow's handlers like
any library's; ``configure`` (the CLI) sends them to stderr instead, once, at the configured level.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

LOGGER_NAME = "funnelrec"
FORMATS = ("logfmt", "json")

_RENDERERS: dict[str, structlog.typing.Processor] = {
    "logfmt": structlog.processors.LogfmtRenderer(
        key_order=["timestamp", "level", "event"], drop_missing=True, bool_as_flag=False
    ),
    "json": structlog.processors.JSONRenderer(),
}
_renderer = _RENDERERS["logfmt"]


def _render(logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    # Looked up per line: loggers made before ``configure`` follow the format it sets.
    return _renderer(logger, method, event_dict)


_PROCESSORS: list[structlog.typing.Processor] = [
    structlog.stdlib.filter_by_level,  # before any work for a line that would be dropped
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,
    _render,
]


class _Stderr(logging.StreamHandler):
    """Writes each line to ``sys.stderr`` as it is when the line is written: pytest and embedding
    programs swap it, and a stream bound once would outlive the one it was."""

    def __init__(self) -> None:
        super().__init__()  # the line is rendered already: the default "%(message)s"

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Send funnelrec's lines to stderr at ``level``, rendered as ``fmt``; safe to call more than once."""
    global _renderer
    if fmt not in _RENDERERS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    _renderer = _RENDERERS[fmt]
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.propagate = False


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger over ``funnelrec[.name]``: ``log.info("event", key=value, ...)``."""
    stdlib_logger = logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")
    return structlog.wrap_logger(
        stdlib_logger,
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=True,
    )


def _rounded(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}


@contextlib.contextmanager
def stage(name: str, **context: Any) -> Iterator[dict[str, Any]]:
    """Time a stage and log one line when it ends, with the stage's name as its event.

    The body fills the yielded dict with counts; the line carries ``context``, ``status=ok`` or
    ``status=failed`` with ``error`` (the exception's type), the counts and ``seconds``. Floats are
    rounded to 3 decimals.
    """
    counts: dict[str, Any] = {}
    start = time.perf_counter()
    log = get_logger()
    try:
        yield counts
    except BaseException as exc:
        fields = {**context, "status": "failed", "error": type(exc).__name__, **counts}
        log.error(name, **_rounded({**fields, "seconds": time.perf_counter() - start}))
        raise
    fields = {**context, "status": "ok", **counts, "seconds": time.perf_counter() - start}
    log.info(name, **_rounded(fields))
