"""Which key may check which token, with a key set served by a real HTTP server.

The rule (server/keys.py): a key checks only tokens of its own family and, for
EC keys, its own curve; a JWK that names an `alg` checks only that algorithm;
a key set never supplies a symmetric key, nor an encryption key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dualcast.auth import Authenticator, AuthError, mint_token
from dualcast.keys import parse_algorithms
from tests.issuers import JwksServer, SigningKey

pytestmark = pytest.mark.timeout(60)

SECRET = "s" * 40


class RawJwks(JwksServer):
    """A key set with hand-written extra entries (what a careless issuer might publish)."""

    def __init__(self, *keys: SigningKey, extra: list[dict[str, Any]]) -> None:
        super().__init__(*keys)
        self.extra = extra

    def answer(self, headers: dict[str, str]) -> tuple[int, Any]:
        status, body = super().answer(headers)
        return status, {"keys": [*body["keys"], *self.extra]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with(key: bytes, kid: str) -> str:
    head = b64(json.dumps({"alg": "HS256", "kid": kid}).encode())
    body = b64(json.dumps({"sub": "eve", "admin": True, "exp": int(time.time()) + 60}).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.fixture
async def served() -> AsyncIterator[tuple[JwksServer, dict[str, SigningKey]]]:
    keys = {
        "ec256": SigningKey.make("ec256", "ES256"),
        "rsa-rs": SigningKey.make("rsa-rs", "RS256"),
        "ed": SigningKey.make("ed", "EdDSA"),
    }
    shared = b"published-secret-" + b"x" * 32
    issuer = RawJwks(*keys.values(), extra=[
        {"kty": "oct", "kid": "sym", "k": b64(shared), "alg": "HS256"},
        {**SigningKey.make("enc", "RS256").jwk(), "use": "enc"},
    ]).start()
    try:
        yield issuer, keys
    finally:
        issuer.stop()


def authenticator(issuer: JwksServer, algorithms: str) -> Authenticator:
    return Authenticator(SECRET, algorithms=parse_algorithms(algorithms.split(",")),
                         jwks_url=issuer.url, jwks_min_interval=60, jwks_refresh=0)


async def refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        await auth.decode(token)
    return caught.value.message


async def test_each_key_checks_only_its_own_kind(
    served: tuple[JwksServer, dict[str, SigningKey]],
) -> None:
    issuer, keys = served
    auth = authenticator(issuer, "HS256,ES256,ES384,RS256,PS256,EdDSA")
    try:
        for name in ("ec256", "rsa-rs", "ed"):
            assert (await auth.decode(keys[name].token(f"u-{name}"))).sub == f"u-{name}"
        assert (await auth.decode(mint_token(SECRET, "hs"))).sub == "hs"
        assert issuer.calls == 1

        # the JWK says RS256: a PS256 signature by the same RSA key is not accepted
        pss = SigningKey("rsa-rs", "PS256", keys["rsa-rs"].private)
        assert "no key" in await refused(auth, pss.token())
        # an ES384 token naming a P-256 key
        p384 = SigningKey.make("ec256", "ES384")
        assert "no key" in await refused(auth, p384.token())
        # a symmetric key published in the set is never used
        assert "signature" in await refused(
            auth, hs256_with(b"published-secret-" + b"x" * 32, "sym"))
        # an encryption key is not a signing key
        enc = SigningKey.make("enc", "RS256")
        assert "no key" in await refused(auth, enc.token())
        # with no kid, the one key that fits is used; with two candidates, none is guessed
        assert (await auth.decode(keys["ed"].token("nokid", kid=None))).sub == "nokid"
        assert "no key" in await refused(
            auth, SigningKey.make("x", "ES384").token(kid=None))
    finally:
        await auth.close()


async def test_a_storm_of_unknown_kids_is_one_fetch_and_a_failed_fetch_keeps_the_set(
    served: tuple[JwksServer, dict[str, SigningKey]],
) -> None:
    issuer, keys = served
    auth = authenticator(issuer, "ES256")
    auth.jwks.min_interval = 0.5  # type: ignore[union-attr]
    try:
        await auth.jwks.refresh()  # type: ignore[union-attr]  # (the start's fetch)
        assert issuer.calls == 1
        await asyncio.sleep(0.6)  # the refetch limit is a clock rule: wait it out
        issuer.delay = 0.3
        strangers = [SigningKey.make(f"n{n}", "ES256") for n in range(50)]
        results = await asyncio.gather(
            *(auth.decode(k.token()) for k in strangers), return_exceptions=True)
        assert all(isinstance(r, AuthError) for r in results)
        assert issuer.calls == 2
        issuer.status = 503
        await asyncio.sleep(0.6)
        assert "no key" in await refused(auth, strangers[0].token())
        assert issuer.calls == 3
        assert auth.jwks.stats.failures == 1  # type: ignore[union-attr]
        assert (await auth.decode(keys["ec256"].token("still"))).sub == "still"
    finally:
        await auth.close()


async def test_a_little_clock_skew_is_tolerated_but_never_on_exp(
    served: tuple[JwksServer, dict[str, SigningKey]],
) -> None:
    """An issuer whose clock runs ahead mints tokens "issued" a moment in our future."""
    issuer, keys = served
    auth = authenticator(issuer, "ES256")
    try:
        ahead = int(time.time()) + 3
        early = keys["ec256"].token("early", iat=ahead, nbf=ahead)
        assert (await auth.decode(early)).sub == "early"
        late = keys["ec256"].token("late", ttl=-2)
        assert "expired" in await refused(auth, late)
        far = int(time.time()) + 120
        assert "not valid yet" in await refused(auth, keys["ec256"].token("x", nbf=far))
    finally:
        await auth.close()


async def test_a_token_without_kid_is_checked_by_the_fixed_key_beside_a_key_set(
    served: tuple[JwksServer, dict[str, SigningKey]],
) -> None:
    """With DUALCAST_PUBLIC_KEY and DUALCAST_JWKS_URL both set, a token without kid from
    the fixed key's signer was checked only against the key set's one fitting key, and
    refused; each of the two may have signed it."""
    issuer, keys = served
    fixed = SigningKey.make("fixed", "ES256")
    auth = Authenticator(SECRET, algorithms=["ES256"], jwks_url=issuer.url,
                         public_key=fixed.private.public_key(), jwks_refresh=0)
    try:
        await auth.jwks.refresh()  # type: ignore[union-attr]  # (the start's fetch)
        assert (await auth.decode(fixed.token("from-fixed", kid=None))).sub == "from-fixed"
        assert (await auth.decode(keys["ec256"].token("from-set", kid=None))).sub == "from-set"
        stranger = SigningKey.make("x", "ES256")
        assert "signature" in await refused(auth, stranger.token(kid=None))
    finally:
        await auth.close()


async def test_a_token_without_kid_beside_several_fitting_keys_is_told_to_name_one() -> None:
    """After `dualcast keys --kid k2` (a rotation: two ES256 keys in the set), a token
    minted without --kid was refused as "no key of this server checks ES256 tokens",
    though two did: the refusal now says the token must name its key."""
    k1, k2 = SigningKey.make("k1", "ES256"), SigningKey.make("k2", "ES256")
    issuer = JwksServer(k1, k2).start()
    auth = Authenticator(SECRET, algorithms=["ES256"], jwks_url=issuer.url, jwks_refresh=0)
    try:
        await auth.jwks.refresh()  # type: ignore[union-attr]  # (the start's fetch)
        said = await refused(auth, k1.token("a", kid=None))
        assert said == ("the token names no key ('kid' header) and 2 keys of this server "
                        "check ES256 tokens: sign it with its key's 'kid' (dualcast token "
                        "--kid)"), said
        assert (await auth.decode(k1.token("a"))).sub == "a"
    finally:
        await auth.close()
        issuer.stop()
