"""Coupling shards on a Dask cluster: the :class:`tasks.couple.ShardExecutor` the CLI hands couple.

``couple.workers`` > 1 or a scheduler address (``couple.dask_address``, or ``RECTFLOW_DASK_ADDRESS``,
which wins) makes ``rectflow stage couple`` (and reflow's later rounds) build a :class:`DaskShards`
and pass it to the stage:

* no address: a local cluster of ``couple.workers`` processes with one thread each, started for the
  round and closed after it (dashboard on a free port, never a fixed one);
* an address (``tcp://HOST:8786``): that running cluster, whatever its size.

It submits one task per shard still to make, each the stage's own picklable
:class:`tasks.couple.ShardJob` (params, paths, hashes: a worker loads the model and the source from
the shared workspace itself), and yields each ``(index, manifest entry)`` as it completes. Plain
``dask.distributed``: no Prefect server, nothing left running after the round.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from rectflow.config import CoupleParams, ParamsError
from tasks.couple import ShardJob, dask_address

__all__ = ["LAST_TIMINGS", "DaskShards"]

# Start-up and run times of the last map() in this process, in seconds, for the log and the
# benchmarks: cluster (started or connected), first_shard, last_shard, total (closed included).
LAST_TIMINGS: dict[str, float] = {}


class DaskShards:
    """A :class:`tasks.couple.ShardExecutor` on a local Dask cluster or a running one."""

    def __init__(self, couple: CoupleParams, connect_timeout_s: float = 30.0) -> None:
        self.address = dask_address(couple)
        self.workers = couple.workers
        self.connect_timeout_s = connect_timeout_s

    def describe(self, c: CoupleParams) -> str:
        if self.address:
            return f"the Dask cluster at {self.address}"
        return f"a local Dask cluster of {self.workers} workers"

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        from distributed import Client, LocalCluster

        if self.address:
            try:
                client = Client(self.address, timeout=self.connect_timeout_s)
            except (OSError, TimeoutError) as e:
                raise ParamsError(f"couple.dask_address (or RECTFLOW_DASK_ADDRESS): cannot reach the Dask "
                                  f"scheduler at {self.address} ({' '.join(str(e).split())[:200]})") from None
            with client:
                yield client
            return
        with LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=40) as cluster, Client(cluster) as client:
            yield client

    def map(self, job: ShardJob, todo: list[int], rows: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        from distributed import as_completed

        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        with self._client() as client:
            timings["cluster"] = time.perf_counter() - t0
            futures = [client.submit(job, i, rows[i], key=f"rectflow-shard-{job.round_k}-{i}-{job.model_sha[:8]}",
                                     pure=False, retries=0) for i in todo]
            try:
                for fut in as_completed(futures):
                    index, entry = fut.result()
                    timings.setdefault("first_shard", time.perf_counter() - t0)
                    yield index, entry
            finally:
                for fut in futures:
                    fut.cancel()
            timings["last_shard"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t0
        LAST_TIMINGS.clear()
        LAST_TIMINGS.update({k: round(v, 3) for k, v in timings.items()})
        print("[couple] Dask timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in LAST_TIMINGS.items()),
              file=sys.stderr, flush=True)
