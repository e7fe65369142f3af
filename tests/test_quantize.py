"""Quantized students (issue #17): int4 packing and grid, AWQ's search, both backends, refusals, Pareto front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rectflow.models import load_model
from rectflow.nets import MLPVelocity, ModelError, save_model
from rectflow.quant import (awq_scales, build_int4, dequantize_int4, int4_state, pack_int4, quantize_int4,
                            unpack_int4)

ARCH = {"kind": "mlp", "shape": [2], "hidden": 64, "depth": 2, "time_embed": 16}


def _kernel() -> bool:
    try:
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 1)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def test_pack_unpack_is_exact_and_two_per_byte():
    q = torch.randint(0, 16, (7, 130), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (7, 65)
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # column 2j in the low nibble
    with pytest.raises(ValueError, match="even"):
        pack_int4(q[:, :3])


def test_weights_on_the_grid_come_back_exactly():
    g = torch.Generator().manual_seed(1)
    n, k, group = 5, 96, 32
    scale = (torch.rand(n, k // group, generator=g) + 0.1).half().float()
    offset = (torch.randn(n, k // group, generator=g)).half().float()
    codes = torch.randint(0, 16, (n, k), generator=g)
    codes[:, ::group] = 0  # every group spans its whole range, so min/max give back scale and offset
    codes[:, 1::group] = 15
    w = (codes.view(n, -1, group) * scale[..., None] + offset[..., None]).view(n, k)
    q, sc, off = quantize_int4(w, group)
    assert torch.equal(q.long(), codes) and torch.equal(dequantize_int4(q, sc, off, k), w)


def test_padding_and_error_bound():
    w = torch.randn(8, 66, generator=torch.Generator().manual_seed(2))
    q, sc, off = quantize_int4(w, 64)
    assert q.shape == (8, 128) and sc.shape == (8, 2)
    back = dequantize_int4(q, sc, off, 66)
    assert back.shape == w.shape
    half_step = sc.float().repeat_interleave(64, 1)[:, :66] / 2
    assert bool(((back - w).abs() <= half_step * 1.01 + 1e-3).all())  # round-to-nearest: within half a step


def test_awq_never_worse_than_round_to_nearest_and_helps_outlier_channels():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 30  # a few salient input channels, as AWQ observes in real activations
    s, alpha, err = awq_scales(w, x, 64)
    q, sc, off = quantize_int4(w, 64)
    ref = x @ w.T
    rtn = ((x @ dequantize_int4(q, sc, off, 64).T - ref).pow(2).sum() / ref.pow(2).sum()).item()
    assert err <= rtn + 1e-12 and alpha > 0 and err < 0.7 * rtn
    assert s.shape == (64,)


@pytest.mark.skipif(not _kernel(), reason="this torch build has no x86 int4 kernel")
def test_both_backends_compute_the_same_layer():
    torch.manual_seed(4)
    m = MLPVelocity((2,), 64, 2, 16).eval()
    calib = (torch.randn(128, 2), torch.zeros(128))
    state, report = int4_state(m, 32, calib)
    assert set(report) == {"net.0", "net.2", "net.4"}
    card = {"arch": ARCH, "meta": {"group_size": 32}}
    a, b = (build_int4(card, state, be, Path("x")) for be in ("dequant", "int4pack"))
    z, t = torch.randn(300, 2), torch.rand(300)
    with torch.inference_mode():
        assert torch.allclose(a(z, t), b(z, t), atol=1e-4)


def test_saved_int4_loads_through_load_model_and_is_small(tmp_path):
    torch.manual_seed(5)
    arch = ARCH | {"hidden": 256, "depth": 3, "time_embed": 64}
    m = MLPVelocity((2,), 256, 3, 64).eval()
    state, _ = int4_state(m, 64, (torch.randn(256, 2), torch.zeros(256)))
    save_model(tmp_path / "s-int4", state, arch, {"quant": "int4", "group_size": 64, "backend": "dequant"})
    save_model(tmp_path / "s", m.state_dict(), arch, {})
    q, card = load_model(tmp_path / "s-int4")
    z, t = torch.randn(64, 2), torch.zeros(64)
    with torch.inference_mode():
        out, ref = q(z, t), m(z, t)
    assert out.shape == ref.shape and card["meta"]["quant"] == "int4"
    ratio = (tmp_path / "s-int4.safetensors").stat().st_size / (tmp_path / "s.safetensors").stat().st_size
    assert ratio <= 0.2, ratio


def test_a_card_that_does_not_fit_the_int4_weights_is_refused(tmp_path):
    m = MLPVelocity((2,), 64, 2, 16).eval()
    state, _ = int4_state(m, 32, None)
    save_model(tmp_path / "v", state, ARCH | {"hidden": 128}, {"quant": "int4", "group_size": 32})
    with pytest.raises(ModelError, match=r"v\.safetensors: int4 weights do not match the architecture"):
        load_model(tmp_path / "v")
    save_model(tmp_path / "g", state, ARCH, {"quant": "int4", "group_size": 64})  # the wrong group size
    with pytest.raises(ModelError, match="int4 weights do not match"):
        load_model(tmp_path / "g")
    state.pop("net.2.weight.scale4")
    save_model(tmp_path / "m", state, ARCH, {"quant": "int4", "group_size": 32})
    with pytest.raises(ModelError, match="missing 'net.2.weight.scale4'"):
        load_model(tmp_path / "m")
    card = json.loads((tmp_path / "m.json").read_text())
    card["meta"]["quant"] = "int3"
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="unknown quantization 'int3'"):
        load_model(tmp_path / "m")


def test_renamed_and_repeated_variants_are_one_line():
    from rectflow.config import ParamsError
    from rectflow.params import load_params

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ParamsError, match="int8 and half were replaced by variants"):
        load_params(root / "params.yaml", ["quantize.half=false"])
    with pytest.raises(ParamsError, match="quantize.variants: each variant at most once"):
        load_params(root / "params.yaml", ["quantize.variants=[int4, int4]"])


def test_pareto_front_keeps_exactly_the_undominated_points():
    from tasks.evaluate import pareto_front

    pts = [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0), (4.0, 1.0), (2.0, 2.0), (5.0, 5.0)]
    assert pareto_front(pts) == [0, 1, 3, 4]  # ties stay; (3, 3) and (5, 5) are beaten by (2, 2)
    assert pareto_front([]) == []
