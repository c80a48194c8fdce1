"""Start `actsparse.deploy.server` as a child process and wait until it listens.

Used for the emulated board (`actsparse.deploy.qemu`) and for a server on this machine
(`start_local_rpc_server`, for tests and for trying a deployment without a device).
"""

from __future__ import annotations

import ipaddress
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from actsparse.errors import ActsparseError


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class RpcServerProcess:
    """A running ``actsparse.deploy.server``. `stop()` (or leaving a `with` block) ends it."""

    process: subprocess.Popen
    host: str
    port: int
    _log: object  # the server's stderr, read back when it fails to start

    def wait_until_listening(self, timeout: float, what: str) -> int:
        """The port from the server's ready line; ActsparseError if it exits or stays silent."""
        from actsparse.deploy.server import READY_LINE

        deadline = time.monotonic() + timeout
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = self.process.stdout.readline()
                if not line:  # EOF: the server exited
                    self.process.wait()
                    raise ActsparseError(f"the {what} exited at startup:\n{self.stderr_tail()}")
                if line.startswith(READY_LINE):
                    return int(line.rsplit(":", 1)[1])
        finally:
            selector.close()
        self.stop()
        raise ActsparseError(f"the {what} did not start within {timeout:g} s:\n{self.stderr_tail()}")

    def stderr_tail(self) -> str:
        self._log.seek(0)
        return _tail(self._log.read())

    def stop(self) -> None:
        """Terminate the server and its session processes (all in its own process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        self._log.close()

    def __enter__(self) -> RpcServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_server_process(
    command: Sequence[str], env: Mapping[str, str], host: str, startup_timeout: float, what: str = "RPC server"
) -> RpcServerProcess:
    """Run `command` (an actsparse.deploy.server command line) and wait for its ready line."""
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        list(command),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,  # its own process group: stop() ends the forked sessions too
    )
    server = RpcServerProcess(process, host, 0, log)
    server.port = server.wait_until_listening(startup_timeout, what)
    return server


def start_local_rpc_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    key: str = "",
    session_timeout: float | None = None,
    startup_timeout: float = 60,
    token_file: str | os.PathLike | None = None,
    trust: Sequence[str | os.PathLike] = (),
    max_upload_mb: int | None = None,
    max_disk_mb: int | None = None,
    workdir: str | os.PathLike | None = None,
) -> RpcServerProcess:
    """Start ``python -m actsparse.deploy.server`` on this machine, on a loopback address."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ActsparseError(f"a local test server listens on loopback addresses only (127.0.0.1, ::1), not {host}")
    command = [sys.executable, "-m", "actsparse.deploy.server", "--host", host, "--port", str(port)]
    if key:
        command += ["--key", key]
    if session_timeout is not None:
        command += ["--session-timeout", str(session_timeout)]
    if token_file is not None:
        command += ["--token-file", str(token_file)]
    for key_file in trust:
        command += ["--trust", str(key_file)]
    if max_upload_mb is not None:
        command += ["--max-upload-mb", str(max_upload_mb)]
    if max_disk_mb is not None:
        command += ["--max-disk-mb", str(max_disk_mb)]
    if workdir is not None:
        command += ["--workdir", str(workdir)]
    return start_server_process(command, {**os.environ, "PYTHONUNBUFFERED": "1"}, host, startup_timeout)
