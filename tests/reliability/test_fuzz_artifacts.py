"""Bad artifacts and bad inputs fed to `actsparse run`: mutated manifests, tampered files,
hostile tar members, corrupt tar bytes, and .npz inputs of the wrong names, types and shapes.

The artifact is the runtime tests' small Relax model (x [2, 8], scale [4] -> y, z).
A tampered `model.so` is only ever refused by its checksum here: a manifest rewritten to
match a corrupt library is outside what checksums can catch (see docs/safety.md).
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import shutil
import tarfile

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from actsparse.runtime import artifact
from tests.reliability.harness import fuzz_settings, run_cli
from tests.reliability.mutations import apply_bytes, byte_mutation

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["float32", "int64", "object", "V8", "model.so", "params.safetensors", "../x", "/etc/passwd",
                       "llvm", "cuda", "x86_64", "aarch64", "0" * 64, "lib/libtvm_runtime.so"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)


def _paths(value, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, prefix + (index,))


def _edit(manifest: dict, path: tuple, action: str, new):
    if not path:
        return new
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return manifest


@fuzz_settings(250)
@given(data=st.data(), edits=st.integers(1, 3), to_file=st.booleans())
def test_mutated_manifests(artifact_dir, cases, data, edits, to_file):
    manifest = json.loads((artifact_dir / artifact.MANIFEST_NAME).read_text())
    for _ in range(edits):
        paths = list(_paths(manifest)) if isinstance(manifest, (dict, list)) else [()]
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["replace", "delete"]) if path else st.just("replace"), label="action")
        manifest = _edit(copy.deepcopy(manifest), path, action, data.draw(json_values, label="value"))
    with cases.new() as folder:
        root = shutil.copytree(artifact_dir, folder / "model")
        (root / artifact.MANIFEST_NAME).write_text(json.dumps(manifest))
        argv = ["run", root] + (["-o", folder / "out.npz"] if to_file else [])
        run_cli(argv, folder, category="run: mutated manifest", outputs=("out.npz",))


spec_values = st.sampled_from([[2**40, 8], [2**20, 2**20], [-1], ["n", 8], [], [2, 8, 1], [0, 8], None, "x"]) | \
    st.sampled_from(["float32", "float64", "object", "V8", "U3", "M8[s]", "bool", "complex64", "int4", "", 7])


@fuzz_settings(100)
@given(which=st.sampled_from(["inputs", "outputs"]), index=st.integers(0, 1),
       field=st.sampled_from(["shape", "dtype", "name"]), value=spec_values)
def test_mutated_tensor_specs(artifact_dir, cases, which, index, field, value):
    manifest = json.loads((artifact_dir / artifact.MANIFEST_NAME).read_text())
    manifest[which][index][field] = value
    with cases.new() as folder:
        root = shutil.copytree(artifact_dir, folder / "model")
        (root / artifact.MANIFEST_NAME).write_text(json.dumps(manifest))
        run_cli(["run", root], folder, category="run: mutated tensor specs")


@fuzz_settings(150)
@given(member=st.sampled_from(["model.so", "params.safetensors", "manifest.json"]), mutation=byte_mutation(),
       rehash=st.booleans())
def test_tampered_files(artifact_dir, cases, member, mutation, rehash):
    with cases.new() as folder:
        root = shutil.copytree(artifact_dir, folder / "model")
        target = root / member
        target.write_bytes(apply_bytes(target.read_bytes(), mutation))
        if rehash and member == "params.safetensors":  # a consistent manifest over corrupt weights
            manifest = json.loads((root / artifact.MANIFEST_NAME).read_text())
            manifest["files"][member] = artifact.sha256_file(target)
            (root / artifact.MANIFEST_NAME).write_text(json.dumps(manifest))
        run_cli(["run", root], folder, category="run: tampered files")


TAR_TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
             tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE]
member_names = st.sampled_from(["manifest.json", "model.so", "params.safetensors", "lib/libtvm_runtime.so", "lib",
                                "../evil", "/tmp/evil", "a/../../evil", "./model.so", ".", "", "a\\b", "x" * 200,
                                "lib/", "C:evil"]) | st.text(min_size=1, max_size=12)
hostile_member = st.tuples(member_names, st.sampled_from(TAR_TYPES), st.integers(0, 64),
                           st.sampled_from(["", "model.so", "/etc/passwd", "../x"]))


def _artifact_tar_bytes(artifact_dir, extra, skip, compress) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for file in sorted(artifact_dir.iterdir()):
            if file.name not in skip:
                archive.add(file, arcname=file.name)
        for name, kind, size, linkname in extra:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, linkname
            info.size = size if kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


@fuzz_settings(200)
@given(extra=st.lists(hostile_member, max_size=3), skip=st.sets(st.sampled_from(["model.so", "manifest.json"])),
       compress=st.booleans(), mutation=st.none() | byte_mutation())
def test_hostile_tars(artifact_dir, cases, extra, skip, compress, mutation):
    with cases.new() as folder:
        data = _artifact_tar_bytes(artifact_dir, extra, skip, compress)
        (folder / "model.tar").write_bytes(apply_bytes(data, mutation) if mutation else data)
        run_cli(["run", folder / "model.tar"], folder, category="run: hostile tar")
        assert not (folder.parent / "evil").exists()


dtypes = st.sampled_from(["float32", "float64", "float16", "int64", "int8", "bool", "complex64", "U3", "V4", "M8[s]"])
shapes = st.lists(st.integers(0, 9), max_size=3).map(tuple)


@fuzz_settings(150)
@given(arrays=st.dictionaries(st.sampled_from(["x", "scale", "y", "X", ""]) | st.text(max_size=4),
                              st.tuples(dtypes, shapes, st.sampled_from([0.0, np.nan, np.inf, 1e30])), max_size=3),
       mutation=st.none() | byte_mutation())
def test_bad_input_files(artifact_tar, cases, arrays, mutation):
    with cases.new() as folder:
        inputs = folder / "inputs.npz"
        with open(inputs, "wb") as handle:
            np.savez(handle, **{name: np.full(shape, fill).astype(dtype) if np.dtype(dtype).kind in "fc"
                                else np.zeros(shape, dtype) for name, (dtype, shape, fill) in arrays.items()})
        if mutation is not None:
            inputs.write_bytes(apply_bytes(inputs.read_bytes(), mutation))
        run_cli(["run", artifact_tar, "--inputs", inputs, "-o", folder / "out.npz"], folder,
                category="run: bad inputs", outputs=("out.npz",))
