"""The device server: a client cannot lengthen the server's session limit, and silent connections
do not delay other clients (each handshake has its own thread and deadline)."""

from __future__ import annotations

import math
import socket
import time

import pytest

from actsparse.deploy.server import session_timeout_for


@pytest.mark.parametrize("server, client, expected", [
    (2.0, 1e9, 2.0), (2.0, math.nan, 2.0), (2.0, math.inf, 2.0), (2.0, -1.0, 2.0), (2.0, 0.0, 2.0),
    (10.0, 3.0, 3.0), (None, 5.0, 5.0), (None, None, None), (4.0, None, 4.0),
])
def test_a_client_may_only_shorten_the_session_limit(server, client, expected):
    assert session_timeout_for(server, client) == expected


def test_silent_connections_do_not_delay_a_real_client():
    pytest.importorskip("tvm_ffi")
    from actsparse.deploy.process import start_local_rpc_server
    from actsparse.deploy.rpc import connect

    with start_local_rpc_server(key="k") as server:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        try:
            time.sleep(0.2)
            start = time.perf_counter()
            board = connect("127.0.0.1", server.port, key="k", timeout=5)
            try:
                assert board.info()["machine"]
            finally:
                board.close()
            assert time.perf_counter() - start < 1.0
        finally:
            for conn in silent:
                conn.close()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    pytest.importorskip("tvm_ffi")
    import os

    from actsparse.deploy.process import start_local_rpc_server

    folder = tmp_path_factory.mktemp("token")
    token = folder / "token"
    token.write_bytes(os.urandom(32))
    token.chmod(0o600)
    with start_local_rpc_server(token_file=token) as server:
        server.token_path = token
        yield server, token.read_bytes()


def test_a_token_server_refuses_clients_without_it_or_with_a_wrong_one(token_server):
    from actsparse.deploy.rpc import connect
    from actsparse.errors import ActsparseError

    server, token = token_server
    with pytest.raises(ActsparseError, match="refused"):
        connect("127.0.0.1", server.port, timeout=5)  # no token: the plain TVM handshake is refused
    with pytest.raises(ActsparseError, match="refused the session"):
        connect("127.0.0.1", server.port, timeout=5, token=b"x" * 32)
    board = connect("127.0.0.1", server.port, timeout=5, token=token)
    try:
        assert board.info()["machine"]
    finally:
        board.close()


def test_an_answered_challenge_cannot_be_replayed(token_server):
    """A key seen on the wire (auth:<nonce>:<mac>) is good once: the nonce is consumed."""
    import struct

    from actsparse.deploy.rpc import probe
    from actsparse.deploy.server import AUTH_PREFIX, RPC_CODE_MISMATCH, RPC_CODE_SUCCESS, RPC_MAGIC, token_mac

    server, token = token_server
    nonce = probe("127.0.0.1", server.port, challenge=True)
    hello = f"client:{AUTH_PREFIX}{nonce}:{token_mac(token, nonce)}".encode()
    codes = []
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(struct.pack("<ii", RPC_MAGIC, len(hello)) + hello)
            codes.append(struct.unpack("<i", conn.recv(4))[0])
    assert codes == [RPC_CODE_SUCCESS, RPC_CODE_MISMATCH]


def test_token_files_must_be_private_and_long_enough(tmp_path):
    from actsparse.deploy.server import read_token
    from actsparse.errors import ActsparseError

    path = tmp_path / "t"
    path.write_bytes(b"a" * 32)
    path.chmod(0o644)
    with pytest.raises(ActsparseError, match="readable by others"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == b"a" * 32
    path.write_bytes(b"short")
    with pytest.raises(ActsparseError, match="at least 16 bytes"):
        read_token(path)


def test_cli_deploy_with_a_token_file(token_server, tmp_path):
    import onnx

    import actsparse
    from actsparse.frontend import zoo
    from actsparse.cli import main

    server, _ = token_server
    onnx.save(zoo.swiglu_stack(layers=1, d=32, f=64), tmp_path / "m.onnx")
    art = actsparse.compile(str(tmp_path / "m.onnx"), output=tmp_path / "m.actsparse")
    rpc = f"127.0.0.1:{server.port}"
    assert main(["deploy", str(art.path), "--rpc", rpc, "--token-file", str(server.token_path)]) == 0
    assert main(["deploy", str(art.path), "--rpc", rpc]) == 2


def _session_files(workroot):
    return sorted(str(p.relative_to(workroot)) for p in workroot.rglob("*") if p.is_file())


def test_uploads_are_capped_before_their_data_is_sent(tmp_path):
    """A chunked upload announces its size: the cap refuses it before any byte of it is sent, and
    a client that sends more than it announced is refused at that chunk, its partial file removed."""
    pytest.importorskip("tvm_ffi")
    from actsparse.deploy.process import start_local_rpc_server
    from actsparse.deploy.rpc import connect
    from actsparse.errors import ActsparseError

    with start_local_rpc_server(max_upload_mb=1, workdir=tmp_path) as server:
        board = connect("127.0.0.1", server.port, timeout=5)
        try:
            board.upload_bytes(b"a" * 600_000, "first.bin")
            with pytest.raises(ActsparseError, match=r"upload_begin failed: .*would pass 1 MB \(the server's --max-upload-mb"):
                board.upload_bytes(b"b" * 600_000, "second.bin")
            with pytest.raises(ActsparseError, match="invalid remote file name"):
                board.upload_bytes(b"c", "../escape.bin")
            board._call("actsparse.rpc.upload_begin", "liar.bin", 10)
            board._call("actsparse.rpc.upload_chunk", "liar.bin", bytearray(b"d" * 6))
            with pytest.raises(ActsparseError, match="more bytes than the 10 announced"):
                board._call("actsparse.rpc.upload_chunk", "liar.bin", bytearray(b"d" * 6))
            assert [f.rsplit("/", 1)[-1] for f in _session_files(tmp_path)] == ["first.bin"]
        finally:
            board.close()


def test_a_message_over_the_cap_ends_the_session_before_it_is_read(tmp_path):
    """TVM's own upload sends a file as one message, which its RPC endpoint would read whole into
    memory: the server reads the message's length first and ends the session there."""
    pytest.importorskip("tvm_ffi")
    from actsparse.deploy.process import start_local_rpc_server
    from actsparse.deploy.rpc import connect
    from actsparse.errors import ActsparseError

    with start_local_rpc_server(max_upload_mb=1, workdir=tmp_path) as server:
        board = connect("127.0.0.1", server.port, timeout=5)
        board.upload_bytes(b"a" * 1000, "small.bin")
        with pytest.raises(ActsparseError, match="closed the session during tvm.rpc.server.upload"):
            board._call("tvm.rpc.server.upload", "big.bin", bytearray(48 << 20))
        board.close()
        deadline = time.monotonic() + 10
        while _session_files(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _session_files(tmp_path) == []  # the session's folder went with it
        assert "a message of 48 MB would take the session's uploads past 1 MB" in server.stderr_tail()
        board = connect("127.0.0.1", server.port, timeout=5)  # the server serves the next client
        try:
            board.upload_bytes(b"b" * 1000, "next.bin")
        finally:
            board.close()


def test_the_disk_a_session_uses_is_capped(tmp_path):
    pytest.importorskip("tvm_ffi")
    from actsparse.deploy.process import start_local_rpc_server
    from actsparse.deploy.rpc import connect
    from actsparse.errors import ActsparseError

    stale = tmp_path / "session-old"  # left by a killed server: it must not count
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"j" * 900_000)
    with start_local_rpc_server(max_upload_mb=8, max_disk_mb=1, workdir=tmp_path) as server:
        board = connect("127.0.0.1", server.port, timeout=5)
        try:
            board.upload_bytes(b"a" * 600_000, "first.bin")
            with pytest.raises(ActsparseError, match=r"more than 1 MB of disk \(the server's --max-disk-mb\)"):
                board.upload_bytes(b"b" * 600_000, "second.bin")
            board._call("actsparse.rpc.upload_begin", "announced.bin", 300_000)  # counted before it is written
            with pytest.raises(ActsparseError, match="--max-disk-mb"):
                board._call("actsparse.rpc.upload_begin", "another.bin", 300_000)
        finally:
            board.close()
    assert not stale.exists()


def test_a_session_keeps_its_temp_files_in_its_folder(tmp_path):
    """What a session unpacks while loading an artifact counts against its disk cap and goes with
    its folder, even when the session is killed (it used to go to the system's temp folder)."""
    import subprocess
    import sys

    code = ("import sys, tempfile; from pathlib import Path; from actsparse.deploy.server import enter_session_folder; "
            "enter_session_folder(Path(sys.argv[1])); print(tempfile.mkdtemp(prefix='actsparse-artifact-'))")
    made = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert made.stdout.strip().startswith(str(tmp_path / "tmp" / "actsparse-artifact-"))


def test_a_server_with_trust_runs_only_signed_artifacts(tmp_path):
    pytest.importorskip("cryptography")
    import numpy as np
    import onnx

    import actsparse
    from actsparse.frontend import zoo
    from actsparse.deploy.process import start_local_rpc_server
    from actsparse.deploy.rpc import deploy_and_run
    from actsparse.errors import ActsparseError
    from actsparse.runtime.signing import generate_keypair, sign_artifact

    onnx.save(zoo.swiglu_stack(layers=1, d=32, f=64), tmp_path / "m.onnx")
    art = actsparse.compile(str(tmp_path / "m.onnx"), output=tmp_path / "m.actsparse").path
    private, public = generate_keypair(tmp_path / "release")
    feeds = {"x": np.ones((1, 32), np.float32)}
    with start_local_rpc_server(trust=[public]) as server:
        with pytest.raises(ActsparseError, match="unsigned artifact refused"):
            deploy_and_run(art, feeds, "127.0.0.1", server.port)
        sign_artifact(art, private)
        result = deploy_and_run(art, feeds, "127.0.0.1", server.port)
        assert result.outputs["y"].shape == (1, 32)
