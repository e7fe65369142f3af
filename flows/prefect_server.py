"""The run's own temporary Prefect server, started early and never outliving the run.

Without ``PREFECT_API_URL``, ``rectflow run`` needs a Prefect API for the length of one run. Prefect's
own ephemeral server is a uvicorn subprocess that a ``kill -9`` of the run leaves behind (parent 1,
about 230 MB, indefinitely). :func:`prestart` instead starts the same server app
(``prefect.server.api.server:create_app`` under uvicorn, UI off, on a free loopback port) under
:mod:`rectflow.guard`, which ends it when the run is gone however the run ended, and points
``PREFECT_API_URL`` of this process at it. It starts as soon as ``rectflow run`` has validated its
params, so the server boots (3–5 s on a 2-core CPU) while the run imports what it needs; join the
returned thread before the flow runs. At exit the server is stopped (SIGTERM to the guard, which
passes it on). This module imports nothing heavy itself.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time

__all__ = ["prestart"]

STARTUP_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prestart() -> threading.Thread | None:
    """Start the run's temporary Prefect server; return a thread that waits until it answers.

    None (nothing started) when a server is configured (``PREFECT_API_URL``) or the ephemeral server
    is disabled (``PREFECT_SERVER_ALLOW_EPHEMERAL_MODE``/``PREFECT_SERVER_EPHEMERAL_ENABLED`` false):
    then Prefect's own settings decide. The process is started here, in the calling thread; if it
    does not answer in time, the thread prints one warning and the flow's first API call fails with
    Prefect's own error.
    """
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return None
        import prefect
    except Exception:  # noqa: BLE001 - the flow reports a broken Prefect installation itself
        return None
    from rectflow.guard import guarded

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    # no telemetry: nothing may reach the internet (it would print "Failed to send telemetry" offline)
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(guarded(cmd), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    os.environ["PREFECT_API_URL"] = url  # this process's Prefect client (every thread) and its children
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # the root settings were read from the environment at import

    def stop() -> None:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()

    atexit.register(stop)

    def wait() -> None:
        import urllib.request

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        print(f"rectflow: warning: the temporary Prefect server on {url} did not start "
              f"(status {server.poll()})", file=sys.stderr, flush=True)

    thread = threading.Thread(target=wait, name="rectflow-prefect-server", daemon=True)
    thread.start()
    return thread
