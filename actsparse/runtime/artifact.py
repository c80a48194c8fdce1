"""The artifact format: manifest schema, checksums, safe `.tar` extraction, machine checks.

An artifact is a directory (or an uncompressed/gzipped `.tar` of that directory's
contents) holding:

    manifest.json        format version, target, inputs/outputs, params, passes, report,
                         and the sha256 of every other file
    model.so             the TVM Relax executable (`executable.export_library`)
    params.safetensors   the weights, passed to `main` after the inputs, in manifest order
    lib/libtvm_runtime.so  optional: the TVM runtime, bundled for devices without apache-tvm

This module uses only the standard library: the writer (`actsparse.codegen.package`)
and the device-side loader share it.

The checksums catch corruption and accidental edits. They are not a signature: whoever
can rewrite the files can rewrite the manifest too, so load artifacts from places only
trusted users can write.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import platform
import posixpath
import shutil
import tarfile
import zlib
from pathlib import Path

from actsparse.errors import ActsparseError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"  # optional Ed25519 signature of the manifest (runtime/signing.py)
LIBRARY_NAME = "model.so"
PARAMS_NAME = "params.safetensors"
BUNDLED_RUNTIME_NAME = "lib/libtvm_runtime.so"

# A .tar larger than this (sum of its members) is refused before anything is extracted.
# Override with the environment variable ACTSPARSE_MAX_ARTIFACT_BYTES.
DEFAULT_MAX_ARTIFACT_BYTES = 64 << 30

_HASH_CHUNK = 1 << 20

# platform.machine() and LLVM triples spell the same machine in several ways.
_MACHINE_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "aarch64_be": "aarch64_be",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "riscv64": "riscv64",
}


# ---------------------------------------------------------------- machines


def normalize_machine(name: str) -> str:
    """Canonical CPU architecture name: 'amd64' -> 'x86_64', 'arm64' -> 'aarch64', 'armv7l' -> 'arm'."""
    name = name.strip().lower()
    if name in _MACHINE_ALIASES:
        return _MACHINE_ALIASES[name]
    if name.startswith("arm") or name.startswith("thumb"):
        return "arm"
    return name


def host_machine() -> str:
    """The architecture of the machine running this Python."""
    return normalize_machine(platform.machine())


def machine_of_triple(triple: str) -> str:
    """The architecture named by an LLVM triple: 'aarch64-linux-gnu' -> 'aarch64'."""
    return normalize_machine(triple.split("-", 1)[0])


def check_machine(target: dict) -> None:
    """Refuse an artifact compiled for another CPU architecture than this machine's."""
    wanted = target.get("machine")
    if not isinstance(wanted, str) or not wanted:
        raise ActsparseError("invalid manifest: target.machine is missing")
    here = host_machine()
    if normalize_machine(wanted) != here:
        raise ActsparseError(
            f"artifact was compiled for {wanted} (target {target.get('kind', '?')}), "
            f"but this machine is {here}; compile it for this machine's target"
        )


# ---------------------------------------------------------------- checksums


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path) -> dict[str, str]:
    """{posix relative path: sha256} of every regular file under `root` except the manifest."""
    return {rel: sha256_file(root / rel) for rel in hash_files_names(root)}


def file_sizes(root: Path) -> dict[str, int]:
    """{posix relative path: bytes} of the files `hash_files` lists: a `.tar` member whose declared
    size differs is refused before it is read."""
    return {rel: (root / rel).stat().st_size for rel in hash_files_names(root)}


def hash_files_names(root: Path) -> list[str]:
    """The files a manifest lists: everything under `root` but the manifest and its signature."""
    return [rel for rel in sorted(_list_files(root)) if rel not in (MANIFEST_NAME, SIGNATURE_NAME)]


def _list_files(root: Path) -> list[str]:
    """Relative posix paths of every non-directory entry under `root` (symlinks included)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            found.append(Path(folder, name).relative_to(root).as_posix())
    return found


def verify_files(root: Path, manifest: dict, *, deferred: tuple[str, ...] = ()) -> None:
    """Check that `root` holds exactly the manifest's files, as regular files, with matching sha256.

    The sha256 of the `deferred` files is left to the caller, which checks it while reading them
    (the weights: one pass over a GB-sized file instead of two)."""
    expected = manifest["files"]
    present = set(_list_files(root)) - {MANIFEST_NAME, SIGNATURE_NAME}
    missing = sorted(set(expected) - present)
    if missing:
        raise ActsparseError(f"artifact {root}: file {missing[0]} listed in the manifest is missing")
    extra = sorted(present - set(expected))
    if extra:
        raise ActsparseError(f"artifact {root}: unexpected file {extra[0]} not listed in the manifest")
    for rel, digest in expected.items():
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise ActsparseError(f"artifact {root}: {rel} is not a regular file")
        if rel not in deferred and sha256_file(path) != digest:
            raise ActsparseError(
                f"artifact {root}: {rel} does not match its sha256 in the manifest (modified or corrupt)"
            )


# ---------------------------------------------------------------- manifest


def read_manifest(root: Path, *, trusted_keys: list | None = None) -> dict:
    """Parse and validate `root/manifest.json`. With `trusted_keys` (public keys), the manifest's
    exact bytes must carry a valid signature by one of them (runtime/signing.py), checked on the
    same bytes that are then parsed."""
    path = root / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        raise ActsparseError(f"{root}: not an actsparse artifact (no {MANIFEST_NAME})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ActsparseError(f"{path}: unreadable manifest ({exc})") from None
    if trusted_keys:
        from actsparse.runtime.signing import SIGNATURE_NAME, verify_signature

        signature = root / SIGNATURE_NAME
        signed = signature.read_bytes() if signature.is_file() and not signature.is_symlink() else None
        verify_signature(data, signed, trusted_keys, str(root))
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ActsparseError(f"{path}: unreadable manifest ({exc})") from None
    validate_manifest(manifest)
    return manifest


def validate_manifest(manifest: object) -> None:
    """Raise ActsparseError naming the first problem with the manifest's structure."""
    if not isinstance(manifest, dict):
        raise ActsparseError("invalid manifest: not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ActsparseError(f"invalid manifest: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ActsparseError(
            f"artifact format version {version} is newer than this runtime supports "
            f"({FORMAT_VERSION}); upgrade actsparse on this machine"
        )
    for key, kind in (("target", dict), ("inputs", list), ("outputs", list), ("params", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ActsparseError(f"invalid manifest: {key} missing or not a {kind.__name__}")
    validate_tensor_specs(manifest["inputs"], "inputs")
    validate_tensor_specs(manifest["outputs"], "outputs")
    params = manifest["params"]
    names = params.get("names")
    if not isinstance(params.get("file"), str) or not isinstance(names, list):
        raise ActsparseError("invalid manifest: params needs 'file' and a list of 'names'")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ActsparseError("invalid manifest: params.names must be distinct strings")
    if not isinstance(manifest.get("library"), str):
        raise ActsparseError("invalid manifest: library missing")
    if not isinstance(manifest.get("runtime_library"), (str, type(None))):
        raise ActsparseError("invalid manifest: runtime_library must be a file name or null")
    for rel, digest in manifest["files"].items():
        check_member_name(rel)
        if not isinstance(digest, str) or len(digest) != 64:
            raise ActsparseError(f"invalid manifest: bad sha256 for {rel}")
    sizes = manifest.get("file_sizes", {})  # optional: artifacts written before it have none
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in sizes.values()):
        raise ActsparseError("invalid manifest: file_sizes must map file names to byte counts")
    for rel in (manifest["library"], params["file"], manifest.get("runtime_library")):
        if rel is not None and rel not in manifest["files"]:
            raise ActsparseError(f"invalid manifest: {rel} is not listed in files")


def validate_tensor_specs(specs: object, what: str) -> None:
    """Each spec is {name: str, shape: [int | str | None, ...], dtype: str}; names are distinct."""
    if not isinstance(specs, list):
        raise ActsparseError(f"{what}: expected a list of {{name, shape, dtype}}")
    seen = set()
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ActsparseError(f"{what}: each entry needs a non-empty 'name' ({spec!r})")
        name = spec["name"]
        if name in seen:
            raise ActsparseError(f"{what}: duplicate name {name!r}")
        seen.add(name)
        shape = spec.get("shape")
        if not isinstance(shape, (list, tuple)) or not all(_is_dim(d) for d in shape):
            raise ActsparseError(f"{what}: {name!r} shape must be a list of sizes (int >= 0, or a name for a free dim)")
        if not isinstance(spec.get("dtype"), str) or not spec["dtype"]:
            raise ActsparseError(f"{what}: {name!r} needs a dtype string")


def _is_dim(dim: object) -> bool:
    if isinstance(dim, bool):
        return False
    return (isinstance(dim, int) and dim >= 0) or isinstance(dim, str) or dim is None


# ---------------------------------------------------------------- tar


def check_member_name(name: str) -> str:
    """Refuse absolute paths, '..' and other names that could land outside the artifact."""
    if not isinstance(name, str) or not name:
        raise ActsparseError(f"artifact: empty or invalid member name {name!r}")
    if "\\" in name or "\x00" in name:
        raise ActsparseError(f"artifact: refusing member name with a backslash or NUL: {name!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ActsparseError(f"artifact: refusing absolute path {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ActsparseError(f"artifact: refusing path {name!r} (contains '..' or is empty)")
    return posixpath.join(*parts)


def max_artifact_bytes() -> int:
    """The largest total size of a `.tar` artifact that will be extracted."""
    value = os.environ.get("ACTSPARSE_MAX_ARTIFACT_BYTES")
    if value is None:
        return DEFAULT_MAX_ARTIFACT_BYTES
    try:
        return int(value)
    except ValueError:
        raise ActsparseError(f"ACTSPARSE_MAX_ARTIFACT_BYTES={value!r} is not an integer") from None


def safe_extract_tar(tar_path: Path, dest: Path, *, max_bytes: int | None = None) -> None:
    """Extract an artifact `.tar` into the empty private directory `dest`.

    Every member is checked before anything is written: only regular files and
    directories, no absolute paths or '..', no duplicates, sizes within `max_bytes`,
    and exactly the files the manifest lists. Contents are copied with a bounded read.
    """
    limit = max_artifact_bytes() if max_bytes is None else max_bytes
    try:
        with tarfile.open(tar_path, "r:*") as archive:
            members = _checked_members(archive, tar_path, limit)
            manifest = _check_tar_against_manifest(archive, members, tar_path)
            # Small members first, each hashed as it is written: a tampered member is refused when
            # its own bytes end, not after every other (possibly GB-sized) member was written.
            for name, member in sorted(members.items(), key=lambda item: item[1].size):
                _extract_member(archive, member, dest / name, manifest["files"].get(name))
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        # A corrupt or truncated compressed tar fails inside gzip/bz2/lzma, not tarfile.
        raise ActsparseError(f"{tar_path}: not a readable tar archive ({exc})") from None


def _checked_members(archive: tarfile.TarFile, tar_path: Path, limit: int) -> dict[str, tarfile.TarInfo]:
    """{normalized name: member} for the archive's members, refusing anything unsafe."""
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    for member in archive.getmembers():
        if member.name in (".", "./"):
            continue
        name = check_member_name(member.name)
        if member.issym() or member.islnk():
            raise ActsparseError(f"{tar_path}: refusing link member {member.name!r}")
        if not (member.isreg() or member.isdir()):
            raise ActsparseError(f"{tar_path}: refusing special member {member.name!r} (device, fifo or other)")
        if name in members:
            raise ActsparseError(f"{tar_path}: duplicate member {member.name!r}")
        total += member.size
        if member.size > limit or total > limit:
            raise ActsparseError(
                f"{tar_path}: members exceed the size limit of {limit} bytes "
                f"(set ACTSPARSE_MAX_ARTIFACT_BYTES to allow larger artifacts)"
            )
        members[name] = member
    return members


def _check_tar_against_manifest(archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo], tar_path: Path) -> None:
    """Before extracting the large files, check the file list against the manifest."""
    manifest_member = members.get(MANIFEST_NAME)
    if manifest_member is None or not manifest_member.isreg():
        raise ActsparseError(f"{tar_path}: not an actsparse artifact (no {MANIFEST_NAME})")
    raw = archive.extractfile(manifest_member).read(manifest_member.size)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ActsparseError(f"{tar_path}: unreadable manifest ({exc})") from None
    validate_manifest(manifest)
    files = {name for name, m in members.items() if m.isreg()} - {MANIFEST_NAME, SIGNATURE_NAME}
    missing = sorted(set(manifest["files"]) - files)
    if missing:
        raise ActsparseError(f"{tar_path}: file {missing[0]} listed in the manifest is missing")
    extra = sorted(files - set(manifest["files"]))
    if extra:
        raise ActsparseError(f"{tar_path}: unexpected file {extra[0]} not listed in the manifest")
    for name, size in manifest.get("file_sizes", {}).items():
        if name in members and members[name].size != size:
            raise ActsparseError(f"{tar_path}: {name} declares {members[name].size} bytes, the manifest "
                                 f"{size} (modified or corrupt)")
    return manifest


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path,
                    sha256: str | None = None) -> None:
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = archive.extractfile(member)
    remaining = member.size
    digest = hashlib.sha256()
    # O_EXCL: never follow or reuse something already at that path.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        while remaining > 0:
            chunk = source.read(min(_HASH_CHUNK, remaining))
            if not chunk:
                raise ActsparseError(f"{target.name}: truncated in the archive")
            out.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        target.unlink()
        raise ActsparseError(f"artifact: {member.name} does not match its sha256 in the manifest (modified or corrupt)")


def write_tar(source_dir: Path, tar_path: Path) -> None:
    """Pack the files of `source_dir` (no links) into an uncompressed tar with neutral owners."""
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as archive:
        for rel in [MANIFEST_NAME] + sorted(set(_list_files(source_dir)) - {MANIFEST_NAME}):
            info = archive.gettarinfo(str(source_dir / rel), arcname=rel)
            if not info.isreg():
                raise ActsparseError(f"{source_dir / rel}: only regular files can go into an artifact")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if os.access(source_dir / rel, os.X_OK) else 0o644
            with open(source_dir / rel, "rb") as handle:
                archive.addfile(info, handle)


def remove_tree(path: Path) -> None:
    """Remove a directory this package created; a failure to clean up is not the user's error."""
    shutil.rmtree(path, ignore_errors=True)


def read_verified_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the artifact at `path` (directory or .tar), every file's sha256 checked,
    without loading its library: for artifacts built for another machine (deploy, remote bench)."""
    return read_verified_files(path)[0]


def read_verified_files(path: str | os.PathLike, names: tuple[str, ...] = ()) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {name: bytes}) of the artifact at `path`, every file's sha256 checked first;
    `names` the manifest lists that are absent from the result are not in the artifact."""
    import tempfile

    source = Path(path)
    if not source.exists():
        raise ActsparseError(f"{source}: no such artifact")
    if source.is_dir():
        return _verified_files(source, names)
    with tempfile.TemporaryDirectory(prefix="actsparse-manifest-") as work:
        safe_extract_tar(source, Path(work))
        return _verified_files(Path(work), names)


def _verified_files(root: Path, names: tuple[str, ...]) -> tuple[dict, dict[str, bytes]]:
    manifest = read_manifest(root)
    verify_files(root, manifest)
    listed = manifest.get("files", {})
    return manifest, {name: (root / name).read_bytes() for name in names if name in listed}
