"""The part of actsparse a device needs: the thin runtime and the RPC server, nothing else.

`stage_device_package(dest)` copies it into ``dest/actsparse`` (put ``dest`` on the device's
PYTHONPATH). It holds only modules that import the standard library, numpy, safetensors
and tvm_ffi, so the device needs neither torch, onnx nor the TVM compiler.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from actsparse.errors import ActsparseError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# Paths relative to the actsparse package; folders are copied with their .py files only.
# `python -m actsparse.runtime run ...` is the device's command line (runtime/__main__.py).
DEVICE_FILES = ("__init__.py", "errors.py", "atomic.py", "runtime", "deploy/__init__.py", "deploy/server.py", "deploy/rpc.py")


def stage_device_package(dest: str | os.PathLike) -> Path:
    """Copy the device-side modules into ``dest/actsparse``; returns ``dest``."""
    dest = Path(dest)
    target = dest / "actsparse"
    if target.exists():
        if not (target / "__init__.py").is_file():
            raise ActsparseError(f"{target}: exists and is not a staged actsparse package; refusing to replace it")
        shutil.rmtree(target)
    for rel in DEVICE_FILES:
        source = PACKAGE_ROOT / rel
        if source.is_dir():
            shutil.copytree(source, target / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / rel)
    return dest


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m actsparse.deploy.device DEST   (then copy DEST/actsparse to the board)")
    try:
        print(f"staged the device package in {stage_device_package(sys.argv[1]) / 'actsparse'}")
    except ActsparseError as exc:
        sys.exit(f"actsparse: error: {exc}")
