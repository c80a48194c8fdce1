"""Deploy an artifact to a device over TVM RPC and run it there.

    with connect("127.0.0.1", 9090) as board:          # a server from actsparse.deploy.server
        name = board.upload_artifact("model.actsparse")  # checks the architecture and the sha256
        outputs = board.run(name, {"x": x})              # {output name: np.ndarray}

or in one call: ``deploy_and_run(path, inputs, host, port, reference=expected)``.

The client needs only the thin runtime (``tvm_ffi`` + ``libtvm_runtime.so``), not ``import
tvm``. Inputs and outputs cross as ``.npz`` files (uploaded / downloaded with TVM's RPC file
functions), so any numpy dtype works and nothing is pickled. Every failure a user can cause
(nothing listening, a timeout, a wrong key, the wrong architecture, a checksum mismatch, a
model error on the device) raises one ActsparseError.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import struct
import tarfile
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError
from actsparse.runtime import artifact
from actsparse.runtime.ffi import ensure_tvm_runtime, import_tvm_ffi

DEFAULT_CONNECT_TIMEOUT_S = 10.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # TVM prefixes remote errors with a traceback; the last line holds the message.
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def probe(host: str, port: int, key: str = "", timeout: float = DEFAULT_CONNECT_TIMEOUT_S, *,
          challenge: bool = False) -> str | None:
    """Check within `timeout` that host:port is a TVM RPC server that accepts `key`.

    TVM's own connect waits without limit for a server that accepted the TCP connection but
    never answers; this probe does TVM's handshake itself, with a timeout, so that nothing
    listening, a silent peer, a non-RPC service and a wrong key each give one clear error.
    An actsparse server starts no session for it; TVM's own serves an empty one that ends at once.
    With `challenge`, returns the one-time nonce a token-protected server sent (else None).
    """
    from actsparse.deploy.server import (CHALLENGE_OPTION, PROBE_OPTION, RPC_CODE_MISMATCH, RPC_CODE_SUCCESS,
                                         RPC_MAGIC, recv_exact)

    where = f"RPC server {host}:{port}"
    hello = f"client:{key} {PROBE_OPTION}{' ' + CHALLENGE_OPTION if challenge else ''}".encode()
    reply = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(struct.pack("<ii", RPC_MAGIC, len(hello)) + hello)
            answer = conn.recv(4)
            if challenge and len(answer) == 4 and struct.unpack("<i", answer)[0] == RPC_CODE_SUCCESS:
                size = struct.unpack("<i", recv_exact(conn, 4))[0]
                reply = recv_exact(conn, size) if 0 < size <= 4096 else b""
    except ConnectionRefusedError:
        raise ActsparseError(
            f"{where} refused the connection: is `python -m actsparse.deploy.server` running there?"
        ) from None
    except (TimeoutError, socket.timeout):
        raise ActsparseError(f"{where} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ActsparseError(f"cannot reach {where}: {exc.strerror or exc}") from None
    code = struct.unpack("<i", answer)[0] if len(answer) == 4 else None
    if code == RPC_CODE_MISMATCH:
        raise ActsparseError(f"{where} refused the RPC key {key!r}")
    if code != RPC_CODE_SUCCESS:
        raise ActsparseError(f"{host}:{port} is not a TVM RPC server (unexpected handshake answer)")
    if challenge:
        nonce = reply.decode("utf-8", "replace").partition("server:")[2]
        if len(nonce) != 32:
            raise ActsparseError(f"{where} sent no challenge: it was not started with --token-file")
        return nonce
    return None


@dataclass
class RemoteBoard:
    """An open RPC session with a device running ``actsparse.deploy.server``."""

    host: str
    port: int
    _session: object
    _functions: dict = field(default_factory=dict)
    last_seconds: list[float] = field(default_factory=list)  # device-side times of the last run()
    _uploaded: dict[str, str] = field(default_factory=dict)  # remote name -> sha256 sent

    def _function(self, name: str):
        if name not in self._functions:
            try:
                self._functions[name] = self._session.get_function(name)
            except Exception as exc:
                reason = _first_line(exc)
                raise ActsparseError(f"{self.host}:{self.port}: remote function {name} missing: {reason}") from None
            if self._functions[name] is None:
                raise ActsparseError(
                    f"{self.host}:{self.port} has no function {name}: is it an actsparse.deploy.server?"
                )
        return self._functions[name]

    def _call(self, name: str, *args):
        function = self._function(name)
        try:
            return function(*args)
        except Exception as exc:  # RPC errors carry the remote traceback; keep its message
            if "SockChannel" in str(exc):
                raise ActsparseError(f"{self.host}:{self.port} closed the session during {name} (a message over the "
                                     "server's --max-upload-mb, or its --session-timeout: see the server's log)") from None
            raise ActsparseError(f"on {self.host}:{self.port}, {name} failed: {_first_line(exc)}") from None

    # ------------------------------------------------------------ files

    def upload_bytes(self, data: bytes, name: str) -> str:
        """Write `data` as file `name` in the session's work directory; returns its sha256."""
        return self.upload_stream(io.BytesIO(data), len(data), name)

    def upload_file(self, path: str | os.PathLike, name: str) -> str:
        """Stream the file at `path` to `name` in the session's work directory; returns its sha256."""
        with open(path, "rb") as stream:
            return self.upload_stream(stream, os.fstat(stream.fileno()).st_size, name)

    def upload_stream(self, stream, size: int, name: str) -> str:
        """Upload `size` bytes of `stream` in chunks, announced first: the device checks its upload
        cap and disk before any data is sent, and never holds more than one chunk in memory."""
        from actsparse.deploy.server import UPLOAD_CHUNK_BYTES

        self._call("actsparse.rpc.upload_begin", name, int(size))
        digest, sent = hashlib.sha256(), 0
        while sent < size:
            chunk = stream.read(min(UPLOAD_CHUNK_BYTES, size - sent))
            if not chunk:
                raise ActsparseError(f"upload of {name}: the file shrank while it was sent")
            digest.update(chunk)
            self._call("actsparse.rpc.upload_chunk", name, bytearray(chunk))
            sent += len(chunk)
        return digest.hexdigest()

    def download_bytes(self, name: str) -> bytes:
        return bytes(self._call("tvm.rpc.server.download", name))

    def remote_sha256(self, name: str) -> str:
        return str(self._call("actsparse.rpc.sha256", name))

    def info(self) -> dict:
        """{machine, system, python, actsparse, format_version} of the device."""
        return json.loads(str(self._call("actsparse.rpc.info")))

    # ------------------------------------------------------------ artifacts

    def upload_artifact(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Upload an artifact (directory or .tar) as one .tar file; returns its remote name.

        Refuses an artifact built for another CPU architecture than the device's, and checks
        the sha256 of the file the device received against the one sent.
        """
        path = Path(path)
        manifest = _local_manifest(path)
        wanted = artifact.normalize_machine(str(manifest["target"].get("machine", "")))
        device = artifact.normalize_machine(self.info()["machine"])
        if wanted != device:
            raise ActsparseError(
                f"{path} is compiled for {wanted}, but the device {self.host}:{self.port} is {device}: "
                "compile it for the device's target (e.g. --target rpi4)"
            )
        name = name or f"artifact-{uuid.uuid4().hex[:12]}.tar"
        with _artifact_tar(path) as tar_path:
            sent = self.upload_file(tar_path, name)
        received = self.remote_sha256(name)
        if sent != received:
            raise ActsparseError(
                f"checksum mismatch after upload to {self.host}:{self.port}: "
                f"sent sha256 {sent}, the device has {received}"
            )
        self._uploaded[name] = sent
        return name

    def run(self, name: str, inputs: Mapping[str, np.ndarray], repeat: int = 1) -> dict[str, np.ndarray]:
        """Run an uploaded artifact on the device; returns {output name: array}.

        The device loads it with `actsparse.runtime.load` (which checks every file's sha256
        and the architecture again) once per uploaded content. `last_seconds` holds the device-side
        time of each of the `repeat` runs.
        """
        if name not in self._uploaded:
            raise ActsparseError(f"no artifact {name!r} uploaded in this session: call upload_artifact first")
        stem = uuid.uuid4().hex[:12]
        inputs_name, outputs_name = f"inputs-{stem}.npz", f"outputs-{stem}.npz"
        self.upload_bytes(_npz_bytes(inputs), inputs_name)
        reply = self._call(
            "actsparse.rpc.run_artifact", name, self._uploaded[name], inputs_name, outputs_name, int(repeat)
        )
        timing = json.loads(str(reply))
        self.last_seconds = list(timing["seconds"])
        with np.load(io.BytesIO(self.download_bytes(outputs_name)), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def generate(self, name: str, prompt: list[int], max_new_tokens: int) -> dict:
        """Greedy generation on the device with an uploaded LM artifact:
        {tokens, prompt_tokens_per_second, decode_tokens_per_second} (device-side timings)."""
        if name not in self._uploaded:
            raise ActsparseError(f"no artifact {name!r} uploaded in this session: call upload_artifact first")
        request = json.dumps({"prompt": [int(t) for t in prompt], "max_new_tokens": int(max_new_tokens)})
        return json.loads(str(self._call("actsparse.rpc.generate_artifact", name, self._uploaded[name], request)))

    def close(self) -> None:
        """End the session (the device's server then serves the next client)."""
        self._functions.clear()
        self._session = None

    def __enter__(self) -> RemoteBoard:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def connect(
    host: str,
    port: int,
    *,
    key: str = "",
    timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    session_timeout: float | None = None,
    token: bytes | None = None,
) -> RemoteBoard:
    """Open an RPC session with the device at host:port.

    `timeout` bounds reaching the server; `session_timeout` asks the server to end the
    session after that many seconds. Raises ActsparseError when nothing listens, the server
    does not answer, or it refuses the key. `token`: the secret of a server started with
    --token-file; the client answers its challenge (HMAC of a one-time nonce), never sends it.
    """
    nonce = probe(host, port, key, timeout, challenge=token is not None)
    tvm_ffi = import_tvm_ffi()
    ensure_tvm_runtime()
    rpc_connect = tvm_ffi.get_global_func("rpc.Connect", allow_missing=True)
    if rpc_connect is None:
        raise ActsparseError("this TVM runtime was built without RPC support (rpc.Connect missing)")
    if token is not None:
        from actsparse.deploy.server import AUTH_PREFIX, token_mac

        key = f"{AUTH_PREFIX}{nonce}:{token_mac(token, nonce)}"
    client_key = key + (f" -timeout={session_timeout:g}" if session_timeout else "")
    try:
        session = rpc_connect(host, int(port), client_key, False)
    except Exception as exc:
        if "cannot find server that matches key" in str(exc):
            raise ActsparseError(f"RPC server {host}:{port} refused the session: a wrong key or token, or the server "
                                 "requires --token-file") from None
        raise ActsparseError(f"RPC handshake with {host}:{port} failed: {_first_line(exc)}") from None
    return RemoteBoard(host, int(port), session)


@dataclass
class DeployResult:
    """What `deploy_and_run` did: the outputs, the device, and the error against a reference."""

    outputs: dict[str, np.ndarray]
    device: dict
    remote_name: str
    seconds: list[float]
    max_abs_error: dict[str, float] | None = None


def deploy_and_run(
    path: str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
    host: str,
    port: int,
    *,
    key: str = "",
    timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    repeat: int = 1,
    reference: Mapping[str, np.ndarray] | None = None,
    atol: float = 1e-4,
    token: bytes | None = None,
) -> DeployResult:
    """Upload the artifact at `path`, verify it on the device, run it, fetch the outputs.

    With `reference` (e.g. the host-compiled model's outputs), each output must match it
    within `atol` (max absolute difference) or an ActsparseError says which one differs.
    """
    with connect(host, port, key=key, timeout=timeout, token=token) as board:
        device = board.info()
        name = board.upload_artifact(path)
        outputs = board.run(name, inputs, repeat=repeat)
        seconds = board.last_seconds
    errors = None
    if reference is not None:
        errors = compare_outputs(outputs, reference, atol)
    return DeployResult(outputs, device, name, seconds, errors)


def compare_outputs(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], atol: float
) -> dict[str, float]:
    """Max absolute error per output; ActsparseError when one is missing, misshaped or off by more than atol."""
    errors = {}
    for name, expected in reference.items():
        if name not in outputs:
            raise ActsparseError(f"the device returned no output {name!r} (it returned {', '.join(outputs)})")
        got, expected = np.asarray(outputs[name]), np.asarray(expected)
        if got.shape != expected.shape:
            raise ActsparseError(f"output {name!r}: device shape {got.shape}, reference {expected.shape}")
        errors[name] = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
        if errors[name] > atol:
            raise ActsparseError(f"output {name!r} differs from the reference by {errors[name]:.3g} (> {atol:g})")
    return errors


# Causal LMs on a board (`actsparse deploy`), and remote timings (`actsparse bench --rpc`).

LM_CHECK_PROMPT_TOKENS = 16  # prompt tokens of the greedy check run on the board
LM_CHECK_NEW_TOKENS = 32


def lm_check_prompt(manifest: dict) -> list[int]:
    """A fixed prompt for an LM artifact: the BOS id (if any), then ids spread over the vocabulary."""
    lm = manifest["lm"]
    vocab = int(lm["vocab_size"])
    start = [int(lm["bos_token_id"])] if lm.get("bos_token_id") is not None else []
    return start + [(7919 * i + 1) % vocab for i in range(LM_CHECK_PROMPT_TOKENS - len(start))]


def generate_on_board(path: str | os.PathLike, manifest: dict, host: str, port: int, new_tokens: int, *,
                      key: str = "", timeout: float = DEFAULT_CONNECT_TIMEOUT_S, token: bytes | None = None) -> dict:
    """Upload the LM artifact at `path` and generate `new_tokens` greedy tokens after
    `lm_check_prompt` on the board: the board's `generate` result (tokens, decode and prompt
    tok/s) and `device`, the board's info."""
    board = connect(host, port, key=key, timeout=timeout, token=token)
    try:
        name = board.upload_artifact(path)
        return board.generate(name, lm_check_prompt(manifest), new_tokens) | {"device": board.info()}
    finally:
        board.close()


def check_greedy_tokens(reference: str | os.PathLike, manifest: dict, tokens: list[int]) -> None:
    """ActsparseError unless the LM artifact `reference` (compiled for this machine) generates
    the same greedy `tokens` after `lm_check_prompt` as the board did."""
    from actsparse.runtime import load

    model = load(reference)
    if not hasattr(model, "generate"):
        raise ActsparseError(f"--reference {reference}: give an LM artifact compiled for this machine")
    expected = list(model.generate(lm_check_prompt(manifest), LM_CHECK_NEW_TOKENS, stop_tokens=[]))
    if expected != tokens:
        first = next(i for i, (a, b) in enumerate(zip(expected, tokens)) if a != b)
        raise ActsparseError(f"the board's greedy tokens differ from {reference}'s from token {first}")


class _InputSpecs:
    """Just the input specs of a manifest, for generating inputs."""

    def __init__(self, manifest: dict):
        self.inputs = manifest["inputs"]


def time_on_board(path: str | os.PathLike, manifest: dict, host: str, port: int, iters: int, *,
                  key: str = "", token: bytes | None = None) -> dict:
    """Device-side timings of the (non-LM) artifact at `path` on seeded random inputs, after a
    warm-up: device, runs, ms_median, ms_best and, when the manifest knows its weight bytes,
    weight_gbs."""
    from actsparse.runtime.run_command import artifact_inputs

    feeds = artifact_inputs(_InputSpecs(manifest), None, 0)
    board = connect(host, port, key=key, token=token)
    try:
        name = board.upload_artifact(path)
        board.run(name, feeds, repeat=3)  # warm-up: load once, first-touch the weights
        board.run(name, feeds, repeat=iters)
        seconds = sorted(board.last_seconds)
    finally:
        board.close()
    median = float(np.median(seconds))
    weight_bytes = manifest.get("report", {}).get("weight_bytes")
    results = {"device": f"{host}:{port}", "runs": len(seconds), "ms_median": round(median * 1e3, 4),
               "ms_best": round(seconds[0] * 1e3, 4)}
    if weight_bytes:
        results["weight_gbs"] = round(weight_bytes / median / 1e9, 3)
    return results


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The arrays as an .npz file; object arrays are refused (numpy would pickle them)."""
    checked = {}
    for key, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise ActsparseError(f"input {key!r}: object arrays cannot be sent (numeric arrays only)")
        checked[key] = array
    buffer = io.BytesIO()
    np.savez(buffer, **checked)
    return buffer.getvalue()


def _local_manifest(path: Path) -> dict:
    """The artifact's manifest, read without extracting a .tar."""
    if not path.exists():
        raise ActsparseError(f"{path}: no such artifact")
    if path.is_dir():
        return artifact.read_manifest(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            member = archive.getmember(artifact.MANIFEST_NAME)
            manifest = json.loads(archive.extractfile(member).read(member.size).decode("utf-8"))
    except (KeyError, AttributeError):
        raise ActsparseError(f"{path}: not an actsparse artifact (no {artifact.MANIFEST_NAME})") from None
    except (OSError, tarfile.TarError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ActsparseError(f"{path}: not a readable artifact ({exc})") from None
    artifact.validate_manifest(manifest)
    return manifest


@contextlib.contextmanager
def _artifact_tar(path: Path):
    """The artifact as one .tar file: itself, or a temporary tar of a directory artifact."""
    if path.is_file():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="actsparse-deploy-") as workdir:
        tar_path = Path(workdir) / "artifact.tar"
        artifact.write_tar(path, tar_path)
        yield tar_path
