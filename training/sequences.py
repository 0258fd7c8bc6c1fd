"""Each shopper's events as a sequence: the one builder sequence models read, in training, in
evaluation and at scoring.

The event order is made once, by Spark: ``train_events.event_seq`` for training, and the serving
context's ``history_*`` arrays for scoring, both by time, then funnel stage, then a hash of (user,
item, behaviour), never by item id (an id order plants a pattern a model would learn). This module
never re-sorts.

``EventLog`` holds every user's events in that order (ragged, CSR-like); ``EventLog.windows`` cuts
the ``length`` events before given positions, left-padded with -1: evaluation and scoring take the
window before a user's end, training the windows before its targets (``training_windows``), so the
position a target is predicted from cannot differ between them. ``SequenceFeatures.of`` turns a
window into what an encoder embeds (items with holes removed, behaviour, time-gap bucket, session
start); models call it on every path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Gap buckets: 0 padding, 1 an event with no known gap (the window's first, or no times), then
#: 2 + floor(log2(1 + seconds since the previous event)), capped (2**23 s is about 97 days).
GAP_BUCKETS = 2 + 24
#: Recency buckets of an item's last position in a window (0 = the newest event): 0, 1, 2-3, 4-7, ...
RECENCY_BUCKETS = 8
#: A missing time (benchmarks without timestamps, padding).
NO_TIME = -1


@dataclass
class EventLog:
    """Every user's events in the split's order: user ``u``'s are ``indptr[u]:indptr[u + 1]``.

    ``items`` are indices of the model's item map (-1: an item it does not know), ``behaviors``
    funnel positions (``infra.tables.BEHAVIORS``), ``times`` epoch seconds (``NO_TIME`` unknown).
    """

    indptr: np.ndarray
    items: np.ndarray
    behaviors: np.ndarray
    times: np.ndarray

    @classmethod
    def from_lists(cls, items, behaviors, times=None) -> EventLog:
        """One user per element of ``items`` (each a sequence of item indices, oldest first)."""
        lengths = np.fromiter((len(x) for x in items), np.int64, len(items))
        indptr = np.zeros(len(items) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])

        def flat(rows, fill: int) -> np.ndarray:
            if rows is None:
                return np.full(indptr[-1], fill, np.int64)
            if not indptr[-1]:
                return np.zeros(0, np.int64)
            out = np.concatenate([np.asarray(r, np.int64).reshape(-1) for r in rows])
            if len(out) != indptr[-1]:
                raise ValueError("history columns of one user differ in length")
            return out

        return cls(indptr, flat(items, -1), flat(behaviors, -1), flat(times, NO_TIME))

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def lengths(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, np.int64)
        return self.indptr[users + 1] - self.indptr[users]

    def windows(
        self, users: np.ndarray, length: int, ends: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``length`` events of each user before its position ``ends`` (exclusive, counted from
        the user's first event; default: after its last event), oldest first, left-padded:
        ``(items, behaviors, times)``, each (len(users), length) int64, -1 / ``NO_TIME`` padding."""
        users = np.asarray(users, np.int64)
        n = len(users)
        shape = (n, length)
        items, behaviors = np.full(shape, -1, np.int64), np.full(shape, -1, np.int64)
        times = np.full(shape, NO_TIME, np.int64)
        if length == 0 or n == 0:
            return items, behaviors, times
        start = self.indptr[users]
        stop = self.indptr[users + 1] if ends is None else start + np.asarray(ends, np.int64)
        take = np.minimum(stop - start, length)
        # Flat gather: row r's j-th column (j >= length - take[r]) is event stop[r] - length + j.
        rows = np.repeat(np.arange(n), take)
        cols = (
            np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take) + np.repeat(length - take, take)
        )
        src = np.repeat(stop - length, take) + cols
        items[rows, cols] = self.items[src]
        behaviors[rows, cols] = self.behaviors[src]
        times[rows, cols] = self.times[src]
        return items, behaviors, times


def training_windows(log: EventLog, users: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every target event of ``users``: (user, position of the event in the user's sequence), for
    positions >= 1 (an event with nothing before it has no input). ``targets`` is a bool mask over
    ``log``'s flat events. Inputs are then ``log.windows(user, length, ends=position)``: the same
    cut as scoring, whose end is after the last event."""
    users = np.asarray(users, np.int64)
    lengths = log.lengths(users)
    owner = np.repeat(users, lengths)
    position = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = log.indptr[owner] + position
    keep = targets[flat] & (position >= 1)
    return owner[keep], position[keep]


@dataclass
class SequenceFeatures:
    """A batch of windows as an encoder reads them, all (B, L) on one device.

    ``items`` are item indices + 1 with 0 for padding (unknown items removed, the rest shifted
    right so the newest event stays last); ``behaviors`` funnel position + 1 (0 padding); ``gaps``
    time-gap buckets (``GAP_BUCKETS``); ``session_start`` 1 where the gap from the previous event
    exceeds the session gap (or there is no previous event), 0 else and for padding; ``valid`` bool.
    """

    items: torch.Tensor
    behaviors: torch.Tensor
    gaps: torch.Tensor
    session_start: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(
        cls,
        items: torch.Tensor,
        behaviors: torch.Tensor,
        times: torch.Tensor,
        session_gap_seconds: float,
    ) -> SequenceFeatures:
        valid = items >= 0
        # Stable right-compaction: valid events keep their order and end at the last column.
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)
        valid = torch.gather(valid, 1, order)
        items = torch.where(valid, torch.gather(items, 1, order), -1)
        behaviors = torch.where(valid, torch.gather(behaviors, 1, order), -1)
        times = torch.where(valid, torch.gather(times, 1, order), NO_TIME)
        prev_valid = torch.zeros_like(valid)
        prev_valid[:, 1:] = valid[:, :-1]
        prev_times = torch.full_like(times, NO_TIME)
        prev_times[:, 1:] = times[:, :-1]
        known = valid & prev_valid & (times != NO_TIME) & (prev_times != NO_TIME)
        gap = (times - prev_times).clamp(min=0).to(torch.float64)
        bucket = 2 + torch.floor(torch.log2(1 + gap)).clamp(max=GAP_BUCKETS - 3).long()
        gaps = torch.where(known, bucket, torch.where(valid, 1, 0))
        starts = valid & (~known | (gap > session_gap_seconds))
        return cls(items + 1, behaviors + 1, gaps, starts.long(), valid)


def recency_and_stage(features: SequenceFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of ``features``: whether it is its item's last occurrence in the window, that
    item's recency bucket (``RECENCY_BUCKETS``, from the newest position) and the deepest funnel
    stage (behaviour + 1) the window shows for it. What a repeat path scores the window's items by."""
    items = features.items
    same = (items.unsqueeze(2) == items.unsqueeze(1)) & features.valid.unsqueeze(2)
    later = torch.triu(torch.ones(items.shape[1], items.shape[1], dtype=torch.bool, device=items.device), 1)
    last = features.valid & ~(same & later).any(2)
    steps_back = items.shape[1] - 1 - torch.arange(items.shape[1], device=items.device)
    recency = torch.floor(torch.log2(1 + steps_back.double())).long().clamp(max=RECENCY_BUCKETS - 1)
    stage = (same.long() * features.behaviors.unsqueeze(1)).amax(2)
    return last, recency.expand_as(items), stage
