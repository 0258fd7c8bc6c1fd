import csv
import hashlib
import itertools
import json
import time
from collections import Counter, defaultdict
from datetime import date

import numpy as np
import pytest

import jobs.synth as synth_module
from infra.cli import main
from jobs.sources import load_mapping
from jobs.synth import SynthParams, generate


def _digest(files):
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_and_exact_count(tmp_path):
    p = SynthParams(events=30_000, seed=3, users_batch=500, events_per_file=7_000)
    a = generate(tmp_path / "a", p)
    b = generate(tmp_path / "b", p)
    c = generate(tmp_path / "c", SynthParams(events=30_000, seed=4, users_batch=500, events_per_file=7_000))
    assert a.events == 30_000
    assert [f.name for f in a.files] == [f"part-{i:05d}.csv" for i in range(5)]  # streamed, 7k lines per file
    assert sum(len(f.read_text().splitlines()) for f in a.files) == 30_000
    assert _digest(a.files) == _digest(b.files)
    assert _digest(a.files) != _digest(c.files)


def test_funnel_mix_and_popularity_look_like_taobao(tmp_path):
    r = generate(tmp_path, SynthParams(events=200_000, seed=1))
    lines = [line.split(",") for f in r.files for line in f.read_text().splitlines()]
    mix = Counter(x[3] for x in lines)
    share = {k: v / len(lines) for k, v in mix.items()}
    # The real Taobao slice: pv 89.2%, cart 5.5%, fav 3.1%, buy 2.3%.
    assert 0.86 < share["pv"] < 0.92 and 0.04 < share["cart"] < 0.07
    assert 0.02 < share["fav"] < 0.045 and 0.015 < share["buy"] < 0.03
    items = Counter(x[1] for x in lines if x[3] == "pv")
    top = sum(c for _, c in items.most_common(len(items) // 100))
    assert top / sum(items.values()) > 0.2  # the top 1% of items draw a fifth of the views: a long tail
    times = [int(x[4]) for x in lines]
    assert max(times) - min(times) < 9 * 86_400
    # Every buy of an item follows a view of it by the same user.
    seen = {(x[0], x[1]) for x in lines if x[3] == "pv"}
    assert all((x[0], x[1]) in seen for x in lines if x[3] == "buy")


# --- Planted structure (issue #23) -------------------------------------------------------------

#: sha256 of the plain generator's bytes, computed on the code before planting was added (e92d26c).
#: NumPy's Generator streams are stable within a NumPy version; a NumPy upgrade may change them.
PLAIN_DIGESTS = {
    (30_000, 3, 500, 7_000): "5a09a6815067c09d963f95cfa89ad159537dcc9385005373b949c0d26e70e850",
    (20_000, 7, 5_000, 2_000_000): "a41d363d9fca8b18f1467841e20714e69ca5d3ea9b50c91caf24a0066fe00b23",
}
ALL_ON = {"plant_sequence": 0.2, "facets": 3, "long_tail": 0.3, "p_buy_unseen": 0.3}


def _log(result):
    """(user, item, behaviour, time) rows of a generated log, in file order."""
    rows = []
    for f in result.files:
        for line in f.read_text().splitlines():
            user, item, _, behaviour, ts = line.split(",")
            rows.append((int(user), int(item), behaviour, int(ts)))
    return rows


def _table(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _planted_digest(folder):
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir()):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_default_planting_options_keep_the_plain_generators_bytes(tmp_path):
    for (events, seed, batch, per_file), digest in PLAIN_DIGESTS.items():
        r = generate(
            tmp_path / str(seed), SynthParams(events, seed, users_batch=batch, events_per_file=per_file)
        )
        assert _digest(r.files) == digest
        assert r.planted is None and not (tmp_path / str(seed) / "planted").exists()
    # The planting knobs that only act when a planting is on change nothing either.
    idle = SynthParams(
        20_000, 7, p_follow=0.1, p_buy_follow=0.9, facet_values=3, values_per_user=1, p_facet=0.1
    )
    assert _digest(generate(tmp_path / "idle", idle).files) == PLAIN_DIGESTS[(20_000, 7, 5_000, 2_000_000)]


def _successor_stats(folder, p_follow):
    """Share of a view of an item with a successor being followed (same user, within 30 minutes)
    by a view of its successor; the share of such successor views bought, and of other views."""
    r = generate(folder, SynthParams(events=100_000, seed=5, plant_sequence=0.2, p_follow=p_follow))
    rows = _log(r)
    succ = {
        int(x["item_id"]): int(x["successor"])
        for x in _table(folder / "planted" / "planted_items.csv")
        if x["successor"]
    }
    bought = {(u, i) for u, i, b, _ in rows if b == "buy"}
    views = defaultdict(list)
    for u, i, b, t in rows:
        if b == "pv":
            views[u].append((t, i))
    pairs = follows = follows_bought = others = others_bought = 0
    for u, vs in views.items():
        for (t0, a), (t1, b) in itertools.pairwise(vs):
            if t1 - t0 > 1_800:
                continue
            if a in succ:
                pairs += 1
                if succ[a] == b:
                    follows += 1
                    follows_bought += (u, b) in bought
                    continue
            others += 1
            others_bought += (u, b) in bought
    return r, follows / pairs, follows_bought / max(follows, 1), others_bought / others


def test_planted_successors_follow_their_items_and_are_bought(tmp_path):
    r, follow, bought_after, bought_other = _successor_stats(tmp_path / "on", 0.8)
    _, control, _, _ = _successor_stats(tmp_path / "control", 0.0)  # same successor map, never followed
    assert follow > 0.7 and control < 0.02, (follow, control)
    # The dependence reaches purchases: a successor view is bought far more often than a view.
    assert bought_after > 0.25 and bought_other < 0.12, (bought_after, bought_other)
    truth = json.loads((r.planted / "planted.json").read_text())
    assert truth["planted"]["successor_views"] > 0 and truth["planted"]["successor_extra_buys"] > 0
    assert truth["sequence"]["items_with_successor"] == sum(
        1 for x in _table(r.planted / "planted_items.csv") if x["successor"]
    )
    # Every buy still follows a view of its item by the same user.
    rows = _log(r)
    seen = {(u, i) for u, i, b, _ in rows if b == "pv"}
    assert all((u, i) in seen for u, i, b, _ in rows if b == "buy")


def _facet_shares(folder, p_facet):
    """Share of views whose item has one of the user's preferred values in their dominant facet,
    and the same for the next facet (a decoy: preferred values recorded, never drawn from)."""
    r = generate(folder, SynthParams(events=100_000, seed=6, facets=3, facet_values=8, p_facet=p_facet))
    items = {int(x["item_id"]): x for x in _table(folder / "planted" / "planted_items.csv")}
    users = {int(x["user_id"]): x for x in _table(folder / "planted" / "planted_users.csv")}
    dominant = decoy = n = 0
    for u, i, b, _ in _log(r):
        if b != "pv":
            continue
        user = users[u]
        f = int(user["dominant_facet"])
        g = (f + 1) % 3
        n += 1
        dominant += items[i][f"facet_{f}"] in user[f"facet_{f}"].split("|")
        decoy += items[i][f"facet_{g}"] in user[f"facet_{g}"].split("|")
    return dominant / n, decoy / n


def test_planted_facets_concentrate_users_on_their_preferred_values(tmp_path):
    chance = 2 / 8  # values_per_user / facet_values
    dominant, decoy = _facet_shares(tmp_path / "on", 0.7)
    control, _ = _facet_shares(tmp_path / "control", 0.0)
    assert dominant > 0.65, dominant
    assert abs(decoy - chance) < 0.08 and abs(control - chance) < 0.08, (decoy, control)


def test_long_tail_users_have_one_to_three_events(tmp_path):
    r = generate(tmp_path, SynthParams(events=100_000, seed=8, long_tail=0.3))
    events = defaultdict(list)
    for u, i, b, _ in _log(r):
        events[u].append((b, i))
    users = _table(tmp_path / "planted" / "planted_users.csv")
    assert len(users) == r.users == len(events)
    tail = {int(x["user_id"]) for x in users if x["long_tail"] == "1"}
    assert 0.26 < len(tail) / r.users < 0.34
    assert json.loads((tmp_path / "planted" / "planted.json").read_text())["planted"][
        "long_tail_users"
    ] == len(tail)
    sizes = Counter(len(events[u]) for u in tail)
    assert set(sizes) == {1, 2, 3} and min(sizes.values()) > 0.25 * len(tail), sizes
    others = [len(events[u]) for u in events if u not in tail and u != r.users]  # the last user may be cut
    assert min(others) >= 2 and sum(others) / len(others) > 15
    for u in tail:  # a long-tail user's buy or cart comes after its view
        seen = set()
        for b, i in events[u]:
            assert b == "pv" or i in seen
            seen.add(i)


def test_ground_truth_beside_the_log_parses_and_ingest_reads_only_the_log(tmp_path):
    folder = tmp_path / "synthetic"
    r = generate(folder, SynthParams(events=30_000, seed=9, events_per_file=10_000, **ALL_ON))
    assert sorted(p.name for p in r.planted.iterdir()) == [
        "planted.json",
        "planted_items.csv",
        "planted_users.csv",
    ]
    truth = json.loads((r.planted / "planted.json").read_text())
    p = SynthParams(events=30_000, seed=9, events_per_file=10_000, **ALL_ON)
    assert truth["params"]["facets"] == 3 and truth["params"]["end_date"] == "2017-12-03"
    assert truth["params"]["p_buy_unseen"] == 0.3 and "rule" in truth["unseen_buys"]
    assert truth["planted"]["unseen_buys"] == r.planted_counts["unseen_buys"] > 0
    assert truth["events"] == 30_000 and truth["users"] == r.users and truth["counts"] == r.counts
    assert truth["n_items"] == p.n_items and len(truth["facets"]["items_per_value"]) == 3
    assert all(sum(row) == p.n_items for row in truth["facets"]["items_per_value"])
    items = _table(r.planted / "planted_items.csv")
    assert list(items[0]) == ["item_id", "facet_0", "facet_1", "facet_2", "successor"]
    assert len(items) == p.n_items and all(0 <= int(x["facet_1"]) < 8 for x in items)
    ids = {x["item_id"] for x in items}
    assert all(x["successor"] in ids and x["successor"] != x["item_id"] for x in items if x["successor"])
    users = _table(r.planted / "planted_users.csv")
    assert list(users[0]) == ["user_id", "dominant_facet", "facet_0", "facet_1", "facet_2", "long_tail"]
    assert [int(x["user_id"]) for x in users] == list(range(1, r.users + 1))
    for x in users:
        for f in range(3):
            values = [int(v) for v in x[f"facet_{f}"].split("|")]
            assert len(set(values)) == 2 and all(0 <= v < 8 for v in values)
    # The `synthetic` mapping's glob finds the log files only, not the ground truth.
    found = load_mapping("synthetic", tmp_path).files(tmp_path, date(2017, 12, 3))
    assert found == r.files == [folder / f"part-{i:05d}.csv" for i in range(3)]
    # Regenerating without planting leaves no stale ground truth.
    assert generate(folder, SynthParams(events=5_000)).planted is None and not (folder / "planted").exists()


def test_planted_logs_are_seeded_and_fast(tmp_path):
    started = time.perf_counter()
    a = generate(tmp_path / "a", SynthParams(events=100_000, seed=1, **ALL_ON))
    seconds = time.perf_counter() - started
    b = generate(tmp_path / "b", SynthParams(events=100_000, seed=1, **ALL_ON))
    c = generate(tmp_path / "c", SynthParams(events=100_000, seed=2, **ALL_ON))
    assert a.events == 100_000 and seconds < 5, seconds  # about 0.2 s on the 2-core CI machine
    assert _digest(a.files) == _digest(b.files) and _planted_digest(a.planted) == _planted_digest(b.planted)
    assert _digest(a.files) != _digest(c.files) and _planted_digest(a.planted) != _planted_digest(c.planted)


def test_synth_command_passes_the_planting_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["synth", "--events", "5000", "--out", str(tmp_path / "s"), "--plant-sequence", "0.25"]
    argv += ["--p-follow", "0.6", "--p-buy-follow", "0.2", "--facets", "2", "--facet-values", "5"]
    argv += ["--values-per-user", "1", "--p-facet", "0.5", "--long-tail", "0.1", "--p-buy-unseen", "0.15"]
    assert main(argv) == 0
    params = json.loads((tmp_path / "s" / "planted" / "planted.json").read_text())["params"]
    assert (params["plant_sequence"], params["p_follow"], params["p_buy_follow"]) == (0.25, 0.6, 0.2)
    assert (params["facets"], params["facet_values"], params["values_per_user"]) == (2, 5, 1)
    assert (params["p_facet"], params["long_tail"], params["p_buy_unseen"]) == (0.5, 0.1, 0.15)
    assert main(["synth", "--events", "5000", "--out", str(tmp_path / "t"), "--p-follow", "1.5"]) == 1
    assert main(["synth", "--events", "5000", "--out", str(tmp_path / "t"), "--p-buy-unseen", "1.5"]) == 1


# --- Unseen buys ---------------------------------------------------------------------------------

#: sha256 of logs with the other plantings on, computed on the code before p_buy_unseen was added
#: (59da764): the part files, then planted_items.csv and planted_users.csv (planted.json gains the
#: new param and count, so it is not compared).
PLANTED_DIGESTS = [
    (
        {"events": 40_000, "seed": 11, "users_batch": 1_000, "events_per_file": 15_000}
        | {"plant_sequence": 0.2, "facets": 3, "long_tail": 0.3},
        "47a96b51aa2fc155c73168134ea29aae6f41f3076028cb979db8d40737e7db07",
        "f341ea8e992922fab1900dd56778cc8a7e0be33f3a3dc9facd9bd1e01c290f98",
    ),
    (
        {"events": 40_000, "seed": 12, "facets": 2, "facet_values": 5, "p_facet": 0.5},
        "47f2df2d52242d07f8047cfeede38bbdb3ad5a52f974355880ab15e902b62a5e",
        "9e030c4b5b53a7b51021cb9fdf3c9f0f64d5b0fc237ae5ebfa0248ec09095af4",
    ),
]


def test_p_buy_unseen_off_keeps_the_bytes_of_the_other_plantings(tmp_path):
    for k, (kw, log_digest, tables_digest) in enumerate(PLANTED_DIGESTS):
        r = generate(tmp_path / str(k), SynthParams(**kw, p_buy_unseen=0.0))
        assert _digest(r.files) == log_digest
        assert _digest([r.planted / "planted_items.csv", r.planted / "planted_users.csv"]) == tables_digest
        truth = json.loads((r.planted / "planted.json").read_text())
        assert truth["params"]["p_buy_unseen"] == 0.0 and truth["planted"]["unseen_buys"] == 0
        assert "unseen_buys" not in truth
    with pytest.raises(ValueError, match="p_buy_unseen"):
        SynthParams(1_000, p_buy_unseen=-0.1)
    assert SynthParams(1_000, p_buy_unseen=0.1).planting and not SynthParams(1_000).planting


def _unseen(on, off):
    """The rows of log ``on`` that log ``off`` (same params, p_buy_unseen 0) lacks: its unseen buys,
    for every user ``on`` wrote (``off`` has fewer events per user, so it reaches further)."""
    rows_on, rows_off = Counter(_log(on)), Counter(_log(off))
    assert off.users > on.users
    assert not Counter({x: c for x, c in rows_off.items() if x[0] < on.users}) - rows_on  # only added
    return list((rows_on - rows_off).elements())


def test_unseen_buys_end_the_set_share_of_sessions_after_their_last_event(tmp_path):
    base = {"events": 60_000, "seed": 21, "long_tail": 0.2}
    off = generate(tmp_path / "off", SynthParams(**base))
    some = generate(tmp_path / "some", SynthParams(**base, p_buy_unseen=0.3))
    every = generate(tmp_path / "every", SynthParams(**base, p_buy_unseen=1.0))
    bought, all_sessions = _unseen(some, off), _unseen(every, off)
    assert {b for _, _, b, _ in bought + all_sessions} == {"buy"}
    assert (
        len(bought) == some.planted_counts["unseen_buys"]
        and len(all_sessions) == every.planted_counts["unseen_buys"]
    )
    # At 1.0 every session (of a user who is not long-tail) gets one: the share is per session.
    last = every.users  # the users both logs wrote in full (``every`` has the most events per user)
    share = sum(u < last for u, *_ in bought) / sum(u < last for u, *_ in all_sessions)
    assert abs(share - 0.3) < 0.03, share
    # Long-tail users get none (and keep their 1-3 events).
    tail = {int(x["user_id"]) for x in _table(some.planted / "planted_users.csv") if x["long_tail"] == "1"}
    assert tail and not any(u in tail for u, *_ in all_sessions)
    # A short gap after the session's last event (1 s + exponential, mean 75 s), inside the window
    # (2017-11-25 .. 2017-12-03 UTC). The gap to the user's event before it is at most that gap.
    times = defaultdict(list)
    for u, _, _, t in _log(off):
        times[u].append(t)
    gaps = np.array([t - max(x for x in times[u] if x <= t) for u, _, _, t in bought])
    assert all(1_511_568_000 <= t < 1_512_345_600 for *_, t in all_sessions)
    assert (gaps >= 0).all() and 40 < np.median(gaps) < 60 and 60 < gaps.mean() < 85, (
        np.median(gaps),
        gaps.mean(),
    )


def test_unseen_buys_follow_the_facets_and_skip_the_sessions_views(tmp_path, monkeypatch):
    checked = []
    draw = synth_module._unseen_buys

    def exact(plant, p, traits, first_user, s_user, s_end, v_session, v_item, *rest):
        # Exactly: no bought item was viewed in its session, and the buy comes after the session's end.
        s, item, when = draw(plant, p, traits, first_user, s_user, s_end, v_session, v_item, *rest)
        viewed = set(zip(v_session.tolist(), v_item.tolist(), strict=True))
        assert not viewed & set(zip(s.tolist(), item.tolist(), strict=True))
        assert (when > s_end[s]).all()
        checked.append(s.size)
        return s, item, when

    monkeypatch.setattr(synth_module, "_unseen_buys", exact)
    # Views ignore the facets (p_facet 0): the unseen buys alone follow them.
    base = {"events": 60_000, "seed": 22, "facets": 3, "facet_values": 8, "p_facet": 0.0}
    on = generate(tmp_path / "on", SynthParams(**base, p_buy_unseen=0.5))
    off = generate(tmp_path / "off", SynthParams(**base))
    assert sum(checked) >= on.planted_counts["unseen_buys"] > 1_000
    items = {int(x["item_id"]): x for x in _table(on.planted / "planted_items.csv")}
    users = {int(x["user_id"]): x for x in _table(off.planted / "planted_users.csv")}  # the same traits

    def preferred(u, i):
        f = users[u]["dominant_facet"]
        return items[i][f"facet_{f}"] in users[u][f"facet_{f}"].split("|")

    unseen = _unseen(on, off)
    funnel = [(u, i) for u, i, b, _ in _log(off) if b == "buy"]
    chance = 2 / 8
    assert sum(preferred(u, i) for u, i, _, _ in unseen) / len(unseen) > 0.95
    assert abs(sum(preferred(u, i) for u, i in funnel) / len(funnel) - chance) < 0.08
    # In the log: hardly any has a view of its item by the user in the half hour before (only another
    # session of the user can give one); a funnel buy always has.
    views = defaultdict(list)
    for u, i, b, t in _log(on):
        if b == "pv":
            views[u, i].append(t)
    near = sum(any(0 <= t - v <= 1_800 for v in views[u, i]) for u, i, _, t in unseen)
    assert near / len(unseen) < 0.01, near
