"""The ATen-level ops ds4c's IR admits: an explicit, reviewed allow-list.

IR text arrives from files people share (artifacts, ONNX files, the trace cache). ``torch.ops``
holds overloads that read and write files (``aten.from_file`` with ``shared=True`` maps a file
that an in-place fill then overwrites), write their operands in place, draw from torch's global
random generator or hand out uninitialised memory. An IR that could name any overload could make
``ds4c.load`` or ``ds4c compile model.onnx`` touch the user's files, so ``ds4c.ir.registry.get_op``
resolves an ATen name only when it is listed here; the parser, the verifier, artifact loading, the
ONNX importer and constant folding all go through it.

What is listed: the functional tensor ops that ds4c's frontend produces (torch.export of ds4c's
model for every preset and the small transformers configs of tests/hf_configs.py, and of
transformers' own DeepseekV4ForCausalLM, after ``run_decompositions({})``), that the passes and
the ONNX importer emit, plus a few pure math ops of the same families that traced transformer
code emits (``gelu``, ``log_softmax``, ``argmax``, ``tril``...). Every entry is, by its torch
schema, functional (no argument written, no ``out=``), takes only tensors, numbers, lists of them,
dtypes, devices, layouts and memory formats (and a mode string: ``rounding_mode``,
``approximate``), and returns only tensors or sizes; tests/ir/test_allow_list.py checks this.

Left out on purpose:
- in-place and ``out=`` overloads: traced graphs are functionalised. The GPU runtime writes results
  through ``out=`` overloads, but resolves them from torch itself
  (``ds4c.runtime.buffer_plan.out_variant``) for ops whose functional name is listed here;
  no IR text names them;
- anything that touches files, storages, the network or processes (``from_file``, ``_save``,
  ``set_``, ``_c10d_functional`` collectives until a sharding pass emits them);
- random ops (``rand_like``, ``bernoulli``, ``dropout``, ``multinomial``): an inference graph draws
  no random numbers, and these advance torch's global generator, so a run's results would depend
  on what ran before it;
- ``empty*``: uninitialised memory, whose contents are whatever was there;
- ``prims.*`` and ``quantized.*``: the frontend does not produce them.

Adding an op: it must meet the rules above; list it under its family and run the test.
"""

from __future__ import annotations

# Shapes and views: no data computed, only reinterpreted.
_VIEWS = (
    "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.expand.default",
    "aten.permute.default", "aten.transpose.int", "aten.t.default", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default", "aten.flatten.using_ints",
    "aten.unflatten.int", "aten.select.int", "aten.slice.Tensor", "aten.narrow.default",
    "aten.chunk.default", "aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int",
    "aten.alias.default", "aten.detach.default",
)
# Copies, casts and layout.
_COPIES = (
    "aten.clone.default", "aten.contiguous.default", "aten.copy.default", "aten.lift_fresh_copy.default",
    "aten._to_copy.default", "aten.to.dtype", "aten.to.device",
)
# Joining, reordering and repeating.
_JOINS = (
    "aten.cat.default", "aten.stack.default", "aten.flip.default", "aten.roll.default",
    "aten.repeat.default", "aten.repeat_interleave.self_int", "aten.diff.default",
)
# Creation of filled tensors (never uninitialised: no empty*).
_CREATION = (
    "aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.full.default",
    "aten.full_like.default", "aten.zeros.default", "aten.zeros_like.default", "aten.ones.default",
    "aten.ones_like.default", "aten.new_full.default", "aten.new_zeros.default", "aten.new_ones.default",
    "aten.tril.default", "aten.triu.default",
)
# Elementwise arithmetic.
_ARITHMETIC = (
    "aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar", "aten.rsub.Scalar",
    "aten.rsub.Tensor", "aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar",
    "aten.div.Tensor_mode", "aten.floor_divide.default", "aten.remainder.Tensor", "aten.remainder.Scalar",
    "aten.fmod.Tensor", "aten.fmod.Scalar", "aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor",
    "aten.pow.Scalar", "aten.neg.default", "aten.abs.default", "aten.sign.default",
    "aten.reciprocal.default", "aten.square.default", "aten.sqrt.default", "aten.rsqrt.default",
    "aten.maximum.default", "aten.minimum.default", "aten.clamp.default", "aten.clamp.Tensor",
    "aten.clamp_min.default", "aten.clamp_max.default", "aten.floor.default", "aten.ceil.default",
    "aten.round.default", "aten.trunc.default", "aten.where.self", "aten.where.Scalar",
    "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.masked_fill.Scalar", "aten.masked_fill.Tensor",
    "aten.outer.default",
)
# Elementwise functions.
_FUNCTIONS = (
    "aten.exp.default", "aten.exp2.default", "aten.expm1.default", "aten.log.default", "aten.log2.default",
    "aten.log1p.default", "aten.sin.default", "aten.cos.default", "aten.tanh.default", "aten.erf.default",
    "aten.sigmoid.default", "aten.relu.default", "aten.silu.default", "aten.gelu.default",
    "aten.softplus.default", "aten.isnan.default", "aten.isinf.default",
)
# Comparisons and logic.
_LOGIC = (
    "aten.eq.Tensor", "aten.eq.Scalar", "aten.ne.Tensor", "aten.ne.Scalar", "aten.lt.Tensor",
    "aten.lt.Scalar", "aten.le.Tensor", "aten.le.Scalar", "aten.gt.Tensor", "aten.gt.Scalar",
    "aten.ge.Tensor", "aten.ge.Scalar", "aten.logical_and.default", "aten.logical_or.default",
    "aten.logical_xor.default", "aten.logical_not.default", "aten.bitwise_and.Tensor",
    "aten.bitwise_or.Tensor", "aten.bitwise_not.default", "aten.__and__.Tensor", "aten.__or__.Tensor",
)
# Reductions, normalisations and selection.
_REDUCTIONS = (
    "aten.sum.default", "aten.sum.dim_IntList", "aten.mean.default", "aten.mean.dim", "aten.amax.default",
    "aten.amin.default", "aten.max.dim", "aten.min.dim", "aten.max.default", "aten.min.default",
    "aten.argmax.default", "aten.argmin.default", "aten.any.dim", "aten.all.dim", "aten.cumsum.default",
    "aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
    "aten.topk.default", "aten.sort.default",
)
# Indexing: gathers and functional scatters.
_INDEXING = (
    "aten.index.Tensor", "aten.index_select.default", "aten.gather.default", "aten.embedding.default",
    "aten.scatter.src", "aten.scatter.value", "aten.scatter_add.default", "aten.index_put.default",
    "aten.slice_scatter.default", "aten.select_scatter.default",
)
# Matrix products.
_MATMUL = (
    "aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.linear.default", "aten.addmm.default",
    "aten.baddbmm.default",
)
# Sizes of tensors with symbolic shapes (host integers).
_SIZES = ("aten.sym_size.int",)

ALLOWED_ATEN_OPS: frozenset[str] = frozenset(
    _VIEWS + _COPIES + _JOINS + _CREATION + _ARITHMETIC + _FUNCTIONS + _LOGIC + _REDUCTIONS + _INDEXING
    + _MATMUL + _SIZES)


def is_allowed(name: str) -> bool:
    """Whether ``name`` (``aten.mm.default``) is an ATen overload ds4c's IR admits."""
    return name in ALLOWED_ATEN_OPS


def refusal(name: str) -> str:
    """The one-line reason an op outside the allow-list is refused, with what to do."""
    return (f"op '{name}' is not in ds4c's allow-list of ATen ops (ds4c.ir.allowed_aten): the IR admits only "
            "ds4c's own ops, sym.* and the pure tensor ops listed there, never ops that touch files, write in "
            "place or draw random numbers; recompile the model with this ds4c, or, for a pure tensor op ds4c "
            "should admit, add it to ds4c.ir.allowed_aten")


__all__ = ["ALLOWED_ATEN_OPS", "is_allowed", "refusal"]
