"""Seeded synthetic behaviour logs in the Taobao UserBehavior format, for scale work.

Shoppers browse in sessions (a daily rhythm picks the hour; gaps inside a session are short),
item popularity follows a power law, each item has a category, and each view may lead to a
favourite or a cart, a cart to a purchase. Per-view rates are set so the behaviour mix lands close
to the real Taobao slice (pv 89%, cart 5.5%, fav 3.1%, buy 2.3%).

Generation is vectorised per batch of users and streamed to CSV files of at most
``events_per_file`` lines, so memory does not grow with the number of events (the item tables are
capped at ``MAX_ITEMS``). The same (events, seed, end date, days) always gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np

from infra.dates import window_start

MAX_ITEMS = 2_000_000
#: Share of a day's sessions starting in each UTC hour (Taobao's CST evening peak is UTC 11-15).
HOUR_WEIGHTS = np.array([4, 5, 6, 6, 6, 6, 6, 6, 5, 5, 5, 6, 7, 8, 8, 7, 5, 3, 2, 1, 1, 1, 2, 3], dtype=float)


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

    @property
    def n_items(self) -> int:
        return int(min(MAX_ITEMS, max(1_000, self.events // 40)))

    @property
    def n_categories(self) -> int:
        return max(20, int(math.sqrt(self.n_items) * 2))


@dataclass
class SynthResult:
    files: list[Path]
    events: int
    users: int
    counts: dict[str, int]


def _item_tables(rng: np.random.Generator, p: SynthParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Popularity CDF over ranks, rank -> item id, item id -> category."""
    ranks = np.arange(1, p.n_items + 1, dtype=float)
    weights = ranks**-p.zipf_a
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    rank_to_item = rng.permutation(p.n_items).astype(np.int64) + 1_000_000
    category = rng.integers(0, p.n_categories, size=p.n_items).astype(np.int64) + 5_000
    return cdf, rank_to_item, category


def _batch(rng, p: SynthParams, first_user: int, n_users: int, cdf, rank_to_item, category, t0: int):
    """Events of ``n_users`` consecutive users as arrays (user, item, category, behavior code, ts)."""
    activity = rng.lognormal(mean=0.6, sigma=0.9, size=n_users)
    n_sessions = 1 + rng.poisson(activity)
    s_user = np.repeat(np.arange(first_user, first_user + n_users, dtype=np.int64), n_sessions)
    n_s = s_user.size
    day = rng.integers(0, p.days, size=n_s)
    hour = rng.choice(24, size=n_s, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    s_start = t0 + day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, size=n_s)
    n_views = 1 + rng.geometric(0.25, size=n_s)

    v_session = np.repeat(np.arange(n_s), n_views)
    v_user = s_user[v_session]
    gaps = rng.exponential(75.0, size=v_session.size).astype(np.int64) + 1
    first_in_session = np.r_[True, v_session[1:] != v_session[:-1]]
    gaps[first_in_session] = 0
    csum = np.cumsum(gaps)
    session_base = np.maximum.accumulate(np.where(first_in_session, csum, 0))
    v_time = s_start[v_session] + (csum - session_base)
    rank = np.searchsorted(cdf, rng.random(v_session.size))
    v_item = rank_to_item[np.minimum(rank, p.n_items - 1)]
    review = (rng.random(v_session.size) < p.p_review) & ~first_in_session
    prev_item = np.r_[v_item[:1], v_item[:-1]]
    v_item = np.where(review, prev_item, v_item)

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

    users, items, codes, times = (np.concatenate(x) for x in (u, it, code, ts))
    # Sessions late on the last day must not spill past it (they would be after the run date).
    times = np.minimum(times, t0 + p.days * 86_400 - 1)
    order = np.lexsort((codes, times, users))
    users, items, codes, times = users[order], items[order], codes[order], times[order]
    cats = category[items - 1_000_000]
    return users, items, cats, codes, times


def generate(out_dir: Path, params: SynthParams) -> SynthResult:
    """Write ``params.events`` events as ``part-NNNNN.csv`` files under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.csv"):
        old.unlink()
    rng = np.random.default_rng(params.seed)
    cdf, rank_to_item, category = _item_tables(rng, params)
    start = datetime.combine(window_start(params.end_date, params.days), datetime.min.time(), UTC)
    t0 = int(start.timestamp())
    names = np.array(["pv", "fav", "cart", "buy"])
    files: list[Path] = []
    written = 0
    next_user = 1
    counts = dict.fromkeys(names.tolist(), 0)
    fh = None
    in_file = 0
    last_user = 0
    try:
        while written < params.events:
            users, items, cats, codes, times = _batch(
                rng, params, next_user, params.users_batch, cdf, rank_to_item, category, t0
            )
            next_user += params.users_batch
            take = min(users.size, params.events - written)
            last_user = int(users[take - 1])
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
                block = np.char.add(
                    np.char.add(
                        np.char.add(users[sl].astype(str), ","), np.char.add(items[sl].astype(str), ",")
                    ),
                    np.char.add(
                        np.char.add(cats[sl].astype(str), ","),
                        np.char.add(np.char.add(names[codes[sl]], ","), times[sl].astype(str)),
                    ),
                )
                fh.write("\n".join(block.tolist()))
                fh.write("\n")
                for code, c in zip(*np.unique(codes[sl], return_counts=True), strict=True):
                    counts[str(names[code])] += int(c)
                pos += n
                in_file += n
            written += take
    finally:
        if fh is not None:
            fh.close()
    return SynthResult(files=files, events=written, users=last_user, counts=counts)
