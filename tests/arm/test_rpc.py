"""Deploying over TVM RPC: `actsparse.deploy.server` (no TVM compiler on the device) and the
client helpers of `actsparse.deploy.rpc`, on loopback only.

The error paths run against a server on this machine (fast); the deployment to the
emulated arm64 board runs against the server under qemu (slow).
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

pytest.importorskip("tvm")

from actsparse.deploy.process import start_local_rpc_server  # noqa: E402
from actsparse.deploy.rpc import RemoteBoard, connect, deploy_and_run  # noqa: E402
from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.runtime import artifact  # noqa: E402
from tests.arm.conftest import model_inputs, model_params, write_model_artifact  # noqa: E402

KEY = "actsparse-test"
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def local_server():
    with start_local_rpc_server(key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def aarch64_artifact(tmp_path_factory):
    """An rpi4 artifact without a bundled runtime (enough to be refused by an x86_64 device)."""
    import shutil

    from tests.arm.conftest import _unavailable

    if shutil.which("aarch64-linux-gnu-g++") is None:  # `make test` on a fresh machine has no cross compiler
        _unavailable("aarch64-linux-gnu-g++ not installed: run scripts/arm/setup_toolchain.sh")
    return write_model_artifact(tmp_path_factory.mktemp("aarch64") / "model", "rpi4")


@pytest.fixture()
def silent_listener():
    """A loopback port that accepts TCP connections but never says anything."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(4)
    yield listener.getsockname()[1]
    listener.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- against a local server


def test_local_deploy_matches_host_reference(local_server, host_artifact, host_reference):
    result = deploy_and_run(
        host_artifact, model_inputs(), LOOPBACK, local_server.port, key=KEY, reference=host_reference, repeat=2
    )
    assert result.device["machine"] == "x86_64"
    assert result.max_abs_error["y"] <= 1e-5
    assert len(result.seconds) == 2


def test_tar_artifact_and_two_runs_in_one_session(local_server, host_artifact, host_reference, tmp_path):
    tar_path = tmp_path / "model.tar"
    artifact.write_tar(host_artifact, tar_path)
    with connect(LOOPBACK, local_server.port, key=KEY) as board:
        name = board.upload_artifact(tar_path)
        first = board.run(name, model_inputs())
        second = board.run(name, {"x": model_inputs()["x"] * 2})
    np.testing.assert_allclose(first["y"], host_reference["y"], atol=1e-5)
    assert not np.allclose(first["y"], second["y"])


def test_connection_refused_is_clear():
    with pytest.raises(ActsparseError, match="refused the connection"):
        connect(LOOPBACK, _free_port(), timeout=2)


def test_silent_server_times_out(silent_listener):
    with pytest.raises(ActsparseError, match="did not answer within 0.5 s"):
        connect(LOOPBACK, silent_listener, timeout=0.5)


def test_non_rpc_server_is_recognized():
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)

    def answer_like_http():
        conn, _ = listener.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=answer_like_http, daemon=True)
    thread.start()
    try:
        with pytest.raises(ActsparseError, match="is not a TVM RPC server"):
            connect(LOOPBACK, listener.getsockname()[1], timeout=5)
    finally:
        thread.join(timeout=5)
        listener.close()


def test_wrong_key_is_refused(local_server):
    with pytest.raises(ActsparseError, match="refused the RPC key 'wrong'"):
        connect(LOOPBACK, local_server.port, key="wrong")


def test_wrong_architecture_is_refused_before_upload(local_server, aarch64_artifact):
    with pytest.raises(ActsparseError, match="compiled for aarch64, but the device .* is x86_64"):
        deploy_and_run(aarch64_artifact, model_inputs(), LOOPBACK, local_server.port, key=KEY)


def test_checksum_mismatch_is_detected(local_server, host_artifact, monkeypatch):
    """A byte changed in transit: the device's sha256 differs from the one sent."""
    import hashlib
    import io

    real_upload = RemoteBoard.upload_stream

    def corrupting_upload(self, stream, size, name):
        data = stream.read()
        real_upload(self, io.BytesIO(data[:-1] + bytes([data[-1] ^ 0xFF])), size, name)
        return hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(RemoteBoard, "upload_stream", corrupting_upload)
    with connect(LOOPBACK, local_server.port, key=KEY) as board:
        with pytest.raises(ActsparseError, match="checksum mismatch after upload"):
            board.upload_artifact(host_artifact)


def test_remote_model_error_is_reported(local_server, host_artifact):
    with connect(LOOPBACK, local_server.port, key=KEY) as board:
        name = board.upload_artifact(host_artifact)
        with pytest.raises(ActsparseError, match=r"run_artifact failed: .*input 'x': shape \(3, 64\)"):
            board.run(name, {"x": np.zeros((3, 64), np.float32)})


def test_remote_paths_stay_in_the_work_directory(local_server):
    with connect(LOOPBACK, local_server.port, key=KEY) as board:
        with pytest.raises(ActsparseError, match="invalid remote file name"):
            board.upload_bytes(b"x", "../outside.txt")


def test_reupload_under_the_same_name_runs_the_new_artifact(local_server, host_artifact, tmp_path):
    doubled = {name: value * 2 for name, value in model_params().items()}
    other = write_model_artifact(tmp_path / "doubled", "host", params=doubled)
    with connect(LOOPBACK, local_server.port, key=KEY) as board:
        board.upload_artifact(host_artifact, name="model.tar")
        first = board.run("model.tar", model_inputs())
        board.upload_artifact(other, name="model.tar")
        second = board.run("model.tar", model_inputs())
    np.testing.assert_allclose(second["y"], 2 * first["y"], rtol=1e-5, atol=1e-5)


def test_run_needs_an_upload_in_this_session(local_server):
    with connect(LOOPBACK, local_server.port, key=KEY) as board:
        with pytest.raises(ActsparseError, match="no artifact 'model.tar' uploaded in this session"):
            board.run("model.tar", model_inputs())


def test_object_inputs_are_refused_before_sending(local_server, host_artifact):
    with connect(LOOPBACK, local_server.port, key=KEY) as board:
        name = board.upload_artifact(host_artifact)
        with pytest.raises(ActsparseError, match="object arrays cannot be sent"):
            board.run(name, {"x": np.array([object()])})


def test_mismatched_outputs_are_reported(local_server, host_artifact, host_reference):
    wrong = {"y": host_reference["y"] + 1}
    with pytest.raises(ActsparseError, match="output 'y' differs from the reference by 1"):
        deploy_and_run(host_artifact, model_inputs(), LOOPBACK, local_server.port, key=KEY, reference=wrong)


def test_local_server_refuses_non_loopback_address():
    with pytest.raises(ActsparseError, match="loopback"):
        start_local_rpc_server(host="192.0.2.1")


# ---------------------------------------------------------------- the emulated arm64 board


@pytest.fixture(scope="module")
def board_server(arm_board, arm_device_package, tmp_path_factory):
    with arm_board.start_rpc_server(
        package_dir=arm_device_package, key=KEY, workdir=tmp_path_factory.mktemp("board-rpc")
    ) as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("as_tar", [False, True], ids=["directory", "tar"])
def test_deploy_to_emulated_board_matches_host(board_server, rpi4_artifact, host_reference, tmp_path, as_tar):
    path = rpi4_artifact
    if as_tar:
        path = tmp_path / "model.tar"
        artifact.write_tar(rpi4_artifact, path)
    result = deploy_and_run(
        path, model_inputs(), board_server.host, board_server.port, key=KEY, reference=host_reference
    )
    assert result.device["machine"] == "aarch64"
    assert result.max_abs_error["y"] <= 1e-4


@pytest.mark.slow
def test_emulated_board_refuses_host_artifact(board_server, host_artifact):
    with pytest.raises(ActsparseError, match="compiled for x86_64, but the device .* is aarch64"):
        deploy_and_run(host_artifact, model_inputs(), board_server.host, board_server.port, key=KEY)


@pytest.mark.slow
def test_emulated_board_serves_only_loopback(arm_board, arm_device_package):
    with pytest.raises(ActsparseError, match="loopback"):
        arm_board.start_rpc_server(package_dir=arm_device_package, host="192.0.2.1")
