"""Batch scoring, the scores suite, atomic publishing, the analysts' DuckDB file and the report,
on the demo's real chain with a real champion in a real MLflow store."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import date

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from infra.tables import SCORES, analytics_db, report_path, scores_dir, scores_staged_dir
from jobs.context import run_context
from jobs.publish import QueryError, analyst_connection, run_publish, run_query
from tests.conftest import DEMO_DATE, QUICK_JVM, REPO, sorted_rows
from training.registry import promote, register
from training.score import run_score, serving_batches, serving_inputs
from training.train_evaluate import run_evaluate, run_train
from validation.runner import ValidationFailed
from validation.validate import result_path, run_validate

pytestmark = pytest.mark.spark
RUN_DATE = date.fromisoformat(DEMO_DATE)


@pytest.fixture(scope="module")
def scoring(retailrocket):
    """The chain's settings with their own registered model, and an als_multi champion in it."""
    settings, *_ = retailrocket
    settings = settings.model_copy(
        update={
            "mlflow": settings.mlflow.model_copy(
                update={"registered_model": "scoring", "experiment": "scoring"}
            )
        }
    )
    run_train(settings, DEMO_DATE, "als_multi")
    run_evaluate(settings, DEMO_DATE, "als_multi")
    register(settings, DEMO_DATE, "als_multi")
    assert promote(settings, ds=DEMO_DATE).action == "promoted"
    return settings


def _staged(settings) -> pd.DataFrame:
    frame = pq.read_table(scores_staged_dir(settings.paths.warehouse_root, DEMO_DATE)).to_pandas()
    return frame.sort_values(["user_id", "rank"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def published(scoring, spark):
    """Local-path scores of the demo date, from its serving context, validated and published."""
    run_context(spark, scoring, RUN_DATE)
    run_validate(spark, scoring, "serving", RUN_DATE)
    result = run_score(scoring, RUN_DATE, path="local")
    local = _staged(scoring)
    run_validate(spark, scoring, "scores", RUN_DATE)
    run_publish(scoring, RUN_DATE)
    return scoring, result, local


def test_local_and_spark_paths_give_identical_top_k(published, spark):
    settings, result, local = published
    assert result["scored_users"] == result["active_users"] > 500 and len(local) == result["rows"]
    # The demo's champion never saw some active users: the fallback serves them, and only them.
    assert 0 < result["fallback_rows"] < 0.1 * result["rows"]
    run_score(settings, RUN_DATE, path="spark", spark=spark)
    remote = _staged(settings)
    pd.testing.assert_frame_equal(remote[local.columns], local, check_exact=True)
    # The local path holds one batch of users at a time: any batch size gives the same rows.
    small = settings.model_copy(update={"scoring": settings.scoring.model_copy(update={"batch_size": 97})})
    assert max(len(b) for b in serving_batches(small, RUN_DATE, 97)) <= 97
    again = run_score(small, RUN_DATE, path="local")
    assert again["active_users"] == result["active_users"] and again["rows"] == result["rows"]
    pd.testing.assert_frame_equal(_staged(settings)[local.columns], local, check_exact=True)
    shutil.rmtree(scores_staged_dir(settings.paths.warehouse_root, DEMO_DATE))


def test_scores_exclude_purchases_and_follow_the_visited_sets(published):
    settings, _, local = published
    k = settings.scoring.k
    sizes = local.groupby("user_id")["rank"].agg(["count", "max"])
    assert (sizes["count"] == k).all() and (sizes["max"] == k).all()
    users, catalogue = serving_inputs(settings, RUN_DATE)
    assert set(local["user_id"]) == set(users["user_id"])
    bought = users.explode("bought").dropna().rename(columns={"bought": "item_id"})
    assert local.merge(bought, on=["user_id", "item_id"]).empty
    assert set(local["item_id"]) <= set(catalogue)
    visited = users[["user_id", "visited"]].explode("visited").dropna()
    typed = local.merge(visited.rename(columns={"visited": "item_id"}).assign(v=True), how="left")
    assert typed["item_type"].eq(np.where(typed["v"].eq(True), "visited", "unvisited")).all()
    assert set(local["item_type"]) == {"visited", "unvisited"}
    assert local["model"].eq("als_multi").all() and local["model_version"].eq(1).all()


def test_scored_table_passes_its_suite_and_a_broken_one_fails_naming_what_broke(published, spark):
    settings, _, local = published
    summary = run_validate(spark, settings, "scores", RUN_DATE)  # the published partition
    assert summary["success"]
    passed = result_path(settings, "scores", DEMO_DATE).read_bytes()  # the report reads it
    broken = local.copy()
    broken.loc[0, "rank"] = broken.loc[1, "rank"]  # two items at one rank
    users, _ = serving_inputs(settings, RUN_DATE)
    buyer = users[users["bought"].map(len) > 0].iloc[0]
    row = broken[broken["user_id"] == buyer["user_id"]].index[0]
    broken.loc[row, "item_id"] = buyer["bought"][0]  # something the user bought
    other = broken[broken["user_id"] != broken.loc[0, "user_id"]].index[:3]
    broken.loc[other[2], "score"] = broken.loc[other[0], "score"] + 1.0  # rank 3 above rank 1
    flip = broken.index[-1]
    broken.loc[flip, "item_type"] = "visited" if broken.loc[flip, "item_type"] == "unvisited" else "unvisited"
    target = scores_staged_dir(settings.paths.warehouse_root, DEMO_DATE)
    target.mkdir(parents=True)
    try:
        pq.write_table(pa.Table.from_pandas(broken, schema=SCORES.arrow_schema()), target / "part-0.parquet")
        with pytest.raises(ValidationFailed) as err:
            run_validate(spark, settings, "scores", RUN_DATE)
        text = str(err.value)
        assert "expect_compound_columns_to_be_unique" in text and "already bought it" in text
        assert "two items at one rank" in text
        assert "ranks not in score order" in text and "disagrees with the user's visited set" in text
        assert "catalogue" not in text and "other than K=" not in text  # what was not broken passes
    finally:
        shutil.rmtree(target)
        result_path(settings, "scores", DEMO_DATE).write_bytes(passed)


def test_a_collapse_against_the_previous_night_fails_the_scores_suite_with_the_reason(published, spark):
    """The previous published night is a copy of this one: the real scores keep every list (overlap
    1); a table giving everyone the same 50 other items collapses both overlap and coverage."""
    settings, _, local = published
    wh = settings.paths.warehouse_root
    result = result_path(settings, "scores", DEMO_DATE)
    published_result = result.read_bytes()  # the published scores' result, which the report reads
    previous = scores_dir(wh) / "ds=2015-09-17"
    shutil.copytree(scores_dir(wh) / f"ds={DEMO_DATE}", previous)
    target = scores_staged_dir(wh, DEMO_DATE)
    try:
        summary = run_validate(spark, settings, "scores", RUN_DATE)  # the published partition
        observed = {
            e["kwargs"].get("column"): e["result"].get("observed_value")
            for e in summary["suites"]["scores"]["expectations"]
            if e["expectation_type"]
            in ("expect_column_mean_to_be_between", "expect_column_min_to_be_between")
        }
        assert observed["overlap_with_previous"] == pytest.approx(1.0)
        assert observed["coverage_ratio"] == pytest.approx(1.0)
        same = local.copy()  # everyone gets the same 50 catalogue items nobody got the night before
        _, catalogue = serving_inputs(settings, RUN_DATE)
        unseen = [i for i in catalogue if i not in set(local["item_id"])][: settings.scoring.k]
        same["item_id"] = np.tile(np.asarray(unseen), len(same) // len(unseen))
        target.mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(same, schema=SCORES.arrow_schema()), target / "part-0.parquet")
        with pytest.raises(ValidationFailed) as err:
            run_validate(spark, settings, "scores", RUN_DATE)
        text = str(err.value)
        assert "lists replaced wholesale overnight" in text and "2015-09-17" in text
        assert "catalogue coverage collapsed" in text
    finally:
        shutil.rmtree(previous)
        shutil.rmtree(target, ignore_errors=True)
        result.write_bytes(published_result)


def test_a_killed_scoring_run_leaves_the_published_date_readable(published, tmp_path):
    settings, _, local = published
    wh = settings.paths.warehouse_root
    db = analytics_db(wh)
    before = (
        duckdb.connect(str(db), read_only=True).execute("select count(*) from fct_recommendations").fetchone()
    )
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "paths": {"warehouse_root": str(wh), "data_root": str(settings.paths.data_root)},
                "mlflow": {"registered_model": "scoring", "experiment": "scoring"},
                "spark": {"master": "local[1]", "conf": {"spark.driver.extraJavaOptions": QUICK_JVM}},
            }
        )
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "--config",
            str(cfg),
            "score",
            "--date",
            DEMO_DATE,
            "--path",
            "spark",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = wh / "scores_staged" / ".staging"
    deadline = time.monotonic() + 240
    while (
        not (staging.exists() and any(staging.rglob("*")))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert proc.poll() is None, "scoring finished before it could be killed"
    import os

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not scores_staged_dir(wh, DEMO_DATE).exists()  # nothing half-written became visible
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("select count(*) from fct_recommendations").fetchone() == before
    published_now = pq.read_table(scores_dir(wh) / f"ds={DEMO_DATE}").to_pandas()
    assert len(published_now) == len(local)
    # Publishing again without new scores keeps the published partition.
    run_publish(settings, RUN_DATE)
    again = pq.read_table(scores_dir(wh) / f"ds={DEMO_DATE}").to_pandas()
    assert again.sort_values(["user_id", "rank"]).reset_index(drop=True)[local.columns].equals(local)


def _readme_queries() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Analyst queries", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"### (.+?)\n\n```sql\n(.+?)```", section, flags=re.S)


def test_the_five_readme_queries_run_and_return_rows(published):
    settings, *_ = published
    queries = _readme_queries()
    assert len(queries) == 5
    for question, sql in queries:  # through the analysts' read-only connection, as `funnelrec sql`
        assert run_query(settings, sql)[1], question
    with duckdb.connect(str(analytics_db(settings.paths.warehouse_root)), read_only=True) as con:
        # One catalogue: every recommended item is in dim_items, so coverage cannot pass 100%.
        outside = "select count(*) from recommendations_latest r anti join dim_items d using (item_id)"
        assert con.sql(outside).fetchall() == [(0,)]
        coverage = con.sql("select items_recommended, catalogue_items, coverage from agg_catalog_coverage")
        (recommended, items, share), *_ = coverage.fetchall()
        assert 0 < recommended <= items == len(con.sql("from dim_items").fetchall()) and share <= 1
        docs = dict(con.sql("select view_name, comment from duckdb_views() where not internal").fetchall())
        assert docs["fct_recommendations"] and docs["agg_catalog_coverage"]
        runs = con.sql(
            "select model, registered_version, aliases from model_runs where registered_version is not null"
        )
        assert runs.fetchall() == [("als_multi", 1, "challenger,champion")]


def test_the_analysts_connection_reads_the_marts_and_can_change_nothing(published, capsys):
    from infra.cli import main

    settings, *_ = published
    wh = settings.paths.warehouse_root
    db = analytics_db(wh)
    assert db.stat().st_mode & 0o222 == 0  # no write bit: a plain `duckdb FILE` of another user reads only
    before = sorted(str(p.relative_to(wh)) for p in wh.rglob("*"))
    columns, rows = run_query(settings, "SELECT count(*) AS n FROM fct_recommendations; DESCRIBE dim_users")
    assert "column_name" in columns and {r[0] for r in rows} >= {"user_id", "scored_latest"}
    inside = scores_dir(wh) / "copied.parquet"
    refused = {
        "CREATE TABLE x AS SELECT 1": "read-only",
        "INSERT INTO dim_users SELECT * FROM dim_users": "read-only",
        f"COPY (SELECT 1) TO '{inside}'": "read-only",
        "SELECT 1; DROP VIEW fct_recommendations": "read-only",
        "EXPLAIN ANALYZE SELECT 1": "read-only",
        f"ATTACH '{wh}/other.duckdb'": "read-only",
        "SELECT * FROM read_csv('/etc/passwd')": "/etc/passwd",
        f"SELECT * FROM read_parquet('{wh}/quarantine/**/*.parquet')": "quarantine",
        "SELECT * FROM nonexistent_table": "nonexistent_table",
    }
    for sql, why in refused.items():
        with pytest.raises(QueryError, match=re.escape(why)):
            run_query(settings, sql)
    con = analyst_connection(settings)
    try:
        for sql in ("SET enable_external_access = true", "SET lock_configuration = false"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()
    assert sorted(str(p.relative_to(wh)) for p in wh.rglob("*")) == before
    # The command: one line on a refusal, tab-separated rows otherwise.
    settings_file = wh.parent / "analyst.yaml"
    settings_file.write_text(f"paths:\n  warehouse_root: {wh}\n")
    assert main(["--config", str(settings_file), "sql", "--query", f"COPY dim_users TO '{inside}'"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("funnelrec sql: QueryError: the analysts' connection is read-only") and "\n" not in err
    )
    assert main(["--config", str(settings_file), "sql", "--query", "SELECT 41 + 1 AS answer"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["answer", "42"]


def test_report_renders_in_headless_chromium_with_every_section(published, tmp_path):
    from PIL import Image

    settings, *_ = published
    page = report_path(settings.paths.warehouse_root, DEMO_DATE)
    chromium = shutil.which("chromium")
    assert chromium, "Debian chromium is missing: `make test` installs it (apt-get install chromium)"
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    sections = (
        "champion",
        "stages",
        "promotion",
        "outcomes",
        "drift",
        "checks",
        "metrics",
        "coverage",
        "item-types",
    )
    for section in (*sections, "popularity"):
        assert f'<section id="{section}">' in dom.stdout, section
    stages = dom.stdout.split('<section id="stages">')[1].split("</section>")[0]
    assert "One stage" in stages  # the fixture has no ranker
    # The fixture's promotion: the first champion's gates, read back from the decisions table.
    promotion = dom.stdout.split('<section id="promotion">')[1].split("</section>")[0]
    assert "min_users" in promotion and "floor" in promotion and "promoted" in promotion
    assert "chance_hr20" in dom.stdout
    assert dom.stdout.count('<img alt="') == 6 and "als_multi" in dom.stdout
    checks = dom.stdout.split('<section id="checks">')[1].split("</section>")[0]
    assert checks.count("<td>passed</td>") >= 3 and "FAILED" not in checks  # serving, catalogue, scores
    # The demo date is the slice's last day: no following day has events to judge its list by yet.
    outcomes = dom.stdout.split('<section id="outcomes">')[1].split("</section>")[0]
    assert "No published date has a following day with events yet" in outcomes
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # not a blank page
    assert (pixels < 128).mean() > 0.01  # text and plots drawn


def test_rollback_with_rescore_publishes_the_restored_champions_rows(published, tmp_path):
    """Runs last: it changes the champion. A second version takes @champion (a refresh of the same
    model), then `funnelrec rollback --rescore` gives it back and re-publishes the latest date."""
    from infra.cli import main

    settings, _, local = published
    run_train(settings, DEMO_DATE, "als_multi")
    run_evaluate(settings, DEMO_DATE, "als_multi")
    v2 = register(settings, DEMO_DATE, "als_multi")
    assert v2 == 2 and promote(settings, version=v2).champion_after == 2
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "paths": {
                    "warehouse_root": str(settings.paths.warehouse_root),
                    "data_root": str(settings.paths.data_root),
                },
                "mlflow": {"registered_model": "scoring", "experiment": "scoring"},
                "pipeline": {"sources": list(settings.pipeline.sources)},
                "split": settings.split.model_dump(),
                "scoring": {"active_days": settings.scoring.active_days},
            }
        )
    )
    # Published by version 2 first, as a nightly would have.
    assert main(["--config", str(cfg), "score", "--date", DEMO_DATE]) == 0
    assert main(["--config", str(cfg), "validate", "--table", "scores", "--date", DEMO_DATE]) == 0
    assert main(["--config", str(cfg), "publish", "--date", DEMO_DATE]) == 0
    wh = settings.paths.warehouse_root
    assert set(pq.read_table(scores_dir(wh) / f"ds={DEMO_DATE}").column("model_version").to_pylist()) == {2}

    assert main(["--config", str(cfg), "rollback", "--rescore"]) == 0
    after = pq.read_table(scores_dir(wh) / f"ds={DEMO_DATE}").to_pandas()
    assert set(after["model_version"]) == {1}
    after = after.sort_values(["user_id", "rank"]).reset_index(drop=True)
    assert after[["user_id", "rank", "item_id"]].equals(local[["user_id", "rank", "item_id"]])
    with duckdb.connect(str(analytics_db(wh)), read_only=True) as con:
        assert con.sql("select distinct model_version from recommendations_latest").fetchall() == [(1,)]


def test_a_forgotten_user_leaves_every_table_and_a_later_ingest_keeps_them_out(published, spark, tmp_path):
    from infra.tables import FORGOTTEN_ID_PREFIX, QUARANTINE, read_manifest
    from jobs.forget import run_forget
    from jobs.ingest import run_ingest

    settings, *_ = published
    src = settings.paths.warehouse_root
    wh = tmp_path / "warehouse"
    for sub in ("events", "quarantine", "sessionized", "training", "serving", "scores", "scores_staged"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, wh / sub, ignore=shutil.ignore_patterns(".*"))
    shutil.copytree(src / "analytics", wh / "analytics")
    paths = settings.paths.model_copy(update={"warehouse_root": wh, "quarantine_root": wh / "quarantine"})
    s = settings.model_copy(update={"paths": paths})
    run_publish(s, RUN_DATE)  # the copy's own analysts' database, views over the copy

    training = wh / "training" / f"ds={DEMO_DATE}"
    user_map = pq.read_table(training / "user_map").to_pandas()
    scored = set(pq.read_table(scores_dir(wh)).column("user_id").to_pylist())
    user = sorted(scored & set(user_map["user_id"]))[0]
    idx = int(user_map.loc[user_map["user_id"] == user, "user_idx"].iloc[0])
    # Two refused lines: one holds the id as a field, one only inside a longer token.
    qpart = next((wh / "quarantine").glob("source=*/run_date=*"), None) or (
        wh / "quarantine" / "source=retailrocket_mb" / f"run_date={DEMO_DATE}"
    )
    qpart.mkdir(parents=True, exist_ok=True)
    lines = [f"1442004589439,{user},view,1,", f"1442004589439,{user}7,view,1,"]
    extra = pa.Table.from_pylist(
        [
            {
                "file": "x.csv",
                "line_number": n,
                "raw_line": line,
                "reason": "unknown_behavior",
                "detail": None,
            }
            for n, line in enumerate(lines, 2)
        ],
        schema=pa.schema([f for f in QUARANTINE.arrow_schema() if f.name in QUARANTINE.data_columns]),
    )
    pq.write_table(extra, qpart / "extra.parquet")

    def rows_of(folder, column="user_id", value=user):
        t = pq.read_table(folder, columns=[column]) if any(folder.rglob("*.parquet")) else None
        return 0 if t is None else sum(v == value for v in t.column(column).to_pylist())

    per_user = {
        "events": wh / "events",
        "sessions": wh / "sessionized" / f"ds={DEMO_DATE}" / "sessions",
        "session_events": wh / "sessionized" / f"ds={DEMO_DATE}" / "session_events",
        "serving_context": wh / "serving" / f"ds={DEMO_DATE}" / "serving_context",
        "scores": scores_dir(wh),
        "scores_staged": wh / "scores_staged",
    }
    by_idx = ("interactions", "visited", "heldout", "train_events")
    before = {name: rows_of(p) for name, p in per_user.items()}
    before.update({t: rows_of(training / t, "user_idx", idx) for t in by_idx})
    assert all(before[t] > 0 for t in ("events", "sessions", "serving_context", "scores", "interactions"))
    totals = {t: pq.read_table(training / t).num_rows for t in by_idx}
    checksums = read_manifest(training).checksums

    result = run_forget(s, [user])

    assert {name: rows_of(p) for name, p in per_user.items()} == dict.fromkeys(per_user, 0)
    assert {t: rows_of(training / t, "user_idx", idx) for t in by_idx} == dict.fromkeys(by_idx, 0)
    assert {t: pq.read_table(training / t).num_rows for t in by_idx} == {
        t: totals[t] - before[t] for t in by_idx
    }
    for t in ("events", "sessions", "scores", "interactions", "train_events"):
        assert result.removed[t] == before[t], t
    after_map = pq.read_table(training / "user_map").to_pandas()
    assert len(after_map) == len(user_map) and user not in set(after_map["user_id"])
    assert after_map.loc[after_map["user_idx"] == idx, "user_id"].item() == f"{FORGOTTEN_ID_PREFIX}{idx}"
    manifest = read_manifest(training)
    assert manifest.checksums["interactions"] != checksums["interactions"]
    assert manifest.checksums["item_map"] == checksums["item_map"]
    run_validate(spark, s, "training", RUN_DATE)  # the rewritten bundle passes its suites
    kept = pq.read_table(qpart, columns=["raw_line"]).column("raw_line").to_pylist()
    assert lines[0] not in kept and lines[1] in kept
    assert run_query(s, f"SELECT count(*) FROM dim_users WHERE user_id = '{user}'")[1] == [(0,)]
    assert run_query(s, f"SELECT count(*) FROM fct_recommendations WHERE user_id = '{user}'")[1] == [(0,)]
    assert run_query(s, "SELECT count(*) FROM dim_users")[1][0][0] > 0

    again = run_forget(s, [user])  # nothing left to remove: nothing rewritten
    assert again.removed == {} and again.rewritten == []

    # Ingesting the old raw log again drops the user's rows: counted as forgotten, never published.
    (ingested,) = run_ingest(spark, s, date.fromisoformat(DEMO_DATE))
    assert ingested.forgotten >= before["events"] and rows_of(wh / "events") == 0  # (raw duplicates)


def _killed_midway(cmd: list[str], started, what: str) -> None:
    """Run ``cmd`` (its own process group) and SIGKILL the group once ``started()`` is true."""
    import os

    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"{what} finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _fingerprint(folder) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_kill_9_of_sessionize_or_publish_leaves_the_published_outputs_and_a_rerun_gives_the_same(
    published, spark, tmp_path
):
    from jobs.sessionize import run_sessionize

    settings, *_ = published
    wh = settings.paths.warehouse_root
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "paths": {"warehouse_root": str(wh), "data_root": str(settings.paths.data_root)},
                "pipeline": {"sources": list(settings.pipeline.sources)},
                "sessionize": settings.sessionize.model_dump(),
                "mlflow": {"registered_model": "scoring", "experiment": "scoring"},
                "spark": {"master": "local[1]", "conf": {"spark.driver.extraJavaOptions": QUICK_JVM}},
            }
        )
    )
    cli = [sys.executable, "-m", "infra.cli", "--config", str(cfg)]

    # sessionize, killed while it writes its staged bundle
    bundle = wh / "sessionized" / f"ds={DEMO_DATE}"
    before = _fingerprint(bundle)
    rows = {t: sorted_rows(pq.read_table(bundle / t).to_pandas()) for t in ("sessions", "session_events")}
    staging = wh / "sessionized" / ".staging"
    _killed_midway(
        [*cli, "sessionize", "--date", DEMO_DATE],
        lambda: staging.exists() and any(p.suffix == ".parquet" for p in staging.rglob("*")),
        "sessionize",
    )
    assert _fingerprint(bundle) == before  # the published bundle: untouched, every file readable
    assert all(len(pq.read_table(bundle / t)) == len(rows[t]) for t in rows)
    run_sessionize(spark, settings, RUN_DATE)  # the rerun
    for t, frame in rows.items():
        pd.testing.assert_frame_equal(sorted_rows(pq.read_table(bundle / t).to_pandas()), frame, obj=t)
    assert list(staging.iterdir()) == []  # the killed run's scratch folder went with the rerun

    # publish, killed while it builds the analysts' database (after the scores' swap)
    db = analytics_db(wh)
    query = "select count(*), sum(hash(user_id, item_id, rank)) from fct_recommendations"
    with duckdb.connect(str(db), read_only=True) as con:
        marts = con.execute(query).fetchone()
    scores_before = _fingerprint(scores_dir(wh))
    _killed_midway(
        [*cli, "publish", "--date", DEMO_DATE],
        lambda: any(db.parent.glob(f".{db.name}.*.tmp")),
        "publish",
    )
    with duckdb.connect(str(db), read_only=True) as con:  # the previous database, whole
        assert con.execute(query).fetchone() == marts
    assert _fingerprint(scores_dir(wh)) == scores_before
    run_publish(settings, RUN_DATE)  # the rerun: the same rows, the killed run's temporary file gone
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute(query).fetchone() == marts
    assert _fingerprint(scores_dir(wh)) == scores_before
    assert [p.name for p in db.parent.iterdir()] == [db.name]
