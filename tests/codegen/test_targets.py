"""Target names resolve to the TVM targets the design names; bad names fail clearly."""

from __future__ import annotations

import json
import platform

import pytest

pytest.importorskip("tvm")

from actsparse.codegen.targets import host_arch, resolve_target, target_summary  # noqa: E402
from actsparse.errors import ActsparseError  # noqa: E402


def test_host_is_llvm_with_a_detected_cpu():
    summary = target_summary(resolve_target("host"))
    assert summary["kind"] == "llvm"
    assert summary["mtriple"] == f"{host_arch()}-linux-gnu"
    assert summary["mcpu"] not in ("", "generic", "native")


def test_host_arch_names_this_machine():
    assert host_arch() == {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())


def test_x86_is_portable_avx2_level():
    summary = target_summary(resolve_target("x86"))
    assert summary["mtriple"] == "x86_64-linux-gnu"
    assert summary["mcpu"] == "x86-64-v3"


def test_rpi4_is_the_cortex_a72_tag():
    summary = target_summary(resolve_target("rpi4"))
    assert summary["mtriple"] == "aarch64-linux-gnu"
    assert summary["mcpu"] == "cortex-a72"
    assert "arm_cpu" in summary["keys"]


def test_aarch64_is_generic_arm():
    summary = target_summary(resolve_target("aarch64"))
    assert summary["mtriple"] == "aarch64-linux-gnu"
    assert "mcpu" not in summary


@pytest.mark.parametrize("name,arch", [("cuda", "sm_80"), ("cuda:sm_90", "sm_90")])
def test_cuda_arch(name, arch):
    summary = target_summary(resolve_target(name))
    assert summary["kind"] == "cuda"
    assert summary["arch"] == arch


def test_json_dict_is_passed_through():
    target = resolve_target('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake"}')
    assert target_summary(target)["mcpu"] == "skylake"


def test_summary_is_json_serialisable():
    for name in ("host", "x86", "rpi4", "aarch64", "cuda"):
        json.dumps(target_summary(resolve_target(name)))


@pytest.mark.parametrize("bad", ["tpu", "cuda:90", "{not json", '{"kind": "nope"}'])
def test_bad_targets_raise_one_clear_error(bad):
    with pytest.raises(ActsparseError) as info:
        resolve_target(bad)
    assert "\n" not in str(info.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ActsparseError, match="host, x86, rpi4, aarch64, cuda"):
        resolve_target("tpu")
