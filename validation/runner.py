"""Run expectation suites on Spark DataFrames as a GX Checkpoint, build Data Docs, report failures.

One file-backed GX context lives under ``<warehouse>/gx`` (suites, validation definitions,
checkpoints); Data Docs are built to ``validation.data_docs_dir``. A DataFrame goes to GX as it is
(a Spark datasource with whole-dataframe batches), where each expectation is a Spark job or two;
one of at most ``pandas_max_rows`` rows is collected once and checked by GX's pandas engine
instead, which takes half the time or less on small tables (the nightly's on a small shop, the
tests'). The suites are the same; the one difference the engines show is a NaN in a float column,
which pandas counts as null (a not-null check fails on it) and Spark as a value (a range check
fails on it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

DATASOURCE = "funnelrec_spark"
PANDAS_DATASOURCE = "funnelrec_pandas"
SITE = "funnelrec_site"
SAMPLES = 5
# Longer than any one validation, even queued behind a backfill's other dates; a wait this long
# means a holder that hangs (the OS frees the lock of a process that exits, however it exits).
LOCK_TIMEOUT_SECONDS = 3600.0


@dataclass
class Check:
    """One expectation and the failure it guards against (shown in Data Docs and failure messages)."""

    expectation: Any
    guards: str


@dataclass
class Suite:
    """A named suite over one prepared DataFrame (a table, or a view of it joined with what it is checked against)."""

    name: str
    checks: list[Check]


@dataclass
class Failure:
    suite: str
    expectation: str
    kwargs: dict[str, Any]
    guards: str
    unexpected_count: int | None
    samples: list[Any] = field(default_factory=list)

    def describe(self) -> str:
        cols = {
            k: v for k, v in self.kwargs.items() if k in ("column", "column_A", "column_B", "column_list")
        }
        bounds = {
            k: v for k, v in self.kwargs.items() if k in ("min_value", "max_value", "value_set", "value")
        }
        count = "" if self.unexpected_count is None else f" unexpected={self.unexpected_count}"
        samples = f" samples={self.samples[:SAMPLES]}" if self.samples else ""
        return f"[{self.suite}] {self.expectation} {cols}{' ' + str(bounds) if bounds else ''}{count}{samples} -- guards: {self.guards}"


class ValidationFailed(RuntimeError):
    """A suite failed: downstream stages must not run."""

    def __init__(self, table: str, ds: str, failures: list[Failure], result_path: Path):
        self.failures = failures
        lines = "\n  ".join(f.describe() for f in failures)
        super().__init__(
            f"validation of {table} for {ds} failed {len(failures)} expectation(s):\n  {lines}\n"
            f"results: {result_path}"
        )


def _context(root: Path, docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    if ctx.variables.config_variables_file_path:
        # No suite of ours uses config variables, and while the project names a variables file GX
        # reads and parses it at every access to a store (about 70 times per validated table).
        ctx.variables.config_variables_file_path = None
        ctx.variables.save()
        ctx = gx.get_context(mode="file", project_root_dir=str(root))
    bars = ctx.variables.progress_bars  # a config object when set here, a dict once reloaded from YAML
    if bars is None or (bars.get("globally", True) if isinstance(bars, dict) else bars.globally):
        # Progress bars would interleave with the one-line-per-stage logs of unattended runs.
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        ctx.variables.save()
    sites = ctx.get_config().data_docs_sites or {}
    if SITE not in sites:
        ctx.add_data_docs_site(
            site_name=SITE,
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return ctx


def run_checkpoint(
    name: str,
    ds: str,
    suites: list[tuple[Suite, Any]],
    gx_root: Path,
    docs_dir: Path,
    result_path: Path,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
    pandas_max_rows: int = 0,
) -> dict[str, Any]:
    """Validate each (suite, Spark DataFrame) pair in one checkpoint; raise ``ValidationFailed`` on any failure.

    A DataFrame of at most ``pandas_max_rows`` rows is checked by GX's pandas engine (0: never).

    Writes the checkpoint result as JSON to ``result_path`` and rebuilds the Data Docs site either way.
    Waits up to ``lock_timeout`` seconds for another validation of the same warehouse to finish,
    then raises ``TimeoutError``.
    """
    gx_root.mkdir(parents=True, exist_ok=True)
    # The GX project is files (suites, validation definitions, checkpoints) that every validation
    # rewrites; two runs at once (a backfill's parallel dates) would read each other's half-written
    # files. One validation per warehouse at a time.
    lock = FileLock(gx_root / ".lock", timeout=lock_timeout)
    try:
        lock.acquire()
    except Timeout as exc:
        raise TimeoutError(
            f"validation of {name} for {ds} waited {lock_timeout:g} s for the GX project lock "
            f"{lock.lock_file}, held by another validation of this warehouse; nothing was validated"
        ) from exc
    try:
        results, failures = _validate_suites(_context(gx_root, docs_dir), name, suites, pandas_max_rows)
    finally:
        lock.release()
    summary = {
        "checkpoint": name,
        "ds": ds,
        "success": not failures,
        "suites": results,
        "failures": [f.__dict__ for f in failures],
        "data_docs": str(docs_dir / "index.html"),
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if failures:
        raise ValidationFailed(name, ds, failures, result_path)
    return summary


def _validate_suites(
    ctx, name: str, suites: list[tuple[Suite, Any]], pandas_max_rows: int = 0
) -> tuple[dict[str, Any], list[Failure]]:
    """Run each suite as its own checkpoint in the GX project ``ctx``; the described results by
    suite, and every failed expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    try:
        source = ctx.data_sources.get(DATASOURCE)
    except (KeyError, ValueError):
        source = None
    if source is None or source.persist:
        # GX would cache every batch; a Parquet-backed table is cheaper to re-read column by column
        # than to cache whole; the stage caches the joined views itself (``validation/validate.py``).
        source = ctx.data_sources.add_or_update_spark(name=DATASOURCE, persist=False)
    try:
        small = ctx.data_sources.get(PANDAS_DATASOURCE)
    except (KeyError, ValueError):
        small = ctx.data_sources.add_or_update_pandas(name=PANDAS_DATASOURCE)
    results: dict[str, Any] = {}
    failures: list[Failure] = []
    documented: list = []
    for suite, df in suites:
        # Counting up to the bound first: a large table is not collected only to be dropped.
        to_pandas = pandas_max_rows > 0 and df.limit(pandas_max_rows + 1).count() <= pandas_max_rows
        engine = small if to_pandas else source
        guards = {}
        for check in suite.checks:
            check.expectation.notes = check.guards
            guards[_key(check.expectation)] = check.guards
        # Given whole to the constructor and stored once: ``add_expectation`` on a suite whose name
        # the project already holds rewrites the suite's file once per expectation.
        gx_suite = gx.ExpectationSuite(name=suite.name, expectations=[c.expectation for c in suite.checks])
        if len(gx_suite.expectations) != len(suite.checks):  # the constructor logs and drops invalid ones
            raise ValueError(f"suite {suite.name}: an expectation GX cannot build")
        gx_suite = ctx.suites.add_or_update(gx_suite)
        try:
            asset = engine.get_asset(suite.name)
        except LookupError:
            asset = engine.add_dataframe_asset(name=suite.name)
        try:
            batch_def = asset.get_batch_definition("whole")
        except (KeyError, ValueError, LookupError):
            batch_def = asset.add_batch_definition_whole_dataframe("whole")
        vd = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=suite.name, data=batch_def, suite=gx_suite)
        )
        # One checkpoint per suite: a checkpoint run takes one dataframe as its batch parameter.
        checkpoint = ctx.checkpoints.add_or_update(
            gx.Checkpoint(
                name=f"{name}.{suite.name}",
                validation_definitions=[vd],
                actions=[],
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": SAMPLES},
            )
        )
        try:
            run = checkpoint.run(batch_parameters={"dataframe": df.toPandas() if to_pandas else df})
        finally:
            # Views are cached for the checkpoint; Spark's cache is keyed by plan, so a later read
            # of the same path (the table re-validated after a rewrite) would get stale rows.
            df.unpersist()
        for result_id, res in run.run_results.items():
            documented += [result_id, ExpectationSuiteIdentifier(name=suite.name)]
            results[suite.name] = res.describe_dict()
            for r in res.results:
                if r.success:
                    continue
                cfg = r.expectation_config
                failures.append(
                    Failure(
                        suite=suite.name,
                        expectation=cfg.type,
                        kwargs={
                            k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")
                        },
                        guards=guards.get(_key_cfg(cfg), ""),
                        unexpected_count=(r.result or {}).get("unexpected_count"),
                        samples=list((r.result or {}).get("partial_unexpected_list") or [])[:SAMPLES],
                    )
                )
    # Once for all suites (GX's UpdateDataDocsAction would rebuild the site's index per suite): the
    # pages of this run's results and suites, and the index.
    ctx.build_data_docs(site_names=[SITE], resource_identifiers=documented, build_index=True)
    return results, failures


def _key(expectation) -> tuple:
    return _key_cfg(expectation.configuration)


def _key_cfg(cfg) -> tuple:
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    return (cfg.type, json.dumps(kwargs, sort_keys=True, default=str))
