"""Kernel selection in lowering/select.py: chained linears, quantized linears, NEON lane widths."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import actsparse
from actsparse.codegen.targets import kernel_lanes
from actsparse.codegen.targets import resolve_target
from actsparse.frontend.zoo import swiglu_stack


def _chain(widths=(32, 48, 40, 24)) -> onnx.ModelProto:
    """x -> MatMul -> MatMul -> MatMul, each linear reading the previous one's output directly."""
    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i, (k, n) in enumerate(zip(widths, widths[1:])):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"h{i}"], name=f"linear{i}"))
        h = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, widths[0]])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, widths[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_chained_linears_all_get_our_kernels():
    model = _chain()
    x = np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)
    art = actsparse.compile(model, target="host", example_inputs={"x": x})
    assert [layer["kernel"] for layer in art.kernels] == ["dense", "dense", "dense"]
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(art.run(x=x)["h2"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("passes, kernel, tolerance", [
    ("quantize{bits=8}", "int8_dense", 0.05),  # ours keeps activations in fp32: ORT rounds them to int8
    ("quantize{bits=8,mode=dynamic,granularity=token}", "int8_dense", 0.05),
    ("quantize{bits=4,group=32,accuracy_level=0}", "int4_dense", 1e-4),
])
def test_quantized_linears_compile_to_our_kernels(passes, kernel, tolerance):
    model = actsparse.optimize(ir.serde.deserialize_model(swiglu_stack(layers=1, d=64, f=128)), passes=passes).model
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    art = actsparse.compile(model, target="host", example_inputs={"x": x})
    assert {layer["kernel"] for layer in art.kernels} == {kernel}
    expected = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})[0]
    error = np.abs(art.run(x=x)["y"] - expected).max() / np.abs(expected).max()
    assert error <= tolerance


@pytest.mark.parametrize("passes, kernel, tolerance", [
    ("quantize{bits=8}", "int8_dense", 0.05),
    ("quantize{mode=dynamic,bits=8}", "int8_dense", 0.05),
    ("quantize{mode=dynamic,bits=8,granularity=token}", "int8_dense", 0.05),  # opset 17: ReduceMax axes attribute
    ("quantize{bits=4,group=32,accuracy_level=0}", "int4_dense", 1e-4),
])
def test_chained_quantized_linears_all_get_our_kernels(passes, kernel, tolerance):
    """Each linear reads the one before directly, as OPT-350m's project_out feeds lm_head: the
    quantize pass and the lowering rewrite a linear whose input an earlier rewrite replaced (the
    pass used to leave a dangling input, the lowering a generic TVM MatMulInteger / MatMulNBits)."""
    model = actsparse.optimize(ir.serde.deserialize_model(_chain()), passes=passes).model
    x = np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)
    art = actsparse.compile(model, target="host", example_inputs={"x": x})
    assert [layer["kernel"] for layer in art.kernels] == [kernel] * 3
    expected = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})[0]
    error = np.abs(art.run(x=x)["h2"] - expected).max() / np.abs(expected).max()
    assert error <= tolerance


@pytest.mark.parametrize("symmetric", ["true", "false"])
def test_int4_blocked_qdq_compiles_to_the_int4_kernels(symmetric):
    """quantize{format=qdq}: MatMul(x, DequantizeLinear(int4 | uint4 W, scales[, zero points],
    block_size)) is MatMulNBits' arithmetic with float x; the float int4 kernels take it (TVM's
    importer cannot read int4 tensors: it failed with "TensorCopyFromBytes: size mismatch")."""
    passes = f"quantize{{bits=4,group=32,format=qdq,symmetric={symmetric}}}"
    model = actsparse.optimize(ir.serde.deserialize_model(swiglu_stack(layers=1, d=64, f=128)), passes=passes).model
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    art = actsparse.compile(model, target="host", example_inputs={"x": x})
    assert {layer["kernel"] for layer in art.kernels} == {"int4_dense"}
    options = ort.SessionOptions()  # unfused: onnxruntime would run it as MatMulNBits with int8 x
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options)
    np.testing.assert_allclose(art.run(x=x)["y"], session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_per_token_int8_with_a_sparsifier_computes_the_graphs_numbers_on_vnni():
    """quantize{mode=dynamic,granularity=token} rounds each row of x symmetrically to int8 (scale
    max |x| / 127), which the one-row VNNI sparse kernel does itself: there it gives onnxruntime's
    numbers; elsewhere x stays float (the graph's rounding is then the difference)."""
    from actsparse.codegen.kernels.cpu.quant import has_int8_dot_product

    passes = "sparsify{method=teal,sparsity=0.5},quantize{mode=dynamic,bits=8,granularity=token}"
    model = actsparse.optimize(ir.serde.deserialize_model(swiglu_stack(layers=1, d=64, f=128)), passes=passes).model
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    art = actsparse.compile(model, target="host", example_inputs={"x": x})
    vnni = has_int8_dot_product(resolve_target("host"))
    assert {layer["kernel"] for layer in art.kernels} == {"int8_sparse_threshold" + ("_vnni" if vnni else "")}
    expected = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})[0]
    error = np.abs(art.run(x=x)["y"] - expected).max() / np.abs(expected).max()
    assert error <= (1e-4 if vnni else 0.05)


def test_compile_skips_onnxruntimes_speed_check_unless_asked(tmp_path):
    """The artifact runs actsparse's kernels: quantize's onnxruntime timing is off in compile (it
    warned of slowdowns the artifact does not have), on when the pipeline asks for it."""
    model = ir.serde.deserialize_model(swiglu_stack(layers=1, d=64, f=128))
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    quiet = actsparse.compile(model, target="host", passes="quantize{bits=4}", example_inputs={"x": x},
                              output=tmp_path / "a.actsparse")
    asked = actsparse.compile(model, target="host", passes="quantize{bits=4,speed_check=true}",
                              example_inputs={"x": x}, output=tmp_path / "b.actsparse")
    assert "speed_check" not in quiet.records[-1].report and "speed_check" in asked.records[-1].report


def _int4_dequantize_matmul(axis: int = 0) -> onnx.ModelProto:
    """MatMul(x, DequantizeLinear(int4 W [64, 32], scales, int4 zero points, block_size 32)),
    written by hand as another exporter would (signed codes with zero points: not our pass's form)."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    k, n, group = 64, 32, 32
    shape = (k // group, n) if axis == 0 else (k, n // group)
    inits = [numpy_helper.from_array(rng.integers(-8, 8, (k, n)).astype(ml_dtypes.int4), "w"),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, shape).astype(np.float32), "s"),
             numpy_helper.from_array(rng.integers(-3, 3, shape).astype(ml_dtypes.int4), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=axis, block_size=group, name="dq"),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_int4_dequantize_linear_from_another_exporter():
    model = _int4_dequantize_matmul()
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    art = actsparse.compile(model, target="host", example_inputs={"x": x})
    assert {layer["kernel"] for layer in art.kernels} == {"int4_dense"}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]
    np.testing.assert_allclose(art.run(x=x)["y"], expected, rtol=1e-4, atol=1e-4)
    # blocks along N (axis 1): not a form the kernels take, and TVM cannot read int4: one clear line
    with pytest.raises(actsparse.ActsparseError, match="'dq' \\(int4 DequantizeLinear\\): a form the compiler"):
        actsparse.compile(_int4_dequantize_matmul(axis=1), target="host", example_inputs={"x": x})


def test_per_token_form_with_another_scale_is_not_taken_for_the_kernels_rounding():
    """The kernels round x with max |x| / 127 per row: a graph of the same shape whose scale is
    something else (here max |x| / 63) is left to TVM's generic ops, which compute it exactly."""
    model = actsparse.optimize(ir.serde.deserialize_model(swiglu_stack(layers=1, d=64, f=128)),
                               passes="quantize{mode=dynamic,bits=8,granularity=token}").model
    for name, value in model.graph.initializers.items():
        if name.endswith(".int8_max"):
            value.const_value = ir.tensor(np.array(63.0, np.float32), name=name)
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    art = actsparse.compile(model, target="host", example_inputs={"x": x})
    assert not any(layer["kernel"].startswith("int8") for layer in art.kernels)
    expected = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(art.run(x=x)["y"], expected, rtol=1e-4, atol=1e-4)


def test_int8_weight_only_is_a_clear_refusal():
    model = actsparse.optimize(ir.serde.deserialize_model(swiglu_stack(layers=1, d=64, f=128)),
                               passes="quantize{mode=weight_only,bits=8}").model
    with pytest.raises(actsparse.ActsparseError, match="8-bit MatMulNBits has no compiled kernel.*mode=dynamic"):
        actsparse.compile(model, target="host", example_inputs={"x": np.zeros((1, 64), np.float32)})


def test_int4_with_int8_activations_takes_the_vnni_kernel_where_the_cpu_has_it():
    """accuracy_level=4 (the quantize default) lets x be int8 per block, as in onnxruntime: on a
    CPU with AVX-512 VNNI that selects int4_dense_vnni; elsewhere, and for x86/rpi4, the float one."""
    from actsparse.codegen.kernels.cpu.quant import has_int8_dot_product

    model = actsparse.optimize(ir.serde.deserialize_model(swiglu_stack(layers=1, d=64, f=128)),
                               passes="quantize{bits=4,group=32}").model
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    expected = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})[0]
    for target in ("host", "x86"):
        art = actsparse.compile(model, target=target, example_inputs={"x": x})
        vnni = has_int8_dot_product(resolve_target(target))
        assert {layer["kernel"] for layer in art.kernels} == {"int4_dense_vnni" if vnni else "int4_dense"}
        error = np.abs(art.run(x=x)["y"] - expected).max() / np.abs(expected).max()
        assert error <= 0.03  # both round x to int8 per block, in blocks of different sizes


def test_neon_gets_wider_register_blocks():
    rpi4 = resolve_target("rpi4")
    assert (kernel_lanes(rpi4, "dense"), kernel_lanes(rpi4, "sparse")) == (8, 16)
    x86 = resolve_target("x86")  # AVX2: 8 lanes for both
    assert (kernel_lanes(x86, "dense"), kernel_lanes(x86, "sparse")) == (8, 8)


@pytest.mark.parametrize("passes", [None, "sparsify{method=teal,sparsity=0.5,scope=ffn}", "relufy"])
def test_portable_x86_target_runs_here(passes):
    """x86 (AVX2, 8 lanes) packs and builds for 8 lanes; this machine runs AVX2 code."""
    model = ir.serde.deserialize_model(swiglu_stack(layers=2, d=64, f=160))
    if passes:
        model = actsparse.optimize(model, passes=passes).model
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    art = actsparse.compile(model, target="x86", example_inputs={"x": x})
    expected = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(art.run(x=x)["y"], expected, rtol=1e-4, atol=1e-4)
