"""Stage 3, couple: pairs (Z0, Z1 = ODE_k(Z0)) of the current flow, streamed to Parquet shards.

Round K uses ``models/rfK``. Z0 of shard i is drawn from π0 with its own seed (seed, round, i), so
shards do not depend on how many workers made them or in which order. The ODE is solved in batches
of ``couple.batch_size`` under ``torch.inference_mode`` (optionally bf16 autocast), by default with
adaptive RK45 at rtol = atol = 1e-5; writing shard i overlaps solving shard i + 1.

Work in progress lives in ``.rectflow/staging/couplings/round-K/`` with a running manifest: a rerun
after a crash keeps every finished shard whose sha256 checks out and makes only the missing or
invalid ones. The finished round is moved to ``data/couplings/round-K/`` in one rename.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rectflow.config import Params
from rectflow.data import Distribution, load_prepared
from rectflow.io import atomic_write_json, file_sha256, read_json
from rectflow.layout import Layout
from rectflow.pairs import MANIFEST, read_manifest, shard_name, write_shard
from rectflow.solvers import solve
from rectflow.train import fingerprint
from tasks._common import device, model_sha, teacher


def shard_seed(seed: int, round_k: int, index: int) -> int:
    """The seed of shard ``index`` of round ``round_k``: independent of worker count and order."""
    h = hashlib.sha256(f"rectflow-couple:{seed}:{round_k}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def shard_rows(n_pairs: int, shard_size: int) -> list[int]:
    full, rest = divmod(n_pairs, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


@torch.inference_mode()
def solve_pairs(model: nn.Module, z0: torch.Tensor, p: Params, dev: torch.device) -> tuple[torch.Tensor, int]:
    """Z1 = ODE(Z0) for ``z0`` ``(n, *shape)`` in batches; returns (z1 on CPU, NFE summed over batches)."""
    c = p.couple
    out, nfe = [], 0
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=c.precision == "bf16")
    for b in range(0, len(z0), c.batch_size):
        zb = z0[b : b + c.batch_size].to(dev, non_blocking=True)
        with autocast:
            sol = solve(model, zb, c.solver, c.steps, rtol=c.rtol, atol=c.atol)
        out.append(sol.x.float().cpu())
        nfe += sol.nfe
    return torch.cat(out), nfe


def sample_source(source: Distribution, n: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return source.sample(n, torch.Generator().manual_seed(seed)).reshape(n, *shape)


def generate_shard(
    p: Params, model: nn.Module, source: Distribution, shape: tuple[int, ...], round_k: int, index: int,
    rows: int, dev: torch.device,
) -> tuple[np.ndarray, np.ndarray, int]:
    z0 = sample_source(source, rows, shard_seed(p.seed, round_k, index), shape)
    z1, nfe = solve_pairs(model, z0, p, dev)
    return z0.numpy(), z1.numpy(), nfe


def _entry_valid(staging: Path, entry: dict[str, Any] | None) -> bool:
    if not entry:
        return False
    path = staging / entry["name"]
    return path.is_file() and file_sha256(path) == entry["sha256"]


def run_round(p: Params, layout: Layout, round_k: int) -> dict:
    """Make (or finish) coupling round ``round_k`` from ``models/rf{round_k}``."""
    dev = device()
    name = f"rf{round_k}"
    model, card = teacher(layout, name, dev)
    source = load_prepared(layout.prepared, "source", "train")
    shape = tuple(card["arch"]["shape"])
    c = p.couple
    fp = fingerprint(model_sha(layout, name), c.model_dump(mode="json", exclude={"workers"}), p.seed, round_k,
                     p.data.model_dump(mode="json"))
    final, staging = layout.round_dir(round_k), layout.staging(f"couplings/round-{round_k}")
    if (final / MANIFEST).is_file():
        done = read_json(final / MANIFEST)
        if done.get("fingerprint") == fp and done.get("complete"):
            if all(_entry_valid(final, e) for e in done["shards"]):
                return _record(done, reused=len(done["shards"]), made_rows=0, seconds=0.0)
    man: dict[str, Any] = {}
    if (staging / MANIFEST).is_file():
        man = read_json(staging / MANIFEST)
    if man.get("fingerprint") != fp:
        shutil.rmtree(staging, ignore_errors=True)
        man = {}
    staging.mkdir(parents=True, exist_ok=True)
    rows = shard_rows(c.n_pairs, c.shard_size)
    previous = {e["name"]: e for e in man.get("shards", [])}
    man = {
        "format": 1, "round": round_k, "shape": list(shape), "dim": int(np.prod(shape)),
        "n_pairs": c.n_pairs, "shard_size": c.shard_size, "seed": p.seed,
        "model": {"name": name, "sha256": model_sha(layout, name)},
        "solver": {"name": c.solver, "steps": c.steps if c.solver != "rk45" else None,
                   "rtol": c.rtol if c.solver == "rk45" else None, "atol": c.atol if c.solver == "rk45" else None,
                   "precision": c.precision},
        "source": p.data.source, "fingerprint": fp, "complete": False, "shards": [None] * len(rows),
    }
    todo = []
    for i in range(len(rows)):
        old = previous.get(shard_name(i))
        if _entry_valid(staging, old):
            man["shards"][i] = old
        else:
            todo.append(i)
    reused = len(rows) - len(todo)
    if reused:
        print(f"[couple] round {round_k}: resuming, {reused} finished shard(s) verified and kept", file=sys.stderr)
    t0 = time.perf_counter()
    if c.workers > 1 and todo:
        from tasks.couple_dask import generate_on_dask  # optional: needs dask

        for i, entry in generate_on_dask(p, layout, round_k, todo, rows, staging):
            man["shards"][i] = entry
            atomic_write_json(staging / MANIFEST, man)
    else:
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future | None = None
            pending_i = -1
            for i in todo:
                z0, z1, nfe = generate_shard(p, model, source, shape, round_k, i, rows[i], dev)
                if pending is not None:
                    man["shards"][pending_i] = pending.result()
                    atomic_write_json(staging / MANIFEST, man)
                pending, pending_i = writer.submit(_write, staging, i, z0, z1, nfe), i
                print(f"[couple] round {round_k}: shard {i + 1}/{len(rows)} solved (NFE {nfe})", file=sys.stderr, flush=True)
            if pending is not None:
                man["shards"][pending_i] = pending.result()
    seconds = time.perf_counter() - t0
    man["complete"] = True
    atomic_write_json(staging / MANIFEST, man)
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    return _record(man, reused=reused, made_rows=sum(rows[i] for i in todo), seconds=seconds)


def _write(staging: Path, i: int, z0: np.ndarray, z1: np.ndarray, nfe: int) -> dict[str, Any]:
    entry = write_shard(staging, i, z0, z1)
    d = z1.reshape(len(z1), -1).astype(np.float64) - z0.reshape(len(z0), -1)
    return entry | {"nfe": int(nfe), "cost_sum": float((d * d).sum())}


def _record(man: dict[str, Any], reused: int, made_rows: int, seconds: float) -> dict:
    n = sum(e["rows"] for e in man["shards"])
    return {
        "round": man["round"], "model": man["model"], "n_pairs": n, "shards": len(man["shards"]),
        "shards_made": len(man["shards"]) - reused, "shards_reused": reused, "solver": man["solver"],
        "nfe_total": int(sum(e["nfe"] for e in man["shards"])),
        "transport_cost": sum(e["cost_sum"] for e in man["shards"]) / n,
        "seconds": round(seconds, 3), "pairs_per_s": round(made_rows / seconds, 1) if seconds > 0 else None,
        "sha256": {e["name"]: e["sha256"] for e in man["shards"]},
    }


def run(p: Params, layout: Layout) -> dict:
    return run_round(p, layout, 1)
