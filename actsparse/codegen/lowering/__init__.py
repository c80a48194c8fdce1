"""Lowering: the optimized ONNX graph -> kernel nodes -> a TVM Relax module.

One file per step (codegen/lower.py drives them):
  select.py        every linear layer -> a dense / sparse kernel node (KernelPlan)
  ffn_fusion.py    a gated FFN block at one token -> one fused kernel node
  quant.py         int8 / int4 linears -> quantized kernel nodes
  rsparse.py       R-Sparse linears -> the fused rank-sparse kernel node
  prefill.py       the prompt-chunk entry point bound to the decode step's weights
  relax_import.py  TVM's ONNX importer, with converters for the kernel nodes
  tvm_schedule.py  CPU schedules for the ops TVM lowers itself
  ops.py           the `actsparse.lowering` op names and the converter helpers
"""
