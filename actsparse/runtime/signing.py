"""Ed25519 signatures for artifacts: a checksum says a file is intact, a signature says who made it.

The manifest lists the sha256 of every file of the artifact, so signing the manifest's exact bytes
signs the whole artifact. The signature lives beside the manifest in `manifest.sig`:

    {"algorithm": "ed25519", "key_id": "<first 16 hex of sha256(public key)>", "signature": "<base64>"}

    actsparse keygen -o release            # release.key (private, mode 0600) + release.pub
    actsparse sign model.actsparse --key release.key      # or: actsparse compile ... --sign release.key
    actsparse.load("model.actsparse", trusted_keys=["release.pub"])   # refuses unsigned / other keys

With trusted keys configured (`load(..., trusted_keys=...)`, `--trust PUB`, or the environment
variable ACTSPARSE_TRUSTED_KEYS, a list of .pub paths separated by the path separator), an
artifact is refused before any of its code is loaded unless a trusted key signed its manifest.
Without them, unsigned artifacts load as before (checksums only). Uses the `cryptography`
package, imported only when signing or verifying.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from actsparse.errors import ActsparseError

from actsparse.runtime.artifact import SIGNATURE_NAME  # noqa: E402
TRUST_ENV_VAR = "ACTSPARSE_TRUSTED_KEYS"
_PRIVATE_SUFFIX, _PUBLIC_SUFFIX = ".key", ".pub"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ActsparseError("artifact signatures need the `cryptography` package (pip install cryptography)") from None
    return serialization, ed25519


def generate_keypair(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """Write PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub (raw Ed25519 key, PEM); refuse to
    overwrite either. Returns both paths."""
    serialization, ed25519 = _crypto()
    private_path, public_path = Path(f"{prefix}{_PRIVATE_SUFFIX}"), Path(f"{prefix}{_PUBLIC_SUFFIX}")
    for path in (private_path, public_path):
        if path.exists():
            raise ActsparseError(f"{path}: exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    public_path.write_bytes(public)
    return private_path, public_path


def load_private_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ActsparseError(f"{path}: not a readable private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ActsparseError(f"{path}: not an Ed25519 private key (make one with `actsparse keygen`)")
    return key


def load_public_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ActsparseError(f"{path}: not a readable public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ActsparseError(f"{path}: not an Ed25519 public key (make one with `actsparse keygen`)")
    return key


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signature_for(manifest_bytes: bytes, private_key) -> bytes:
    """The manifest.sig content for these manifest bytes."""
    signature = private_key.sign(manifest_bytes)
    entry = {"algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
             "signature": base64.b64encode(signature).decode()}
    return (json.dumps(entry, indent=1) + "\n").encode()


def trusted_keys_from(keys=None) -> list:
    """Public keys from `keys` (paths or key objects), else from $ACTSPARSE_TRUSTED_KEYS; [] if none."""
    if keys is None:
        configured = os.environ.get(TRUST_ENV_VAR, "")
        keys = [k for k in configured.split(os.pathsep) if k]
    elif isinstance(keys, (str, os.PathLike)):
        keys = [keys]
    return [k if hasattr(k, "verify") else load_public_key(k) for k in keys]


def trust_in_this_process(paths) -> None:
    """Every later load in this process, and in the processes it forks (the device server's
    sessions), must find a signature by one of the public keys at `paths`: they are read now (an
    unreadable or wrong-type key is one error before anything runs), then named in
    $ACTSPARSE_TRUSTED_KEYS."""
    trusted_keys_from(list(paths))
    os.environ[TRUST_ENV_VAR] = os.pathsep.join(str(Path(p).resolve()) for p in paths)


def verify_signature(manifest_bytes: bytes, signature_file: bytes | None, trusted: list, where: str) -> str:
    """The key id that signed `manifest_bytes`, or an ActsparseError (unsigned, malformed, not by
    a trusted key, or not matching)."""
    from cryptography.exceptions import InvalidSignature

    if signature_file is None:
        raise ActsparseError(f"{where}: unsigned artifact refused (trusted keys are configured; sign it with "
                             f"`actsparse sign`)")
    try:
        entry = json.loads(signature_file)
        algorithm, claimed, signature = entry["algorithm"], entry["key_id"], base64.b64decode(entry["signature"],
                                                                                            validate=True)
    except (ValueError, KeyError, TypeError):
        raise ActsparseError(f"{where}: {SIGNATURE_NAME} is malformed") from None
    if algorithm != "ed25519":
        raise ActsparseError(f"{where}: signature algorithm {algorithm!r} is not supported")
    for key in trusted:
        try:
            key.verify(signature, manifest_bytes)
            return key_id(key)
        except InvalidSignature:
            continue
    raise ActsparseError(f"{where}: the signature (key {str(claimed)[:16]}) is not valid for any trusted key; "
                         "the artifact was modified or signed by someone else")


def sign_artifact(path: str | os.PathLike, private_key_path: str | os.PathLike) -> str:
    """Sign the artifact at `path` (a directory or a .tar) in place; returns the key id.
    The artifact is verified first (checksums), so a damaged artifact is never signed."""
    import shutil
    import tempfile

    from actsparse.runtime import artifact

    key = load_private_key(private_key_path)
    path = Path(path)
    if path.is_dir():
        manifest = artifact.read_manifest(path)
        artifact.verify_files(path, manifest)
        _write_atomic(path / SIGNATURE_NAME, signature_for((path / artifact.MANIFEST_NAME).read_bytes(), key))
        return key_id(key.public_key())
    if not path.is_file():
        raise ActsparseError(f"{path}: no such artifact")
    work = Path(tempfile.mkdtemp(prefix=".sign-", dir=path.parent))
    try:
        root = work / "artifact"
        root.mkdir()
        artifact.safe_extract_tar(path, root)
        manifest = artifact.read_manifest(root)
        artifact.verify_files(root, manifest)
        (root / SIGNATURE_NAME).write_bytes(signature_for((root / artifact.MANIFEST_NAME).read_bytes(), key))
        artifact.write_tar(root, work / "signed.tar")
        os.replace(work / "signed.tar", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return key_id(key.public_key())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
