"""What the training stages share: seeding, one 'train then save' step, model cards, flow schedules."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rectflow.adversarial import Adversary
from rectflow.config import Params, TrainParams
from rectflow.device import pick_device
from rectflow.layout import Layout
from rectflow.nets import count_params, load_state, read_model_card, save_model
from rectflow.models import load_model
from rectflow.objectives import Objective
from rectflow.train import BatchSource, clear_checkpoint, fingerprint, train


def device() -> torch.device:
    return pick_device()


def teacher(layout: Layout, name: str, dev: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``models/NAME`` for inference (eval mode, on ``dev``)."""
    return load_model(layout.model(name), dev)


def train_and_save(
    *,
    p: Params,
    layout: Layout,
    name: str,
    model: nn.Module,
    arch: dict[str, Any],
    batches: BatchSource,
    cfg: TrainParams,
    seed: int,
    inputs: dict[str, str],
    meta: dict[str, Any],
    dev: torch.device,
    time_dist: str | None = None,
    k: int | None = None,
    adversary: Adversary | None = None,
    objective: Objective | None = None,
) -> dict[str, Any]:
    """Train ``model`` (resuming from a matching checkpoint), save ``models/NAME``, return a record.

    ``inputs`` (name -> sha256 of every file the model depends on) and ``cfg`` make the checkpoint
    fingerprint, so a checkpoint of another configuration is never resumed.
    """
    import torch.distributed as dist

    fp = fingerprint(name, cfg.model_dump(mode="json"), arch, inputs, seed, time_dist, k)
    t0 = time.perf_counter()
    kept = _restore_finished(layout, name, fp)
    if kept is not None:  # trained before a crash later in this stage: restore it, never retrain
        model.load_state_dict(load_state(layout.finished(name)))
        return kept | {"reused_finished": True, "seconds": round(time.perf_counter() - t0, 3)}
    res = train(
        model, batches, cfg, name=name, seed=seed, checkpoint_dir=layout.checkpoints(name),
        history_path=layout.history(name), time_dist=time_dist, k=k, run_fingerprint=fp, device=dev,
        adversary=adversary, objective=objective,
    )
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    record = {
        "model": name,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,  # what it trained with (the resolved params'), stated in its record
        "lr": cfg.lr,
        "steps_run": res.steps,
        "resumed_from": res.resumed_from,
        "final_loss": res.final_loss,
        "samples_per_s": round(res.samples_per_s, 1),
        "train_seconds": round(res.seconds, 3),
        "params": count_params(model),
        "world": res.world,
    }
    if res.world > 1:  # data parallel: every rank's final weights (train() checked they are equal)
        record["rank_weights_sha256"] = res.rank_weights_sha256
        record["checkpoints_written"] = res.checkpoints_written
    if rank == 0:
        sha = save_model(
            layout.model(name), model.state_dict(), arch,
            meta | {"name": name, "inputs": inputs, "train": cfg.model_dump(mode="json"), "seed": seed},
        )
        record["sha256"] = sha
        _keep_finished(layout, name, fp, record)
        clear_checkpoint(layout.checkpoints(name))
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


FINISHED_RECORD = ".record.json"


def _keep_finished(layout: Layout, name: str, fp: str, record: dict[str, Any]) -> None:
    """Keep a copy of the just-saved ``models/NAME`` (weights, card, loss history) and its record in
    ``.rectflow/finished/`` until another stage keeps something (:func:`claim_finished`): a crash later in the
    stage (reflow's next coupling round, distill's second student) then costs no retraining, also
    under ``dvc repro``, which deletes a stage's outputs before it reruns it."""
    import shutil

    from rectflow.io import atomic_write_json

    claim_finished(layout)
    dest = layout.finished(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for src, suffix in ((layout.model(name), ".safetensors"), (layout.model(name), ".json")):
        tmp = dest.with_name(f".{dest.name}{suffix}.tmp")
        shutil.copyfile(src.with_suffix(suffix), tmp)
        tmp.replace(dest.with_suffix(suffix))
    if layout.history(name).is_file():
        shutil.copyfile(layout.history(name), dest.with_suffix(".csv"))
    atomic_write_json(dest.with_suffix(FINISHED_RECORD), {"fingerprint": fp, "record": record})


def _restore_finished(layout: Layout, name: str, fp: str) -> dict[str, Any] | None:
    """The record of a kept finished ``NAME`` of this very configuration (``fp``), after putting its
    files back in place (sha256 checked); None when there is none or it does not check out."""
    import shutil

    from rectflow.io import file_sha256, read_json

    keep = layout.finished(name)
    if _completed_and_present(layout, layout.model(name).with_suffix(".safetensors")):
        return None
    try:
        marker = read_json(keep.with_suffix(FINISHED_RECORD))
        card = read_json(keep.with_suffix(".json"))
        ok = (marker.get("fingerprint") == fp and card["meta"]["sha256"] == file_sha256(keep.with_suffix(".safetensors")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    rank, _ = rank_world()
    if rank == 0:
        from rectflow.io import atomic_path

        for suffix in (".safetensors", ".json"):
            with atomic_path(layout.model(name).with_suffix(suffix)) as tmp:
                shutil.copyfile(keep.with_suffix(suffix), tmp)
        if keep.with_suffix(".csv").is_file():
            with atomic_path(layout.history(name)) as tmp:
                shutil.copyfile(keep.with_suffix(".csv"), tmp)
        print(f"[{name}] finished before an interruption: restored from {keep} (sha256 checked), not retrained",
              file=sys.stderr, flush=True)
    return dict(marker["record"])


_STAGE: list[str] = []  # the stage this process runs (set by tasks.runner.run_stage)


def begin_stage(stage: str) -> None:
    """Name the stage this process runs; nothing is written (a stage that refuses its input must
    leave the workspace as it was). :func:`claim_finished` uses it."""
    _STAGE[:] = [stage]


def claim_finished(layout: Layout) -> None:
    """Make ``.rectflow/finished`` (what a stage keeps against a crash) the current stage's, just
    before it keeps something there.

    What a stage keeps (finished models, schedules, coupling rounds) outlives the stage: a kill after
    the stage wrote its outputs but before DVC locked them (``dvc repro`` then deletes the outputs
    and reruns the stage) must not cost a recomputation. It is dropped when another stage keeps
    something: by then DVC has locked the stage that kept it (stages run in order). Until then a
    kept entry is restored only by its own stage and fingerprint, so a stale one costs disk only."""
    import shutil

    from rectflow.io import atomic_write_bytes

    stage = _STAGE[0] if _STAGE else "library"
    root = layout.kept
    owner = root / "STAGE"
    try:
        current = owner.read_text().strip()
    except OSError:
        current = None
    if current != stage:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(owner, f"{stage}\n".encode())
    (root / "COMPLETED").unlink(missing_ok=True)  # this run of the stage goes on with what it keeps


def mark_completed(layout: Layout, stage: str) -> None:
    """The stage ran to its end: what it kept now covers only the window before DVC locks it, in
    which ``dvc repro`` deletes the outputs. A rerun restores a kept entry only where its output is
    missing (:func:`_completed_and_present`); one whose outputs are there computes them again, as a
    rerun should (reading and checking its inputs)."""
    root = layout.kept
    try:
        if (root / "STAGE").read_text().strip() == stage:
            (root / "COMPLETED").touch()
    except OSError:
        pass


def _completed_and_present(layout: Layout, output: Path) -> bool:
    """Whether the stage that kept ``.rectflow/finished`` ran to its end and ``output`` is still there
    (a kept entry is restored only by the stage that made it, its name and fingerprint checked)."""
    root = layout.kept
    return (root / "COMPLETED").is_file() and output.is_file()


SCHEDULE_SEED_OFFSET = 20_011  # the schedule's source draws: neither evaluation's nor a shard's noise
SCHEDULE_CHUNK_VALUES = 1 << 18  # rows × dims of trajectory held at once while the costs are accumulated


def save_flow_schedule(p: Params, layout: Layout, name: str, dev: torch.device) -> dict[str, Any]:
    """Compute the BOSS schedules of the saved flow ``models/NAME`` and write ``models/NAME.schedule.json``.

    The flow is reloaded from disk (exactly the saved weights, eval mode), run with Euler on the
    uniform ``bellman.grid_points``-step grid from ``bellman.n_samples`` source draws z0
    ``(n, *shape)`` (seed ``seed + SCHEDULE_SEED_OFFSET``), and the least-cost K-step grid is kept for
    every K = 1 … grid_points (:func:`rectflow.schedule.bellman_schedules`: one cost matrix, one DP
    pass). Returns a small record for the stage's metrics: the file and the seconds it took.
    """
    from rectflow.data import load_prepared
    from rectflow.schedule import bellman_schedules, save_schedule

    t0 = time.perf_counter()
    b = p.bellman
    kept = _restore_finished_schedule(layout, name, {"grid_points": b.grid_points, "n_samples": b.n_samples,
                                                      "seed": p.seed + SCHEDULE_SEED_OFFSET})
    if kept is not None:
        return kept
    model, card = teacher(layout, name, dev)
    shape = tuple(card["arch"]["shape"])
    dim = max(1, int(torch.Size(shape).numel()))
    seed = p.seed + SCHEDULE_SEED_OFFSET
    source = load_prepared(layout.prepared, "source", "train")
    z0 = source.sample(b.n_samples, torch.Generator().manual_seed(seed)).reshape(b.n_samples, *shape).to(dev)
    # the trajectory of one chunk is (grid_points + 1) × chunk × D values: bounded whatever the data
    chunk = max(1, min(4096, SCHEDULE_CHUNK_VALUES // dim))
    scheds = bellman_schedules(model, z0, range(1, b.grid_points + 1), b.grid_points, chunk=chunk)
    path = save_schedule(layout.model(name), scheds, meta={
        "model": name, "model_sha256": card["meta"]["sha256"], "grid_points": b.grid_points,
        "n_samples": b.n_samples, "seed": seed,
    })
    seconds = time.perf_counter() - t0
    print(f"[{name}] BOSS schedules K = 1 … {b.grid_points} from {b.n_samples} source draws: {path} "
          f"({seconds:.2f} s)", file=sys.stderr, flush=True)
    record = {"schedule": str(path.relative_to(layout.root)) if path.is_relative_to(layout.root) else str(path),
              "schedule_seconds": round(seconds, 3)}
    import shutil

    from rectflow.io import atomic_path, atomic_write_json

    claim_finished(layout)
    keep = layout.finished(name)
    keep.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(keep.with_suffix(".schedule.json")) as tmp:
        shutil.copyfile(path, tmp)
    atomic_write_json(keep.with_suffix(".schedule.record.json"), record)
    return record


def _restore_finished_schedule(layout: Layout, name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A kept schedule of the flow now in ``models/NAME`` (its ``model_sha256`` and ``settings``, the
    ``bellman`` values and seed, equal), put back."""
    import shutil

    from rectflow.io import atomic_path, read_json
    from rectflow.schedule import schedule_path

    keep = layout.finished(name)
    if _completed_and_present(layout, schedule_path(layout.model(name))):
        return None
    try:
        doc = read_json(keep.with_suffix(".schedule.json"))
        record = read_json(keep.with_suffix(".schedule.record.json"))
        meta = doc["meta"]
        ok = meta["model_sha256"] == model_sha(layout, name) and all(meta.get(k) == v for k, v in settings.items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    with atomic_path(schedule_path(layout.model(name))) as tmp:
        shutil.copyfile(keep.with_suffix(".schedule.json"), tmp)
    print(f"[{name}] BOSS schedules made before an interruption: restored, not recomputed", file=sys.stderr, flush=True)
    return dict(record)


def model_sha(layout: Layout, name: str) -> str:
    return read_model_card(layout.model(name))["meta"]["sha256"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def open_pairs(p: Params, layout: Layout, round_k: int, seed: int, dev: torch.device,
               model: str | None = None):  # -> PairStream
    """The pairs of coupling round ``round_k`` as a shuffled stream for this rank.

    From ``data/couplings/round-K`` when the round is complete there (manifest complete, every
    shard present); otherwise, when storage is S3, from the store's ``couplings/round-K/``
    (streamed shard by shard, each verified by sha256). Else the local round's error.
    ``model`` (``rfK``): the flow the pairs will train; the round's shape must be its shape.
    """
    stream = _open_pairs(p, layout, round_k, seed, dev)
    man = stream.man
    where = stream._where("manifest.json")  # the local file, or the object's URL
    from rectflow.pairs import ManifestError

    if man.get("round", round_k) != round_k:
        raise ManifestError(f"{where}: says round {man.get('round')!r}, expected {round_k}; rerun the couple stage")
    if model is not None:
        from rectflow.nets import read_model_card

        arch_shape = list(read_model_card(layout.model(model))["arch"]["shape"])
        if list(stream.shape) != arch_shape:
            raise ManifestError(f"{where}: pairs of shape {list(stream.shape)}, but models/{model} (which they train) "
                                f"has shape {arch_shape}; rerun the couple stage")
    return stream


def _open_pairs(p: Params, layout: Layout, round_k: int, seed: int, dev: torch.device):  # -> PairStream
    import sys

    from rectflow.io import require_file
    from rectflow.pairs import ManifestError, PairStream, read_manifest

    rank, world = rank_world()
    local = layout.round_dir(round_k)
    try:
        man = read_manifest(local)
        for e in man["shards"]:  # a missing shard may be streamed from storage; a FIFO is refused
            require_file(local / e["name"], ManifestError, f"{local / e['name']}: listed in the manifest but missing")
    except ManifestError:
        from tasks.remote import remote_round

        remote = remote_round(p, layout, round_k)
        if remote is None:
            raise
        if rank == 0:
            print(f"[pairs] round {round_k}: no complete local copy in {local}; streaming from {remote.url()}",
                  file=sys.stderr, flush=True)
        return PairStream(remote.prefix, seed=seed, device=dev, store=remote.store, rank=rank, world=world)
    return PairStream(local, seed=seed, device=dev, rank=rank, world=world)
