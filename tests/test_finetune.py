"""Quantization-aware fine-tuning (LSQ): the step-size gradient, bits and budget kept, the loss lowered,
resume to the same weights, export of the result, and the refusals."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mpqkit
from mpqkit import api
from mpqkit.cli import main
from mpqkit.errors import CheckpointError, DataError, MpqkitError
from mpqkit.plan import Plan
from mpqkit.quant.lsq import lsq_fake_quant, lsq_grad_scale
from mpqkit.quant.modules import QuantMixin
from mpqkit.quant.primitives import fake_quant, qrange


# ------------------------------------------------------------------------------ the LSQ quantizer
@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), seed=st.integers(0, 10_000),
       log_s=st.floats(-3.0, 0.5), g=st.sampled_from([1.0, 0.1]))
def test_lsq_step_gradient_matches_finite_differences(bits, symmetric, seed, log_s, g):
    """d(Σ c·x̂)/ds from autograd equals a central finite difference of the straight-through surrogate
    (rounding offset r − x/s frozen at s0, clamping kept), times the gradient scale g; and the forward
    equals fake_quant's grid."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, generator=gen, dtype=torch.float64) * 2
    c = torch.randn(64, generator=gen, dtype=torch.float64)
    qmin, qmax = qrange(bits, symmetric)
    zp = torch.tensor(0.0 if symmetric else float((qmin + qmax) // 2), dtype=torch.float64)
    s0 = torch.tensor(10.0 ** log_s, dtype=torch.float64)
    s = s0.clone().requires_grad_(True)
    out = lsq_fake_quant(x, s, zp, qmin, qmax, g)
    assert torch.allclose(out.detach(), fake_quant(x, s0, zp, qmin, qmax), rtol=0, atol=1e-12)
    (out * c).sum().backward()
    v0 = torch.clamp(x / s0 + zp, qmin, qmax)
    offset = torch.round(v0) - v0

    def surrogate(step: torch.Tensor) -> torch.Tensor:
        return ((torch.clamp(x / step + zp, qmin, qmax) + offset - zp) * step * c).sum()

    eps = float(s0) * 1e-6
    fd = (surrogate(s0 + eps) - surrogate(s0 - eps)) / (2 * eps)
    assert torch.allclose(s.grad, g * fd, rtol=1e-5, atol=1e-7)


def test_lsq_input_gradient_is_one_inside_the_range_and_zero_where_clamped():
    x = torch.tensor([-10.0, -0.3, 0.0, 0.26, 0.74, 10.0], requires_grad=True)  # 0.74 / 0.1 rounds to 7 = qmax
    lsq_fake_quant(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert lsq_grad_scale(9, 7) == pytest.approx(1 / (63 ** 0.5))


# ------------------------------------------------------------------------------ fine-tuning the digits model
@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", calib_size=256, progress=False)
    return res.plan.save(out / "plan.json")


def _ft(plan, out, **kw):
    kw = {"epochs": 2, "heldout": 200, "allow_small_data": True, "progress": False, **kw}
    return api.finetune("digits-cnn", plan, "digits", out, **kw)


def _calib_kl(qmodel) -> float:
    fp = api.load_model("digits-cnn").model
    x = api.calibration_set("digits", 256, 0).images
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(qmodel(x), -1), F.log_softmax(fp(x), -1), log_target=True,
                              reduction="batchmean"))


def test_finetune_keeps_bits_and_budget_and_lowers_the_calibration_loss(digits_plan, tmp_path):
    res = _ft(digits_plan, tmp_path / "ft", epochs=3)
    assert res["finished"] and len(res["history"]) == 3
    before, after = Plan.load(digits_plan), Plan.load(tmp_path / "ft" / "plan.json")
    assert after.layers == before.layers and after.budget == before.budget and after.costs == before.costs
    assert after.method_params["finetune"]["epochs_done"] == 3
    tuned = api.load_quantized("digits-cnn", tmp_path / "ft" / "model.pt")
    start = api.apply_plan("digits-cnn", before, "digits")
    assert _calib_kl(tuned) < 0.95 * _calib_kl(start)  # 0.91x measured (3 epochs, lr 1e-4, log steps)
    n = 0
    for name, m in tuned.named_modules():
        if isinstance(m, QuantMixin) and m.w_spec is not None:
            assert m.w_spec.bits == before.layers[name].w_bits
            assert torch.equal(fake_quant(m.weight, m.w_scale, m.w_zero_point, *m._w_range), m.weight)  # on its grid
            n += 1
    assert n == sum(lq.w_bits is not None for lq in before.layers.values())


def test_a_killed_finetune_resumes_to_the_same_weights(digits_plan, tmp_path):
    full = _ft(digits_plan, tmp_path / "full")
    part = _ft(digits_plan, tmp_path / "part", stop_after=1)
    assert not part["finished"] and not (tmp_path / "part" / "model.pt").exists()
    resumed = _ft(digits_plan, tmp_path / "part")
    assert resumed["finished"] and resumed["history"][0] == part["history"][0]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in full["history"]] == [h["loss"] for h in resumed["history"]]


def test_finetuned_model_exports_to_onnx_and_passes_the_check(digits_plan, tmp_path, capsys):
    _ft(digits_plan, tmp_path / "ft", epochs=1)
    model = str(tmp_path / "ft" / "model.pt")
    assert main(["export", "-q", "--model", "digits-cnn", "--data", "digits", "--quantized", model,
                 "--out", str(tmp_path / "m.onnx"), "--check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["check"]["top1_diff_pt"] <= 0.5
    assert main(["eval", "-q", "--model", "digits-cnn", "--data", "digits", "--quantized", model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 0.5
    assert main(["finetune", "-q", "--model", "digits-cnn", "--data", "digits", "--plan", str(digits_plan), "--epochs", "1",
                 "--seed", "3", "--heldout", "100", "--allow-small-data", "--out", str(tmp_path / "cli"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finetune"]["seed"] == 3


def test_finetune_refusals(digits_plan, tmp_path):
    with pytest.raises(DataError, match="--allow-small-data"):
        _ft(digits_plan, tmp_path / "small", allow_small_data=False)
    _ft(digits_plan, tmp_path / "ft", stop_after=1)
    with pytest.raises(MpqkitError, match="other settings.*lr"):
        _ft(digits_plan, tmp_path / "ft", lr=5e-4)
    (tmp_path / "ft" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="delete it"):
        _ft(digits_plan, tmp_path / "ft")
    with pytest.raises(MpqkitError, match="epochs"):
        _ft(digits_plan, tmp_path / "e", epochs=0)


def test_lsq_per_channel_step_gradient_equals_the_composed_straight_through_ops():
    """The fused autograd node (per-channel steps, as weights use) against the same quantizer written as
    plain ops with straight-through rounding: same forward, same gradients for x and every step."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    s = (torch.rand(6, 1, 1, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.05).requires_grad_(True)
    zp = torch.full((6, 1, 1, 1), 3.0, dtype=torch.float64)
    c = torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64)
    g = lsq_grad_scale(27, 7)
    (lsq_fake_quant(x, s, zp, 0, 7, g) * c).sum().backward()
    fused = (x.grad.clone(), s.grad.clone())
    x.grad = s.grad = None
    step = s * g + (s - s * g).detach()
    v = torch.clamp(x / step + zp, 0, 7)
    ref = ((v + (torch.round(v) - v).detach()) - zp) * step
    (ref * c).sum().backward()
    assert torch.allclose(fused[0], x.grad) and torch.allclose(fused[1], s.grad, rtol=1e-9, atol=1e-12)


def test_train_size_makes_an_epoch_of_that_many_images(digits_plan, tmp_path):
    from mpqkit.quant.finetune import FinetuneConfig, epoch_batches

    x, y = torch.arange(50.0).reshape(50, 1), torch.arange(50)
    cfg = FinetuneConfig(batch_size=8, train_size=20)
    first, second = ([int(i) for b in epoch_batches(x, y, cfg, e) for i in b[1]] for e in (0, 1))
    assert len(first) == len(second) == 20 and len(set(first)) == 20 and first != second
    with pytest.raises(MpqkitError, match="train size"):
        FinetuneConfig(train_size=0)


def test_log_domain_steps_move_by_the_same_ratio_whatever_their_size():
    """Adam on log s changes a step of 0.01 and a step of 1 by the same factor (on s itself it moves
    both by the same amount: the small one doubles); the forward is the same either way."""
    from mpqkit.quant.lsq import LsqQuantizer

    ratios = {}
    for log_domain in (True, False):
        for s0 in (0.01, 1.0):
            q = LsqQuantizer(torch.tensor(s0), torch.tensor(0.0), -8, 7, log_domain=log_domain)
            x = torch.linspace(-6, 6, 1001) * s0
            assert torch.equal(q(x), LsqQuantizer(torch.tensor(s0), torch.tensor(0.0), -8, 7)(x))
            opt = torch.optim.Adam(q.parameters(), lr=0.01)
            (q(x) - 0.9 * x).pow(2).sum().backward()
            opt.step()
            ratios[log_domain, s0] = float(q.step()) / s0
    assert abs(ratios[True, 0.01] - ratios[True, 1.0]) < 1e-4 and abs(ratios[True, 1.0] - 1) > 0.005
    assert abs(ratios[False, 0.01] - 1) > 0.5 and abs(ratios[False, 1.0] - 1) < 0.02


def test_train_norm_trains_the_norm_affine_and_nothing_else_of_the_norms(digits_plan, tmp_path):
    """--train-norm: the BatchNorm scale and shift move, their running statistics do not; without it
    every norm parameter stays as it was; the plan records the setting."""
    start = api.apply_plan("digits-cnn", Plan.load(digits_plan), "digits").state_dict()
    for norm in (False, True):
        res = _ft(digits_plan, tmp_path / f"ft{norm}", epochs=1, train_norm=norm)
        assert Plan.load(tmp_path / f"ft{norm}" / "plan.json").method_params["finetune"]["train_norm"] is norm
        tuned = api.load_quantized("digits-cnn", tmp_path / f"ft{norm}" / "model.pt").state_dict()
        for bn in ("bn1", "bn2", "bn3"):
            assert torch.equal(tuned[f"{bn}.running_mean"], start[f"{bn}.running_mean"])
            assert torch.equal(tuned[f"{bn}.running_var"], start[f"{bn}.running_var"])
            for p in ("weight", "bias"):
                assert torch.equal(tuned[f"{bn}.{p}"], start[f"{bn}.{p}"]) is not norm
        assert res["finished"]
