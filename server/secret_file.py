"""The token secret a machine keeps when none is configured.

`dualcast serve` without DUALCAST_SECRET makes one and keeps it in
`$XDG_STATE_HOME/dualcast/secret` (default `~/.local/state/dualcast/secret`,
mode 0600), so the admin link it prints and the cookies it sets survive a
restart, and `dualcast token` on the same machine signs with the same key.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

#: HS256 keys shorter than the hash output are weak (RFC 7518, 3.2); PyJWT warns below it.
MIN_SECRET_BYTES = 32
#: Random bytes of a secret made here: 64 characters once URL-safe encoded, as long as
#: HS512's hash output, so the kept secret is strong enough (and PyJWT silent) for any
#: HMAC algorithm DUALCAST_JWT_ALGORITHMS may list (43 characters warned for HS384/HS512).
MADE_SECRET_BYTES = 48


class SecretFileError(Exception):
    """The state file exists but cannot be used; the message names the file, never its content."""


def secret_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME") or ""
    # The XDG spec: a relative path is invalid and must be ignored.
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "dualcast" / "secret"


def read_secret(path: Path) -> str | None:
    """The kept secret, or None when there is no file yet."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(
            f"cannot read the secret file {path} ({type(exc).__name__}): fix or delete it, "
            "or set DUALCAST_SECRET"
        ) from None
    if len(text.encode()) < MIN_SECRET_BYTES:
        raise SecretFileError(
            f"the secret file {path} holds fewer than {MIN_SECRET_BYTES} bytes: "
            "delete it to make a new one, or set DUALCAST_SECRET"
        )
    return text


def load_or_create(path: Path) -> tuple[str, bool]:
    """The kept secret, made (0600, created atomically) if there is none; (secret, made)."""
    existing = read_secret(path)
    if existing is not None:
        return existing, False
    secret = secrets.token_urlsafe(MADE_SECRET_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written aside, then linked into place: a second server starting at the same
        # moment sees either no file or the whole secret, and both keep the same one.
        draft = path.with_name(f".secret.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(secret + "\n")
            os.link(draft, path)
        finally:
            draft.unlink(missing_ok=True)
    except FileExistsError:
        kept = read_secret(path)
        if kept is None:
            raise SecretFileError(f"the secret file {path} vanished while starting") from None
        return kept, False
    except OSError as exc:
        raise SecretFileError(
            f"cannot create the secret file {path} ({exc.strerror}): set DUALCAST_SECRET "
            "or XDG_STATE_HOME"
        ) from None
    return secret, True
