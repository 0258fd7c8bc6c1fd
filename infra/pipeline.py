"""The pipeline, declared once: every stage with its function, options, tables and needs.

Each stage package declares its stages in ``<package>/pipeline.py`` (a ``STAGES`` tuple of
:class:`Stage`) and registers that tuple under the ``funnelrec.stages`` entry-point group in
``pyproject.toml``, the way pytest and Airflow find their plugins. ``infra`` never imports a stage
package: the CLI (``infra/cli.py``), the Airflow DAGs (``dags/``, through
``infra/orchestration.py``), the test fixtures and the benchmarks all read the declarations through
:func:`load_pipeline`. A new stage is one declaration; a new package of stages is its declarations
plus one entry point.

A :class:`Stage` is one command (``funnelrec <name>``): the function it calls, its options, and the
steps it contributes to the pipeline. A :class:`Step` is one task of a DAG: the stage run with fixed
options (``validate`` has one step per table it checks), the catalogue entries it reads, writes or
checks, the DAG and task group it belongs to, and whether it runs once per model of
``training.models``. A stage without steps is a command only (``synth``, ``rollback``, ``status``).

Order, derived from the tables: a step runs after every step that writes a table it reads and after
every step that checks that table (a suite's failure stops everything downstream). The CLI's
``nightly`` runs the steps of every DAG in that order (ties: the DAGs' order, then a step without a
model before per-model ones, one model at a time in ``training.models`` order, then declaration order);
a DAG's edges are the transitive reduction of those dependencies among its own steps.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

ENTRY_POINT_GROUP = "funnelrec.stages"
#: DAGs in the order the CLI's ``nightly`` runs their steps (the scoring DAG follows the champion).
DAG_ORDER: tuple[str, ...] = ("nightly", "scoring")
#: ``{model}`` in a step's table names is replaced by each model's name (per-model steps).
MODEL = "{model}"


class Name(str):
    """The ``kind`` of an option naming something the stage makes a path of (a model, a benchmark's
    tables): letters, digits, ``_``, ``.`` and ``-``, not starting with ``.`` or ``-``, at most 128
    characters, so a name can never leave the folder it is looked up in."""

    PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

    @classmethod
    def check(cls, text: str) -> str:
        if not cls.PATTERN.fullmatch(text) or ".." in text:
            raise ValueError(
                f"{text!r} is not a name: letters, digits, _ . - (not first), at most 128 characters"
            )
        return text


@dataclass(frozen=True)
class Option:
    """One command-line option of a stage (``--name``; underscores become dashes).

    ``kind`` is ``str``, ``Name`` (a ``str`` checked by ``Name.check``), ``int``, ``float``,
    ``bool`` (a flag), ``date`` (``YYYY-MM-DD``, parsed strictly) or ``list`` (repeatable, strings).
    """

    name: str
    kind: type
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


#: The run date option most stages take.
DATE = Option("date", date, "run date (UTC day)", required=True, metavar="YYYY-MM-DD")


@dataclass(frozen=True)
class Step:
    """One task of the pipeline: its stage run with ``options`` fixed.

    Table names are the catalogue's (``infra.tables.step_entry_names``); ``{model}`` in a name makes the table
    one per model (a per-model step reads and writes its own model's).
    """

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    dag: str = "nightly"
    group: str | None = None
    task: str | None = None
    per_model: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Name of the Airflow asset the step's task emits (its outcome's ``event`` as the extra).
    emits: str | None = None
    #: At most one such task runs at a time across DAG runs (a one-slot pool).
    serial: bool = False


@dataclass(frozen=True)
class Outcome:
    """What a stage returns: ``text`` for the terminal, ``data`` (JSON-able) for the DAG task's
    XCom, ``event`` for the asset the step emits, ``exit_code`` for the CLI."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)
    event: dict[str, Any] | None = None
    exit_code: int = 0


@dataclass(frozen=True)
class Stage:
    """One command of ``funnelrec`` and its steps in the pipeline.

    ``run`` is the stage's function, or ``"module:function"`` for one imported when the stage runs or
    its help is shown; it is called as ``function(settings, **options)`` and returns an :class:`Outcome`. Its
    docstring is the command's help: the first line the one-line summary, the rest the description.
    The stage packages' functions import their heavy modules (Spark, torch, MLflow) inside, so that
    declaring a stage costs no such import. ``one_of`` lists groups of options of which exactly one
    must be given. ``spark``: the stage needs a SparkSession; ``submit``: it is a Spark application
    (so it needs Spark too) that a DAG may hand to ``spark-submit`` (``airflow.spark_submit_conn_id``);
    ``gpu``: it trains with torch, on CUDA when present, so its tasks take a slot of
    ``airflow.gpu_pool`` (evaluation and scoring use CUDA too when present, but briefly, and run
    outside the pool).
    """

    name: str
    run: Callable[..., Outcome] | str
    options: tuple[Option, ...] = ()
    steps: tuple[Step, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()
    spark: bool = False
    submit: bool = False
    gpu: bool = False

    @property
    def needs_spark(self) -> bool:
        """A SparkSession in the process that runs it (a Spark application needs one too)."""
        return self.spark or self.submit

    def function(self) -> Callable[..., Outcome]:
        if callable(self.run):
            return self.run
        module, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def summary(self) -> str:
        """The first line of the function's docstring: the command's one-line summary."""
        return self._doc()[0]

    @property
    def doc(self) -> str:
        """The rest of the docstring: the command's description."""
        return self._doc()[1]

    def _doc(self) -> tuple[str, str]:
        text = inspect.getdoc(self.function()) or ""
        summary, _, rest = text.partition("\n")
        return summary.strip(), " ".join(rest.split()) or summary.strip()

    def __call__(self, settings: Any, **options: Any) -> Outcome:
        return self.function()(settings, **options)


@dataclass(frozen=True)
class Task:
    """A step placed in the pipeline: per-model steps are expanded, one task per model."""

    stage: Stage
    step: Step
    model: str | None
    index: int

    @property
    def task_id(self) -> str:
        base = self.step.task or self.stage.name
        return f"{base}_{self.model}" if self.model else base

    @property
    def dag(self) -> str:
        return self.step.dag

    @property
    def group(self) -> str | None:
        return self.step.group

    def _names(self, names: tuple[str, ...]) -> set[str]:
        return {n.replace(MODEL, self.model or "") for n in names}

    @property
    def reads(self) -> set[str]:
        return self._names(self.step.reads)

    @property
    def writes(self) -> set[str]:
        return self._names(self.step.writes)

    @property
    def checks(self) -> set[str]:
        return self._names(self.step.checks)

    def options(self, run_date: date | None = None) -> dict[str, Any]:
        """The options this task calls its stage with for ``run_date``."""
        opts = dict(self.step.options)
        if run_date is not None and any(o.name == "date" for o in self.stage.options):
            opts["date"] = run_date
        if self.model is not None:
            opts["model"] = self.model
        return opts

    def run(self, settings: Any, run_date: date) -> Outcome:
        return self.stage(settings, **self.options(run_date))


class PipelineError(ValueError):
    pass


@dataclass(frozen=True)
class Pipeline:
    """Every declared stage, and the ordered tasks their steps make for a list of models."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        seen: dict[str, Stage] = {}
        for stage in self.stages:
            if stage.name in seen:
                raise PipelineError(
                    f"stage {stage.name!r} is declared twice ({seen[stage.name].run}, {stage.run})"
                )
            seen[stage.name] = stage
            names = {o.name for o in stage.options}
            for step in stage.steps:
                if step.dag not in DAG_ORDER:
                    raise PipelineError(f"stage {stage.name}: unknown DAG {step.dag!r} (one of {DAG_ORDER})")
                unknown = set(step.options) - names
                if unknown:
                    raise PipelineError(
                        f"stage {stage.name}: step options {sorted(unknown)} are not its options"
                    )
                if step.per_model and "model" not in names:
                    raise PipelineError(f"stage {stage.name}: a per-model step needs a `model` option")

    def __getitem__(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; declared: {', '.join(s.name for s in self.stages)}")

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def tasks(self, models: Iterable[str], dag: str | None = None) -> list[Task]:
        """Every task (of ``dag``, or of all DAGs), in run order."""
        models = list(models)
        placed: list[Task] = []
        for stage in self.stages:
            for step in stage.steps:
                for model in models if step.per_model else [None]:
                    placed.append(Task(stage, step, model, len(placed)))
        ordered = _order(placed, models)
        ids = [t.task_id for t in ordered]
        clash = {i for i in ids if ids.count(i) > 1}
        if clash:
            raise PipelineError(f"two steps share the task id(s) {sorted(clash)}: give one a `task` name")
        return [t for t in ordered if dag is None or t.dag == dag]

    def upstream(self, tasks: list[Task]) -> dict[str, set[str]]:
        """Task id -> the task ids it directly waits for, among ``tasks`` (transitive reduction)."""
        deps = {t.task_id: {u.task_id for u in _depends_on(t, tasks)} for t in tasks}
        reach: dict[str, set[str]] = {}

        def ancestors(tid: str) -> set[str]:
            if tid not in reach:
                reach[tid] = set()
                for u in deps[tid]:
                    reach[tid] |= {u, *ancestors(u)}
            return reach[tid]

        return {
            tid: {u for u in ups if not any(u in ancestors(v) for v in ups if v != u)}
            for tid, ups in deps.items()
        }

    def run(
        self,
        settings: Any,
        run_date: date,
        *,
        until: str | None = None,
        checks: bool = True,
        on_outcome: Callable[[Task, Outcome], None] | None = None,
    ) -> dict[str, Outcome]:
        """Run every task for ``run_date`` in order (the CLI's ``nightly``), or those up to and
        including the task ``until``; ``checks=False`` leaves out the validation steps (test
        fixtures that only need the tables). A failing task raises and nothing after it runs."""
        tasks = self.tasks(settings.training.models)
        if until is not None:
            ids = [t.task_id for t in tasks]
            if until not in ids:
                raise KeyError(f"no task {until!r}; tasks: {', '.join(ids)}")
            tasks = tasks[: ids.index(until) + 1]
        out: dict[str, Outcome] = {}
        for task in tasks:
            if not checks and task.step.checks:
                continue
            out[task.task_id] = outcome = task.run(settings, run_date)
            if on_outcome is not None:
                on_outcome(task, outcome)
            if outcome.exit_code:
                raise RuntimeError(f"{task.task_id} {run_date} exited {outcome.exit_code}: {outcome.text}")
        return out


def _depends_on(task: Task, tasks: list[Task]) -> list[Task]:
    return [
        other
        for other in tasks
        if other is not task
        and any(
            name in other.writes or (name in other.checks and name not in task.checks) for name in task.reads
        )
    ]


def _order(tasks: list[Task], models: list[str]) -> list[Task]:
    """Topological order; among ready tasks, the earlier DAG first, then a step without a model, then
    the earlier model of ``training.models`` (so each model is trained, evaluated and registered
    before the next one starts), then declaration order."""
    deps = {t.index: {u.index for u in _depends_on(t, tasks)} for t in tasks}
    done: set[int] = set()
    ordered: list[Task] = []
    while len(ordered) < len(tasks):
        ready = [t for t in tasks if t.index not in done and deps[t.index] <= done]
        if not ready:
            stuck = sorted(t.task_id for t in tasks if t.index not in done)
            raise PipelineError(f"the steps {stuck} wait for each other (a cycle in their tables)")
        first = min(
            ready,
            key=lambda t: (DAG_ORDER.index(t.dag), -1 if t.model is None else models.index(t.model), t.index),
        )
        ordered.append(first)
        done.add(first.index)
    return ordered


def load_pipeline(extra: Iterable[Stage] = ()) -> Pipeline:
    """The stages every installed package declares under ``funnelrec.stages`` (packages in name
    order, stages in their declared order), then ``extra``."""
    stages: list[Stage] = []
    points = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value)
    )
    if not points:
        raise PipelineError(
            f"no stages registered under the {ENTRY_POINT_GROUP!r} entry points: is funnelrec installed "
            "(make setup)?"
        )
    for point in points:
        declared = point.load()
        stages.extend(declared() if callable(declared) else declared)
    return Pipeline((*stages, *extra))
