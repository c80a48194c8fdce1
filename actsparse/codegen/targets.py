"""Named compilation targets, resolved to TVM 0.27 targets (JSON-dict style).

Names:
  host     llvm for this machine: the triple of its architecture and the CPU name
           LLVM detects (e.g. ``znver4``). ``mcpu=native`` is not used: with TVM's
           default triple it silently falls back to a generic CPU (TVM 0.27).
  x86      portable x86-64: ``mcpu=x86-64-v3`` (AVX2 + FMA + BMI2, the psABI level 3
           that every x86-64 server/desktop CPU since Haswell (2013) and Zen 1 runs).
           Chosen over ``haswell`` because it names a feature level, not a core,
           so LLVM does not tune the code for one microarchitecture.
  rpi4     the TVM tag ``raspberry-pi/4b-aarch64`` (Cortex-A72, NEON, 4 cores).
  aarch64  generic 64-bit ARM (NEON only): ``mtriple=aarch64-linux-gnu``.
  cuda     ``{"kind": "cuda", "arch": "sm_80"}``; ``cuda:sm_90`` picks another arch.

A JSON dict string (``'{"kind": "llvm", "mcpu": "skylake"}'``) is passed to TVM as is.

``describe_target`` works out, once per compile, what the lowering needs to know about the
target (vector width, ISA features, the batch-1 row schedule): a ``TargetInfo`` that
``codegen/compile.py`` passes down to kernel selection, fusion, quantized lowering, the prefill
binding and the kernel builders.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from typing import Any

from actsparse.errors import ActsparseError

TARGET_NAMES = ("host", "x86", "rpi4", "aarch64", "cuda")
X86_PORTABLE_MCPU = "x86-64-v3"
DEFAULT_CUDA_ARCH = "sm_80"
DEFAULT_LANES = 16  # kernels built for no particular CPU (and CUDA's twins) use 16-lane blocks


def host_arch() -> str:
    """This machine's architecture as ``x86_64`` or ``aarch64``."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    raise ActsparseError(f"unsupported host architecture {machine!r}: actsparse supports x86_64 and aarch64")


def host_cpu_name() -> str:
    """The CPU name LLVM detects for this machine (``llvm::sys::getHostCPUName``)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def _host_target_dict() -> dict[str, Any]:
    # The triple LLVM reports may carry a vendor of the toolchain TVM was built with
    # (e.g. x86_64-conda-linux-gnu); a plain <arch>-linux-gnu links with the system
    # compiler and means the same code.
    return {"kind": "llvm", "mtriple": f"{host_arch()}-linux-gnu", "mcpu": host_cpu_name()}


def _named_target_spec(name: str) -> dict[str, Any] | str:
    if name == "host":
        return _host_target_dict()
    if name == "x86":
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": X86_PORTABLE_MCPU}
    if name == "rpi4":
        return "raspberry-pi/4b-aarch64"
    if name == "aarch64":
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
    match = re.fullmatch(r"cuda(?::(sm_\d+))?", name)
    if match:
        return {"kind": "cuda", "arch": match.group(1) or DEFAULT_CUDA_ARCH}
    raise ActsparseError(
        f"unknown target {name!r}: valid names are {', '.join(TARGET_NAMES)} "
        "(cuda:sm_XX picks a CUDA arch), or a JSON dict such as '{\"kind\": \"llvm\"}'"
    )


def resolve_target(name: str):
    """Resolve a target name (see module docstring) or a JSON dict string to a ``tvm.target.Target``."""
    import tvm

    name = name.strip()
    if name.startswith("{"):
        try:
            spec: dict[str, Any] | str = json.loads(name)
        except json.JSONDecodeError as err:
            raise ActsparseError(f"target {name!r} is not valid JSON: {err}") from None
    else:
        spec = _named_target_spec(name)
    try:
        return tvm.target.Target(spec)
    except Exception as err:  # TVM raises its own error types for bad kinds/attributes
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ActsparseError(f"TVM rejected target {name!r}: {first_line}") from None


def target_summary(target) -> dict[str, Any]:
    """A JSON-ready description of a target for an artifact manifest."""
    attrs = target.attrs
    summary: dict[str, Any] = {"kind": target.kind.name, "keys": [str(k) for k in target.keys]}
    for key in ("mtriple", "mcpu", "arch"):
        if key in attrs:
            summary[key] = str(attrs[key])
    if "mattr" in attrs:
        summary["mattr"] = [str(a) for a in attrs["mattr"]]
    return summary


@dataclass(frozen=True)
class TargetInfo:
    """The target facts the lowering reads, worked out once (``describe_target``)."""

    kind: str  # "llvm", "cuda", or "" (no target: kernels for 16 lanes, as built outside a compile)
    vector_lanes: int  # fp32 lanes of the widest vector register (16, 8 or 4)
    tvm_vector_lanes: int  # fp32 lanes LLVM vectorizes TVM's own ops by (at least 4)
    row_schedule: Any  # kernels.cpu.schedule.RowSchedule: how the batch-1 row kernels walk rows
    avx512: bool = False
    vnni: bool = False  # AVX-512 VNNI (vpdpbusd on 512-bit vectors): the int8 dot-product kernels
    neon: bool = False
    dotprod: bool = False
    tvm_target: Any = field(default=None, compare=False, repr=False)

    @property
    def on_cuda(self) -> bool:
        return self.kind == "cuda"

    def kernel_lanes(self, kind: str) -> int:
        """fp32 lanes per register block for a kernel kind ("dense" or "sparse"). On 128-bit NEON
        (4 lanes) wider blocks pay: counted under qemu (docs/arm.md), the sparse kernel at 4 lanes
        spends 3-4 scalar instructions per 2 FMAs on the row index and coefficient; 16 lanes spread
        them over 8 FMAs (0.55x the dense instructions at 50 % sparsity instead of 0.92x), and dense
        does best at 8 lanes."""
        if self.vector_lanes == 4:
            return 16 if kind == "sparse" else 8
        return self.vector_lanes


def describe_target(target) -> TargetInfo:
    """The ``TargetInfo`` of a ``tvm.target.Target`` (None: no target, the kernels' defaults; a
    TargetInfo is returned as it is)."""
    from actsparse.codegen.kernels.cpu.schedule import row_schedule_for

    if isinstance(target, TargetInfo):
        return target
    if target is None or target.kind.name != "llvm":
        return TargetInfo(kind="" if target is None else target.kind.name, vector_lanes=DEFAULT_LANES,
                          tvm_vector_lanes=4, row_schedule=row_schedule_for(target), tvm_target=target)
    from tvm.target import codegen

    features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    avx512 = "avx512f" in features
    lanes = 16 if avx512 else 8 if ("avx" in features or "avx2" in features) else 4
    bits = codegen.llvm_get_vector_width(target)
    return TargetInfo(kind="llvm", vector_lanes=lanes, tvm_vector_lanes=max((bits if bits > 0 else 128) // 32, 4),
                      row_schedule=row_schedule_for(target), avx512=avx512,
                      vnni="avx512vnni" in features and "avx512bw" in features,
                      neon="neon" in features, dotprod="dotprod" in features, tvm_target=target)


def kernel_lanes(target, kind: str) -> int:
    """fp32 lanes per register block of a kernel kind on a ``tvm.target.Target`` (TargetInfo.kernel_lanes)."""
    return describe_target(target).kernel_lanes(kind)
