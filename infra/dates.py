"""Run dates: the one parser every date-scoped command and task uses."""

from __future__ import annotations

import re
from datetime import date, timedelta

_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class InvalidDateError(ValueError):
    pass


def parse_run_date(text: str) -> date:
    """Parse ``YYYY-MM-DD`` strictly; anything else (``2026-13-01``, ``../x``, ``2026-1-1``) is refused."""
    if not isinstance(text, str) or not _DATE_RE.fullmatch(text):
        raise InvalidDateError(f"invalid date {text!r}: expected YYYY-MM-DD, e.g. 2015-09-18")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise InvalidDateError(f"invalid date {text!r}: {exc} (expected YYYY-MM-DD)") from None


def window_start(run_date: date, days: int) -> date:
    """First day of a window of ``days`` days that ends on (and includes) ``run_date``."""
    return run_date - timedelta(days=days - 1)
