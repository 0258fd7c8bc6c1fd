"""The CLI built from the pipeline's declaration: the same commands and options as the argparse CLI
it replaced, whole one-line summaries, usage errors (exit 2) and an added stage found."""

import re
import subprocess
import sys

import pytest
import typer

from infra.cli import build_app, main
from infra.dates import InvalidDateError, parse_run_date
from infra.pipeline import load_pipeline
from tests import stage_plugin
from tests.conftest import REPO

#: (command, option) pairs of the argparse CLI before the pipeline declaration (1c30b8a), plus the
#: synth planting options added since (issue #23) and `train --processes` (issue #25).
BEFORE = {
    ("airflow", "args"),
    ("dags-test", "--dag"),
    ("dags-test", "--date"),
    ("context", "--date"),
    ("evaluate", "--benchmark"),
    ("evaluate", "--date"),
    ("evaluate", "--model"),
    ("ingest", "--date"),
    ("ingest", "--source"),
    ("nightly", "--date"),
    ("promote", "--date"),
    ("rank", "--date"),
    ("promote", "--strict"),
    ("promote", "--version"),
    ("prune", "--date"),
    ("publish", "--date"),
    ("register", "--benchmark"),
    ("register", "--date"),
    ("register", "--model"),
    ("rollback", "--rescore"),
    ("score", "--date"),
    ("score", "--path"),
    ("sessionize", "--date"),
    ("split", "--benchmark"),
    ("split", "--date"),
    ("split", "--name"),
    ("status", "--date"),
    ("synth", "--days"),
    ("synth", "--end-date"),
    ("synth", "--events"),
    ("synth", "--facet-values"),
    ("synth", "--facets"),
    ("synth", "--long-tail"),
    ("synth", "--out"),
    ("synth", "--p-buy-follow"),
    ("synth", "--p-buy-unseen"),
    ("synth", "--p-facet"),
    ("synth", "--p-follow"),
    ("synth", "--plant-sequence"),
    ("synth", "--seed"),
    ("forget", "--file"),
    ("forget", "--source"),
    ("forget", "--user"),
    ("sql", "--file"),
    ("sql", "--limit"),
    ("sql", "--query"),
    ("synth", "--values-per-user"),
    ("train", "--benchmark"),
    ("train", "--date"),
    ("train", "--epochs"),
    ("train", "--model"),
    ("train", "--processes"),
    ("validate", "--date"),
    ("validate", "--table"),
}


def _pairs(app) -> set[tuple[str, str]]:
    group = typer.main.get_command(app)
    out = set()
    for name, command in group.commands.items():
        for param in command.params:
            flags = [o for o in param.opts if o.startswith("--")]
            out.add((name, flags[0] if flags else param.name))
    return out


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


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--date", "2015-09-18", "--model", "../../models/ds=2015-09-17/fame"],
        ["evaluate", "--date", "2015-09-18", "--model", "/etc"],
        ["register", "--benchmark", "tmall/../../x", "--model", "member"],
        ["split", "--benchmark", "tmall", "--name", ".hidden"],
        ["train", "--date", "2015-09-18", "--model", "x" * 129],
    ],
)
def test_names_that_would_leave_their_folder_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "is not a name" in capsys.readouterr().err


def test_names_accept_what_the_project_names_things():
    from infra.pipeline import Name

    for name in ("member_funnel", "awmoe", "tmall", "retailrocket.v2", "a-b"):
        assert Name.check(name) == name


def test_good_date_parses():
    assert parse_run_date("2015-09-18").isoformat() == "2015-09-18"


def test_the_cli_offers_the_same_commands_and_options_as_before():
    assert _pairs(build_app()) == BEFORE


def test_exactly_one_of_date_and_benchmark(capsys):
    for argv in (
        ["train", "--model", "popularity"],
        ["train", "--model", "x", "--date", "2015-09-18", "--benchmark", "b"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "exactly one of --date or --benchmark" in capsys.readouterr().err


def test_every_stage_has_help_that_names_its_tables():
    commands = typer.main.get_command(build_app()).commands
    assert "events" in commands["ingest"].help and "quarantine" in commands["ingest"].help
    assert "sessions" in commands["sessionize"].help
    assert "training" in commands["split"].help


def test_top_level_help_shows_each_summary_whole():
    """Each command's one-line summary is the declared sentence, never cut at a dot of a path."""
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "80"},
        cwd=REPO,
    ).stdout
    listed = dict(re.findall(r"^  ([a-z_]+) +(.+)$", out, flags=re.M))
    for stage in load_pipeline():
        assert listed[stage.name] == stage.summary, out
        assert stage.summary.endswith("."), stage.name


def test_installed_console_script_runs():
    exe = REPO / ".venv" / "bin" / "funnelrec"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "infra.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True)
    assert "ingest" in out.stdout and "nightly" in out.stdout


def test_a_stage_failure_is_one_line_and_exit_1(tmp_path, capsys):
    config = tmp_path / "settings.yaml"
    config.write_text(f"paths:\n  warehouse_root: {tmp_path / 'wh'}\n")
    assert main(["--config", str(config), "train", "--date", "2015-09-18", "--model", "popularity"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("funnelrec train: FileNotFoundError"), err


def test_synth_writes_taobao_format_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--events", "5000", "--seed", "2", "--out", str(tmp_path / "s")]) == 0
    lines = (tmp_path / "s" / "part-00000.csv").read_text().splitlines()
    assert len(lines) == 5000
    fields = lines[0].split(",")
    assert len(fields) == 5 and all(f.isdigit() for f in (*fields[:3], fields[4]))
    assert fields[3] in {"pv", "fav", "cart", "buy"}
    assert "5000 events" in capsys.readouterr().out


def test_an_added_stage_is_a_command_and_a_step_after_what_it_reads(tmp_path, monkeypatch):
    stage_plugin.install(tmp_path, monkeypatch)
    pipeline = load_pipeline()
    assert stage_plugin.STAGE in typer.main.get_command(build_app(pipeline)).commands
    ids = [t.task_id for t in pipeline.tasks(["popularity"])]
    assert ids.index("validate_events") < ids.index(stage_plugin.STAGE)
    nightly = pipeline.tasks(["popularity"], dag="nightly")
    assert pipeline.upstream(nightly)[stage_plugin.STAGE] == {"validate_events"}


def test_every_table_a_declared_step_names_is_in_the_catalogue():
    from infra.tables import step_entry_names

    known = step_entry_names()
    for task in load_pipeline().tasks(["<model>"]):
        for name in task.reads | task.writes | task.checks:
            generic = re.sub(r"^validation/.+", "validation/<table>", name)
            assert generic in known, f"{task.task_id} names {name!r}, which the catalogue does not declare"


def test_airflow_takes_every_argument_after_it_as_given():
    """``funnelrec airflow ...`` hands its arguments to the airflow CLI untouched: airflow's own
    options, its ``--help`` and a ``--``."""
    command = typer.main.get_command(build_app()).commands["airflow"]
    for argv in (
        ["dags", "test", "funnelrec_nightly", "2015-09-18", "-c", '{"ds": "2015-09-18"}'],
        ["dags", "list", "--help"],
        ["--help"],
        ["tasks", "test", "x", "--", "--not-ours"],
    ):
        assert command.make_context("airflow", list(argv)).params["args"] == argv
