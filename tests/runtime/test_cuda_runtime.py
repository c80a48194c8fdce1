"""CUDA artifacts: compiled here without a GPU (device code embedded), refused with a clear
message where they cannot run, and - only on a machine with an NVIDIA GPU - run and match
the CPU build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import actsparse
from actsparse.errors import ActsparseError
from actsparse.runtime import ffi, load
from tests.runtime.conftest import rewrite_manifest

ACTSPARSE = [sys.executable, "-m", "actsparse.cli"]


def _gpu_arch() -> str | None:
    try:
        return ffi.cuda_devices()[0][1]
    except ActsparseError:
        return None


GPU_ARCH = _gpu_arch()
needs_gpu = pytest.mark.skipif(GPU_ARCH is None, reason="no CUDA GPU: running a cuda artifact needs an NVIDIA GPU")
without_gpu = pytest.mark.skipif(GPU_ARCH is not None, reason="this machine has a GPU")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")


def _x(seed: int, d: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, d)).astype(np.float32)


# ------------------------------------------------------------------ device code blob


def test_device_code_round_trip():
    binaries = {"a" * 64: b"\x50\xed\x55\xba fatbin one", "b" * 64: b"two"}
    assert ffi.unpack_device_code(ffi.pack_device_code(binaries, "sm_90")) == binaries


@pytest.mark.parametrize("blob", [b"", b"not ours", ffi.DEVICE_CODE_MAGIC + b"{broken\n", ffi.DEVICE_CODE_MAGIC])
def test_damaged_device_code_is_refused(blob):
    with pytest.raises(ActsparseError, match="embedded CUDA code is damaged"):
        ffi.unpack_device_code(blob)


def test_arch_number():
    assert ffi.arch_number("sm_90") == 90
    with pytest.raises(ActsparseError, match="not a CUDA arch"):
        ffi.arch_number("ampere")


# ------------------------------------------------------------------ device and arch checks


def _fake_gpus(monkeypatch, *devices):
    monkeypatch.setattr(ffi, "cuda_devices", lambda: list(devices))


def test_older_gpu_is_refused(monkeypatch):
    _fake_gpus(monkeypatch, ("NVIDIA A100-SXM4-80GB", "sm_80"))
    with pytest.raises(ActsparseError, match=r"compiled for sm_90, but GPU 0 \(NVIDIA A100.*\) is sm_80: "
                                             r"recompile with --target cuda:sm_80"):
        ffi.check_cuda_device("sm_90")


def test_same_or_newer_gpu_is_accepted(monkeypatch):
    _fake_gpus(monkeypatch, ("NVIDIA H100", "sm_90"))
    assert ffi.check_cuda_device("sm_90") == "NVIDIA H100"
    assert ffi.check_cuda_device("sm_80") == "NVIDIA H100"  # the fatbin's PTX is compiled by the driver


def test_missing_device_is_refused(monkeypatch):
    _fake_gpus(monkeypatch, ("NVIDIA H100", "sm_90"))
    with pytest.raises(ActsparseError, match="no CUDA device 1: this machine has 1"):
        ffi.check_cuda_device("sm_90", device_id=1)


@without_gpu
def test_no_driver_is_reported():
    with pytest.raises(ActsparseError, match="artifact targets 'cuda' \\(sm_80\\), but it cannot run here: no NVIDIA"):
        ffi.check_cuda_device("sm_80")


def test_cpu_artifact_on_cuda_is_refused(artifact_dir):
    with pytest.raises(ActsparseError, match=r"compiled for 'llvm' \(a CPU\); recompile with --target cuda"):
        load(artifact_dir, device="cuda")


def test_unknown_device_is_refused(artifact_dir):
    with pytest.raises(ActsparseError, match="device 'tpu' is not supported; use 'cpu' or 'cuda'"):
        load(artifact_dir, device="tpu")


# ------------------------------------------------------------------ a compiled cuda artifact


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    """A relufied SwiGLU stack (fused gate-sparse FFN kernels) compiled for sm_80 on this machine."""
    pytest.importorskip("tvm")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) not on PATH")
    from actsparse.frontend.zoo import swiglu_stack

    output = tmp_path_factory.mktemp("cuda") / "model.actsparse"
    return actsparse.compile(swiglu_stack(), target="cuda:sm_80", passes="relufy", example_inputs={"x": _x(0)},
                             output=output)


@pytest.mark.slow  # compiling: TVM + nvcc, ~10 s
def test_artifact_records_the_arch_and_embeds_device_code(cuda_artifact):
    manifest = json.loads((cuda_artifact.path / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "cuda" and manifest["target"]["arch"] == "sm_80"
    assert {layer["kernel"] for layer in cuda_artifact.kernels} == {"ffn_gate_sparse"}
    ffi.ensure_tvm_runtime()
    binaries = ffi.embedded_device_code(cuda_artifact.path / "model.so")
    assert len(binaries) == 1
    (digest, fatbin), = binaries.items()
    assert len(digest) == 64 and fatbin[:4] == b"\x50\xed\x55\xba"


@pytest.mark.slow
@without_gpu
def test_loading_without_gpu_is_one_clear_error(cuda_artifact, tmp_path):
    for device in (None, "cuda"):
        with pytest.raises(ActsparseError, match=r"artifact targets 'cuda' \(sm_80\), but it cannot run here: "
                                                 r"no NVIDIA driver"):
            load(cuda_artifact.path, device=device)
    with pytest.raises(ActsparseError, match="compiled for a CUDA GPU; load it with device='cuda'"):
        load(cuda_artifact.path, device="cpu")


@pytest.mark.slow
def test_cuda_manifest_without_arch_is_refused(cuda_artifact, tmp_path, monkeypatch):
    copy = tmp_path / "copy.actsparse"
    shutil.copytree(cuda_artifact.path, copy)
    rewrite_manifest(copy, lambda m: m["target"].pop("arch"))
    _fake_gpus(monkeypatch, ("NVIDIA H100", "sm_90"))
    with pytest.raises(ActsparseError, match="not a CUDA arch"):
        load(copy)


@pytest.mark.slow
@needs_nvcc
def test_cli_compiles_for_cuda_without_gpu(tmp_path):
    from actsparse.frontend.zoo import gelu_mlp_stack

    model, output = tmp_path / "m.onnx", tmp_path / "m.actsparse"
    onnx.save_model(gelu_mlp_stack(), str(model))
    done = subprocess.run([*ACTSPARSE, "compile", str(model), "-o", str(output), "--target", "cuda:sm_90",
                           "--passes", "relufy"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads((output / "manifest.json").read_text())["target"]["arch"] == "sm_90"
    if GPU_ARCH is None:
        np.savez(tmp_path / "in.npz", x=_x(1))
        done = subprocess.run([*ACTSPARSE, "run", str(output), "--inputs", str(tmp_path / "in.npz"), "-o",
                               str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "no NVIDIA driver" in done.stderr


# ------------------------------------------------------------------ on a GPU


@pytest.fixture(scope="module")
def gpu_and_cpu_artifacts(tmp_path_factory):
    pytest.importorskip("tvm")
    from actsparse.frontend.zoo import swiglu_stack

    root = tmp_path_factory.mktemp("gpu")
    build = {}
    for name, target in (("gpu", f"cuda:{GPU_ARCH}"), ("cpu", "host")):
        for passes in (None, "relufy", "sparsify{method=teal,sparsity=0.5,scope=ffn}"):
            calib = [{"x": _x(100 + i)} for i in range(8)]
            build[name, passes] = actsparse.compile(swiglu_stack(), target=target, passes=passes,
                                                    example_inputs={"x": _x(0)}, calib=calib,
                                                    output=root / f"{name}-{len(build)}.actsparse")
    return build


@needs_gpu
@pytest.mark.parametrize("passes", [None, "relufy", "sparsify{method=teal,sparsity=0.5,scope=ffn}"])
def test_gpu_matches_cpu(gpu_and_cpu_artifacts, passes):
    gpu = load(gpu_and_cpu_artifacts["gpu", passes].path, device="cuda")
    cpu = load(gpu_and_cpu_artifacts["cpu", passes].path)
    for seed in (1, 2, 3):
        np.testing.assert_allclose(gpu.run(x=_x(seed))["y"], cpu.run(x=_x(seed))["y"], atol=1e-4, rtol=1e-4)


@needs_gpu
def test_torch_cuda_tensor_inputs(gpu_and_cpu_artifacts):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    gpu = load(gpu_and_cpu_artifacts["gpu", "relufy"].path, device="cuda")
    x = _x(7)
    np.testing.assert_allclose(gpu.run(x=torch.from_numpy(x).cuda())["y"], gpu.run(x=x)["y"], atol=0, rtol=0)
    with pytest.raises(ActsparseError, match="expected float32"):
        gpu.run(x=torch.zeros((1, 64), dtype=torch.float64, device="cuda"))
