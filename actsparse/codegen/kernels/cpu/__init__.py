"""Hand-written TIR kernels for CPUs (x86-64 AVX2/AVX-512, aarch64 NEON).

Each kernel is a function of static sizes returning a ``tvm.tirx.PrimFunc`` in
destination-passing style (outputs last, for Relax ``call_tir``); weight re-layouts
are numpy ``pack_*`` functions run once at compile time.
"""

from actsparse.codegen.kernels.cpu.build import BuiltKernel, aligned_array, build_kernel
from actsparse.codegen.kernels.cpu.dense import dense_matmul, pack_dense, vector_lanes
from actsparse.codegen.kernels.cpu.ffn import (
    ffn_gate_sparse,
    ffn_indexed,
    ffn_input_sparse,
    pack_ffn_gate_sparse,
    pack_ffn_indexed,
    pack_ffn_input_sparse,
)
from actsparse.codegen.kernels.cpu.sparse import sparse_matmul

__all__ = [
    "BuiltKernel",
    "aligned_array",
    "build_kernel",
    "dense_matmul",
    "ffn_gate_sparse",
    "ffn_indexed",
    "ffn_input_sparse",
    "pack_dense",
    "pack_ffn_gate_sparse",
    "pack_ffn_indexed",
    "pack_ffn_input_sparse",
    "sparse_matmul",
    "vector_lanes",
]
