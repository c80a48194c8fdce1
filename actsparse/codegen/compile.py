"""Compile an (optimized) ONNX model for a target and pack it as an artifact.

    ir.Model --specialize shapes--> --select kernels--> --from_onnx + call_tir--> Relax
             --tvm.compile(target)--> executable --write_artifact--> model.actsparse/
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from actsparse.errors import ActsparseError

Progress = Callable[[str], None]


@dataclass
class CompileResult:
    path: Path
    target: dict
    kernels: list[dict]
    seconds: dict[str, float] = field(default_factory=dict)


def compile_model(model: ir.Model, target_name: str, output: str | os.PathLike, *,
                  input_shapes: dict[str, tuple[int, ...]] | None = None, passes: list[dict] | None = None,
                  report: dict | None = None, bundle_runtime: bool | str = False,
                  on_step: Progress | None = None, copy: bool = True, prepare: Callable | None = None,
                  extra_manifest: dict | None = None, extra_files: dict[str, bytes] | None = None,
                  companions: Callable | None = None, reference_model: ir.Model | None = None,
                  fused_ffn_forms: frozenset[str] | None = None) -> CompileResult:
    """Lower `model` for `target_name` and write the artifact at `output`. The model is not
    modified unless `copy=False` (for callers that own it and will not use it again).
    `prepare(model)` rewrites the graph before shapes are fixed (e.g. the KV-cache lowering);
    `extra_manifest` / `extra_files` go into the artifact as they are. `companions`: more entry
    points over the same weights (see `lower.to_relax`); the manifest's "functions" section lists
    each one's params as indices into main's. `reference_model` (the optimized model, when passes
    made it in memory): its onnxruntime outputs are packed for `actsparse deploy`'s check
    (actsparse.deploy.reference). `fused_ffn_forms`: only these fused FFN kernels (lowering/ffn_fusion.py;
    benchmarks compare them with per-linear kernels)."""
    from actsparse.codegen.lower import select_kernels, specialize_shapes, to_relax
    from actsparse.codegen.package import write_artifact
    from actsparse.codegen.targets import describe_target, resolve_target, target_summary
    from actsparse.ir.large import copy_model

    step = on_step or (lambda message: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    is_cuda = target_name.strip().startswith("cuda")
    if is_cuda:
        from actsparse.codegen import cuda

        target_name = cuda.cuda_target_name(target_name)  # "cuda" -> this machine's GPU arch
    target = resolve_target(target_name)
    if target.kind.name not in ("llvm", "cuda"):
        raise ActsparseError(f"target {target_name!r}: only CPU targets (host, x86, rpi4, aarch64) and cuda "
                             "compile models so far")
    info = describe_target(target)  # the target's facts, worked out once for every lowering step
    if copy:  # lowering rewrites the graph; callers that own a fresh model skip this copy
        model = copy_model(model)  # shares the tensors: lowering replaces them, never changes them
    from actsparse.ir.graph import name_unnamed_nodes

    name_unnamed_nodes(model)  # the kernel report names layers by node name
    from actsparse.codegen.op_check import check_lowerable_ops

    check_lowerable_ops(model)
    from actsparse.codegen.widen_float16 import widen_float16

    widened = widen_float16(model)  # no fp16 arithmetic in the CPU kernels: computed in float32
    if widened:
        step("float16 model: compiling in float32 (weights widened; inputs and outputs stay float16)")
    if prepare is not None:
        prepare(model)
    step("specializing shapes")
    model = specialize_shapes(model, input_shapes or {})
    step("selecting kernels")
    plan = select_kernels(model, info, fused_ffn_forms)
    timings["prepare"] = time.perf_counter() - start
    step("importing into TVM Relax")
    mark = time.perf_counter()
    from actsparse.codegen.relax_util import quiet_native_stderr

    with quiet_native_stderr():
        mod, params = to_relax(model, info, companions)
    timings["import"] = time.perf_counter() - mark
    step(f"compiling for {target_name}")
    mark = time.perf_counter()
    import tvm

    fcompile = None
    try:
        with quiet_native_stderr():
            if is_cuda:  # our CUDA kernels in place of the CPU ones; device code compiled by nvcc
                cuda.retarget_kernels(mod)
                with cuda.nvcc_mode():
                    executable = tvm.compile(mod, target=target)
                fcompile = cuda.embedding_fcompile(cuda.compile_device_code(executable, str(target.attrs["arch"])))
            else:
                executable = tvm.compile(mod, target=target)
    except ActsparseError:
        raise
    except Exception as exc:
        from actsparse.codegen.relax_util import tvm_error_summary

        raise ActsparseError(f"TVM failed to compile the model: {tvm_error_summary(exc)}") from None
    timings["compile"] = time.perf_counter() - mark
    inputs = _signature(model.graph.inputs, model)
    if reference_model is not None:
        from actsparse.deploy.reference import pack_reference

        step("computing the optimized model's reference outputs (onnxruntime)")
        section, files = pack_reference(reference_model, inputs)
        report = (report or {}) | {"reference": section}
        extra_files = dict(extra_files or {}) | files
    step("writing the artifact")
    mark = time.perf_counter()
    names = _param_names(mod["main"])
    values = params.get("main", [])
    if len(names) != len(values):
        raise ActsparseError(f"internal: {len(names)} parameters but {len(values)} values after import")
    functions = _companion_functions(mod, names)
    if functions:
        extra_manifest = (extra_manifest or {}) | {"functions": functions}
    path = write_artifact(
        output, executable, dict(zip(names, values)), inputs,
        _signature(model.graph.outputs, model), target_summary(target), passes or [],
        (report or {}) | {"kernels": plan.layers} | ({"float16": "computed in float32"} if widened else {}), bundle_runtime=bundle_runtime, fcompile=fcompile,
        extra_manifest=extra_manifest, extra_files=extra_files,
    )
    timings["write"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start
    return CompileResult(Path(path), target_summary(target), plan.layers, timings)


def _param_names(function) -> list[str]:
    return [str(p.name) for p in function.params[int(function.attrs["num_input"]):]]


def _companion_functions(mod, main_params: list[str]) -> dict[str, dict]:
    """{name: {"num_inputs", "params": indices into main's params}} of every entry point but main."""
    from tvm import relax

    index = {name: i for i, name in enumerate(main_params)}
    functions = {}
    for var, func in mod.functions.items():
        if var.name_hint == "main" or not isinstance(func, relax.Function) or "num_input" not in func.attrs:
            continue
        names = _param_names(func)
        missing = [name for name in names if name not in index]
        if missing:
            raise ActsparseError(f"internal: {var.name_hint} reads {missing[0]!r}, which main does not have")
        functions[var.name_hint] = {"num_inputs": int(func.attrs["num_input"]), "params": [index[n] for n in names]}
    return functions


def _signature(values, model: ir.Model) -> list[dict[str, Any]]:
    out = []
    for value in values:
        if value.name in model.graph.initializers:
            continue
        if value.shape is None or value.dtype is None:
            raise ActsparseError(f"value {value.name!r} has no static shape/dtype after specialization")
        out.append({"name": value.name, "shape": [d if isinstance(d, int) else str(d) for d in value.shape],
                    "dtype": str(np.dtype(value.dtype.numpy()))})
    return out
