"""Pass debugging: the IR after every pass, divergence finding, rewrite bisection."""

from ds4c.debug.numerics import Divergence, bisect_rewrites, compare_graphs, find_divergence
from ds4c.debug.trace import CompileTrace

__all__ = ["CompileTrace", "Divergence", "bisect_rewrites", "compare_graphs", "find_divergence"]
