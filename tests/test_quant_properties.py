"""Property tests of the quantization primitives and range observers (hypothesis)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpqkit.quant.observers import (
    RANGE_METHODS,
    ActivationObserver,
    QuantSpec,
    minmax_range,
    mse_range,
    percentile_range,
    quantize_weight,
    weight_qparams,
)
from mpqkit.quant.primitives import (
    channel_shape,
    dequantize,
    fake_quant,
    qparams,
    qrange,
    quantize,
    reduce_range,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Small 2-d float32 tensors (channels x elements) with arbitrary finite values, including
# exact zeros, repeated values, tiny and large magnitudes.
_elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
matrices = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
                      elements=_elements).map(torch.from_numpy)
bits_2_8 = st.integers(2, 8)
axes = st.sampled_from([None, 0])


def _random_tensor(seed: int, shape: tuple[int, ...], dist: str) -> torch.Tensor:
    """A continuous random tensor (for statistical properties that need a reasonable size)."""
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        return torch.randn(shape, generator=g)
    if dist == "uniform":
        return torch.rand(shape, generator=g) * 4 - 1
    if dist == "laplace":
        u = torch.rand(shape, generator=g).clamp(1e-6, 1 - 1e-6) - 0.5
        return -u.sign() * torch.log1p(-2 * u.abs())
    return torch.exp(torch.randn(shape, generator=g))  # lognormal: one-sided, heavy tail


seeds = st.integers(0, 2**31 - 1)
dists = st.sampled_from(["normal", "uniform", "laplace", "lognormal"])


def _tol(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Float32 slack: x * (1/scale) is off by a few ulps (so a tie can round the wrong way) and
    the dequantized value carries one rounding of its own."""
    return 1e-4 * scale + 1e-6 * x.abs() + 1e-12


# ----------------------------------------------------------------------------- qrange / basics


def test_qrange_values_and_validation() -> None:
    assert qrange(8, False) == (0, 255)
    assert qrange(8, True) == (-128, 127)
    assert qrange(1, False) == (0, 1)
    assert qrange(1, True) == (-1, 0)  # documented: 1-bit symmetric levels are {-scale, 0}
    assert qrange(16, True) == (-32768, 32767)
    for bad in (0, 17, -3, 2.0, True):
        with pytest.raises(ValueError):
            qrange(bad, False)  # type: ignore[arg-type]


@FAST
@given(x=matrices, bits=st.integers(1, 16), symmetric=st.booleans(), axis=axes)
def test_codes_are_integers_in_range(x: torch.Tensor, bits: int, symmetric: bool, axis: int | None) -> None:
    lo, hi = reduce_range(x, axis)
    assert lo.shape == hi.shape == channel_shape(x, axis)
    scale, zp = qparams(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    assert bool((scale > 0).all())
    assert torch.equal(zp, zp.round()) and bool(((zp >= qmin) & (zp <= qmax)).all())
    q = quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(q, q.round()) and bool(((q >= qmin) & (q <= qmax)).all())
    assert torch.equal(dequantize(q, scale, zp), fake_quant(x, scale, zp, qmin, qmax))


# ----------------------------------------------------------------------------- round trip


@FAST
@given(x=matrices, bits=bits_2_8, symmetric=st.booleans(), axis=axes, shrink=st.floats(0.05, 1.0))
def test_round_trip_error_at_most_half_step(x: torch.Tensor, bits: int, symmetric: bool, axis: int | None,
                                            shrink: float) -> None:
    """|fake_quant(x) - x| <= scale/2 inside the representable range; outside it, x maps to the
    nearest end of the grid. With the unshrunk min-max range every element is within scale/2
    (the zero-point rounding moves the grid ends by at most scale/2)."""
    lo, hi = reduce_range(x, axis)
    scale, zp = qparams(lo * shrink, hi * shrink, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    y = fake_quant(x, scale, zp, qmin, qmax)
    err = (y - x).abs()
    lo_rep, hi_rep = (qmin - zp) * scale, (qmax - zp) * scale
    inside = (x >= lo_rep) & (x <= hi_rep)
    bound = scale / 2 + _tol(scale, x)
    assert bool((err <= bound)[inside].all())
    nearest_end = torch.where(x < lo_rep, lo_rep, hi_rep).expand_as(x)
    assert torch.allclose(y[~inside], nearest_end[~inside], rtol=1e-6, atol=1e-12)
    if shrink == 1.0:
        assert bool((err <= bound).all())


@FAST
@given(x=matrices, bits=st.integers(1, 16), symmetric=st.booleans(), axis=axes, shrink=st.floats(0.05, 1.0))
def test_fake_quant_is_idempotent(x: torch.Tensor, bits: int, symmetric: bool, axis: int | None,
                                  shrink: float) -> None:
    lo, hi = reduce_range(x, axis)
    scale, zp = qparams(lo * shrink, hi * shrink, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    y = fake_quant(x, scale, zp, qmin, qmax)
    assert torch.equal(fake_quant(y, scale, zp, qmin, qmax), y)  # holds exactly, not just approx


# ----------------------------------------------------------------------------- monotonicity in bits


@FAST
@given(x=matrices, bits=st.integers(2, 15), symmetric=st.booleans(), axis=axes)
def test_step_and_worst_case_error_more_than_halve_per_bit(x: torch.Tensor, bits: int, symmetric: bool,
                                                           axis: int | None) -> None:
    """What holds for *every* tensor: with min-max ranges, scale(b+1) < scale(b)/2, so the
    worst-case error bound scale/2 more than halves with each extra bit, and the observed max
    error at b+1 bits is below scale(b)/4. (Not b=1 -> 2 symmetric: both have scale = max|x|.)"""
    lo, hi = reduce_range(x, axis)
    assume_nonzero = (torch.maximum(-lo.clamp(max=0), hi.clamp(min=0)) > 1e-6).all()
    s_b, _ = qparams(lo, hi, bits, symmetric)
    s_b1, zp_b1 = qparams(lo, hi, bits + 1, symmetric)
    if assume_nonzero:  # an all-zero channel has the floor scale at every bit-width
        assert bool((s_b1 < s_b / 2).all())
    err = (fake_quant(x, s_b1, zp_b1, *qrange(bits + 1, symmetric)) - x).abs()
    assert bool((err <= s_b / 4 + _tol(s_b1, x)).all())


@settings(max_examples=40, deadline=None)
@given(seed=seeds, dist=dists, bits=st.integers(2, 10), symmetric=st.booleans(), axis=axes)
def test_mse_decreases_with_bits_on_continuous_data(seed: int, dist: str, bits: int, symmetric: bool,
                                                    axis: int | None) -> None:
    """Statistical, not universal: on continuous random tensors of reasonable size (>= 256 values
    per channel), the min-max MSE at b+1 bits is <= the MSE at b bits (the expected MSE drops
    ~4x per bit). It is FALSE for arbitrary tensors: see the counterexample test below."""
    x = _random_tensor(seed, (4, 256), dist)
    mses = []
    for b in (bits, bits + 1):
        lo, hi = minmax_range(x, axis)
        scale, zp = qparams(lo, hi, b, symmetric)
        mses.append(float(((fake_quant(x, scale, zp, *qrange(b, symmetric)) - x) ** 2).mean()))
    assert mses[1] <= mses[0]


def test_mse_is_not_monotone_in_bits_for_every_tensor() -> None:
    """The naive claim 'MSE(b+1) <= MSE(b) for any tensor' is false: the (b+1)-bit grid is not a
    refinement of the b-bit grid, so data sitting on the 2-bit grid {0, 1/3, 2/3, 1} is exact at
    2 bits but not at 3 bits (grid k/7)."""
    x = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    lo, hi = minmax_range(x)

    def mse(b: int) -> float:
        scale, zp = qparams(lo, hi, b, False)
        return float(((fake_quant(x, scale, zp, *qrange(b, False)) - x) ** 2).mean())

    assert mse(2) < 1e-12 < mse(3)


# ----------------------------------------------------------------------------- 16 bits, zero


@FAST
@given(x=matrices, axis=axes)
def test_16_bits_is_nearly_exact(x: torch.Tensor, axis: int | None) -> None:
    lo, hi = reduce_range(x, axis)
    lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)
    for symmetric in (False, True):
        scale, zp = qparams(lo, hi, 16, symmetric)
        err = (fake_quant(x, scale, zp, *qrange(16, symmetric)) - x).abs()
        width = (hi0 - lo0) / 65535 if not symmetric else torch.maximum(-lo0, hi0) / 32767
        assert bool((err <= width / 2 + 1e-6 * (hi0 - lo0) + 1e-12).all())
        big = (hi0 - lo0).expand_as(x) > 1e-6  # below that the 1e-12 scale floor dominates
        rel = err / (hi0 - lo0).clamp(min=1e-30)
        assert bool((rel[big] < 2e-5).all())


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 16), symmetric=st.booleans(), per_channel=st.booleans(),
       method=st.sampled_from(RANGE_METHODS), seed=seeds, dist=dists, zero_frac=st.floats(0.0, 0.5))
def test_zero_is_exactly_representable(bits: int, symmetric: bool, per_channel: bool, method: str, seed: int,
                                       dist: str, zero_frac: float) -> None:
    w = _random_tensor(seed, (6, 3, 3, 3), dist)
    g = torch.Generator().manual_seed(seed + 1)
    w[torch.rand(w.shape, generator=g) < zero_frac] = 0.0
    w[0, 0, 0, 0] = 0.0
    spec = QuantSpec(bits, symmetric, per_channel, method)
    assert bool((quantize_weight(w, spec)[w == 0] == 0).all())
    scale, zp, qmin, qmax = weight_qparams(w, spec)
    assert bool((fake_quant(torch.zeros(w.shape), scale, zp, qmin, qmax) == 0).all())


def test_zero_is_exactly_representable_every_spec() -> None:
    """Exhaustive over every spec, including all-zero and one-sided channels."""
    w = torch.randn(4, 5)
    w[1] = 0.0
    w[2] = w[2].abs() + 1.0
    w[3] = -w[3].abs() - 1.0
    w[:, 0] = 0.0
    for bits, sym, pc, method in itertools.product(range(1, 17), (False, True), (False, True), RANGE_METHODS):
        wq = quantize_weight(w, QuantSpec(bits, sym, pc, method))
        assert bool((wq[w == 0] == 0).all()), (bits, sym, pc, method)
        assert bool(torch.isfinite(wq).all())


# ----------------------------------------------------------------------------- STE


@FAST
@given(seed=seeds, dist=dists, bits=bits_2_8, symmetric=st.booleans(), axis=axes,
       pct=st.floats(90.0, 99.0))
def test_ste_gradient_is_one_inside_zero_when_clamped(seed: int, dist: str, bits: int, symmetric: bool,
                                                      axis: int | None, pct: float) -> None:
    x = _random_tensor(seed, (4, 200), dist)
    x[:, 0] = x[:, 0] * 50 + torch.sign(x[:, 0]) * 20  # 0.5% outliers: a <= 99% range clips them
    lo, hi = percentile_range(x, pct, axis)
    scale, zp = qparams(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    xg = x.clone().requires_grad_(True)
    y = fake_quant(xg, scale, zp, qmin, qmax)
    y.sum().backward()
    assert xg.grad is not None
    grad = xg.grad
    assert torch.equal(y.detach(), fake_quant(x, scale, zp, qmin, qmax))  # same values with/without grad
    lo_rep, hi_rep = (qmin - zp) * scale, (qmax - zp) * scale
    inside = (x >= lo_rep) & (x <= hi_rep)
    far_out = (x < lo_rep - scale) | (x > hi_rep + scale)  # beyond any rounding ambiguity
    assert bool((grad[inside] == 1).all())
    assert bool((grad[far_out] == 0).all())
    assert bool(far_out.any())  # the outliers really were clamped
    assert bool(((grad == 0) | (grad == 1)).all())


def test_ste_gradient_per_channel_broadcast_and_no_grad_to_qparams() -> None:
    x = torch.tensor([[-2.0, 0.1, 0.5, 3.0], [0.0, 0.2, 0.4, 10.0]], requires_grad=True)
    scale = torch.tensor([[0.01], [0.002]], requires_grad=True)
    zp = torch.tensor([[100.0], [0.0]])
    y = fake_quant(x, scale, zp, 0, 255)
    y.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]))
    assert scale.grad is None


# ----------------------------------------------------------------------------- MSE range


@settings(max_examples=40, deadline=None)
@given(seed=seeds, dist=dists, bits=st.integers(1, 8), symmetric=st.booleans(), axis=axes,
       p=st.sampled_from([1.0, 2.0, 2.4]), channels=st.integers(1, 8), n=st.integers(1, 300))
def test_mse_range_never_worse_than_minmax(seed: int, dist: str, bits: int, symmetric: bool,
                                           axis: int | None, p: float, channels: int, n: int) -> None:
    x = _random_tensor(seed, (channels, n), dist)
    qmin, qmax = qrange(bits, symmetric)
    red = tuple(range(x.dim())) if axis is None else (1,)

    def err(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale, zp = qparams(lo, hi, bits, symmetric)
        return ((fake_quant(x, scale, zp, qmin, qmax) - x).abs() ** p).sum(dim=red)

    lo_m, hi_m = minmax_range(x, axis)
    lo_s, hi_s = mse_range(x, bits, symmetric, axis, p=p)
    assert lo_s.shape == lo_m.shape
    # a shrink of the (zero-widened) min-max range, per channel
    assert bool((lo_s >= lo_m.clamp(max=0) - 1e-6).all() and (lo_s <= 0).all())
    assert bool((hi_s <= hi_m.clamp(min=0) + 1e-6).all() and (hi_s >= 0).all())
    e_s, e_m = err(lo_s, hi_s), err(lo_m, hi_m)
    assert bool((e_s <= e_m * (1 + 1e-5) + 1e-9).all())


def test_mse_range_clips_outliers() -> None:
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 10.0  # min-max: step (10 + 3.9) / 15 ~ 0.93 is coarse for 4095 N(0, 1) values
    lo, hi = mse_range(x, 4, False)
    assert float(hi) < 8.0 and float(lo) < -1.0
    x[0, 0] = 300.0  # one far outlier: clipping it costs ~(300 - hi)**2, more than it saves
    lo, hi = mse_range(x, 4, False)
    assert float(hi) > 250.0


# ----------------------------------------------------------------------------- QuantSpec / weights


def test_quant_spec_validation_and_name() -> None:
    for bad in (0, 17):
        with pytest.raises(ValueError):
            QuantSpec(bad)
    with pytest.raises(ValueError, match="unknown range method"):
        QuantSpec(4, range_method="kl")
    assert QuantSpec(4).name == "int4_per_channel_asym_mse"
    assert QuantSpec(8, True, False, "minmax").name == "int8_per_tensor_sym_minmax"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises(bad: float) -> None:
    w = torch.randn(4, 3)
    w[1, 2] = bad
    for method in RANGE_METHODS:
        with pytest.raises(ValueError, match="NaN/Inf"):
            quantize_weight(w, QuantSpec(4, range_method=method))


def test_weight_qparams_shapes() -> None:
    w = torch.randn(8, 4, 3, 3)
    scale, zp, qmin, qmax = weight_qparams(w, QuantSpec(4))
    assert scale.shape == zp.shape == (8, 1, 1, 1) and (qmin, qmax) == (0, 15)
    scale, zp, _, _ = weight_qparams(w, QuantSpec(4, per_channel=False))
    assert scale.shape == zp.shape == ()
    assert quantize_weight(w.half(), QuantSpec(8)).dtype == torch.float16


# ----------------------------------------------------------------------------- activation observer

batches = st.lists(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
                              elements=_elements), min_size=1, max_size=5)


@FAST
@given(bs=batches)
def test_observer_matches_concatenation(bs: list[np.ndarray]) -> None:
    """Fed in several batches, the observer sees what one concatenated batch shows: the same
    exact min/max and, while everything fits in the sample, the same percentile/MSE ranges."""
    obs = ActivationObserver()
    for b in bs:
        obs.update(torch.from_numpy(b))
    cat = torch.cat([torch.from_numpy(b).reshape(-1) for b in bs])
    lo, hi = obs.range(QuantSpec(8, range_method="minmax"))
    assert (float(lo), float(hi)) == (float(cat.min()), float(cat.max()))
    assert obs.sample.numel() == cat.numel() == obs.num_seen
    assert torch.equal(obs.sample.sort().values, cat.sort().values)
    p_lo, p_hi = obs.range(QuantSpec(8, range_method="percentile"))
    assert torch.equal(torch.stack([p_lo, p_hi]), torch.stack(percentile_range(cat)))
    # MSE: same search, but the sample's order differs from cat's, so float sums (and hence
    # near-ties between candidate ranges) may differ: compare the achieved error instead.
    def sq_err(r: tuple[torch.Tensor, torch.Tensor]) -> float:
        scale, zp = qparams(r[0], r[1], 4, False)
        return float(((fake_quant(cat, scale, zp, 0, 15) - cat).double() ** 2).sum())

    e_obs, e_cat = sq_err(obs.range(QuantSpec(4, range_method="mse"))), sq_err(mse_range(cat, 4, False))
    assert e_obs <= e_cat * (1 + 1e-5) + 1e-9
    scale, zp, qmin, qmax = obs.qparams(QuantSpec(8, range_method="minmax"))
    assert (qmin, qmax) == (0, 255) and scale.shape == ()


def test_observer_sample_is_bounded_deterministic_and_uniform() -> None:
    def feed(seed: int) -> ActivationObserver:
        obs = ActivationObserver(max_samples=10_000, seed=seed)
        obs.update(torch.zeros(100_000))  # 1/4 of the values are 0 ...
        for _ in range(3):
            obs.update(torch.ones(50, 2000))  # ... 3/4 are 1
        return obs

    a, b, c = feed(0), feed(0), feed(1)
    assert a.num_seen == 400_000 and a.sample.numel() == 10_000
    assert torch.equal(a.sample, b.sample)  # same seed, same batches -> same sample
    assert torch.equal(a._keys, b._keys) and not torch.equal(a._keys, c._keys)
    frac_ones = float(a.sample.mean())
    assert 0.73 < frac_ones < 0.77  # uniform over all values seen (std ~0.004), not first-come
    # a uniform sample *without replacement* over positions: distinct values, mean ~ N/2
    ramp = ActivationObserver(max_samples=10_000, seed=5)
    for chunk in torch.arange(1_000_000, dtype=torch.float32).split(100_000):
        ramp.update(chunk)
    assert ramp.sample.unique().numel() == 10_000
    assert abs(float(ramp.sample.double().mean()) / 1e6 - 0.5) < 0.015  # std ~0.003
    assert abs(float((ramp.sample < 250_000).double().mean()) - 0.25) < 0.025  # std ~0.0043
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3))
    obs = ActivationObserver(max_samples=20_000)
    for chunk in x.split(70_000):
        obs.update(chunk)
    p_lo, p_hi = obs.range(QuantSpec(8, range_method="percentile"))
    t_lo, t_hi = percentile_range(x, 99.0)
    assert obs.sample.numel() == 20_000 and float(p_hi) > 3.0  # 99.99th pct of N(0,1) is ~3.7
    assert float(t_hi) < float(p_hi) < 4.5 and float(t_lo) > float(p_lo) > -4.5


def test_observer_feeds_a_large_batch_in_pieces(monkeypatch) -> None:
    """A batch over ``UPDATE_PIECE`` values is exactly the updates of its consecutive pieces (bounded
    transient memory), its sample stays uniform over the whole batch, and a batch up to the piece
    size is sampled as one update."""
    from mpqkit.quant import observers

    monkeypatch.setattr(observers, "UPDATE_PIECE", 7_000)
    ramp = torch.arange(100_000, dtype=torch.float32).reshape(10, 10_000)
    whole, pieces = ActivationObserver(max_samples=5_000, seed=2), ActivationObserver(max_samples=5_000, seed=2)
    whole.update(ramp)
    for piece in ramp.reshape(-1).split(7_000):
        pieces.update(piece)
    assert torch.equal(whole.sample, pieces.sample) and torch.equal(whole._keys, pieces._keys)
    assert whole.num_seen == 100_000 and whole.sample.unique().numel() == 5_000
    assert (float(whole._min), float(whole._max)) == (0.0, 99_999.0)
    assert abs(float(whole.sample.double().mean()) / 1e5 - 0.5) < 0.02  # std ~0.004: not the first piece
    small = torch.randn(7_000, generator=torch.Generator().manual_seed(1))
    one, two = ActivationObserver(max_samples=5_000, seed=3), ActivationObserver(max_samples=5_000, seed=3)
    one.update(small)
    monkeypatch.setattr(observers, "UPDATE_PIECE", 1 << 24)
    two.update(small)
    assert torch.equal(one.sample, two.sample)  # at or under the piece size: one update, as before


def test_empty_observer_raises() -> None:
    obs = ActivationObserver()
    for method in RANGE_METHODS:
        with pytest.raises(ValueError, match="no calibration data seen"):
            obs.range(QuantSpec(8, range_method=method))
    with pytest.raises(ValueError, match="no calibration data seen"):
        obs.qparams(QuantSpec(8))
    obs.update(torch.empty(0))
    with pytest.raises(ValueError, match="no calibration data seen"):
        obs.qparams(QuantSpec(8))
    with pytest.raises(ValueError, match="NaN/Inf"):
        obs.update(torch.tensor([1.0, float("nan")]))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=1, max_size=64),
    lo=st.floats(-20, 0, width=32), hi=st.floats(0.0625, 20, width=32),
    bits=st.integers(1, 16), symmetric=st.booleans(),
)
def test_fused_per_tensor_path_is_bit_identical(values, lo, hi, bits, symmetric):
    """fake_quant's inference path equals dequantize(quantize(x)) and torch's own fake-quantize
    kernel exactly (per tensor; per channel against the reference)."""
    from mpqkit.quant.primitives import dequantize, fake_quant, qparams, qrange, quantize

    x = torch.tensor(values, dtype=torch.float32)
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    ref = dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp).to(x.dtype)
    assert torch.equal(fake_quant(x, scale, zp, qmin, qmax), ref)
    if qmax - qmin < 2**16 - 1:
        stock = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
        assert torch.equal(fake_quant(x, scale, zp, qmin, qmax), stock)
    # per channel: two channels with different ranges
    xc = torch.stack([x, 3 * x])
    sc, zc = qparams(torch.tensor([[lo], [3 * lo]]), torch.tensor([[hi], [3 * hi]]), bits, symmetric)
    refc = dequantize(quantize(xc, sc, zc, qmin, qmax), sc, zc)
    assert torch.equal(fake_quant(xc, sc, zc, qmin, qmax), refc)
