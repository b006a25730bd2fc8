"""Measured refinement of any method's plan (``--refine N``): local moves that keep the budget,
each judged by measuring the whole plan, accepted only when it helps on both halves of the
calibration set.

Moves (weight bits; activation bits stay as the method chose them):
- a swap: one layer one candidate step up and another one step down;
- a single step up, where the budget has slack.
Moves are tried in the order the method's own table predicts to be best (the sum of the table's
score changes; without a table, cheapest first), in batches; the best candidate of a batch that
lowers the measured loss on half A *and* on half B of the calibration set is taken (chosen on one
half, confirmed on the other, so the set it is judged on is not the set it was chosen on alone).
The search stops after ``max_probes`` measured plans or when a whole pass over the moves helps
nowhere. ``measure`` is given by the caller (the probe engine), so this module stays free of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..engine.probe import STAT_CHUNK
from ..errors import MpqkitError
from .problem import Allocation, Choice

#: (loss on half A, loss on half B) of each full assignment
Measure = Callable[[Sequence[dict[str, Choice]]], list[tuple[float, float]]]


@dataclass
class RefineResult:
    assignment: dict[str, Choice]
    probes: int
    before: tuple[float, float]
    after: tuple[float, float]
    moves: list[str] = field(default_factory=list)
    stopped: str = ""

    def record(self) -> dict:
        return {"probes": self.probes, "objective_before": {"half_a": self.before[0], "half_b": self.before[1]},
                "objective_after": {"half_a": self.after[0], "half_b": self.after[1]}, "moves": self.moves,
                "stopped": self.stopped}


def engine_halves_measure(engine, start: Mapping[str, Choice]) -> tuple[Measure, Callable[[dict[str, Choice]], None]]:
    """A ``Measure`` through a probe engine: each plan is one probe on top of the current plan (so
    it runs from its earliest changed layer), scored on the even and the odd 128-image chunks of
    the engine's set; and the ``on_accept`` hook that moves the current plan forward."""

    n = engine.fp.n
    if n <= STAT_CHUNK:
        raise MpqkitError(f"--refine needs more than {STAT_CHUNK} calibration images (two halves of "
                          f"{STAT_CHUNK}-image chunks to choose and confirm on); --calib-size is {n}")
    sizes = [min(STAT_CHUNK, n - i) for i in range(0, n, STAT_CHUNK)]
    state = {"base": dict(start)}

    def halves(batch_losses: Sequence[float]) -> tuple[float, float]:
        out = []
        for parity in (0, 1):
            idx = range(parity, len(sizes), 2)
            out.append(sum(batch_losses[i] * sizes[i] for i in idx) / sum(sizes[i] for i in idx))
        return out[0], out[1]

    def measure(configs: Sequence[dict[str, Choice]]) -> list[tuple[float, float]]:
        base = state["base"]
        results = engine.run([{f: c for f, c in cfg.items() if base.get(f) != c} for cfg in configs], base=base,
                             desc="refine", show=False)
        return [halves(r.batch_losses) for r in results]

    return measure, lambda full: state.update(base=dict(full))


def candidate_moves(problem: Allocation, current: Mapping[str, Choice],
                    scores: Mapping[str, Mapping[int, float]] | None = None) -> list[tuple[float, str, dict[str, Choice]]]:
    """Every budget-keeping move from ``current``: (predicted change, label, new assignment), best first."""
    bits = sorted(problem.w_bits)
    step: dict[str, dict[int, int]] = {"up": {}, "down": {}}
    for f in problem.layers:
        i = bits.index(current[f][0])
        if i + 1 < len(bits):
            step["up"][f] = bits[i + 1]
        if i > 0:
            step["down"][f] = bits[i - 1]

    def delta(f: str, new: int) -> float:
        if scores is None or f not in scores or new not in scores[f] or current[f][0] not in scores[f]:
            return 0.0
        return float(scores[f][new]) - float(scores[f][current[f][0]])

    def cost(f: str, new: int) -> float:
        return problem.ledger.layer_cost("size", f, new, current[f][1]) - problem.ledger.layer_cost(
            "size", f, current[f][0], current[f][1])

    out = []
    for f, up in step["up"].items():
        cand = {**current, f: (up, current[f][1])}
        if not problem.violations(cand):
            out.append((delta(f, up) if scores is not None else cost(f, up), f"{f}↑{up}", cand))
        for g, down in step["down"].items():
            if g == f:
                continue
            cand = {**current, f: (up, current[f][1]), g: (down, current[g][1])}
            if not problem.violations(cand):
                pred = delta(f, up) + delta(g, down) if scores is not None else cost(f, up) + cost(g, down)
                out.append((pred, f"{f}↑{up} {g}↓{down}", cand))
    out.sort(key=lambda t: (t[0], t[1]))
    return out


def refine(problem: Allocation, assignment: Mapping[str, Choice], measure: Measure, max_probes: int,
           scores: Mapping[str, Mapping[int, float]] | None = None, batch: int = 8,
           on_accept: Callable[[dict[str, Choice]], None] | None = None) -> RefineResult:
    """Refine ``assignment`` (a feasible solution of ``problem``) with at most ``max_probes``
    measured plans (the starting plan counts as one). ``on_accept`` sees each accepted full plan
    (the engine then measures the next moves from its cached tensors)."""
    if problem.violations(dict(assignment)):
        raise ValueError("refinement must start from a plan that meets the budget")
    current = dict(assignment)
    start = measure([problem.full(current)])[0]
    res = RefineResult(current, 1, start, start)
    cur = start
    while True:
        if res.probes >= max_probes:
            res.stopped = "probe limit"
            break
        moves = candidate_moves(problem, current, scores)
        taken = None
        for i in range(0, len(moves), batch):
            chunk = moves[i:i + min(batch, max_probes - res.probes)]
            if not chunk:
                break
            measured = measure([problem.full(c) for _, _, c in chunk])
            res.probes += len(chunk)
            good = [(a, b, label, c) for (_, label, c), (a, b) in zip(chunk, measured) if a < cur[0] and b < cur[1]]
            if good:
                taken = min(good, key=lambda t: (t[0], t[2]))
                break
            if res.probes >= max_probes:
                break
        if taken is None:
            res.stopped = "probe limit" if res.probes >= max_probes else "no move helps"
            break
        a, b, label, current = taken
        cur = (a, b)
        res.moves.append(label)
        if on_accept is not None:
            on_accept(problem.full(current))
    res.assignment, res.after = current, cur
    return res
