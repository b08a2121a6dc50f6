"""The secret kept per machine, and the masks that keep secrets out of logs (unit level;
tests/test_serve.py runs them through real servers)."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from dualcast.logs import redact, redact_url
from dualcast.secret_file import (
    MIN_SECRET_BYTES,
    SecretFileError,
    load_or_create,
    read_secret,
    secret_path,
)


def test_path_follows_xdg_and_ignores_a_relative_one(tmp_path: Path) -> None:
    assert secret_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "dualcast" / "secret"
    home_default = Path.home() / ".local" / "state" / "dualcast" / "secret"
    assert secret_path({"XDG_STATE_HOME": "relative/dir"}) == home_default
    assert secret_path({}) == home_default


def test_made_once_0600_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dualcast" / "secret"
    secret, made = load_or_create(path)
    assert made and len(secret.encode()) >= MIN_SECRET_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create(path) == (secret, False)
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no draft left behind


def test_servers_starting_together_keep_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "dualcast" / "secret"
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create(path)[0]))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8 and len(set(results)) == 1


def test_a_short_or_unreadable_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("short-secret-value\n")
    with pytest.raises(SecretFileError) as short:
        read_secret(path)
    assert str(path) in str(short.value) and "short-secret-value" not in str(short.value)
    path.write_bytes(b"\xff\xfe" * 40)
    with pytest.raises(SecretFileError):
        read_secret(path)
    assert read_secret(tmp_path / "missing") is None


def test_a_state_dir_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(SecretFileError) as refused:
        load_or_create(blocker / "dualcast" / "secret")
    assert "DUALCAST_SECRET" in str(refused.value) and str(blocker) in str(refused.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://user:pa55@host:6379/0", "redis://user:***@host:6379/0"),
    ("redis://:pa55@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://pa55@host/0", "rediss://***@host/0"),
    ("redis+sentinel://u:pa55@h1:1,h2:2/mymaster", "redis+sentinel://u:***@h1:1,h2:2/mymaster"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("unix:///run/redis.sock?db=1&password=pa55", "unix:///run/redis.sock?db=1&password=***"),
])
def test_redact_url_masks_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_masks_query_tokens_and_jwts() -> None:
    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    line = f'"GET /api/sse?rooms=a&token={jwt_like}" and Bearer {jwt_like}'
    assert jwt_like not in redact(line)
    assert "/api/sse?rooms=a&token=***" in redact(line)
