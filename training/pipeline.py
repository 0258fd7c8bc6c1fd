"""The training, registry and scoring stages, as the pipeline declares them (``infra/pipeline.py``).

Each function here is what the CLI command, the DAG task and the test fixtures call. The modules
doing the work are imported inside the functions, so declaring the stages imports no torch or MLflow.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from infra.pipeline import DATE, MODEL, Name, Option, Outcome, Stage, Step
from infra.settings import Settings

#: ``--date`` or ``--benchmark``: which training tables a model stage reads.
_DATASET = (
    Option("date", date, "run date whose training tables to use", metavar="YYYY-MM-DD"),
    Option("benchmark", Name, "benchmark tables written by `split --benchmark`", metavar="NAME"),
)
_MODEL = Option("model", Name, "model name (training/models/<name>.yaml)", required=True)


def _per_model(reads: tuple[str, ...], writes: tuple[str, ...]) -> Step:
    """A step of the nightly DAG's ``train_eval`` group, one task per model of ``training.models``."""
    return Step(reads=reads, writes=writes, group="train_eval", per_model=True)


def dataset(date: date | None, benchmark: str | None) -> str:
    """The ``ds`` of the training tables a model stage reads: the benchmark's name or the date."""
    return benchmark if benchmark else date.isoformat()


def train(
    settings: Settings,
    model: str,
    date: date | None = None,
    benchmark: str | None = None,
    epochs: int | None = None,
    processes: int | None = None,
) -> Outcome:
    """Training tables -> a trained model (validation fit, refit).

    Train one model on the training tables of --date (warehouse/training/ds=D) or of --benchmark
    NAME (warehouse/training/ds=NAME): a validation fit early-stopped on the validation split, then
    a refit on every training event for its best epoch count; write both state dicts, the config and
    the history to warehouse/models/ds=D/MODEL. With --processes N (or training.processes) above 1
    a gradient-trained model trains in N data-parallel processes under Spark's TorchDistributor on
    spark.master (gloo on CPU, NCCL on GPU); rank 0's weights are published.
    """
    from training.train_evaluate import run_train

    meta = run_train(settings, dataset(date, benchmark), model, epochs=epochs, processes=processes)
    return Outcome(
        f"{model}: best epoch {meta['best_epoch']} of {meta['epochs_run']} "
        f"({meta['seconds_per_epoch']:.1f} s/epoch on {meta['device']}, peak RSS {meta['peak_rss_mb']:.0f} MB) "
        f"-> {meta['path']}",
        {k: meta[k] for k in ("device", "best_epoch", "epochs_run", "seconds_per_epoch", "run_id")},
    )


def evaluate(
    settings: Settings, model: str, date: date | None = None, benchmark: str | None = None
) -> Outcome:
    """A trained model -> metrics on the held-out purchases.

    Rank all items for every user with a held-out purchase (the purchases its model trained on
    masked) and write HR, NDCG and Recall @10/20/50 with the users, mean candidates and chance HR of
    each setting (standard, visited, unvisited, long_tail, tail_items) and split, validation with
    the validation fit and test with the refit, to warehouse/models/ds=D/MODEL/metrics.json.
    """
    from training.metric_names import format_metrics
    from training.train_evaluate import run_evaluate

    metrics = run_evaluate(settings, dataset(date, benchmark), model)
    text = "\n".join(f"\n{model} on {split}:\n{format_metrics(values)}" for split, values in metrics.items())
    return Outcome(text, {split: values["standard"] for split, values in metrics.items()})


def register(
    settings: Settings, model: str, date: date | None = None, benchmark: str | None = None
) -> Outcome:
    """A trained, evaluated model -> a registry version (@challenger).

    Log the trained and evaluated MODEL of --date (or --benchmark) as an MLflow pyfunc (signature,
    input example, id maps and tables bundled) into its run, register it as a new version of
    mlflow.registered_model and give it the alias `challenger`. Registering the same run again
    reuses its version.
    """
    from training.registry import register as register_version

    ds = dataset(date, benchmark)
    version = register_version(settings, ds, model)
    return Outcome(
        f"{model} {ds}: registered as {settings.mlflow.registered_model} version {version} (@challenger)",
        {"version": version},
    )


def promote(
    settings: Settings, version: int | None = None, date: date | None = None, strict: bool = False
) -> Outcome:
    """Apply the promotion policy: a candidate may become @champion.

    Apply the promotion policy to the candidates of a date: --version N, else every version
    registered for --date, else @challenger. The policy is mlflow/promotion.yaml or the
    mlflow.promotion_policy setting. Each candidate and the champion are measured on the date's
    held-out purchases; the best candidate that passes every gate becomes `champion` (a refresh of
    the champion's own model unless shown worse, a challenge only when it wins). Each gate's numbers
    are tagged on the versions and written to warehouse/decisions/ds=D. A refusal exits 0 (1 with
    --strict).
    """
    from training.registry import promote as apply_policy

    ds = date.isoformat() if date else None
    decision = apply_policy(settings, version=version, ds=ds)
    # A refusal is the policy working, not a failure of the stage; --strict makes it one.
    refused = decision.action not in ("promoted", "already_champion")
    return Outcome(
        decision.summary(),
        {"decision": decision.action, "version": decision.version, "champion": decision.champion_after},
        # Asset-triggered scoring runs have no logical date: they read it from this event.
        event={
            "ds": ds,
            "decision": decision.action,
            "champion": decision.champion_after,
            "considered": decision.version,
        },
        exit_code=1 if strict and refused else 0,
    )


def rank(settings: Settings, date: date) -> Outcome:
    """Train the second stage over the retrieval champion.

    With ranking.model set (a ranker, e.g. awmoe), train it on --date's validation purchases over
    the candidates of the retrieval champion's validation fit (only when that champion was trained
    on --date's tables), early-stopped on held-out validation shoppers; register it in
    ranking.registered_model, tagged with the retriever version, and make it that registry's
    `champion` when the two-stage list beats the retriever's own list on the same held-out shoppers
    by the promotion policy's gates. `score` serves it only over that retriever version. With
    ranking.model null, or no retrieval champion of --date, nothing is trained and the step says why.
    """
    from training.ranking import run_rank

    r = run_rank(settings, date.isoformat())
    text = r.get("summary") or r.get("why", "")
    data = {k: r.get(k) for k in ("action", "version", "champion", "ranker_champion")}
    # Asset-triggered scoring runs have no logical date: they read it from this event.
    event = {"ds": date.isoformat(), "rank": r["action"], "champion": r.get("champion")}
    return Outcome(f"rank: {r['action']}\n{text}".rstrip(), data, event=event)


def score(settings: Settings, date: date, path: str | None = None) -> Outcome:
    """Score every active user with @champion -> staged top-K.

    Score every active user of --date (any event in the last scoring.active_days days) with
    models:/<registered_model>@champion from the user's context as of --date
    (warehouse/serving/ds=D, built by `context`) against the date's catalogue, excluding what they
    bought; users the champion cannot score get the catalogue's most popular items (expert
    'fallback'). Top scoring.k with score, rank, item type and expert weights, written to
    warehouse/scores_staged/ds=D for `validate --table scores` and `publish`.
    """
    from training.score import run_score, summary_json

    path = path or settings.scoring.path
    spark = None
    if path == "spark":
        from infra.spark import get_spark

        spark = get_spark(settings)
    result = run_score(settings, date, path=path, spark=spark)
    return Outcome(summary_json(result), {"version": result["champion"]["version"], "rows": result["rows"]})


def prune(settings: Settings, date: date) -> Outcome:
    """Retention: delete dated outputs older than retention.days.

    Retention as of --date: delete the dated outputs (scores, staged scores, serving bundles,
    sessionized and training tables, models, validation results, reports) older than retention.days
    nights, except the training tables and models of versions a current alias points to or among the
    last retention.champions champions; delete the logged-model artifacts of other registered
    versions of pruned dates (tagged funnelrec.pruned). Events, quarantine, decisions and MLflow
    runs stay.
    """
    from training.retention import run_retention

    r = run_retention(settings, date)
    text = (
        f"kept {settings.retention.days} nights (from {r.cutoff}) and versions "
        f"{sorted(r.protected) or 'none'} (current aliases, last {settings.retention.champions} champions); "
        f"removed {len(r.removed)} dated folders, pruned the artifacts of versions {r.pruned_versions or 'none'}"
    )
    if r.kept_remote:
        text += f"\nversions {r.kept_remote} have remote artifacts: tagged, left to the store's clean-up (mlflow gc)"
    return Outcome(text, {"removed": len(r.removed), "pruned_versions": r.pruned_versions})


def rollback(settings: Settings, rescore: bool = False) -> Outcome:
    """Give @champion back to the previous champion.

    Give @champion back to the version that held it before the current one (the alias history is
    kept in registered-model tags). The published recommendations stay the rolled-back version's
    until the latest published date is scored again: --rescore does it (the scoring DAG's steps:
    score, validate scores, publish), else the command prints the steps.
    """
    from infra.pipeline import load_pipeline
    from infra.tables import SERVING, published_dates
    from training.registry import rollback as give_back

    decision = give_back(settings)
    lines = [f"@champion: version {decision.version} -> version {decision.champion_after}"]
    data = {"from": decision.version, "to": decision.champion_after}
    published = published_dates(settings.paths.warehouse_root)
    if not published:
        return Outcome("\n".join(lines), data)
    latest = published[-1]
    if not rescore:
        lines.append(
            f"The published recommendations of {latest} are still version {decision.version}'s. To replace "
            f"them with version {decision.champion_after}'s: funnelrec score --date {latest} && funnelrec "
            f"validate --table scores --date {latest} && funnelrec publish --date {latest} "
            "(or run rollback with --rescore)."
        )
        return Outcome("\n".join(lines), data)
    # The scoring DAG's steps for the latest date (its serving context is rebuilt when pruned).
    scoring = [
        t for t in load_pipeline().tasks(settings.training.models, dag="scoring") if t.task_id != "prune"
    ]
    have_context = SERVING.dir(settings.paths.warehouse_root, latest).exists()
    ran: dict[str, Outcome] = {}
    for task in scoring:
        if have_context and "serving" in task.writes | task.checks:
            continue
        ran[task.task_id] = task.run(settings, latest)
    version = ran["score"].data["version"] if "score" in ran else decision.champion_after
    lines.append(f"re-scored {latest} with version {version}: ran {', '.join(ran)}")
    return Outcome("\n".join(lines), {**data, "rescored": latest.isoformat()})


def status(settings: Settings, date: date) -> Outcome:
    """Print a date's metrics, registry aliases and outputs.

    Print what a date produced: each model's test metrics, the registry's aliases and recent
    promotions, and where every output of the date is (missing ones marked). Reads only.
    """
    from infra.tables import (
        MANIFEST_FILE,
        MODEL_METRICS,
        SESSIONIZED,
        TRAINING,
        analytics_db,
        events_dir,
        model_dir,
        models_dir,
        quarantine_dir,
        read_metrics,
        report_path,
        scores_partition_dir,
        validation_results_dir,
    )
    from training.metric_names import format_metrics

    wh, ds = settings.paths.warehouse_root, date.isoformat()
    lines: list[str] = []
    for name in settings.training.models:
        folder = model_dir(wh, ds, name)
        if (folder / MODEL_METRICS.name).is_file():
            test = read_metrics(folder).test
            if test is not None:
                lines += [f"\n{name} on test ({ds}):", format_metrics(test)]
        else:
            lines.append(f"\n{name}: no metrics for {ds} at {folder / MODEL_METRICS.name}")
    try:
        from training.registry import aliases, history
        from training.tracking import connect

        client = connect(settings)
        lines.append(f"\nregistry {settings.mlflow.registered_model}: aliases {aliases(settings, client)}")
        lines += [f"  {e['at']} {e['action']} {e['from']} -> {e['to']}" for e in history(settings)[-3:]]
    except Exception as exc:  # status reads only: an unreachable store is one line of its report
        lines.append(f"\nregistry: not readable ({exc})")
    places = [
        ("events", events_dir(wh)),
        ("quarantine", quarantine_dir(settings.paths.quarantine_root)),
        ("sessions", SESSIONIZED.dir(wh, date)),
        ("training tables", TRAINING.dir(wh, date)),
        ("training manifest", TRAINING.dir(wh, date) / MANIFEST_FILE),
        ("trained models", models_dir(wh, ds)),
        ("validation results", validation_results_dir(wh)),
        ("Data Docs", settings.validation.data_docs_dir / "index.html"),
        ("scores", scores_partition_dir(wh, ds)),
        ("analytics DuckDB", analytics_db(wh)),
        ("daily report", report_path(wh, ds)),
        ("MLflow store", settings.mlflow_tracking_uri),
        ("Airflow home", settings.airflow.home),
    ]
    lines.append(f"\noutputs of {ds}:")
    for name, where in places:
        exists = Path(where).exists() if not str(where).startswith(("sqlite:", "http")) else True
        lines.append(f"  {name:<18} {where}{'' if exists else '  (missing)'}")
    return Outcome("\n".join(lines))


STAGES: tuple[Stage, ...] = (
    Stage(
        "train",
        train,
        options=(
            *_DATASET,
            _MODEL,
            Option("epochs", int, "cap on epochs (default: the model's own setting)"),
            Option("processes", int, "data-parallel training processes (default: training.processes)"),
        ),
        one_of=(("date", "benchmark"),),
        steps=(_per_model(("training",), (f"models/{MODEL}",)),),
        gpu=True,
    ),
    Stage(
        "evaluate",
        evaluate,
        options=(*_DATASET, _MODEL),
        one_of=(("date", "benchmark"),),
        steps=(_per_model(("training", f"models/{MODEL}"), (f"metrics/{MODEL}", "model_runs")),),
    ),
    Stage(
        "register",
        register,
        options=(*_DATASET, _MODEL),
        one_of=(("date", "benchmark"),),
        steps=(_per_model((f"models/{MODEL}", f"metrics/{MODEL}"), ("registry", "model_runs")),),
    ),
    Stage(
        "promote",
        promote,
        options=(
            Option("version", int, "registered version to consider"),
            Option("date", date, "consider the best version registered for this date", metavar="YYYY-MM-DD"),
            Option("strict", bool, "exit 1 when the challenger is refused", default=False),
        ),
        steps=(
            Step(
                reads=("registry", "training"),
                writes=("champion", "decisions"),
                group="train_eval",
                serial=True,
            ),
        ),
    ),
    Stage(
        "rank",
        rank,
        options=(DATE,),
        steps=(
            # Its event (the date) starts the scoring DAG: the lists are scored once both stages are decided.
            Step(
                reads=("champion", "training"),
                writes=("ranker",),
                group="train_eval",
                emits="champion",
                serial=True,
            ),
        ),
        gpu=True,
    ),
    Stage(
        "rollback",
        rollback,
        options=(
            Option(
                "rescore",
                bool,
                "score the latest published date again with the restored champion, validate and publish it",
                default=False,
            ),
        ),
    ),
    Stage(
        "score",
        score,
        options=(
            DATE,
            Option(
                "path",
                str,
                "local: one process, batched (CUDA when present); spark: mapInPandas on spark.master "
                "(default: scoring.path)",
                choices=("local", "spark"),
            ),
        ),
        steps=(Step(reads=("serving", "champion", "ranker"), writes=("scores_staged",), dag="scoring"),),
    ),
    Stage(
        "prune",
        prune,
        options=(DATE,),
        steps=(Step(reads=("scores", "registry"), dag="scoring"),),
    ),
    Stage(
        "status",
        status,
        options=(DATE,),
    ),
)
