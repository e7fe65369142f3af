"""Where the pipeline's files live, relative to the workspace root (docs/contract.md, "Files")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Paths of one workspace. Only this class knows the layout."""

    root: Path = Path(".")

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def couplings(self) -> Path:
        return self.root / "data" / "couplings"

    def round_dir(self, k: int) -> Path:
        return self.couplings / f"round-{k}"

    @property
    def state(self) -> Path:
        """rectflow's own state in the workspace (never tracked by DVC or git): ``.rectflow``."""
        return self.root / ".rectflow"

    def staging(self, what: str) -> Path:
        """In-progress work (resumable; never under a final name, never tracked by DVC)."""
        return self.state / "staging" / what

    @property
    def warm(self) -> Path:
        """The flow a fine-tuning pretrain starts from (``rf1.safetensors``, ``rf1.json``, ``warm.json``
        naming the champion and the data version it is for): ``.rectflow/warm``."""
        return self.state / "warm"

    @property
    def kept(self) -> Path:
        """Where finished work is kept against a crash until its stage completes: ``.rectflow/finished``."""
        return self.state / "finished"

    def finished(self, name: str) -> Path:
        """Stem of a finished model's copy kept until its stage completes (never tracked by DVC,
        which deletes a stage's outputs before it reruns it): ``.rectflow/finished/NAME``."""
        return self.kept / name

    def checkpoints(self, name: str) -> Path:
        return self.state / "checkpoints" / name

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        """Stem of a model: ``models/NAME`` (+ ``.safetensors`` / ``.json``)."""
        return self.models / name

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def stage_metrics(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def history(self, name: str) -> Path:
        return self.plots / "train" / f"{name}.csv"
