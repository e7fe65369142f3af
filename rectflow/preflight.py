"""Checks a stage makes before it computes anything: its outputs can be written, its sizes fit.

(Just over 400 lines on purpose: every size key's lower bound sits beside the others, so that a
new key's memory is reckoned in the same place and the same way.)

Both run inside the workspace lock, after the params are validated and before the stage's first
computation, so a refusal is one line, exit 2, and the workspace is unchanged
(docs/reliability.md, "Sizes and the workspace").

- :func:`check_writable`: every output the registry declares for the stage (``rectflow/stages.py``),
  its metrics, and rectflow's own ``.rectflow/`` folders, can be created where they go: the folder
  each would be written in (or the nearest one that exists) takes a probe file, created and deleted.
  A probe, not ``os.access``: it also sees a read-only file system, ACLs and root's limits.
- :func:`check_memory`: a *lower bound* of what each size key needs at once (a training step's
  activations for ``batch_size`` rows of the data's shape, an inference batch, the evaluation's
  n × n distance matrices, a BOSS cost matrix, the network's weights and optimizer state, …),
  compared with the memory there is (host: ``MemAvailable``, the cgroup's limit, ``RLIMIT_AS``;
  CUDA: the device's free memory). Only sizes that cannot fit are refused, naming the key: the
  bounds are below what the stage really uses (measured: 1.2–1.6× for the MLP, 3–5× for the
  U-Net), so a run that would have fitted is never refused, and a run within a small factor of
  the memory may still exhaust it; that case is caught where it happens (:func:`is_out_of_memory`,
  in ``tasks.runner``) and reported in one line naming the stage's sizes.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rectflow.config import Params, ParamsError
from rectflow.errors import InputError

__all__ = [
    "Need", "WorkspaceError", "available_memory", "check_memory", "check_writable", "human_bytes", "is_out_of_memory",
    "output_state", "pipeline_paths", "sample_needs", "stage_needs", "stage_paths",
]


class WorkspaceError(InputError, ValueError):
    """An output of the stage cannot be written where it goes (one line naming the folder)."""


# ---- outputs can be written --------------------------------------------------------------------


def stage_paths(name: str, p: Params, root: Path) -> list[Path]:
    """Everything stage ``name`` may write: its declared outputs (the registry), its metrics, and
    rectflow's checkpoints and staging folders."""
    from rectflow.stages import stage

    outs = [root / o.path for o in stage(name).outputs(p)]
    outs.append(root / "metrics" / f"{name}.json")
    if name not in ("resolve", "prepare"):
        outs += [root / ".rectflow" / "checkpoints", root / ".rectflow" / "staging"]
    return list(dict.fromkeys(outs))


def pipeline_paths(p: Params, root: Path) -> list[Path]:
    """Everything a whole pipeline run may write: every stage's :func:`stage_paths`, and the files
    the flow itself writes beside them (``params.yaml`` with overrides, ``dvc.yaml``, ``dvc.lock``,
    ``params.resolved.yaml``, DVC's cache and temporary folders)."""
    from rectflow.stages import STAGES

    paths = [q for name in STAGES for q in stage_paths(name, p, root)]
    paths += [root / f for f in ("params.yaml", "dvc.yaml", "dvc.lock", "params.resolved.yaml")]
    if (root / ".dvc").is_dir():
        paths += [root / ".dvc" / "tmp", root / ".dvc" / "cache"]
    return list(dict.fromkeys(paths))


def _probe(directory: Path) -> str | None:
    """None if a file can be created (and removed) in ``directory``, else why not."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rectflow-probe.", suffix=".tmp", dir=directory)
    except OSError as e:
        return e.strerror or e.__class__.__name__
    os.close(fd)
    os.unlink(tmp)
    return None


def check_writable(who: str, paths: Iterable[Path], root: Path) -> None:
    """Raise :class:`WorkspaceError` naming the first folder where ``who`` (``stage couple``,
    ``rectflow sample``) cannot write one of ``paths``.

    A path is a file (it has a suffix) or a folder (``data/prepared``, ``data/couplings/round-1``).
    A file goes into its folder; a folder's files go into it, and a round folder is also renamed
    into its parent. A missing folder is created in the nearest one that exists, so that is probed.
    """
    seen: dict[Path, str | None] = {}

    def rel(x: Path) -> str:
        try:
            return str(x.relative_to(root)) or "."
        except ValueError:
            return str(x)

    for path in paths:
        is_dir_output = path.suffix == "" or path.is_dir()
        candidates = [path, path.parent] if is_dir_output else [path.parent]
        for target in candidates:
            probe = target
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not probe.is_dir():
                raise WorkspaceError(f"{rel(probe)}: is a file where {who} needs a folder (to write "
                                     f"{rel(path)}); move it away")
            if probe not in seen:
                seen[probe] = _probe(probe)
            if seen[probe] is not None:
                raise WorkspaceError(f"{rel(probe)}: not writable ({seen[probe]}); {who} writes {rel(path)} "
                                     "there: make it writable before running (nothing was computed)")


def output_state(paths: Iterable[Path]) -> dict[str, tuple[int, int] | str]:
    """A cheap fingerprint of what exists at ``paths`` (files: size and mtime; folders: listed),
    to tell afterwards whether a failed stage wrote anything."""
    out: dict[str, tuple[int, int] | str] = {}
    for path in paths:
        for anc in [path, *path.parents]:
            out.setdefault(str(anc), "dir" if anc.is_dir() else ("file" if anc.exists() else "absent"))
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                for d in dirnames:
                    out[os.path.join(dirpath, d)] = "dir"
                for f in filenames:
                    full = os.path.join(dirpath, f)
                    try:
                        st = os.stat(full)
                        out[full] = (st.st_size, st.st_mtime_ns)
                    except OSError:
                        out[full] = "gone"
        elif path.exists():
            st = path.stat()
            out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


# ---- sizes fit in memory ------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """``key`` = ``value`` needs at least ``bytes`` at once (plus ``base``, the network's own, which
    is there anyway), for ``what``, in ``where`` memory."""

    key: str
    value: Any
    bytes: int
    what: str
    where: str = "device"  # "device" (where the network runs) or "host"
    base: int = 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _host_available() -> tuple[int, str] | None:
    """The memory this process may still take: the least of MemAvailable, the cgroup's room and
    RLIMIT_AS's room (Linux); None where none of them can be read."""
    options: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                options.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                options.append((int(limit) - int(Path(usage_file).read_text().strip()), "the cgroup's memory limit"))
            break
        except (OSError, ValueError):
            continue
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            vm = 0
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmSize:"):
                    vm = int(line.split()[1]) * 1024
            options.append((soft - vm, "RLIMIT_AS (ulimit -v)"))
    except (ImportError, OSError, ValueError):
        pass
    return min(options) if options else None


def available_memory(where: str, device: Any = None) -> tuple[int, str] | None:
    """(bytes, what limits them) for ``where`` = "host" or "device" (``device``: a torch device;
    CUDA: its free memory, CPU: the host's)."""
    if where == "device" and device is not None and getattr(device, "type", "cpu") == "cuda":
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            return int(free), f"free memory of {device}"
        except Exception:
            return None
    return _host_available()


def _shape_of(root: Path) -> tuple[int, ...] | None:
    from rectflow.data import DataError, prepared_meta

    try:
        return tuple(int(s) for s in prepared_meta(root / "data" / "prepared")["target"]["shape"])
    except (DataError, KeyError, TypeError, ValueError):
        return None


def _arch(name: str, p: Params, root: Path, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """The architecture stage ``name`` runs: pretrain builds it from the params, the others load rf1's."""
    from rectflow.nets import ModelError, arch_from_params, read_model_card

    try:
        if name != "pretrain":
            try:
                return read_model_card(root / "models" / "rf1")["arch"]
            except ModelError:
                pass
        return arch_from_params(p.model, shape)
    except (ModelError, KeyError, TypeError, ValueError):
        return None


def _net_cost(arch: dict[str, Any]) -> tuple[int, int, int, str] | None:
    """(parameters, bytes per row of a training step, bytes per row of inference, the size key)
    of a network, as lower bounds. The parameters are counted on the meta device (no memory)."""
    import torch

    from rectflow.nets import build_model, count_params

    try:
        with torch.device("meta"):
            n_params = count_params(build_model(arch))
        shape = tuple(int(s) for s in arch["shape"])
        d, t = math.prod(shape), int(arch["time_embed"])
        if arch["kind"] == "mlp":
            h, depth = int(arch["hidden"]), int(arch["depth"])
            return n_params, 4 * (5 * d + t + 2 * depth * h), 4 * (2 * d + t + 2 * h), "model.hidden"
        c, hw = int(arch["channels"]), shape[1] * shape[2]
        levels = len(arch["channel_mult"])
        tokens = hw // 4 ** (levels - 1)
        att = tokens * tokens if arch.get("attention") else 0
        return (n_params, 4 * (5 * d + t + 24 * c * hw + 2 * att), 4 * (2 * d + t + 6 * c * hw + att),
                "model.channels")
    except Exception:  # an architecture the stage itself will refuse, with its own message
        return None


def stage_needs(name: str, p: Params, root: Path) -> list[Need]:
    """The lower bounds of what stage ``name``'s size keys need at once (empty where the stage's
    inputs are not there yet: the stage then says what is missing)."""
    from rectflow.config import BUILTIN_2D

    needs: list[Need] = []
    d_ = p.data
    if name == "prepare":
        n = d_.n_train + d_.n_test
        if d_.target in BUILTIN_2D or d_.source in BUILTIN_2D and d_.source != "gaussian":
            key, value = ("data.n_train", d_.n_train) if d_.n_train >= d_.n_test else ("data.n_test", d_.n_test)
            needs.append(Need(key, value, n * 2 * (8 + 4) * 2, f"{n} drawn 2-D points (float64, then float32, "
                              "then the train/test copies)", "host"))
        return needs
    shape = _shape_of(root)
    if shape is None:
        return needs
    arch = _arch(name, p, root, shape)
    cost = _net_cost(arch) if arch is not None else None
    if cost is None:
        return needs
    n_params, train_row, infer_row, model_key = cost
    d = math.prod(shape)
    desc = f"rows of shape {shape}"
    weights_train, weights_infer = 16 * n_params, 4 * n_params
    model_value = arch.get("hidden") if model_key == "model.hidden" else arch.get("channels")  # type: ignore[union-attr]

    def train(key: str, batch: int) -> None:
        needs.append(Need(model_key, model_value, weights_train,
                          f"the weights, gradients and AdamW state of a {n_params:,}-parameter network"))
        needs.append(Need(key, batch, batch * train_row, f"one training step on {batch} {desc}, and the network",
                          base=weights_train))

    def infer(key: str, batch: int, what: str, extra_per_row: int = 0) -> None:
        needs.append(Need(key, batch, batch * (infer_row + extra_per_row), f"{what} of {batch} {desc}, and the network",
                          base=weights_infer))

    def bellman() -> None:
        b = p.bellman
        g = b.grid_points
        chunk = max(1, min(4096, (1 << 18) // max(1, d), b.n_samples))
        needs.append(Need("bellman.grid_points", g, 16 * (g + 1) ** 2 + 4 * (g + 1) * chunk * d,
                          f"the BOSS cost matrices of {g} grid points"))
        infer("bellman.n_samples", b.n_samples, "the BOSS source draws", 4 * d)

    def couple_round(round_k: int) -> None:
        c = p.couple.for_round(round_k)
        rows = min(c.shard_size, c.n_pairs)
        needs.append(Need("couple.shard_size", c.shard_size, 2 * 4 * rows * d * 2,
                          f"one shard of {rows} pairs (z0 and z1, then their Parquet table)", "host"))
        stages_per_row = 4 * d * (7 if c.solver == "rk45" else 3)
        infer("couple.batch_size", min(c.batch_size, rows), "an ODE batch", stages_per_row)

    def stream(batch_key: str, batch: int) -> None:
        rows = min(p.couple.shard_size, p.couple.n_pairs)
        needs.append(Need("couple.shard_size", p.couple.shard_size, 4 * rows * d * 2 * 2,
                          f"the shuffle buffer of 4 shards of {rows} pairs", "host"))
        train(batch_key, batch)

    if name == "pretrain":
        train("pretrain.batch_size", p.pretrain.batch_size)
        bellman()
    elif name == "couple":
        couple_round(1)
    elif name == "reflow":
        stream("reflow.batch_size", p.reflow.batch_size)
        bellman()
        if 2 in p.coupled_rounds():
            couple_round(2)
    elif name == "distill":
        stream("distill.batch_size", p.distill.batch_size)
    elif name == "quantize":
        infer("evaluate.latency_batch", p.evaluate.latency_batch, "the latency batch")
    elif name == "evaluate":
        e = p.evaluate
        n = e.n_samples
        n_test = _n_test(root) or n
        m = min(n, n_test)
        needs.append(Need("evaluate.n_samples", n, 8 * n * max(n, m) + 8 * n * d * 2,
                          f"the {n} × {max(n, m)} distance matrices of W2 and MMD (float64)", "host"))
        infer("evaluate.n_samples", n, "the evaluation ODE", 4 * d * 7)
        needs.append(Need("evaluate.straightness_steps", e.straightness_steps,
                          4 * e.straightness_steps * n * d + n * infer_row,
                          f"the velocities along a {e.straightness_steps}-step path of {n} samples "
                          f"(evaluate.n_samples {n})", base=weights_infer))
        infer("evaluate.latency_batch", e.latency_batch, "the latency batch")
    return needs


def sample_needs(arch: dict[str, Any], n: int, steps: int, solver: str) -> list[Need]:
    """What ``rectflow sample --n N --steps K`` needs at once (lower bounds)."""
    cost = _net_cost(arch)
    if cost is None:
        return []
    n_params, _, infer_row, _ = cost
    shape = tuple(int(s) for s in arch["shape"])
    d = math.prod(shape)
    per_row = infer_row + 4 * d * (7 if solver == "rk45" else 3) + 3 * 4 * d  # + the numpy copy and the table
    return [Need("--n", n, n * per_row, f"solving {n} samples of shape {shape} at once, and the network",
                 base=4 * n_params),
            Need("--steps", steps, 8 * (steps + 1), f"the time grid of {steps} steps")]


def _n_test(root: Path) -> int | None:
    from rectflow.data import DataError, prepared_meta

    try:
        return int(prepared_meta(root / "data" / "prepared")["target"]["n_test"])
    except (DataError, KeyError, TypeError, ValueError):
        return None


def check_memory(needs: list[Need], device: Any = None) -> None:
    """Raise ParamsError naming the size whose lower bound exceeds the memory there is (the largest first)."""
    avail: dict[str, tuple[int, str] | None] = {}
    for need in sorted(needs, key=lambda x: -x.bytes):
        if need.where not in avail:
            avail[need.where] = available_memory(need.where, device)
        have = avail[need.where]
        if have is not None and need.bytes + need.base > have[0]:
            raise ParamsError(
                f"{need.key}: {need.value} needs at least {human_bytes(need.bytes + need.base)} at once ({need.what}), but "
                f"{human_bytes(max(have[0], 0))} of memory is available ({have[1]}); lower it")


_OOM = re.compile(r"can't allocate memory|out of memory|not enough memory|cannot allocate memory|"
                  r"std::bad_alloc|alloc_cpu", re.I)


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: MemoryError (numpy's too), torch's OutOfMemoryError, or an allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory")."""
    if isinstance(e, MemoryError):
        return True
    try:
        import torch

        if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
            return True
    except ImportError:
        pass
    return isinstance(e, RuntimeError) and bool(_OOM.search(str(e)))
