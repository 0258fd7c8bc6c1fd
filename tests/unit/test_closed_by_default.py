"""Closed by default (issue #25): no credentials in the repository, and the servers the project
starts are told to bind the loopback interface."""

from __future__ import annotations

import re
import subprocess

from infra.orchestration import airflow_env, components_env
from infra.settings import load_settings
from tests.conftest import REPO

#: What a credential committed by mistake looks like.
CREDENTIALS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "password in a URL": re.compile(r"[a-z+]+://[^/\s:@'\"]+:[^/\s@'\"{}$*]+@"),  # *** masks one
    "password setting": re.compile(r"(?i)\b(password|passwd|secret_key)\b\s*[:=]\s*['\"]?[^\s'\"{}$]{4,}"),
}


def test_no_credentials_are_committed():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in tracked:
        path = REPO / name
        if name.endswith((".lock", ".gz", ".parquet", ".png")) or name.startswith("bench/results/"):
            continue
        if name == "tests/unit/test_closed_by_default.py":  # its samples
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for what, pattern in CREDENTIALS.items():
            found += [f"{name}: {what}: {m.group(0)[:40]}" for m in pattern.finditer(text)]
    assert not found, found


def test_the_patterns_find_what_they_look_for():
    samples = {
        "private key": "-----BEGIN RSA PRIVATE KEY-----",
        "AWS access key id": "key = AKIAABCDEFGHIJKLMNOP",
        "password in a URL": "postgresql://airflow:hunter22@db:5432/airflow",
        "password setting": "password: hunter22",
    }
    for what, text in samples.items():
        assert CREDENTIALS[what].search(text), what
    # Placeholders read from the environment are not credentials.
    assert not CREDENTIALS["password setting"].search("password: ${AIRFLOW_DB_PASSWORD}")
    assert not CREDENTIALS["password in a URL"].search("postgresql://airflow:${PASSWORD}@db/airflow")
    assert not CREDENTIALS["password in a URL"].search("postgresql://mlflow:***@db/mlflow")


def test_airflow_and_spark_are_pointed_at_the_loopback_interface(tmp_path):
    settings = load_settings(None, environ={}, overrides={"paths": {"warehouse_root": str(tmp_path)}})
    env = airflow_env(settings)
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://127.0.0.1:")
    assert env["SPARK_LOCAL_IP"] == "127.0.0.1"


def test_the_standalone_components_reach_their_own_api_server_with_one_token_secret(tmp_path, monkeypatch):
    """What an earlier `dags-test` in the same process (or another Airflow) left in the environment
    does not send the tasks to another port; scheduler and API server get the same JWT secret."""
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "http://127.0.0.1:8080/execution/")
    overrides = {"paths": {"warehouse_root": str(tmp_path)}, "airflow": {"api_port": 18081}}
    settings = load_settings(None, environ={}, overrides=overrides)
    env = components_env(settings, airflow_env(settings))
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18081/execution/"
    assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 32
    assert components_env(settings, airflow_env(settings)) != env  # a fresh secret per start
    given = {**airflow_env(settings), "AIRFLOW__API_AUTH__JWT_SECRET": "from-the-deployment"}
    assert components_env(settings, given)["AIRFLOW__API_AUTH__JWT_SECRET"] == "from-the-deployment"
