"""ds4c's IR: typed SSA graphs with a textual form that round-trips, an op registry and a verifier."""

from ds4c.ir.graph import Graph, GraphInput, Op, Program, Value, iter_values, map_values, replace_uses
from ds4c.ir.parser import parse_graph, parse_program
from ds4c.ir.printer import format_op, print_graph
from ds4c.ir.registry import OpDef, get_op, register_op, split_results
from ds4c.ir.types import ListType, ScalarType, TensorType, parse_type
from ds4c.ir.verifier import check_types, verify_graph

__all__ = [
    "Graph", "GraphInput", "ListType", "Op", "OpDef", "Program", "ScalarType", "TensorType", "Value",
    "check_types", "format_op", "get_op", "iter_values", "map_values", "parse_graph", "parse_program",
    "parse_type", "print_graph", "register_op", "replace_uses", "split_results", "verify_graph",
]
