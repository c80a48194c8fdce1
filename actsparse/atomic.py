"""Put a finished temp file in place with the mode a plain write would have given it.

Temp files from `tempfile.mkstemp` are 0600; renamed into place as they are, every output was
private, and an overwritten 0644 file became 0600. The file keeps the existing file's mode, or
gets 0666 less the umask, as `open(path, "w")` would.
"""

from __future__ import annotations

import os
from pathlib import Path


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
