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
