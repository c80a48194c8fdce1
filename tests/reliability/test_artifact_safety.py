"""Artifact safety beyond tests/runtime: what must never be loaded or executed.

tests/runtime/test_artifact.py already covers tar members with absolute paths, '..', symlinks,
hard links, character devices, fifos and duplicates, the total size limit, tampered files,
newer format versions and other architectures. This file adds: block devices and oversize
single members, header sizes checked before any allocation, the library never loaded when its
checksum fails (or when it changes after the check), malformed format versions, and a scan of
the package source for unsafe deserialization.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import tarfile
from pathlib import Path

import pytest

import actsparse
from actsparse.errors import ActsparseError
from actsparse.runtime import artifact, load
from actsparse.runtime import model as runtime_model

PACKAGE = Path(actsparse.__file__).parent


# ---------------------------------------------------------------- no unsafe deserialization in the package

UNSAFE = {
    # Code that uses pickle (imports, calls); prose that says "no pickle" is fine.
    "pickle": re.compile(r"\b(import|from)\s+(c?pickle|dill|joblib|shelve)\b|\b(c?pickle|dill|joblib|shelve)\.\w"),
    "torch.load": re.compile(r"torch\.load\b"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "eval(": re.compile(r"(?<![\w.])eval\s*\("),
    "exec(": re.compile(r"(?<![\w.])exec\s*\("),
    "yaml.load": re.compile(r"yaml\.(unsafe_)?load\s*\((?![^)]*SafeLoader)"),
    "marshal": re.compile(r"\bmarshal\.loads?\b"),
}


def unsafe_uses(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for name, pattern in UNSAFE.items():
                if pattern.search(code):
                    found.append(f"{path.relative_to(root.parent)}:{number}: {name}: {line.strip()}")
    return found


def test_package_source_has_no_unsafe_deserialization():
    assert unsafe_uses(PACKAGE) == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "bad.py").write_text(
        "import pickle\nx = torch.load(f)\nnp.load(p, allow_pickle=True)\ny = eval('1')\nexec(code)\n"
        "yaml.load(text)\nb = pickle.loads(data)\n# pickle in a comment is fine\nmodel.eval()\n"
        "yaml.safe_load(text)\ns = 'objects would need pickle'\n")
    names = [hit.split(": ")[1] for hit in unsafe_uses(package)]
    assert names == ["pickle", "torch.load", "allow_pickle=True", "eval(", "exec(", "yaml.load", "pickle"]


# ---------------------------------------------------------------- tar members

def _tar_with_member(artifact_dir: Path, path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for file in sorted(artifact_dir.iterdir()):
            archive.add(file, arcname=file.name)
        archive.addfile(info, io.BytesIO(data) if data else None)
    return path


def test_block_device_member_is_refused(artifact_dir, tmp_path):
    info = tarfile.TarInfo("disk")
    info.type = tarfile.BLKTYPE
    tar = _tar_with_member(artifact_dir, tmp_path / "dev.tar", info)
    with pytest.raises(ActsparseError, match=r"refusing special member 'disk'"):
        load(tar)


def test_member_claiming_a_huge_size_is_refused_before_extraction(artifact_dir, tmp_path, monkeypatch):
    """A header may claim any size; the claim is checked against the limit before reading."""
    blocks = b""
    for file in sorted(artifact_dir.iterdir()):  # written by hand: tarfile will not write a lying header
        data = file.read_bytes()
        info = tarfile.TarInfo(file.name)
        info.size = len(data) if file.name != "params.safetensors" else 1 << 40
        blocks += info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)
    tar = tmp_path / "huge.tar"
    tar.write_bytes(blocks + b"\0" * 1024)
    extracted = []
    monkeypatch.setattr(artifact, "_extract_member", lambda *a: extracted.append(a))
    with pytest.raises(ActsparseError, match=r"exceed the size limit|not a readable tar archive \(unexpected end"):
        load(tar)
    assert extracted == []


# ---------------------------------------------------------------- the library is loaded only after its checksum

@pytest.fixture()
def loads(monkeypatch):
    """Record every shared library the runtime asks tvm_ffi to load (with an empty cache of
    loaded libraries, so that each test's load really loads)."""
    calls = []
    monkeypatch.setattr(runtime_model, "_LOADED_LIBRARIES", {})
    real = runtime_model._load_module
    monkeypatch.setattr(runtime_model, "_load_module", lambda library: calls.append(library) or real(library))
    return calls


def test_library_with_a_bad_checksum_is_never_loaded(artifact_dir, tmp_path, loads):
    root = Path(shutil.copytree(artifact_dir, tmp_path / "copy"))
    so = root / "model.so"
    so.write_bytes(so.read_bytes()[:-1] + bytes([so.read_bytes()[-1] ^ 0xFF]))
    with pytest.raises(ActsparseError, match=r"model.so does not match its sha256"):
        load(root)
    assert loads == []


def test_library_swapped_after_the_check_is_never_loaded(artifact_dir, tmp_path, loads, monkeypatch):
    root = Path(shutil.copytree(artifact_dir, tmp_path / "copy"))
    real_verify = artifact.verify_files

    def verify_then_swap(path, manifest, **options):  # an attacker racing the loader
        real_verify(path, manifest, **options)
        (path / "model.so").write_bytes(b"\x7fELF swapped")

    monkeypatch.setattr(artifact, "verify_files", verify_then_swap)
    with pytest.raises(ActsparseError, match=r"model.so changed while loading"):
        load(root)
    assert loads == []


def test_good_library_is_loaded_from_the_private_copy(artifact_dir, loads):
    load(artifact_dir)
    assert len(loads) == 1 and loads[0].parent.name == "lib" and artifact_dir not in loads[0].parents


# ---------------------------------------------------------------- params: sizes checked before allocation

def _rehash(root: Path) -> None:
    manifest = json.loads((root / artifact.MANIFEST_NAME).read_text())
    manifest["files"] = artifact.hash_files(root)
    (root / artifact.MANIFEST_NAME).write_text(json.dumps(manifest))


def test_params_header_claiming_more_than_the_file_is_refused(artifact_dir, tmp_path):
    """Even with a matching checksum (someone rewrote the manifest), a safetensors header whose
    shapes exceed the file is refused by safetensors' own checks, before any allocation."""
    root = Path(shutil.copytree(artifact_dir, tmp_path / "copy"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (root / "params.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    _rehash(root)
    with pytest.raises(ActsparseError, match=r"unreadable params"):
        load(root)


# ---------------------------------------------------------------- format versions

@pytest.mark.parametrize("version, message", [
    (2, r"format version 2 is newer than this runtime supports"),
    (10**9, r"is newer than this runtime supports"),
    (0, r"format_version 0 is not a positive integer"),
    (True, r"format_version True is not a positive integer"),
    ("1", r"format_version '1' is not a positive integer"),
    (1.0, r"format_version 1.0 is not a positive integer"),
    (None, r"format_version None is not a positive integer"),
])
def test_format_versions_other_than_known_integers_are_refused(artifact_dir, tmp_path, version, message):
    root = Path(shutil.copytree(artifact_dir, tmp_path / "copy"))
    manifest = json.loads((root / artifact.MANIFEST_NAME).read_text())
    manifest["format_version"] = version
    (root / artifact.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ActsparseError, match=message):
        load(root)


@pytest.mark.parametrize("value", [[], {}, 5])
def test_runtime_library_must_be_a_name_or_null(artifact_dir, tmp_path, value):
    root = Path(shutil.copytree(artifact_dir, tmp_path / "copy"))
    manifest = json.loads((root / artifact.MANIFEST_NAME).read_text())
    manifest["runtime_library"] = value
    (root / artifact.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ActsparseError, match=r"runtime_library must be a file name or null"):
        load(root)


def test_truncated_gzip_tar_is_a_clear_error(artifact_dir, tmp_path):
    import gzip

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for file in sorted(artifact_dir.iterdir()):
            archive.add(file, arcname=file.name)
    packed = gzip.compress(buffer.getvalue())
    for cut in (20, len(packed) // 2):  # (a cut in the gzip trailer alone leaves the tar whole)
        (tmp_path / "model.tar").write_bytes(packed[:cut])
        with pytest.raises(ActsparseError, match=r"not a readable tar archive|expected a directory or a .tar"):
            load(tmp_path / "model.tar")
