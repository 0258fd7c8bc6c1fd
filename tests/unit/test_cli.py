import subprocess
import sys

import pytest

from infra.cli import build_parser, main
from infra.dates import InvalidDateError, parse_run_date
from tests.conftest import REPO


@pytest.mark.parametrize("bad", ["2026-13-01", "../x", "2026-02-30", "2026-1-1", "20260101", ""])
def test_bad_dates_are_refused_by_the_parser(bad):
    with pytest.raises(InvalidDateError):
        parse_run_date(bad)


@pytest.mark.parametrize("bad", ["2026-13-01", "../x"])
def test_cli_refuses_bad_date_with_a_clear_message(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["split", "--date", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid date" in err and "YYYY-MM-DD" in err


def test_good_date_parses():
    assert parse_run_date("2015-09-18").isoformat() == "2015-09-18"


def test_every_stage_has_help_that_names_its_tables():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    expected = {
        "ingest",
        "sessionize",
        "split",
        "validate",
        "train",
        "evaluate",
        "register",
        "promote",
        "rollback",
        "context",
        "prune",
        "score",
        "publish",
        "synth",
        "airflow",
        "status",
        "nightly",
    }
    assert set(sub.choices) == expected
    assert "events" in sub.choices["ingest"].description
    assert "quarantine" in sub.choices["ingest"].description
    assert "sessions" in sub.choices["sessionize"].description
    assert "training" in sub.choices["split"].description


def test_installed_console_script_runs():
    exe = REPO / ".venv" / "bin" / "funnelrec"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "infra.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True)
    assert "ingest" in out.stdout and "nightly" in out.stdout


def test_synth_writes_taobao_format_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--events", "5000", "--seed", "2", "--out", str(tmp_path / "s")]) == 0
    lines = (tmp_path / "s" / "part-00000.csv").read_text().splitlines()
    assert len(lines) == 5000
    fields = lines[0].split(",")
    assert len(fields) == 5 and all(f.isdigit() for f in (*fields[:3], fields[4]))
    assert fields[3] in {"pv", "fav", "cart", "buy"}
    assert "5000 events" in capsys.readouterr().out
