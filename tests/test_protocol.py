"""The server's error codes are named once (dualcast.protocol) and the browser client
knows the same list: a code added on one side and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

from dualcast.protocol import AUTH_CODES, ErrorCode

ROOT = Path(__file__).resolve().parents[1]


def js_list(name: str) -> set[str]:
    """The string literals of `export const <name> = ...([ ... ])` in static/dualcast.js."""
    source = (ROOT / "static" / "dualcast.js").read_text()
    match = re.search(rf"export const {name} = [^\[]*\[(.*?)\]\)", source, re.S)
    assert match is not None, f"{name} not found in static/dualcast.js"
    body = re.sub(r"//[^\n]*", "", match.group(1))
    return set(re.findall(r"'([a-z_]+)'", body))


def test_the_client_knows_exactly_the_server_error_codes() -> None:
    server = {code.value for code in ErrorCode}
    client = js_list("ERROR_CODES")
    assert client - server == set(), "the client lists codes the server never sends"
    assert server - client == set(), "the server sends codes the client does not list"


def test_the_client_treats_every_server_auth_code_as_auth() -> None:
    assert {code.value for code in AUTH_CODES} <= js_list("AUTH_CODES")


def test_no_error_code_is_spelled_out_where_it_is_raised() -> None:
    """Every code the server raises is in ErrorCode (a bare string that is not is a typo
    or a code the client cannot know)."""
    raised = re.compile(
        r"(?:error_response|Refusal|AuthError|_refuse|refuse)\(\s*(?:\d+,\s*)?\"([a-z_]+)\"")
    known = {code.value for code in ErrorCode}
    unknown = {
        f"{path.relative_to(ROOT)}: {code}"
        for path in (ROOT / "server").rglob("*.py")
        for code in raised.findall(path.read_text())
        if code not in known
    }
    assert unknown == set()
