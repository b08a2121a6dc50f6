"""The request's query string as a plain dict, parsed once per request.

Starlette's `QueryParams` builds a multi-dict through `parse_qsl` on first use:
about 14 us per request, the largest single cost of a long-poll answer in our
own code (issue 8). Our parameters are single-valued, so a dict does; like
Starlette, the last of repeated names wins and `+`/`%xx` decode as UTF-8, but for
the comma lists (`rooms`): each repetition adds to the list.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from starlette.requests import HTTPConnection

_KEY = "dualcast.query"

#: Parameters whose repetitions are one comma list: `?rooms=a&rooms=b` is `rooms=a,b`, as
#: a form or URLSearchParams.append writes a list. The last one won, and such a client got
#: the events of `b` alone without a word.
LISTS = frozenset({"rooms"})


def parse_query(raw: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in raw.decode("latin-1").split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in part or "+" in part:
            name, value = unquote_plus(name), unquote_plus(value)
        if name in LISTS and name in found:
            value = f"{found[name]},{value}"
        found[name] = value
    return found


def query_of(conn: HTTPConnection) -> dict[str, str]:
    """`conn`'s query parameters, cached in its scope for the other readers."""
    scope = conn.scope
    query: dict[str, str] | None = scope.get(_KEY)
    if query is None:
        query = scope[_KEY] = parse_query(scope.get("query_string", b""))
    return query
