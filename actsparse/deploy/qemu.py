"""An emulated Raspberry Pi 4 (arm64 Linux) for testing without a board.

The board is qemu's user-mode emulator running the arm64 Python of a Debian userland
built by ``scripts/arm/build_userland.sh`` (layout: ``root/`` the arm64 Debian root,
``site/`` the device's Python packages, ``lib/libtvm_runtime.so`` the aarch64 TVM runtime):

    board = EmulatedBoard.from_userland(".cache/arm64-userland")
    board.run_python(["-c", "import platform; print(platform.machine())"]).stdout   # 'aarch64\\n'
    with board.start_rpc_server() as server:          # actsparse.deploy.server on 127.0.0.1
        outputs = deploy_and_run(artifact, inputs, server.host, server.port)

qemu-user translates the guest's system calls to the host's, so the guest sees the host's
files (paths under ``root/`` shadow the host's: ``-L root``) and the host's network.
Emulation costs ~10-30x native speed; ``import numpy, tvm_ffi`` takes several seconds.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from actsparse.codegen.cross import find_emulator
from actsparse.deploy.process import RpcServerProcess, start_server_process
from actsparse.errors import ActsparseError

PYTHON_IN_ROOT = "usr/bin/python3.11"
RUNTIME_IN_USERLAND = "lib/libtvm_runtime.so"
BUILD_HINT = "build it with scripts/arm/setup_toolchain.sh && scripts/arm/build_userland.sh"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class EmulatedBoard:
    """An arm64 userland run under qemu-aarch64 (see the module docstring)."""

    root: Path
    site: Path
    runtime_library: Path
    emulator: str = field(default_factory=lambda: find_emulator("aarch64"))

    @classmethod
    def from_userland(cls, cache_dir: str | os.PathLike) -> EmulatedBoard:
        """The board in a userland folder built by scripts/arm/build_userland.sh."""
        cache = Path(cache_dir).resolve()
        root, site, runtime = cache / "root", cache / "site", cache / RUNTIME_IN_USERLAND
        # The userland first: with neither it nor qemu installed, building it is the next step.
        for path in (root / PYTHON_IN_ROOT, runtime):
            if not path.is_file():
                raise ActsparseError(f"arm64 userland incomplete: {path} is missing; {BUILD_HINT}")
        if not site.is_dir():
            raise ActsparseError(f"arm64 userland incomplete: {site} is missing; {BUILD_HINT}")
        return cls(root, site, runtime)

    # ------------------------------------------------------------ running programs

    def python_command(self, args: Sequence[str], qemu_args: Sequence[str] = ()) -> list[str]:
        """The host command line that runs the board's python3.11 with `args`."""
        return [self.emulator, "-L", str(self.root), *qemu_args, str(self.root / PYTHON_IN_ROOT), *map(str, args)]

    def environment(self, pythonpath: Sequence[str | os.PathLike] = (), env: Mapping[str, str] | None = None) -> dict:
        """A small, explicit environment for the guest (the host's venv must not leak in).

        PYTHONPATH: `pythonpath` then the board's site folder; ACTSPARSE_TVM_RUNTIME: the
        board's aarch64 libtvm_runtime.so. `env` adds or overrides variables.
        """
        result = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "TMPDIR": os.environ.get("TMPDIR", tempfile.gettempdir()),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([*(str(p) for p in pythonpath), str(self.site)]),
            "ACTSPARSE_TVM_RUNTIME": str(self.runtime_library),
        }
        result.update(env or {})
        return result

    def run_python(
        self,
        args: Sequence[str],
        *,
        pythonpath: Sequence[str | os.PathLike] = (),
        env: Mapping[str, str] | None = None,
        qemu_args: Sequence[str] = (),
        timeout: float = 600,
        check: bool = True,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """Run the board's Python with `args`; returns the finished process (text output).

        With `check`, a non-zero exit or a timeout raises ActsparseError with the tail of stderr.
        """
        command = self.python_command(args, qemu_args)
        try:
            result = subprocess.run(
                command,
                env=self.environment(pythonpath, env),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise ActsparseError(
                f"emulated arm64 python did not finish within {timeout:g} s: {' '.join(map(str, args))}"
            ) from None
        if check and result.returncode != 0:
            reason = _tail(result.stderr or result.stdout)
            raise ActsparseError(f"emulated arm64 python exited with status {result.returncode}:\n{reason}")
        return result

    # ------------------------------------------------------------ RPC server

    def start_rpc_server(
        self,
        *,
        package_dir: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        key: str = "",
        workdir: str | os.PathLike | None = None,
        session_timeout: float | None = None,
        startup_timeout: float = 120,
    ) -> RpcServerProcess:
        """Start ``actsparse.deploy.server`` on the board, listening on a loopback address.

        `package_dir` holds the device package (`actsparse.deploy.device.stage_device_package`).
        Port 0 picks a free port (see `.port`). Waits until the server listens; raises
        ActsparseError if it exits or stays silent for `startup_timeout` seconds.
        """
        if not ipaddress.ip_address(host).is_loopback:
            raise ActsparseError(f"the emulated board serves on loopback addresses only (127.0.0.1, ::1), not {host}")
        args = ["-m", "actsparse.deploy.server", "--host", host, "--port", str(port)]
        if key:
            args += ["--key", key]
        if workdir is not None:
            args += ["--workdir", str(workdir)]
        if session_timeout is not None:
            args += ["--session-timeout", str(session_timeout)]
        command, env = self.python_command(args), self.environment([package_dir])
        return start_server_process(command, env, host, startup_timeout, what="emulated RPC server")
