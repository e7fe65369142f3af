"""Stage 3, couple: pairs (Z0, Z1 = ODE_k(Z0)) of the current flow, streamed to Parquet shards.

(About 450 lines on purpose: one round's life, from resume and repair through solving, writing and
publishing to keeping it against a kill, is one crash-safety argument, kept in one file.)

Round K uses ``models/rfK``. Z0 of shard i is drawn from π0 with its own seed (seed, round, i), so
shards do not depend on how many workers made them or in which order. The ODE is solved in batches
of ``couple.batch_size`` under ``torch.inference_mode`` (optionally bf16 autocast), by default with
adaptive RK45 at rtol = atol = 1e-5; writing shard i overlaps solving shard i + 1. A fixed-step
solver takes ``couple.steps`` uniform steps, or with ``couple.schedule: bellman`` rfK's saved BOSS
grid for K = ``couple.steps`` (``models/rfK.schedule.json``; recorded in the manifest).

Work in progress lives in ``.rectflow/staging/couplings/round-K/`` with a running manifest: a rerun
after a crash keeps every finished shard whose sha256 checks out and makes only the missing or
invalid ones. The finished round is moved to ``data/couplings/round-K/`` in one rename.

``couple.source: inversion`` makes 2-RF++'s pairs from real data instead: Z1 is a training row of the
target and Z0 = ODE_{1→0}(Z1), rfK run backwards on the same solver and grid; pair j of the round
takes row ``perm[j mod N]`` of a permutation of the N training rows drawn from the seed, so every
row is used once before any is used twice. ``mixed`` makes the first ``round(inversion_fraction ×
rows)`` pairs of each shard that way and the rest from noise (reflow shuffles rows across shards).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from rectflow.config import CoupleParams, Params
from rectflow.data import Distribution, load_prepared
from rectflow.errors import RunFailedError
from rectflow.io import atomic_write_json, file_sha256, read_json
from rectflow.layout import Layout
from rectflow.pairs import MANIFEST, ManifestError, check_manifest, shard_name, shard_rows, write_shard
from rectflow.guidance import Guided
from rectflow.solvers import solve
from rectflow.train import fingerprint
from tasks._common import claim_finished, device, model_sha, teacher
from tasks.remote import RemoteRound, remote_round


def shard_seed(seed: int, round_k: int, index: int) -> int:
    """The seed of shard ``index`` of round ``round_k``: independent of worker count and order."""
    h = hashlib.sha256(f"rectflow-couple:{seed}:{round_k}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def dask_address(c: CoupleParams) -> str | None:
    """The Dask scheduler to use: ``RECTFLOW_DASK_ADDRESS``, else ``couple.dask_address``, else None."""
    from rectflow.settings import settings

    return settings().dask_address or c.dask_address or None


def uses_dask(c: CoupleParams) -> bool:
    """Whether shards are made on Dask: ``couple.workers`` > 1, ``couple.dask_address``, or
    ``RECTFLOW_DASK_ADDRESS`` set. The orchestration side then hands the stage a
    :class:`ShardExecutor` (``flows/dask.py``); the stage itself never starts a cluster."""
    return c.workers > 1 or bool(dask_address(c))


class ShardExecutor(Protocol):
    """Makes shards elsewhere (a Dask cluster): what the orchestration side hands couple and reflow.

    ``map(job, todo, rows)`` runs ``job(i, rows[i])`` for every ``i`` in ``todo`` and yields each
    ``(i, manifest entry)`` as its shard lands in the staging folder (in any order); an exception of
    a job is raised from the iterator. ``describe(c)`` names where the shards go, for the log.
    """

    def describe(self, c: CoupleParams) -> str: ...

    def map(self, job: ShardJob, todo: list[int], rows: list[int]) -> Iterator[tuple[int, dict[str, Any]]]: ...


_WORKER_CACHE: dict[tuple[str, int, str, str | None], tuple[Any, Any, tuple[int, ...], Any, Any, Any, Any]] = {}


@dataclass(frozen=True)
class ShardJob:
    """One round's shard-making, as a picklable callable for another process: ``job(i, rows)``
    makes, writes (and uploads) shard ``i`` and returns ``(i, entry)``.

    It carries only small things (params, paths, hashes); a worker process loads ``models/rfK``,
    its schedule and the prepared source from the shared workspace once and keeps them for its next
    shards, and refuses to work when it sees other weights or another schedule than the process that
    started the round (a workspace not shared at the same path).
    """

    p: Params
    root: str
    round_k: int
    staging: str
    model_sha: str
    remote: Any = None
    schedule_sha: str | None = None

    def __call__(self, index: int, rows: int) -> tuple[int, dict[str, Any]]:
        torch.set_num_threads(1)  # one thread per worker process: the cluster is the parallelism
        model, source, shape, dev, times, target, labels = self._inputs()
        z0, z1, nfe, *cond = generate_shard(self.p, model, source, shape, self.round_k, index, rows, dev, times, target,
                                            labels)
        return index, _write(Path(self.staging), index, z0, z1, nfe, lambda i, e: None, self.remote, *cond)

    def _inputs(self) -> tuple[Any, Any, tuple[int, ...], Any, Any, Any, Any]:
        key = (self.root, self.round_k, self.model_sha, self.schedule_sha)
        if key not in _WORKER_CACHE:
            from rectflow.nets import ModelError
            from rectflow.schedule import schedule_path

            layout = Layout(Path(self.root))
            dev = device()
            name = f"rf{self.round_k}"
            model, card = teacher(layout, name, dev)  # verifies the weights against the card
            if card["meta"].get("sha256") != self.model_sha:
                raise ModelError(f"{layout.model(name)}: this worker sees other weights than the process that "
                                 "started the round (is the workspace shared at the same path?)")
            times = None
            if self.schedule_sha is not None:
                sched = schedule_path(layout.model(name))
                if not sched.is_file() or file_sha256(sched) != self.schedule_sha:
                    raise ModelError(f"{sched}: this worker sees another step schedule than the process that "
                                     "started the round (is the workspace shared at the same path?)")
                times = round_times(self.p, layout, self.round_k)
            source = load_prepared(layout.prepared, "source", "train")
            target = real_rows(self.p, layout)
            labels = labelling(self.p, card, self.round_k, layout)
            _WORKER_CACHE.clear()
            _WORKER_CACHE[key] = (model, source, tuple(card["arch"]["shape"]), dev, times, target, labels)
        return _WORKER_CACHE[key]


def round_times(p: Params, layout: Layout, round_k: int) -> torch.Tensor | None:
    """The time grid ``(couple.steps + 1,)`` of round ``round_k``: rf{round_k}'s saved BOSS schedule
    for K = ``couple.steps`` when ``couple.schedule`` is ``bellman``, else None (uniform steps or
    adaptive RK45). A missing or stale schedule file is a ModelError naming it."""
    if p.couple.schedule != "bellman":
        return None
    from rectflow.schedule import schedule_times

    name = f"rf{round_k}"
    return schedule_times(layout.model(name), p.couple.steps, model_sha(layout, name))


def solver_record(p: Params, times: torch.Tensor | None) -> dict[str, Any]:
    """The manifest's ``solver``: what made the pairs, the time grid included."""
    c = p.couple
    fixed = c.solver != "rk45"
    rec: dict[str, Any] = {
        "name": c.solver, "steps": c.steps if fixed else None,
        "rtol": None if fixed else c.rtol, "atol": None if fixed else c.atol, "precision": c.precision,
        "schedule": c.schedule if fixed else "adaptive",
    }
    if times is not None:
        rec["times"] = [float(t) for t in times.tolist()]
    return rec


@torch.inference_mode()
def solve_pairs(
    model: nn.Module, z0: torch.Tensor, p: Params, dev: torch.device, times: torch.Tensor | None = None,
    reverse: bool = False, y: torch.Tensor | None = None, guidance: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, int]:
    """Z1 = ODE(Z0) for ``z0`` ``(n, *shape)`` in batches; returns (z1 on CPU, NFE summed over batches).
    ``reverse``: the inversion Z0 = ODE_{1→0}(Z1) of states ``z0`` at t = 1 instead.

    ``times`` ``(K + 1,)``: the fixed-step solver's time grid (a BOSS schedule, run backwards when
    ``reverse``); None: ``couple.steps`` uniform steps (or adaptive RK45). ``y`` ``(n,)``: the rows'
    labels for a conditional flow, guided at scale ``guidance`` (one, or ``(n,)``: one per row;
    :class:`rectflow.guidance.Guided`; NFE then counts network forwards per sample, 2 per evaluation
    when both branches run).
    """
    c = p.couple
    out, nfe = [], 0
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=c.precision == "bf16")
    for b in range(0, len(z0), c.batch_size):
        zb = z0[b : b + c.batch_size].to(dev, non_blocking=True)
        wb = guidance[b : b + c.batch_size].to(dev, non_blocking=True) if isinstance(guidance, torch.Tensor) else guidance
        v = model if y is None else Guided(model, y[b : b + c.batch_size].to(dev, non_blocking=True), wb)
        with autocast:
            sol = solve(v, zb, c.solver, c.steps, times=times, rtol=c.rtol, atol=c.atol, reverse=reverse)
        out.append(sol.x.float().cpu())
        nfe += sol.nfe
    return torch.cat(out), nfe


def sample_source(source: Distribution, n: int, seed: int, shape: tuple[int, ...],
                  y: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` source draws from ``seed``; with labels ``y`` ``(n,)`` and a labelled source, each from
    the source rows of its class (class-conditional transport)."""
    gen = torch.Generator().manual_seed(seed)
    if y is not None and source.labelled:
        return source.sample_of(y, gen).reshape(n, *shape)
    return source.sample(n, gen).reshape(n, *shape)


@dataclass(frozen=True)
class Labelling:
    """How a conditional round labels its pairs: ``classes`` K, the label draw of noise pairs
    (``couple.labels``: uniform, or ``frequencies`` of the target's training split), and the
    guidance scale w of the teacher (``couple.guidance`` for round 1; 1 for the reflowed flows,
    which learned the guided field); with ``w_range`` (``distill.guidance_input``) each pair's own
    w ~ U(lo, hi) instead, stored in the shards' column ``w`` (a teacher that takes w gets it as input)."""

    classes: int
    draw: str
    guidance: float
    frequencies: tuple[float, ...]
    w_range: tuple[float, float] | None = None

    def draw_labels(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(n,)`` int64 labels of ``n`` noise pairs from their own seed, and their ``(n,)`` scales
        (None: every pair at ``guidance``)."""
        gen = torch.Generator().manual_seed(seed)
        if self.draw == "frequency":
            y = torch.multinomial(torch.tensor(self.frequencies, dtype=torch.float64), n, True, generator=gen)
        else:
            y = torch.randint(0, self.classes, (n,), generator=gen)
        if self.w_range is None:
            return y, None
        lo, hi = self.w_range
        return y, lo + (hi - lo) * torch.rand(n, generator=gen)

    def record(self) -> dict[str, Any]:
        """The manifest's ``labels``: what the shards' ``y`` (and ``w``) columns mean and how they were drawn."""
        if self.w_range is None:
            return {"classes": self.classes, "draw": self.draw, "guidance": self.guidance, "column": "y"}
        return {"classes": self.classes, "draw": self.draw, "guidance": "per pair", "w_range": list(self.w_range),
                "column": "y", "column_w": "w"}


def labelling(p: Params, card: dict[str, Any], round_k: int, layout: Layout) -> Labelling | None:
    """The round's :class:`Labelling` when its flow is conditional (``classes`` in its card), else
    None; the class frequencies are prepare's record of the target's training split."""
    classes = int(card["arch"].get("classes", 0))
    if not classes:
        return None
    from rectflow.data import prepared_meta

    freqs = tuple(float(f) for f in prepared_meta(layout.prepared)["labels"]["frequencies"])
    w_range = tuple(p.distill.guidance_range) if p.distill.guidance_input else None
    return Labelling(classes, p.couple.labels, p.couple.guidance if round_k == 1 else 1.0, freqs, w_range)  # type: ignore[arg-type]


def label_seed(seed: int, round_k: int, index: int) -> int:
    """The seed of the labels of shard ``index``'s noise pairs (apart from its noise's)."""
    h = hashlib.sha256(f"rectflow-labels:{seed}:{round_k}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def real_rows(p: Params, layout: Layout) -> Distribution | None:
    """The target's training rows ``(N, *shape)`` (with their labels in a conditional run) that
    inversion pairs start from (``couple.source`` inversion or mixed), else None."""
    if p.couple.source == "noise":
        return None
    target = load_prepared(layout.prepared, "target", "train")
    assert target.data is not None
    return target


def inversion_count(c: CoupleParams, rows: int) -> int:
    """How many of a shard's ``rows`` pairs are made by inverting real data."""
    return {"noise": 0, "inversion": rows, "mixed": round(c.inversion_fraction * rows)}[c.source]


def inversion_rows(n_rows: int, seed: int, start: int, n: int) -> torch.Tensor:
    """Indices ``(n,)`` of rows ``start … start + n − 1`` of the round's order of the ``n_rows`` real
    training rows: ``perm[j mod N]`` of a permutation drawn from ``seed`` (each used once before any twice)."""
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(start, start + n) % n_rows]


def generate_shard(
    p: Params, model: nn.Module, source: Distribution, shape: tuple[int, ...], round_k: int, index: int,
    rows: int, dev: torch.device, times: torch.Tensor | None = None, target: Distribution | None = None,
    labels: Labelling | None = None,
) -> tuple[np.ndarray, ...]:
    """Shard ``index``: z0 ``(rows, *shape)`` from its own seed and z1 = ODE(z0) on ``times`` (see
    :func:`solve_pairs`); with ``couple.source`` inversion or mixed, its first
    :func:`inversion_count` pairs are (ODE_{1→0}(x1), x1) for real rows x1 of ``target`` instead.
    A conditional round (``labels``) draws each noise pair's label from its own seed and solves the
    guided teacher; inversion pairs keep their real row's label (and draw their scale after the noise
    pairs'). Returns (z0, z1, NFE), then y and, with per-pair scales, w."""
    n_inv = inversion_count(p.couple, rows)
    y, ws = (None, None) if labels is None else labels.draw_labels(rows, label_seed(p.seed, round_k, index))
    if y is not None:  # the first rows - n_inv are the noise pairs'
        y = y[: rows - n_inv]
    w: float | torch.Tensor = 1.0 if labels is None else labels.guidance if ws is None else ws[: rows - n_inv]
    z0 = sample_source(source, rows - n_inv, shard_seed(p.seed, round_k, index), shape, y)
    try:
        z1, nfe = solve_pairs(model, z0, p, dev, times, y=y, guidance=w) if rows > n_inv else (z0, 0)
        if n_inv:
            assert target is not None and target.data is not None
            start = index * inversion_count(p.couple, p.couple.shard_size)
            pick = inversion_rows(len(target.data), shard_seed(p.seed, round_k, -1), start, n_inv)
            x1 = target.data.index_select(0, pick).reshape(n_inv, *shape).float()
            y1 = None if labels is None or target.labels is None else target.labels.index_select(0, pick)
            w1 = w if ws is None else ws[rows - n_inv:]
            x0, nfe_inv = solve_pairs(model, x1, p, dev, times, reverse=True, y=y1, guidance=w1)
            z0, z1, nfe = torch.cat([x0, z0]), torch.cat([x1, z1]), nfe + nfe_inv
            y = None if y is None or y1 is None else torch.cat([y1, y])
            if ws is not None and isinstance(w, torch.Tensor) and isinstance(w1, torch.Tensor):
                w = torch.cat([w1, w])
    except RunFailedError as e:
        raise RunFailedError(f"rf{round_k}: {shard_name(index)} of round {round_k}: {e}; nothing of it was written "
                             "(retrain the flow, or use another solver)") from None
    bad = ~(torch.isfinite(z1.reshape(rows, -1)).all(1) & torch.isfinite(z0.reshape(rows, -1)).all(1))
    if bad.any():  # what is generated is checked as strictly as what is loaded: never a NaN pair on disk
        c = p.couple
        how = f"{c.solver}, {c.steps} steps" if c.solver != "rk45" else f"rk45, rtol {c.rtol:g}"
        raise RunFailedError(f"rf{round_k}: {shard_name(index)} of round {round_k} came out NaN or infinite in "
                             f"{int(bad.sum())} of {rows} rows: models/rf{round_k} diverges under couple.solver {how}; "
                             "that shard was not written (retrain the flow, or use another solver)")
    cond = () if y is None else (y.numpy(),) if ws is None else (y.numpy(), w.numpy())  # type: ignore[union-attr]
    return (z0.numpy(), z1.numpy(), nfe, *cond)


def _rows_sha(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _entry_valid(staging: Path, entry: Any) -> bool:
    """A manifest entry whose file exists and whose sha256 checks out."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("sha256"), str):
        return False
    if not {"rows", "nfe", "cost_sum"} <= set(entry) or "/" in entry["name"]:
        return False
    path = staging / entry["name"]
    return path.is_file() and file_sha256(path) == entry["sha256"]


def _unsound(final: Path, man: dict[str, Any], shape: tuple[int, ...], c: CoupleParams) -> str | None:
    """Why the finished round's manifest cannot be reused as it is for these params, or None."""
    try:
        check_manifest(man, str(final / MANIFEST))
    except ManifestError as e:
        return str(e)
    if man["shape"] != list(shape) or man.get("n_pairs") != c.n_pairs or man.get("shard_size") != c.shard_size:
        return (f"{final / MANIFEST}: shape {man['shape']}, n_pairs {man.get('n_pairs')}, shard_size "
                f"{man.get('shard_size')} where these params make {list(shape)}, {c.n_pairs}, {c.shard_size}")
    return None


def _read_manifest_or_none(path: Path) -> dict[str, Any] | None:
    """A manifest as JSON, or None if it is missing or unreadable (then nothing in it is trusted)."""
    try:
        man = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
        return None
    return man


def run_round(p: Params, layout: Layout, round_k: int, shard_executor: ShardExecutor | None = None) -> dict:
    """Make (or finish) coupling round ``round_k`` from ``models/rf{round_k}``.

    Resumable: every shard is first written under a temporary name, its manifest entry (rows,
    sha256) is recorded in the staging manifest, and only then is it renamed into place. A rerun
    verifies each listed shard by sha256, keeps the good ones and makes only the missing or invalid
    ones; a finished round that was damaged afterwards is repaired the same way. With Dask
    settings (:func:`uses_dask`) the shards are made by ``shard_executor``, which the caller must give.
    """
    p = p.model_copy(update={"couple": p.couple.for_round(round_k)})  # rounds ≥ 2: couple.reflowed applied
    c = p.couple
    use_dask = uses_dask(c)
    if use_dask and shard_executor is None:
        from rectflow.config import ParamsError

        raise ParamsError(f"couple.workers: {c.workers} (or a Dask address) needs a Dask executor, which "
                          "`rectflow stage couple` provides; use couple.workers=1 to couple in this process")
    dev = device()
    name = f"rf{round_k}"
    model, card = teacher(layout, name, dev)
    source = load_prepared(layout.prepared, "source", "train")
    shape = tuple(card["arch"]["shape"])
    if source.dim != int(np.prod(shape)):
        from rectflow.data import DataError

        raise DataError(f"{layout.prepared}: source dimension {source.dim} differs from {name}'s {int(np.prod(shape))}; "
                        "rerun prepare and pretrain")
    times = round_times(p, layout, round_k)
    target = real_rows(p, layout)
    labels = labelling(p, card, round_k, layout)
    # A uniform round keeps the fingerprint it had before schedules existed; a BOSS round adds its
    # grid, so a round made on another schedule (or another K) is never reused. Likewise noise
    # pairs keep theirs; inversion pairs add the source of pairs and the real rows' sha256.
    grid = () if times is None else ({"schedule": "bellman", "times": [float(t) for t in times.tolist()]},)
    real = () if target is None else ({"source": c.source, "fraction": c.inversion_fraction,
                                       "rows": _rows_sha(target.data)},)
    # A conditional round adds its labelling (classes, draw, guidance); unconditional rounds keep theirs.
    cond = () if labels is None else (labels.record(),)
    fp = fingerprint(model_sha(layout, name), c.model_dump(mode="json", exclude={
        "workers", "dask_address", "schedule", "reflowed", "source", "inversion_fraction", "labels", "guidance"}),
        p.seed, round_k, p.data.model_dump(mode="json"), *grid, *real, *cond)
    remote = remote_round(p, layout, round_k)  # S3: checked now, before any work
    final, staging = layout.round_dir(round_k), layout.staging(f"couplings/round-{round_k}")
    trash = staging.parent / f".{staging.name}.replaced"
    shutil.rmtree(trash, ignore_errors=True)  # a crash between the two renames below leaves it
    done = _read_manifest_or_none(final / MANIFEST) if (final / MANIFEST).is_file() else None
    why = None
    if done is not None and done.get("fingerprint") == fp and done.get("complete"):
        # Reused only if its totals add up for these params (rows, shards, shape) and every shard checks out.
        why = _unsound(final, done, shape, c)
        if why is None and all(_entry_valid(final, e) for e in done["shards"]):
            if remote is not None:
                remote.sync(final, [e["name"] for e in done["shards"]])
            return _record(done, reused=len(done["shards"]), made_rows=0, seconds=0.0)
    if done is None:  # made before an interruption, then deleted (dvc repro reruns an unlocked stage)
        _restore_round(layout, round_k, fp, staging)
    man = _read_manifest_or_none(staging / MANIFEST) or {}
    if man.get("fingerprint") != fp:
        shutil.rmtree(staging, ignore_errors=True)
        man = {}
        if done is not None and done.get("fingerprint") == fp:
            # The finished round of this very configuration was damaged (a shard deleted or
            # corrupted): take it back into staging and remake only what fails its sha256.
            print(f"[couple] round {round_k}: {final} fails verification{f' ({why})' if why else ''}; repairing it",
                  file=sys.stderr, flush=True)
            staging.parent.mkdir(parents=True, exist_ok=True)
            final.rename(staging)
            man = done
    staging.mkdir(parents=True, exist_ok=True)
    rows = shard_rows(c.n_pairs, c.shard_size)
    previous = {e["name"]: e for e in man.get("shards", []) if isinstance(e, dict) and isinstance(e.get("name"), str)}
    man = {
        "format": 1, "round": round_k, "shape": list(shape), "dim": int(np.prod(shape)),
        "n_pairs": c.n_pairs, "shard_size": c.shard_size, "seed": p.seed,
        "model": {"name": name, "sha256": model_sha(layout, name)},
        "solver": solver_record(p, times),
        "source": p.data.source, "fingerprint": fp, "complete": False, "shards": [None] * len(rows),
    }
    if labels is not None:  # the shards' y column: classes, how noise pairs' labels were drawn, the teacher's w
        man["labels"] = labels.record()
    if target is not None:  # 2-RF++ pairs: what share came from real data, and how often each row repeats
        n_inv, n_real = sum(inversion_count(c, r) for r in rows), len(target.data)
        man["pairs_from"] = {"source": c.source, "inversion_fraction": 1.0 if c.source == "inversion" else
                             c.inversion_fraction, "inverted_pairs": n_inv, "real_rows": n_real}
        if n_inv > n_real:
            print(f"[couple] round {round_k}: {n_inv} inversion pairs from {n_real} training rows: each row "
                  f"is inverted up to {-(-n_inv // n_real)} times (identical pairs)", file=sys.stderr, flush=True)
    todo, bad = [], []
    for i in range(len(rows)):
        old = previous.get(shard_name(i))
        if old is not None and old.get("rows") == rows[i] and _entry_valid(staging, old):
            man["shards"][i] = old
        else:
            todo.append(i)
            if old is not None and (staging / shard_name(i)).is_file():
                bad.append(shard_name(i))
    # Anything else in staging (temporary files of a killed write, shards listed nowhere) goes.
    keep = {MANIFEST} | {e["name"] for e in man["shards"] if e is not None}
    for f in staging.iterdir():
        if f.name not in keep:
            shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
    reused = len(rows) - len(todo)
    if reused or bad:
        print(f"[couple] round {round_k}: resuming, {reused} finished shard(s) verified by sha256 and kept, "
              f"{len(todo)} to make", file=sys.stderr, flush=True)
    for b in bad:
        print(f"[couple] round {round_k}: {b} fails its sha256 check; remaking it", file=sys.stderr, flush=True)
    atomic_write_json(staging / MANIFEST, man)
    if remote is not None:
        # The store's copy is marked incomplete first, so its readers refuse it until every shard
        # and then the complete manifest are uploaded.
        print(f"[couple] round {round_k}: uploading shards to {remote.url()}", file=sys.stderr, flush=True)
        remote.put_file(staging / MANIFEST)
    t0 = time.perf_counter()

    def publish(i: int, entry: dict[str, Any]) -> None:
        """Record shard i in the staging manifest (before its file gets its final name)."""
        man["shards"][i] = entry
        atomic_write_json(staging / MANIFEST, man)

    if use_dask and todo:
        # Each Dask task writes its shard into staging (and uploads it) and returns its entry.
        assert shard_executor is not None
        schedule_sha = None
        if times is not None:  # workers read the schedule file themselves; this is its hash
            from rectflow.schedule import schedule_path

            schedule_sha = file_sha256(schedule_path(layout.model(name)))
        job = ShardJob(p, str(Path(layout.root).absolute()), round_k, str(staging.absolute()), model_sha(layout, name),
                       remote, schedule_sha)
        print(f"[couple] round {round_k}: {len(todo)} shard(s) on {shard_executor.describe(c)}", file=sys.stderr,
              flush=True)
        for done, (i, entry) in enumerate(shard_executor.map(job, todo, rows), 1):
            print(f"[couple] round {round_k}: shard {i + 1}/{len(rows)} made on Dask (NFE {entry['nfe']}, "
                  f"{done}/{len(todo)})", file=sys.stderr, flush=True)
            publish(i, entry)
    else:
        # One writer thread: writing shard i overlaps solving shard i + 1, and every manifest
        # update happens on that thread, in order.
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future | None = None
            for i in todo:
                z0, z1, nfe, *cond = generate_shard(p, model, source, shape, round_k, i, rows[i], dev, times, target,
                                                    labels)
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write, staging, i, z0, z1, nfe, publish, remote, *cond)
                print(f"[couple] round {round_k}: shard {i + 1}/{len(rows)} solved (NFE {nfe})", file=sys.stderr, flush=True)
            if pending is not None:
                pending.result()
    if remote is not None:  # shards kept from an interrupted run may never have been uploaded
        for i in sorted(set(range(len(rows))) - set(todo)):
            remote.put_file(staging / man["shards"][i]["name"])
    seconds = time.perf_counter() - t0
    man["complete"] = True
    atomic_write_json(staging / MANIFEST, man)
    # Publish the round: the old one (if any) is moved aside in one rename, the new one moved in
    # with another, then the old one is deleted. data/couplings/round-K is never half-written.
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        final.rename(trash)
    staging.rename(final)
    shutil.rmtree(trash, ignore_errors=True)
    _keep_round(layout, round_k, final)
    if remote is not None:  # last: a complete manifest in the store means every shard is there
        remote.put_file(final / MANIFEST)
    return _record(man, reused=reused, made_rows=sum(rows[i] for i in todo), seconds=seconds)


def _keep_round(layout: Layout, round_k: int, final: Path) -> None:
    """Keep the published round in ``.rectflow/finished/round-K`` (hard links: no second copy of
    the pairs) until another stage keeps something (:func:`tasks._common.claim_finished`): if the stage is
    killed before DVC locks it, ``dvc repro`` deletes ``data/couplings/round-K`` and reruns the
    stage, which then takes the round back instead of solving it again."""
    import os

    claim_finished(layout)
    kept = layout.finished(f"round-{round_k}")
    tmp = kept.with_name(f".{kept.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in final.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:  # another file system, or links refused: a copy
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(kept, ignore_errors=True)
    tmp.rename(kept)


def _restore_round(layout: Layout, round_k: int, fp: str, staging: Path) -> bool:
    """Put a kept complete round of this very configuration (``fp``) into ``staging``, where the
    resume below verifies every shard's sha256 and keeps it; False if there is none."""
    import os

    kept = layout.finished(f"round-{round_k}")
    man = _read_manifest_or_none(kept / MANIFEST) if (kept / MANIFEST).is_file() else None
    if not man or man.get("fingerprint") != fp or not man.get("complete"):
        return False
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in kept.iterdir():
        try:
            os.link(f, staging / f.name)
        except OSError:
            shutil.copy2(f, staging / f.name)
    print(f"[couple] round {round_k}: finished before an interruption: taken back from {kept}", file=sys.stderr,
          flush=True)
    return True


def _write(
    staging: Path, i: int, z0: np.ndarray, z1: np.ndarray, nfe: int, publish, remote: RemoteRound | None = None,
    y: np.ndarray | None = None, w: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write shard ``i`` (with its labels ``y``, in a conditional round) into ``staging``
    (``publish(i, entry)`` runs before it takes its final name), then upload it to ``remote`` if
    given. The same code for one worker and for Dask tasks."""
    d = z1.reshape(len(z1), -1).astype(np.float64) - z0.reshape(len(z0), -1)
    extra = {"nfe": int(nfe), "cost_sum": float((d * d).sum())}
    entry = write_shard(staging, i, z0, z1, before_publish=lambda e: publish(i, e | extra), y=y, w=w) | extra
    if remote is not None:
        remote.put_file(staging / entry["name"])
    return entry


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


def run(p: Params, layout: Layout, shard_executor: ShardExecutor | None = None) -> dict:
    return run_round(p, layout, 1, shard_executor)
