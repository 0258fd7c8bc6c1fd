import pytest

from infra import publish


def _write(d, text):
    d.mkdir(parents=True, exist_ok=True)
    (d / "part-0.parquet").write_text(text)


def test_staged_dir_swaps_in_new_content_and_removes_staging(tmp_path):
    target = tmp_path / "t" / "ds=2015-09-18"
    _write(target, "old")
    with publish.staged_dir(target) as staged:
        _write(staged, "new")
        assert (target / "part-0.parquet").read_text() == "old"  # readers still see the old one
    assert (target / "part-0.parquet").read_text() == "new"
    assert not any((target.parent / publish.STAGING).iterdir())


def test_failure_inside_staged_dir_leaves_previous_content(tmp_path):
    target = tmp_path / "t" / "ds=2015-09-18"
    _write(target, "old")
    with pytest.raises(RuntimeError), publish.staged_dir(target) as staged:
        _write(staged, "half")
        raise RuntimeError("killed mid-write")
    assert (target / "part-0.parquet").read_text() == "old"
    assert not any((target.parent / publish.STAGING).iterdir())


def test_exchange_is_atomic_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "A")
    _write(b, "B")
    assert publish._exchange(a, b)
    assert (a / "part-0.parquet").read_text() == "B"
    assert (b / "part-0.parquet").read_text() == "A"


def test_recover_restores_target_after_an_interrupted_fallback_swap(tmp_path):
    target = tmp_path / "t" / "ds=1"
    _write(target, "old")
    trash = publish._trash_path(target)
    trash.parent.mkdir(parents=True)
    target.rename(trash)  # the fallback was killed between its two renames
    publish.recover(target)
    assert (target / "part-0.parquet").read_text() == "old"


def test_publish_partitions_replaces_only_staged_partitions(tmp_path):
    root = tmp_path / "events" / "source=x"
    _write(root / "event_date=2015-01-01", "keep")
    _write(root / "event_date=2015-01-02", "old")
    staged = tmp_path / "staged"
    _write(staged / "event_date=2015-01-02", "new")
    _write(staged / "event_date=2015-01-03", "added")
    published = publish.publish_partitions(staged, root)
    assert [p.name for p in published] == ["event_date=2015-01-02", "event_date=2015-01-03"]
    assert (root / "event_date=2015-01-01" / "part-0.parquet").read_text() == "keep"
    assert (root / "event_date=2015-01-02" / "part-0.parquet").read_text() == "new"
    assert (root / "event_date=2015-01-03" / "part-0.parquet").read_text() == "added"
