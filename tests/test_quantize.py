"""Quantized students (issue #17): int4 packing and grid, AWQ's search, both backends, refusals, Pareto front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from rectflow.models import load_model
from rectflow.nets import MLPVelocity, ModelError, save_model
from rectflow.quant import (build_int4, dequantize_int4, int4_state, pack_int4, quantize_int4,
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
    """The search through int4_state on a one-layer model (its output is the layer's): the α it
    picks gives no more output error than round-to-nearest, and much less with salient channels."""
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=g))
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 30  # a few salient input channels, as AWQ observes in real activations

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = layer

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = One().eval()
    state, report = int4_state(model, 64, (x, torch.zeros(512)))
    rtn_state, _ = int4_state(model, 64, None)
    ref = x @ layer.weight.detach().T

    def err(st: dict) -> float:
        w = dequantize_int4(unpack_int4(st["fc.weight.q4"]), st["fc.weight.scale4"], st["fc.weight.offset4"], 64).detach()
        if "fc.weight.act" in st:
            w = w / st["fc.weight.act"]
        return float((x @ w.T - ref).pow(2).sum() / ref.pow(2).sum())

    awq, rtn = err(state), err(rtn_state)
    assert report["fc"]["alpha"] > 0 and awq <= rtn + 1e-12 and awq < 0.7 * rtn
    assert state["fc.weight.act"].shape == (64,)


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


# ---- fp8 (E4M3) ----------------------------------------------------------------------------------

def test_fp8_weights_round_within_e4m3s_precision():
    from rectflow.fp8 import E4M3_MAX, fp8_state

    m = MLPVelocity((2,), 64, 2, 16).eval()
    state = fp8_state(m)
    for key, w in m.state_dict().items():
        if key.endswith(".weight"):
            q, s = state[f"{key}.f8"], state[f"{key}.scale8"]
            assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == (w.shape[0],)
            back = q.float() * s[:, None]
            # 3 mantissa bits: relative error ≤ 2⁻⁴ for normal values, plus the subnormal step 2⁻⁹·s
            assert bool(((back - w).abs() <= w.abs() / 16 + s[:, None] * 2 ** -9 + 1e-12).all())
            assert torch.allclose(q.float().abs().amax(1), torch.full((w.shape[0],), E4M3_MAX))
        else:
            assert torch.equal(state[key], w.float())


def test_fp8_linear_emulated_is_the_e4m3_product_and_loads_through_load_model(tmp_path):
    from rectflow.fp8 import Fp8Linear, fp8_native, fp8_state, quantize_e4m3

    torch.manual_seed(6)
    lin = nn.Linear(24, 10)
    q, s = quantize_e4m3(lin.weight, 1)
    layer = Fp8Linear(q, s.reshape(-1), lin.bias.detach(), "emulated")
    x = torch.randn(7, 24)
    qx, a = quantize_e4m3(x, 1)
    expected = (qx.float() * a) @ (q.float() * s).T + lin.bias
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected)
    native, why = fp8_native("cpu")
    assert not native and "cpu" in why
    m = MLPVelocity((2,), 256, 3, 64).eval()
    arch = ARCH | {"hidden": 256, "depth": 3, "time_embed": 64}
    save_model(tmp_path / "s-fp8", fp8_state(m), arch, {"quant": "fp8", "backend": "emulated"})
    save_model(tmp_path / "s", m.state_dict(), arch, {})
    f8, card = load_model(tmp_path / "s-fp8")
    z, t = torch.randn(256, 2), torch.rand(256)
    with torch.inference_mode():
        out, ref = f8(z, t), m(z, t)
    assert card["meta"]["quant"] == "fp8"
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-2
    ratio = (tmp_path / "s-fp8.safetensors").stat().st_size / (tmp_path / "s.safetensors").stat().st_size
    assert ratio <= 0.27, ratio


def test_a_card_that_does_not_fit_the_fp8_weights_is_refused(tmp_path):
    from rectflow.fp8 import fp8_state

    state = fp8_state(MLPVelocity((2,), 64, 2, 16).eval())
    save_model(tmp_path / "v", state, ARCH | {"hidden": 128}, {"quant": "fp8"})
    with pytest.raises(ModelError, match=r"v\.safetensors: fp8 weights do not match the architecture"):
        load_model(tmp_path / "v")
    state["net.0.weight.f8"] = state["net.0.weight.f8"].float()  # not E4M3
    save_model(tmp_path / "d", state, ARCH, {"quant": "fp8"})
    with pytest.raises(ModelError, match="net.0.weight.f8: torch.float32, expected float8_e4m3fn"):
        load_model(tmp_path / "d")
    state.pop("net.2.weight.scale8")
    save_model(tmp_path / "m", state, ARCH, {"quant": "fp8"})
    with pytest.raises(ModelError, match="missing 'net.2.weight.scale8'"):
        load_model(tmp_path / "m")
