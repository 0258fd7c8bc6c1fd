"""The daily HTML report: one static file per date, plots embedded as PNG images.

Sections (each a ``<section id=...>``): ``champion`` (which model produced the date, with links to
its MLflow run and the Data Docs, and its test HR@20 beside the chance level of each setting),
``stages`` (for two-stage lists: the retriever's and the re-ranked list's test metrics side by side),
``promotion`` (the latest promotion decision up to the date: every candidate and gate, with the
candidate's and the champion's means on the same users and the interval of the change),
``metrics`` (test metrics over data dates per setting),
``outcomes`` (how the published lists did: hit rate at 10 and at K of each date's list against the
purchases of the following ``scoring.outcome_days`` days, per serving version, and by slice for the
latest date with outcomes), ``drift`` (each user's top K against the previous published date's, and both nights' score
distributions), ``checks`` (every validation suite of the date: passed or failed, and each failed
expectation with its count, from the result files), ``coverage`` (catalogue coverage over dates),
``item-types`` (visited vs unvisited share by rank),
``popularity`` (how popular the recommended items are against the catalogue).
Everything is read from the analysts' DuckDB file, so the report shows what analysts can query.
The page is ``templates/report.html.j2`` (Jinja2, autoescaped); this module queries and plots.
"""

from __future__ import annotations

import base64
import io
import math
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import jinja2

from infra.settings import Settings
from infra.tables import RUN_SETTINGS, report_path, run_metric_column, validation_result_path

GATE_COLUMNS = (
    "version, model, kind, outcome, gate, status, setting, users, value, champion_value, change, "
    "change_low, change_high, threshold"
)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def _test(metric: str, setting: str = "standard") -> str:
    """The ``model_runs`` column of a test metric."""
    return run_metric_column("test", setting, metric)


def cell(v: Any) -> str:
    """A table cell: floats to 4 decimals, a missing figure as "-" (no users in that setting: no
    figure, not 0)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _rows(df) -> dict[str, list]:
    return {"columns": [str(c) for c in df.columns], "rows": [list(r) for r in df.itertuples(index=False)]}


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("jobs", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_TEMPLATES.filters["cell"] = cell
_TEMPLATES.filters["percent"] = lambda v: f"{float(v):.1%}"


#: The suites of a night, in pipeline order (``validation/<table>/ds=<d>/result.json``).
CHECKED_TABLES = ("events", "sessions", "training", "serving", "scores")


def validation_rows(settings: Settings, run_date: date):
    """One row per suite run for ``run_date``: table, suite, pass/fail, expectations evaluated, and
    each failed expectation with its unexpected count or observed value; tables not validated for
    the date say so. Read from the result files, so the page needs nothing from a CDN (GX's Data
    Docs do)."""
    import json

    import pandas as pd

    rows = []
    for table in CHECKED_TABLES:
        path = validation_result_path(settings.paths.warehouse_root, table, run_date)
        if not path.exists():
            rows.append({"table": table, "suite": "-", "result": "not run for this date"})
            continue
        result = json.loads(path.read_text())
        for name, suite in result.get("suites", {}).items():
            failed = []
            for exp in suite.get("expectations", []):
                if not exp.get("success"):
                    got = exp.get("result") or {}
                    value = got.get("unexpected_count", got.get("observed_value"))
                    column = exp.get("kwargs", {}).get("column", "")
                    failed.append(f"{exp['expectation_type']}({column}): {value}")
            stats = suite.get("statistics", {})
            rows.append(
                {
                    "table": table,
                    "suite": name,
                    "result": "passed" if suite.get("success") else "FAILED",
                    "expectations": stats.get("evaluated_expectations"),
                    "failed": "; ".join(failed) or "-",
                }
            )
    return pd.DataFrame(rows, columns=["table", "suite", "result", "expectations", "failed"])


def write_report(settings: Settings, run_date: date, db: Path) -> Path:
    plt = _plots()
    con = duckdb.connect(str(db), read_only=True)
    try:
        champ = con.execute(
            "SELECT any_value(model), any_value(model_name), any_value(model_version), any_value(run_id), "
            "count(DISTINCT user_id), count(*) FROM fct_recommendations WHERE ds = ?",
            [run_date],
        ).fetchone()
        model, name, version, run_id, users, rows = champ
        retriever_version = con.execute(
            "SELECT any_value(retriever_version) FROM fct_recommendations WHERE ds = ?", [run_date]
        ).fetchone()[0]
        stage_metrics = None
        if retriever_version is not None:
            stage_metrics = con.execute(
                " UNION ALL ".join(
                    f"SELECT stage, '{s}' AS setting, {_test('users', s)} AS users, {_test('HR@10', s)} AS hr10, "
                    f"{_test('NDCG@10', s)} AS ndcg10, {_test('NDCG@20', s)} AS ndcg20 FROM ("
                    "SELECT 'retriever' AS stage, * FROM model_runs WHERE registered_model = $rmodel "
                    "AND registered_version = $rversion AND data_ds = $ds "
                    "UNION ALL BY NAME SELECT 'two stages' AS stage, * FROM model_runs WHERE run_id = $run)"
                    for s in RUN_SETTINGS
                ),
                {
                    "rmodel": settings.mlflow.registered_model,
                    "rversion": retriever_version,
                    "run": run_id,
                    "ds": run_date.isoformat(),
                },
            ).df()
        runs = con.execute(
            "SELECT data_ds, "
            + ", ".join(f"{_test('NDCG@20', s)} AS {s}" for s in RUN_SETTINGS)
            + " FROM model_runs "
            f"WHERE model = ? AND data_ds IS NOT NULL AND {_test('NDCG@20')} IS NOT NULL "
            "ORDER BY started_at",
            [model],
        ).df()
        runs = runs.groupby("data_ds", as_index=False).last()
        champion_metrics = con.execute(
            " UNION ALL ".join(
                f"SELECT '{s}' AS setting, {_test('users', s)} AS users, "
                f"{_test('candidates', s)} AS candidates, {_test('HR@20', s)} AS hr20, "
                f"{_test('chance_HR@20', s)} AS chance_hr20, {_test('NDCG@20', s)} AS ndcg20 "
                "FROM model_runs WHERE run_id = $run"
                for s in RUN_SETTINGS
            ),
            {"run": run_id},
        ).df()
        decided = con.execute("SELECT max(ds) FROM fct_promotion_gates WHERE ds <= ?", [run_date]).fetchone()[
            0
        ]
        gates = con.execute(
            f"SELECT {GATE_COLUMNS} FROM fct_promotion_gates WHERE ds = ? "
            "ORDER BY candidate_value DESC NULLS LAST, version, gate",
            [decided],
        ).df()
        coverage = con.execute("SELECT * FROM agg_catalog_coverage ORDER BY ds").df()
        types = con.execute(
            "SELECT rank, avg(CASE WHEN item_type = 'visited' THEN 1.0 ELSE 0.0 END) AS visited_share "
            "FROM fct_recommendations WHERE ds = ? GROUP BY rank ORDER BY rank",
            [run_date],
        ).df()
        pop = con.execute(
            "SELECT d.popularity_rank FROM fct_recommendations f JOIN dim_items d USING (item_id) WHERE f.ds = ?",
            [run_date],
        ).df()
        catalogue = con.execute("SELECT popularity_rank FROM dim_items").df()
        outcomes = con.execute(
            "SELECT * FROM agg_recommendation_outcomes WHERE slice = 'all' AND ds <= ? ORDER BY ds",
            [run_date],
        ).df()
        judged = con.execute(
            "SELECT max(ds) FROM agg_recommendation_outcomes WHERE days_observed > 0 AND ds <= ?", [run_date]
        ).fetchone()[0]
        slices = con.execute(
            "SELECT model_version, slice, users, hit_rate_at_10, hit_rate_at_k, days_observed, complete "
            "FROM agg_recommendation_outcomes WHERE ds = ? ORDER BY model_version, slice",
            [judged],
        ).df()
        previous = con.execute("SELECT max(ds) FROM fct_recommendations WHERE ds < ?", [run_date]).fetchone()[
            0
        ]
        overlap = con.execute(
            "WITH today AS (SELECT user_id, item_id FROM fct_recommendations WHERE ds = $d), "
            "before AS (SELECT user_id, item_id FROM fct_recommendations WHERE ds = $p), "
            "both_nights AS (SELECT DISTINCT user_id FROM before) "
            "SELECT t.user_id, count(b.item_id) / count(*) AS overlap FROM today t "
            "JOIN both_nights USING (user_id) LEFT JOIN before b USING (user_id, item_id) GROUP BY t.user_id",
            {"d": run_date, "p": previous},
        ).df()
        spread = con.execute(
            "SELECT ds, model_version, count(*) AS rows, quantile_cont(score, 0.1) AS p10, "
            "quantile_cont(score, 0.5) AS p50, quantile_cont(score, 0.9) AS p90 FROM fct_recommendations "
            "WHERE ds IN ($d, $p) GROUP BY ds, model_version ORDER BY ds",
            {"d": run_date, "p": previous},
        ).df()
        night_scores = con.execute(
            "SELECT ds, score FROM fct_recommendations WHERE ds IN ($d, $p)", {"d": run_date, "p": previous}
        ).df()
        fallback = con.execute(
            "SELECT count(DISTINCT user_id) FILTER (WHERE expert = 'fallback') FROM fct_recommendations "
            "WHERE ds = ?",
            [run_date],
        ).fetchone()[0]
    finally:
        con.close()

    fig = plt.figure(figsize=(8, 3))
    ax = fig.subplots()
    for s in RUN_SETTINGS:
        ax.plot(runs["data_ds"], runs[s], marker="o", label=s)
    ax.set(title=f"{model}: test NDCG@20 by data date", xlabel="data date", ylabel="NDCG@20")
    ax.legend(fontsize=7)
    fig.tight_layout()
    metrics_png = _png(fig)
    plt.close(fig)

    fig = plt.figure(figsize=(8, 3))
    ax = fig.subplots()
    observed = outcomes[outcomes["days_observed"] > 0]
    for version, part in observed.groupby("model_version"):
        for col, style in (("hit_rate_at_k", "-"), ("hit_rate_at_10", ":")):
            ax.plot(
                [str(d)[:10] for d in part["ds"]], part[col], style, marker="o", label=f"v{version} {col}"
            )
    ax.set(
        title="published lists: bought within the following days (hollow: days still to come)",
        ylabel="hit rate",
    )
    incomplete = observed[~observed["complete"].astype(bool)]
    ax.scatter(
        [str(d)[:10] for d in incomplete["ds"]],
        incomplete["hit_rate_at_k"],
        facecolors="white",
        edgecolors="k",
        zorder=3,
    )
    if len(observed):
        ax.legend(fontsize=7)
    fig.tight_layout()
    outcomes_png = _png(fig)
    plt.close(fig)

    fig = plt.figure(figsize=(8, 3))
    left, right = fig.subplots(1, 2)
    left.hist(overlap["overlap"], bins=20, range=(0, 1), color="#4c72b0")
    left.set(title=f"top-K overlap with {previous or 'no previous date'}", xlabel="share of the list kept")
    for ds, part in night_scores.groupby("ds"):
        right.hist(part["score"], bins=40, alpha=0.5, density=True, label=str(ds)[:10])
    right.set(title="score distribution", xlabel="score")
    if len(night_scores):
        right.legend(fontsize=7)
    fig.tight_layout()
    drift_png = _png(fig)
    plt.close(fig)
    checks = validation_rows(settings, run_date)

    fig = plt.figure(figsize=(8, 3))
    ax = fig.subplots()
    ax.bar([str(d)[:10] for d in coverage["ds"]], coverage["coverage"], color="#4c72b0")
    ax.set(title="catalogue coverage (distinct items recommended / items in dim_items)", ylim=(0, 1))
    fig.tight_layout()
    coverage_png = _png(fig)
    plt.close(fig)

    fig = plt.figure(figsize=(8, 3))
    ax = fig.subplots()
    ax.bar(types["rank"], types["visited_share"], color="#55a868", label="visited")
    ax.bar(
        types["rank"],
        1 - types["visited_share"],
        bottom=types["visited_share"],
        color="#c44e52",
        label="unvisited",
    )
    ax.set(title="item type by rank", xlabel="rank", ylabel="share of users", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    types_png = _png(fig)
    plt.close(fig)

    fig = plt.figure(figsize=(8, 3))
    ax = fig.subplots()
    bins = max(10, min(50, len(catalogue)))
    ax.hist(catalogue["popularity_rank"], bins=bins, density=True, alpha=0.5, label="catalogue")
    ax.hist(pop["popularity_rank"], bins=bins, density=True, alpha=0.6, label="recommended")
    ax.set(title="popularity rank of recommended items (1 = most purchased)", xlabel="popularity rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    pop_png = _png(fig)
    plt.close(fig)

    visited_share = float(types["visited_share"].mean()) if len(types) else 0.0
    latest_cov = coverage.loc[coverage["ds"] == coverage["ds"].max()].iloc[0] if len(coverage) else None
    uri = settings.mlflow_tracking_uri
    remote = uri.startswith(("http://", "https://"))
    body = _TEMPLATES.get_template("report.html.j2").render(
        run_date=run_date,
        champion={
            "name": name,
            "version": version,
            "model": model,
            "users": users,
            "rows": rows,
            "fallback": fallback,
            "run_id": run_id,
        },
        mlflow={"url": uri if remote else "http://127.0.0.1:5000", "local_store": None if remote else uri},
        docs_uri=(Path(settings.validation.data_docs_dir) / "index.html").as_uri(),
        champion_metrics=_rows(champion_metrics),
        stages=None
        if stage_metrics is None
        else {"retriever_version": retriever_version, "metrics": _rows(stage_metrics)},
        decided=decided,
        gates=_rows(gates),
        outcome_days=settings.scoring.outcome_days,
        judged=judged,
        slices=_rows(slices),
        previous=previous,
        overlap={"mean": float(overlap["overlap"].mean()) if len(overlap) else 0.0, "users": len(overlap)},
        spread=_rows(spread),
        checks=_rows(checks),
        coverage={
            "items_recommended": latest_cov["items_recommended"] if latest_cov is not None else 0,
            "catalogue_items": latest_cov["catalogue_items"] if latest_cov is not None else 0,
            "share": float(latest_cov["coverage"]) if latest_cov is not None else 0.0,
        },
        visited_share=visited_share,
        plots={
            "outcomes": outcomes_png,
            "drift": drift_png,
            "metrics": metrics_png,
            "coverage": coverage_png,
            "types": types_png,
            "popularity": pop_png,
        },
    )
    target = report_path(settings.paths.warehouse_root, run_date)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(body)
    tmp.replace(target)
    return target
