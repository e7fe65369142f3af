"""Coupling shards on a Dask cluster, as a Prefect flow on ``prefect_dask.DaskTaskRunner``.

:func:`tasks.couple.run_round` calls :func:`generate_on_dask` when ``couple.workers > 1`` or a
cluster address is set (``couple.dask_address``, or ``RECTFLOW_DASK_ADDRESS``, which wins):

* no address: a local cluster of ``couple.workers`` processes with one thread each, started for
  this round and closed after it;
* an address (``tcp://HOST:8786``): that running cluster, whatever its size.

The flow maps one task over the shard indices still to make. Each task gets only small arguments
(params, paths, its index and row count), loads ``models/rfK`` (with ``couple.schedule: bellman``
also ``models/rfK.schedule.json``) and the prepared source from the workspace itself (once per
worker process, kept for its next shards), makes its shard with
:func:`tasks.couple.generate_shard` and writes it with :func:`tasks.couple._write`, the very code
of the one-worker path, so shard i is byte-identical whichever worker made it: its noise comes
from its own seed (seed, round, i). The task uploads its shard when storage is S3 and returns
only the manifest entry (a small dict); the calling process records entries in the manifest as
tasks finish. A worker holds one shard (``couple.shard_size`` pairs) at a time, plus the network
and, for a data-set source, that data set; never the whole coupling.

Workers must see the workspace at the same path (a shared filesystem on a remote cluster) and, for
S3, have credentials in their own environment. Without ``PREFECT_API_URL`` Prefect runs on a
temporary local server started here once per process, which the local cluster's workers are
pointed at; a remote cluster needs a Prefect server it can reach (``PREFECT_API_URL``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from rectflow.config import Params
from rectflow.layout import Layout

__all__ = ["ENV_ADDRESS", "LAST_TIMINGS", "dask_address", "generate_on_dask", "task_runner"]

ENV_ADDRESS = "RECTFLOW_DASK_ADDRESS"

# Start-up and run times of the last generate_on_dask call in this process, in seconds, for the
# log and the benchmarks: prefect_api (the temporary server's start; 0 with PREFECT_API_URL), then
# from the flow call: flow_body (the flow run created), first_task_start (the cluster started
# lazily, a worker imported everything and picked up a task), first_shard, last_shard, total, and
# teardown (last shard until the flow returns: the cluster closed).
LAST_TIMINGS: dict[str, float] = {}


def dask_address(p: Params) -> str | None:
    """The Dask scheduler to use: ``RECTFLOW_DASK_ADDRESS``, else ``couple.dask_address``, else None."""
    return os.environ.get(ENV_ADDRESS, "").strip() or p.couple.dask_address or None


def task_runner(p: Params) -> DaskTaskRunner:
    """The runner: the cluster at :func:`dask_address`, else a local cluster of ``couple.workers``
    single-threaded worker processes (dashboard on a free port, never a fixed one)."""
    address = dask_address(p)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": p.couple.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0",
    })


# ---- in the worker -------------------------------------------------------------------------------

_WORKER_CACHE: dict[tuple[str, int, str, str | None], tuple[Any, Any, tuple[int, ...], Any, Any]] = {}


def _worker_inputs(
    p: Params, root: str, round_k: int, model_sha: str, schedule_sha: str | None,
) -> tuple[Any, Any, tuple[int, ...], Any, Any]:
    """(model, source, shape, device, times) of this round, loaded once per worker process.

    ``times``: the round's BOSS grid, read from ``models/rfK.schedule.json`` in the shared workspace
    when ``couple.schedule`` is ``bellman`` (checked against the sha256 ``schedule_sha`` the calling
    process saw), else None.
    """
    key = (root, round_k, model_sha, schedule_sha)
    if key not in _WORKER_CACHE:
        from rectflow.data import load_prepared
        from rectflow.nets import ModelError
        from tasks._common import device, teacher
        from tasks.couple import round_times

        layout = Layout(Path(root))
        dev = device()
        model, card = teacher(layout, f"rf{round_k}", dev)  # verifies the weights against the card
        if card["meta"].get("sha256") != model_sha:
            raise ModelError(f"{layout.model(f'rf{round_k}')}: this worker sees other weights than the "
                             "process that started the round (is the workspace shared at the same path?)")
        times = None
        if schedule_sha is not None:
            from rectflow.io import file_sha256
            from rectflow.schedule import schedule_path

            sched = schedule_path(layout.model(f"rf{round_k}"))
            if not sched.is_file() or file_sha256(sched) != schedule_sha:
                raise ModelError(f"{sched}: this worker sees another step schedule than the process that "
                                 "started the round (is the workspace shared at the same path?)")
            times = round_times(p, layout, round_k)
        source = load_prepared(layout.prepared, "source", "train")
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = (model, source, tuple(card["arch"]["shape"]), dev, times)
    return _WORKER_CACHE[key]


@task(name="couple-shard", cache_policy=NO_CACHE, persist_result=False, retries=0)
def make_shard(
    p: Params, root: str, round_k: int, index: int, rows: int, staging: str, model_sha: str, remote: Any,
    schedule_sha: str | None = None,
) -> tuple[int, dict[str, Any], float]:
    """Make, write (and upload) shard ``index``; return ``(index, manifest entry, start time)``."""
    started = time.time()
    import torch

    from tasks.couple import _write, generate_shard

    torch.set_num_threads(1)  # one thread per worker process: the cluster is the parallelism
    model, source, shape, dev, times = _worker_inputs(p, root, round_k, model_sha, schedule_sha)
    z0, z1, nfe = generate_shard(p, model, source, shape, round_k, index, rows, dev, times)
    entry = _write(Path(staging), index, z0, z1, nfe, lambda i, e: None, remote)
    return index, entry, started


# ---- in the calling process ----------------------------------------------------------------------


@contextlib.contextmanager
def _prefect_api() -> Iterator[float]:
    """A Prefect API for this flow: ``PREFECT_API_URL`` if set, else Prefect's temporary local
    server, started once per process and exported to the local cluster's workers (spawned
    afterwards, they inherit the variable instead of each starting a server of their own)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield 0.0
        return
    from prefect.server.api.server import SubprocessASGIServer

    t0 = time.perf_counter()
    server = SubprocessASGIServer()  # the same instance Prefect's own clients use in this process
    server.start()
    seconds = time.perf_counter() - t0
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield seconds
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


@dataclass
class _Run:
    """What one round's flow needs that is not a flow parameter (kept out of the flow run context,
    which Prefect ships to every worker: a queue or a lock cannot travel)."""

    p: Params
    root: str
    round_k: int
    todo: list[int]
    rows: list[int]
    staging: str
    model_sha: str
    remote: Any
    schedule_sha: str | None = None
    out: queue.Queue = field(default_factory=queue.Queue)
    timings: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)


_RUNS: dict[str, _Run] = {}


def _couple_flow(run_id: str, round_k: int) -> None:
    """The flow: map :func:`make_shard` over the shard indices; hand each result over as it lands."""
    from prefect import unmapped
    from prefect.futures import as_completed

    run = _RUNS[run_id]
    run.timings["flow_body"] = time.perf_counter() - run.t0
    t0_wall = time.time() - run.timings["flow_body"]
    first_start = float("inf")
    futures = make_shard.map(
        p=unmapped(run.p), root=unmapped(run.root), round_k=unmapped(round_k), index=list(run.todo),
        rows=[run.rows[i] for i in run.todo], staging=unmapped(run.staging), model_sha=unmapped(run.model_sha),
        remote=unmapped(run.remote), schedule_sha=unmapped(run.schedule_sha),
    )
    for fut in as_completed(futures):
        index, entry, started = fut.result()
        first_start = min(first_start, started)
        run.timings["first_task_start"] = first_start - t0_wall  # wall clocks: one machine, or synced
        run.timings.setdefault("first_shard", time.perf_counter() - run.t0)
        run.out.put(("shard", (index, entry)))
    run.timings["last_shard"] = time.perf_counter() - run.t0


def generate_on_dask(
    p: Params, layout: Layout, round_k: int, todo: list[int], rows: list[int], staging: Path,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Make shards ``todo`` of round ``round_k`` on Dask; yield ``(index, entry)`` as each finishes.

    The shard files are in ``staging`` (and in the store, for S3) when their entry is yielded.
    A failed task fails the round with its own exception (a bad model file: ModelError...).
    The flow runs on a helper thread so that entries reach the caller (its manifest) as they come.
    """
    from rectflow.nets import read_model_card
    from tasks.couple import remote_round

    address = dask_address(p)
    where = f"the Dask cluster at {address}" if address else f"a local Dask cluster of {p.couple.workers} workers"
    if address and not os.environ.get("PREFECT_API_URL"):
        print(f"[couple] note: no PREFECT_API_URL; workers at {address} must reach this machine's temporary "
              "Prefect server on 127.0.0.1 (set PREFECT_API_URL to a shared Prefect server)", file=sys.stderr, flush=True)
    schedule_sha = None
    if p.couple.schedule == "bellman":  # workers read the schedule file themselves; this is its hash
        from rectflow.io import file_sha256
        from rectflow.schedule import schedule_path

        schedule_sha = file_sha256(schedule_path(layout.model(f"rf{round_k}")))
    run = _Run(
        p=p, root=str(Path(layout.root).absolute()), round_k=round_k, todo=list(todo), rows=list(rows),
        staging=str(Path(staging).absolute()), model_sha=read_model_card(layout.model(f"rf{round_k}"))["meta"]["sha256"],
        remote=remote_round(p, layout, round_k, check=False),  # run_round checked access already
        schedule_sha=schedule_sha,
    )
    run_id = uuid.uuid4().hex
    _RUNS[run_id] = run

    def body() -> None:
        try:
            with _prefect_api() as api_seconds:
                run.timings["prefect_api"] = api_seconds
                run.t0 = time.perf_counter()
                couple = flow(name=f"rectflow-couple-round-{round_k}", task_runner=task_runner(p), log_prints=False,
                              persist_result=False)(_couple_flow)
                couple(run_id, round_k)
                run.timings["total"] = time.perf_counter() - run.t0
        except BaseException as e:  # handed over to the caller's thread
            run.out.put(("error", e))
        else:
            run.out.put(("done", None))

    print(f"[couple] round {round_k}: {len(todo)} shard(s) on {where} (Prefect DaskTaskRunner)",
          file=sys.stderr, flush=True)
    thread = threading.Thread(target=body, name="rectflow-couple-dask", daemon=True)
    thread.start()
    done = 0
    try:
        while True:
            kind, value = run.out.get()
            if kind == "error":
                thread.join(timeout=60)
                if address and done == 0 and isinstance(value, OSError) and "connect" in str(value).lower():
                    from rectflow.config import ParamsError  # a bad address: one line, exit status 2

                    raise ParamsError(f"couple.dask_address (or {ENV_ADDRESS}): cannot reach the Dask "
                                      f"scheduler at {address} ({value})") from None
                raise value
            if kind == "done":
                break
            done += 1
            index, entry = value
            print(f"[couple] round {round_k}: shard {index + 1}/{len(rows)} made on Dask (NFE {entry['nfe']}, "
                  f"{done}/{len(todo)})", file=sys.stderr, flush=True)
            yield index, entry
        thread.join()
    finally:
        _RUNS.pop(run_id, None)
    t = run.timings
    t["teardown"] = t["total"] - t.get("last_shard", t["total"])
    LAST_TIMINGS.clear()
    LAST_TIMINGS.update({k: round(v, 3) for k, v in t.items()})
    print(f"[couple] round {round_k}: Dask timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in LAST_TIMINGS.items()),
          file=sys.stderr, flush=True)
