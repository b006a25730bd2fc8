"""The plan: a versioned JSON artifact saying how every layer is quantized.

A plan is data: any method's plan can be applied, evaluated, exported and compared. It lists every
quantizable layer of its model (fixed layers included; null bits keep a side fp32) and carries the
model's weights sha256. ``validate`` checks both against a model's graph before anything is done: a
layer missing from a plan is an error, never a silent fp32 layer.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ._version import __version__
from .errors import PlanError
from .fileutil import atomic_write_text, json_text  # noqa: F401  (atomic_write_text re-exported)
from .graph import ModelGraph, unknown_layer_message

MAX_SEED = 2**31 - 1  #: largest calibration seed: every generator seeded from it (torch, numpy, seed + draw) accepts it

PLAN_VERSION = 1
MIN_BITS, MAX_BITS = 1, 16
GRANULARITIES = ("per_channel", "per_tensor")


@dataclass(frozen=True)
class LayerQuant:
    """Quantization of one layer: weight bits and input-activation bits (None = keep fp32)."""

    w_bits: int | None
    a_bits: int | None
    w_granularity: str = "per_channel"
    w_symmetric: bool = False

    def validate(self, fqn: str) -> None:
        for side, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if bits is None:
                continue
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise PlanError(f"layer '{fqn}': {side} must be an integer or null, got {bits!r}")
            if not MIN_BITS <= bits <= MAX_BITS:
                raise PlanError(f"layer '{fqn}': {side}={bits} is outside {MIN_BITS}..{MAX_BITS}")
        if self.w_granularity not in GRANULARITIES:
            raise PlanError(f"layer '{fqn}': w_granularity must be one of {GRANULARITIES}, got {self.w_granularity!r}")
        if not isinstance(self.w_symmetric, bool):
            raise PlanError(f"layer '{fqn}': w_symmetric must be true or false")


@dataclass
class Plan:
    layers: dict[str, LayerQuant]
    model_name: str = ""
    model_sha256: str = ""
    method: str = ""
    method_params: dict[str, Any] = field(default_factory=dict)
    budget: str | None = None
    costs: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def assignment(self) -> dict[str, tuple[int | None, int | None]]:
        return {fqn: (lq.w_bits, lq.a_bits) for fqn, lq in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mpqkit_plan": PLAN_VERSION,
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "method": {"name": self.method, "params": self.method_params},
            "budget": self.budget,
            "layers": {fqn: asdict(lq) for fqn, lq in self.layers.items()},
            "costs": self.costs,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "Plan":
        if not isinstance(d, dict) or "mpqkit_plan" not in d:
            raise PlanError(f"{source} is not an mpqkit plan (no 'mpqkit_plan' version field)")
        if d["mpqkit_plan"] != PLAN_VERSION:
            raise PlanError(f"{source} has plan version {d['mpqkit_plan']!r}; this mpqkit reads version {PLAN_VERSION}")
        raw_layers = d.get("layers")
        if not isinstance(raw_layers, dict):
            raise PlanError(f"{source}: 'layers' must be an object mapping layer names to bits")
        layers = {}
        for fqn, spec in raw_layers.items():
            if not isinstance(spec, dict):
                raise PlanError(f"{source}: layer '{fqn}' must be an object with w_bits and a_bits")
            unknown = set(spec) - {"w_bits", "a_bits", "w_granularity", "w_symmetric"}
            if unknown:
                raise PlanError(f"{source}: layer '{fqn}' has unknown fields {sorted(unknown)}")
            lq = LayerQuant(
                w_bits=spec.get("w_bits"), a_bits=spec.get("a_bits"),
                w_granularity=spec.get("w_granularity", "per_channel"),
                w_symmetric=spec.get("w_symmetric", False),
            )
            lq.validate(fqn)
            layers[fqn] = lq
        model = _field(d, "model", dict, source) or {}
        method = _field(d, "method", dict, source) or {}
        name, sha = _field(model, "name", str, source) or "", _field(model, "sha256", str, source) or ""
        budget = _field(d, "budget", str, source)
        costs = _field(d, "costs", dict, source) or {}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in costs.values()):
            raise PlanError(f"{source}: 'costs' must map names to numbers")
        if not all(math.isfinite(v) for v in costs.values()):
            raise PlanError(f"{source}: 'costs' must be finite numbers")
        prov = _field(d, "provenance", dict, source) or {}
        _check_provenance(prov, source)
        return cls(
            layers=layers, model_name=name, model_sha256=sha,
            method=_field(method, "name", str, source) or "", method_params=_field(method, "params", dict, source) or {},
            budget=budget, costs=costs, provenance=prov,
        )

    def validate(self, graph: ModelGraph, model_sha256: str | None = None, searched: Iterable[str] | None = None,
                 *, allow_unidentified: bool = False) -> None:
        """Check the plan against a model before it is used; raise PlanError naming the problem.

        ``model_sha256`` (None: not checked) must equal the plan's ``model.sha256``; a plan without
        one is refused unless ``allow_unidentified``. Every layer named must be one of ``graph``'s,
        with valid bits, and every layer of ``searched`` (default: all of ``graph.names``) must be listed.
        """
        if model_sha256 and not self.model_sha256 and not allow_unidentified:
            raise PlanError(
                f"the plan{self._for()} does not say which weights it was made for (no model.sha256): re-create it "
                f"with mpqkit search for this model, or from Python pass allow_other_model=True to apply it anyway"
            )
        if model_sha256 and self.model_sha256 and model_sha256 != self.model_sha256:
            raise PlanError(
                f"this plan was made for model '{self.model_name}' with weights sha256 {self.model_sha256[:12]}…, "
                f"but the model given has sha256 {model_sha256[:12]}…"
            )
        for fqn, lq in self.layers.items():
            if fqn not in graph:
                raise PlanError(unknown_layer_message(fqn, graph.names))
            lq.validate(fqn)
        required = graph.names if searched is None else list(searched)
        if searched is not None:
            graph.check_names(required)
        missing = [n for n in required if n not in self.layers]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise PlanError(
                f"the plan{self._for()} does not cover {len(missing)} of the model's {len(graph)} quantizable "
                f"layers: {shown}. A plan lists every layer (w_bits/a_bits null keep that side fp32): re-create "
                f"it with mpqkit search, or add the missing layers"
            )

    def _for(self) -> str:
        return f" for model '{self.model_name}'" if self.model_name else ""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json_text(self.to_dict(), "the plan", indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if path.is_dir():
            inside = path / "plan.json"
            hint = f"did you mean {inside}?" if inside.is_file() else "give the path of a plan .json file"
            raise PlanError(f"plan path {path} is a directory, not a plan file: {hint}")
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except OSError as e:
            raise PlanError(f"cannot read plan file {path}: {e.strerror or type(e).__name__}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"plan file {path} is not valid JSON ({e}); it may be truncated or corrupt") from None
        return cls.from_dict(d, source=f"plan file {path}")


def _check_provenance(prov: dict, source: str) -> None:
    """The provenance fields apply reads (the calibration seed and size) are well typed."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    seed = prov.get("seed")
    if seed is not None and not (whole(seed) and 0 <= seed <= MAX_SEED):
        raise PlanError(f"{source}: provenance.seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    calib = prov.get("calib")
    if calib is not None and not isinstance(calib, dict):
        raise PlanError(f"{source}: provenance.calib must be a JSON object, got {type(calib).__name__}")
    n = (calib or {}).get("n")
    if n is not None and not (whole(n) and n >= 1):
        raise PlanError(f"{source}: provenance.calib.n must be a positive integer (calibration images), got {n!r}")


def _field(d: dict, key: str, kind: type, source: str) -> Any:
    """``d[key]`` if absent/None or of the expected JSON type, else a PlanError naming it."""
    v = d.get(key)
    if v is not None and not isinstance(v, kind):
        raise PlanError(f"{source}: field '{key}' must be a {'string' if kind is str else 'JSON object'}, "
                        f"got {type(v).__name__}")
    return v


def provenance(seed: int, calib_n: int, calib_sha256: str) -> dict[str, Any]:

    # no timestamp: the same inputs give the byte-identical plan (the results directory's
    # summary.json records when and how long)
    return {"mpqkit": __version__, "seed": seed, "calib": {"n": calib_n, "sha256": calib_sha256}}
