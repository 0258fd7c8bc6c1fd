"""`funnelrec`: one command with a subcommand per stage.

The CLI, the Airflow tasks and the tests call the same stage functions; this module only parses
arguments, loads the settings, starts what a stage needs and prints where its outputs landed.

Exit codes: 0 ok; 1 the stage failed (bad input, leakage, ...); 2 usage error (e.g. a bad
``--date``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

from infra.dates import InvalidDateError, parse_run_date
from infra.logs import configure, get_logger, stage
from infra.settings import Settings, load_settings
from infra.tables import (
    MANIFEST_FILE,
    SERVING,
    SESSIONIZED,
    TRAINING,
    events_dir,
    published_dates,
    quarantine_dir,
)

EXIT_FAILED = 1

#: Stages of the nightly run in order (each validate is a gate on the table before it).
NIGHTLY_STAGES = (
    "ingest",
    "validate events",
    "sessionize",
    "validate sessions",
    "split",
    "validate training",
    "train",
    "evaluate",
    "register",
    "promote",
    "context",
    "validate serving",
    "score",
    "validate scores",
    "publish",
    "prune",
)


def _date(text: str) -> date:
    try:
        return parse_run_date(text)
    except InvalidDateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_date(p: argparse.ArgumentParser) -> None:
    p.add_argument("--date", required=True, type=_date, metavar="YYYY-MM-DD", help="run date (UTC day)")


def _where(settings: Settings, run_date: date) -> list[tuple[str, Path]]:
    wh = settings.paths.warehouse_root
    return [
        ("events", events_dir(wh)),
        ("quarantine", quarantine_dir(settings.paths.quarantine_root)),
        ("sessions", SESSIONIZED.dir(wh, run_date)),
        ("training tables", TRAINING.dir(wh, run_date)),
        ("training manifest", TRAINING.dir(wh, run_date) / MANIFEST_FILE),
        ("trained models", wh / "models" / f"ds={run_date}"),
        ("validation results", wh / "validation"),
        ("Data Docs", settings.validation.data_docs_dir / "index.html"),
    ]


def cmd_ingest(args, settings: Settings) -> int:
    from infra.spark import get_spark
    from jobs.ingest import run_ingest, summary_json

    results = run_ingest(get_spark(settings), settings, args.date, args.source or None)
    print(summary_json(results))
    return 0


def cmd_sessionize(args, settings: Settings) -> int:
    from infra.spark import get_spark
    from jobs.sessionize import run_sessionize

    r = run_sessionize(get_spark(settings), settings, args.date)
    print(
        f"sessions: {r.sessions} over {r.events} events of {r.users} users -> "
        f"{SESSIONIZED.dir(settings.paths.warehouse_root, args.date)}"
    )
    return 0


def cmd_split(args, settings: Settings) -> int:
    import json

    from infra.spark import get_spark
    from jobs.split import run_split

    spark = get_spark(settings)
    if args.benchmark:
        from jobs.benchmarks import run_benchmark_split

        manifest = run_benchmark_split(spark, settings, Path(args.benchmark), args.name)
    else:
        manifest = run_split(spark, settings, args.date)
    print(json.dumps(manifest["stats"], indent=2))
    print(f"training tables -> {TRAINING.dir(settings.paths.warehouse_root, manifest['ds'])}")
    return 0


def _ds(args) -> str:
    return args.benchmark if getattr(args, "benchmark", None) else args.date.isoformat()


def cmd_validate(args, settings: Settings) -> int:
    from infra.spark import get_spark
    from validation.validate import result_path, run_validate

    summary = run_validate(get_spark(settings), settings, args.table, args.date)
    print(
        f"{args.table} {args.date}: all expectations passed; results {result_path(settings, args.table, args.date.isoformat())}"
    )
    print(f"Data Docs: {summary['data_docs']}")
    return 0


def cmd_train(args, settings: Settings) -> int:
    from training.train_evaluate import run_train

    meta = run_train(settings, _ds(args), args.model, epochs=args.epochs)
    print(
        f"{args.model}: best epoch {meta['best_epoch']} of {meta['epochs_run']} "
        f"({meta['seconds_per_epoch']:.1f} s/epoch on {meta['device']}, peak RSS {meta['peak_rss_mb']:.0f} MB) "
        f"-> {meta['path']}"
    )
    return 0


def cmd_evaluate(args, settings: Settings) -> int:
    from training.train_evaluate import format_metrics, run_evaluate

    metrics = run_evaluate(settings, _ds(args), args.model)
    for split, values in metrics.items():
        print(f"\n{args.model} on {split}:")
        print(format_metrics(values))
    return 0


def cmd_register(args, settings: Settings) -> int:
    from training.registry import register

    version = register(settings, _ds(args), args.model)
    print(
        f"{args.model} {_ds(args)}: registered as {settings.mlflow.registered_model} version {version} (@challenger)"
    )
    return 0


def cmd_promote(args, settings: Settings) -> int:
    from training.registry import promote

    ds = args.date.isoformat() if args.date else None
    decision = promote(settings, version=args.version, ds=ds)
    print(decision.summary())
    # A refusal is the policy working, not a failure of the stage; --strict makes it one.
    return EXIT_FAILED if args.strict and decision.action not in ("promoted", "already_champion") else 0


def latest_published(settings: Settings) -> date | None:
    """The latest date with published scores (``scores/ds=D``), or None."""
    days = published_dates(settings.paths.warehouse_root)
    return days[-1] if days else None


def rescore(settings: Settings, run_date: date) -> dict:
    """Score ``run_date`` again with the current @champion, validate and publish it (the serving
    context is rebuilt when it is gone)."""
    from infra.spark import get_spark
    from jobs.context import run_context
    from jobs.publish import run_publish
    from training.score import run_score
    from validation.validate import run_validate

    spark = get_spark(settings)
    if not SERVING.dir(settings.paths.warehouse_root, run_date).exists():
        run_context(spark, settings, run_date)
        run_validate(spark, settings, "serving", run_date)
    scored = run_score(settings, run_date, spark=spark if settings.scoring.path == "spark" else None)
    run_validate(spark, settings, "scores", run_date)
    run_publish(settings, run_date)
    return scored


def cmd_rollback(args, settings: Settings) -> int:
    from training.registry import rollback

    decision = rollback(settings)
    print(f"@champion: version {decision.version} -> version {decision.champion_after}")
    latest = latest_published(settings)
    if latest is None:
        return 0
    if not args.rescore:
        print(
            f"The published recommendations of {latest} are still version {decision.version}'s. To replace "
            f"them with version {decision.champion_after}'s: funnelrec score --date {latest} && funnelrec "
            f"validate --table scores --date {latest} && funnelrec publish --date {latest} "
            "(or run rollback with --rescore)."
        )
        return 0
    scored = rescore(settings, latest)
    print(
        f"re-scored {latest} with version {scored['champion']['version']}: {scored['rows']} rows for "
        f"{scored['scored_users']} users, validated and published"
    )
    return 0


def cmd_context(args, settings: Settings) -> int:
    from infra.spark import get_spark
    from jobs.context import run_context

    r = run_context(get_spark(settings), settings, args.date)
    print(
        f"context of {r.users} active users, catalogue of {r.items} items -> "
        f"{SERVING.dir(settings.paths.warehouse_root, args.date)}"
    )
    return 0


def cmd_prune(args, settings: Settings) -> int:
    from training.retention import run_retention

    r = run_retention(settings, args.date)
    print(
        f"kept {settings.retention.days} nights (from {r.cutoff}) and versions "
        f"{sorted(r.protected) or 'none'} (current aliases, last {settings.retention.champions} champions); "
        f"removed {len(r.removed)} dated folders, pruned the artifacts of versions {r.pruned_versions or 'none'}"
    )
    if r.kept_remote:
        print(
            f"versions {r.kept_remote} have remote artifacts: tagged, left to the store's clean-up (mlflow gc)"
        )
    return 0


def cmd_score(args, settings: Settings) -> int:
    from training.score import run_score, summary_json

    path = args.path or settings.scoring.path
    spark = None
    if path == "spark":
        from infra.spark import get_spark

        spark = get_spark(settings)
    print(summary_json(run_score(settings, args.date, path=path, spark=spark)))
    return 0


def cmd_publish(args, settings: Settings) -> int:
    from jobs.publish import run_publish

    out = run_publish(settings, args.date)
    print(f"{out['rows']} recommendations for {out['users']} users published for {args.date}:")
    for key in ("scores", "duckdb", "report"):
        print(f"  {key:<8} {out[key]}")
    return 0


def cmd_nightly(args, settings: Settings) -> int:
    from infra.spark import get_spark
    from jobs.context import run_context
    from jobs.ingest import run_ingest
    from jobs.publish import run_publish
    from jobs.sessionize import run_sessionize
    from jobs.split import run_split
    from training.registry import promote, register
    from training.retention import run_retention
    from training.score import run_score
    from training.train_evaluate import format_metrics, run_evaluate, run_train
    from validation.validate import run_validate

    log = get_logger()
    spark = get_spark(settings)
    ds = args.date.isoformat()
    # Each gate stops the run before anything downstream is computed or published.
    run_ingest(spark, settings, args.date)
    run_validate(spark, settings, "events", args.date)
    run_sessionize(spark, settings, args.date)
    run_validate(spark, settings, "sessions", args.date)
    run_split(spark, settings, args.date)
    run_validate(spark, settings, "training", args.date)
    results = {}
    for name in settings.training.models:
        run_train(settings, ds, name)
        results[name] = run_evaluate(settings, ds, name)
        register(settings, ds, name)
    decision = promote(settings, ds=ds)
    run_context(spark, settings, args.date)
    run_validate(spark, settings, "serving", args.date)
    run_score(settings, args.date, spark=spark)
    run_validate(spark, settings, "scores", args.date)
    published = run_publish(settings, args.date)
    run_retention(settings, args.date)
    log.info(f"stage=nightly date={ds} ran={','.join(NIGHTLY_STAGES)}")
    for name, metrics in results.items():
        if "test" in metrics:
            print(f"\n{name} on test ({ds}):")
            print(format_metrics(metrics["test"]))
    print(f"\npromotion:\n{decision.summary()}")
    print(f"\nnightly {ds}: ran {' -> '.join(NIGHTLY_STAGES)}. Outputs:")
    for name, path in _where(settings, args.date):
        print(f"  {name:<18} {path}")
    print(f"  {'scores':<18} {published['scores']}")
    print(f"  {'analytics DuckDB':<18} {published['duckdb']}")
    print(f"  {'report':<18} {published['report']}")
    return 0


def cmd_status(args, settings: Settings) -> int:
    import json

    from training.train_evaluate import format_metrics

    wh, ds = settings.paths.warehouse_root, args.date.isoformat()
    for name in settings.training.models:
        path = wh / "models" / f"ds={ds}" / name / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            if "test" in metrics:
                print(f"\n{name} on test ({ds}):")
                print(format_metrics(metrics["test"]))
        else:
            print(f"\n{name}: no metrics for {ds} at {path}")
    try:
        from training.registry import aliases, history
        from training.tracking import connect

        client = connect(settings)
        print(f"\nregistry {settings.mlflow.registered_model}: aliases {aliases(settings, client)}")
        for entry in history(settings)[-3:]:
            print(f"  {entry['at']} {entry['action']} {entry['from']} -> {entry['to']}")
    except Exception as exc:
        print(f"\nregistry: not readable ({exc})")
    from infra.tables import analytics_db, report_path, scores_dir

    print(f"\noutputs of {ds}:")
    places = [
        *_where(settings, args.date),
        ("scores", scores_dir(wh) / f"ds={ds}"),
        ("analytics DuckDB", analytics_db(wh)),
        ("daily report", report_path(wh, ds)),
        ("MLflow store", settings.mlflow_tracking_uri),
        ("Airflow home", settings.airflow.home),
    ]
    for name, path in places:
        exists = Path(path).exists() if not str(path).startswith(("sqlite:", "http")) else True
        print(f"  {name:<18} {path}{'' if exists else '  (missing)'}")
    return 0


def cmd_airflow(args, settings: Settings) -> int:
    import subprocess

    from infra.orchestration import airflow_env, init_airflow

    env = airflow_env(settings, args.config)
    init_airflow(settings, env)
    if not args.args:
        print(f"Airflow home ready: {settings.airflow.home} (DAGs: dags/, pool {settings.airflow.gpu_pool})")
        return 0
    airflow = str(Path(sys.executable).with_name("airflow"))
    return subprocess.run([airflow, *args.args], env=env).returncode


def cmd_synth(args, settings: Settings) -> int:
    from jobs.synth import SynthParams, generate

    out = Path(args.out) if args.out else settings.paths.data_root / "synthetic"
    params = SynthParams(events=args.events, seed=args.seed, end_date=args.end_date, days=args.days)
    with stage("synth", events=args.events, seed=args.seed) as counts:
        result = generate(out, params)
        counts.update(users=result.users, files=len(result.files), **result.counts)
    print(
        f"{result.events} events of {result.users} users in {len(result.files)} file(s) under {out} "
        f"(Taobao format; ingest with the `synthetic` mapping)"
    )
    return 0


def _add_ds(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--date", type=_date, metavar="YYYY-MM-DD", help="run date whose training tables to use"
    )
    which.add_argument("--benchmark", metavar="NAME", help="benchmark tables written by `split --benchmark`")


def _models() -> list[str]:
    from training.models import available_models

    return available_models()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="funnelrec",
        description="Nightly batch recommender over the whole shopping funnel. Each subcommand is one stage.",
        epilog="Settings: infra/defaults.yaml < --config/$FUNNELREC_CONFIG < FUNNELREC__SECTION__KEY env vars. "
        "Exit codes: 0 ok, 1 stage failed, 2 usage error.",
    )
    parser.add_argument("--config", metavar="PATH", help="user settings YAML layered over the defaults")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func: Callable, dated: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text.split(".")[0], description=help_text)
        if dated:
            _add_date(p)
        p.set_defaults(func=func)
        return p

    p = add(
        "ingest",
        "Read the raw logs of each configured source (paths.data_root + its mapping) and write the canonical "
        "`events` table (warehouse/events/source=S/event_date=D) and refused rows to "
        "`quarantine` (quarantine_root/source=S/run_date=D).",
        cmd_ingest,
    )
    p.add_argument(
        "--source",
        action="append",
        help="source mapping name or YAML path (repeatable); default: pipeline.sources",
    )
    add(
        "sessionize",
        "Read `events` of the history window ending on --date and write `sessions` and `session_events` "
        "(warehouse/sessionized/ds=D).",
        cmd_sessionize,
    )
    p = add(
        "split",
        "Read `session_events` of --date and write the training tables: interactions, visited sets, held-out "
        "purchases labelled visited/unvisited, id maps and a manifest (warehouse/training/ds=D). With "
        "--benchmark FOLDER, read an MBGCN/MEMBER benchmark folder instead and reproduce MEMBER's split "
        "(warehouse/training/ds=NAME).",
        cmd_split,
        dated=False,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--date", type=_date, metavar="YYYY-MM-DD", help="run date (UTC day)")
    which.add_argument(
        "--benchmark", metavar="FOLDER", help="benchmark folder (user item files per behaviour)"
    )
    p.add_argument("--name", help="name of the benchmark's tables (default: the folder name)")
    p = add(
        "validate",
        "Validate a table of --date with its Great Expectations suite, run as a GX checkpoint on the Spark "
        "DataFrame: events (the history window), sessions (sessionized/ds=D), training (training/ds=D), serving "
        "(serving/ds=D) or scores (the staged or published scores of D, against serving/ds=D). Writes "
        "warehouse/validation/TABLE/ds=D/result.json and the Data Docs site (validation.data_docs_dir); exits 1 "
        "listing each failed expectation.",
        cmd_validate,
    )
    p.add_argument("--table", required=True, choices=["events", "sessions", "training", "serving", "scores"])
    p = add(
        "train",
        "Train one model on the training tables of --date (warehouse/training/ds=D) or of --benchmark NAME "
        "(warehouse/training/ds=NAME): a validation fit early-stopped on the validation split, then a refit "
        "on every training event for its best epoch count; write both state dicts, the config and the "
        "history to warehouse/models/ds=D/MODEL.",
        cmd_train,
        dated=False,
    )
    _add_ds(p)
    p.add_argument("--model", required=True, help="model name: " + ", ".join(_models()))
    p.add_argument("--epochs", type=int, help="cap on epochs (default: the model's own setting)")
    p = add(
        "evaluate",
        "Rank all items for every user with a held-out purchase (the purchases its model trained on masked) and "
        "write HR, NDCG and Recall @10/20/50 with the users, mean candidates and chance HR of each setting "
        "(standard, visited, unvisited, long_tail, tail_items) and split, validation with the validation fit "
        "and test with the refit, to warehouse/models/ds=D/MODEL/metrics.json.",
        cmd_evaluate,
        dated=False,
    )
    _add_ds(p)
    p.add_argument("--model", required=True, help="model name")
    p = add(
        "register",
        "Log the trained and evaluated MODEL of --date (or --benchmark) as an MLflow pyfunc (signature, input "
        "example, id maps and tables bundled) into its run, register it as a new version of "
        "mlflow.registered_model and give it the alias `challenger`. Registering the same run again reuses its "
        "version.",
        cmd_register,
        dated=False,
    )
    _add_ds(p)
    p.add_argument("--model", required=True, help="model name")
    p = add(
        "promote",
        "Apply the promotion policy to the candidates of a date: --version N, else every version registered "
        "for --date, else @challenger. The policy is mlflow/promotion.yaml or the mlflow.promotion_policy "
        "setting. Each candidate "
        "and the champion are measured on the date's held-out purchases; the best candidate that passes "
        "every gate becomes `champion` (a refresh of the champion's own model unless shown worse, a "
        "challenge only when it wins). Each gate's numbers are tagged on the versions and written to "
        "warehouse/decisions/ds=D. A refusal exits 0 (1 with --strict).",
        cmd_promote,
        dated=False,
    )
    p.add_argument("--version", type=int, help="registered version to consider")
    p.add_argument(
        "--date", type=_date, metavar="YYYY-MM-DD", help="consider the best version registered for this date"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when the challenger is refused")
    p = add(
        "rollback",
        "Give @champion back to the version that held it before the current one (the alias history is kept "
        "in registered-model tags). The published recommendations stay the rolled-back version's until the "
        "latest published date is scored again: --rescore does it (score, validate scores, publish), else "
        "the command prints the steps.",
        cmd_rollback,
        dated=False,
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score the latest published date again with the restored champion, validate and publish it",
    )
    add(
        "context",
        "Build what scoring of --date reads from the events up to it: each active user's context (visited set "
        "and purchases of the last split.observation_days days, last scoring.history_length events) and the "
        "date's catalogue (items with an event in the last scoring.catalogue_days days, by popularity), "
        "written to warehouse/serving/ds=D.",
        cmd_context,
    )
    add(
        "prune",
        "Retention as of --date: delete the dated outputs (scores, staged scores, serving bundles, sessionized "
        "and training tables, models, validation results, reports) older than retention.days nights, except the "
        "training tables and models of versions a current alias points to or among the last "
        "retention.champions champions; delete the logged-model artifacts of other registered versions of "
        "pruned dates (tagged funnelrec.pruned). Events, quarantine, decisions and MLflow runs stay.",
        cmd_prune,
    )
    p = add(
        "score",
        "Score every active user of --date (any event in the last scoring.active_days days) with "
        "models:/<registered_model>@champion from the user's context as of --date (warehouse/serving/ds=D, "
        "built by `context`) against the date's catalogue, excluding what they bought; users the champion "
        "cannot score get the catalogue's most popular items (expert 'fallback'). Top scoring.k with score, "
        "rank, item type and expert weights, written to warehouse/scores_staged/ds=D for `validate --table "
        "scores` and `publish`.",
        cmd_score,
    )
    p.add_argument(
        "--path",
        choices=["local", "spark"],
        help="local: one process, batched (CUDA when present); spark: mapInPandas on spark.master "
        "(default: scoring.path)",
    )
    add(
        "publish",
        "Move the validated scores of --date into warehouse/scores/ds=D atomically, rebuild the analysts' DuckDB "
        "file (warehouse/analytics/funnelrec.duckdb: fct_recommendations, recommendations_latest, dim_items, "
        "dim_users, agg_item_exposure, agg_catalog_coverage, model_runs) and write "
        "warehouse/reports/ds=D/report.html.",
        cmd_publish,
    )
    p = add(
        "synth",
        "Write a seeded synthetic log in the Taobao UserBehavior format (power-law items, sessions, "
        "view -> fav/cart -> purchase funnels, daily rhythm), streamed to part-NNNNN.csv files under --out "
        "(default <data_root>/synthetic). Reads nothing.",
        cmd_synth,
        dated=False,
    )
    p.add_argument("--events", type=int, required=True, help="number of events (1e5 .. 1e8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default <data_root>/synthetic)")
    p.add_argument("--end-date", type=_date, default=parse_run_date("2017-12-03"), help="last day of the log")
    p.add_argument("--days", type=int, default=9, help="days the log spans")
    add(
        "status",
        "Print what a date produced: each model's test metrics, the registry's aliases and recent promotions, "
        "and where every output of the date is (missing ones marked). Reads only.",
        cmd_status,
    )
    p = add(
        "airflow",
        "Run the `airflow` CLI against this project's local Airflow: AIRFLOW_HOME = airflow.home (default "
        "warehouse/airflow, SQLite), DAGs from dags/, FUNNELREC_CONFIG = --config. Migrates the metadata DB and "
        "creates the GPU pool first (idempotent). E.g. `funnelrec airflow dags test funnelrec_nightly 2015-09-18 "
        '-c \'{"ds": "2015-09-18"}\'`, `funnelrec airflow standalone`.',
        cmd_airflow,
        dated=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the airflow CLI")
    add(
        "nightly",
        "Run every stage for --date in order (ingest -> validate events -> sessionize -> validate "
        "sessions -> split -> validate training -> train, evaluate and register each model of training.models "
        "-> promote the best of the date -> score -> validate scores -> publish) and print the test metrics and "
        "where each output landed; a failed gate stops the run.",
        cmd_nightly,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    configure(settings.logging.level, settings.logging.format)
    try:
        return args.func(args, settings)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        # Stage failures carry a message written for the operator; the traceback is noise here.
        print(f"funnelrec {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
