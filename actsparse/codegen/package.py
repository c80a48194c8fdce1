"""Write a compiled model as an artifact (see `actsparse.runtime.artifact` for the format).

The artifact is built in a temp directory next to the destination and renamed into
place only when complete, so a failed write leaves any existing artifact untouched.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError
from actsparse.runtime import artifact
from actsparse.runtime.ffi import installed_runtime_library

DEFAULT_AARCH64_CROSS_COMPILER = "aarch64-linux-gnu-g++"


def write_artifact(
    path: str | os.PathLike,
    executable,
    params: Mapping[str, np.ndarray],
    inputs: list[dict],
    outputs: list[dict],
    target: dict,
    passes: list[dict],
    report: dict,
    *,
    as_tar: bool | None = None,
    lib_cross_compiler: str | None = None,
    fcompile: Callable | None = None,
    bundle_runtime: bool | str | os.PathLike = False,
    extra_manifest: dict | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write `executable` (from `tvm.compile`) and its weights as an artifact at `path`.

    The Relax function `main` must take (*inputs in order, *params in order) and return
    the output or a tuple of outputs. `params` is ordered; its order is recorded.
    `target` is a JSON-ready summary (kind, mtriple, mcpu, arch, ...); the CPU architecture
    the library is built for is added as `target["machine"]` unless given.

    as_tar: write one `.tar` file (default: when `path` ends in `.tar`) instead of a directory.
    lib_cross_compiler: C++ compiler that links the library (e.g. "aarch64-linux-gnu-g++");
        by default the host compiler, or aarch64-linux-gnu-g++ for an aarch64 target built
        on another machine. `fcompile` (a TVM export_library compile function) overrides it.
    bundle_runtime: copy a `libtvm_runtime.so` into the artifact (lib/) so the device needs
        no apache-tvm: True takes the installed apache-tvm's (host architecture only), a
        path takes that file (e.g. one from an aarch64 apache-tvm wheel).

    extra_manifest: more top-level manifest sections (e.g. "lm" for a language model).
    extra_files: {relative path: bytes} written into the artifact (and hashed like every file).

    Returns the path written. Raises ActsparseError on bad arguments; an existing
    destination is replaced only if it is an artifact (or an empty directory / a file when
    writing a tar).
    """
    path = Path(path)
    as_tar = path.suffix == ".tar" if as_tar is None else as_tar
    target = _target_with_machine(target)
    ordered_params = _checked_params(params)
    artifact.validate_tensor_specs(inputs, "inputs")
    artifact.validate_tensor_specs(outputs, "outputs")
    inputs, outputs = [_spec(s) for s in inputs], [_spec(s) for s in outputs]
    _check_json(target=target, passes=passes, report=report, extra_manifest=extra_manifest or {})
    _check_destination(path, as_tar)
    runtime_source = _runtime_to_bundle(bundle_runtime, target["machine"])

    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        content = staging / "artifact"
        content.mkdir()
        _export_library(executable, content / artifact.LIBRARY_NAME, target["machine"], lib_cross_compiler, fcompile)
        _save_params(ordered_params, content / artifact.PARAMS_NAME)
        if runtime_source is not None:
            (content / "lib").mkdir()
            shutil.copyfile(runtime_source, content / artifact.BUNDLED_RUNTIME_NAME)
        for rel, data in (extra_files or {}).items():
            file = content / artifact.check_member_name(rel)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)
        manifest = _manifest(content, target, inputs, outputs, list(ordered_params), passes, report, runtime_source)
        reserved = sorted(set(extra_manifest or {}) & set(manifest))
        if reserved:
            raise ActsparseError(f"extra_manifest: {reserved[0]!r} is a reserved manifest key")
        manifest |= dict(extra_manifest or {})
        _write_json(content / artifact.MANIFEST_NAME, manifest)
        if as_tar:
            artifact.write_tar(content, staging / "artifact.tar")
            _replace(staging / "artifact.tar", path)
        else:
            _replace(content, path)
    finally:
        artifact.remove_tree(staging)
    return path


# ---------------------------------------------------------------- checks


def _target_with_machine(target: dict) -> dict:
    """The target summary plus `machine`: the CPU architecture the host code is compiled for."""
    if not isinstance(target, dict) or not isinstance(target.get("kind"), str):
        raise ActsparseError("target: expected a summary dict with at least 'kind'")
    target = dict(target)
    if not target.get("machine"):
        host = target.get("host")
        triple = target.get("mtriple") or (host.get("mtriple") if isinstance(host, dict) else None)
        # Without a triple, LLVM (and TVM's default host) compiles for the machine we run on.
        target["machine"] = artifact.machine_of_triple(triple) if triple else artifact.host_machine()
    return target


def _check_json(**fields) -> None:
    """Refuse metadata that is not plain JSON before the slow export starts."""
    for name, value in fields.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ActsparseError(f"{name}: must be plain JSON data ({exc})") from None


def _checked_params(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(params, Mapping):
        raise ActsparseError("params: expected an ordered mapping of name -> numpy array")
    checked = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise ActsparseError(f"params: name {name!r} is not a non-empty string")
        if not isinstance(value, np.ndarray):
            raise ActsparseError(f"params: {name!r} is a {type(value).__name__}, expected a numpy array")
        checked[name] = np.ascontiguousarray(value)
    return checked


def _check_destination(path: Path, as_tar: bool) -> None:
    """Refuse to replace anything that is not an artifact we could have written."""
    if as_tar and path.is_dir():
        raise ActsparseError(f"{path}: is a directory; cannot write a .tar there")
    if not as_tar and path.exists():
        if not path.is_dir() or path.is_symlink():
            raise ActsparseError(f"{path}: exists and is not a directory")
        if any(path.iterdir()) and not (path / artifact.MANIFEST_NAME).is_file():
            raise ActsparseError(f"{path}: exists and is not an actsparse artifact; refusing to replace it")


def _runtime_to_bundle(bundle_runtime: bool | str | os.PathLike, machine: str) -> Path | None:
    if bundle_runtime is False or bundle_runtime is None:
        return None
    if bundle_runtime is True:
        if artifact.normalize_machine(machine) != artifact.host_machine():
            raise ActsparseError(
                f"bundle_runtime=True bundles this machine's {artifact.host_machine()} runtime, but the target is "
                f"{machine}: pass the path of a {machine} libtvm_runtime.so (from that platform's apache-tvm wheel)"
            )
        source = installed_runtime_library()
        if source is None:
            raise ActsparseError("bundle_runtime=True: no installed apache-tvm with lib/libtvm_runtime.so found")
        return source
    source = Path(bundle_runtime)
    if not source.is_file():
        raise ActsparseError(f"bundle_runtime: {source}: no such file")
    return source


# ---------------------------------------------------------------- writing


def _export_library(executable, destination: Path, machine: str, cross_compiler: str | None, fcompile) -> None:
    if fcompile is None:
        fcompile = _default_fcompile(machine, cross_compiler)
    try:
        executable.export_library(str(destination), fcompile=fcompile)
    except Exception as exc:  # TVM wraps compiler failures in its own error types
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise ActsparseError(f"linking the compiled model failed: {reason}") from None


def _default_fcompile(machine: str, cross_compiler: str | None):
    """None (TVM's host compiler) unless a cross compiler is needed or named."""
    if cross_compiler is None and artifact.normalize_machine(machine) == artifact.host_machine():
        return None
    if cross_compiler is None and artifact.normalize_machine(machine) != "aarch64":
        raise ActsparseError(f"no default cross compiler for {machine}; pass lib_cross_compiler")
    from actsparse.codegen.cross import find_cross_compiler
    from tvm.support import cc

    # Raises with the install command (apt-get install g++-aarch64-linux-gnu) when missing.
    cross_compiler = find_cross_compiler(artifact.normalize_machine(machine), cross_compiler)

    return cc.cross_compiler(cross_compiler)


def _save_params(params: dict[str, np.ndarray], destination: Path) -> None:
    from safetensors.numpy import save_file

    try:
        save_file(params, str(destination))
        os.chmod(destination, 0o644)  # safetensors creates it 0600; the artifact is meant to be shared
    except Exception as exc:  # safetensors refuses e.g. object arrays
        raise ActsparseError(f"params: cannot be saved as safetensors ({exc})") from None


def _manifest(content: Path, target, inputs, outputs, param_names, passes, report, runtime_source) -> dict:
    import actsparse

    return {
        "format_version": artifact.FORMAT_VERSION,
        "actsparse_version": actsparse.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_on": {"machine": artifact.host_machine(), "system": platform.system()},
        "target": target,
        "library": artifact.LIBRARY_NAME,
        "runtime_library": artifact.BUNDLED_RUNTIME_NAME if runtime_source is not None else None,
        "inputs": inputs,
        "outputs": outputs,
        "params": {"file": artifact.PARAMS_NAME, "names": param_names},
        "passes": list(passes),
        "report": dict(report),
        "files": artifact.hash_files(content),
        "file_sizes": artifact.file_sizes(content),
    }


def _spec(spec: dict) -> dict:
    """A tensor spec with plain JSON types (shape dims may come as numpy or TVM integers)."""
    shape = [d if d is None or isinstance(d, str) else int(d) for d in spec["shape"]]
    try:
        dtype = str(np.dtype(spec["dtype"]))
    except TypeError:
        raise ActsparseError(f"{spec['name']!r}: dtype {spec['dtype']!r} is not a numpy dtype") from None
    return {"name": spec["name"], "shape": shape, "dtype": dtype}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _replace(new: Path, destination: Path) -> None:
    """Move the complete `new` into place; an old artifact is removed only after that."""
    if not destination.exists() or (new.is_file() and destination.is_file()):
        os.replace(new, destination)
        return
    old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    artifact.remove_tree(old)
    os.replace(destination, old)
    try:
        os.replace(new, destination)
    except BaseException:  # also Ctrl-C or SIGTERM between the two renames
        os.replace(old, destination)  # put the previous artifact back
        raise
    artifact.remove_tree(old)
