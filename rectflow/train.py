"""One training loop for pretrain, reflow and distill (nanoGPT-style: no trainer framework).

(Just over 400 lines on purpose: the loop, its checkpoint/resume and its data-parallel paths are
read as one, as in nanoGPT.)

Each step draws a batch of pairs ``(x0, x1)`` ``(B, *shape)`` from a :class:`BatchSource` and
minimises an objective's loss on it (:mod:`rectflow.objectives`): by default times ``t`` ``(B,)``
from p(t) and D(x1 − x0, v(x_t, t)) (:mod:`rectflow.flow`); SlimFlow's and MeanFlow's for distill. AdamW with
linear warm-up (then a constant or cosine-decayed learning rate), gradient-norm clipping, an EMA of
the weights (what gets saved), optional bf16 autocast. Every ``checkpoint_every`` steps the whole
state (weights, EMA, optimizer, RNG states, batch-source position, step) is written atomically, so a
rerun after a crash resumes and ends with bit-identical weights on CPU. No host synchronisation per
step: the loss is read every ``log_every`` steps, and a non-finite loss is located to its exact step
from a device-side record.

Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in DDP and
``batch_size`` stays the *global* batch: each of the N ranks draws ``batch_size / N`` pairs of
its own (the batch source is told its rank), so a setting means the same optimisation whatever
the number of processes. The logged loss is the mean over ranks; only rank 0 writes checkpoints
and history; at the end the ranks compare a hash of their final weights and stop with an error
if they differ (they never should: DDP averages the gradients and the EMA starts from rank 0's).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rectflow.errors import RunFailedError
from rectflow.guidance import drop_labels
from rectflow.io import atomic_path
from rectflow.objectives import Objective, RectifiedFlowLoss, StepContext

if TYPE_CHECKING:
    from rectflow.adversarial import Adversary

__all__ = ["BatchSource", "NonFiniteLossError", "RunFailedError", "TrainResult", "learning_rate", "train"]


class NonFiniteLossError(RunFailedError):
    """The loss became NaN or infinite; the message names the step."""


class BatchSource(Protocol):
    """Yields training pairs; its position is part of a checkpoint."""

    def next_batch(self, batch_size: int) -> tuple[Tensor, ...]:
        """``(x0, x1)``, each ``(batch_size, *shape)``, on the training device; labelled pairs
        (a conditional run) add ``y`` ``(batch_size,)`` int64: ``(x0, x1, y)``, and pairs made at
        their own guidance scales their ``w`` ``(batch_size,)``: ``(x0, x1, y, w)``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    final_loss: float
    samples_per_s: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    world: int = 1
    rank_weights_sha256: list[str] = field(default_factory=list)  # per rank, equal (checked)
    checkpoints_written: list[int] = field(default_factory=list)  # per rank: [n, 0, 0, ...]


def weights_sha256(model: nn.Module) -> str:
    """A hash of a model's state (names, dtypes, shapes, raw bytes): equal iff the weights are."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> None:
    """Scale the gradients so that their global L2 norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``, in a few kernels: the per-step cost counts for small
    networks). On an accelerator the scale is applied unconditionally (no host sync); on a CPU,
    where reading it costs nothing, the multiply by exactly 1 is skipped when no clipping is needed
    (the same bits either way; measured on the 3×64 MLP at batch 512: 2% of a step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = (max_norm / (total + 1e-6)).clamp_(max=1.0)
    if coef.device.type == "cpu" and float(coef) >= 1.0:
        return
    torch._foreach_mul_(grads, coef)


def learning_rate(cfg: Any, step: int) -> float:
    """The learning rate of (0-based) ``step``: linear warm-up to ``cfg.lr`` over ``cfg.warmup`` steps,
    then constant or, with ``cfg.lr_schedule == "cosine"``, ``lr·½(1 + cos(π·s/S))`` with
    s = step − warmup and S = steps − warmup (so the last step still moves, by a tiny lr)."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - cfg.warmup, span) / span))
    return cfg.lr


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts (params, input hashes): a checkpoint resumes only if equal."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Progress:
    """A rich progress bar on a terminal; a plain line every ~10% otherwise (DVC, CI, Prefect)."""

    def __init__(self, name: str, total: int, start: int) -> None:
        self.name, self.total, self.every = name, total, max(1, total // 10)
        self.live = sys.stderr.isatty()
        self.bar = None
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
            )
            self.task = self.bar.add_task(name, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, loss: float, rate: float) -> None:
        info = f"loss {loss:.4f} · {rate:,.0f} samples/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            print(f"[{self.name}] step {step}/{self.total} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(
    model: nn.Module,
    batches: BatchSource,
    cfg: Any,
    *,
    name: str,
    seed: int,
    checkpoint_dir: Path,
    history_path: Path | None = None,
    time_dist: str | None = None,
    k: int | None = None,
    run_fingerprint: str = "",
    device: torch.device | str = "cpu",
    adversary: Adversary | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps (``cfg``: a :class:`~rectflow.config.TrainParams`).

    ``time_dist``/``k`` override ``cfg.time_dist`` (distillation uses ``"discrete"`` with ``k``).
    ``adversary`` (distillation): adds its term on x̂1 = x_t + (1 − t)·v(x_t, t) to the loss and
    trains its discriminator one step per step (:mod:`rectflow.adversarial`); the logged loss stays
    the regression D(x1 − x0, v), comparable with a run without it.
    ``objective``: another method's loss (:mod:`rectflow.objectives`: SlimFlow, MeanFlow); default
    :class:`~rectflow.objectives.RectifiedFlowLoss` of ``cfg``, ``time_dist`` and ``k``.
    On return ``model`` holds the EMA weights (or the raw ones when ``cfg.ema == 0``).
    """
    device = torch.device(device)
    rank, world = _rank_world()
    if cfg.batch_size % world:
        from rectflow.config import ParamsError

        raise ParamsError(f"batch_size: {cfg.batch_size} (the global batch) is not divisible by the "
                          f"{world} training processes")
    local_batch = cfg.batch_size // world
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params] if cfg.ema > 0 else None
    gen = torch.Generator().manual_seed(seed * 1000 + 17 + rank)
    step = 0
    history: list[dict[str, float]] = []
    ckpt = checkpoint_dir / "last.pt"
    # The log window: each step's loss goes into ``window[n_acc]`` (no host sync); ``loss_acc`` is
    # the sum carried over from before a resume or a checkpoint within the window.
    loss_acc = torch.zeros((), device=device)
    window = torch.zeros(cfg.log_every, device=device)
    n_acc = 0
    if rank == 0:
        # A kill during a save leaves its temporary file behind (never the final name): drop it.
        for stale in checkpoint_dir.glob(f".{ckpt.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    state = _read_checkpoint(ckpt, device, name) if ckpt.is_file() else None
    if state is not None:
        if state.get("fingerprint") == run_fingerprint and state.get("world") == world:
            try:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["opt"])
                if ema is not None:
                    if len(state["ema"]) != len(ema):
                        raise ValueError("EMA length")
                    for e, s in zip(ema, state["ema"]):
                        e.copy_(s)
                if adversary is not None:
                    adversary.load_state_dict(state["adversary"])
                gen.set_state(state["gen"][rank])
                torch.set_rng_state(state["torch_rng"][rank])
                batches.load_state_dict(state["batches"][rank])
                step, history = int(state["step"]), list(state["history"])
                loss_acc.fill_(float(state.get("loss_acc", 0.0)))
                n_acc = int(state.get("n_acc", 0))
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
                from rectflow.nets import ModelError

                raise ModelError(f"{ckpt}: checkpoint does not fit this run ({e.__class__.__name__}); "
                                 "delete it to start over") from None
            print(f"[{name}] resuming from checkpoint at step {step}", file=sys.stderr, flush=True)
        elif rank == 0:
            print(f"[{name}] ignoring a checkpoint of another configuration: {ckpt}", file=sys.stderr)
    resumed_from = step
    saved_step = step if step else None  # the last good checkpoint (None: none of this run yet)

    net = model
    checkpoints_written = 0
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcasts rank 0's weights; the networks' buffers are constants (time frequencies), never
        # re-broadcast per forward: that copy would also break MeanFlow's forward-mode JVP
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        if ema is not None:
            for e in ema:
                dist.broadcast(e, 0)
        if adversary is not None:
            adversary.distribute()

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    if objective is None:
        objective = RectifiedFlowLoss(time_dist or cfg.time_dist, cfg.loss, cfg.huber_c, k=k, adversary=adversary)
    ctx = StepContext(gen=gen, autocast=autocast, device=device)
    phases = tuple(getattr(objective, "phase_starts", ()))  # steps where a new phase (and EMA) begins
    decaying = cfg.lr_schedule != "constant"
    # The per-step work besides forward/backward/step is kept to a few kernels with no host sync: the
    # EMA sources are detached once, the learning rate is written only while it changes, and a NaN
    # or inf loss is found in the log window's per-step losses (checked at every log and checkpoint,
    # before anything is saved, naming the first bad step) rather than with a flag updated every step.
    ema_src = [p.detach() for p in params]
    progress = _Progress(name, cfg.steps, step) if rank == 0 else None
    t_start = time.perf_counter()
    t_last, samples_since = t_start, 0
    rate = 0.0
    last_loss = float("nan")

    def save_checkpoint() -> None:
        gens = [gen.get_state()]
        rngs = [torch.get_rng_state()]
        bstates = [batches.state_dict()]
        loss_acc.add_(window[:n_acc].sum())  # fold the window so far into the carried sum
        window.zero_()
        if world > 1:
            # The log window in progress is kept as its mean over ranks (what the log will show),
            # so every rank resumes from the same value.
            dist.all_reduce(loss_acc)
            loss_acc.div_(world)
            objs: list[Any] = [None] * world
            dist.all_gather_object(objs, (gens[0], rngs[0], bstates[0]))
            gens, rngs, bstates = [o[0] for o in objs], [o[1] for o in objs], [o[2] for o in objs]
        if rank != 0:
            return
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt) as tmp:
            torch.save(
                {
                    "fingerprint": run_fingerprint, "world": world, "step": step,
                    "model": model.state_dict(), "opt": opt.state_dict(),
                    "ema": ema if ema is not None else [], "gen": gens, "torch_rng": rngs,
                    "batches": bstates, "history": history,
                    "loss_acc": float(loss_acc), "n_acc": n_acc,  # the log window in progress
                    "adversary": adversary.state_dict() if adversary is not None else None,
                },
                tmp,
            )

    def check_finite() -> None:
        # The window holds the losses of steps step − n_acc + 1 … step (those folded into
        # loss_acc at a checkpoint were checked before it).
        bad_at = ~torch.isfinite(window[: max(n_acc, 1)])
        bad_at[0] &= n_acc > 0  # an empty window (just logged): nothing to check
        first = torch.where(bad_at.any(), bad_at.to(torch.int8).argmax() + (step - n_acc + 1), cfg.steps + 1)
        if world > 1:  # the first bad step on any rank, so that every rank stops together
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad = int(first)
        if bad <= cfg.steps:
            if progress:
                progress.close()
            kept = (f"the last good checkpoint ({ckpt}, step {saved_step}) is left intact"
                    if saved_step is not None else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"{name}: loss became NaN or infinite at step {bad}/{cfg.steps}; nothing was saved "
                f"from it and {kept}. Lower the learning rate or check the data."
            )

    # Conditional runs: labels dropped to the null class with probability p_uncond (pretrain's
    # classifier-free guidance); the draw comes from the checkpointed generator, and only when
    # there are labels, so unconditional runs draw exactly what they always did.
    p_uncond = float(getattr(cfg, "p_uncond", 0.0))
    classes = int(getattr(model, "classes", 0))
    while step < cfg.steps:
        x0, x1, *labels = batches.next_batch(local_batch)
        y = labels[0] if labels else None
        w = labels[1] if len(labels) > 1 else None  # each pair's guidance scale (guidance distillation)
        if y is not None and p_uncond > 0:
            y = drop_labels(y, p_uncond, classes, gen)
        lr = learning_rate(cfg, step)
        if decaying or step <= cfg.warmup or step == resumed_from:  # else constant after the warm-up
            for g in opt.param_groups:
                g["lr"] = lr
        if y is None:
            loss, total = objective(net, x0, x1, step, ctx)
        else:
            loss, total = objective(net, x0, x1, step, ctx, y=y) if w is None else objective(net, x0, x1, step, ctx, y=y, w=w)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            clip_grad_norm(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            # An objective in phases (SlimFlow: annealing reflow, then distillation) restarts the
            # average at each phase: the saved weights average the last phase only.
            since = step - max((r for r in phases if r <= step), default=0)
            decay = 0.0 if step in phases else min(cfg.ema, (1 + since) / (10 + since))  # 0: a restart
            with torch.no_grad():
                torch._foreach_lerp_(ema, ema_src, 1 - decay)
        window[n_acc] = loss.detach()
        n_acc += 1
        step += 1
        samples_since += x0.shape[0]
        if step % cfg.log_every == 0 or step == cfg.steps:
            check_finite()
            now = time.perf_counter()
            rate = samples_since * world / max(now - t_last, 1e-9)
            if world > 1:
                loss_acc.add_(window[:n_acc].sum())
                dist.all_reduce(loss_acc)
                loss_acc.div_(world)
            else:
                loss_acc.add_(window[:n_acc].sum())
            last_loss = float(loss_acc) / n_acc
            history.append({"step": step, "loss": last_loss, "lr": lr, "samples_per_s": rate})
            if adversary is not None:  # the discriminator's hinge loss at this step (2: chance)
                history[-1]["d_loss"] = float(adversary.last_d_loss)
            loss_acc.zero_()
            n_acc, t_last, samples_since = 0, now, 0
            if progress:
                progress.update(step, last_loss, rate)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            check_finite()
            save_checkpoint()
            saved_step = step
            checkpoints_written += rank == 0
    check_finite()
    if progress:
        progress.close()
    seconds = time.perf_counter() - t_start
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    model.eval()
    if rank == 0 and history_path is not None:
        with atomic_path(history_path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "samples_per_s"]
                                   + (["d_loss"] if adversary is not None else []))
                w.writeheader()
                w.writerows(history)
    done = cfg.steps - resumed_from
    mine = (weights_sha256(model), checkpoints_written)
    gathered: list[Any] = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if len({g[0] for g in gathered}) != 1:
            raise RuntimeError(f"{name}: the {world} training processes ended with different weights "
                               f"({', '.join(g[0][:12] for g in gathered)}); nothing is saved from them")
    return TrainResult(
        steps=done, resumed_from=resumed_from, final_loss=last_loss,
        samples_per_s=done * cfg.batch_size / max(seconds, 1e-9), seconds=seconds, history=history,
        world=world, rank_weights_sha256=[g[0] for g in gathered], checkpoints_written=[g[1] for g in gathered],
    )


def _read_checkpoint(ckpt: Path, device: torch.device, name: str) -> dict[str, Any] | None:
    """The checkpoint's state (tensors and plain containers only: ``weights_only``, never a pickle).

    An unreadable file (it is only ever written atomically, so this means outside damage) is
    reported and ignored: training starts over and the next save replaces it.
    """
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as e:  # truncated, foreign or tampered file: never unpickled, never fatal
        print(f"[{name}] ignoring an unreadable checkpoint {ckpt} ({e.__class__.__name__})", file=sys.stderr, flush=True)
        return None
    if not isinstance(state, dict):
        print(f"[{name}] ignoring an unreadable checkpoint {ckpt} (not a state dict)", file=sys.stderr, flush=True)
        return None
    return state


def clear_checkpoint(checkpoint_dir: Path) -> None:
    """Remove a finished stage's checkpoint (its result is the saved model)."""
    (checkpoint_dir / "last.pt").unlink(missing_ok=True)
