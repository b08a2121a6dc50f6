"""Settings: defaults, env names, and one clear line naming a bad setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dualcast.config import SettingsError, load_settings, unknown_variables
from tests.harness.procs import ROOT


def test_defaults_are_the_memory_engine_and_the_design_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DUALCAST_REDIS_URL", raising=False)
    settings = load_settings()
    assert settings.engine == "memory"
    assert settings.stream == "websocket-broadcast"
    assert settings.maxlen == 10_000
    assert settings.transports == ["websocket", "sse", "polling"]


def test_plain_redis_url_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert load_settings().redis_url == "redis://127.0.0.1:1/0"
    monkeypatch.setenv("DUALCAST_REDIS_URL", "redis://127.0.0.1:2/0")
    assert load_settings().redis_url == "redis://127.0.0.1:2/0"


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("DUALCAST_MAXLEN", "lots", "DUALCAST_MAXLEN"),
        ("DUALCAST_QUEUE_SIZE", "0", "DUALCAST_QUEUE_SIZE"),
        ("DUALCAST_REDIS_URL", "http://example", "DUALCAST_REDIS_URL"),
        ("DUALCAST_TRANSPORTS", "carrier-pigeon", "DUALCAST_TRANSPORTS"),
        ("DUALCAST_SECRET", "short", "DUALCAST_SECRET"),
        ("DUALCAST_ROOM_PATTERN", "([", "DUALCAST_ROOM_PATTERN"),
        # settings without an upper bound took inf (a stall watch that never looks)
        ("DUALCAST_STALL_SECONDS", "inf", "DUALCAST_STALL_SECONDS"),
        ("DUALCAST_GC_REFRESH", "inf", "DUALCAST_GC_REFRESH"),
        ("DUALCAST_JWKS_REFRESH", "Infinity", "DUALCAST_JWKS_REFRESH"),
        # counts past what Redis (MAXLEN) or a deque holds: every publish was refused,
        # or the start ended in a traceback
        ("DUALCAST_MAXLEN", str(2**63), "DUALCAST_MAXLEN"),
        ("DUALCAST_RECENT_WINDOW", "999999999999999999999", "DUALCAST_RECENT_WINDOW"),
    ],
)
def test_bad_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert named in message
    assert "\n" not in message


@pytest.mark.parametrize("env", ["DUALCAST_AUTH_URL", "DUALCAST_JWKS_URL"])
@pytest.mark.parametrize("url", [
    "http://", "https://u:hunter2-secret@[::1/keys", "http://u:hunter2-secret@idp:99999/",
    "http://idp:port/", "http://i dp/keys",
])
def test_a_url_that_cannot_be_fetched_is_refused_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch, env: str, url: str
) -> None:
    """Taken, such a URL failed every fetch at run time (the JWKS task dying with a
    traceback each time); a URL may carry a password, so it is never repeated."""
    monkeypatch.setenv(env, url)
    monkeypatch.setenv("DUALCAST_JWT_ALGORITHMS", "RS256" if env == "DUALCAST_JWKS_URL"
                       else "HS256")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"bad setting {env}: ") and "\n" not in message
    assert "http[s]://host[:port]/path" in message
    assert "hunter2" not in message and url not in message


def test_a_url_that_can_be_fetched_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALCAST_AUTH_URL", "http://[::1]:8080/session?check=1")
    assert load_settings().auth_url == "http://[::1]:8080/session?check=1"


@pytest.mark.parametrize(("env", "value"), [
    ("DUALCAST_STREAM", "events\r"), ("DUALCAST_STREAM", " events"),
    ("DUALCAST_STREAM", "events\x1b[0m"),
    ("DUALCAST_SECRET", "s3cret-" * 6 + "\r"), ("DUALCAST_JWT_ISSUER", "https://idp.example/ "),
    ("DUALCAST_ROOM_PATTERN", "[a-z]{1,64}\r"), ("DUALCAST_EVENT_PATTERN", "[a-z]{1,64}\r"),
])
def test_a_value_compared_byte_for_byte_with_stray_characters_is_refused(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    """An env file saved with CRLF line ends gave `events\\r`: the server read another
    stream key than its producers wrote to (or refused every token) without a word."""
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"bad setting {env}: ") and "\n" not in message
    assert "whitespace" in message or "control characters" in message
    assert "s3cret" not in message


def test_a_stream_key_with_inner_spaces_or_letters_of_any_script_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DUALCAST_STREAM", "événements du jour")
    assert load_settings().stream == "événements du jour"


def test_memory_engine_refuses_several_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(SettingsError, match=r"DUALCAST_WORKERS.*memory engine"):
        load_settings(workers=2)


def test_serve_with_a_bad_setting_exits_with_one_clear_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "DUALCAST_PORT": "not-a-port"}
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "DUALCAST_PORT" in lines[0]


@pytest.mark.parametrize(("env", "value", "why"), [
    ("DUALCAST_ROOM_PATTERN", "", "must not be empty"),
    ("DUALCAST_EVENT_PATTERN", "", "must not be empty"),
    ("DUALCAST_ROOM_PATTERN", "^[a-z]{0,64}$", "accepts the empty room name"),
    ("DUALCAST_ROOM_PATTERN", ".*", "accepts the empty room name"),
    ("DUALCAST_ROOM_PATTERN", "^[^/]{1,64}$", "may never hold a comma, whitespace"),
    ("DUALCAST_ROOM_PATTERN", r"^\S{1,64}$", "may never hold a comma, whitespace"),
    ("DUALCAST_ROOM_PATTERN", "^[a-z]+$", "over 256 characters"),
    ("DUALCAST_EVENT_PATTERN", "^.{1,64}$", "may never hold a line break"),
    ("DUALCAST_EVENT_PATTERN", r"(?s)^[a-z\n]{1,64}$", "may never hold a line break"),
])
def test_a_name_pattern_that_admits_protocol_breaking_names_is_refused(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, why: str
) -> None:
    """A pattern that refuses every name, or admits one the protocol cannot carry (a
    comma splits `?rooms=`, a line break an SSE frame), fails at start, not per event."""
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"bad setting {env}: ") and why in message
    assert "\n" not in message


def test_a_wider_name_pattern_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALCAST_ROOM_PATTERN", "^[a-z0-9/-]{1,64}$")
    monkeypatch.setenv("DUALCAST_EVENT_PATTERN", "^[a-z0-9/ _]{1,128}$")
    settings = load_settings()
    assert settings.room_pattern == "^[a-z0-9/-]{1,64}$"
    assert settings.event_pattern == "^[a-z0-9/ _]{1,128}$"


@pytest.mark.parametrize(("value", "why"), [
    ("app.example.com", "no scheme"),
    ("https://app.example.com/app", "has a path"),
    ("https://app.example.com/?x=1", "query"),
    ("https://user@app.example.com", "user information"),
    ("ftp://app.example.com", "not http or https"),
    ("null", "no scheme"),
    ("https://*.example.com", "`*` alone"),
    ("https://app.example.com:99999", "port"),
    ("https://bücher.example", "xn--"),
])
def test_a_listed_origin_that_is_not_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, why: str
) -> None:
    monkeypatch.setenv("DUALCAST_ALLOWED_ORIGINS", f"https://ok.example.com, {value}")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("bad setting DUALCAST_ALLOWED_ORIGINS: ")
    assert repr(value) in message and why in message and "\n" not in message


def test_listed_origins_are_kept_as_browsers_send_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALCAST_ALLOWED_ORIGINS",
                       "https://A.example.com/,https://a.example.com:443,http://b.example:8080,*")
    assert load_settings().allowed_origins == ["https://a.example.com", "http://b.example:8080",
                                               "*"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DUALCAST_")}
    env.pop("REDIS_URL", None)
    env.update(extra)
    return env


def test_a_misspelled_variable_is_named_with_the_setting_meant() -> None:
    """DUALCAST_REDIS_ULR was ignored without a word: `serve` ran the memory engine and
    `publish` said no Redis was configured, while the person had set one."""
    env = cli_env(DUALCAST_REDIS_ULR="redis://127.0.0.1:1/0", DUALCAST_TOKEN="for-tail")
    done = subprocess.run([sys.executable, "-m", "dualcast", "publish", "x", "{}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == ("dualcast: warning: DUALCAST_REDIS_ULR is not a dualcast setting and "
                        "is ignored (did you mean DUALCAST_REDIS_URL?)")
    assert "no Redis configured" in lines[1] and len(lines) == 2  # DUALCAST_TOKEN: tail's


@pytest.mark.parametrize(("name", "meant"), [
    ("dualcast_secrets", "DUALCAST_SECRET"), ("DUALCAST_WORKER", "DUALCAST_WORKERS"),
    ("DUALCAST_LOGLEVEL", "DUALCAST_LOG_LEVEL"), ("DUALCAST_FOO", None),
])
def test_unknown_variables_name_the_closest_setting(name: str, meant: str | None) -> None:
    [line] = unknown_variables({name: "1", "DUALCAST_PORT": "1", "HOME": "/"})
    assert line.startswith(f"{name} is not a dualcast setting and is ignored")
    assert (f"did you mean {meant}?" in line) if meant else "Configuration in the README" in line


def readme_settings() -> dict[str, str]:
    """The README's Configuration table: variable -> its documented default."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(DUALCAST_[A-Z_]+)[^`]*` \| (.+?) \|", text, re.MULTILINE)
    return {name: default.strip("`") for name, default in rows}


def shown(value: object) -> str:
    """A default as the README's table writes it."""
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ",".join(value) if value else "(empty)"
    return str(value)


def test_the_readme_lists_every_setting_with_its_real_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DUALCAST_MAX_CONNECTIONS_PER_SUBJECT and _PER_ADDRESS were missing from the table,
    so a newcomer behind one NAT met 429s from a cap no table named."""
    for name in list(os.environ):
        if name.upper().startswith("DUALCAST_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    documented = readme_settings()
    real = load_settings().model_dump()
    for field, value in real.items():
        name = f"DUALCAST_{field.upper()}"
        assert name in documented, f"{name} is missing from the README's Configuration table"
        # documented as the open-file limit minus 100, and as twice DUALCAST_MAXLEN
        if field not in ("max_connections", "replay_max"):
            assert documented[name] == shown(value), name
    assert set(documented) <= {f"DUALCAST_{field.upper()}" for field in real}


@pytest.mark.parametrize("value", ["nginx", "10.0.0.1/16", "10.0.0.0/33", "10.0.0.1;10.0.0.2"])
def test_a_trusted_proxy_that_is_no_address_or_network_is_refused(
        monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """uvicorn took these for literals no client address equals: nginx's X-Forwarded-For
    was ignored without a word, and every client had nginx's address (one per-address
    cap for all anonymous clients)."""
    monkeypatch.setenv("DUALCAST_FORWARDED_ALLOW_IPS", f"127.0.0.1,{value}")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("bad setting DUALCAST_FORWARDED_ALLOW_IPS: ")
    assert f"{value!r} is not an IP address or a network" in message and "\n" not in message


@pytest.mark.parametrize(("value", "kept"), [
    ("10.0.0.0/16, ::1", "10.0.0.0/16,::1"), ("10.0.0.5,*", "*"), ("*", "*"), ("", ""),
])
def test_trusted_proxies_are_kept_as_uvicorn_reads_them(
        monkeypatch: pytest.MonkeyPatch, value: str, kept: str) -> None:
    """`*` beside an address was one more literal to uvicorn, not "any"."""
    monkeypatch.setenv("DUALCAST_FORWARDED_ALLOW_IPS", value)
    assert load_settings().forwarded_allow_ips == kept
