"""Prefect's temporary server, started early.

Without ``PREFECT_API_URL``, Prefect starts a temporary local server (a uvicorn subprocess) at a
flow's first API call and waits for it: 3–5 s on a 2-core CPU, plus ~2.5 s to import the server
module. :func:`prestart` begins that on a helper thread as soon as ``rectflow run`` has validated
its parameters, so the wait overlaps with the imports the run needs anyway (torch, DVC, MLflow,
the stages). The flow's client later finds the same server already up: Prefect keeps one
``SubprocessASGIServer`` per process and ``start()`` is idempotent. This module imports nothing
heavy itself.
"""

from __future__ import annotations

import threading

__all__ = ["prestart"]


def prestart() -> threading.Thread | None:
    """Start Prefect's temporary server on a daemon thread; None (nothing started) when a server
    is configured with ``PREFECT_API_URL`` or the ephemeral server is disabled. Join the thread
    before the flow runs; an error is left for the flow's own start-up to raise and report.

    The server module is imported here, in the calling thread (under the GIL a thread would not
    import it any sooner), so that the thread's first act is to launch the server process, which
    then boots on another core while this process imports the rest.
    """
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return None
        from prefect.server.api.server import SubprocessASGIServer
    except Exception:  # noqa: BLE001 - the flow reports a broken Prefect installation itself
        return None

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow starts the server itself and reports why not
            pass

    thread = threading.Thread(target=start, name="rectflow-prefect-server", daemon=True)
    thread.start()
    return thread
