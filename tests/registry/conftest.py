"""Registry fixtures: a real MLflow store (SQLite file, or an `mlflow server` on a free loopback
port), and a training bundle of in-memory data published by ``training.data.write_training_bundle``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from infra.settings import DEFAULT_PROMOTION_POLICY
from tests.conftest import settings_under
from tests.training.conftest import tiny_data
from training.data import tables_of, write_training_bundle

DS = "2026-01-05"


def write_bundle(data, warehouse: Path, ds: str = DS) -> Path:
    """Publish in-memory ``TrainingData`` as ``training/ds=<ds>``, as the code that owns bundles does."""
    return write_training_bundle(warehouse, ds, tables_of(data), protocol="fixture", sources=["tiny"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port, SQLite behind it; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below, after the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path):
    """Settings whose MLflow store is either the embedded SQLite file or the test server."""
    overrides: dict = {"mlflow": {"max_retries": 2, "backoff_seconds": 0, "lock_timeout_seconds": 30}}
    if request.param == "server":
        uri = request.getfixturevalue("mlflow_server")
        # One server for the session: a fresh registered model per test keeps them apart.
        overrides["mlflow"].update(tracking_uri=uri, registered_model=f"funnelrec_{request.node.name}"[:200])
        overrides["mlflow"]["registered_model"] = (
            overrides["mlflow"]["registered_model"].replace("[", "_").rstrip("]")
        )
        overrides["mlflow"]["experiment"] = overrides["mlflow"]["registered_model"]
    return settings_under(tmp_path, overrides)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A real training run of `als_multi` and `popularity` on the tiny bundle, tracked in SQLite."""
    from training.train_evaluate import run_evaluate, run_train

    base = tmp_path_factory.mktemp("trained")
    policy = yaml.safe_load(DEFAULT_PROMOTION_POLICY.read_text())
    policy["min_users"] = 10  # the tiny bundle has 27 validation users
    (base / "promotion.yaml").write_text(yaml.safe_dump(policy))
    settings = settings_under(
        base, {"training": {"max_epochs": 3}, "mlflow": {"promotion_policy": str(base / "promotion.yaml")}}
    )
    write_bundle(tiny_data(), settings.paths.warehouse_root)
    for name in ("popularity", "als_multi"):
        run_train(settings, DS, name)
        run_evaluate(settings, DS, name)
    return settings


def copy_models(src_settings, dst_settings) -> None:
    """Copy the trained models and their bundle into another warehouse (a different store)."""
    src, dst = src_settings.paths.warehouse_root, dst_settings.paths.warehouse_root
    for sub in ("training", "models"):
        shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)


class GoneAway:
    """A loopback HTTP proxy in front of the test's `mlflow server` that goes away on cue.

    Armed with ``fail_at=n``, at the n-th write request (POST, PATCH, PUT, DELETE) it stops
    answering: that connection and every later one is closed without a response, as a server that
    died would, until ``restore()``. With ``applied=True`` the n-th write first reaches the server,
    so the change is made and only its answer is lost. ``writes`` lists each write it saw, as
    ``METHOD path key`` (``key`` for tag writes)."""

    def __init__(self, upstream: str):
        import http.server
        import threading
        from urllib.parse import urlsplit

        self.upstream = urlsplit(upstream)
        self.lock = threading.Lock()
        self.writes: list[str] = []
        self.fail_at: int | None = None
        self.applied = False
        self.down = False
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else None
                write = self.command in ("POST", "PATCH", "PUT", "DELETE")
                with proxy.lock:
                    if proxy.down:
                        self.close_connection = True
                        return
                    failing = False
                    if write:
                        key = ""
                        if body and b'"key"' in body:
                            import json

                            key = " " + str(json.loads(body).get("key", ""))
                        proxy.writes.append(f"{self.command} {self.path.split('?')[0]}{key}")
                        failing = proxy.fail_at == len(proxy.writes)
                    if failing:
                        proxy.down = True
                if failing:
                    if proxy.applied:
                        proxy._forward(self.command, self.path, body, self.headers)
                    self.close_connection = True
                    return
                status, headers, payload = proxy._forward(self.command, self.path, body, self.headers)
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in (
                        "transfer-encoding",
                        "connection",
                        "content-length",
                        "server",
                        "date",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _forward(self, method: str, path: str, body: bytes | None, headers) -> tuple[int, list, bytes]:
        import http.client

        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
            conn.request(method, path, body=body, headers=sent)
            r = conn.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            conn.close()

    def arm(self, fail_at: int | None, applied: bool = False) -> None:
        with self.lock:
            self.writes, self.fail_at, self.applied, self.down = [], fail_at, applied, False

    def restore(self) -> None:
        with self.lock:
            self.down, self.fail_at = False, None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gone_away(mlflow_server):
    proxy = GoneAway(mlflow_server)
    yield proxy
    proxy.close()
