"""A TVM RPC server for a device, without the TVM compiler: ``python -m actsparse.deploy.server``.

TVM's own server (``python -m tvm.exec.rpc_server``) needs ``import tvm``, i.e. the whole
compiler package (~95 MB on aarch64, ~24 s to import under emulation). Everything the RPC
protocol needs on the device side is in ``libtvm_runtime.so`` (``rpc.ServerLoop`` and the
``tvm.rpc.server.upload/download/remove`` functions); the compiler package adds only the
handshake and a few helper functions in Python. This module does those with ``tvm_ffi``,
so a device needs only the thin runtime's packages (numpy, apache-tvm-ffi, safetensors and
``libtvm_runtime.so``). Any TVM RPC client (``tvm.rpc.connect``, or
``actsparse.deploy.rpc.connect``) talks to it.

Protocol (TVM's): the client sends ``[RPC_MAGIC, len, "client:<key> [-timeout=N]"]``; the server
answers ``[RPC_CODE_SUCCESS, len, "server:<key>"]`` (or ``RPC_CODE_MISMATCH`` for a wrong key),
then ``rpc.ServerLoop`` serves the session on the socket. Each session runs in a forked
child process with its own empty work directory, so a crashing model ends only its session;
one session runs at a time. A session that outlives ``-timeout`` (client) or
``--session-timeout`` (server) is killed.

Uploads are capped while they arrive, not after: TVM's RPC endpoint reads a whole message into
memory before calling any function, so the server relays the client's bytes to the session
(`SessionRelay`) and reads each message's length first: a message that would take the session
past ``--max-upload-mb`` (or past `MAX_MESSAGE_BYTES`) ends the session before its first byte is
read, and the session's folder (partial files included) is removed. actsparse clients upload in
chunks (`UPLOAD_CHUNK_BYTES`), announced first with their size, so a refusal is a clear message
instead; ``--max-disk-mb`` caps the disk the session's files use.

Functions the server adds for actsparse clients (all paths are names inside the session's
work directory; ``..`` and absolute paths are refused):
  actsparse.rpc.upload_begin(name, size) -> checks the session's upload cap and the disk before any data
  actsparse.rpc.upload_chunk(name, data) -> appends to name.part; renamed to name once `size` bytes arrived
  actsparse.rpc.info() -> JSON {machine, system, python, actsparse, format_version}
  actsparse.rpc.sha256(name) -> hex digest of an uploaded file
  actsparse.rpc.run_artifact(artifact, sha256, inputs_npz, outputs_npz, repeat) -> JSON {seconds: [...]}
      loads the artifact once per (name, sha256), after checking the file has that sha256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError

RPC_MAGIC = 0xFF271
RPC_CODE_SUCCESS = RPC_MAGIC + 0
RPC_CODE_MISMATCH = RPC_MAGIC + 2
# A client that only checks the handshake (actsparse.deploy.rpc.probe) adds this option: no
# session is started for it. TVM's own server ignores options it does not know.
PROBE_OPTION = "-actsparse-probe"
CHALLENGE_OPTION = "-actsparse-challenge"  # a probe asking for a nonce to answer (token authentication)
AUTH_PREFIX = "auth:"  # the key of an authenticated client: auth:<nonce>:<hex HMAC-SHA256(token, nonce)>
_NONCE_LIFETIME_S = 30.0
MIN_TOKEN_BYTES = 16
READY_LINE = "actsparse-rpc-server listening on"
_HANDSHAKE_TIMEOUT_S = 10.0
_MAX_KEY_BYTES = 4096


# ---------------------------------------------------------------- session functions


def _session_path(workdir: Path, name: str) -> Path:
    """`name` inside the session's work directory; refuses anything that would leave it."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ValueError(f"invalid remote file name {name!r}: give a plain name inside the work directory")
    return workdir / name


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as out:
        np.savez(out, **arrays)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


DEFAULT_MAX_UPLOAD_MB = 16384
DEFAULT_MAX_DISK_MB = 16384
_DISK_RESERVE_BYTES = 256 << 20  # uploads never fill the device's disk to the last 256 MB
UPLOAD_CHUNK_BYTES = 4 << 20  # what an actsparse client sends per message
MAX_MESSAGE_BYTES = 64 << 20  # TVM holds a whole message in memory: none may be larger
# Bytes of a message that are not file data (function handle, argument codes, a name): the
# relay counts the rest against the upload cap, so it never refuses what upload() would take.
MESSAGE_OVERHEAD_BYTES = 1024
PART_SUFFIX = ".part"


class UploadLimits:
    """The session's upload accounting: bytes received as files (the --max-upload-mb cap), the
    disk its folder uses (--max-disk-mb), and the device's free-disk reserve. Checked before a
    file's first byte is written, from its announced size."""

    def __init__(self, workdir: Path, max_upload_bytes: int, max_disk_bytes: int):
        self.workdir = workdir
        self.max_upload_bytes = max_upload_bytes
        self.max_disk_bytes = max_disk_bytes
        self.uploaded = 0

    def check(self, name: str, size: int, still_coming: int = 0) -> None:
        """`still_coming`: bytes other announced uploads have yet to write (not on disk yet)."""
        if size < 0:
            raise ValueError(f"upload of {name!r}: negative size {size}")
        if self.uploaded + size > self.max_upload_bytes:
            raise PermissionError(f"upload of {name!r} ({_mb(size)}) refused: this session's uploads would pass "
                                  f"{_mb(self.max_upload_bytes)} (the server's --max-upload-mb)")
        if folder_bytes(self.workdir) + still_coming + size > self.max_disk_bytes:
            raise PermissionError(f"upload of {name!r} ({_mb(size)}) refused: the session's files would use more "
                                  f"than {_mb(self.max_disk_bytes)} of disk (the server's --max-disk-mb)")
        if still_coming + size > shutil.disk_usage(self.workdir).free - _DISK_RESERVE_BYTES:
            raise PermissionError(f"upload of {name!r} ({_mb(size)}) refused: not enough free disk on the device")

    def record(self, size: int) -> None:
        self.uploaded += size


def _mb(size: int) -> str:
    value = size / (1 << 20)
    return f"{value:.0f} MB" if value >= 10 or value == int(value) else f"{value:.2f} MB"


def folder_bytes(folder: Path) -> int:
    """Bytes the files under `folder` hold (what the disk cap counts)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed meanwhile
    return total


def register_session_functions(workdir: Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20,
                               max_disk_bytes: int = DEFAULT_MAX_DISK_MB << 20) -> None:
    """Register the global functions TVM's RPC server code and actsparse clients call."""
    import tvm_ffi

    from actsparse import __version__
    from actsparse.runtime import FORMAT_VERSION, load

    loaded: dict[str, object] = {}
    limits = UploadLimits(workdir, max_upload_bytes, max_disk_bytes)
    pending: dict[str, list[int]] = {}  # name -> [announced size, bytes written]

    def workpath(name: str) -> str:
        return str(_session_path(workdir, name))

    def load_module(name: str):
        # TVM's RPC client API would load any uploaded shared library here: native code from the
        # network. This server runs only artifacts, checked by actsparse.runtime.load.
        raise PermissionError(f"refused to load {name!r}: this server runs only actsparse artifacts "
                              "(upload_artifact + run / generate)")

    def still_coming() -> int:
        return sum(size - written for size, written in pending.values())

    def upload(name: str, data) -> None:
        # Replaces TVM's own (one message, at most MAX_MESSAGE_BYTES): the same caps as chunked uploads.
        path = _session_path(workdir, name)
        payload = bytes(data)
        limits.check(name, len(payload), still_coming())
        path.write_bytes(payload)
        limits.record(len(payload))

    def upload_begin(name: str, size: int) -> None:
        path = _session_path(workdir, name)
        pending.pop(name, None)  # announced again: starts over
        limits.check(name, int(size), still_coming())
        limits.record(int(size))  # reserved now: other uploads cannot take it meanwhile
        part = path.with_name(path.name + PART_SUFFIX)
        part.write_bytes(b"")
        pending[name] = [int(size), 0]
        if int(size) == 0:
            _finish_upload(name)

    def upload_chunk(name: str, data) -> None:
        if name not in pending:
            raise ValueError(f"upload of {name!r}: call upload_begin first")
        size, written = pending[name]
        payload = bytes(data)
        part = _session_path(workdir, name + PART_SUFFIX)
        if written + len(payload) > size:
            del pending[name]
            part.unlink(missing_ok=True)
            raise PermissionError(f"upload of {name!r} refused: more bytes than the {size} announced")
        with open(part, "ab") as stream:
            stream.write(payload)
        pending[name][1] = written + len(payload)
        if pending[name][1] == size:
            _finish_upload(name)

    def _finish_upload(name: str) -> None:
        del pending[name]
        path = _session_path(workdir, name)
        os.replace(path.with_name(path.name + PART_SUFFIX), path)

    def import_module(*args):
        raise PermissionError("refused: this server runs only actsparse artifacts")

    def info() -> str:
        return json.dumps(
            {
                "machine": platform.machine(),
                "system": platform.system(),
                "python": platform.python_version(),
                "actsparse": __version__,
                "format_version": FORMAT_VERSION,
            }
        )

    def sha256(name: str) -> str:
        digest = hashlib.sha256()
        with open(workpath(name), "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def loaded_artifact(artifact: str, expected_sha256: str):
        # Keyed by content: an artifact uploaded again under the same name is loaded again.
        key = f"{artifact}:{expected_sha256}"
        if key not in loaded:
            if sha256(artifact) != expected_sha256:
                raise ValueError(f"{artifact} does not have the sha256 the client uploaded; upload it again")
            loaded[key] = load(workpath(artifact))
        return loaded[key]

    def run_artifact(artifact: str, expected_sha256: str, inputs_npz: str, outputs_npz: str, repeat: int) -> str:
        model = loaded_artifact(artifact, expected_sha256)
        inputs = _read_npz(Path(workpath(inputs_npz)))
        seconds = []
        for _ in range(max(1, int(repeat))):
            start = time.perf_counter()
            outputs = model.run(inputs)
            seconds.append(time.perf_counter() - start)
        _write_npz(Path(workpath(outputs_npz)), outputs)
        return json.dumps({"seconds": seconds})

    def generate_artifact(artifact: str, expected_sha256: str, request: str) -> str:
        """Greedy generation with an LM artifact: request {prompt: [ids], max_new_tokens}."""
        model = loaded_artifact(artifact, expected_sha256)
        if not hasattr(model, "generate"):
            raise ValueError(f"{artifact} is not a language-model artifact")
        options = json.loads(request)
        tokens = list(model.generate([int(t) for t in options["prompt"]], int(options["max_new_tokens"]),
                                     stop_tokens=[]))
        stats = model.stats
        return json.dumps({"tokens": tokens, "prompt_tokens_per_second": stats.prompt_tokens_per_second,
                           "decode_tokens_per_second": stats.decode_tokens_per_second})

    for name, func in (
        ("tvm.rpc.server.workpath", workpath),
        ("tvm.rpc.server.load_module", load_module),
        ("tvm.rpc.server.ImportModule", import_module),
        ("tvm.rpc.server.upload", upload),
        ("actsparse.rpc.upload_begin", upload_begin),
        ("actsparse.rpc.upload_chunk", upload_chunk),
        ("actsparse.rpc.info", info),
        ("actsparse.rpc.sha256", sha256),
        ("actsparse.rpc.run_artifact", run_artifact),
        ("actsparse.rpc.generate_artifact", generate_artifact),
    ):
        tvm_ffi.register_global_func(name, func, override=True)


# ---------------------------------------------------------------- handshake and serving


def recv_exact(conn: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes of a handshake, or ConnectionError when the peer closes first."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection during the handshake")
        data += chunk
    return data


class TokenAuth:
    """Challenge-response on a shared secret, inside TVM's handshake (the secret never crosses the
    wire): a probe with CHALLENGE_OPTION gets a one-time nonce in the server's reply; the session's
    key must then be ``auth:<nonce>:<HMAC-SHA256(token, nonce)>``. Nonces expire after 30 s and are
    consumed by their first use, so a captured key cannot be replayed."""

    def __init__(self, token: bytes):
        import threading

        if len(token) < MIN_TOKEN_BYTES:
            raise ActsparseError(f"the token must hold at least {MIN_TOKEN_BYTES} bytes (got {len(token)})")
        self.token = token
        self._nonces: dict[str, float] = {}
        self._lock = threading.Lock()

    def challenge(self) -> str:
        import secrets

        nonce = secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            self._nonces = {n: t for n, t in self._nonces.items() if now - t < _NONCE_LIFETIME_S}
            self._nonces[nonce] = now
        return nonce

    def accepts(self, client_key: str) -> bool:
        import hmac

        if not client_key.startswith(AUTH_PREFIX):
            return False
        nonce, _, mac = client_key[len(AUTH_PREFIX):].partition(":")
        with self._lock:
            issued = self._nonces.pop(nonce, None)
        if issued is None or time.monotonic() - issued >= _NONCE_LIFETIME_S:
            return False
        return hmac.compare_digest(mac, token_mac(self.token, nonce))


def token_mac(token: bytes, nonce: str) -> str:
    import hmac

    return hmac.new(token, f"actsparse-rpc:{nonce}".encode(), "sha256").hexdigest()


def handshake(conn: socket.socket, key: str, auth: TokenAuth | None = None) -> dict | None:
    """TVM's RPC handshake. Returns the client's options ({"timeout": s}) or None to drop it.
    With `auth`, sessions must answer a challenge (TokenAuth) instead of presenting `key`."""
    conn.settimeout(_HANDSHAKE_TIMEOUT_S)
    try:
        (magic,) = struct.unpack("<i", recv_exact(conn, 4))
        if magic != RPC_MAGIC:
            return None
        (length,) = struct.unpack("<i", recv_exact(conn, 4))
        if not 0 < length <= _MAX_KEY_BYTES:
            return None
        words = recv_exact(conn, length).decode("utf-8", "replace").split()
        probing = PROBE_OPTION in words[1:]
        if auth is not None and probing:  # a probe learns nothing but a fresh nonce
            accepted, reply = True, f"server:{auth.challenge()}".encode() if CHALLENGE_OPTION in words else b"server:"
        elif auth is not None:
            accepted = bool(words) and words[0].startswith("client:") and auth.accepts(words[0][len("client:"):])
            reply = b"server:authenticated"
        else:
            accepted, reply = bool(words) and words[0] == f"client:{key}", f"server:{key}".encode()
        if not accepted:
            conn.sendall(struct.pack("<i", RPC_CODE_MISMATCH))
            return None
        conn.sendall(struct.pack("<i", RPC_CODE_SUCCESS) + struct.pack("<i", len(reply)) + reply)
    except (OSError, ConnectionError, struct.error):
        return None
    conn.settimeout(None)
    options = {}
    for word in words[1:]:
        if word == PROBE_OPTION:
            options["probe"] = True
        elif word.startswith("-timeout="):
            try:
                options["timeout"] = float(word[len("-timeout=") :])
            except ValueError:
                pass
    return options


def _serve_session(conn: socket.socket, workdir: Path, max_upload_bytes: int, max_disk_bytes: int) -> None:
    """Child process: serve one RPC session in its work directory, then exit."""
    import tvm_ffi

    enter_session_folder(workdir)
    register_session_functions(workdir, max_upload_bytes, max_disk_bytes)
    tvm_ffi.get_global_func("rpc.ServerLoop")(conn.fileno())


def enter_session_folder(workdir: Path) -> None:
    """Work in `workdir`, temp files included: artifacts the session extracts while loading are
    counted by the disk cap and removed with the folder, even when the session is killed."""
    os.chdir(workdir)
    tempfile.tempdir = str(workdir / "tmp")
    os.mkdir(tempfile.tempdir, 0o700)


class SessionRelay:
    """Copies a session's bytes between the client and the session process, reading the length
    of each message the client sends (TVM RPC: a little-endian uint64, then that many bytes)
    before any of its bytes: a message longer than MAX_MESSAGE_BYTES, or one that would take the
    session's uploads past `max_upload_bytes`, ends the session there (`on_refused(reason)`)."""

    def __init__(self, client: socket.socket, session: socket.socket, max_upload_bytes: int, on_refused):
        import threading

        self.client, self.session = client, session
        self.max_upload_bytes = max_upload_bytes
        self.on_refused = on_refused
        self.counted = 0  # message bytes beyond MESSAGE_OVERHEAD_BYTES each: file data, at most
        self.threads = [threading.Thread(target=self._from_client, daemon=True),
                        threading.Thread(target=self._to_client, daemon=True)]
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def _from_client(self) -> None:
        try:
            while True:
                header = self._recv_exact(self.client, 8)
                if header is None:
                    break
                (length,) = struct.unpack("<Q", header)
                refusal = self._refusal(length)
                if refusal:
                    self.on_refused(refusal)
                    break
                self.session.sendall(header)
                if not self._forward(length):
                    break
        except OSError:
            pass
        finally:
            _shutdown(self.session)
            _shutdown(self.client)

    def _refusal(self, length: int) -> str:
        if length > MAX_MESSAGE_BYTES:
            return f"a message of {_mb(length)} (the limit is {_mb(MAX_MESSAGE_BYTES)}; upload in chunks)"
        self.counted += max(0, length - MESSAGE_OVERHEAD_BYTES)
        if self.counted > self.max_upload_bytes:
            return (f"a message of {_mb(length)} would take the session's uploads past {_mb(self.max_upload_bytes)} "
                    "(the server's --max-upload-mb)")
        return ""

    def _forward(self, length: int) -> bool:
        while length:
            data = self.client.recv(min(length, 1 << 20))
            if not data:
                return False
            self.session.sendall(data)
            length -= len(data)
        return True

    def _to_client(self) -> None:
        try:
            while data := self.session.recv(1 << 20):
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            _shutdown(self.client)

    @staticmethod
    def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _wait_session(pid: int, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        if deadline is not None and time.monotonic() > deadline:
            print(f"session {pid} passed its {timeout:g} s limit: killed", file=sys.stderr, flush=True)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.05)


def read_token(path: Path) -> bytes:
    """A token file's bytes (at least 16), refusing one that others can read."""
    try:
        if os.stat(path).st_mode & 0o077:
            raise ActsparseError(f"{path}: the token file is readable by others; chmod 600 it")
        token = Path(path).read_bytes()
    except OSError as exc:
        raise ActsparseError(f"{path}: cannot read the token ({exc.strerror or exc})") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ActsparseError(f"{path}: the token must hold at least {MIN_TOKEN_BYTES} bytes")
    return token


def session_timeout_for(server: float | None, client: float | None) -> float | None:
    """The session's time limit: the server's, shortened (never lengthened) by a client's request.
    A client's -timeout=1e9, nan, inf or a negative number cannot hold the only session longer."""
    if client is None or not math.isfinite(client) or client <= 0:
        return server
    return client if server is None else min(server, client)


def _accept_in_background(listener: socket.socket, key: str, auth: TokenAuth | None = None) -> "queue.Queue":
    """Accept connections and run each handshake in a thread of its own, with its own deadline, so
    that silent or slow connections never delay other clients; clients that passed it queue up
    for the one session at a time (returned queue of (conn, peer, options))."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue()

    def shake(conn: socket.socket, peer) -> None:
        options = handshake(conn, key, auth)
        if options is None or options.get("probe"):
            conn.close()
            return
        ready.put((conn, peer, options))

    def accept_forever() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return  # the listener was closed
            threading.Thread(target=shake, args=(conn, peer), daemon=True).start()

    threading.Thread(target=accept_forever, daemon=True, name="actsparse-rpc-accept").start()
    return ready


def serve(host: str, port: int, key: str = "", workroot: Path | None = None, session_timeout: float | None = None,
          token: bytes | None = None, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
          max_disk_mb: int = DEFAULT_MAX_DISK_MB):
    """Listen on host:port and serve TVM RPC sessions one at a time, forever.

    Port 0 picks a free port. Prints ``READY_LINE host:port`` once listening (what
    `actsparse.deploy.qemu.EmulatedBoard.start_rpc_server` waits for).
    """
    from actsparse.runtime.ffi import ensure_tvm_runtime

    ensure_tvm_runtime()  # load tvm_ffi and libtvm_runtime.so once, before forking sessions
    workroot = Path(workroot or tempfile.mkdtemp(prefix="actsparse-rpc-"))
    workroot.mkdir(parents=True, exist_ok=True)
    for stale in workroot.glob("session-*"):  # left by a server that was killed: they count against the disk
        shutil.rmtree(stale, ignore_errors=True)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1)
    print(f"{READY_LINE} {host}:{listener.getsockname()[1]}", flush=True)
    ready = _accept_in_background(listener, key, TokenAuth(token) if token is not None else None)
    while True:
        conn, peer, options = ready.get()
        timeout = session_timeout_for(session_timeout, options.get("timeout"))
        workdir = Path(tempfile.mkdtemp(prefix="session-", dir=workroot))
        _run_session(conn, peer, workdir, timeout, max_upload_mb << 20, max_disk_mb << 20, listener)


def _run_session(conn: socket.socket, peer, workdir: Path, timeout: float | None, max_upload_bytes: int,
                 max_disk_bytes: int, listener: socket.socket) -> None:
    """Serve one session in a forked child behind a SessionRelay; its folder is removed after it."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        ours.close()
        status = 0
        try:
            _serve_session(theirs, workdir, max_upload_bytes, max_disk_bytes)
        except BaseException as exc:  # noqa: BLE001 - report, then end only this session
            print(f"session from {peer[0]} failed: {exc}", file=sys.stderr, flush=True)
            status = 1
        finally:
            os._exit(status)
    theirs.close()

    def refuse(reason: str) -> None:  # the relay then closes both sockets: the session loop ends
        print(f"session from {peer[0]} ended: {reason}; its files are removed", file=sys.stderr, flush=True)

    relay = SessionRelay(conn, ours, max_upload_bytes, refuse)
    try:
        _wait_session(pid, timeout)
        _shutdown(conn)  # the session ended (or was killed): the relay stops
        relay.join()
    finally:
        conn.close()
        ours.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m actsparse.deploy.server",
        description="TVM RPC server for an actsparse device (needs no TVM compiler)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9090, help="port (0 picks a free one; default 9090)")
    parser.add_argument("--key", default="", help="RPC key clients must present (default: none)")
    parser.add_argument("--workdir", type=Path, default=None, help="where sessions keep uploaded files")
    parser.add_argument("--session-timeout", type=float, default=None, help="kill a session after this many seconds")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="require clients to prove they hold this secret (challenge-response; the secret "
                             "never crosses the network); make one with: head -c 32 /dev/urandom > token")
    parser.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"bytes one session may upload, in MB (default {DEFAULT_MAX_UPLOAD_MB}), enforced as they "
                             "arrive: a message that would pass it ends the session before it is read")
    parser.add_argument("--max-disk-mb", type=int, default=DEFAULT_MAX_DISK_MB,
                        help=f"disk a session's files may use, in MB (default {DEFAULT_MAX_DISK_MB}); uploads also "
                             "leave 256 MB of the disk free")
    parser.add_argument("--trust", action="append", default=[], metavar="PUB",
                        help="run only artifacts signed by this public key (repeatable); sessions inherit it")
    args = parser.parse_args(argv)
    try:
        if args.trust:  # sessions are forked from this process: every load they do checks the signature
            from actsparse.runtime.signing import trust_in_this_process

            trust_in_this_process(args.trust)
        token = read_token(args.token_file) if args.token_file else None
        if args.max_upload_mb <= 0 or args.max_disk_mb <= 0:
            raise ActsparseError("--max-upload-mb and --max-disk-mb must be positive")
        serve(args.host, args.port, args.key, args.workdir, args.session_timeout, token, args.max_upload_mb,
              args.max_disk_mb)
    except ActsparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
