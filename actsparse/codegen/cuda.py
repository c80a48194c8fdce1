"""The CUDA target: arch choice, CUDA kernels in place of the CPU ones, device code built ahead of time.

    target "cuda"       -> the arch of this machine's GPU (nvidia-smi), or an error naming the choices
    target "cuda:sm_XX" -> that arch (sm_80 A100, sm_86 RTX 30xx/A10, sm_89 L4/RTX 40xx, sm_90 H100/H200)

Compiling (``compile.py``): the lowering builds the model with the CPU kernels
(``actsparse_<kind>_...`` PrimFuncs); ``retarget_kernels`` swaps each for the CUDA kernel
with the same signature and weight layout (``kernels/cuda``); TVM's CUDA pipeline
schedules the rest of the graph (dlight). Without a GPU, TVM 0.27 keeps the kernels as
CUDA C source in the executable (its CUDA runtime needs the NVIDIA driver to compile
them), so ``compile_device_code`` runs nvcc on that source for the arch (SASS + PTX) and
``embedding_fcompile`` links the result into the library; the runtime hands it to TVM
when the model loads (``actsparse.runtime.ffi.serve_device_code``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from actsparse.errors import ActsparseError
from actsparse.runtime.ffi import DEVICE_CODE_SYMBOL, arch_number, pack_device_code

KNOWN_ARCHS = {"sm_80": "A100", "sm_86": "RTX 30xx, A10, A40", "sm_89": "L4, L40, RTX 40xx", "sm_90": "H100, H200"}
_KERNEL_NAME = re.compile(
    r"actsparse_(?:(?P<linear>dense|sparse)_(?P<mode>\w+?)_m(?P<m>\d+)_k(?P<k>\d+)_n(?P<n>\d+)"
    r"|(?P<ffn>ffn_gate_sparse|ffn_input_sparse)_(?P<act>silu|relu)(?P<shifted>_shifted)?_d(?P<d>\d+)_f(?P<f>\d+))"
)


# ---------------------------------------------------------------- arch


def detect_arch() -> str | None:
    """The arch of this machine's first GPU from ``nvidia-smi --query-gpu=compute_cap``, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    caps = [line.strip() for line in out.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())]
    if out.returncode != 0 or not caps:
        return None
    major, minor = caps[0].split(".")
    return f"sm_{major}{minor}"


def cuda_target_name(name: str) -> str:
    """``cuda`` -> ``cuda:sm_XX`` of this machine's GPU; ``cuda:sm_XX`` as given (checked)."""
    if name.strip() == "cuda":
        arch = detect_arch()
        if arch is None:
            choices = ", ".join(f"cuda:{a} ({gpus})" for a, gpus in KNOWN_ARCHS.items())
            raise ActsparseError(f"target 'cuda': no GPU found to detect the arch (nvidia-smi); name it: {choices}")
        name = f"cuda:{arch}"
    match = re.fullmatch(r"cuda:(sm_\d+)", name.strip())
    if not match:
        raise ActsparseError(f"target {name!r}: expected cuda or cuda:sm_XX (e.g. cuda:sm_80)")
    check_arch_supported(match.group(1))
    return name.strip()


def nvcc_archs() -> list[str]:
    """The archs the installed nvcc compiles for (``nvcc --list-gpu-arch``), as sm_XX."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise ActsparseError("compiling for CUDA needs nvcc (the CUDA toolkit) on PATH")
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    return [f"sm_{m}" for m in re.findall(r"compute_(\d+)", out.stdout)]


def check_arch_supported(arch: str) -> None:
    archs = nvcc_archs()
    if arch not in archs:
        raise ActsparseError(f"{arch}: the installed nvcc cannot compile for it; it supports {', '.join(archs)}")
    if arch_number(arch) < 75:
        raise ActsparseError(f"{arch}: actsparse's CUDA kernels need sm_75 or newer")


@contextlib.contextmanager
def nvcc_mode():
    """TVM compiles CUDA through NVRTC (the cuda-python package) by default; without that
    package, use nvcc (only matters on a machine whose TVM CUDA runtime is loaded)."""
    if os.environ.get("TVM_CUDA_COMPILE_MODE") or importlib.util.find_spec("cuda") is not None:
        yield
        return
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        yield
    finally:
        os.environ.pop("TVM_CUDA_COMPILE_MODE", None)


# ---------------------------------------------------------------- kernels


def cuda_kernel_for(symbol: str, prim_func):
    """The CUDA PrimFunc replacing the CPU kernel named ``symbol`` (same parameters), or None
    when ``symbol`` is not one of ours."""
    from actsparse.codegen.kernels.cuda import (
        dense_matmul_cuda,
        ffn_gate_sparse_cuda,
        ffn_input_sparse_cuda,
        sparse_matmul_cuda,
    )

    match = _KERNEL_NAME.fullmatch(symbol)
    if match is None:
        return None
    shapes = [tuple(int(d) for d in p.shape) for p in prim_func.params]
    g = match.groupdict()
    if g["linear"] == "dense":
        return dense_matmul_cuda(int(g["m"]), int(g["k"]), int(g["n"]), block=shapes[1][2])
    if g["linear"] == "sparse":
        return sparse_matmul_cuda(int(g["m"]), int(g["k"]), int(g["n"]), mode=g["mode"])
    d, f = int(g["d"]), int(g["f"])
    if g["ffn"] == "ffn_gate_sparse":
        shifted = g["shifted"] is not None
        return ffn_gate_sparse_cuda(d, f, g["act"], block=shapes[3 if shifted else 2][2], shifted=shifted)
    return ffn_input_sparse_cuda(d, f, g["act"])


def retarget_kernels(mod) -> list[str]:
    """Replace every actsparse CPU kernel in the Relax module ``mod`` (in place) by its CUDA
    twin; returns the symbols replaced. Raises ActsparseError for a kernel with no CUDA form."""
    import tvm

    replaced = []
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        symbol = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else gvar.name_hint
        if not symbol.startswith("actsparse_"):
            continue
        cuda_func = cuda_kernel_for(symbol, func)
        if cuda_func is None:
            raise ActsparseError(f"kernel {symbol}: no CUDA version yet (compile for a CPU target)")
        old = [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in func.params]
        new = [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in cuda_func.params]
        if old != new:
            raise ActsparseError(f"internal: CUDA kernel for {symbol} takes {new}, the model passes {old}")
        mod.update_func(gvar, cuda_func.with_attr("global_symbol", symbol))
        replaced.append(symbol)
    return replaced


# ---------------------------------------------------------------- device code


def cuda_sources(executable) -> list[str]:
    """CUDA C sources the executable still carries uncompiled (TVM without a loaded CUDA runtime)."""
    sources = []
    stack = list(executable.mod.imports)
    while stack:
        module = stack.pop()
        stack.extend(module.imports)
        if module.kind == "cuda":
            # Non-empty only while the module's code is source (fmt "cuda"): then it is the serialized code.
            source = module.inspect_source("cuda")
            if source:
                sources.append(str(source))
    return sources


def nvcc_fatbin(source: str, arch: str, workdir: Path) -> bytes:
    """Compile one CUDA source with nvcc to a fatbin: SASS for ``arch`` plus its PTX (which the
    driver compiles for newer GPUs)."""
    number = arch_number(arch)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    cu, out = workdir / f"{digest}.cu", workdir / f"{digest}.fatbin"
    cu.write_text(source)
    command = ["nvcc", "--fatbin", "-O3", "-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]",
               "-o", str(out), str(cu)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        lines = [l for l in (result.stderr or result.stdout).splitlines() if "error" in l.lower()] or ["(no output)"]
        raise ActsparseError(f"nvcc failed to compile the CUDA kernels for {arch}: {lines[0][:300]}")
    return out.read_bytes()


def compile_device_code(executable, arch: str) -> bytes | None:
    """The executable's CUDA sources compiled for ``arch``, packed for linking (None if none)."""
    sources = cuda_sources(executable)
    if not sources:
        return None
    with tempfile.TemporaryDirectory(prefix="actsparse-nvcc-") as tmp:
        binaries = {hashlib.sha256(s.encode()).hexdigest(): nvcc_fatbin(s, arch, Path(tmp)) for s in sources}
    return pack_device_code(binaries, arch)


def embedding_fcompile(blob: bytes | None):
    """An ``export_library`` compile function that also links ``blob`` as the symbols
    ``actsparse_cuda_device_code`` / ``..._size`` (None: TVM's default)."""
    if blob is None:
        return None
    from tvm.support import cc

    def fcompile(output, objects, options=None, **kwargs):
        with tempfile.TemporaryDirectory(prefix="actsparse-embed-") as tmp:
            data, asm = Path(tmp) / "device_code.bin", Path(tmp) / "device_code.S"
            data.write_bytes(blob)
            asm.write_text(
                "\t.section .rodata\n"
                f"\t.globl {DEVICE_CODE_SYMBOL}\n\t.balign 16\n{DEVICE_CODE_SYMBOL}:\n\t.incbin \"{data}\"\n"
                f"\t.globl {DEVICE_CODE_SYMBOL}_size\n\t.balign 8\n{DEVICE_CODE_SYMBOL}_size:\n\t.quad {len(blob)}\n"
                "\t.section .note.GNU-stack,\"\",@progbits\n"
            )
            return cc.create_shared(output, list(objects) + [str(asm)], options=options, **kwargs)

    return fcompile
