"""Keys a typed configuration does not know (most likely misspelt): where pydantic refused them
(``extra="forbid"``) and the nearest valid key to suggest. Used by the settings and by the models'
configurations; only pydantic, so that a served model can bundle it.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


class UnknownSettingError(ValueError):
    """A key the schema does not know (most likely misspelt), refused rather than ignored."""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``M`` or ``M | None``); None for anything else,
    free-form mappings such as ``dict[str, str]`` included."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        return next((m for m in map(_model_of, get_args(annotation)) if m is not None), None)
    return None


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """Key as written in a YAML (a field's alias, else its name) -> the field."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _all_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, field in _keys(model).items():
        out.append((*prefix, key))
        sub = _model_of(field.annotation)
        if sub is not None:
            out += _all_keys(sub, (*prefix, key))
    return out


def unknown_key_hint(model: type[BaseModel], loc: Sequence[str | int]) -> str:
    """What to suggest for the unknown key at ``loc`` (keys from the top of ``model``): the same key
    in another section (it was put in the wrong one), else the nearest spelling among its siblings,
    else a near spelling elsewhere, else the valid keys of its section."""
    loc = tuple(str(k) for k in loc)
    parent: type[BaseModel] | None = model
    for key in loc[:-1]:
        field = _keys(parent).get(key) if parent is not None else None
        parent = _model_of(field.annotation) if field is not None else None
    siblings = list(_keys(parent)) if parent is not None else []
    everywhere = _all_keys(model)
    candidates = [
        [p for p in everywhere if p[-1] == loc[-1]],
        [(*loc[:-1], near) for near in difflib.get_close_matches(loc[-1], siblings, n=1)],
        [
            p
            for near in difflib.get_close_matches(loc[-1], {p[-1] for p in everywhere}, n=1, cutoff=0.8)
            for p in everywhere
            if p[-1] == near
        ],
    ]
    for found in candidates:
        if found:
            return f"did you mean {'.'.join(found[0])}?"
    return f"valid keys here: {', '.join(siblings)}" if siblings else "nothing is valid here"


def unknown_keys(error: ValidationError) -> list[tuple[str | int, ...]]:
    """The locations of the keys ``error`` refused as unknown (``extra="forbid"``)."""
    return [tuple(e["loc"]) for e in error.errors() if e["type"] == "extra_forbidden"]
