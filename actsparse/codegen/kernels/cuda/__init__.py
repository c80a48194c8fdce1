"""Hand-written TIR kernels for NVIDIA GPUs (sm_75 and newer; written for sm_80/86/89/90).

Each kernel has the signature and weight layout of its CPU twin in ``kernels/cpu``
(destination-passing style, outputs last), so the lowering packs weights once for
either target and ``codegen.cuda.retarget_kernels`` swaps one for the other. Threads
are bound with ``T.thread_binding``; functions carry ``tirx.is_scheduled`` so TVM's
dlight rules leave them alone.
"""

from actsparse.codegen.kernels.cuda.dense import dense_matmul_cuda
from actsparse.codegen.kernels.cuda.ffn import ffn_gate_sparse_cuda, ffn_input_sparse_cuda
from actsparse.codegen.kernels.cuda.sparse import sparse_matmul_cuda

__all__ = ["dense_matmul_cuda", "ffn_gate_sparse_cuda", "ffn_input_sparse_cuda", "sparse_matmul_cuda"]
