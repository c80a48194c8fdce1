"""CUDA TIR kernels: they compile for sm_80..sm_90 here (no GPU needed), the generated CUDA
has the intended shape (float4 loads, warp shuffles, ballot compaction, no register spills),
they match the CPU kernels' signatures, and - only where a GPU is present - their numbers
match the numpy references.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from actsparse.codegen import cuda  # noqa: E402
from actsparse.codegen.kernels import reference as ref  # noqa: E402
from actsparse.codegen.kernels.cpu import (  # noqa: E402
    dense_matmul,
    ffn_gate_sparse,
    ffn_input_sparse,
    pack_dense,
    pack_ffn_gate_sparse,
    pack_ffn_input_sparse,
    sparse_matmul,
)
from actsparse.codegen.kernels.cuda import (  # noqa: E402
    dense_matmul_cuda,
    ffn_gate_sparse_cuda,
    ffn_input_sparse_cuda,
    sparse_matmul_cuda,
)
from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.runtime.ffi import cuda_devices  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")


def _gpu_arch() -> str | None:
    try:
        return cuda_devices()[0][1]
    except Exception:
        return None


GPU_ARCH = _gpu_arch()
needs_gpu = pytest.mark.skipif(GPU_ARCH is None, reason="no CUDA GPU: numerics need an NVIDIA GPU and driver")


def _kernels():
    """name -> CUDA PrimFunc covering every kernel form, odd sizes included."""
    return {
        "dense_m1": dense_matmul_cuda(1, 300, 130),
        "dense_m19": dense_matmul_cuda(19, 64, 96),
        "sparse_threshold": sparse_matmul_cuda(1, 2048, 5632, "threshold"),
        "sparse_scaled_m3": sparse_matmul_cuda(3, 300, 130, "scaled"),
        "sparse_nonzero": sparse_matmul_cuda(1, 100, 96, "nonzero"),
        "ffn_gate": ffn_gate_sparse_cuda(64, 200, "relu"),
        "ffn_gate_shifted": ffn_gate_sparse_cuda(64, 176, "silu", shifted=True),
        "ffn_input": ffn_input_sparse_cuda(64, 200, "silu"),
    }


def _compile(funcs: dict, arch: str):
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with cuda.nvcc_mode():
        return tvm.compile(mod, target={"kind": "cuda", "arch": arch})


@pytest.fixture(scope="module")
def source() -> str:
    sources = cuda.cuda_sources(_compile(_kernels(), "sm_80"))
    assert len(sources) == 1
    return sources[0]


def _kernel_source(source: str, name: str) -> str:
    """The body of __global__ function `name` (up to the next __global__ definition)."""
    start = source.index(f"void __launch_bounds__(256) {name}(", source.index(f"{name}(") + 1)
    end = source.find("extern \"C\" __global__", start)
    return source[start:end if end > 0 else len(source)]


def test_dense_uses_float4_loads_and_warp_shuffles(source):
    body = _kernel_source(source, "dense_m1_kernel")
    assert re.search(r"\*\(float4\*\)\(wp_ptr", body), "weight loads should be float4"
    assert body.count("__shfl_xor_sync") == 2 * 4  # offsets 8 and 16, four columns per lane
    assert "__syncthreads()" in body and "__shared__" in body


def test_sparse_compacts_with_ballot_and_gathers_rows(source):
    body = _kernel_source(source, "sparse_threshold_kernel")
    assert "__ballot_sync" in body and "__popc" in body
    assert re.search(r"\*\(float4\*\)\(w_ptr \+ \(*row \* 5632\)", body), "each active row read as float4"
    # n = 130 is not a multiple of 4: scalar loads, no misaligned float4
    assert "float4" not in _kernel_source(source, "sparse_scaled_m3_kernel").replace("make_float4", "")


def test_fused_ffn_is_three_launches(source):
    for name in ("ffn_gate", "ffn_gate_shifted", "ffn_input"):
        kernels = re.findall(rf"void __launch_bounds__\(\d+\) ({name}_kernel(?:_\d)?)\(", source)
        assert sorted(set(kernels)) == [f"{name}_kernel", f"{name}_kernel_1", f"{name}_kernel_2"]


@needs_nvcc
@pytest.mark.slow  # ~9 s of ptxas
def test_nvcc_compiles_without_spills():
    """ptxas for sm_90: every kernel keeps its accumulators in registers (no stack, no spills)."""
    source = cuda.cuda_sources(_compile(_kernels(), "sm_90"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "k.cu"
        cu.write_text(source)
        done = subprocess.run(["nvcc", "--cubin", "-arch=sm_90", "--resource-usage", "-o", str(cu.with_suffix(".cubin")),
                               str(cu)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stdout + done.stderr
    assert report.count("Compiling entry function") == 2 + 3 + 3 * 3
    assert "bytes stack frame" in report
    assert not re.search(r"[1-9]\d* bytes (stack frame|spill stores|spill loads)", report), report


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", pytest.param("sm_86", marks=pytest.mark.slow),
                                  pytest.param("sm_89", marks=pytest.mark.slow), "sm_90"])
def test_fatbin_for_each_arch(arch):
    executable = _compile({"d": dense_matmul_cuda(1, 64, 96), "s": sparse_matmul_cuda(1, 64, 96, "nonzero")}, arch)
    with tempfile.TemporaryDirectory() as tmp:
        fatbin = cuda.nvcc_fatbin(cuda.cuda_sources(executable)[0], arch, Path(tmp))
    assert fatbin[:4] == b"\x50\xed\x55\xba"  # the fatbin magic
    assert f"sm_{arch[3:]}".encode() in fatbin or len(fatbin) > 1000


# ------------------------------------------------------------------ same signatures as the CPU kernels


def _param_specs(func):
    return [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in func.params]


@pytest.mark.parametrize("symbol, cpu", [
    ("actsparse_dense_dense_m1_k64_n100", lambda: dense_matmul(1, 64, 100)),
    ("actsparse_dense_dense_m5_k33_n70", lambda: dense_matmul(5, 33, 70)),
    ("actsparse_sparse_threshold_m1_k64_n100", lambda: sparse_matmul(1, 64, 100, "threshold")),
    ("actsparse_sparse_scaled_m2_k64_n100", lambda: sparse_matmul(2, 64, 100, "scaled")),
    ("actsparse_sparse_nonzero_m1_k64_n100", lambda: sparse_matmul(1, 64, 100, "nonzero")),
    ("actsparse_ffn_gate_sparse_relu_d64_f176", lambda: ffn_gate_sparse(64, 176, "relu")),
    ("actsparse_ffn_gate_sparse_silu_shifted_d64_f176", lambda: ffn_gate_sparse(64, 176, "silu", shifted=True)),
    ("actsparse_ffn_input_sparse_silu_d64_f176", lambda: ffn_input_sparse(64, 176, "silu")),
])
def test_cuda_twin_has_the_cpu_signature(symbol, cpu):
    func = cpu()
    twin = cuda.cuda_kernel_for(symbol, func)
    assert twin is not None and _param_specs(twin) == _param_specs(func)
    assert twin.attrs["tirx.is_scheduled"]


def test_unknown_kernel_is_not_ours():
    assert cuda.cuda_kernel_for("actsparse_ffn_indexed_silu_d64_f176", ffn_gate_sparse(64, 176)) is None
    assert cuda.cuda_kernel_for("fused_add", ffn_gate_sparse(64, 176)) is None


def test_retarget_refuses_a_kernel_without_cuda_form():
    import tvm

    from actsparse.codegen.kernels.cpu import ffn_indexed

    mod = tvm.IRModule({"actsparse_ffn_indexed_silu_d64_f176": ffn_indexed(64, 176).with_attr(
        "global_symbol", "actsparse_ffn_indexed_silu_d64_f176")})
    with pytest.raises(ActsparseError, match="no CUDA version"):
        cuda.retarget_kernels(mod)


# ------------------------------------------------------------------ arch choice


def _fake_nvidia_smi(tmp_path, output: str, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{output}'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_arch_detected_from_nvidia_smi(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "9.0\\n8.0\\n", monkeypatch)
    assert cuda.detect_arch() == "sm_90"


@needs_nvcc
def test_plain_cuda_takes_the_detected_arch(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "8.6\\n", monkeypatch)
    assert cuda.cuda_target_name("cuda") == "cuda:sm_86"


def test_plain_cuda_without_gpu_names_the_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert cuda.detect_arch() is None
    with pytest.raises(ActsparseError, match=r"no GPU found .* cuda:sm_80 \(A100\).*cuda:sm_90"):
        cuda.cuda_target_name("cuda")


@needs_nvcc
def test_explicit_arch_is_checked_against_nvcc():
    assert cuda.cuda_target_name("cuda:sm_89") == "cuda:sm_89"
    with pytest.raises(ActsparseError, match="sm_61: the installed nvcc cannot compile for it"):
        cuda.cuda_target_name("cuda:sm_61")
    with pytest.raises(ActsparseError, match="expected cuda or cuda:sm_XX"):
        cuda.cuda_target_name("cuda:ampere")


# ------------------------------------------------------------------ numerics (GPU only)

ATOL, RTOL = 2e-4, 1e-4


def _run(func, *inputs, outputs=1):
    """Compile for this machine's GPU and run with TVM's runtime; returns the output arrays."""
    import tvm

    executable = _compile({"k": func}, GPU_ARCH)
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    specs = [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in func.params[-outputs:]]
    outs = [tvm.runtime.tensor(np.full(shape, np.nan, dtype), dev) for shape, dtype in specs]
    executable["k"](*args, *outs)
    return [o.numpy() for o in outs]


def _sparse_x(rng, m, k, sparsity):
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[rng.random((m, k)) < sparsity] = 0
    return x


@needs_gpu
@pytest.mark.parametrize("m, k, n", [(1, 300, 130), (1, 2048, 1024), (3, 33, 70), (19, 50, 96)])
def test_dense_matches_numpy(m, k, n):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    (y,) = _run(dense_matmul_cuda(m, k, n), x, pack_dense(w))
    np.testing.assert_allclose(y, ref.dense_matmul_reference(x, w), atol=ATOL * np.sqrt(k), rtol=RTOL)


@needs_gpu
@pytest.mark.parametrize("mode", ["threshold", "scaled", "nonzero"])
@pytest.mark.parametrize("m, k, n", [(1, 2048, 1024), (1, 3000, 130), (5, 100, 96), (10, 70, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_sparse_matches_numpy(mode, m, k, n, sparsity):
    rng = np.random.default_rng(1)
    x = _sparse_x(rng, m, k, sparsity if mode == "nonzero" else 0.0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    scale = rng.random(k).astype(np.float32) + 0.5
    t = np.float32(np.quantile(np.abs(x), sparsity) if mode != "nonzero" else 0)
    if mode == "threshold":
        (y,) = _run(sparse_matmul_cuda(m, k, n, mode), x, np.array([t]), w)
    elif mode == "scaled":
        (y,) = _run(sparse_matmul_cuda(m, k, n, mode), x, np.array([t]), scale, w)
    else:
        (y,) = _run(sparse_matmul_cuda(m, k, n, mode), x, w)
    expected = ref.sparse_matmul_reference(x, w, mode, threshold=t, scale=scale)
    np.testing.assert_allclose(y, expected, atol=ATOL * np.sqrt(k), rtol=RTOL)


@needs_gpu
@pytest.mark.parametrize("act, shifted", [("relu", False), ("silu", False), ("relu", True)])
@pytest.mark.parametrize("d, f", [(64, 176), (1024, 2816), (70, 130)])
def test_ffn_gate_sparse_matches_numpy(act, shifted, d, f):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, d)).astype(np.float32)
    wg, wu, wd = (rng.standard_normal(s).astype(np.float32) / np.sqrt(s[0]) for s in ((d, f), (d, f), (f, d)))
    threshold, shift = np.float32(0.05 if act == "silu" else 0.0), np.float32(0.1)
    packed = pack_ffn_gate_sparse(wg, wu, wd)
    kernel = ffn_gate_sparse_cuda(d, f, act, shifted=shifted)
    scalars = [np.array([threshold])] + ([np.array([shift])] if shifted else [])
    (y,) = _run(kernel, x, *scalars, *packed)
    gate = (x.astype(np.float64) @ wg) - (shift if shifted else 0)
    a = ref.activation(gate, act)
    a = np.where(np.abs(a.astype(np.float32)) > threshold, a, 0)
    expected = ((a * (x.astype(np.float64) @ wu)) @ wd).astype(np.float32)
    np.testing.assert_allclose(y, expected, atol=ATOL * np.sqrt(f), rtol=RTOL)


@needs_gpu
@pytest.mark.parametrize("d, f", [(64, 176), (1024, 2816)])
def test_ffn_input_sparse_matches_numpy(d, f):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, d)).astype(np.float32)
    wg, wu, wd = (rng.standard_normal(s).astype(np.float32) / np.sqrt(s[0]) for s in ((d, f), (d, f), (f, d)))
    t_in, t_down = np.float32(0.5), np.float32(0.05)
    (y,) = _run(ffn_input_sparse_cuda(d, f, "silu"), x, np.array([t_in]), np.array([t_down]),
                *pack_ffn_input_sparse(wg, wu, wd))
    expected = ref.ffn_input_sparse_reference(x, t_in, t_down, wg, wu, wd, "silu")
    np.testing.assert_allclose(y, expected, atol=ATOL * np.sqrt(f), rtol=RTOL)
