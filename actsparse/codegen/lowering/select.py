"""Lower an optimized ONNX model to a TVM Relax module whose linear layers call our kernels.

1. specialize: fix the input shapes (TVM 0.27's ONNX importer needs static shapes), fold and infer.
2. select kernels (on the ONNX graph): every MatMul/Gemm with a constant 2-D weight becomes
     Sparsify(x, t[, s]) -> MatMul(., W)   =>  ActsparseSparseLinear(x, t[, s], W)   (threshold fused)
     Relu-produced x     -> MatMul(x, W)   =>  ActsparseSparseLinear(x, W)          (x != 0 skipped)
     x                   -> MatMul(x, W)   =>  ActsparseDenseLinear(x, Wp)          (W packed once)
     RankSparseMatMul (R-Sparse)       =>  ActsparseRankSparseLinear at one token (codegen/rsparse_lowering.py)
   The sparse forms only where x has at most SPARSE_MAX_ROWS rows (decoding); an encoder's
   128 tokens together activate nearly every input channel, so they take the dense kernel.
   Remaining actsparse functions are inlined to plain ONNX.
3. import with TVM's `from_onnx`, extended with converters that emit `call_tir` into our TIR
   kernels (`codegen/kernels/cpu`); everything else is lowered by TVM.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir

from actsparse.codegen.relax_util import as_converter, attr_text, weights_as_params
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import Linear, find_linears
from actsparse.ir.custom_ops import DOMAIN, SPARSIFY, SPARSIFY_WEIGHTED, add_initializer, unique_node_name
from actsparse.ir.large import drop_pages, weightless_proto

DENSE_LINEAR = "ActsparseDenseLinear"
SPARSE_LINEAR = "ActsparseSparseLinear"
LOWERING_DOMAIN = "actsparse.lowering"
# Sparse-input kernels read a weight row when its input channel is active in ANY of the M rows:
# at 50 % sparsity per row, 1 - 0.5**M of the rows (94 % at M = 4). Above this many rows the
# dense kernel is faster (measured: MiniLM seq 128, TEAL 50 %: sparse kernels 150 ms, dense 38 ms).
SPARSE_MAX_ROWS = 4


@dataclass
class KernelPlan:
    """Which kernel each linear layer got, for the compile report."""

    layers: list[dict] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for layer in self.layers if layer["kernel"] == kind)


def specialize_shapes(model: ir.Model, input_shapes: dict[str, tuple[int, ...]]) -> ir.Model:
    """Give every graph input a static shape and re-run folding + shape inference."""
    from actsparse.calibrate.data import model_inputs
    from actsparse.passes.cleanup import CleanupPass

    for value in model_inputs(model):
        if value.name not in input_shapes:
            if value.shape is None or not all(isinstance(d, int) for d in value.shape):
                raise ActsparseError(f"input {value.name!r} has a dynamic shape {value.shape}; give example inputs "
                                     f"to fix it (compiled models have static shapes)")
            continue
        shape = tuple(int(d) for d in input_shapes[value.name])
        if value.shape is not None and len(value.shape) != len(shape):
            raise ActsparseError(f"input {value.name!r}: example has rank {len(shape)}, model expects {len(value.shape)}")
        fixed = [(i, d) for i, d in enumerate(value.shape or []) if isinstance(d, int) and d != shape[i]]
        if fixed:  # a static export bakes its sizes into Reshape/Expand constants: it cannot be re-sized
            i, d = fixed[0]
            raise ActsparseError(f"input {value.name!r} has the static shape {tuple(value.shape)}, the example "
                                 f"{shape} (dim {i}: {shape[i]} != {d}); export the model at the shape to "
                                 f"compile, or with that dim dynamic")
        value.shape = ir.Shape(shape)
    return CleanupPass()(model).model


def select_kernels(model: ir.Model, target=None) -> KernelPlan:
    """Rewrite linears into kernel nodes in place (see the module docstring)."""
    import dataclasses

    from actsparse.codegen.ffn_fusion import fuse_ffn_blocks
    from actsparse.codegen.kernels.cpu.quant import has_int8_dot_product
    from actsparse.codegen.quant_lowering import select_quant_kernels
    from actsparse.codegen.rsparse_lowering import select_rank_sparse_kernels

    # Quantized linears (QDQ, dynamic, MatMulNBits) first, then gated FFN blocks that fit
    # one fused kernel, then every remaining float linear. A CUDA target takes only the kernels
    # that have a CUDA twin (kernels/cuda): the dense FFN runs as three dense GEMVs there, and
    # quantized linears stay with TVM's own lowering until they have CUDA kernels.
    on_cuda = target is not None and target.kind.name == "cuda"
    # R-Sparse linears first: one token on a CPU takes the fused kernel, anything else is expanded
    # into a SparsifyWeighted and three MatMuls, which the loop below gives kernels like any other.
    rank_sparse_layers = select_rank_sparse_kernels(
        model, target, lanes=kernel_lanes(target, "sparse") if target is not None else 16)
    if on_cuda:
        if any(node.op_type == "MatMulNBits" for node in model.graph):
            raise ActsparseError("int4 weights (MatMulNBits) have no CUDA kernel yet: compile for a CPU target, or "
                                 "quantize with format=qdq for TVM's own lowering")
        quant_layers = [{"name": node.name, "kernel": "tvm", "reason": "no CUDA int8/int4 kernel yet"}
                        for node in model.graph if node.op_type in ("MatMulInteger", "MatMulNBits", "DequantizeLinear")]
    else:
        quant_layers = select_quant_kernels(model, lanes=kernel_lanes(target, "dense") if target is not None else 16,
                                            int8_dot=has_int8_dot_product(target))
    with _cuda_fusable_forms() if on_cuda else contextlib.nullcontext():
        plan = KernelPlan(fuse_ffn_blocks(model))
    plan.layers += quant_layers + rank_sparse_layers
    for linear in find_linears(model):
        # A linear fed by one rewritten above reads the rewrite's output now.
        if linear.node.inputs and linear.node.inputs[0] is not linear.input and linear.node.inputs[0] is not None:
            linear = dataclasses.replace(linear, input=linear.node.inputs[0])
        if not _lowerable(linear):
            plan.layers.append({"name": linear.name, "kernel": "tvm", "reason": "not a 2-D float32 weight on the right"})
            continue
        x_shape = _static_shape(linear.input)
        if x_shape is None:
            plan.layers.append({"name": linear.name, "kernel": "tvm", "reason": "input shape not static"})
            continue
        weight = _weight_kn(linear)
        x = linear.input
        producer = x.producer()
        rows = int(np.prod(x_shape[:-1]))
        if rows > SPARSE_MAX_ROWS:  # the Sparsify (if any) stays, as plain ONNX, before a dense kernel
            producer = None
        inputs: list[ir.Value | None]
        if producer is not None and producer.domain == DOMAIN and producer.op_type in (SPARSIFY, SPARSIFY_WEIGHTED):
            mode = "scaled" if producer.op_type == SPARSIFY_WEIGHTED else "threshold"
            w = add_initializer(model, f"{linear.name}.weight_kn", weight)
            inputs = [producer.inputs[0], producer.inputs[1], *producer.inputs[2:3], w]
            op = SPARSE_LINEAR
        elif producer is not None and _zero_producing(producer):
            mode, op = "nonzero", SPARSE_LINEAR
            inputs = [x, add_initializer(model, f"{linear.name}.weight_kn", weight)]
        else:  # packed for the target's vector width in to_relax
            mode, op = "dense", DENSE_LINEAR
            inputs = [x, add_initializer(model, f"{linear.name}.weight_kn", weight)]
        attributes = {"mode": ir.AttrString("mode", mode), "n": ir.AttrInt64("n", weight.shape[1]),
                      "x_shape": ir.AttrInt64s("x_shape", x_shape), "layer": ir.AttrString("layer", linear.name)}
        node = ir.Node(LOWERING_DOMAIN, op, inputs, attributes=attributes,
                       name=unique_node_name(model, f"{linear.name}.kernel"))
        product = linear.node.outputs[0]
        node.outputs[0].type, node.outputs[0].shape = product.type, product.shape
        model.graph.insert_before(linear.node, node)
        result = node.outputs[0]
        if linear.bias is not None:  # the bias (Gemm's C, or MatMul's following Add) stays a plain Add
            add = ir.Node("", "Add", [result, linear.bias], name=unique_node_name(model, f"{linear.name}.bias"))
            add.outputs[0].type, add.outputs[0].shape = linear.output.type, linear.output.shape
            model.graph.insert_before(linear.node, add)
            result = add.outputs[0]
        # linear.output is after the bias: replacing it drops the MatMul's own bias Add with it.
        output_name = linear.output.name if linear.output.is_graph_output() else None
        ir.convenience.replace_all_uses_with(linear.output, result, replace_graph_outputs=True)
        if output_name:  # the model keeps its output names (e.g. GPT-2's logits from lm_head)
            linear.output.name = f"{output_name}.replaced"
            result.name = output_name
        plan.layers.append({"name": linear.name, "kernel": mode, "shape": list(weight.shape)})
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)
    model.opset_imports.setdefault(LOWERING_DOMAIN, 1)
    return plan


def _cuda_fusable_forms():
    from actsparse.codegen.ffn_fusion import GATE_SPARSE, INPUT_SPARSE, enabled_forms

    return enabled_forms({GATE_SPARSE, INPUT_SPARSE})  # the fused FFN kernels with a CUDA version


def _lowerable(linear: Linear) -> bool:
    """A float32 product of the activation (left) and a constant 2-D weight (right, possibly
    reached through Transpose/Cast/Identity, e.g. GPT-2's tied lm_head) that our kernels take."""
    w = linear.weight.const_value
    if w is None or w.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or len(w.shape) != 2:
        return False
    return linear.node.outputs[0].dtype == ir.DataType.FLOAT and linear.plain_product


def _static_shape(value: ir.Value) -> list[int] | None:
    """The value's shape when every dim is a known int (after shape specialization), else None."""
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return [int(d) for d in value.shape]


def _weight_kn(linear: Linear) -> np.ndarray:
    w = linear.weight.const_value.numpy().astype(np.float32, copy=False)  # no copy of float32 (maybe mmapped)
    kn = np.ascontiguousarray(w.T if linear.weight_layout == "NK" else w)
    if kn is not w:
        drop_pages(w)  # copied: external data need not stay resident (large models, ir/large.py)
    return kn


def _zero_producing(node: ir.Node) -> bool:
    """x is exactly zero where a ReLU cut it: Relu(.), or Mul(Relu(.), up) in a gated FFN."""
    if node.op_type == "Relu":
        return True
    if node.op_type == "Mul":
        return any(v is not None and v.producer() is not None and v.producer().op_type == "Relu" for v in node.inputs)
    return False


def to_relax(model: ir.Model, target, companions=None):
    """The kernel-selected model as a Relax IRModule with params detached (main(*inputs, *params)).

    Packs the dense kernels' weights for `target`'s vector width first (in `model`, in place).
    `companions(model)` -> {name: ir.Model}: more entry points over the same weights (a causal
    LM's `prefill`, codegen/prefill.py), built from the packed model and imported beside `main`;
    each is `name(*its inputs, *its params)`, its params a subset of main's, by name.
    """
    _pack_dense_weights(model, target)
    balance_variadic_ops(model)
    mod, params = _import(model, target)
    for name, companion in (companions(model) if companions else {}).items():
        extra, _ = _import(companion, target)
        for var, func in extra.functions.items():
            if var.name_hint == "main":
                mod[name] = func.with_attr("global_symbol", name)
            elif any(existing.name_hint == var.name_hint for existing in mod.get_global_vars()):
                raise ActsparseError(f"internal: {name} and main both define {var.name_hint}")
            else:
                mod[var] = func
    mod = schedule_tvm_ops(mod, target)
    return mod, params


def _import(model: ir.Model, target):
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    proto, weights = weightless_proto(model)  # weights stay arrays, out of the protobuf (2 GB cap, copies)
    proto = onnx.inliner.inline_local_functions(proto)
    _small_constants_inline(proto.graph)
    from actsparse.codegen.kernels.cpu.schedule import batch1_row_schedule, row_schedule_for

    with _our_converters(target), batch1_row_schedule(row_schedule_for(target)):
        try:
            mod = from_onnx(proto, keep_params_in_input=True, sanitize_input_names=False)
        except Exception as exc:
            from actsparse.codegen.relax_util import tvm_error_summary

            raise ActsparseError(f"TVM cannot import the model: {tvm_error_summary(exc)}") from None
    return weights_as_params(*detach_params(mod), weights)


def schedule_tvm_ops(mod, target):
    """Legalize and fuse the ops TVM lowers itself, then give them CPU schedules.

    TVM's default lowering leaves them as plain serial loops. Measured on all-MiniLM-L6-v2
    (batch 1, seq 128, 2 cores): attention's softmax @ V 10.7 ms -> 0.2 ms per layer, the
    fused GELU ~4.7 ms -> ~1 ms. Rules, first match wins: batched matmul (+ elementwise
    epilogue), dlight's CPU GEMV and Reduction (softmax, layer norm), elementwise.
    A rule that cannot schedule a function leaves it as it was. `tvm.compile` then runs
    its default pipeline on the result: legalizing again finds nothing left to do.
    """
    import tvm
    from tvm.relax.backend.cpu_generic.pipeline import legalize_passes
    from tvm.s_tir import dlight as dl

    if target.kind.name != "llvm":
        return mod
    rules = [_MatmulRule(), dl.cpu.GEMV(), _RowReductionRule(dl.cpu.Reduction()), _ElementwiseRule()]
    with target:
        mod = _fast_transcendentals(mod)
        mod = tvm.transform.Sequential(legalize_passes(target))(mod)
        return dl.ApplyDefaultSchedule(*[_Guarded(rule) for rule in rules])(mod)


def _fast_transcendentals(mod):
    """erf, tanh (the GELUs), exp (softmax) and sigmoid (SiLU) in float32 as vectorizable
    polynomial forms instead of a libm call per element: TVM's `topi.fast_erf` / `topi.fast_tanh`
    (float32-accurate) and `kernels/cpu/fastmath` (Cephes' expf, ~1e-7 relative). The exact erf
    took ~5 ms of MiniLM's ~6 ms GELU per layer at seq 128; the SiLU of a D=1024 F=2816 FFN layer
    ~15 us of scalar expf calls."""
    from tvm import relax, te, topi
    from tvm.relax import expr_functor

    from actsparse.codegen.kernels.cpu.fastmath import exp_f32, sigmoid_f32

    def elementwise(fn):
        return lambda x: te.compute(x.shape, lambda *i: fn(x(*i)), name="fast_" + fn.__name__)

    replacements = {"relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh,
                    "relax.exp": elementwise(exp_f32), "relax.sigmoid": elementwise(sigmoid_f32)}

    @expr_functor.mutator
    class FastTranscendentals(relax.PyExprMutator):
        def visit_call_(self, call):
            fast = replacements.get(getattr(call.op, "name", None))
            if fast is not None and call.args[0].ty.dtype == "float32":
                return self.builder_.call_te(fast, call.args[0])
            return super().visit_call_(call)

    mutator = FastTranscendentals(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


class _Guarded:
    """A schedule rule (anything with dlight's `apply(func, target, tunable)`) whose failure on
    one function leaves that function unscheduled instead of failing the compile."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:  # TVM raises many error types from a schedule primitive
            return None


class _RowReductionRule:
    """dlight's CPU Reduction, only where every block has the same leading spatial (row) domain.

    It parallelizes the last block's leading axes and computes the reductions under them; when
    the reduction has no rows of its own (RMSNorm of one token: mean over [1, 1, 1024] feeding
    a [1, 1, 1024] output) it recomputed the whole mean for every output element: 0.8 ms
    instead of ~1 us, 7 of the 14 ms of a 4-layer decode step.
    """

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        blocks = normalize_prim_func(s_tir.Schedule(func))
        if not blocks:
            return None
        kinds = [block.dom_kind() for block in blocks]
        leading = min(len(k) - len(k.lstrip("S")) for k in kinds)
        if leading == 0:
            return None
        rows = {tuple(str(d) for d in block.dom()[:leading]) for block in blocks}
        return self.rule.apply(func, target, tunable) if len(rows) == 1 else None


def _vector_lanes_f32(target) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // 32, 4)


def _loop_extent(sch, loop) -> int | None:
    from tvm.s_tir.dlight.base import get_extent

    extent = get_extent(sch, loop)
    return extent if isinstance(extent, int) else None


def _vectorize_inner(sch, loop, lanes: int) -> None:
    """Vectorize `loop` in chunks of `lanes` when it divides evenly (no tail to predicate)."""
    extent = _loop_extent(sch, loop)
    if extent is None or extent < 2:
        return
    if extent <= lanes:
        sch.vectorize(loop)
    elif extent % lanes == 0:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


_PARALLEL_MIN_ELEMENTS = 1 << 14  # below this, waking the thread pool costs more than it saves


class _ElementwiseRule:
    """Functions of injective blocks only: inline into the last, fuse its loops, parallel + vectorize."""

    def apply(self, func, target, _tunable):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or not all(block.is_injective() for block in blocks):
            return None
        for block in blocks[:-1]:
            sch.compute_inline(block.block_rv)
        loops = sch.get_loops(blocks[-1].block_rv)
        if not loops:
            return None
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        total = _loop_extent(sch, fused)
        lanes = _vector_lanes_f32(target)
        if total is None or total % lanes:
            return None
        outer, inner = sch.split(fused, [None, lanes])
        sch.vectorize(inner)
        if total >= _PARALLEL_MIN_ELEMENTS:
            sch.parallel(outer)
        return sch


class _MatmulRule:
    """C[b.., i, j] = sum_k A * B (+ elementwise epilogue): parallel over (b.., i), the k loop
    outside a vectorized j loop (a row of C stays in L1), epilogue computed per row."""

    def apply(self, func, target, _tunable):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or blocks[0].is_injective() or not all(b.is_injective() for b in blocks[1:]):
            return None
        main = blocks[0]
        kinds = main.dom_kind()
        loops = sch.get_loops(main.block_rv)
        if len(kinds) < 3 or not kinds.endswith("SSR") or kinds.count("R") != 1 or len(loops) != len(kinds):
            return None
        *batch, i, j, k = loops
        sch.reorder(*batch, i, k, j)
        rows = sch.fuse(*batch, i) if batch else i
        sch.parallel(rows)
        lanes = _vector_lanes_f32(target)
        _vectorize_inner(sch, j, lanes)
        sch.decompose_reduction(main.block_rv, k)
        for block in blocks[1:]:
            sch.reverse_compute_at(block.block_rv, rows, preserve_unit_loops=True)
            inner = sch.get_loops(block.block_rv)[-1]
            _vectorize_inner(sch, inner, lanes)
        return sch


def kernel_lanes(target, kind: str) -> int:
    """fp32 lanes per register block for a kernel kind on `target`. On 128-bit NEON (4 lanes)
    wider blocks pay: counted under qemu (docs/arm.md), the sparse kernel at 4 lanes spends 3-4
    scalar instructions per 2 FMAs on the row index and coefficient; 16 lanes spread them over 8
    FMAs (0.55x the dense instructions at 50 % sparsity instead of 0.92x), and dense does best
    at 8 lanes."""
    from actsparse.codegen.kernels.cpu.dense import vector_lanes

    lanes = vector_lanes(target)
    if lanes == 4:
        return 16 if kind == "sparse" else 8
    return lanes


def _pack_dense_weights(model: ir.Model, target) -> None:
    """W [K, N] of every dense kernel node -> column panels of 2 x the target's vector lanes."""
    from actsparse.codegen.kernels.cpu.dense import pack_dense

    block = 2 * kernel_lanes(target, "dense")
    for node in model.graph:
        if node.domain != LOWERING_DOMAIN or node.op_type != DENSE_LINEAR or node.inputs[1].const_value is None:
            continue
        weight = node.inputs[1]
        if len(weight.shape) == 3:
            continue  # already packed
        packed = pack_dense(weight.const_value.numpy(), block=block)
        drop_pages(weight.const_value.numpy())
        node.replace_input_with(1, add_initializer(model, f"{node.name}.weight_packed", packed))
        if not weight.uses():  # free an unpacked copy now: peak memory stays near 1x the weights
            model.graph.initializers.pop(weight.name)
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)


_VARIADIC_OPS = ("Sum", "Max", "Min", "Mean")
_VARIADIC_FAN_IN = 8  # above this many inputs, a variadic op becomes a balanced tree


def balance_variadic_ops(model: ir.Model) -> int:
    """Sum / Max / Min / Mean of many inputs -> a balanced tree of two-input nodes (Mean: a Sum
    tree, then a division by the count). TVM imports a variadic node as a chain, one level per
    input, and its recursive passes overflowed the stack on a 10,000-input Sum (SIGSEGV, nothing
    on stderr); a tree is log2(n) deep. Returns the number of nodes rewritten."""
    rewritten = 0
    for node in list(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _VARIADIC_OPS or len(node.inputs) <= _VARIADIC_FAN_IN:
            continue
        op = "Sum" if node.op_type == "Mean" else node.op_type
        level = list(node.inputs)
        depth = 0
        while len(level) > 1:
            paired = []
            for i in range(0, len(level) - 1, 2):
                pair = ir.Node("", op, [level[i], level[i + 1]], name=unique_node_name(model, f"{node.name}/tree{depth}"))
                model.graph.insert_before(node, pair)
                paired.append(pair.outputs[0])
            if len(level) % 2:
                paired.append(level[-1])
            level, depth = paired, depth + 1
        result = level[0]
        if node.op_type == "Mean":
            count = add_initializer(model, f"{node.name}.count", np.array(len(node.inputs), np.float32))
            divide = ir.Node("", "Div", [result, count], name=unique_node_name(model, f"{node.name}/mean"))
            model.graph.insert_before(node, divide)
            result = divide.outputs[0]
        output = node.outputs[0]
        result.shape, result.type = output.shape, output.type
        name = output.name
        ir.convenience.replace_all_uses_with(output, result, replace_graph_outputs=True)
        model.graph.remove(node, safe=False)
        output.name, result.name = f"{name}.replaced", name
        rewritten += 1
    return rewritten


def _small_constants_inline(graph: onnx.GraphProto) -> None:
    """Turn scalar and small integer initializers into Constant nodes, so TVM compiles them in.

    As parameters of `main` (keep_params_in_input) TVM cannot see their values: the shape
    operand of an Expand or Reshape then makes every later shape symbolic, and LLVM took
    ~90 s per symbolic reshape (tiny Llama, GQA repeat_kv). 0-d ones would also be 0-d
    parameters. Compiled in, they cost nothing; the parameter file keeps the real weights.
    """
    inputs = {value.name for value in graph.input}

    def inline(t: onnx.TensorProto) -> bool:
        size = int(np.prod(t.dims)) if len(t.dims) else 1
        small_int = t.data_type in _INTEGER_TYPES and size <= _INLINE_INT_LIMIT
        return t.name not in inputs and (len(t.dims) == 0 or small_int)

    chosen = [t for t in graph.initializer if inline(t)]
    if not chosen:
        return
    kept = [t for t in graph.initializer if not inline(t)]
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in chosen]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                  onnx.TensorProto.BOOL}
_INLINE_INT_LIMIT = 1 << 16  # elements; shapes, axes, position ids and masks, never weights


@contextlib.contextmanager
def _our_converters(target):
    from tvm.relax.frontend.onnx import onnx_frontend

    from actsparse.codegen.ffn_fusion import fused_ffn_converters
    from actsparse.codegen.kv_cache import kv_converters
    from actsparse.codegen.quant_lowering import quant_converters
    from actsparse.codegen.rsparse_lowering import rank_sparse_converters

    original = onnx_frontend._get_convert_map
    kernels = _KernelCache(target)
    from actsparse.codegen.prefill import prefill_converters

    fused = (fused_ffn_converters(target) | quant_converters(target) | kv_converters(target)
             | rank_sparse_converters(target) | prefill_converters(target))

    def extended():
        table = dict(original()) | fused
        table["Gather"] = _clipped_gather(table["Gather"])
        table[DENSE_LINEAR] = _converter(kernels, "dense")
        table[SPARSE_LINEAR] = _converter(kernels, "sparse")
        return table

    onnx_frontend._get_convert_map = extended
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def _clipped_gather(base):
    """TVM's Gather converter with out-of-range indices clipped instead of read out of bounds:
    TVM's default ("fast") take reads any address an index names (an embedding row, a rotary
    table row), so a bad token id or position would crash the process, not raise."""
    from tvm import relax

    class ClippedGather(base):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            original_take = relax.op.take
            relax.op.take = lambda data, indices, axis=None, mode="fast": original_take(data, indices, axis, mode="clip")
            try:
                return super()._impl_v13(bb, inputs, attr, params)
            finally:
                relax.op.take = original_take

    return ClippedGather


class _KernelCache:
    """One PrimFunc per (kind, mode, m, k, n), added to the module once."""

    def __init__(self, target):
        self.lanes = {kind: kernel_lanes(target, kind) for kind in ("dense", "sparse")}
        self.functions: dict[tuple, object] = {}

    def get(self, bb, kind: str, mode: str, m: int, k: int, n: int):
        from actsparse.codegen.kernels.cpu.dense import dense_matmul
        from actsparse.codegen.kernels.cpu.sparse import sparse_matmul

        key = (kind, mode, m, k, n)
        if key not in self.functions:
            if kind == "dense":
                func = dense_matmul(m, k, n, lanes=self.lanes["dense"])
            else:
                func = sparse_matmul(m, k, n, mode=mode, lanes=self.lanes["sparse"])
            name = f"actsparse_{kind}_{mode}_m{m}_k{k}_n{n}"
            self.functions[key] = bb.add_func(func.with_attr("global_symbol", name), name)
        return self.functions[key]


def _converter(kernels: _KernelCache, kind: str):
    from tvm import relax

    def convert(bb, inputs, attrs, params):
        x = inputs[0]
        n = int(attrs["n"])
        mode = attr_text(attrs.get("mode", "dense"))
        shape = [int(d) for d in attrs["x_shape"]]  # from ONNX: TVM may have lost a static shape
        k = shape[-1]
        m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        x2 = bb.emit(relax.op.reshape(x, (m, k))) if len(shape) != 2 else x
        func = kernels.get(bb, kind, mode, m, k, n)
        rest = list(inputs[1:])
        if mode in ("threshold", "scaled"):  # the kernel takes the scalar threshold as f32[1]
            rest[0] = bb.emit(relax.op.reshape(rest[0], (1,)))
        y = bb.emit(relax.call_tir(func, [x2, *rest], relax.TensorType((m, n), "float32")))
        return relax.op.reshape(y, (*shape[:-1], n)) if len(shape) != 2 else y

    return as_converter(convert)
