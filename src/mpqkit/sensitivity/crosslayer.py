"""CLADO: cross-layer loss interactions from single and pair probes → a quadratic matrix G → IQP.

Probes (all through the shared engine, on top of a reference with every activation at
``act_bits``, weights fp32): ΔL(ℓ,b) for every (layer, bits) and ΔL(ℓ,b; m,c) for every pair of
layers. Computation is reused as a tree: for each (ℓ,b) one walk from ℓ's cached reference input
with only ℓ perturbed yields ΔL(ℓ,b) and, on the way, the inputs of every later layer m under that
perturbation; each pair then runs only from m on. One (ℓ,b) is processed at a time, so memory is
the reference snapshots plus one walk. Every probe is cached on disk: a killed search resumes.

G (docs/METHODS.md): G[ℓb,ℓb] = 2·ΔL(ℓ,b); G[ℓb,mc] = ΔL(ℓ,b;m,c) − ΔL(ℓ,b) − ΔL(m,c); 0 within a layer,
so ½xᵀGx is the second-order estimate of the joint loss increase. ``clado-diag`` is the paper's
ablation without cross terms (pairs are not even measured).

Which pairs (``--pair-tol``, default 0.05): the singles are measured first; a pair is then measured
only where its cross term can matter, i.e. where the second-order bound 2·sqrt(ΔL(ℓ,b)·ΔL(m,c))
reaches ``pair_tol`` × the median single ΔL at the smallest bit-width. Pairs of nearly lossless
choices (5-8 bits) are skipped with a zero cross term; ``--pair-tol 0`` measures every pair (the
paper's exact all-pairs mode).

On how many samples (``--pair-samples``, default 0: all): the singles, G's diagonal, use the whole
calibration set; each kept pair's cross term ΔL_S(ℓ,b;m,c) − ΔL_S(ℓ,b) − ΔL_S(m,c) is measured on N
samples S drawn from the set by importance (``importance_draw``: half in proportion to how much the
all-lowest-bits model moves a sample's objective, half uniformly; weighted, so the estimate is
unbiased; ``--pair-draw first``: the draw's first N), singles and pair on the same S, so most of
their sampling noise cancels in the difference. The pair walks, most of CLADO's time, then cost N / n
of a walk over all n samples.
``--pair-samples 0`` measures the pairs on every sample (the paper's protocol).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.probe import ProbeEngine, ProbeResult
from ..engine.runners import ProbeJob, dispatch_options
from ..errors import MpqkitError
from ..solve import solve_iqp
from .base import SearchContext, SensitivityTable, SolveRequest
from .options import RunnerOptions, option, positive
from .registry import METHODS
from .solvers import need_budget


@dataclass(frozen=True)
class CladoOptions(RunnerOptions):
    act_bits: str = option("8", flag="--clado-act-bits", type=str,
                           help="activation bits of every layer during CLADO probes (default 8; 'fp' keeps them fp32)")
    psd: str = option("project", choices=("project", "shift", "none"),
                      help="G treatment: eigenvalue projection (default), exact diagonal shift, or none")
    pair_tol: float = option(0.05, flag="--pair-tol", help="clado: measure the pair (ℓ,b; m,c) only when its "
                             "cross term can reach this fraction of the median 2-bit-like single ΔL (bound "
                             "2·sqrt(ΔL(ℓ,b)·ΔL(m,c))); 0 measures all pairs (default 0.05)")

    pair_samples: int = option(0, flag="--pair-samples", help="clado: measure the pairs' cross terms on N "
                               "calibration samples drawn by --pair-draw (the singles use all of them): faster, "
                               "plans not shown as good (docs/METHODS.md); 0: all samples, the paper's protocol "
                               "(default)")

    pair_draw: str = option("importance", choices=("importance", "first"), help="clado: how the --pair-samples "
                            "are drawn: by importance, weighted (default), or the calibration draw's first N")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("pair_samples", self.pair_samples, "clado", allow_zero=True)
        if not (isinstance(self.pair_tol, (int, float)) and 0 <= self.pair_tol):
            raise MpqkitError(f"option 'pair_tol' of method 'clado' must be ≥ 0, got {self.pair_tol!r}")
        if self.act_bits is None:
            object.__setattr__(self, "act_bits", "fp")
        if self.act_bits not in ("fp", "32") and not (self.act_bits.isdigit() and 1 <= int(self.act_bits) <= 16):
            raise MpqkitError(f"option 'act_bits' of method 'clado' must be 1..16 or 'fp', got {self.act_bits!r}")

    @property
    def act(self) -> int | None:
        return None if self.act_bits in ("fp", "32") else int(self.act_bits)


def pair_bound(s_a: float, s_b: float) -> float:
    """Size a cross term can have in a second-order model of the objective: with ΔL ≈ ½δᵀFδ
    (F ⪰ 0), |G_ab| = |δ_aᵀFδ_b| ≤ sqrt(δ_aᵀFδ_a · δ_bᵀFδ_b) = 2·sqrt(ΔL_a·ΔL_b) (Cauchy–Schwarz).
    A guide, not a guarantee: the probes start from the A8 reference, not from a minimum of the
    objective, and 2-bit perturbations are not small (on the digits CNN the measured |G_ab| reached
    2.4× the bound for 2-bit pairs; tests/test_clado.py)."""
    return 2.0 * math.sqrt(max(s_a, 0.0) * max(s_b, 0.0))


def select_pairs(singles: dict[str, dict[int, float]], layers: list[str], bits: list[int],
                 tol: float) -> tuple[dict[tuple[str, int], list[tuple[str, int]]], dict[str, Any]]:
    """Which pairs to measure: for each (ℓ, b), the later (m, c) whose cross-term bound reaches
    ``tol`` × the median over layers of ΔL(ℓ, smallest bits) (the scale of the choices that matter);
    ``tol`` = 0: every pair. Skipped pairs enter G with a zero cross term, as in clado-diag."""
    lo = min(bits)
    scale = float(np.median([max(singles[f][lo], 0.0) for f in layers])) if layers else 0.0
    threshold = tol * scale
    chosen: dict[tuple[str, int], list[tuple[str, int]]] = {}
    skipped, skipped_bound = 0, 0.0
    for i, f in enumerate(layers):
        for b in bits:
            keep = []
            for g in layers[i + 1:]:
                for c in bits:
                    bound = pair_bound(singles[f][b], singles[g][c])
                    if tol == 0 or bound >= threshold:
                        keep.append((g, c))
                    else:
                        skipped += 1
                        skipped_bound = max(skipped_bound, bound)
            chosen[(f, b)] = keep
    return chosen, {"pair_tol": tol, "pair_threshold": threshold, "pairs_skipped": skipped,
                    "largest_skipped_bound": skipped_bound}


@dataclass
class _Walks:
    """What the tree walks of one engine measured: ΔL per single and per pair (against ``ref``), and
    the spread of each single's ΔL over the engine's chunks of samples."""

    ref: ProbeResult
    singles: dict[str, dict[int, float]]
    pairs: dict[tuple[str, int, str, int], float]
    chunk_std: list[float]


def _walk_trees(engine: ProbeEngine, opts: CladoOptions, base: dict, layers: list[str], bits: list[int],
                later_of: Callable[[str, int], list[tuple[str, int]]], desc: str) -> _Walks:
    """One walk per (ℓ, b) from ℓ's reference input: the single, then the chosen later pairs."""
    act = opts.act
    ref = engine.run([{}], base=base, show=False)[0]
    out = _Walks(ref, {f: {} for f in layers}, {}, [])
    # trees run in parallel into the cache (with --workers / --runner ray); the loop below reads them
    dispatch_options(engine, opts, lambda: [
        ProbeJob([{}] + [{g: (c, act)} for g, c in later_of(f, b)], base={**base, f: (b, act)}, warm=f,
                 warm_base=base) for f in layers for b in bits])
    bar = tqdm(total=sum(1 + len(later_of(f, b)) for f in layers for b in bits), desc=desc, unit="probe",
               disable=not engine.progress, leave=False)
    for f in layers:
        engine.warm(base, f)  # the reference's live tensors at ℓ: every (ℓ, b) walk starts there
        for b in bits:
            later = later_of(f, b)
            res = engine.run([{}] + [{g: (c, act)} for g, c in later], base={**base, f: (b, act)},
                             remember=False, show=False)
            out.singles[f][b] = res[0].loss - ref.loss
            out.chunk_std.append(statistics.pstdev(x - y for x, y in zip(res[0].batch_losses, ref.batch_losses))
                                 if len(ref.batch_losses) > 1 else 0.0)
            for (g, c), r in zip(later, res[1:]):
                out.pairs[(f, b, g, c)] = r.loss - ref.loss
            bar.update(1 + len(later))
    bar.close()
    return out


def importance_draw(fragility: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sample indices drawn with replacement with probability p_i = ½·u_i/Σu + ½/N (``u``: each
    sample's fragility, ≥ 0) and their weights 1/(N·p_i), so that the weighted mean over the draw is
    an unbiased estimate of the mean over all N samples. Half the probability is uniform, so no
    sample is left out and the variance is at most twice that of a uniform draw."""
    u = fragility.double().clamp(min=0)
    big_n = len(u)
    p = 0.5 / big_n + (0.5 * u / u.sum() if float(u.sum()) > 0 else 0.5 / big_n)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(p, n, replacement=True, generator=gen).sort().values
    return idx, 1.0 / (big_n * p[idx])


def on_subset(ctx: SearchContext, n: int) -> bool:
    """Whether ``--pair-samples n`` measures the pairs on fewer samples than the calibration set."""
    return 0 < n < len(ctx.calib_images)


def pair_engine(ctx: SearchContext, n: int, base: dict, draw: str = "importance") -> ProbeEngine:
    """The engine the pairs are measured on: the calibration engine itself when ``n`` is 0 or covers
    the set; else ``n`` samples of the set with the calibration engine's quantized layers (same
    ranges, same GPTQ weights). ``draw`` "importance": drawn by ``importance_draw``, the fragility
    of a sample being how much its objective moves when every searched layer goes to the smallest
    bit-width (on top of ``base``), weighted so that each probe's loss estimates the whole set's;
    "first": the calibration draw's first ``n`` (a uniform subset: the draw is shuffled), unweighted."""
    if not on_subset(ctx, n):
        return ctx.engine
    if draw == "first":
        idx, weights = torch.arange(n), None
    else:
        lowest = {**base, **{f: (min(ctx.w_bits), base.get(f, (None, None))[1]) for f in ctx.searched}}
        moved = (ctx.engine.sample_losses(lowest) - ctx.engine.sample_losses(base)).abs()
        idx, weights = importance_draw(moved, n, ctx.seed)
    return ProbeEngine(ctx.model, ctx.graph, ctx.calib_images[idx], ctx.calib_labels[idx], qconfig=ctx.qconfig,
                       seed=ctx.seed, layers_from=ctx.engine, sample_weights=weights, **ctx.engine_kwargs)


def subset_pairs(full: dict[str, dict[int, float]], sub: _Walks) -> dict[tuple[str, int, str, int], float]:
    """Pair ΔL whose cross term is the subset's: ΔL(a) + ΔL(b) from the whole set plus
    [ΔL_S(a,b) − ΔL_S(a) − ΔL_S(b)], all three on the same weighted draw S (paired, so the noise of
    the singles cancels in the difference). ``build_g`` then reads exactly the draw's cross term."""
    return {(f, b, g, c): full[f][b] + full[g][c] + (v - sub.singles[f][b] - sub.singles[g][c])
            for (f, b, g, c), v in sub.pairs.items()}


def _measure(ctx: SearchContext, with_pairs: bool) -> SensitivityTable:
    if ctx.search_a:
        raise MpqkitError("CLADO searches weight bits; activations stay at --clado-act-bits (use --search w)")
    opts: CladoOptions = ctx.options  # type: ignore[assignment]
    layers, bits = list(ctx.searched), sorted(ctx.w_bits)
    base = {f: (None, opts.act) for f in ctx.graph.names} if opts.act is not None else {}
    engine = ctx.engine
    every = (lambda f, b: [(g, c) for g in layers[layers.index(f) + 1:] for c in bits])
    selection: dict[str, Any] = {}
    pairs_on = engine
    if with_pairs and opts.pair_tol == 0 and not on_subset(ctx, opts.pair_samples):
        # every pair on every sample, in the same walks as the singles
        walks = _walk_trees(engine, opts, base, layers, bits, every, "clado probes")
        pairs = walks.pairs
    else:
        walks = _walk_trees(engine, opts, base, layers, bits, lambda f, b: [], "clado singles")
        pairs = {}
        if with_pairs:
            chosen, selection = select_pairs(walks.singles, layers, bits, opts.pair_tol) \
                if opts.pair_tol else ({(f, b): every(f, b) for f in layers for b in bits}, {"pair_tol": 0})
            pairs_on = pair_engine(ctx, opts.pair_samples, base, opts.pair_draw)
            if pairs_on is not engine:
                engine.release_snapshots()  # the pairs walk the subset engine's tensors, not these
            sub = _walk_trees(pairs_on, opts, base, layers, bits, lambda f, b: chosen[(f, b)], "clado pairs")
            pairs = sub.pairs if pairs_on is engine else subset_pairs(walks.singles, sub)
    if with_pairs:
        selection["pair_samples"] = pairs_on.fp.n
    ref = walks.ref
    return SensitivityTable(w=walks.singles, pairs=pairs, meta={
        "score": f"delta loss ({engine.objective}; single and pair probes)", "ref_loss": ref.loss,
        "ref_top1": ref.top1, "act_bits": opts.act, "psd": opts.psd, "pairs_measured": len(pairs),
        "singles_measured": len(layers) * len(bits), **selection,
        "sens_samples": ref.n, "stat_chunks": len(ref.batch_losses),
        "median_chunk_std_of_single_delta": float(np.median(walks.chunk_std)) if walks.chunk_std else 0.0,
        "note": "chunk std: spread of ΔL(ℓ,b) over chunks of 128 samples; the standard error of ΔL is "
                "about std/sqrt(chunks)" + (f"; pairs: singles of the whole set + cross terms measured on "
                                            f"pair_samples samples ({opts.pair_draw})"
                                            if pairs_on is not engine else ""),
    })


def solve(req: SolveRequest):
    """CLADO's IQP on ½xᵀGx (G after the option's PSD treatment); needs a budget."""

    need_budget(req)
    assert req.table is not None
    g, lin, info = quadratic_objective(req.table, req.problem, req.options.psd)  # type: ignore[attr-defined]
    solution = solve_iqp(req.problem, g, lin, time_limit=req.time_limit, seed=req.seed)
    solution.info.update(info)
    return solution


@METHODS.register("clado", "single + pair Δloss probes → quadratic G (PSD-projected) → IQP", solver=solve,
                  options=CladoOptions)
def clado(ctx: SearchContext) -> SensitivityTable:
    return _measure(ctx, with_pairs=True)


@METHODS.register("clado-diag", "CLADO without cross-layer terms (the paper's ablation): single Δloss → IQP/ILP",
                  solver=solve, options=CladoOptions)
def clado_diag(ctx: SearchContext) -> SensitivityTable:
    return _measure(ctx, with_pairs=False)


def build_g(table: SensitivityTable, layers: list[str], bits: list[int]) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """G over indices (ℓ, b) in layer-major order, as defined in docs/METHODS.md."""
    index = [(f, b) for f in layers for b in bits]
    pos = {k: i for i, k in enumerate(index)}
    g = np.zeros((len(index), len(index)))
    for (f, b), i in pos.items():
        g[i, i] = 2.0 * table.w[f][b]
    for (f, b, h, c), v in table.pairs.items():
        if (f, b) in pos and (h, c) in pos:
            x = v - table.w[f][b] - table.w[h][c]
            g[pos[(f, b)], pos[(h, c)]] = g[pos[(h, c)], pos[(f, b)]] = x
    return g, index


def make_psd(g: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Return (G', linear term, info). ``project``: eigenvalues < 0 set to 0 (the paper's step;
    changes the problem). ``shift``: G + sI with a linear −s per variable, which is the same
    objective on one-hot x (x² = x) but convex. ``none``: as measured."""
    g = (g + g.T) / 2
    lam_min = float(np.linalg.eigvalsh(g).min()) if len(g) else 0.0
    lin = np.zeros(len(g))
    if mode == "project":
        w, v = np.linalg.eigh(g)
        g = (v * np.clip(w, 0, None)) @ v.T
        g = (g + g.T) / 2
    elif mode == "shift":
        s = max(0.0, -lam_min)
        g = g + s * np.eye(len(g))
        lin = -s * np.ones(len(g)) / 2  # objective ½xᵀGx: the shift adds s/2 per chosen variable
    elif mode != "none":
        raise MpqkitError(f"psd must be 'project', 'shift' or 'none', got {mode!r}")
    return g, lin, {"lambda_min_before": lam_min}


def quadratic_objective(table: SensitivityTable, problem, psd: str = "project") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """G (after the chosen PSD treatment) and the linear term for ``solve_iqp``, in the problem's
    layer × choice order (weights searched, one activation setting)."""
    if len(problem.a_bits) != 1:
        raise MpqkitError("CLADO's IQP searches weight bits only")
    bits = sorted(problem.w_bits)
    g, _ = build_g(table, problem.layers, bits)
    mode = psd
    g2, lin, info = make_psd(g, mode)
    info = {**info, "psd": mode, "cross_terms": bool(table.pairs)}
    return g2, lin, info
