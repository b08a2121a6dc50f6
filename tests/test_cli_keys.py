"""`dualcast keys` when something is in the way: one line, and nothing left behind.

The CLI runs as a real subprocess (`python -m dualcast keys ...`), as a user would run
it, in a folder of the test's own; what is asserted is its output and the files there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def keys(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    return subprocess.run([sys.executable, "-m", "dualcast", "keys", *args],
                          cwd=folder, env=env,
                          capture_output=True, text=True, timeout=60)


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b""
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("content", "wrong"), [
    ("", "is empty"),
    ("[]", "holds an array"),
    ('"keys"', "holds a string"),
    ('{"keys": ', "is not JSON"),
    ('{"kty": "EC", "crv": "P-256"}', 'no "keys" list'),  # a lone JWK: never written over
    ('{"keys": [1]}', 'no "keys" list'),
])
def test_a_key_set_that_is_not_one_is_refused_before_anything_is_written(
    tmp_path: Path, content: str, wrong: str,
) -> None:
    """It was a traceback (JSONDecodeError, AttributeError) that left k1.pem behind, so
    the retry said "k1.pem exists; choose another --kid"."""
    (tmp_path / "jwks.json").write_text(content)
    before = files_in(tmp_path)
    done = keys(tmp_path, "--alg", "ES256", "--kid", "k1", "--dir", ".")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "jwks.json" in lines[0] and wrong in lines[0] and "--jwks" in lines[0]
    assert files_in(tmp_path) == before

    (tmp_path / "jwks.json").unlink()  # the person removes it: the same --kid now works
    again = keys(tmp_path, "--alg", "ES256", "--kid", "k1", "--dir", ".")
    assert again.returncode == 0, again.stderr
    assert [k["kid"] for k in json.loads((tmp_path / "jwks.json").read_text())["keys"]] == ["k1"]
    assert "jwks.json  (1 key; serve it at DUALCAST_JWKS_URL)" in again.stdout  # not "1 keys"
    rotated = keys(tmp_path, "--alg", "ES256", "--kid", "k2", "--dir", ".")
    assert "jwks.json  (2 keys; serve it at DUALCAST_JWKS_URL)" in rotated.stdout, rotated.stderr


def test_a_key_set_that_cannot_be_written_leaves_no_key_and_no_folder(tmp_path: Path) -> None:
    done = keys(tmp_path, "--kid", "k1", "--dir", "new/keys", "--jwks", "gone/jwks.json")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "gone/jwks.json" in lines[0], done.stderr
    assert files_in(tmp_path) == {}


def test_an_existing_public_key_file_is_named_and_kept(tmp_path: Path) -> None:
    (tmp_path / "k1.pub.pem").write_text("mine")
    done = keys(tmp_path, "--kid", "k1", "--dir", ".")
    assert done.returncode == 2
    assert done.stderr.strip() == "dualcast keys: k1.pub.pem exists; choose another --kid"
    assert files_in(tmp_path) == {"k1.pub.pem": b"mine"}


def dualcast(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    clean.pop("REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "dualcast", *args], cwd=folder,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_a_key_file_named_without_its_at_sign_is_said_so(tmp_path: Path) -> None:
    """`--key keys/k1.pem` and DUALCAST_PUBLIC_KEY=keys/k1.pub.pem (the path without its
    `@`) were read as PEM text: "not an unencrypted PEM private key", and nothing said
    that a file needs `@`."""
    assert keys(tmp_path, "--kid", "k1", "--dir", "keys").returncode == 0
    token = dualcast(tmp_path, "token", "--key", "keys/k1.pem", "--sub", "a")
    assert token.returncode == 2 and token.stdout == ""
    assert token.stderr.strip() == ("dualcast token: --key: not an unencrypted PEM private "
                                    "key: to read the file, write @keys/k1.pem")
    serve = dualcast(tmp_path, "serve", "--port", "0", DUALCAST_JWT_ALGORITHMS="ES256",
                     DUALCAST_PUBLIC_KEY="keys/k1.pub.pem")
    assert serve.returncode == 2
    assert serve.stderr.strip() == ("dualcast: bad setting DUALCAST_PUBLIC_KEY: not a PEM "
                                    "public key or certificate: to read the file, write "
                                    "@keys/k1.pub.pem")
    # a name that is no file is not repeated (it could be a pasted key), only the forms
    missing = dualcast(tmp_path, "token", "--key", "nope.pem", "--sub", "a")
    assert missing.returncode == 2 and "nope.pem" not in missing.stderr
    assert "or @path of a file holding it" in missing.stderr
    assert dualcast(tmp_path, "token", "--key", "@keys/k1.pem", "--sub", "a").returncode == 0


@pytest.mark.parametrize("alg", ["es256", "ES999"])
def test_an_unknown_algorithm_is_named_with_the_choices(tmp_path: Path, alg: str) -> None:
    """`--alg es256` was told "--alg must be RS*, PS*, ES* or EdDSA (HS* uses
    DUALCAST_SECRET)": as if it were an HS* algorithm, and with no name to type."""
    done = keys(tmp_path, "--alg", alg)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (f"dualcast keys: --alg: unknown algorithm {alg!r} (choose "
                                   "from RS256, RS384, RS512, PS256, PS384, PS512, ES256, "
                                   "ES384, ES512, ES256K, EdDSA)")
    assert files_in(tmp_path) == {}


@pytest.mark.parametrize("kid", ["../outside", "a/b", "", ".hidden", "a\\b"])
def test_a_kid_that_is_no_plain_file_name_is_refused(tmp_path: Path, kid: str) -> None:
    """`--kid ../outside` wrote the private key outside --dir (the kid names the files),
    `--kid a/b` failed with "No such file or directory", and `--kid ''` was replaced by a
    made-up one without a word."""
    folder = tmp_path / "keys"
    folder.mkdir()
    done = keys(folder, "--dir", str(folder), "--kid", kid)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"dualcast keys: --kid {kid!r} names the key files"), line
    assert files_in(tmp_path) == {"keys": b""}  # nothing written, in it or beside it
