"""PTQ reconstruction backends (AdaRound / BRECQ / QDrop): behaviour, grid invariants, API plumbing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mpqkit import api
from mpqkit.errors import DataError, MpqkitError
from mpqkit.plan import LayerQuant, Plan
from mpqkit.quant.apply import apply_plan
from mpqkit.quant.config import QuantConfig
from mpqkit.quant.brecq import ReconConfig, find_units, reconstruct, recon_config
from mpqkit.quant.modules import QuantMixin
from mpqkit.quant.primitives import fake_quant
from mpqkit.zoo.models import BasicBlock

from conftest import make_tiny, tiny_data


def _block_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), BasicBlock(8, 8))
    return net.eval()


def _calib(n: int = 128, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, 8, 8, generator=g).split(64))


def _quantized(net: nn.Module, w_bits: int = 3, a_bits: int | None = 8) -> nn.Module:
    layers = {f: LayerQuant(w_bits, a_bits) for f, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return apply_plan(net, Plan(layers=layers), torch.cat(_calib()), QuantConfig(rounding="nearest"))  # recon starts there


def test_units_are_residual_blocks_and_layers():
    units = find_units(_quantized(_block_net()), "block")
    assert [(u.fqn, u.layers) for u in units] == [("0", ["0"]), ("2", ["2.conv1", "2.conv2"])]
    per_layer = find_units(_quantized(_block_net()), "layer")
    assert [u.fqn for u in per_layer] == ["0", "2.conv1", "2.conv2"]


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_learned_rounding_lowers_block_output_error(granularity):
    """AdaRound's learned rounding beats nearest rounding on the unit's fp output (3-bit weights)."""
    net = _block_net()
    q = _quantized(net, w_bits=3, a_bits=None)
    stats = reconstruct(q, net, _calib(), ReconConfig(granularity=granularity, iters=1000, learn_act=False))
    rows = {r["unit"]: r for r in stats["units"]}
    inside = [rows["2"]] if granularity == "block" else [rows["2.conv1"], rows["2.conv2"]]
    for row in inside:  # units fed by a quantized layer: clear gains
        assert row["kept"] and row["mse_after"] < 0.9 * row["mse_before"], row
    assert all(r["mse_after"] <= r["mse_before"] for r in rows.values())  # never worse than nearest


def test_reconstructed_weights_stay_on_grid_and_round_up_or_down():
    net = _block_net()
    q = _quantized(net, w_bits=2)
    reconstruct(q, net, _calib(), ReconConfig(iters=200))
    changed = 0
    for fqn, m in q.named_modules():
        if not isinstance(m, QuantMixin):
            continue
        w = m.weight.detach()
        assert torch.equal(fake_quant(w, m.w_scale, m.w_zero_point, *m._w_range), w)  # exactly on the grid
        orig = net.get_submodule(fqn).weight.detach()
        lo = ((torch.floor(orig / m.w_scale) + m.w_zero_point).clamp(*m._w_range) - m.w_zero_point) * m.w_scale
        hi = ((torch.floor(orig / m.w_scale) + 1 + m.w_zero_point).clamp(*m._w_range) - m.w_zero_point) * m.w_scale
        assert torch.all(torch.isclose(w, lo, atol=1e-6) | torch.isclose(w, hi, atol=1e-6))  # floor or ceil only
        nearest = fake_quant(orig, m.w_scale, m.w_zero_point, *m._w_range)
        changed += int((~torch.isclose(w, nearest, atol=1e-6)).sum())
        assert m.weight_fn is None and m.input_fn is None  # learned quantizers removed
        assert "weight_fn" not in dict(m.named_modules())
    assert changed > 0  # the rounding was learned, not nearest


def test_lsq_moves_activation_steps_and_qdrop_is_seeded():
    net = _block_net()
    a = _quantized(net, w_bits=3, a_bits=4)
    before = {f: m.a_scale.clone() for f, m in a.named_modules() if isinstance(m, QuantMixin)}
    reconstruct(a, net, _calib(), ReconConfig(iters=100, drop=0.5, act_lr=1e-3, seed=3))
    moved = [f for f, m in a.named_modules() if isinstance(m, QuantMixin) and not torch.equal(m.a_scale, before[f])]
    assert moved
    b = _quantized(net, w_bits=3, a_bits=4)
    reconstruct(b, net, _calib(), ReconConfig(iters=100, drop=0.5, act_lr=1e-3, seed=3, cache_mb=0))  # memmap path
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_reconstruction_needs_data():
    net = _block_net()
    with pytest.raises(DataError, match="empty"):
        reconstruct(_quantized(net), net, [], ReconConfig(iters=1))


def test_backend_names_and_options():
    assert recon_config("mse") is None
    assert recon_config("brecq", iters=7).iters == 7
    assert recon_config("adaround").granularity == "layer"
    assert recon_config("qdrop").drop == 0.5
    with pytest.raises(MpqkitError, match="unknown PTQ backend 'gptq'"):
        recon_config("gptq")
    with pytest.raises(MpqkitError, match="no reconstruction options"):
        recon_config("minmax", iters=5)


def test_plan_from_a_search_method_applies_with_brecq(tmp_path):
    """Any method's plan goes through --ptq brecq, and the result saves and reloads exactly."""
    model = make_tiny()
    data = tiny_data(model)
    res = api.search(model, data, "avg-bits=3", "eval-delta", input_shape=(3, 8, 8), calib_size=64,
                     w_candidates=(2, 4, 8), progress=False)
    plain = api.apply_plan(model, res.plan, data, input_shape=(3, 8, 8))
    q = api.apply_plan(model, res.plan, data, input_shape=(3, 8, 8), ptq="brecq", recon_options={"iters": 50})
    assert any(not torch.equal(x, y) for x, y in zip(plain.state_dict().values(), q.state_dict().values()))
    path = api.save_quantized(q, res.plan, tmp_path / "q.pt")
    r = api.load_quantized(model, path, input_shape=(3, 8, 8))
    x = data.images[:16]
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    mm = api.apply_plan(model, res.plan, data, input_shape=(3, 8, 8), ptq="minmax")
    assert any(not torch.equal(x, y) for x, y in zip(plain.state_dict().values(), mm.state_dict().values()))
