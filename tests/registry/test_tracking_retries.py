"""``tracking.call``: which failures are retried, which mean the store is unavailable, and how often."""

from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from tests.conftest import settings_under
from training import tracking


@pytest.fixture
def settings(tmp_path):
    return settings_under(tmp_path, {"mlflow": {"max_retries": 2, "backoff_seconds": 0}})


class Flaky:
    """Raises each of ``errors`` in turn, then returns ``"ok"``; counts the calls."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def busy() -> MlflowException:
    """What MLflow's SQL store raises for a database that stays locked (an OperationalError)."""
    return MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)


def test_a_busy_store_is_retried_and_each_retry_logged(settings, capsys):
    from infra.logs import configure

    configure("INFO", "logfmt")
    fn = Flaky(busy(), busy())
    assert tracking.call(settings, "read alias champion", fn) == "ok"
    assert fn.calls == 3
    retries = [line for line in capsys.readouterr().err.splitlines() if "event=mlflow_retry" in line]
    assert len(retries) == 2
    assert 'request="read alias champion" attempt=1' in retries[0]
    assert "error=MlflowException error_code=TEMPORARILY_UNAVAILABLE" in retries[0]


def test_a_store_busy_past_the_retries_is_unavailable(settings):
    fn = Flaky(busy(), busy(), busy(), busy())
    with pytest.raises(tracking.RegistryUnavailable, match=r"unreachable \(take lease\) after 2 retries"):
        tracking.call(settings, "take lease", fn)
    assert fn.calls == 3  # max_retries + 1


def test_a_connection_failure_is_unavailable_at_once_mlflows_http_layer_retried_it(settings):
    def refused():
        try:
            raise requests.exceptions.ConnectionError("Max retries exceeded: [Errno 111]")
        except requests.exceptions.ConnectionError as exc:
            # as MLflow's http_request raises it: no ``from``, the cause is only the context
            raise MlflowException(f"API request failed with exception {exc}")  # noqa: B904

    fn = Flaky(*[_raised(refused)] * 3)
    with pytest.raises(tracking.RegistryUnavailable, match="after 2 retries"):
        tracking.call(settings, "read model", fn)
    assert fn.calls == 1


def test_other_errors_are_raised_as_they_are_without_a_retry(settings):
    missing = MlflowException("no model funnelrec", error_code=RESOURCE_DOES_NOT_EXIST)
    fn = Flaky(missing)
    with pytest.raises(MlflowException) as raised:
        tracking.call(settings, "read model", fn)
    assert raised.value is missing and fn.calls == 1
    # Text that looks like a connection failure is not one.
    fn = Flaky(MlflowException("Connection refused by policy: failed with exception"))
    with pytest.raises(MlflowException):
        tracking.call(settings, "read model", fn)
    assert fn.calls == 1


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")
