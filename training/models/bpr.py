"""BPR from the ``implicit`` library (see ``als.py``)."""

from training.models.als import BPR

__all__ = ["BPR"]
