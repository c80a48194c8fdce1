"""Put a finished temp file in place with the mode a plain write would have given it.

Temp files from `tempfile.mkstemp` are 0600; renamed into place as they are, every output was
private, and an overwritten 0644 file became 0600. The file keeps the existing file's mode, or
gets 0666 less the umask, as `open(path, "w")` would.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def target_mode(path: str | os.PathLike) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def replace_into(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """chmod `tmp` to `path`'s mode (see the module docstring), then rename it over `path`."""
    os.chmod(tmp, target_mode(path))
    os.replace(tmp, Path(path))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON at `path`, through a temp file beside it and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
        replace_into(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(value: Any):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
