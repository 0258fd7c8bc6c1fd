import hashlib
from collections import Counter

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
