"""Source mappings: how a raw CSV-like log maps onto the canonical ``events`` table.

Adding a new log needs a mapping file, not code. A mapping is a small YAML (see the shipped
examples in ``jobs/sources/``)::

    name: retailrocket_mb
    path: retailrocket_mb/events.csv.gz   # relative to paths.data_root; globs ok; {date} = a daily drop
    format: {delimiter: ",", header: true}
    columns: {user_id: user_id, item_id: item_id, behavior: behavior, event_time: timestamp}
    time: {unit: s}                        # or {format: "yyyy-MM-dd HH:mm:ss 'UTC'", zone: UTC}
    behaviors: {view: view, cart: cart, buy: purchase}
    float_ids: [user_id, item_id]          # ids written like 266079.0
    ids: {pattern: "[0-9]+", max_length: 20}  # optional: what a valid id looks like (default: any
                                              # letters/digits/_.:- up to 64 characters)

Lookup order for a name: ``<data_root>/sources/<name>.yaml``, then ``jobs/sources/<name>.yaml``.
"""

from __future__ import annotations

import glob
import gzip
import io
from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.tables import BEHAVIORS

SHIPPED_DIR = Path(__file__).with_name("sources")
CANONICAL_FIELDS = (
    "user_id",
    "item_id",
    "behavior",
    "event_time",
    "category_id",
    "brand",
    "price",
    "source_session_id",
)
REQUIRED_FIELDS = ("user_id", "item_id", "behavior", "event_time")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CsvFormat(_Strict):
    delimiter: str = ","
    quote: str = '"'
    header: bool = True
    #: Field names in order; required when ``header`` is false, checked against the header otherwise.
    columns: list[str] | None = None

    @model_validator(mode="after")
    def _columns_when_headerless(self) -> CsvFormat:
        if not self.header and not self.columns:
            raise ValueError("format.columns is required when format.header is false")
        if len(self.delimiter) != 1:
            raise ValueError("format.delimiter must be one character")
        return self


class TimeSpec(_Strict):
    unit: Literal["s", "ms", "us"] | None = None  # epoch numbers
    format: str | None = None  # a Spark datetime pattern
    zone: str = "UTC"  # zone of `format` times that carry none
    # Earlier times are refused as implausible: the default is before any web shop's log, and
    # catches epoch 0 and seconds read as milliseconds; null accepts any time.
    not_before: date | None = date(1990, 1, 1)

    @model_validator(mode="after")
    def _one_kind(self) -> TimeSpec:
        if (self.unit is None) == (self.format is None):
            raise ValueError("time needs exactly one of `unit` (epoch) or `format` (pattern)")
        return self


#: What an id looks like unless the mapping says otherwise: a letter or digit, then letters, digits
#: and ``_ . : -``; an id is matched whole (Java regex syntax, as Spark's ``rlike``).
DEFAULT_ID_PATTERN = r"[0-9A-Za-z][0-9A-Za-z_.:\-]*"
#: Values a float parser or a database writes for "no number": never an id, whatever the pattern.
NOT_IDS = ("nan", "-nan", "inf", "+inf", "-inf", "infinity", "-infinity", "null", "none", "na", "n/a")


class IdSpec(_Strict):
    """What a valid user, item and category id looks like. An id of digits only must also fit a
    signed 64-bit integer (``bad_id`` otherwise: analysts and other tools read such ids as numbers)."""

    pattern: str = DEFAULT_ID_PATTERN
    max_length: int = Field(default=64, gt=0)

    @model_validator(mode="after")
    def _compiles(self) -> IdSpec:
        import re

        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"ids.pattern {self.pattern!r} is not a regular expression: {exc}") from None
        return self


class SourceMapping(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    description: str = ""
    path: str
    format: CsvFormat = CsvFormat()
    columns: dict[str, str]
    time: TimeSpec
    behaviors: dict[str, str]
    float_ids: list[str] = Field(default_factory=list)
    ids: IdSpec = IdSpec()

    @model_validator(mode="after")
    def _check(self) -> SourceMapping:
        unknown = set(self.columns) - set(CANONICAL_FIELDS)
        if unknown:
            raise ValueError(
                f"columns maps unknown canonical fields {sorted(unknown)}; known: {CANONICAL_FIELDS}"
            )
        missing = [f for f in REQUIRED_FIELDS if f not in self.columns]
        if missing:
            raise ValueError(f"columns must map {missing}")
        bad = {v for v in self.behaviors.values() if v not in BEHAVIORS}
        if bad:
            raise ValueError(
                f"behaviors maps to unknown canonical behaviours {sorted(bad)}; known: {BEHAVIORS}"
            )
        if self.format.columns:
            absent = [c for c in self.columns.values() if c not in self.format.columns]
            if absent:
                raise ValueError(f"columns names source fields not in format.columns: {absent}")
        bad_ids = set(self.float_ids) - {"user_id", "item_id", "category_id"}
        if bad_ids:
            raise ValueError(f"float_ids may only list user_id, item_id, category_id; got {sorted(bad_ids)}")
        return self

    @property
    def is_daily(self) -> bool:
        """A daily source holds one day's drop per file set (its path has a {date} placeholder)."""
        return "{date}" in self.path or "{yyyymmdd}" in self.path

    def files(self, data_root: Path, run_date: date) -> list[Path]:
        pattern = self.path.replace("{date}", run_date.isoformat()).replace(
            "{yyyymmdd}", run_date.strftime("%Y%m%d")
        )
        full = pattern if Path(pattern).is_absolute() else str(Path(data_root) / pattern)
        return [Path(p) for p in sorted(glob.glob(full)) if Path(p).is_file()]


def load_mapping(name_or_path: str, data_root: Path | None = None) -> SourceMapping:
    """Load a mapping by name (user folder first, then the shipped examples) or by file path."""
    candidates = []
    if name_or_path.endswith((".yaml", ".yml")):
        candidates.append(Path(name_or_path))
    else:
        if data_root is not None:
            candidates.append(Path(data_root) / "sources" / f"{name_or_path}.yaml")
        candidates.append(SHIPPED_DIR / f"{name_or_path}.yaml")
    for path in candidates:
        if path.is_file():
            return SourceMapping.model_validate(yaml.safe_load(path.read_text()))
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no source mapping {name_or_path!r} (looked in {tried})")


def shipped_mappings() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def read_first_line(path: Path) -> str:
    """A file's first line without its line ending or a UTF-8 byte-order mark (as Spark's text
    reader drops it), gzip read transparently, CRLF tolerated; bytes that are not UTF-8 are read
    as U+FFFD, as Spark reads them."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            text = io.TextIOWrapper(fh, encoding="utf-8", errors="replace", newline="")
            return text.readline().rstrip("\r\n").removeprefix("\ufeff")
    except (EOFError, OSError):  # a gzip cut off (or not gzip at all) before its first line ends
        return ""


def read_header(path: Path, delimiter: str) -> list[str]:
    """Field names from a file's first line."""
    return [f.strip().strip('"') for f in read_first_line(path).split(delimiter)]
