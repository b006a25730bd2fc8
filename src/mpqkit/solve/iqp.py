"""Integer quadratic allocation (CLADO): min ½xᵀGx + lin·x over one-hot x under the budget.

Two parts, no licence or external binary:
- exact: the products x_i·x_j are linearised with continuous y in the per-layer-pair RLT form
  (Σ_c y[ℓb, mc] = x[ℓb], Σ_b y[ℓb, mc] = x[mc]), which is exact for one-hot x and has a tight LP
  relaxation; HiGHS (``scipy.optimize.milp``) proves optimality where it can within the time limit;
- a heuristic: multi-start local search over one-hot assignments with single-layer and two-layer
  moves (the latter walk along the budget boundary), budget repair and random restarts.
- a convex lower bound: when G is PSD (CLADO projects or shifts it so), ½xᵀGx + lin·x over the
  relaxed polytope (x ≥ 0, one unit per layer, the budget rows) is convex and agrees with the IQP on
  one-hot x, so its minimum bounds the IQP from below. Frank-Wolfe (an LP per step) walks towards it,
  and every step certifies f(x) + ∇f(x)·(s − x) ≤ min f (a tangent plane of a convex function).
  On ResNet-56 (54 layers × W{2,4,8}) this bound is far tighter than the RLT relaxation's, whose
  fractional products reach large negative cross terms (benchmarks/iqp_resnet56.py).
All run within ``time_limit``; the best feasible plan is returned with its objective, the best
lower bound and the gap; a plan already within ``gap_tol`` of the convex bound skips the MILP.
Exact solvers stall on large instances (≥ 50 layers × 6 bits), where the local search finds better
plans sooner: that is why both exist.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from scipy.optimize import linprog

from ..errors import InfeasibleBudgetError
from .ilp import MilpModel, joint_infeasible_message, milp_status
from .problem import TIME_LIMIT, Allocation, Choice, Solution


class QuadraticObjective:
    """½xᵀGx + lin·x for one-hot x, as layer-blocked arrays: d[ℓ,k] and Q[ℓ,k,m,j] (Q[ℓ,:,ℓ,:] = 0)."""

    def __init__(self, g: np.ndarray, lin: np.ndarray | None, n_layers: int, n_choices: int):
        n = n_layers * n_choices
        if g.shape != (n, n):
            raise ValueError(f"G is {g.shape}, expected {(n, n)} for {n_layers} layers × {n_choices} choices")
        g = (g + g.T) / 2
        lin = np.zeros(n) if lin is None else np.asarray(lin, dtype=float)
        self.L, self.K = n_layers, n_choices
        self.d = (0.5 * np.diag(g) + lin).reshape(n_layers, n_choices)
        q = g.reshape(n_layers, n_choices, n_layers, n_choices).copy()
        for layer in range(n_layers):
            q[layer, :, layer, :] = 0.0
        self.q = q

    def value(self, a: np.ndarray) -> float:
        idx = np.arange(self.L)
        pair = self.q[idx[:, None], a[:, None], idx[None, :], a[None, :]]
        return float(self.d[idx, a].sum() + np.triu(pair, 1).sum())

    def field(self, a: np.ndarray) -> np.ndarray:
        """F[ℓ,k] = Σ_m Q[ℓ,k,m,a_m]: the interaction each choice of ℓ would have with the rest."""
        return self.q[:, :, np.arange(self.L), a].sum(axis=2)


def _exact(problem: Allocation, model: MilpModel, obj: QuadraticObjective, remaining: float, best: Any,
           best_val: float, solver: str, status: str, cvx: float | None,
           info: dict) -> tuple[Any, float, str, str, float | None, float | None]:
    """The IQP linearised exactly (``_linearise``) and solved by HiGHS in the time left; its plan
    replaces the incumbent ``best`` where it is not worse. Returns (plan, value, solver, status, gap,
    bound) and records the MILP's size and status in ``info``."""
    n_pairs, pair_costs = _linearise(model, obj)
    c = np.r_[obj.d.reshape(-1), np.array(pair_costs)]  # x columns first, layer-major, as in MilpModel
    assignment, res = model.solve(c, max(0.5, remaining))
    st, gap, bound = milp_status(res)
    info["milp_bound"] = bound
    if cvx is not None and (bound is None or cvx > bound):
        bound = cvx  # both are valid lower bounds: keep the tighter
    info.update({"milp_status": st, "milp_variables": model.n_cols, "milp_rows": len(model.rows),
                 "linearised_pairs": n_pairs})
    if assignment is not None:
        v_e = obj.value(np.array([model.choices.index(assignment[f]) for f in model.layers]))
        info["milp_objective"] = v_e
        if best is None or v_e <= best_val + 1e-12:
            best, best_val, solver, status = assignment, v_e, "iqp-milp-highs", st
        else:
            status = "heuristic better than MILP incumbent"
    elif best is None:
        raise InfeasibleBudgetError(joint_infeasible_message(problem, res.message))
    if bound is not None and best is not None:
        gap = max(0.0, (best_val - bound) / max(abs(best_val), 1e-12))
        if gap <= 1e-9:
            status = "optimal"
    return best, best_val, solver, status, gap, bound


def _linearise(model: MilpModel, obj: QuadraticObjective) -> tuple[int, list[float]]:
    """Add y[k, j] = x[i, k]·x[m, j] for every layer pair (i, m) with a non-zero block of the quadratic
    term (rows Σ_j y[k, j] = x[i, k] and Σ_k y[k, j] = x[m, j]); returns the number of pairs and the
    new columns' costs (the blocks, in column order)."""
    L, K = len(model.layers), len(model.choices)
    pair_costs: list[float] = []
    n_pairs = 0
    for i in range(L):
        for m in range(i + 1, L):
            block = obj.q[i, :, m, :]
            if not np.any(block):
                continue
            y0 = model.add_columns(K * K)  # row-major
            pair_costs.extend(block.reshape(-1))
            n_pairs += 1
            for k in range(K):
                model.add_row({**{y0 + k * K + j: 1.0 for j in range(K)}, i * K + k: -1.0}, 0.0, 0.0)
            for j in range(K):
                model.add_row({**{y0 + k * K + j: 1.0 for k in range(K)}, m * K + j: -1.0}, 0.0, 0.0)
    return n_pairs, pair_costs


def _local_search(obj: QuadraticObjective, costs: np.ndarray, limits: np.ndarray, allowed: np.ndarray,
                  start: np.ndarray, deadline: float, seed: int) -> tuple[np.ndarray, float, int]:
    """Best-improvement descent with single and pair moves; perturb-and-restart until the deadline.

    costs[r, ℓ, k]: budget row r's cost of choice k at layer ℓ; feasible iff Σ_ℓ costs[r,ℓ,a_ℓ] ≤ limits[r].
    allowed[ℓ, k]: False for choices excluded by per-layer limits."""
    rng = np.random.default_rng(seed)
    L = obj.d.shape[0]
    moves = _Moves(obj, costs, limits, np.where(allowed, 0.0, np.inf), np.arange(L), deadline)
    best = moves.descend(start)
    best_val = obj.value(best)
    restarts = stale = 0
    patience = 30 * L  # restarts without improvement before the search is considered converged
    while time.perf_counter() < deadline and stale < patience:
        a = best.copy()  # perturb the best plan (a few layers), or now and then start afresh
        n_flip = L if rng.random() < 0.2 else int(rng.integers(1, max(1, L // 4) + 1))
        flip = rng.choice(L, size=n_flip, replace=False)
        a[flip] = [rng.choice(np.flatnonzero(allowed[i])) for i in flip]
        a = moves.repair(a)
        if a is None:
            continue
        a = moves.descend(a)
        restarts += 1
        v = obj.value(a)
        stale += 1
        if v < best_val - 1e-12:
            best, best_val, stale = a, v, 0
    return best, best_val, restarts


@dataclass
class _Moves:
    """The local search's moves on an assignment ``a`` (a choice index per layer): ``penalty`` is
    +inf for choices a per-layer limit excludes, ``idx`` is ``arange(L)``."""

    obj: QuadraticObjective
    costs: np.ndarray
    limits: np.ndarray
    penalty: np.ndarray
    idx: np.ndarray
    deadline: float

    def descend(self, a: np.ndarray) -> np.ndarray:
        """Best single move, else best pair move, while one lowers the objective and keeps the budget."""
        obj, costs, limits, idx = self.obj, self.costs, self.limits, self.idx
        a = a.copy()
        while time.perf_counter() < self.deadline:
            used = costs[:, idx, a].sum(axis=1)  # (R,)
            score = obj.d + obj.field(a) + self.penalty  # (L, K)
            delta1 = score - score[idx, a][:, None]
            dc = costs - costs[:, idx, a][:, :, None]  # (R, L, K)
            ok1 = np.all(used[:, None, None] + dc <= limits[:, None, None] * (1 + 1e-12), axis=0)
            d1 = np.where(ok1, delta1, np.inf)
            best1 = np.unravel_index(np.argmin(d1), d1.shape)
            if d1[best1] < -1e-12:
                a[best1[0]] = best1[1]
                continue
            # pair moves (ℓ→k, m→j): Δ1(ℓ,k) + Δ1(m,j) + Q[ℓk,mj] − Q[ℓk,m a_m] − Q[ℓ a_ℓ,mj] + Q[ℓa_ℓ,m a_m]
            qa = obj.q[idx, a]  # (L, L, K): Q[ℓ a_ℓ, m, j]
            q_ka = obj.q[:, :, idx, a]  # (L, K, L): Q[ℓ k, m a_m]
            cross = (obj.q - q_ka[:, :, :, None] - qa[:, None, :, :]
                     + obj.q[idx[:, None], a[:, None], idx[None, :], a[None, :]][:, None, :, None])
            d2 = delta1[:, :, None, None] + delta1[None, None, :, :] + cross
            ok2 = np.all(used[:, None, None, None, None] + dc[:, :, :, None, None] + dc[:, None, None, :, :]
                         <= limits[:, None, None, None, None] * (1 + 1e-12), axis=0)
            same = idx[:, None, None, None] == idx[None, None, :, None]
            d2 = np.where(ok2 & ~same, d2, np.inf)
            best2 = np.unravel_index(np.argmin(d2), d2.shape)
            if d2[best2] < -1e-12:
                a[best2[0]], a[best2[2]] = best2[1], best2[3]
                continue
            return a
        return a

    def repair(self, a: np.ndarray) -> np.ndarray | None:
        """Lower costs until feasible, choosing the move with the least objective increase per cost saved."""
        obj, costs, idx = self.obj, self.costs, self.idx
        L, K = obj.d.shape
        a = a.copy()
        for _ in range(L * K):
            used = costs[:, idx, a].sum(axis=1)
            over = np.maximum(used - self.limits, 0)
            if not over.any():
                return a
            saving = ((costs[:, idx, a][:, :, None] - costs) * (over > 0)[:, None, None]).sum(axis=0)
            score = obj.d + obj.field(a) + self.penalty
            harm = score - score[idx, a][:, None]
            ratio = np.where(saving > 0, np.maximum(harm, 0) + 1e-12, np.inf) / np.where(saving > 0, saving, 1)
            l, k = np.unravel_index(np.argmin(ratio), ratio.shape)
            if not np.isfinite(ratio[l, k]):
                return None
            a[l] = k
        return None


def convex_bound(g: np.ndarray, lin: np.ndarray, costs: np.ndarray, limits: np.ndarray, allowed: np.ndarray,
                 deadline: float, rel_tol: float = 1e-3, max_steps: int = 500) -> tuple[float | None, int]:
    """Certified lower bound on min ½xᵀGx + lin·x over one-hot x meeting the budget rows, from the
    convex relaxation (None unless G is PSD on the directions that keep one unit per layer). Returns
    (bound, Frank-Wolfe steps); ``max_steps`` keeps the bound (and so the plan record) deterministic,
    the deadline only guards slow machines. The diagonal is first moved into the linear term as far as convexity
    allows (β = λ_min there; x² = x on one-hot x, so the IQP is unchanged): a tighter relaxation."""
    n = len(g)
    L, K = allowed.shape
    if n == 0 or K < 2:
        return None, 0
    g = (g + g.T) / 2
    zk = np.linalg.svd(np.ones((1, K)))[2][1:].T  # orthonormal basis of {d ∈ R^K: Σ d = 0}
    z = np.kron(np.eye(L), zk)
    lam = float(np.linalg.eigvalsh(z.T @ g @ z).min())
    if lam < -1e-9 * (float(np.abs(g).max()) or 1.0):
        return None, 0
    beta = max(lam, 0.0) * (1 - 1e-9)
    g, lin = g - beta * np.eye(n), lin + beta / 2
    a_eq = np.kron(np.eye(L), np.ones((1, K)))
    a_ub = costs.reshape(len(costs), n) if len(costs) else None
    bounds = [(0.0, 1.0 if ok else 0.0) for ok in allowed.reshape(-1)]

    def vertex(c: np.ndarray) -> np.ndarray | None:  # the LP oracle: argmin c·s over the relaxed polytope
        r = linprog(c, A_ub=a_ub, b_ub=limits if a_ub is not None else None, A_eq=a_eq, b_eq=np.ones(L),
                    bounds=bounds, method="highs")
        return r.x if r.status == 0 else None

    x = vertex(lin + np.diag(g) / 2)  # start: the best plan without cross terms, relaxed
    if x is None:
        return None, 0
    best, steps = -np.inf, 0
    while steps < max_steps and time.perf_counter() < deadline:
        grad = g @ x + lin
        s = vertex(grad)
        if s is None:
            break
        d = s - x
        fx = float(0.5 * x @ g @ x + lin @ x)
        best = max(best, fx + float(grad @ d))  # tangent plane at x, minimised over the polytope
        steps += 1
        if fx - best <= rel_tol * max(abs(fx), 1e-12):
            break
        curv = float(d @ g @ d)
        x = x + (1.0 if curv <= 0 else min(1.0, max(0.0, -float(grad @ d) / curv))) * d  # exact line search
    return (float(best) if steps else None), steps


def solve_iqp(problem: Allocation, g: np.ndarray, lin: np.ndarray | None = None, time_limit: float = TIME_LIMIT,
              heuristic_share: float = 0.25, exact: bool = True, seed: int = 0,
              start: dict[str, Choice] | None = None, convex: bool = True, gap_tol: float = 1e-4) -> Solution:
    """Best feasible plan for min ½xᵀGx + lin·x within ``time_limit`` seconds (G in the order of
    ``problem.choices()`` per layer, layers in ``problem.layers`` order). ``convex``: compute the convex
    bound; its Frank-Wolfe steps stop at ``convex_bound``'s step cap, not at a share of the time (a
    time share made the recorded bound, and so the plan bytes, depend on the machine's load), with the
    time limit as the only guard."""
    problem.check_feasible()
    t0 = time.perf_counter()
    model = MilpModel(problem)
    L, K = len(model.layers), len(model.choices)
    obj = QuadraticObjective(np.asarray(g, dtype=float), lin, L, K)

    costs_a, limits_a, allowed = model.budget_arrays()  # the same rows the MILP uses, for the heuristic

    # start: the given plan, else the cheapest allowed choice per layer (feasible by check_feasible)
    if start is not None:
        a0 = np.array([model.choices.index(start[f]) for f in model.layers])
    else:
        cheap = costs_a.sum(axis=0) if len(costs_a) else np.zeros((L, K))
        a0 = np.where(allowed, cheap, np.inf).argmin(axis=1)
    info: dict = {"layers": L, "choices": K}
    heuristic, v_h = None, np.inf
    if heuristic_share > 0 or not exact:
        deadline = t0 + (max(0.2, heuristic_share * time_limit) if exact else time_limit)
        a_h, v_h, restarts = _local_search(obj, costs_a, limits_a, allowed, a0, deadline, seed)
        heuristic = {f: model.choices[int(k)] for f, k in zip(model.layers, a_h)}
        info.update(heuristic_objective=v_h, heuristic_restarts=restarts)
        if problem.violations(heuristic):
            heuristic, v_h = None, np.inf

    best, best_val, status, gap, bound, solver = heuristic, v_h, "heuristic (no bound)", None, None, "iqp-local-search"
    g_arr = np.asarray(g, dtype=float)
    lin_arr = np.zeros(len(g_arr)) if lin is None else np.asarray(lin, dtype=float)
    cvx = None
    if exact and convex:
        cvx, steps = convex_bound(g_arr, lin_arr, costs_a, limits_a, allowed, t0 + time_limit)
        info.update(convex_bound=cvx, convex_bound_steps=steps)
    if cvx is not None and best is not None and best_val - cvx <= gap_tol * max(abs(best_val), 1e-12):
        exact = False  # the heuristic's plan is within gap_tol of a certified bound: nothing left to prove
        bound, gap, status = cvx, max(0.0, (best_val - cvx) / max(abs(best_val), 1e-12)), "optimal (convex bound)"
    if exact:
        best, best_val, solver, status, gap, bound = _exact(problem, model, obj, time_limit - (time.perf_counter() - t0),
                                                            best, best_val, solver, status, cvx, info)
    if best is None:
        raise InfeasibleBudgetError("no feasible plan found within the time limit")
    return Solution(best, float(best_val), solver, status, time.perf_counter() - t0, gap=gap, bound=bound, info=info)
