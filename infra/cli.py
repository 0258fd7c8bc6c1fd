"""`funnelrec`: one command with a subcommand per stage, built from the pipeline's declaration.

Every stage a package declares (``infra/pipeline.py``) becomes a subcommand with its declared
options; ``nightly`` runs every step of the pipeline in order, ``airflow`` runs the Airflow CLI
against the project's Airflow home. This module imports no stage: it finds them through the
``funnelrec.stages`` entry points when the command line is parsed. Typer builds the parser (shell
completion: ``funnelrec --install-completion``).

Exit codes: 0 ok; 1 the stage failed (bad input, leakage, a misspelt setting, ...); 2 usage error
(e.g. a bad ``--date``).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer

from infra.dates import InvalidDateError, parse_run_date
from infra.logs import configure
from infra.pipeline import Name, Option, Pipeline, Stage, load_pipeline
from infra.settings import Settings, load_settings

EXIT_FAILED = 1
EXIT_USAGE = 2
OPERATOR_ERRORS = (FileNotFoundError, RuntimeError, ValueError)


def _date(text: str | date) -> date:
    if isinstance(text, date):
        return text
    try:
        return parse_run_date(text)
    except InvalidDateError as exc:
        raise typer.BadParameter(str(exc)) from None


def _name(text: str) -> str:
    try:
        return Name.check(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@contextlib.contextmanager
def operator_errors(command: str) -> Iterator[None]:
    """Stage failures carry a message written for the operator: print it on one line and exit 1;
    the traceback is noise here."""
    try:
        yield
    except OPERATOR_ERRORS as exc:
        print(f"funnelrec {command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILED) from None


def _settings(ctx: typer.Context) -> Settings:
    settings = load_settings((ctx.find_root().obj or {}).get("config"))
    configure(settings.logging.level, settings.logging.format)
    return settings


def _parameter(option: Option) -> inspect.Parameter:
    """The Typer parameter of a declared option."""
    info: dict[str, Any] = {"help": option.help}
    if not option.choices and option.kind is not bool:
        info["metavar"] = option.metavar or option.name.upper()  # argparse's default, not <list[str]>
    kind: Any = Literal.__getitem__(option.choices) if option.choices else option.kind
    if option.kind is date:
        info["parser"] = _date
    elif option.kind is Name:
        info["parser"], kind = _name, str
    elif option.kind is list:
        kind = list[str]
    if option.kind is bool:
        # One flag (`--strict`), not Typer's default `--strict/--no-strict` pair.
        annotation = Annotated[bool, typer.Option(option.flag, **info)]
        return inspect.Parameter(
            option.name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=annotation
        )
    annotation = Annotated[kind if option.required else kind | None, typer.Option(option.flag, **info)]
    default = inspect.Parameter.empty if option.required else option.default
    return inspect.Parameter(
        option.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _with_signature(func, options: tuple[Option, ...]):
    params = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(_parameter(o) for o in options),
    ]
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def _command(stage: Stage):
    def command(ctx: typer.Context, **given: Any) -> None:
        for group in stage.one_of:
            chosen = [name for name in group if given.get(name) is not None]
            if len(chosen) != 1:
                flags = " or ".join("--" + name.replace("_", "-") for name in group)
                raise typer.BadParameter(f"give exactly one of {flags}", ctx=ctx)
        options = {k: v for k, v in given.items() if v is not None}
        with operator_errors(stage.name):
            outcome = stage(_settings(ctx), **options)
        print(outcome.text)
        if outcome.exit_code:
            raise typer.Exit(outcome.exit_code)

    command.__name__ = stage.name.replace("-", "_")
    command.__doc__ = stage.doc
    return _with_signature(command, stage.options)


def _nightly(pipeline: Pipeline):
    def nightly(ctx: typer.Context, date: date) -> None:
        def show(task, outcome) -> None:
            print(f"\n== {task.task_id} ({date})\n{outcome.text}")

        with operator_errors("nightly"):
            settings = _settings(ctx)
            tasks = pipeline.tasks(settings.training.models)
            pipeline.run(settings, date, on_outcome=show)
        print(f"\nnightly {date}: ran {' -> '.join(t.task_id for t in tasks)}")

    nightly.__doc__ = (
        "Run every step of the pipeline for --date in order: the nightly DAG's (ingest, the ETL and its "
        "validations, train, evaluate and register each model of training.models, promote) then the "
        "scoring DAG's (context, score, their validations, publish, prune); print what each step wrote. "
        "A failed gate stops the run."
    )
    date_option = Option("date", date, "run date (UTC day)", required=True, metavar="YYYY-MM-DD")
    return _with_signature(nightly, (date_option,))


def _airflow(
    ctx: typer.Context,
    args: Annotated[list[str] | None, typer.Argument(help="arguments for the airflow CLI")] = None,
) -> None:
    """Run the `airflow` CLI against this project's local Airflow: AIRFLOW_HOME = airflow.home (default
    warehouse/airflow, SQLite), DAGs from dags/, FUNNELREC_CONFIG = --config. Migrates the metadata DB and
    creates the pools first (idempotent). E.g. `funnelrec airflow dags test funnelrec_nightly 2015-09-18
    -c '{"ds": "2015-09-18"}'`. `funnelrec airflow standalone` is funnelrec's own: the API server (UI)
    on 127.0.0.1:airflow.api_port, DAG processor, scheduler and triggerer, without the log servers
    Airflow's standalone opens on every interface; Ctrl-C stops them all."""
    import subprocess

    from infra.orchestration import airflow_env, init_airflow

    with operator_errors("airflow"):
        settings = _settings(ctx)
        env = airflow_env(settings, (ctx.find_root().obj or {}).get("config"))
        init_airflow(settings, env)
        if not args:
            print(
                f"Airflow home ready: {settings.airflow.home} (DAGs: dags/, pool {settings.airflow.gpu_pool})"
            )
            return
        if args == ["standalone"]:
            from infra.orchestration import serve_airflow

            code = serve_airflow(settings, env)
        else:
            airflow = str(Path(sys.executable).with_name("airflow"))
            code = subprocess.run([airflow, *args], env=env).returncode
    raise typer.Exit(code)


def _dags_test(
    ctx: typer.Context,
    date: Annotated[str, typer.Option("--date", help="run date (UTC day)", metavar="YYYY-MM-DD")],
    dag: Annotated[
        list[str] | None,
        typer.Option(
            "--dag", help="a DAG to run, in the order given (default: the nightly DAG, then the scoring DAG)"
        ),
    ] = None,
) -> None:
    """Run DAGs for --date one after the other in this process, each with Airflow's dag.test() (what
    `airflow dags test` runs), against the project's Airflow home (set up as `funnelrec airflow`
    does). By default the nightly DAG, then the scoring DAG that its champion asset triggers under
    a scheduler: `make demo`. One process starts Airflow, Spark and the models' libraries once for
    both. Exit 1 when a DAG file does not import or a run fails (later DAGs do not run)."""
    from infra.orchestration import DAG_IDS, airflow_env, run_dags

    day = _date(date)
    with operator_errors("dags-test"):
        settings = _settings(ctx)
        env = airflow_env(settings, (ctx.find_root().obj or {}).get("config"))
        for line in run_dags(settings, env, day, tuple(dag) if dag else DAG_IDS):
            print(line)


def _needs(stage: Stage) -> str:
    """What the declaration says the stage runs on, for its help."""
    needs = []
    if stage.needs_spark:
        needs.append("Spark (spark.master)" + (", or spark-submit from Airflow" if stage.submit else ""))
    if stage.gpu:
        needs.append("CUDA when present (its Airflow tasks take a slot of airflow.gpu_pool)")
    return f" Runs on: {'; '.join(needs)}." if needs else ""


def command_order(pipeline: Pipeline) -> list[Stage]:
    """Stages in the order their first step runs, then the commands without steps."""
    first: dict[str, int] = {}
    for i, task in enumerate(pipeline.tasks(["model"])):
        first.setdefault(task.stage.name, i)
    return sorted(pipeline, key=lambda s: first.get(s.name, sys.maxsize))


def build_app(pipeline: Pipeline | None = None) -> typer.Typer:
    """The ``funnelrec`` Typer app: one subcommand per declared stage, plus ``nightly`` and ``airflow``."""
    pipeline = pipeline or load_pipeline()
    app = typer.Typer(
        name="funnelrec",
        help="Nightly batch recommender over the whole shopping funnel. Each subcommand is one stage.",
        epilog="Settings: infra/defaults.yaml < --config/$FUNNELREC_CONFIG < FUNNELREC__SECTION__KEY env vars. "
        "Exit codes: 0 ok, 1 stage failed, 2 usage error.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        config: Annotated[
            str | None,
            typer.Option("--config", metavar="PATH", help="user settings YAML layered over the defaults"),
        ] = None,
    ) -> None:
        ctx.obj = {"config": config}

    for stage in command_order(pipeline):
        app.command(stage.name, help=stage.doc + _needs(stage), short_help=stage.summary)(_command(stage))
    app.command("nightly", short_help="Run every step of the pipeline for a date, in order.")(
        _nightly(pipeline)
    )
    app.command(
        "airflow",
        short_help="Run the airflow CLI against the project's Airflow home.",
        # Everything after `airflow` goes to the airflow CLI as given: its options, `--help` and `--`.
        context_settings={
            "allow_extra_args": True,
            "ignore_unknown_options": True,
            "allow_interspersed_args": False,
            "help_option_names": [],
        },
    )(_airflow)
    app.command("dags-test", short_help="Run the DAGs for a date in this process with dag.test().")(
        _dags_test
    )
    return app


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; a usage error (exit 2) leaves through ``SystemExit``
    after Typer printed it."""
    try:
        build_app()(args=argv, prog_name="funnelrec")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILED)
        if code == EXIT_USAGE:
            raise
        return code
    return 0


def run() -> NoReturn:
    """The ``funnelrec`` command: ``main``, then exit without Python's last garbage collections.

    A process that ran the DAGs holds the objects of Airflow, Spark, GX and torch; the full
    collections the interpreter runs while it finalises its modules walk all of them after the
    last task (``finalize_modules`` -> ``gc_collect_main``, seconds of CPU: bench/README.md, "The
    demo's time") to free memory the OS takes back at exit anyway. ``gc.freeze()`` puts every
    object out of their reach. The atexit handlers (Spark's, logging's flush) still run; what
    is lost is ``__del__`` of objects caught in reference cycles, and the stages close every file
    they write before they return, so nothing waits on one to reach disk. Not in ``main``: the
    tests call it in a process that goes on."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
