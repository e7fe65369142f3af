"""Adversarial distillation (rectflow.adversarial): the discriminator's shapes, one step of the
hinge game, the student's term, and the training loop with it across a crash and resume."""

from __future__ import annotations

import pytest
import torch

from rectflow.adversarial import Adversary, Discriminator
from rectflow.config import DistillParams, ParamsError
from rectflow.params import load_params
from rectflow.data import Distribution, generate_2d
from rectflow.nets import MLPVelocity
from rectflow.sources import IndependentPairs
from rectflow.train import train, weights_sha256
from tests.test_train_loop import Crash, CrashingPairs


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 28, 28), (2, 6, 10), (4, 5, 5), (2,), (64,)])
def test_discriminator_scores_one_number_per_sample(shape):
    d = Discriminator(shape, channels=8)
    assert d(torch.randn(5, *shape)).shape == (5,)


def test_discriminator_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\), got \(5, 1, 16, 16\)"):
        Discriminator((1, 8, 8), 8)(torch.randn(5, 1, 16, 16))
    with pytest.raises(ValueError, match="shape must be"):
        Discriminator((2, 3), 8)


def test_hinge_game_separates_real_from_fake_and_only_the_student_gets_the_term_gradient():
    """Real N(2, 1) against fake N(0, 1) in 2-D: D's step lowers its hinge loss; the student's term
    −λ·E[D(fake)] has a gradient for the fake samples that points towards the real ones, and none
    reaches D's weights."""
    adv = Adversary((2,), weight=0.5, lr=1e-3, channels=16, seed=0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        real = torch.randn(256, 2, generator=gen) + 2.0
        fake = torch.randn(256, 2, generator=gen).requires_grad_(True)
        term = adv.student_term(fake, real)
        losses.append(float(adv.last_d_loss))
    assert sum(losses[-20:]) / 20 < 1.0 < losses[0]  # 2 at chance; separable sets fall well below
    term.backward()
    assert all(p.grad is None for p in adv.disc.parameters())
    assert all(p.requires_grad for p in adv.disc.parameters())
    step = -fake.grad.mean(0)  # gradient descent on the term moves the fakes this way
    assert step[0] > 0 and step[1] > 0
    with torch.no_grad():  # (each training-mode forward refines the spectral norm's estimate a little)
        assert term.item() == pytest.approx(-0.5 * float(adv.disc(fake).mean()), rel=1e-3)


def test_same_seed_same_discriminator():
    a, b = Adversary((1, 8, 8), 0.1, 1e-4, 8, seed=3), Adversary((1, 8, 8), 0.1, 1e-4, 8, seed=3)
    sa, sb = a.disc.state_dict(), b.disc.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("shape", [(1, 8, 8), (2,)])
def test_projection_discriminator_adds_the_class_term_and_keeps_the_unconditional_weights(shape):
    """D(x, y) = ψ(φ(x)) + ⟨e_y, φ(x)⟩: with the class embedding zeroed it is the unconditional D of
    the same seed (whose weights a conditional D shares, name for name); the score depends on y."""
    torch.manual_seed(1)
    plain = Discriminator(shape, 8)
    torch.manual_seed(1)
    cond = Discriminator(shape, 8, classes=3)
    ps, cs = plain.state_dict(), cond.state_dict()
    assert all(torch.equal(ps[k], cs[k]) for k in ps)
    assert {k for k in cs if k not in ps} == {k for k in cs if k.startswith("embed.")}
    x = torch.randn(6, *shape)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cond.eval(), plain.eval()
    with torch.no_grad():
        a, b = cond(x, y), cond(x, (y + 1) % 3)
        assert a.shape == (6,) and not torch.allclose(a, b)
        feat = cond.net[:-1](x)
        e = cond.embed(y)  # spectral-normalised rows
        assert torch.allclose(a, cond.net[-1](feat).squeeze(1) + (e * feat).sum(1), atol=1e-6)
        assert torch.allclose(a - (e * feat).sum(1), plain(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"y must have shape \(6,\)"):
        cond(x)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, y)


def test_conditional_adversary_learns_the_class_of_each_sample():
    """Real samples of class c sit at +2 (c = 0) or −2 (c = 1); fakes of the *wrong* class's mean
    are told apart only through the label: the projection D's hinge loss falls below chance, and the
    student's gradient moves each fake towards its own class's mean."""
    adv = Adversary((2,), weight=0.5, lr=2e-3, channels=16, seed=0, classes=2)
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(256) % 2
    sign = (1.0 - 2.0 * y.float())[:, None]  # class 0: +1, class 1: −1
    for _ in range(300):
        real = torch.randn(256, 2, generator=gen) * 0.3 + 2.0 * sign
        fake = (torch.randn(256, 2, generator=gen) * 0.3 - 2.0 * sign).requires_grad_(True)  # each at the other class
        term = adv.student_term(fake, real, y)
    assert float(adv.last_d_loss) < 1.0
    term.backward()
    step = -fake.grad  # descent direction per sample
    assert (step[y == 0].mean(0) > 0).all() and (step[y == 1].mean(0) < 0).all()
    with pytest.raises(ValueError, match="missing for a conditional"):
        adv.student_term(fake, real)


def _run(ckpt_dir, cfg, crash_at=None):
    target = Distribution((2,), torch.from_numpy(generate_2d("moons", 2000, 0)))
    torch.manual_seed(0)
    model = MLPVelocity((2,), 16, 2, 8)
    batches = CrashingPairs(Distribution((2,)), target, 0, crash_at=crash_at)
    adv = Adversary((2,), cfg.adversarial.weight, cfg.adversarial.lr, cfg.adversarial.channels, seed=5)
    res = train(model, batches, cfg, name="d", seed=0, checkpoint_dir=ckpt_dir, run_fingerprint="f",
                time_dist="discrete", k=1, adversary=adv)
    return model, adv, res


def test_training_with_the_adversary_resumes_bit_identically(tmp_path):
    """A distillation with the term dies at step 46 (checkpoint at 40), resumes and ends with the
    weights of the uninterrupted run: the discriminator and its optimiser are in the checkpoint."""
    cfg = DistillParams(steps=60, batch_size=64, lr=1e-2, log_every=5, checkpoint_every=20,
                        adversarial={"weight": 0.1, "lr": 1e-3, "channels": 8})
    full, adv_full, res = _run(tmp_path / "a", cfg)
    with pytest.raises(Crash):
        _run(tmp_path / "b", cfg, crash_at=46)
    resumed, adv_b, res_b = _run(tmp_path / "b", cfg)
    assert res_b.resumed_from == 40
    assert weights_sha256(resumed) == weights_sha256(full)
    assert weights_sha256(adv_b.disc) == weights_sha256(adv_full.disc)
    # the logged loss is the regression alone (positive), not the sum with −λ·E[D]
    assert all(h["loss"] > 0 for h in res.history)
    assert all(0 <= h["d_loss"] <= 4 for h in res.history)  # the discriminator's hinge loss, logged
    plain = DistillParams(steps=60, batch_size=64, lr=1e-2, log_every=5, checkpoint_every=20)
    torch.manual_seed(0)
    model = MLPVelocity((2,), 16, 2, 8)
    target = Distribution((2,), torch.from_numpy(generate_2d("moons", 2000, 0)))
    train(model, IndependentPairs(Distribution((2,)), target, 0), plain, name="p", seed=0,
          checkpoint_dir=tmp_path / "c", time_dist="discrete", k=1)
    assert weights_sha256(model) != weights_sha256(full)  # the term changes the student


def test_the_images_profile_turns_it_on_and_a_stage_key_turns_it_off(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert load_params(root / "params.yaml", []).distill.adversarial.weight == 0.0
    on = load_params(root / "params.yaml", ["data.target=digits"])
    assert on.distill.adversarial.weight == 0.01
    off = load_params(root / "params.yaml", ["data.target=digits", "distill.adversarial.weight=0"])
    assert off.distill.adversarial.weight == 0.0  # the built-in default, chosen explicitly, wins
    assert off.distill.batch_size == on.distill.batch_size == 128  # the profile's other keys stay
    with pytest.raises(ParamsError, match="wieght"):
        load_params(root / "params.yaml", ["distill.adversarial.wieght=1"])
    with pytest.raises(ParamsError, match="weight"):
        load_params(root / "params.yaml", ["distill.adversarial.weight=-1"])
