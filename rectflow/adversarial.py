"""Adversarial distillation: a discriminator that tells the teacher's samples from the student's.

A one-step student trained by regression alone, ``min E‖(Z1 − Z0) − v(Z0, 0)‖²``, learns the
conditional mean of a map it cannot represent exactly, and its errors show as a loss of sharpness,
not of modes (digits: k-NN precision 0.844 against its teacher's 0.891, recall equal). Published
one-step distillers add an adversarial term to the regression (Adversarial Diffusion Distillation,
Sauer et al. 2023; Consistency Trajectory Models, Kim et al. 2023). rectflow's version uses nothing
but the teacher's own pairs: the "real" samples are the pairs' Z1 (the teacher's ODE outputs, no
extra data, and not the evaluation's feature network); the discriminator ``D`` is trained from
scratch beside the student, with the hinge loss (Lim & Ye 2017) and spectral normalisation of every
layer (Miyato et al. 2018)::

    x̂1  = x_t + (1 − t)·v(x_t, t)                       (the student's jump to t = 1; x̂1 = Z0 + v(Z0, 0) at t = 0)
    L_D = E[max(0, 1 − D(Z1))] + E[max(0, 1 + D(x̂1))]   (one step of D per training step, on a detached x̂1)
    L_v = D_loss(Z1 − Z0, v(x_t, t)) − λ·E[D(x̂1)]        (the student's loss; λ = ``distill.adversarial.weight``)

Time convention as everywhere (:mod:`rectflow`): x0 = Z0 is the source, x1 = Z1 the target.
The discriminator is a small convolutional net for images ``(c, h, w)`` (stride-2 4×4 convolutions
down to a side of 2 or 3, then a linear layer) and an MLP for vectors ``(d,)``; it runs under the
student's autocast (bf16 with ``precision: bf16``), its losses in fp32.

A conditional student (labelled pairs, ``arch.classes`` = K) gets a *projection* discriminator
(Miyato & Koyama 2018, "cGANs with Projection Discriminator")::

    D(x, y) = ψ(φ(x)) + ⟨e_y, φ(x)⟩                     (φ: the body's features, ψ: its last linear layer)

with a spectrally normalised class embedding e (K rows), so the adversarial term asks each x̂1 to look
like the teacher's samples *of its own class*, not of any class. The real and fake halves of a batch
carry the same labels (each pair's y), so D cannot tell them apart by the label alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["Adversary", "Discriminator"]


def _down_steps(h: int, w: int) -> int:
    """How many times a stride-2 4×4 convolution (padding 1) halves ``(h, w)`` while both sides are
    even and ≥ 4: 8×8 → 2, 28×28 → 2 (7×7), 32×32 → 4 (2×2)."""
    n = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) >= 4:
        h, w, n = h // 2, w // 2, n + 1
    return n


class Discriminator(nn.Module):
    """``D(x)``: ``(B, *shape) -> (B,)``, a real-valued score (high: looks like the teacher's Z1).

    Args:
        shape: ``(c, h, w)`` for images or ``(d,)`` for vectors.
        channels: base width; images double it at every downsampling (capped at 4×), vectors use
            two hidden layers of ``4 · channels``.
        classes: K > 0: a projection discriminator ``D(x, y)`` over labels in [0, K) (its class
            embedding is created after the body, so an unconditional D's weights are unchanged).
    """

    def __init__(self, shape: tuple[int, ...], channels: int = 32, classes: int = 0) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) == 3:
            c, h, w = self.shape
            layers: list[nn.Module] = [spectral_norm(nn.Conv2d(c, channels, 3, padding=1)), nn.LeakyReLU(0.2)]
            width = channels
            for _ in range(_down_steps(h, w)):
                nxt = min(2 * width, 4 * channels)
                layers += [spectral_norm(nn.Conv2d(width, nxt, 4, 2, 1)), nn.LeakyReLU(0.2)]
                width, h, w = nxt, h // 2, w // 2
            layers += [nn.Flatten(), spectral_norm(nn.Linear(width * h * w, 1))]
        elif len(self.shape) == 1:
            hidden = 4 * channels
            layers = [spectral_norm(nn.Linear(self.shape[0], hidden)), nn.LeakyReLU(0.2),
                      spectral_norm(nn.Linear(hidden, hidden)), nn.LeakyReLU(0.2),
                      spectral_norm(nn.Linear(hidden, 1))]
        else:
            raise ValueError(f"Discriminator: shape must be (c, h, w) or (d,), got {self.shape}")
        self.net = nn.Sequential(*layers)
        self.classes = int(classes)
        self.embed = (spectral_norm(nn.Embedding(self.classes, layers[-1].in_features))
                      if self.classes > 0 else None)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Scores ``(B,)`` of ``x`` ``(B, *shape)``; ``y`` ``(B,)`` int64 labels for a conditional D."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Discriminator: x must have shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")
        if self.embed is None:
            if y is not None:
                raise ValueError("Discriminator: y: this discriminator is unconditional (classes=0)")
            return self.net(x).squeeze(1)
        if y is None or y.shape != (x.shape[0],):
            raise ValueError(f"Discriminator: y must have shape ({x.shape[0]},) for a conditional discriminator, "
                             f"got {None if y is None else tuple(y.shape)}")
        feat = self.net[:-1](x)  # φ(x): (B, F)
        return self.net[-1](feat).squeeze(1) + (self.embed(y).to(feat.dtype) * feat).sum(1)


class Adversary:
    """The discriminator, its optimiser and the two hinge losses, as :func:`rectflow.train.train` uses them.

    Each training step calls :meth:`student_term` once: it first updates ``D`` on the batch's real
    ``Z1`` and the detached student samples, then returns ``−λ·E[D(x̂1)]`` with ``D``'s weights frozen
    (gradients flow to the student only). Under ``torch.distributed`` ``D`` is wrapped in DDP, so its
    gradients are averaged over ranks as the student's are. Its state (weights, optimiser) is part of
    the training checkpoint, so a resumed run continues with the same discriminator.
    """

    def __init__(self, shape: tuple[int, ...], weight: float, lr: float, channels: int, seed: int,
                 device: torch.device | str = "cpu", classes: int = 0) -> None:
        self.weight = float(weight)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.disc = Discriminator(shape, channels, classes).to(device)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.5, 0.999))
        self.net: nn.Module = self.disc
        self.params = list(self.disc.parameters())
        self.last_d_loss = torch.zeros((), device=device)  # device-side: read only when logged

    def distribute(self) -> None:
        """Wrap ``D`` in DDP (call once ``torch.distributed`` is initialised and world > 1)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = self.params[0].device
        self.net = DDP(self.disc, device_ids=[dev.index] if dev.type == "cuda" else None)

    def student_term(self, fake: Tensor, real: Tensor, y: Tensor | None = None) -> Tensor:
        """One discriminator step, then the student's adversarial loss ``−λ·E[D(fake)]`` (a scalar).

        ``fake`` ``(B, *shape)``: the student's x̂1 (with its graph); ``real`` ``(B, *shape)``: Z1;
        ``y`` ``(B,)``: the pairs' labels, for a conditional (projection) discriminator only.
        """
        fake, real = fake.float(), real.float()
        if (y is not None) != (self.disc.classes > 0):
            raise ValueError(f"Adversary: labels {'given to an unconditional' if y is not None else 'missing for a conditional'} "
                             "discriminator")
        both = {} if y is None else {"y": torch.cat([y, y])}
        scores = self.net(torch.cat([real, fake.detach()]), **both).float()  # one forward and backward (DDP-friendly)
        d_loss = F.relu(1.0 - scores[: len(real)]).mean() + F.relu(1.0 + scores[len(real) :]).mean()
        self.opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_d_loss = d_loss.detach()
        for p in self.params:
            p.requires_grad_(False)
        try:
            return -self.weight * self.disc(fake, **({} if y is None else {"y": y})).float().mean()
        finally:
            for p in self.params:
                p.requires_grad_(True)

    def state_dict(self) -> dict[str, Any]:
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])
