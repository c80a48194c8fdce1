"""quantize: int8 and int4 quantization of the linear layers, as ONNX that onnxruntime runs.

mode=static (bits=8): per-output-channel symmetric int8 weights, per-tensor activations with a
range calibrated on the calibration set (minmax, percentile or entropy), as standard QDQ:
    Before: y = x @ W
    After:  y = DequantizeLinear(QuantizeLinear(x, s_x, z_x), s_x, z_x) @ DequantizeLinear(W_q, s_w[N], axis)
onnxruntime fuses the DQ pair with the MatMul into an integer matmul (MatMulIntegerToFloat).

mode=dynamic (bits=8): weights as above; the activation range is measured per call. Per tensor
(granularity=tensor, the default) in the form onnxruntime's own quantize_dynamic writes (ORT fuses
it to DynamicQuantizeMatMul):
    After:  (x_q, s_x, z_x) = DynamicQuantizeLinear(x)
            y = Cast(MatMulInteger(x_q, W_q, z_x, 0), float) * (s_x * s_w[N])
or per token (granularity=token: one symmetric int8 scale per row of x, so that one outlier
token does not coarsen every other token's grid):
    After:  s_x[.., T, 1] = max(ReduceMax(|x|, axis=-1), eps) / 127
            x_q = Cast(Clip(Round(x / s_x), -127, 127), int8)
            y = Cast(MatMulInteger(x_q, W_q), float) * s_x * s_w[N]

mode=weight_only (bits=4, or bits=8): group-wise weights along K (group 32/64/128), symmetric or
asymmetric, rounded to nearest (rtn) or error-minimizing on the layer's calibration inputs (gptq,
with H = XᵀX); activations stay float:
    format=matmulnbits: y = com.microsoft.MatMulNBits(x, B_packed[N, K/g, g*bits/8], scales[N, K/g] (, zp))
    format=qdq:         y = x @ DequantizeLinear(W_q (u)int4 [K, N], scales[K/g, N] (, zp), axis=0, block_size=g)
                        (opset 21; the model's opset is raised when it is lower)

float16 models: the graph is widened to float32 first (codegen/widen_float16.py: weights and
activations in float32, a Cast after each float16 input and before each float16 output, so the
model keeps its float16 interface), then quantized as above: the quantized weights are what the
model stores, and the CPUs and kernels have no float16 arithmetic. The report says so
(``float16``) and counts the weight bytes before at their float16 size.

Linears stay float (and the report says why) when the weight is shared with other nodes, the
input is not float32, or the weight is not float. MatMuls with a non-constant or non-2-D second
operand are listed as float too. Approximate: the pipeline reports cosine / max error.

Speed on the spot (speed_check=true, the default): the model before and after is timed in
onnxruntime on the first calibration sample, interleaved, and the report gives
``speedup_vs_float``; a quantized model slower than float32 (onnxruntime issues #6732, #12854,
#20052, #23004) gets a ``warning`` in the report and on the command line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from actsparse.calibrate.stats import as_rows, collect_values, token_masks
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import Linear, find_linears
from actsparse.ir.custom_ops import MS_DOMAIN, add_initializer, unique_name, unique_node_name
from actsparse.ir.large import copy_model
from actsparse.passes.base import ActsparsePass, option, register
from actsparse.passes.quant_numerics import (activation_qparams, gptq_quantize, layer_hessian, pack_matmulnbits,
                                              pack_zero_points, quantize_blockwise, quantize_per_channel)
from actsparse.passes.overrides import apply_overrides, overrides_option

GROUPS = (32, 64, 128)
QDQ_BLOCKED_OPSET = 21
# Ops whose meaning changed between opsets 18 and 21: raising the opset under them is not safe.
_CHANGED_BEFORE_21 = frozenset({"GridSample", "DFT", "GroupNormalization"})


@dataclass
class QuantizeOptions:
    """Options of `quantize` (approximate).

    Attributes:
        bits: weight bits: 8 (default; static/dynamic int8, or weight-only) or 4 (weight-only).
        mode: "auto" (default: static for bits=8, weight_only for bits=4), "static", "dynamic"
            or "weight_only".
        act: static activations: "uint8" (default, asymmetric) or "int8" (symmetric).
        calib: static activation range: "minmax" (default), "percentile" or "entropy".
        percentile: calib=percentile: the percentile of |x| kept in range (default 99.99; (50, 100]).
        group: weight-only: weights per scale along K: 32, 64 or 128 (default).
        symmetric: weight-only: no zero points (default True).
        rounding: weight-only: "rtn" (default, round to nearest) or "gptq" (on calibration inputs).
        damp: rounding=gptq: dampening as a fraction of the mean Hessian diagonal (default 0.1; (0, 10]).
        act_order: rounding=gptq: largest Hessian diagonal first (default True).
        accuracy_level: format=matmulnbits: ORT's compute type, 0..4 (default 4: int8 activations).
        format: weight-only: "matmulnbits" (default, com.microsoft.MatMulNBits) or "qdq"
            (blocked DequantizeLinear, opset 21; bits=4).
        granularity: mode=dynamic: "tensor" (default, one uint8 scale per tensor) or "token" (int8).
        speed_check: time the model before and after in onnxruntime (default True).
        overrides: per-layer bits by block or linear name: 0 keeps a layer float, `bits`
            quantizes it as the rest (passes/overrides.py).
    """
    bits: int = option(8, "weight bits: 8 (static/dynamic int8, or weight-only) or 4 (weight-only)")
    mode: Literal["auto", "static", "dynamic", "weight_only"] = option(
        "auto", "auto: static for bits=8, weight_only for bits=4")
    act: Literal["uint8", "int8"] = option("uint8", "static activations: uint8 asymmetric or int8 symmetric")
    calib: Literal["minmax", "percentile", "entropy"] = option("minmax", "how the static activation range is chosen")
    percentile: float = option(99.99, "calib=percentile: the percentile of |x| (or of x per side) kept in range")
    group: int = option(128, "weight-only: weights per scale along K (32, 64 or 128)")
    symmetric: bool = option(True, "weight-only: no zero points (zero at the middle code)")
    rounding: Literal["rtn", "gptq"] = option("rtn", "weight-only: round to nearest, or GPTQ on calibration inputs")
    damp: float = option(0.1, "rounding=gptq: dampening, as a fraction of the mean Hessian diagonal")
    act_order: bool = option(True, "rounding=gptq: input channels with the largest Hessian diagonal first")
    accuracy_level: int = option(4, "format=matmulnbits: ORT's compute type (0 default/fp32 .. 4 int8 "
                                    "activations per block: the fast CPU path)")
    format: Literal["matmulnbits", "qdq"] = option("matmulnbits", "weight-only: com.microsoft.MatMulNBits or "
                                                                  "blocked DequantizeLinear (opset 21)")
    granularity: Literal["tensor", "token"] = option("tensor", "mode=dynamic: one activation scale per tensor "
                                                               "(uint8, ORT's fused form) or per token (int8)")
    speed_check: bool = option(True, "time the model before and after in onnxruntime and report the speed "
                                     "against float32")
    overrides: dict[str, float] = overrides_option("bits: 0 keeps a layer float, `bits` quantizes it as the rest")

    def validate(self) -> None:
        where = "pass 'quantize'"
        if self.bits not in (4, 8):
            raise ActsparseError(f"{where}: bits must be 8 or 4, got {self.bits}")
        if self.bits == 4 and self.resolved_mode != "weight_only":
            raise ActsparseError(f"{where}: bits=4 is weight-only (mode=weight_only), not mode={self.mode}")
        if self.group not in GROUPS:
            raise ActsparseError(f"{where}: group must be one of {', '.join(map(str, GROUPS))}, got {self.group}")
        if not 50.0 < self.percentile <= 100.0:
            raise ActsparseError(f"{where}: percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 < self.damp <= 10.0:
            raise ActsparseError(f"{where}: damp must be in (0, 10], got {self.damp}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ActsparseError(f"{where}: accuracy_level must be 0, 1, 2, 3 or 4, got {self.accuracy_level}")
        if self.format == "qdq" and self.bits != 4 and self.resolved_mode == "weight_only":
            raise ActsparseError(f"{where}: format=qdq weight-only needs bits=4")
        if self.granularity == "token" and self.resolved_mode != "dynamic":
            raise ActsparseError(f"{where}: granularity=token is for mode=dynamic, not mode={self.resolved_mode}")
        for name, value in self.overrides.items():
            if value not in (0, self.bits):
                raise ActsparseError(f"{where}: bits for {name!r} must be 0 (keep it float) or {self.bits}, got {value:g}")

    @property
    def resolved_mode(self) -> str:
        if self.mode == "auto":
            return "static" if self.bits == 8 else "weight_only"
        return self.mode


@dataclass
class _Input:
    """One activation value and the quantized linears that read it (q/k/v share one)."""

    value: ir.Value
    linears: list[Linear] = field(default_factory=list)


@register
class QuantizePass(ActsparsePass):
    """Quantize linear layers: int8 static/dynamic (QDQ) or int4/int8 weight-only (MatMulNBits)."""

    name = "quantize"
    exact = False
    Options = QuantizeOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from actsparse.codegen.widen_float16 import widen_float16

        opts = self.options
        mode = opts.resolved_mode
        stored_itemsize = {name: v.dtype.itemsize for name, v in model.graph.initializers.items() if v.dtype}
        bytes_before = _initializer_bytes(model)
        widened = widen_float16(model)  # float16 weights: quantized from float32, interface kept
        linears, skipped = select_linears(model)
        if not linears:
            raise ActsparseError("pass 'quantize': no linear layer with a constant float32 weight to quantize")
        linears, kept_float = self._apply_overrides(model, linears)
        skipped += kept_float
        inputs = _group_by_input(linears)
        speed_sample = self._speed_sample()
        # A copy sharing the float tensors (the pass replaces them in `model`): never serialized whole.
        float_model = copy_model(model) if speed_sample is not None else None
        weight_bytes_before = int(sum(l.in_features * l.out_features * stored_itemsize.get(l.weight.name, 4)
                                      for l in linears))
        if mode == "weight_only" and opts.format == "qdq":
            _raise_opset(model, QDQ_BLOCKED_OPSET)
        rows = self._calibration_rows(model, inputs) if self._needs_rows(mode) else {}
        # Last group first: a group's input may be the output of a linear rewritten later (OPT-350m's
        # project_out feeds lm_head); that rewrite then moves the new nodes onto its new output.
        rewritten = [self._quantize_group(model, group, rows) for group in reversed(inputs)]
        layers = [layer for group_layers in reversed(rewritten) for layer in group_layers]  # graph order
        model = common.RemoveUnusedNodesPass()(model).model
        bytes_after = _initializer_bytes(model)
        self.report = {
            "mode": mode, "bits": opts.bits,
            "quantized": len(layers), "float": len(skipped),
            "weight_bytes_before": weight_bytes_before,
            "weight_bytes_after": sum(l["bytes"] for l in layers),
            "model_bytes_before": bytes_before, "model_bytes_after": bytes_after,
            "layers": layers, "stayed_float": skipped,
        }
        if widened:  # shown beside mode and bits: the activations are no longer float16
            self.report = {"mode": mode, "bits": opts.bits, "float16": "computed in float32"} | self.report
        if float_model is not None:
            self.report.update(_speed_vs_float(float_model, model, speed_sample))
        return ir.passes.PassResult(model, modified=True)

    def _quantize_group(self, model: ir.Model, group: _Input, rows: dict[str, np.ndarray]) -> list[dict]:
        """Rewrite the linears reading `group`'s input; their report entries."""
        opts = self.options
        mode = opts.resolved_mode
        if mode == "static":
            return self._static(model, group, rows[group.value.name])
        if mode == "dynamic" and opts.granularity == "token":
            return self._dynamic_per_token(model, group)
        if mode == "dynamic":
            return self._dynamic(model, group)
        hessian = layer_hessian(rows[group.value.name]) if opts.rounding == "gptq" else None
        return [self._weight_only(model, linear, hessian) for linear in group.linears]

    def _apply_overrides(self, model: ir.Model, linears: list[Linear]) -> tuple[list[Linear], list[dict]]:
        """The linears still to quantize, and those an override of 0 bits keeps float (as report entries)."""
        bits_of = apply_overrides(self.name, self.options.overrides, {l.name: self.options.bits for l in linears},
                                  {l.name: {l.name} for l in linears}, model, noun="quantizable linear")
        kept = [l for l in linears if bits_of[l.name] != 0]
        if not kept:
            raise ActsparseError("pass 'quantize': the overrides keep every linear layer float")
        return kept, [{"name": l.name, "op": l.node.op_type, "reason": "overrides: kept float"}
                      for l in linears if bits_of[l.name] == 0]

    def _speed_sample(self) -> dict[str, np.ndarray] | None:
        samples = self.context.calibration if self.options.speed_check else None
        return samples[0] if samples else None

    # --- calibration -------------------------------------------------------------------

    def _needs_rows(self, mode: str) -> bool:
        return mode == "static" or (mode == "weight_only" and self.options.rounding == "gptq")

    def _calibration_rows(self, model: ir.Model, inputs: list[_Input]) -> dict[str, np.ndarray]:
        samples = self.context.require_calibration(self.name)
        names = [group.value.name for group in inputs]
        values = collect_values(model, names, samples, on_sample=self.context.on_sample)
        masks = token_masks(samples)  # padding tokens do not count
        return {g.value.name: as_rows(values[g.value.name], g.linears[0].in_features, masks) for g in inputs}

    # --- int8 static (QDQ) ---------------------------------------------------------------

    def _static(self, model: ir.Model, group: _Input, rows: np.ndarray) -> list[dict]:
        opts = self.options
        scale, zero_point = activation_qparams(rows, opts.act, opts.calib, opts.percentile)
        base = group.linears[0].name or group.value.name
        s = add_initializer(model, f"{base}.input_scale", np.array(scale, np.float32))
        z = add_initializer(model, f"{base}.input_zero_point", np.array(zero_point, _act_dtype(opts.act)))
        q = _node(model, "", "QuantizeLinear", [group.value, s, z], f"{base}.input_quantize", ir.TensorType(
            ir.DataType.from_numpy(np.dtype(_act_dtype(opts.act)))), group.value.shape)
        dq = _node(model, "", "DequantizeLinear", [q.outputs[0], s, z], f"{base}.input_dequantize",
                   group.value.type, group.value.shape)
        _insert_after_producer(model, group.value, [q, dq])
        layers = []
        for linear in group.linears:
            w_q, w_scale = quantize_per_channel(linear.weight_array("KN").astype(np.float32))
            wq = add_initializer(model, f"{linear.name}.weight_quantized", w_q)
            ws = add_initializer(model, f"{linear.name}.weight_scale", w_scale)
            wz = add_initializer(model, f"{linear.name}.weight_zero_point", np.zeros_like(w_q[0]))
            weight_dq = _node(model, "", "DequantizeLinear", [wq, ws, wz], f"{linear.name}.weight_dequantize",
                              ir.TensorType(ir.DataType.FLOAT), ir.Shape(w_q.shape), attributes={"axis": 1})
            model.graph.insert_before(linear.node, weight_dq)
            _static_matmul(model, linear, dq.outputs[0], weight_dq.outputs[0])
            layers.append(_layer_entry(linear, "int8 static", w_q.nbytes + w_scale.nbytes + w_q.shape[1],
                                       input_scale=float(scale), input_zero_point=int(zero_point)))
        return layers

    # --- int8 dynamic ----------------------------------------------------------------------

    def _dynamic(self, model: ir.Model, group: _Input) -> list[dict]:
        base = group.linears[0].name or group.value.name
        dql = ir.Node("", "DynamicQuantizeLinear", [group.value], num_outputs=3,
                      name=unique_node_name(model, f"{base}.input_quantize"))
        for out, suffix, dtype, shape in zip(dql.outputs, ("quantized", "scale", "zero_point"),
                                             (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8),
                                             (group.value.shape, ir.Shape([]), ir.Shape([]))):
            out.name = unique_name(model, f"{group.value.name}_{suffix}")
            out.type, out.shape = ir.TensorType(dtype), shape
        _insert_after_producer(model, group.value, [dql])
        x_q, x_scale, x_zero = dql.outputs
        layers = []
        for linear in group.linears:
            w_q, w_scale = quantize_per_channel(linear.weight_array("KN").astype(np.float32))
            wq = add_initializer(model, f"{linear.name}.weight_quantized", w_q)
            ws = add_initializer(model, f"{linear.name}.weight_scale", w_scale)
            wz = add_initializer(model, f"{linear.name}.weight_zero_point", np.zeros_like(w_q[0]))
            out = linear.node.outputs[0]
            int_shape = out.shape
            scale = _node(model, "", "Mul", [x_scale, ws], f"{linear.name}.scale", ir.TensorType(ir.DataType.FLOAT),
                          ir.Shape(w_scale.shape))
            mm = _node(model, "", "MatMulInteger", [x_q, wq, x_zero, wz], f"{linear.name}.matmul_integer",
                       ir.TensorType(ir.DataType.INT32), int_shape)
            cast = _node(model, "", "Cast", [mm.outputs[0]], f"{linear.name}.cast", ir.TensorType(ir.DataType.FLOAT),
                         int_shape, attributes={"to": ir.DataType.FLOAT})
            mul = _node(model, "", "Mul", [cast.outputs[0], scale.outputs[0]], f"{linear.name}.dequantize",
                        out.type, int_shape)
            new_nodes = [scale, mm, cast, mul]
            if linear.node.op_type == "Gemm" and linear.bias is not None:
                new_nodes.append(_node(model, "", "Add", [mul.outputs[0], linear.node.inputs[2]], f"{linear.name}.bias",
                                       out.type, int_shape))
            _replace_node(model, linear.node, new_nodes)
            layers.append(_layer_entry(linear, "int8 dynamic", w_q.nbytes + w_scale.nbytes + w_q.shape[1]))
        return layers

    def _dynamic_per_token(self, model: ir.Model, group: _Input) -> list[dict]:
        base = group.linears[0].name or group.value.name
        x = group.value
        float_type = ir.TensorType(ir.DataType.FLOAT)

        def const(suffix: str, value, dtype=np.float32) -> ir.Value:
            return add_initializer(model, f"{base}.{suffix}", np.array(value, dtype))

        def node(op: str, inputs, suffix: str, out_type=float_type, shape=None, **attrs) -> ir.Node:
            return _node(model, "", op, inputs, f"{base}.{suffix}", out_type, shape, attributes=attrs or None)

        row_shape = ir.Shape([*list(x.shape)[:-1], 1]) if x.shape is not None else None
        magnitude = node("Abs", [x], "input_abs", shape=x.shape)
        if model.opset_imports.get("", 1) >= 18:  # axes became an input in opset 18
            row_max = node("ReduceMax", [magnitude.outputs[0], const("reduce_axes", [-1], np.int64)],
                           "input_row_max", shape=row_shape, keepdims=1)
        else:
            row_max = node("ReduceMax", [magnitude.outputs[0]], "input_row_max", shape=row_shape, keepdims=1,
                           axes=[-1])
        floor = node("Max", [row_max.outputs[0], const("scale_floor", 1e-8)], "input_row_max_floor", shape=row_shape)
        scale = node("Div", [floor.outputs[0], const("int8_max", 127.0)], "input_scale", shape=row_shape)
        scaled = node("Div", [x, scale.outputs[0]], "input_scaled", shape=x.shape)
        rounded = node("Round", [scaled.outputs[0]], "input_round", shape=x.shape)
        clipped = node("Clip", [rounded.outputs[0], const("clip_low", -127.0), const("clip_high", 127.0)],
                       "input_clip", shape=x.shape)
        x_q = node("Cast", [clipped.outputs[0]], "input_quantize", ir.TensorType(ir.DataType.INT8), x.shape,
                   to=ir.DataType.INT8)
        _insert_after_producer(model, x, [magnitude, row_max, floor, scale, scaled, rounded, clipped, x_q])
        layers = []
        for linear in group.linears:
            w_q, w_scale = quantize_per_channel(linear.weight_array("KN").astype(np.float32))
            wq = add_initializer(model, f"{linear.name}.weight_quantized", w_q)
            ws = add_initializer(model, f"{linear.name}.weight_scale", w_scale)
            out = linear.node.outputs[0]
            mm = _node(model, "", "MatMulInteger", [x_q.outputs[0], wq], f"{linear.name}.matmul_integer",
                       ir.TensorType(ir.DataType.INT32), out.shape)
            cast = _node(model, "", "Cast", [mm.outputs[0]], f"{linear.name}.cast", float_type, out.shape,
                         attributes={"to": ir.DataType.FLOAT})
            per_token = _node(model, "", "Mul", [cast.outputs[0], scale.outputs[0]], f"{linear.name}.token_scale",
                              float_type, out.shape)
            mul = _node(model, "", "Mul", [per_token.outputs[0], ws], f"{linear.name}.dequantize", out.type, out.shape)
            new_nodes = [mm, cast, per_token, mul]
            if linear.node.op_type == "Gemm" and linear.bias is not None:
                new_nodes.append(_node(model, "", "Add", [mul.outputs[0], linear.node.inputs[2]], f"{linear.name}.bias",
                                       out.type, out.shape))
            _replace_node(model, linear.node, new_nodes)
            layers.append(_layer_entry(linear, "int8 dynamic per token", w_q.nbytes + w_scale.nbytes))
        return layers

    # --- weight-only ----------------------------------------------------------------------

    def _weight_only(self, model: ir.Model, linear: Linear, hessian: np.ndarray | None) -> dict:
        opts = self.options
        w_kn = linear.weight_array("KN").astype(np.float32)
        if hessian is not None:
            codes, scales, zeros = gptq_quantize(w_kn, hessian, opts.bits, opts.group, opts.symmetric,
                                                 damp=opts.damp, act_order=opts.act_order)
        else:
            codes, scales, zeros = quantize_blockwise(w_kn, opts.bits, opts.group, opts.symmetric)
        if opts.format == "matmulnbits":
            new_nodes, nbytes = self._matmulnbits(model, linear, codes, scales, zeros)
        else:
            new_nodes, nbytes = self._blocked_qdq(model, linear, codes, scales, zeros)
        _replace_node(model, linear.node, new_nodes)
        kind = f"int{opts.bits} g{opts.group} {'sym' if opts.symmetric else 'asym'} {opts.rounding} {opts.format}"
        return _layer_entry(linear, kind, nbytes)

    def _matmulnbits(self, model, linear, codes, scales, zeros) -> tuple[list[ir.Node], int]:
        opts = self.options
        packed = pack_matmulnbits(codes, opts.bits, opts.group)
        b = add_initializer(model, f"{linear.name}.weight_q{opts.bits}", packed)
        s = add_initializer(model, f"{linear.name}.weight_scales", scales.astype(np.float32))
        inputs = [linear.input, b, s]
        nbytes = packed.nbytes + scales.size * 4
        if not opts.symmetric:
            zp = pack_zero_points(zeros, opts.bits)
            inputs.append(add_initializer(model, f"{linear.name}.weight_zero_points", zp))
            nbytes += zp.nbytes
        out = linear.node.outputs[0]
        node = _node(model, MS_DOMAIN, "MatMulNBits", inputs, f"{linear.name}.matmul_nbits", out.type, out.shape,
                     attributes={"K": linear.in_features, "N": linear.out_features, "bits": opts.bits,
                                 "block_size": opts.group, "accuracy_level": opts.accuracy_level})
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        nodes = [node]
        if linear.node.op_type == "Gemm" and linear.bias is not None:
            nodes.append(_node(model, "", "Add", [node.outputs[0], linear.node.inputs[2]], f"{linear.name}.bias",
                               out.type, out.shape))
        return nodes, nbytes

    def _blocked_qdq(self, model, linear, codes, scales, zeros) -> tuple[list[ir.Node], int]:
        opts = self.options
        import ml_dtypes

        k = linear.in_features
        codes_kn = codes[:, :k].T  # [K, N]
        middle = 1 << (opts.bits - 1)
        if opts.symmetric:
            weight = (codes_kn.astype(np.int8) - middle).astype(ml_dtypes.int4)
        else:
            weight = codes_kn.astype(ml_dtypes.uint4)
        w = add_initializer(model, f"{linear.name}.weight_q4", weight)
        s = add_initializer(model, f"{linear.name}.weight_scales", np.ascontiguousarray(scales.T.astype(np.float32)))
        inputs = [w, s]
        nbytes = (weight.size + 1) // 2 + scales.size * 4
        if not opts.symmetric:
            zp = np.ascontiguousarray(zeros.T).astype(ml_dtypes.uint4)
            inputs.append(add_initializer(model, f"{linear.name}.weight_zero_points", zp))
            nbytes += (zp.size + 1) // 2
        dq = _node(model, "", "DequantizeLinear", inputs, f"{linear.name}.weight_dequantize",
                   ir.TensorType(ir.DataType.FLOAT), ir.Shape([k, linear.out_features]),
                   attributes={"axis": 0, "block_size": opts.group})
        out = linear.node.outputs[0]
        matmul = _node(model, "", "MatMul", [linear.input, dq.outputs[0]], f"{linear.name}.matmul_qdq", out.type,
                       out.shape)
        nodes = [dq, matmul]
        if linear.node.op_type == "Gemm" and linear.bias is not None:
            nodes.append(_node(model, "", "Add", [matmul.outputs[0], linear.node.inputs[2]], f"{linear.name}.bias",
                               out.type, out.shape))
        return nodes, nbytes


# ------------------------------------------------------------------------- selection

def select_linears(model: ir.Model) -> tuple[list[Linear], list[dict]]:
    """The linears this pass quantizes, and every other MatMul/Gemm with the reason it stays float."""
    chosen, skipped = [], []
    linears = find_linears(model)
    by_node = {l.node: l for l in linears}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        linear = by_node.get(node)
        reason = _why_float(node) if linear is None else _why_linear_float(linear)
        if reason is None:
            chosen.append(linear)
        else:
            skipped.append({"name": node.name or node.outputs[0].name, "op": node.op_type, "reason": reason})
    return chosen, skipped


def _why_linear_float(linear: Linear) -> str | None:
    if linear.weight_shared:
        return "weight shared with other nodes"
    if linear.weight.dtype != ir.DataType.FLOAT:
        return f"weight dtype {linear.weight.dtype.name.lower()} (only float32 weights are quantized)"
    if linear.input.dtype not in (None, ir.DataType.FLOAT):
        return f"input dtype {linear.input.dtype.name.lower()} (only float32 inputs are quantized)"
    return None


def _why_float(node: ir.Node) -> str:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    tensor = None
    if weight is not None and not weight.is_graph_input():
        try:
            tensor = ir.convenience.get_const_tensor(weight)
        except ValueError:
            tensor = None
    if tensor is None:
        return "weight not constant"
    if len(tensor.shape) != 2:
        return f"weight is {len(tensor.shape)}-D, not 2-D"
    return "not a plain linear (Gemm transA/alpha/beta, constant left operand, or computed bias)"


def _group_by_input(linears: list[Linear]) -> list[_Input]:
    groups: dict[int, _Input] = {}
    for linear in linears:
        groups.setdefault(id(linear.input), _Input(linear.input)).linears.append(linear)
    return list(groups.values())


# ------------------------------------------------------------------------ graph helpers

def _node(model: ir.Model, domain: str, op: str, inputs, name: str, out_type, out_shape, *,
          attributes: dict | None = None) -> ir.Node:
    node = ir.Node(domain, op, inputs, attributes=ir.convenience.convert_attributes(attributes or {}),
                   name=unique_node_name(model, name))
    out = node.outputs[0]
    out.name = unique_name(model, f"{name}_out")
    out.type, out.shape = out_type, out_shape
    return node


def _insert_after_producer(model: ir.Model, value: ir.Value, nodes: list[ir.Node]) -> None:
    producer = value.producer()
    if producer is not None and producer.graph is model.graph:
        model.graph.insert_after(producer, nodes)
    else:
        model.graph.insert_before(next(iter(model.graph)), nodes)


def _replace_node(model: ir.Model, old: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Put `new_nodes` where `old` was; the last new node's output takes over old's output (and name)."""
    model.graph.insert_before(old, new_nodes)
    old_out, new_out = old.outputs[0], new_nodes[-1].outputs[0]
    name = old_out.name
    ir.convenience.replace_all_uses_with(old_out, new_out, replace_graph_outputs=True)
    model.graph.remove(old, safe=True)
    new_out.name = name


def _static_matmul(model: ir.Model, linear: Linear, x: ir.Value, weight: ir.Value) -> None:
    """Make the linear `MatMul(x, weight) (+ Add(bias[1, N]))`. onnxruntime fuses MatMul + Add with a
    1-D bias into Gemm before it looks for QDQ patterns, and Gemm between DequantizeLinears stays a
    float Gemm; a MatMul with a [1, N] bias Add becomes an integer MatMulIntegerToFloat."""
    if linear.node.op_type == "MatMul":
        linear.node.replace_input_with(_input_index(linear), x)
        linear.node.replace_input_with(1, weight)
        if linear.bias_node is not None and _rank(linear.output) != 1:
            _bias_as_row(model, linear, linear.bias_node, linear.bias)
        return
    out = linear.node.outputs[0]
    matmul = _node(model, "", "MatMul", [x, weight], f"{linear.name}.matmul", out.type, out.shape)
    nodes = [matmul]
    if linear.bias is not None:
        add = _node(model, "", "Add", [matmul.outputs[0], linear.bias], f"{linear.name}.bias", out.type, out.shape)
        nodes.append(add)
    _replace_node(model, linear.node, nodes)
    if linear.bias is not None:
        _bias_as_row(model, linear, nodes[-1], linear.bias)


def _bias_as_row(model: ir.Model, linear: Linear, add: ir.Node, bias: ir.Value) -> None:
    array = linear.bias_array()
    if array is None or array.size != linear.out_features:
        return  # a full [M, N] bias: leave it
    row = add_initializer(model, f"{linear.name}.bias_row", array.reshape(1, -1).astype(np.float32))
    for index, value in enumerate(add.inputs):
        if value is bias:
            add.replace_input_with(index, row)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _input_index(linear: Linear) -> int:
    for index, value in enumerate(linear.node.inputs):
        if value is linear.input:
            return index
    raise ActsparseError(f"linear {linear.name!r}: its input is not an input of its node")


def _act_dtype(act: str):
    return np.uint8 if act == "uint8" else np.int8


def _layer_entry(linear: Linear, kind: str, nbytes: int, **extra) -> dict:
    return {"name": linear.name, "kind": kind, "in_features": linear.in_features,
            "out_features": linear.out_features,
            "bytes_before": linear.in_features * linear.out_features * int(linear.weight.dtype.itemsize),
            "bytes": int(nbytes), **extra}


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _raise_opset(model: ir.Model, version: int) -> None:
    """Raise the default-domain opset to `version` (blocked DequantizeLinear, int4 types), where no
    op in the model changed meaning between its opset and `version`."""
    current = model.opset_imports.get("", 1)
    if current >= version:
        return
    changed = sorted({node.op_type for node in model.graph.all_nodes()
                      if node.domain in ("", "ai.onnx") and node.op_type in _CHANGED_BEFORE_21})
    if changed or current < 13:
        why = f"ops {', '.join(changed)} changed meaning" if changed else f"opset {current} is older than 13"
        raise ActsparseError(f"pass 'quantize': format=qdq needs opset {version} and {why}; use format=matmulnbits")
    model.opset_imports[""] = version
    for function in model.functions.values():
        if "" in function.opset_imports:
            function.opset_imports[""] = version


def _speed_vs_float(float_model: ir.Model, quantized_model: ir.Model, sample: dict[str, np.ndarray],
                    budget_seconds: float = 0.3) -> dict:
    """onnxruntime time of the float and the quantized model on ``sample``, interleaved; a
    ``warning`` when the quantized one is slower."""
    from actsparse.benchmark.timing import interleaved_best
    from actsparse.ir.ort_session import ort_session

    sessions = {name: ort_session(model) for name, model in (("float", float_model), ("quantized", quantized_model))}
    feeds = {name: {i.name: sample[i.name] for i in session.get_inputs() if i.name in sample}
             for name, session in sessions.items()}
    calls = {name: (lambda s, f: lambda _i: s.run(None, f))(session, feeds[name]) for name, session in sessions.items()}
    once = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call(0)
        once[name] = time.perf_counter() - start
    iters = {name: max(1, int(budget_seconds / 3 / max(t, 1e-6))) for name, t in once.items()}
    best = interleaved_best(calls, iters, blocks=3, settle_seconds=0.05)
    speedup = best["float"] / best["quantized"]
    out = {"speedup_vs_float": round(speedup, 3),
           "speed_check": {"engine": "onnxruntime", "float_ms": round(best["float"] * 1e3, 4),
                           "quantized_ms": round(best["quantized"] * 1e3, 4), "iterations": iters}}
    if speedup < 1.0:
        out["warning"] = (f"the quantized model runs {1 / speedup:.2f}x slower than float32 in onnxruntime on "
                          f"this machine; weigh the size saving against it, or try another mode")
    return out
