"""Artifact signatures (Ed25519): keygen, sign, and loads that refuse unsigned, wrongly signed or
tampered artifacts before any library is loaded when trusted keys are configured."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("cryptography")

import actsparse  # noqa: E402
from actsparse.frontend import zoo  # noqa: E402
from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.runtime import artifact  # noqa: E402
from actsparse.runtime import model as runtime_model  # noqa: E402
from actsparse.runtime.signing import TRUST_ENV_VAR, generate_keypair, sign_artifact  # noqa: E402

CLI = [sys.executable, "-m", "actsparse.cli"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("signing")
    onnx.save(zoo.swiglu_stack(layers=1, d=32, f=64), work / "ffn.onnx")
    art = actsparse.compile(str(work / "ffn.onnx"), output=work / "ffn.actsparse").path
    release = generate_keypair(work / "release")
    other = generate_keypair(work / "other")
    return work, art, release, other


@pytest.fixture()
def loads(monkeypatch):
    calls = []
    real = runtime_model._load_module
    monkeypatch.setattr(runtime_model, "_LOADED_LIBRARIES", {})
    monkeypatch.setattr(runtime_model, "_load_module", lambda library: calls.append(library) or real(library))
    monkeypatch.delenv(TRUST_ENV_VAR, raising=False)
    return calls


def _copy(art: Path, dest: Path) -> Path:
    return Path(shutil.copytree(art, dest))


def test_keygen_writes_a_private_key_only_its_owner_reads(built):
    work, _, (private, public), _ = built
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(ActsparseError, match="refusing to overwrite"):
        generate_keypair(work / "release")


def test_signed_artifact_loads_under_trust_and_unsigned_is_refused(built, tmp_path, loads):
    _, art, (private, public), (_, other_public) = built
    unsigned = _copy(art, tmp_path / "unsigned")
    with pytest.raises(ActsparseError, match="unsigned artifact refused"):
        actsparse.load(unsigned, trusted_keys=[public])
    assert loads == []
    actsparse.load(unsigned)  # without trust configured, checksums only (as before)
    signed = _copy(art, tmp_path / "signed")
    sign_artifact(signed, private)
    model = actsparse.load(signed, trusted_keys=[public])
    assert model.run(x=np.ones((1, 32), np.float32))["y"].shape == (1, 32)
    with pytest.raises(ActsparseError, match="not valid for any trusted key"):
        actsparse.load(signed, trusted_keys=[other_public])


def test_swapped_library_with_a_rewritten_manifest_is_refused(built, tmp_path, loads):
    """The attack a checksum cannot stop: model.so replaced and its sha256 updated in the manifest."""
    _, art, (private, public), _ = built
    root = _copy(art, tmp_path / "tampered")
    sign_artifact(root, private)
    (root / "model.so").write_bytes((root / "model.so").read_bytes() + b"\0")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["model.so"] = hashlib.sha256((root / "model.so").read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ActsparseError, match="not valid for any trusted key"):
        actsparse.load(root, trusted_keys=[public])
    assert loads == []


def test_signed_tar_and_environment_trust(built, tmp_path, loads, monkeypatch):
    _, art, (private, public), (_, other_public) = built
    tar = tmp_path / "model.tar"
    artifact.write_tar(art, tar)
    sign_artifact(tar, private)
    monkeypatch.setenv(TRUST_ENV_VAR, str(public))
    actsparse.load(tar)
    monkeypatch.setenv(TRUST_ENV_VAR, str(other_public))
    with pytest.raises(ActsparseError, match="not valid for any trusted key"):
        actsparse.load(tar)


def test_cli_keygen_sign_compile_and_trust(built, tmp_path):
    work, art, _, _ = built
    done = subprocess.run(CLI + ["keygen", "-o", str(tmp_path / "k")], capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "k.key").is_file(), done.stderr
    out = tmp_path / "m.actsparse"
    done = subprocess.run(CLI + ["compile", str(work / "ffn.onnx"), "-o", str(out), "--sign", str(tmp_path / "k.key")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and (out / "manifest.sig").is_file(), done.stderr
    done = subprocess.run(CLI + ["run", str(out), "--trust", str(tmp_path / "k.pub")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if k != TRUST_ENV_VAR}
    done = subprocess.run(CLI + ["run", str(art), "--trust", str(tmp_path / "k.pub")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 2 and "unsigned artifact refused" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run(CLI + ["compile", str(work / "ffn.onnx"), "-o", str(tmp_path / "n"), "--sign",
                                 str(tmp_path / "k.pub")], capture_output=True, text=True)
    assert done.returncode == 2 and "not a readable private key" in done.stderr and not (tmp_path / "n").exists()
