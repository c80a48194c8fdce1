"""Fast checks of the ARM tooling that need no emulator run: tool detection and its errors,
the device package, the qemu trace parser, the emulated board's set-up and the RPC handshake."""

from __future__ import annotations

import ast
import socket
import struct
import threading

import pytest

from actsparse.codegen import cross
from actsparse.deploy import server
from actsparse.deploy.device import stage_device_package
from actsparse.deploy.qemu import EmulatedBoard
from actsparse.errors import ActsparseError
from tests.arm.qemu_trace import count_instructions, dfilter_ranges

FORBIDDEN_ON_DEVICE = {"tvm", "torch", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "transformers"}


def test_missing_cross_compiler_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ActsparseError, match=r"aarch64-linux-gnu-g\+\+.*apt-get install g\+\+-aarch64-linux-gnu"):
        cross.find_cross_compiler("aarch64")


def test_missing_named_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ActsparseError, match="'my-g\\+\\+' for aarch64 not found on PATH: check the name"):
        cross.find_cross_compiler("aarch64", "my-g++")


def test_cross_compiler_found_on_path(monkeypatch, tmp_path):
    fake = tmp_path / "aarch64-linux-gnu-g++"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cross.find_cross_compiler() == str(fake)


def test_missing_emulator_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ActsparseError, match="apt-get install qemu-user-static"):
        cross.find_emulator("aarch64")


def test_unknown_machine_is_refused():
    with pytest.raises(ActsparseError, match="no cross toolchain known for 'riscv64'"):
        cross.find_cross_compiler("riscv64")


def _top_level_imports(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_device_package_imports_no_compiler(tmp_path):
    root = stage_device_package(tmp_path) / "actsparse"
    files = sorted(root.rglob("*.py"))
    assert {f.relative_to(root).as_posix() for f in files} >= {
        "__init__.py",
        "errors.py",
        "runtime/__init__.py",
        "runtime/model.py",
        "deploy/server.py",
        "deploy/rpc.py",
    }
    for path in files:
        heavy = _top_level_imports(path) & FORBIDDEN_ON_DEVICE
        assert not heavy, f"{path.relative_to(root)} imports {heavy}"
    # Everything those modules import from actsparse is staged too.
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actsparse."):
                module_path = root.joinpath(*node.module.split(".")[1:])
                assert module_path.with_suffix(".py").is_file() or (module_path / "__init__.py").is_file(), (
                    f"{path.relative_to(root)} imports {node.module}, which is not staged"
                )


def test_device_package_refuses_to_replace_foreign_folder(tmp_path):
    (tmp_path / "actsparse").mkdir()
    (tmp_path / "actsparse" / "notes.txt").write_text("mine")
    with pytest.raises(ActsparseError, match="not a staged actsparse package"):
        stage_device_package(tmp_path)


TRACE = """\
----------------
IN: kernel
0x0000005500001000:  d503201f  nop
0x0000005500001004:  91000400  add x0, x0, #1
0x0000005500001008:  f100041f  cmp x0, #1
0x000000550000100c:  54ffffa1  b.ne #0x5500001000

Trace 0: 0x7f0000000100 [0000000000000000/0000005500001000/00000001/00080200] kernel
Trace 0: 0x7f0000000100 [0000000000000000/0000005500001000/00000001/00080200] kernel
----------------
IN:
0x0000005500002000:  d65f03c0  ret

Trace 0: 0x7f0000000200 [0000000000000000/0000005500002000/00000001/00080200]
Trace 0: 0x7f0000000300 [0000000000000000/0000005500009000/00000001/00080200] outside
"""


def test_trace_parser_counts_instructions_per_library(tmp_path):
    log = tmp_path / "trace.log"
    log.write_text(TRACE)
    ranges = {"a": [[0x5500001000, 0x5500002000]], "b": [[0x5500002000, 0x5500003000]]}
    counts = count_instructions(log, ranges)
    assert counts == {"a": 8, "b": 1}
    assert dfilter_ranges(ranges) == "0x5500001000..0x5500001fff,0x5500002000..0x5500002fff"


def test_board_from_missing_userland_says_how_to_build(tmp_path):
    with pytest.raises(ActsparseError, match="build_userland.sh"):
        EmulatedBoard.from_userland(tmp_path)


def test_board_environment_is_explicit(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/host/venv/site-packages")
    board = EmulatedBoard(tmp_path / "root", tmp_path / "site", tmp_path / "lib" / "libtvm_runtime.so", emulator="qemu")
    env = board.environment([tmp_path / "pkg"], {"EXTRA": "1"})
    assert env["PYTHONPATH"] == f"{tmp_path / 'pkg'}:{tmp_path / 'site'}"
    assert env["ACTSPARSE_TVM_RUNTIME"] == str(tmp_path / "lib" / "libtvm_runtime.so")
    assert env["EXTRA"] == "1"
    command = board.python_command(["-c", "pass"], ["-d", "exec"])
    python = str(tmp_path / "root/usr/bin/python3.11")
    assert command == ["qemu", "-L", str(tmp_path / "root"), "-d", "exec", python, "-c", "pass"]


def _client_hello(key: str) -> bytes:
    hello = key.encode()
    return struct.pack("<ii", server.RPC_MAGIC, len(hello)) + hello


@pytest.mark.parametrize(
    ("hello", "expected_options", "expected_code"),
    [
        ("client:k", {}, server.RPC_CODE_SUCCESS),
        ("client:k -timeout=5", {"timeout": 5.0}, server.RPC_CODE_SUCCESS),
        (f"client:k {server.PROBE_OPTION}", {"probe": True}, server.RPC_CODE_SUCCESS),
        ("client:other", None, server.RPC_CODE_MISMATCH),
    ],
)
def test_server_handshake(hello, expected_options, expected_code):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        result = {}
        thread = threading.Thread(target=lambda: result.update(options=server.handshake(ours, "k")))
        thread.start()
        theirs.sendall(_client_hello(hello))
        thread.join(timeout=5)
        assert result["options"] == expected_options
        assert struct.unpack("<i", theirs.recv(4))[0] == expected_code


def test_server_drops_a_peer_without_magic():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert server.handshake(ours, "") is None
