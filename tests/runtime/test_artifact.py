"""Artifact writing and the checks `load` makes before it runs anything."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

import actsparse
from actsparse.errors import ActsparseError
from actsparse.runtime import artifact, load
from tests.runtime.conftest import INPUTS, OUTPUTS, reference, rewrite_manifest

# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_round_trip_matches_numpy(form, artifact_dir, artifact_tar, params, inputs):
    model = load(artifact_dir if form == "dir" else artifact_tar)
    got = model.run(inputs)
    want = reference(inputs["x"], inputs["scale"], params)
    assert set(got) == {"y", "z"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        assert got[name].dtype == np.float32


def test_manifest_describes_the_model(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert manifest["format_version"] == artifact.FORMAT_VERSION == 1
    assert manifest["actsparse_version"] == actsparse.__version__
    assert manifest["inputs"] == INPUTS and manifest["outputs"] == OUTPUTS
    assert manifest["params"] == {"file": "params.safetensors", "names": ["w", "b"]}
    assert manifest["target"] == {"kind": "llvm", "machine": artifact.host_machine()}
    assert manifest["passes"] == [{"name": "relufy", "options": {}}]
    assert manifest["report"] == {"note": "test"}
    assert manifest["created"]
    assert set(manifest["files"]) == {"model.so", "params.safetensors"}
    for rel, digest in manifest["files"].items():
        assert artifact.sha256_file(artifact_dir / rel) == digest


def test_model_describes_itself(artifact_dir):
    model = load(artifact_dir)
    assert model.inputs == INPUTS and model.outputs == OUTPUTS
    assert model.target["kind"] == "llvm"
    assert model.manifest["params"]["names"] == ["w", "b"]
    model.manifest["inputs"].clear()  # a copy: the model is unaffected
    assert model.inputs == INPUTS


def test_tar_holds_the_same_files_as_the_directory(artifact_dir, artifact_tar):
    with tarfile.open(artifact_tar) as archive:
        names = sorted(m.name for m in archive.getmembers())
        assert all(m.uid == 0 and m.isreg() for m in archive.getmembers())
    assert names == ["manifest.json", "model.so", "params.safetensors"]


def test_tar_extraction_leaves_no_temp_directory(artifact_tar, tmp_path, monkeypatch, inputs):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = load(artifact_tar)
    assert list(tmp_path.iterdir()) == []  # removed before load returned
    model.run(inputs)  # the loaded code and weights live in memory


def test_lazy_top_level_load(artifact_dir):
    assert isinstance(actsparse.load(artifact_dir), actsparse.runtime.CompiledModel)


# ---------------------------------------------------------------- refused artifacts


def test_tampered_file_is_refused(artifact_copy):
    with open(artifact_copy / "params.safetensors", "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(ActsparseError, match=r"params.safetensors does not match its sha256"):
        load(artifact_copy)


def test_tampered_library_is_refused_before_loading(artifact_copy):
    (artifact_copy / "model.so").write_bytes(b"not a shared library")
    with pytest.raises(ActsparseError, match=r"model.so does not match its sha256"):
        load(artifact_copy)


def test_missing_file_is_refused(artifact_copy):
    (artifact_copy / "model.so").unlink()
    with pytest.raises(ActsparseError, match=r"model.so listed in the manifest is missing"):
        load(artifact_copy)


def test_extra_file_is_refused(artifact_copy):
    (artifact_copy / "notes.txt").write_text("hello")
    with pytest.raises(ActsparseError, match=r"unexpected file notes.txt"):
        load(artifact_copy)


def test_symlinked_file_is_refused(artifact_copy, tmp_path):
    real = tmp_path / "real.safetensors"
    (artifact_copy / "params.safetensors").rename(real)
    (artifact_copy / "params.safetensors").symlink_to(real)
    with pytest.raises(ActsparseError, match=r"params.safetensors is not a regular file"):
        load(artifact_copy)


def test_newer_format_is_refused(artifact_copy):
    rewrite_manifest(artifact_copy, lambda m: m.update(format_version=2))
    with pytest.raises(ActsparseError, match=r"format version 2 is newer than this runtime supports \(1\)"):
        load(artifact_copy)


def test_other_architecture_is_refused(artifact_copy):
    other = "aarch64" if artifact.host_machine() != "aarch64" else "x86_64"
    rewrite_manifest(artifact_copy, lambda m: m["target"].update(machine=other, mtriple=f"{other}-linux-gnu"))
    with pytest.raises(ActsparseError, match=rf"compiled for {other} .* but this machine is {artifact.host_machine()}"):
        load(artifact_copy)


def test_gpu_target_and_device_are_refused(artifact_copy, artifact_dir):
    with pytest.raises(ActsparseError, match=r"compiled for 'llvm' \(a CPU\); recompile with --target cuda"):
        load(artifact_dir, device="cuda")
    rewrite_manifest(artifact_copy, lambda m: m["target"].update(kind="cuda"))
    with pytest.raises(ActsparseError, match=r"artifact targets 'cuda'"):
        load(artifact_copy)


def test_params_disagreeing_with_manifest_are_refused(artifact_copy):
    rewrite_manifest(artifact_copy, lambda m: m["params"].update(names=["w", "bias"]))
    with pytest.raises(ActsparseError, match=r"params file and manifest disagree on 'b'"):
        load(artifact_copy)


def test_manifest_naming_outside_files_is_refused(artifact_copy):
    def change(manifest):
        manifest["files"]["../outside"] = "0" * 64

    path = artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ActsparseError, match=r"refusing path '../outside'"):
        load(artifact_copy)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", r"unreadable manifest"),
        (b"[]", r"not a JSON object"),
        (b'{"format_version": 1}', r"target missing"),
    ],
)
def test_broken_manifest_is_refused(artifact_copy, content, message):
    (artifact_copy / "manifest.json").write_bytes(content)
    with pytest.raises(ActsparseError, match=message):
        load(artifact_copy)


def test_not_an_artifact_is_refused(tmp_path):
    with pytest.raises(ActsparseError, match=r"no such artifact"):
        load(tmp_path / "missing")
    with pytest.raises(ActsparseError, match=r"not an actsparse artifact"):
        load(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ActsparseError, match=r"expected a directory or a .tar"):
        load(tmp_path / "model.onnx")


# ---------------------------------------------------------------- hostile tar files


def _tar_with(path: Path, source: Path, extra: list[tarfile.TarInfo], *, skip: tuple[str, ...] = ()) -> Path:
    """A tar of the artifact at `source` plus hand-made members."""
    with tarfile.open(path, "w") as archive:
        for file in sorted(source.iterdir()):
            if file.name not in skip:
                archive.add(file, arcname=file.name)
        for info in extra:
            data = b"x" * info.size if info.isreg() else None
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind=tarfile.REGTYPE, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    return info


@pytest.mark.parametrize(
    "member, message",
    [
        (_member("/tmp/evil", size=1), r"refusing absolute path '/tmp/evil'"),
        (_member("../evil", size=1), r"refusing path '../evil'"),
        (_member("lib/../../evil", size=1), r"refusing path 'lib/../../evil'"),
        (_member("evil", tarfile.SYMTYPE, linkname="/etc/passwd"), r"refusing link member 'evil'"),
        (_member("evil", tarfile.LNKTYPE, linkname="model.so"), r"refusing link member 'evil'"),
        (_member("evil", tarfile.CHRTYPE), r"refusing special member 'evil'"),
        (_member("evil", tarfile.FIFOTYPE), r"refusing special member 'evil'"),
        (_member("model.so", size=3), r"duplicate member 'model.so'"),
        (_member("evil.txt", size=3), r"unexpected file evil.txt"),
    ],
)
def test_hostile_tar_members_are_refused(member, message, artifact_dir, tmp_path):
    tar = _tar_with(tmp_path / "hostile.tar", artifact_dir, [member])
    with pytest.raises(ActsparseError, match=message):
        load(tar)
    assert [p.name for p in tmp_path.iterdir()] == ["hostile.tar"]  # nothing landed beside it


def test_tar_missing_a_file_is_refused(artifact_dir, tmp_path):
    tar = _tar_with(tmp_path / "short.tar", artifact_dir, [], skip=("params.safetensors",))
    with pytest.raises(ActsparseError, match=r"params.safetensors listed in the manifest is missing"):
        load(tar)


def test_oversize_tar_is_refused_before_extracting(artifact_tar, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_MAX_ARTIFACT_BYTES", "1000")
    with pytest.raises(ActsparseError, match=r"exceed the size limit of 1000 bytes"):
        load(artifact_tar)


def _tar_with_model_so(artifact_dir, tmp_path, change):
    """A tar of the artifact whose model.so bytes went through `change`, manifest untouched."""
    source = tmp_path / "src"
    source.mkdir()
    for file in artifact_dir.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    (source / "model.so").write_bytes(change((source / "model.so").read_bytes()))
    return _tar_with(tmp_path / "tampered.tar", source, [])


def test_tampered_tar_is_refused(artifact_dir, tmp_path):
    tar = _tar_with_model_so(artifact_dir, tmp_path, lambda data: data + b"\0")
    # The manifest's file_sizes refuse it from the tar header, before a byte is extracted.
    with pytest.raises(ActsparseError, match=r"model.so declares \d+ bytes, the manifest \d+"):
        load(tar)


def test_same_size_tampering_in_a_tar_is_refused_when_that_member_ends(artifact_dir, tmp_path):
    """Hashed while extracted, smallest first: the bad member is refused before the big ones are written."""
    tar = _tar_with_model_so(artifact_dir, tmp_path, lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ActsparseError, match=r"model.so does not match its sha256"):
        load(tar)


# ---------------------------------------------------------------- writer


def test_writer_replaces_an_existing_artifact(write, tmp_path, inputs):
    target = write(tmp_path / "model", report={"run": 1})
    write(target, report={"run": 2})
    assert json.loads((target / "manifest.json").read_text())["report"] == {"run": 2}
    load(target).run(inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old copies left


def test_writer_replaces_an_existing_tar(write, tmp_path):
    target = write(tmp_path / "model.tar", report={"run": 1})
    write(target, report={"run": 2})
    assert load(target).manifest["report"] == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tar"]


def test_writer_refuses_to_replace_other_directories(write, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ActsparseError, match=r"not an actsparse artifact; refusing to replace it"):
        write(precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    with pytest.raises(ActsparseError, match=r"is a directory; cannot write a .tar"):
        write(precious, as_tar=True)


def test_writer_refuses_non_json_metadata_and_leaves_nothing(write, tmp_path):
    with pytest.raises(ActsparseError, match=r"report: must be plain JSON data"):
        write(tmp_path / "model", report={"array": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_specs_and_params(write, tmp_path, params):
    with pytest.raises(ActsparseError, match=r"inputs: duplicate name 'x'"):
        write(tmp_path / "a", inputs=[INPUTS[0], INPUTS[0]])
    with pytest.raises(ActsparseError, match=r"params: 'w' is a list, expected a numpy array"):
        write(tmp_path / "b", params={"w": [[1.0]], "b": params["b"]})
    with pytest.raises(ActsparseError, match=r"dtype 'floaty7' is not a numpy dtype"):
        write(tmp_path / "c", outputs=[{**OUTPUTS[0], "dtype": "floaty7"}])
    assert list(tmp_path.iterdir()) == []


def test_writer_as_tar_option_overrides_suffix(write, tmp_path, inputs):
    target = write(tmp_path / "packed.bin", as_tar=True)
    assert tarfile.is_tarfile(target)
    load(target).run(inputs)


def test_writer_records_cross_target_machine(write, tmp_path):
    with pytest.raises(ActsparseError, match=r"bundle_runtime=True bundles this machine's"):
        write(tmp_path / "arm", target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, bundle_runtime=True)


def test_writer_needs_a_cross_compiler_for_another_machine(write, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compilers at all
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
    with pytest.raises(ActsparseError, match=r"cross compiler 'aarch64-linux-gnu-g\+\+' for aarch64 not found on PATH"):
        write(tmp_path / "arm", target=arm, lib_cross_compiler="aarch64-linux-gnu-g++")
    if artifact.host_machine() != "aarch64":  # the default: the message says how to install it
        with pytest.raises(ActsparseError, match=r"not found on PATH: install it with `apt-get install g\+\+-aarch64"):
            write(tmp_path / "arm", target=arm)
    assert list(tmp_path.iterdir()) == []
