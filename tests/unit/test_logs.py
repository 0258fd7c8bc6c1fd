"""The one line per stage, as logfmt and as JSON, on stderr; and Airflow's structlog left alone."""

from __future__ import annotations

import json
import logging
import re

import pytest
import structlog

from infra import logs
from infra.logs import configure, get_logger, stage

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z"


@pytest.fixture
def funnelrec_logger():
    """The ``funnelrec`` logger as the test found it, restored after (``configure`` is process-wide)."""
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = list(logger.handlers), logger.level, logger.propagate, logs._renderer
    yield logger
    logger.handlers[:], logger.level, logger.propagate, logs._renderer = saved


def _stages() -> None:
    with stage("sessionize", date="2015-09-18") as counts:
        counts.update(events=97381, sessions=15877, share=2 / 3)
    with pytest.raises(ValueError), stage("split", date="2015-09-18") as counts:
        counts["users"] = 2137
        raise ValueError("no purchases")


def test_a_stage_line_in_logfmt(funnelrec_logger, capsys):
    configure("INFO", "logfmt")
    _stages()
    ok, failed = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        rf"timestamp={TIMESTAMP} level=info event=sessionize date=2015-09-18 status=ok events=97381 "
        r"sessions=15877 share=0\.667 seconds=\d+\.\d{1,3}",
        ok,
    ), ok
    assert re.fullmatch(
        rf"timestamp={TIMESTAMP} level=error event=split date=2015-09-18 status=failed error=ValueError "
        r"users=2137 seconds=\d+\.\d{1,3}",
        failed,
    ), failed


#: The two JSON lines ``_stages`` logs, without their timestamps and seconds.
JSON_LINES = (
    {"event": "sessionize", "level": "info", "date": "2015-09-18", "status": "ok"}
    | {"events": 97381, "sessions": 15877, "share": 0.667},
    {"event": "split", "level": "error", "date": "2015-09-18", "status": "failed"}
    | {"error": "ValueError", "users": 2137},
)


def test_a_stage_line_in_json(funnelrec_logger, capsys):
    configure("INFO", "json")
    _stages()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == len(JSON_LINES)
    for line, expected in zip(lines, JSON_LINES, strict=True):
        assert re.fullmatch(TIMESTAMP, line.pop("timestamp")) and isinstance(line.pop("seconds"), float)
        assert line == expected


def test_configure_twice_keeps_one_handler_and_follows_the_last_call(funnelrec_logger, capsys):
    configure("INFO", "json")
    configure("WARNING", "logfmt")
    log = get_logger("registry")
    log.info("register", version=3)  # below WARNING: dropped
    log.warning("promote", measure="failed", error="OSError: gone")
    assert sum(isinstance(h, logs._Stderr) for h in funnelrec_logger.handlers) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith('level=warning event=promote measure=failed error="OSError: gone"'), line


def test_structlogs_global_configuration_is_left_to_airflow(funnelrec_logger, capsys):
    """Airflow's task processes configure structlog globally for their own logs; ours neither reads
    nor replaces that configuration."""
    before = structlog.get_config()
    structlog.configure(processors=[structlog.processors.KeyValueRenderer()])
    try:
        configure("INFO", "logfmt")
        assert structlog.get_config()["processors"][0].__class__ is structlog.processors.KeyValueRenderer
        get_logger().info("nightly", date="2015-09-18")
    finally:
        structlog.configure(**before)
    assert re.fullmatch(
        rf"timestamp={TIMESTAMP} level=info event=nightly date=2015-09-18", capsys.readouterr().err.strip()
    )


def test_unconfigured_lines_reach_the_root_loggers_handlers(funnelrec_logger, caplog):
    """An Airflow task never calls ``configure``: the lines go to the handlers Airflow put on the root
    logger, as any library's."""
    funnelrec_logger.handlers[
        :
    ] = []  # as in a fresh process (pytest attaches its own where propagate is off)
    funnelrec_logger.propagate = True
    funnelrec_logger.setLevel(logging.NOTSET)
    logs._renderer = logs._RENDERERS["logfmt"]
    with caplog.at_level(logging.INFO), stage("validate", table="events") as counts:
        counts["rows"] = 10
    (record,) = [r for r in caplog.records if r.name == logs.LOGGER_NAME]
    assert record.levelno == logging.INFO
    assert " event=validate table=events status=ok rows=10 seconds=" in record.getMessage()
