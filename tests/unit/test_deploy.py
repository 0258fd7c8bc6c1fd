"""The deployable description (infra/deploy/) agrees with the settings it ships: every name, host,
port, database, bucket, pool and queue the funnelrec settings point at is one compose.yaml starts.
The files are parsed and cross-checked here; nothing is started (infra/deploy/README.md)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import yaml

from infra.settings import load_settings
from tests.conftest import REPO

DEPLOY = REPO / "infra" / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def settings():
    return load_settings(DEPLOY / "funnelrec.yaml", environ={})


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def _funnelrec_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith("funnelrec")}


def test_every_published_port_is_on_the_loopback_interface(compose):
    published = [(n, p) for n, s in compose["services"].items() for p in s.get("ports", [])]
    assert published, "the UIs are published"
    assert all(str(p).startswith("127.0.0.1:") for _, p in published), published


def test_spark_master_and_workers_are_the_cluster_the_settings_name(compose, settings):
    url = urlsplit(settings.spark.master)
    assert url.scheme == "spark"
    master = compose["services"][url.hostname]
    assert master["command"][:2] == ["spark-class", "org.apache.spark.deploy.master.Master"]
    assert (_flag(master["command"], "--host"), int(_flag(master["command"], "--port"))) == (
        url.hostname,
        url.port,
    )
    workers = [
        s
        for s in compose["services"].values()
        if "org.apache.spark.deploy.worker.Worker" in s.get("command", [])
    ]
    assert len(workers) >= 2 and all(settings.spark.master in w["command"] for w in workers)
    # The drivers run in the Airflow workers: each names itself so the executors can connect back.
    for name in ("airflow-worker", "airflow-worker-gpu"):
        s = compose["services"][name]
        assert _env(s)["SPARK_LOCAL_HOSTNAME"] == s["hostname"] == name


def test_mlflow_server_postgres_and_bucket_are_those_the_settings_and_init_scripts_name(compose, settings):
    url = urlsplit(settings.mlflow.tracking_uri)
    mlflow = compose["services"][url.hostname]
    cmd = mlflow["command"]
    assert cmd[:2] == ["mlflow", "server"] and int(_flag(cmd, "--port")) == url.port
    assert f"{url.hostname}:{url.port}" in _flag(cmd, "--allowed-hosts").split(",")
    store = urlsplit(_flag(cmd, "--backend-store-uri").replace("${MLFLOW_DB_PASSWORD:?set it in .env}", "x"))
    init = (DEPLOY / "postgres-init.sh").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", init))
    assert store.hostname == "postgres" and "postgres" in compose["services"]
    assert (store.path.lstrip("/"), store.username) in created
    bucket = urlsplit(_flag(cmd, "--artifacts-destination")).hostname
    assert f"local/{bucket}" in " ".join(compose["services"]["minio-init"]["entrypoint"])
    assert _env(mlflow)["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_airflow_runs_on_postgres_and_celery_with_the_pools_and_queues_of_the_settings(compose, settings):
    services = _funnelrec_services(compose)
    airflow = {n: s for n, s in services.items() if n.startswith("airflow-")}
    assert {"airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"} <= set(
        airflow
    )
    init = (DEPLOY / "postgres-init.sh").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", init))
    for name, s in airflow.items():
        # Through `funnelrec airflow`: the home, the DAGs and the pools come from the settings.
        assert s["command"][:2] == ["funnelrec", "airflow"], name
        env = _env(s)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        db = urlsplit(
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("${AIRFLOW_DB_PASSWORD:?set it in .env}", "x")
        )
        assert db.hostname == "postgres" and (db.path.lstrip("/"), db.username) in created, name
        assert urlsplit(env["AIRFLOW__CELERY__BROKER_URL"]).hostname in compose["services"], name
        api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert api.hostname in airflow and api.port == int(env["AIRFLOW__API__PORT"]), name
    queues = {
        n: _flag(s["command"], "--queues").split(",")
        for n, s in airflow.items()
        if s["command"][2:4] == ["celery", "worker"]
    }
    assert settings.airflow.gpu_queue and queues["airflow-worker-gpu"] == [settings.airflow.gpu_queue]
    assert all(settings.airflow.gpu_queue not in q for n, q in queues.items() if n != "airflow-worker-gpu")
    gpu = airflow["airflow-worker-gpu"]
    assert int(_flag(gpu["command"], "--concurrency")) == settings.airflow.gpu_pool_slots
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["GPU"] == "1"


def test_every_funnelrec_container_shares_the_warehouse_and_reads_these_settings(compose, settings):
    wh = str(settings.paths.warehouse_root)
    assert str(settings.airflow.home).startswith(wh + "/") and str(settings.paths.quarantine_root).startswith(
        wh
    )
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "COPY . /app" in docker and "FUNNELREC_CONFIG=/app/infra/deploy/funnelrec.yaml" in docker
    for name, s in _funnelrec_services(compose).items():
        parts = [str(v).rsplit(":", 2) for v in s["volumes"]]
        mounts = {p[-2] if p[-1] in ("ro", "rw") else p[-1] for p in parts}
        assert {wh, str(settings.paths.data_root)} <= mounts, name
        if "environment" in s and name != "mlflow":
            assert _env(s)["FUNNELREC_CONFIG"] == "/app/infra/deploy/funnelrec.yaml", name


def test_the_image_is_built_from_the_locks_and_the_deploy_lock_agrees_with_the_main_one():
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "openjdk-17-jre-headless" in docker and "make setup" in docker
    assert "-r infra/deploy/requirements.lock" in docker

    def pins(path) -> dict[str, str]:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        found = dict(ln.split("==", 1) for ln in lines if ln and not ln.startswith("#") and "==" in ln)
        assert all(not ln or ln.startswith("#") or "==" in ln for ln in lines), path
        return {k.lower(): v for k, v in found.items()}

    main, deploy = pins(REPO / "requirements.lock"), pins(DEPLOY / "requirements.lock")
    wanted = [
        ln for ln in (DEPLOY / "requirements.in").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    assert all(name.lower() in deploy for name in wanted)
    assert {k: v for k, v in deploy.items() if k in main and main[k] != v} == {}


def test_every_secret_comes_from_the_environment_file_and_the_example_holds_no_real_one():
    example = dict(
        ln.split("=", 1)
        for ln in (DEPLOY / ".env.example").read_text().splitlines()
        if ln and not ln.startswith("#")
    )
    used = set()
    for name in ("compose.yaml", "postgres-init.sh"):
        text = (DEPLOY / name).read_text().replace("$$", "")
        used |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text))
    assert used - {"POSTGRES_USER"} <= set(example), used - set(example)
    secrets = [k for k in example if k.endswith(("PASSWORD", "KEY", "SECRET"))]
    assert secrets and all(example[k] == "change-me" for k in secrets)
    assert "infra/deploy/.env" in (REPO / ".gitignore").read_text().split()
