"""Find the tools that build for and emulate another CPU architecture (aarch64 for the Raspberry Pi 4).

Linking a library for an aarch64 board on an x86_64 machine needs the GNU cross compiler
(``aarch64-linux-gnu-g++``); running its code without a board needs qemu's user-mode
emulator. Both come from Debian/Ubuntu packages; each missing tool raises one
ActsparseError that names the package to install (``scripts/arm/setup_toolchain.sh``
installs them all).
"""

from __future__ import annotations

import shutil

from actsparse.errors import ActsparseError

# machine -> (cross C++ compiler, Debian package that provides it)
CROSS_COMPILERS = {"aarch64": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")}
# machine -> (qemu user-mode emulators in order of preference, Debian package)
EMULATORS = {"aarch64": (("qemu-aarch64-static", "qemu-aarch64"), "qemu-user-static")}


def _known(machine: str, table: dict) -> str:
    if machine not in table:
        raise ActsparseError(f"no cross toolchain known for {machine!r}: supported: {', '.join(sorted(table))}")
    return machine


def find_cross_compiler(machine: str = "aarch64", compiler: str | None = None) -> str:
    """Absolute path of the C++ compiler that links libraries for ``machine``.

    ``compiler`` names another one (a name on PATH or a path). Raises ActsparseError with the
    install command when it is missing.
    """
    default, package = CROSS_COMPILERS[_known(machine, CROSS_COMPILERS)]
    wanted = compiler or default
    path = shutil.which(wanted)
    if path is None:
        hint = f"install it with `apt-get install {package}`" if compiler is None else "check the name and PATH"
        raise ActsparseError(
            f"cross compiler {wanted!r} for {machine} not found on PATH: {hint} "
            "(scripts/arm/setup_toolchain.sh installs the whole ARM toolchain)"
        )
    return path


def cross_fcompile(machine: str = "aarch64", compiler: str | None = None):
    """A TVM ``export_library(fcompile=...)`` function that links with the cross compiler."""
    from tvm.support import cc

    return cc.cross_compiler(find_cross_compiler(machine, compiler))


def find_emulator(machine: str = "aarch64") -> str:
    """Absolute path of qemu's user-mode emulator for ``machine`` (runs one Linux program)."""
    names, package = EMULATORS[_known(machine, EMULATORS)]
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    raise ActsparseError(
        f"qemu user-mode emulator for {machine} ({' or '.join(names)}) not found on PATH: "
        f"install it with `apt-get install {package}` (scripts/arm/setup_toolchain.sh)"
    )
