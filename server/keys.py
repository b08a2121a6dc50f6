"""Signing algorithms, the key family each one needs, and public/private key files.

The rule that prevents algorithm confusion lives here: every algorithm belongs
to exactly one key family, and a key is only ever used with an algorithm of its
own family (an HMAC secret never checks an RS256 token; an RSA public key is
never used as an HMAC secret; a P-256 key never checks an ES384 token). `none`
is not an algorithm here at all.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | (
    ed448.Ed448PublicKey
)
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | (
    ed448.Ed448PrivateKey
)


class Family(enum.Enum):
    HMAC = "hmac"
    RSA = "rsa"
    EC = "ec"
    OKP = "okp"  # Ed25519 / Ed448 (EdDSA)


#: Every algorithm a token may name, and its key family.
ALGORITHMS: dict[str, Family] = {
    "HS256": Family.HMAC, "HS384": Family.HMAC, "HS512": Family.HMAC,
    "RS256": Family.RSA, "RS384": Family.RSA, "RS512": Family.RSA,
    "PS256": Family.RSA, "PS384": Family.RSA, "PS512": Family.RSA,
    "ES256": Family.EC, "ES384": Family.EC, "ES512": Family.EC, "ES256K": Family.EC,
    "EdDSA": Family.OKP,
}

#: The one curve each ES algorithm is defined on (RFC 7518 3.4).
_CURVES: dict[str, str] = {
    "ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1", "ES256K": "secp256k1",
}


def parse_algorithms(names: list[str]) -> list[str]:
    """Validated algorithm names, in the case JWT headers use; ValueError names the bad one."""
    known = {name.lower(): name for name in ALGORITHMS}
    chosen: list[str] = []
    for name in names:
        if name.lower() == "none":
            raise ValueError("'none' (unsigned tokens) is never accepted")
        canonical = known.get(name.lower())
        if canonical is None:
            raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
        if canonical not in chosen:
            chosen.append(canonical)
    if not chosen:
        raise ValueError("list at least one algorithm (default HS256)")
    return chosen


def family_of(key: object) -> Family | None:
    """The family a key object belongs to (None for anything we cannot use)."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return Family.RSA
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return Family.EC
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey
                  | ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return Family.OKP
    return None


def key_fits(key: object, algorithm: str) -> bool:
    """Whether `key` may check (or make) a signature of `algorithm`: same family, and for
    ES* the algorithm's own curve."""
    family = ALGORITHMS.get(algorithm)
    if family is None or family is Family.HMAC or family_of(key) is not family:
        return False
    if family is Family.EC:
        assert isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey)
        return key.curve.name == _CURVES[algorithm]
    return True


def _text(value: str) -> str:
    """A setting that is either the value itself or `@path` to a file holding it."""
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return _unflattened(value)


_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_PEM_BREAKS = re.compile(r"(?:\\r|\\n|\s)+")


def _unflattened(value: str) -> str:
    """An inline PEM as the loaders take it, from the forms an environment variable gives
    it: line breaks written as the two characters `\\n` (Docker's --env-file and .env
    files hold one line per variable, and CI secrets are often pasted so), refused
    before with "not a PEM public key"; or the lines joined by spaces. A block with
    headers (an encrypted key's `Proc-Type:`) is left as it is."""

    def rewrapped(block: re.Match[str]) -> str:
        label, body = block.group(1), block.group(2)
        if ":" in body:
            return block.group(0)
        data = _PEM_BREAKS.sub("", body)
        lines = [data[at:at + 64] for at in range(0, len(data), 64)]
        return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"

    return _PEM_BLOCK.sub(rewrapped, value)


def _file_hint(value: str) -> str:
    """For a value that is no PEM: the file it names, when it was given without its `@`
    (`--key keys/k1.pem`); else where a key may come from. Never the value itself
    otherwise: it may be a pasted private key."""
    if not value.startswith("@") and "-----BEGIN" not in value:
        if Path(value).expanduser().is_file():
            return f": to read the file, write @{value}"
        return " (give the PEM text itself, or @path of a file holding it)"
    return ""


def load_public_key(value: str) -> PublicKey:
    """A PEM public key (or certificate), inline or `@path`; ValueError says what is wrong."""
    data = _text(value).strip().encode()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"not a PEM public key or certificate{_file_hint(value)}") from None
    if family_of(key) is None:
        raise ValueError("not an RSA, EC, Ed25519 or Ed448 public key")
    return key  # type: ignore[return-value]


def load_private_key(value: str) -> PrivateKey:
    """A PEM private key (unencrypted), inline or `@path`."""
    data = _text(value).strip().encode()
    try:
        key: object = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"not an unencrypted PEM private key{_file_hint(value)}") from None
    if family_of(key) is None:
        raise ValueError("not an RSA, EC, Ed25519 or Ed448 private key")
    return key  # type: ignore[return-value]


def usual_algorithm(key: PrivateKey | PublicKey | None) -> str:
    """HS256 without a key; else the algorithm such a key is usually used with."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        for algorithm, curve in _CURVES.items():
            if key.curve.name == curve:
                return algorithm
        return "ES256"
    if key is not None:
        return "EdDSA"
    return "HS256"


def generate(algorithm: str) -> PrivateKey:
    """A fresh private key for `algorithm` (RSA 2048 bits for RS*/PS*, Ed25519 for EdDSA)."""
    family = ALGORITHMS[algorithm]
    if family is Family.RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if family is Family.EC:
        curves: dict[str, ec.EllipticCurve] = {
            "ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1(),
            "ES256K": ec.SECP256K1(),
        }
        return ec.generate_private_key(curves[algorithm])
    if family is Family.OKP:
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"{algorithm} uses a shared secret, not a key pair")


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_jwk(key: PublicKey, kid: str, algorithm: str) -> dict[str, Any]:
    """The JWK of a public key, as a JWKS publishes it (`kid`, `alg`, `use: sig`)."""
    jwk: dict[str, Any]
    if isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
    return {**jwk, "kid": kid, "alg": algorithm, "use": "sig"}


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def read_jwks(path: Path) -> list[dict[str, Any]]:
    """The keys of the key set (JWKS) file at `path`, none when there is no file yet.

    ValueError names the file and what is wrong with it: read before anything is
    written, so a file that is not a key set never leaves a half-made key behind.
    A JSON object without "keys" (`{}` aside) is refused too: it may be a lone JWK,
    which writing a set over it would lose.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise ValueError(f"the key set {path} is not a JWKS (not text)") from None
    except OSError as exc:
        raise ValueError(f"cannot read the key set {path}: {exc.strerror}") from None
    if not text.strip():
        raise ValueError(f"the key set {path} is empty, not a JWKS ({{\"keys\": [...]}})")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the key set {path} is not JSON ({exc.msg}, line {exc.lineno})"
                         ) from None
    if not isinstance(document, dict):
        raise ValueError(f"the key set {path} holds {_JSON_KINDS.get(type(document))}, "
                         "not a JWKS object ({\"keys\": [...]})")
    keys = document.get("keys", [] if not document else None)
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ValueError(f"the key set {path} has no \"keys\" list of JWK objects")
    return keys


def _jwks_with(keys: list[dict[str, Any]], jwk: dict[str, Any]) -> dict[str, Any]:
    """The key set with `jwk` added (replacing a key of the same `kid`).

    Rotation is two steps: publish the new key beside the old one, sign with it, and
    drop the old key once the tokens it signed have expired.
    """
    return {"keys": [*(k for k in keys if k.get("kid") != jwk["kid"]), jwk]}


@dataclass(frozen=True)
class KeyFiles:
    private: Path
    public: Path
    jwks: Path
    keys_in_set: int


def make_key_files(folder: Path, kid: str, algorithm: str, jwks: Path) -> KeyFiles:
    """A new key pair as `<kid>.pem` (0600) and `<kid>.pub.pem`, its public JWK added to
    `jwks`. The key set is read first (ValueError if it is not one, see `read_jwks`);
    FileExistsError names a key file that exists: a key is never overwritten. On any
    failure nothing is left behind: no key file, no folder made for them, and the key
    set as it was (a retry with the same `kid` then works)."""
    keys = read_jwks(jwks)
    private_path, public_path = folder / f"{kid}.pem", folder / f"{kid}.pub.pem"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(path))
    key = generate(algorithm)
    document = _jwks_with(keys, public_jwk(key.public_key(), kid, algorithm))
    folders, files = _missing_folders(folder), []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_new(private_path, private_pem(key), 0o600)
        files.append(private_path)
        _write_new(public_path, public_pem(key.public_key()), 0o666)  # (less the umask)
        files.append(public_path)
        jwks.write_text(json.dumps(document, indent=2) + "\n")
    except BaseException:
        _remove(files, folders)
        raise
    return KeyFiles(private_path, public_path, jwks, len(document["keys"]))


def _missing_folders(folder: Path) -> list[Path]:
    """The folders `mkdir(parents=True)` would make for `folder`, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    return missing[::-1]


def _remove(files: list[Path], folders: list[Path]) -> None:
    """Undo a failed `make_key_files`: its files, then its folders, deepest first."""
    for path in files:
        path.unlink(missing_ok=True)
    for path in reversed(folders):
        with contextlib.suppress(OSError):  # (not empty: something else was put there)
            path.rmdir()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet (FileExistsError if it does, and then it is
    left as it is); a file this call made is removed again if writing it fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
