"""CPU schedules for the ops TVM lowers itself (attention's matmuls, softmax, norms, GELU, ...).

TVM's default lowering leaves them as plain serial loops; `schedule_tvm_ops` legalizes and fuses
them and applies the rules below (first match wins), with float32 transcendentals as
vectorizable polynomials.
"""

from __future__ import annotations

from actsparse.codegen.targets import TargetInfo

def schedule_tvm_ops(mod, target: TargetInfo):
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

    if target.kind != "llvm":
        return mod
    lanes = target.tvm_vector_lanes
    rules = [_MatmulRule(lanes), dl.cpu.GEMV(), _RowReductionRule(dl.cpu.Reduction()), _ElementwiseRule(lanes)]
    with target.tvm_target:
        mod = _fast_transcendentals(mod)
        mod = tvm.transform.Sequential(legalize_passes(target.tvm_target))(mod)
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

    def __init__(self, lanes: int):
        self.lanes = lanes  # fp32 lanes of the target's vectors

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
        lanes = self.lanes
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

    def __init__(self, lanes: int):
        self.lanes = lanes  # fp32 lanes of the target's vectors

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
        lanes = self.lanes
        _vectorize_inner(sch, j, lanes)
        sch.decompose_reduction(main.block_rv, k)
        for block in blocks[1:]:
            sch.reverse_compute_at(block.block_rv, rows, preserve_unit_loops=True)
            inner = sch.get_loops(block.block_rv)[-1]
            _vectorize_inner(sch, inner, lanes)
        return sch
