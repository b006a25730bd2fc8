"""InfoQ: sensitivity as the loss of (sliced) mutual information in the layers after a quantized one.

Reference: every layer at 8/8. For each searched layer ℓ and candidate b (weights, and separately
input activations), one probe through the shared engine quantizes only ℓ to b on top of that
reference (so it starts at ℓ from the reference's cached tensors) and records the pooled outputs
of the observer layers j > ℓ. Score (docs/METHODS.md, Eq. 4 as quoted):

    S(ℓ, b) = (1/b) · mean_j |SMI_ref(j) − SMI(j | ℓ at b)| / mean_j SMI_ref(j)

SMI is measured against the labels (``target="labels"``) or against an input embedding
(``target="input"``: the fp model's penultimate features, or ``embedding=callable`` from Python);
``target="auto"`` (default) takes the labels unless the calibration set has too few images per class
for the k-NN estimator (MobileNetV2's 128 calibration images fell in 120 classes, none with 4 images:
SMI 0 for every layer and an all-equal table), then the embedding, with a warning in the plan.
Per-probe SMI values are memoised in the engine's cache, so a killed search resumes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..engine.cache import tensor_sha256
from ..errors import MpqkitError
from ..profile import stage
from .base import SearchContext, SensitivityTable
from .mi import sliced_mi
from .options import MethodOptions, option, positive
from .registry import METHODS

log = logging.getLogger("mpqkit")

INFOQ_VERSION = 1


@dataclass(frozen=True)
class InfoQOptions(MethodOptions):
    target: str = option("auto", flag="--infoq-target", choices=("auto", "labels", "input"),
                         help="SMI against the labels, an input embedding, or auto (default): the labels when "
                              "most calibration images share their class with at least knn_k others (k-NN MI "
                              "needs neighbours of the same class), else the embedding, with a warning")
    observers: str = option("all", help="later layers whose SMI is observed: 'all' (default) or 'last-K'")
    projections: int = option(128, help="random projections K for sliced MI (default 128)")
    estimator: str = option("knn", flag="--mi-estimator", choices=("knn", "binned"),
                            help="1-D MI estimator against labels (default knn)")
    knn_k: int = option(3, help="neighbours of the k-NN MI estimator (default 3)")
    bins: int = option(16, help="bins of the binned MI estimator (default 16)")
    ref_bits: int = option(8, help="bits of every layer in the reference the probes start from (default 8)")
    embedding: Callable[[torch.Tensor], torch.Tensor] | None = option(
        None, help="target='input': a callable images → embedding (Python only; default the fp penultimate "
                   "features)", python_only=True)

    def __post_init__(self) -> None:
        for name in ("projections", "knn_k", "bins"):
            positive(name, getattr(self, name), "infoq")
        if not 1 <= self.ref_bits <= 16:
            raise MpqkitError(f"option 'ref_bits' of method 'infoq' must be 1..16, got {self.ref_bits}")
        spec = self.observers
        if spec != "all" and not (spec.startswith("last-") and spec[5:].isdigit() and int(spec[5:]) > 0):
            raise MpqkitError(f"option 'observers' of method 'infoq' must be 'all' or 'last-K' with K ≥ 1, "
                              f"got {spec!r}")


def _observers(names: list[str], layer: str, spec: str) -> list[str]:
    """Quantizable layers after ``layer``: all of them, or the last k (``last-k``)."""
    later = names[names.index(layer) + 1:]
    if spec == "all":
        return later
    if spec.startswith("last-"):
        k = int(spec.split("-", 1)[1])
        return [n for n in names[-k:] if n in later]
    raise MpqkitError(f"observers must be 'all' or 'last-K', got {spec!r}")


@METHODS.register("infoq", "sliced-MI loss in later layers per (layer, bits), from an all-8-bit reference + ILP",
                  options=InfoQOptions)
def infoq(ctx: SearchContext) -> SensitivityTable:
    o: InfoQOptions = ctx.options  # type: ignore[assignment]
    opts = {**o.to_params(), "embedding": o.embedding}
    engine = ctx.engine
    names = ctx.graph.names
    ref_bits = int(opts["ref_bits"])
    base = {f: (ref_bits, ref_bits) for f in names}
    warnings = []
    if opts["target"] == "auto":
        opts["target"], why = _auto_target(ctx.calib_labels, int(opts["knn_k"]), opts["estimator"])
        if why:
            warnings.append(why)
            log.warning(why)
    target = _target(ctx, opts)
    smi_kw = {"k": int(opts["projections"]), "seed": ctx.seed, "estimator": opts["estimator"],
              "knn_k": int(opts["knn_k"]), "bins": int(opts["bins"])}
    spec_common = {"infoq": INFOQ_VERSION, "target": opts["target"], "ref_bits": ref_bits,
                   "target_sha": _sha(target), **smi_kw}

    def smi_of(features: dict[str, torch.Tensor]) -> dict[str, float]:
        with stage("mutual information"):
            return {j: sliced_mi(z, target, **smi_kw) for j, z in features.items()}

    all_obs = sorted({j for f in ctx.searched for j in _observers(names, f, opts["observers"])}, key=names.index)
    ref = engine.memo({**spec_common, "probe": "reference", "observers": all_obs},
                      lambda: smi_of(engine.run([{}], base=base, record=all_obs, show=False)[0].features))

    sides = ([("w", b) for b in ctx.w_bits] if ctx.search_w else []) + \
            ([("a", b) for b in ctx.a_bits if b is not None] if ctx.search_a else [])
    w: dict[str, dict[int, float]] = {}
    a: dict[str, dict[int, float]] = {}
    details: dict[str, dict[str, float]] = {}

    for layer in tqdm(ctx.searched, desc="infoq layers", disable=not engine.progress, leave=False):
        obs = _observers(names, layer, opts["observers"])
        if not obs:
            continue
        engine.forget_before(base, layer)  # one pass in network order: earlier cuts are never read again
        probes = [{layer: (b, ref_bits) if side == "w" else (ref_bits, b)} for side, b in sides]
        specs = [{**spec_common, "probe": [layer, side, b], "observers": obs} for side, b in sides]
        todo = [i for i, sp in enumerate(specs) if not engine.is_memoized(sp)]
        fresh = dict(zip(todo, engine.run([probes[i] for i in todo], base=base, record=obs, show=False))) if todo else {}
        for i, (side, b) in enumerate(sides):
            smi = engine.memo(specs[i], lambda i=i: smi_of(fresh[i].features))
            ref_mean = sum(ref[j] for j in obs) / len(obs)
            delta = sum(abs(ref[j] - smi[j]) for j in obs) / len(obs)
            score = delta / max(ref_mean, 1e-12) / b
            (w if side == "w" else a).setdefault(layer, {})[b] = score
            details[f"{side}:{layer}@{b}"] = delta
    return SensitivityTable(w=w, a=a, meta={"score": "InfoQ (1/b)·mean ΔSMI / mean SMI_ref", **{
        k: v for k, v in o.to_params().items() if k != "embedding"}, "target_used": opts["target"], "smi_ref": ref,
        "delta_smi": details, **({"warnings": warnings} if warnings else {})})


def _auto_target(labels: torch.Tensor, knn_k: int, estimator: str) -> tuple[str, str | None]:
    """'labels' when the k-NN estimator can use them (at least half of the images have ≥ knn_k others
    of their class), else 'input' and the reason: with one or two images per class (e.g. 128 ImageNet
    images over 1,000 classes) every label MI estimate is 0 and every sensitivity with it."""
    if estimator != "knn":
        return "labels", None
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    share = float((counts[inverse] > knn_k).float().mean())
    if share >= 0.5:
        return "labels", None
    return "input", (f"infoq: only {100 * share:.0f} % of the {len(labels)} calibration images have {knn_k} or more "
                     f"others of their class ({len(counts)} classes), too few for the k-NN MI against the labels; "
                     f"measuring SMI against the fp model's penultimate features instead (--infoq-target input)")


def _target(ctx: SearchContext, opts: dict[str, Any]) -> torch.Tensor:
    if opts["target"] == "labels":
        return ctx.calib_labels
    if opts["target"] == "input":
        embed: Callable[[torch.Tensor], torch.Tensor] | None = opts.get("embedding")
        if embed is not None:
            with torch.inference_mode():
                return torch.cat([embed(x) for x, _ in ctx.engine.batches]).float().reshape(len(ctx.calib_labels), -1)
        return ctx.engine.fp_layer_input(ctx.graph.names[-1])  # penultimate features of the fp model
    raise MpqkitError(f"infoq target must be 'labels' or 'input', got {opts['target']!r}")


def _sha(t: torch.Tensor) -> str:
    return tensor_sha256(t)
