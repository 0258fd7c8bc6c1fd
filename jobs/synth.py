"""Seeded synthetic behaviour logs in the Taobao UserBehavior format, for scale work.

Shoppers browse in sessions (a daily rhythm picks the hour; gaps inside a session are short),
item popularity follows a power law, each item has a category, and each view may lead to a
favourite or a cart, a cart to a purchase. Per-view rates are set so the behaviour mix lands close
to the real Taobao slice (pv 89%, cart 5.5%, fav 3.1%, buy 2.3%).

Generation is vectorised per batch of users and streamed to CSV files of at most
``events_per_file`` lines, so memory does not grow with the number of events (the item tables are
capped at ``MAX_ITEMS``). The same parameters always give the same bytes.

Planted structure, for proving what sequence models find (every option off by default; off, the
bytes are exactly those of the plain generator):

- **sequential dependence** (``plant_sequence``): that share of items A get a successor B (a
  uniformly drawn other item). Within a session, the view after a view of such an A is B with
  probability ``p_follow`` (decided before the usual repeat-or-fresh draw); a successor view is bought
  with probability ``p_buy_follow`` on top of the usual funnel (a direct buy, only when the funnel
  did not buy it already), so "B is bought after A" reaches the purchases.
- **facets** (``facets`` > 0): every item has one of ``facet_values`` values in each facet; every
  user has a uniform dominant facet and prefers ``values_per_user`` values of each facet. A fresh
  item draw (not a successor, not a repeat) is, with probability ``p_facet``, drawn by popularity
  from the items whose value in the user's dominant facet is one the user prefers; otherwise from
  global popularity. Only the dominant facet steers the draws; the other facets' preferences are
  recorded as decoys.
- **long-tail users** (``long_tail``): that share of users have one session and 1-3 events in all
  (uniform), their first events in time, a purchase among them only at the usual rates.
- **unseen buys** (``p_buy_unseen``): with that probability a session ends in one more purchase, a
  lone ``buy`` (no view, fav or cart of it before it in the session) of an item not viewed in that
  session, so held-out purchases reach items the shopper did not see there. Its time is the
  session's last event (view, fav, cart or buy) plus a gap drawn like the gaps between a session's
  views (1 s + exponential with mean 75 s), clipped to the window's last second like every event.
  With facets on, the item is drawn by popularity from the items whose value in the user's dominant
  facet is one the user prefers (the facet views' draw, but always, not with probability
  ``p_facet``; global popularity where those items are none), so the facet preferences steer
  purchases and not only views; with facets off, by global popularity. A draw of an item viewed in
  the session is redrawn, up to ``UNSEEN_TRIES`` times, and the buy dropped if every draw hits one
  (only a preferred group of a handful of items makes that happen). The user may have viewed the
  item in another session. Long-tail users never get one.

With any planting on, the ground truth is written to ``planted/`` beside the ``part-*.csv`` files
(outside the ``synthetic`` mapping's ``synthetic/*.csv`` glob, so ingest never reads it):
``planted.json`` (the params, counts, the facets' definition, the files written), with facets or
successors on ``planted_items.csv`` (``item_id,facet_0..facet_{F-1},successor``; facet columns
only with facets on, successor empty when none; every item, written once) and, with facets or
long-tail users on, ``planted_users.csv``
(``user_id,dominant_facet,facet_0..facet_{F-1},long_tail``; a user's preferred values of facet k
as ``3|5``, dominant_facet empty with facets off; streamed per batch of users). With planting off,
no ``planted/`` folder is written and a stale one is removed.

The planting draws come from their own seeded streams (one per kind), so the plain generator's
draws are untouched: with long-tail users off, a planted log has the same sessions, times and
funnel draws as the plain one of the same seed, only other items (and the successors' extra
purchases: at ``plant_sequence`` 0.3 the buy share rises from about 2.3% to 5.5%). The unseen buys
come on top: a log with them is the same log with those buys added (the ``events`` cap then ends
it at an earlier user); at ``p_buy_unseen`` 0.3 (1M events, ``plant_sequence`` 0.2, 4 facets,
``long_tail`` 0.2) the buy share rises from 4.7% to 9.4%, half of the buys unseen ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np

from infra.dates import window_start

MAX_ITEMS = 2_000_000
#: Item ids are this offset plus the item's index.
ITEM_OFFSET = 1_000_000
#: Share of a day's sessions starting in each UTC hour (Taobao's CST evening peak is UTC 11-15).
HOUR_WEIGHTS = np.array([4, 5, 6, 6, 6, 6, 6, 6, 5, 5, 5, 6, 7, 8, 8, 7, 5, 3, 2, 1, 1, 1, 2, 3], dtype=float)
#: The folder beside the log files that holds the planted ground truth.
PLANTED_DIR = "planted"
PLANTED_FILES = ("planted.json", "planted_items.csv", "planted_users.csv")
MAX_FACETS = 16
#: Tags an event carries through the batch's sort, to count what was planted in what is written.
TAG_SUCCESSOR_VIEW, TAG_SUCCESSOR_BUY, TAG_FACET_VIEW, TAG_UNSEEN_BUY = 1, 2, 4, 8
#: Draws of an unseen buy's item before it is dropped (each redraw only for the draws that hit an
#: item viewed in the session).
UNSEEN_TRIES = 8


@dataclass(frozen=True)
class SynthParams:
    events: int
    seed: int = 0
    end_date: date = date(2017, 12, 3)
    days: int = 9
    users_batch: int = 5_000
    events_per_file: int = 2_000_000
    p_fav: float = 0.035  # per view
    p_cart: float = 0.062  # per view
    p_buy_after_cart: float = 0.36
    p_buy_direct: float = 0.004  # per view, without a cart
    p_review: float = 0.15  # a view repeats the previous item of the session
    zipf_a: float = 1.05  # item popularity exponent
    # Planted structure (module docstring); all off by default.
    plant_sequence: float = 0.0  # share of items with a successor
    p_follow: float = 0.8  # the view after a view of such an item is its successor
    p_buy_follow: float = 0.3  # a successor view is bought, on top of the usual funnel
    facets: int = 0  # facets of items and users (0: off)
    facet_values: int = 8  # values of each facet
    values_per_user: int = 2  # values of each facet a user prefers
    p_facet: float = 0.7  # a fresh draw comes from the user's preferred values of their dominant facet
    long_tail: float = 0.0  # share of users with only 1-3 events
    p_buy_unseen: float = 0.0  # a session ends in a buy of an item not viewed in it

    def __post_init__(self) -> None:
        for name in ("plant_sequence", "p_follow", "p_buy_follow", "p_facet", "long_tail", "p_buy_unseen"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"synth: {name} must be within 0..1, got {value}")
        if not 0 <= self.facets <= MAX_FACETS:
            raise ValueError(f"synth: facets must be within 0..{MAX_FACETS}, got {self.facets}")
        if self.facets and not 2 <= self.facet_values <= 1_000:
            raise ValueError(f"synth: facet_values must be within 2..1000, got {self.facet_values}")
        if self.facets and not 1 <= self.values_per_user <= self.facet_values:
            raise ValueError(
                f"synth: values_per_user must be within 1..facet_values ({self.facet_values}), "
                f"got {self.values_per_user}"
            )

    @property
    def n_items(self) -> int:
        return int(min(MAX_ITEMS, max(1_000, self.events // 40)))

    @property
    def n_categories(self) -> int:
        return max(20, int(math.sqrt(self.n_items) * 2))

    @property
    def planting(self) -> bool:
        """Whether any structure is planted (and the ground truth written)."""
        return self.plant_sequence > 0 or self.facets > 0 or self.long_tail > 0 or self.p_buy_unseen > 0


@dataclass
class SynthResult:
    files: list[Path]
    events: int
    users: int
    counts: dict[str, int]
    #: The ground-truth folder, when something was planted.
    planted: Path | None = None
    #: What was planted in the events written (``planted.json``'s ``planted``).
    planted_counts: dict[str, int] = field(default_factory=dict)


def _item_tables(rng: np.random.Generator, p: SynthParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Popularity CDF over ranks, rank -> item id, item id -> category."""
    ranks = np.arange(1, p.n_items + 1, dtype=float)
    weights = ranks**-p.zipf_a
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    rank_to_item = rng.permutation(p.n_items).astype(np.int64) + ITEM_OFFSET
    category = rng.integers(0, p.n_categories, size=p.n_items).astype(np.int64) + 5_000
    return cdf, rank_to_item, category


class _Facets:
    """Items' facet values and, per (facet, value), its items in popularity order with their
    cumulative popularity, so that a draw from a user's preferred values is two searches."""

    def __init__(self, rng: np.random.Generator, p: SynthParams, cdf: np.ndarray, rank_to_item: np.ndarray):
        n, nf, nv = p.n_items, p.facets, p.facet_values
        self.n_facets, self.n_values, self.per_user = nf, nv, p.values_per_user
        self.item_value = rng.integers(0, nv, size=(n, nf)).astype(np.int16)  # by item index
        weight = np.diff(cdf, prepend=0.0)  # by rank
        value_by_rank = self.item_value[rank_to_item - ITEM_OFFSET]
        self.group_rank = np.empty(nf * n, dtype=np.int32)  # groups (facet, value), ranks ascending
        self.count = np.empty((nf, nv), dtype=np.int64)
        self.start = np.empty((nf, nv), dtype=np.int64)
        for f in range(nf):
            self.group_rank[f * n : (f + 1) * n] = np.argsort(value_by_rank[:, f], kind="stable")
            self.count[f] = np.bincount(value_by_rank[:, f], minlength=nv)
            self.start[f] = f * n + np.r_[0, np.cumsum(self.count[f])[:-1]]
        self.cum = np.cumsum(weight[self.group_rank])
        self.lo = np.where(self.start > 0, self.cum[np.maximum(self.start - 1, 0)], 0.0)
        self.mass = np.where(self.count > 0, self.cum[self.start + self.count - 1] - self.lo, 0.0)

    def users(self, rng: np.random.Generator, n_users: int) -> tuple[np.ndarray, np.ndarray]:
        """Dominant facet (n_users,) and preferred values (n_users, facets, values_per_user), sorted."""
        dominant = rng.integers(0, self.n_facets, size=n_users)
        order = rng.random((n_users, self.n_facets, self.n_values)).argsort(axis=2)
        return dominant, np.sort(order[:, :, : self.per_user], axis=2).astype(np.int16)

    def draw(
        self, rng: np.random.Generator, facet: np.ndarray, prefs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Popularity ranks drawn from the items whose value in ``facet`` is one of ``prefs`` (one
        row per draw), and whether the draw was possible (an empty group leaves it to the caller)."""
        m = facet.size
        u = rng.random((2, m))
        mass = self.mass[facet[:, None], prefs]
        cum = np.cumsum(mass, axis=1)
        total = cum[:, -1]
        j = np.minimum((cum < (u[0] * total)[:, None]).sum(axis=1), prefs.shape[1] - 1)
        value = prefs[np.arange(m), j]
        ok = (total > 0) & (self.count[facet, value] > 0)
        start, count = self.start[facet, value], self.count[facet, value]
        pos = np.searchsorted(self.cum, self.lo[facet, value] + u[1] * self.mass[facet, value], side="right")
        pos = np.clip(pos, start, start + np.maximum(count, 1) - 1)
        return self.group_rank[pos].astype(np.int64), ok


@dataclass
class _Plant:
    """The planting tables and their own random streams (the plain generator's are untouched)."""

    successor: np.ndarray | None  # item index -> successor item id, -1 for none
    facets: _Facets | None
    seq_rng: np.random.Generator
    facet_rng: np.random.Generator
    tail_rng: np.random.Generator
    unseen_rng: np.random.Generator

    @classmethod
    def build(cls, p: SynthParams, cdf: np.ndarray, rank_to_item: np.ndarray) -> _Plant:
        seq_rng, facet_rng, tail_rng, unseen_rng = (
            np.random.default_rng([p.seed, k]) for k in (101, 102, 103, 104)
        )
        successor = None
        if p.plant_sequence > 0:
            n = p.n_items
            has = seq_rng.random(n) < p.plant_sequence
            other = (np.arange(n) + seq_rng.integers(1, n, size=n)) % n  # never the item itself
            successor = np.where(has, other + ITEM_OFFSET, -1).astype(np.int64)
        facets = _Facets(facet_rng, p, cdf, rank_to_item) if p.facets else None
        return cls(successor, facets, seq_rng, facet_rng, tail_rng, unseen_rng)


@dataclass
class _Users:
    """One batch of users' planted traits."""

    long_tail: np.ndarray  # bool
    target: np.ndarray  # events of a long-tail user (1..3)
    dominant: np.ndarray | None
    prefs: np.ndarray | None


def _batch_users(plant: _Plant, p: SynthParams, n_users: int) -> _Users:
    if p.long_tail > 0:
        long_tail = plant.tail_rng.random(n_users) < p.long_tail
        target = plant.tail_rng.integers(1, 4, size=n_users)
    else:
        long_tail, target = np.zeros(n_users, dtype=bool), np.zeros(n_users, dtype=np.int64)
    dominant = prefs = None
    if plant.facets is not None:
        dominant, prefs = plant.facets.users(plant.facet_rng, n_users)
    return _Users(long_tail, target, dominant, prefs)


def _unseen_buys(
    plant: _Plant,
    p: SynthParams,
    traits: _Users,
    first_user: int,
    s_user: np.ndarray,
    s_end: np.ndarray,
    v_session: np.ndarray,
    v_item: np.ndarray,
    cdf: np.ndarray,
    rank_to_item: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sessions that end in an unseen buy, its item and its time (module docstring), drawn from
    the planting's own stream."""
    rng = plant.unseen_rng
    sessions = np.flatnonzero(
        (rng.random(s_user.size) < p.p_buy_unseen) & ~traits.long_tail[s_user - first_user]
    )
    gap = rng.exponential(75.0, size=sessions.size).astype(np.int64) + 1
    n = p.n_items
    seen = np.unique(v_session * n + (v_item - ITEM_OFFSET))  # (session, item index) of every view
    item = np.empty(sessions.size, dtype=np.int64)
    todo = np.arange(sessions.size)
    for _ in range(UNSEEN_TRIES):  # each round redraws only the draws that hit a viewed item
        rank = np.empty(todo.size, dtype=np.int64)
        use_global = np.ones(todo.size, dtype=bool)
        if plant.facets is not None:
            local = s_user[sessions[todo]] - first_user
            dominant = traits.dominant[local]
            drawn, ok = plant.facets.draw(rng, dominant, traits.prefs[local, dominant])
            rank[ok], use_global = drawn[ok], ~ok
        rank[use_global] = np.searchsorted(cdf, rng.random(int(use_global.sum())))
        item[todo] = rank_to_item[np.minimum(rank, n - 1)]
        key = sessions[todo] * n + (item[todo] - ITEM_OFFSET)
        hit = seen[np.minimum(np.searchsorted(seen, key), seen.size - 1)] == key
        todo = todo[hit]
        if not todo.size:
            break
    keep = np.ones(sessions.size, dtype=bool)
    keep[todo] = False  # still an item viewed in the session after every try: no buy
    sessions = sessions[keep]
    return sessions, item[keep], s_end[sessions] + gap[keep]


def _batch(
    rng, p: SynthParams, first_user: int, n_users: int, cdf, rank_to_item, category, t0: int, plant, traits
):
    """Events of ``n_users`` consecutive users as arrays (user, item, category, behavior code, ts,
    planting tag)."""
    activity = rng.lognormal(mean=0.6, sigma=0.9, size=n_users)
    n_sessions = 1 + rng.poisson(activity)
    long_tail = traits is not None and bool(traits.long_tail.any())
    if long_tail:
        n_sessions = np.where(traits.long_tail, 1, n_sessions)
    s_user = np.repeat(np.arange(first_user, first_user + n_users, dtype=np.int64), n_sessions)
    n_s = s_user.size
    day = rng.integers(0, p.days, size=n_s)
    hour = rng.choice(24, size=n_s, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    s_start = t0 + day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, size=n_s)
    n_views = 1 + rng.geometric(0.25, size=n_s)
    if long_tail:
        local = s_user - first_user
        n_views = np.where(traits.long_tail[local], traits.target[local], n_views)

    v_session = np.repeat(np.arange(n_s), n_views)
    v_user = s_user[v_session]
    gaps = rng.exponential(75.0, size=v_session.size).astype(np.int64) + 1
    first_in_session = np.r_[True, v_session[1:] != v_session[:-1]]
    gaps[first_in_session] = 0
    csum = np.cumsum(gaps)
    session_base = np.maximum.accumulate(np.where(first_in_session, csum, 0))
    v_time = s_start[v_session] + (csum - session_base)
    rank = np.searchsorted(cdf, rng.random(v_session.size))
    facet_view = np.zeros(v_session.size, dtype=bool)
    if plant is not None and plant.facets is not None:
        facet_view = plant.facet_rng.random(v_session.size) < p.p_facet
        local = v_user[facet_view] - first_user
        dominant = traits.dominant[local]
        drawn, ok = plant.facets.draw(plant.facet_rng, dominant, traits.prefs[local, dominant])
        facet_view[np.flatnonzero(facet_view)[~ok]] = False
        rank[facet_view] = drawn[ok]
    v_item = rank_to_item[np.minimum(rank, p.n_items - 1)]
    review = (rng.random(v_session.size) < p.p_review) & ~first_in_session
    follow = np.zeros(v_session.size, dtype=bool)
    if plant is not None and plant.successor is not None:
        # A view's item depends on the one before it (a successor may have a successor): one step
        # per position in the session, over every session long enough at once.
        fresh, v_item = v_item, v_item.copy()
        u_follow = plant.seq_rng.random(v_session.size)
        starts = np.flatnonzero(first_in_session)
        for k in range(1, int(n_views.max())):
            idx = starts[n_views > k] + k
            prev = v_item[idx - 1]
            succ = plant.successor[prev - ITEM_OFFSET]
            f = (succ >= 0) & (u_follow[idx] < p.p_follow)
            v_item[idx] = np.where(f, succ, np.where(review[idx], prev, fresh[idx]))
            follow[idx] = f
    else:
        prev_item = np.r_[v_item[:1], v_item[:-1]]
        v_item = np.where(review, prev_item, v_item)
    facet_kept = facet_view & ~review & ~follow  # a facet draw that is the view's item
    tag = np.where(follow, TAG_SUCCESSOR_VIEW, 0) + np.where(facet_kept, TAG_FACET_VIEW, 0)
    tags = [tag.astype(np.int8)]

    u, it, code, ts = [v_user], [v_item], [np.zeros(v_item.size, np.int8)], [v_time]
    fav = rng.random(v_item.size) < p.p_fav
    u.append(v_user[fav]), it.append(v_item[fav]), code.append(np.full(fav.sum(), 1, np.int8))
    ts.append(v_time[fav] + rng.integers(2, 40, size=fav.sum()))
    cart = rng.random(v_item.size) < p.p_cart
    cart_time = v_time[cart] + rng.integers(5, 90, size=cart.sum())
    (
        u.append(v_user[cart]),
        it.append(v_item[cart]),
        code.append(np.full(cart.sum(), 2, np.int8)),
        ts.append(cart_time),
    )
    buy_c = rng.random(cart.sum()) < p.p_buy_after_cart
    (
        u.append(v_user[cart][buy_c]),
        it.append(v_item[cart][buy_c]),
        code.append(np.full(buy_c.sum(), 3, np.int8)),
    )
    ts.append(cart_time[buy_c] + rng.integers(30, 600, size=buy_c.sum()))
    direct = rng.random(v_item.size) < p.p_buy_direct
    u.append(v_user[direct]), it.append(v_item[direct]), code.append(np.full(direct.sum(), 3, np.int8))
    ts.append(v_time[direct] + rng.integers(10, 300, size=direct.sum()))
    tags.append(np.zeros(sum(x.size for x in u[1:]), np.int8))
    # The session of each event so far (for the end of a session, where an unseen buy follows).
    sess = [v_session, v_session[fav], v_session[cart], v_session[cart][buy_c], v_session[direct]]
    if follow.any():
        bought = direct.copy()
        bought[np.flatnonzero(cart)[buy_c]] = True
        extra = follow & ~bought & (plant.seq_rng.random(v_item.size) < p.p_buy_follow)
        u.append(v_user[extra]), it.append(v_item[extra]), code.append(np.full(extra.sum(), 3, np.int8))
        ts.append(v_time[extra] + plant.seq_rng.integers(10, 300, size=extra.sum()))
        tags.append(np.full(extra.sum(), TAG_SUCCESSOR_BUY, np.int8))
        sess.append(v_session[extra])
    if plant is not None and p.p_buy_unseen > 0:
        s_end = np.zeros(n_s, dtype=np.int64)
        np.maximum.at(s_end, np.concatenate(sess), np.concatenate(ts))
        s, item, when = _unseen_buys(
            plant, p, traits, first_user, s_user, s_end, v_session, v_item, cdf, rank_to_item
        )
        u.append(s_user[s]), it.append(item), code.append(np.full(s.size, 3, np.int8)), ts.append(when)
        tags.append(np.full(s.size, TAG_UNSEEN_BUY, np.int8))

    users, items, codes, times, tagged = (np.concatenate(x) for x in (u, it, code, ts, tags))
    # Sessions late on the last day must not spill past it (they would be after the run date).
    times = np.minimum(times, t0 + p.days * 86_400 - 1)
    order = np.lexsort((codes, times, users))
    users, items, codes, times, tagged = users[order], items[order], codes[order], times[order], tagged[order]
    if long_tail:
        # A long-tail user keeps their first 1-3 events (a view comes first: it sorts before what
        # follows from it, so a kept cart or buy always has its view).
        local = users - first_user
        first = np.searchsorted(users, users, side="left")
        keep = ~traits.long_tail[local] | (np.arange(users.size) - first < traits.target[local])
        users, items, codes, times, tagged = users[keep], items[keep], codes[keep], times[keep], tagged[keep]
    cats = category[items - ITEM_OFFSET]
    return users, items, cats, codes, times, tagged


def _csv_lines(columns: list[np.ndarray]) -> str:
    """Rows of string columns joined by commas, one per line (with the final newline)."""
    row = columns[0].astype(str)
    for col in columns[1:]:
        row = np.char.add(np.char.add(row, ","), col.astype(str))
    return "\n".join(row.tolist()) + "\n"


def _values_text(values: np.ndarray) -> np.ndarray:
    """Preferred values (rows, k) as ``3|5`` strings."""
    text = values[:, 0].astype(str)
    for j in range(1, values.shape[1]):
        text = np.char.add(np.char.add(text, "|"), values[:, j].astype(str))
    return text


def _write_items(path: Path, p: SynthParams, plant: _Plant, chunk: int = 500_000) -> None:
    n_facets = p.facets
    header = ["item_id", *(f"facet_{f}" for f in range(n_facets)), "successor"]
    with open(path, "w", encoding="ascii", newline="\n") as fh:
        fh.write(",".join(header) + "\n")
        for lo in range(0, p.n_items, chunk):
            idx = np.arange(lo, min(lo + chunk, p.n_items))
            cols = [idx + ITEM_OFFSET]
            if plant.facets is not None:
                cols += [plant.facets.item_value[idx, f] for f in range(n_facets)]
            succ = plant.successor[idx] if plant.successor is not None else np.full(idx.size, -1)
            cols.append(np.where(succ >= 0, succ.astype(str), ""))
            fh.write(_csv_lines(cols))


def _users_header(p: SynthParams) -> str:
    names = ["user_id", "dominant_facet", *(f"facet_{f}" for f in range(p.facets)), "long_tail"]
    return ",".join(names) + "\n"


def _users_lines(p: SynthParams, first_user: int, traits: _Users, n: int) -> str:
    cols: list[np.ndarray] = [np.arange(first_user, first_user + n)]
    if traits.dominant is not None:
        cols.append(traits.dominant[:n])
        cols += [_values_text(traits.prefs[:n, f]) for f in range(p.facets)]
    else:
        cols.append(np.full(n, "", dtype=object))
    cols.append(traits.long_tail[:n].astype(np.int8))
    return _csv_lines(cols)


def _clear_planted(out_dir: Path) -> Path:
    folder = out_dir / PLANTED_DIR
    for name in PLANTED_FILES:
        (folder / name).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return folder


def _planted_json(p: SynthParams, plant: _Plant, result: SynthResult, files: list[str]) -> dict:
    params = {k: (v.isoformat() if isinstance(v, date) else v) for k, v in asdict(p).items()}
    doc: dict = {
        "params": params,
        "n_items": p.n_items,
        "n_categories": p.n_categories,
        "item_ids": f"{ITEM_OFFSET} + item index (0 .. n_items - 1)",
        "events": result.events,
        "users": result.users,
        "counts": result.counts,
        "planted": result.planted_counts,
        "files": files,
    }
    if plant.successor is not None:
        doc["sequence"] = {
            "items_with_successor": int((plant.successor >= 0).sum()),
            "rule": "within a session, the view after a view of item A is successor(A) with probability "
            "p_follow; a successor view is bought with probability p_buy_follow besides the usual funnel",
        }
    if plant.facets is not None:
        fa = plant.facets
        total = fa.mass.sum(axis=1, keepdims=True)
        doc["facets"] = {
            "facets": fa.n_facets,
            "values": fa.n_values,
            "values_per_user": fa.per_user,
            "items_per_value": fa.count.tolist(),
            "popularity_share_per_value": np.round(fa.mass / total, 6).tolist(),
            "rule": "a fresh item draw is, with probability p_facet, drawn by popularity from the items "
            "whose value in the user's dominant facet is one of the user's preferred values of it",
        }
    if p.p_buy_unseen > 0:
        doc["unseen_buys"] = {
            "rule": "with probability p_buy_unseen a session of a user who is not long-tail ends in a buy "
            "(no view of it before it) of an item not viewed in that session, 1 s + exponential (mean "
            "75 s) after the session's last event; the item is drawn by popularity from the items whose "
            "value in the user's dominant facet is one of the user's preferred values of it (facets on) "
            f"or from global popularity (facets off), redrawn up to {UNSEEN_TRIES} times while it is an "
            "item viewed in the session, else no buy",
        }
    return doc


def generate(out_dir: Path, params: SynthParams) -> SynthResult:
    """Write ``params.events`` events as ``part-NNNNN.csv`` files under ``out_dir`` (and, with any
    planting on, the ground truth under ``out_dir/planted``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.csv"):
        old.unlink()
    planted_dir = _clear_planted(out_dir)
    rng = np.random.default_rng(params.seed)
    cdf, rank_to_item, category = _item_tables(rng, params)
    plant = _Plant.build(params, cdf, rank_to_item) if params.planting else None
    users_file = plant is not None and (params.facets > 0 or params.long_tail > 0)
    items_file = plant is not None and (params.facets > 0 or params.plant_sequence > 0)
    start = datetime.combine(window_start(params.end_date, params.days), datetime.min.time(), UTC)
    t0 = int(start.timestamp())
    names = np.array(["pv", "fav", "cart", "buy"])
    files: list[Path] = []
    written = 0
    next_user = 1
    counts = dict.fromkeys(names.tolist(), 0)
    planted = dict.fromkeys(
        ("successor_views", "successor_extra_buys", "facet_views", "long_tail_users", "unseen_buys"), 0
    )
    fh = None
    ufh = None
    in_file = 0
    last_user = 0
    try:
        if plant is not None:
            planted_dir.mkdir(exist_ok=True)
            if users_file:
                ufh = open(planted_dir / "planted_users.csv", "w", encoding="ascii", newline="\n")  # noqa: SIM115
                ufh.write(_users_header(params))
        while written < params.events:
            traits = _batch_users(plant, params, params.users_batch) if plant is not None else None
            users, items, cats, codes, times, tags = _batch(
                rng, params, next_user, params.users_batch, cdf, rank_to_item, category, t0, plant, traits
            )
            first_user = next_user
            next_user += params.users_batch
            take = min(users.size, params.events - written)
            last_user = int(users[take - 1])
            if plant is not None:
                kept = tags[:take]
                planted["successor_views"] += int(((kept & TAG_SUCCESSOR_VIEW) > 0).sum())
                planted["successor_extra_buys"] += int(((kept & TAG_SUCCESSOR_BUY) > 0).sum())
                planted["facet_views"] += int(((kept & TAG_FACET_VIEW) > 0).sum())
                planted["unseen_buys"] += int(((kept & TAG_UNSEEN_BUY) > 0).sum())
                planted["long_tail_users"] += int(traits.long_tail[: last_user - first_user + 1].sum())
                if ufh is not None:
                    ufh.write(_users_lines(params, first_user, traits, last_user - first_user + 1))
            pos = 0
            while pos < take:
                if fh is None or in_file >= params.events_per_file:
                    if fh is not None:
                        fh.close()
                    path = out_dir / f"part-{len(files):05d}.csv"
                    files.append(path)
                    fh = open(path, "w", encoding="ascii", newline="\n")  # noqa: SIM115 (rolled over; closed below)
                    in_file = 0
                n = min(take - pos, params.events_per_file - in_file)
                sl = slice(pos, pos + n)
                fh.write(_csv_lines([users[sl], items[sl], cats[sl], names[codes[sl]], times[sl]]))
                for code, c in zip(*np.unique(codes[sl], return_counts=True), strict=True):
                    counts[str(names[code])] += int(c)
                pos += n
                in_file += n
            written += take
    finally:
        if fh is not None:
            fh.close()
        if ufh is not None:
            ufh.close()
    result = SynthResult(files=files, events=written, users=last_user, counts=counts)
    if plant is not None:
        if items_file:
            _write_items(planted_dir / "planted_items.csv", params, plant)
        result.planted, result.planted_counts = planted_dir, planted
        written_files = ["planted.json"]
        written_files += ["planted_items.csv"] if items_file else []
        written_files += ["planted_users.csv"] if users_file else []
        doc = _planted_json(params, plant, result, written_files)
        (planted_dir / "planted.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="ascii")
    return result
