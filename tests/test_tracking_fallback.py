"""An MLflow server that does not answer: fall back to local sqlite and say so, or stop — never hang."""

from __future__ import annotations

import time

import pytest

from flows.tracking import LOCAL_URI, TrackingUnavailable, resolve_uri
from rectflow.config import validate
from tests.workspace import free_port


def params(mode: str, port: int):
    return validate({"tracking": {"mlflow_uri": f"http://127.0.0.1:{port}", "on_unreachable": mode}})


def test_unreachable_server_falls_back_and_says_where(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = free_port()  # nothing listens there
    t0 = time.perf_counter()
    uri, warning = resolve_uri(params("fallback", port))
    assert time.perf_counter() - t0 < 10
    assert uri == LOCAL_URI and f"127.0.0.1:{port}" in warning and LOCAL_URI in warning


def test_unreachable_server_stops_with_a_clear_error(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = free_port()
    with pytest.raises(TrackingUnavailable, match=f"tracking.mlflow_uri: MLflow server http://127.0.0.1:{port} does not answer"):
        resolve_uri(params("fail", port))


def test_sqlite_store_needs_no_probe(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(validate({}))== (LOCAL_URI, None)
