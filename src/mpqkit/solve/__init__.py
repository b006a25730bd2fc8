"""Solvers: choose bits per layer under a budget."""
from .problem import TIME_LIMIT, Allocation, Solution
from .greedy import solve_greedy
from .ilp import solve_ilp
from .iqp import solve_iqp
from .supernet import solve_supernet
from .threshold import solve_threshold
from .uniform import solve_uniform

__all__ = ["TIME_LIMIT", "Allocation", "Solution", "solve_greedy", "solve_ilp", "solve_iqp", "solve_supernet", "solve_threshold", "solve_uniform"]
