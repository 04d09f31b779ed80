"""OpenID Connect relying party: the authorization-code flow with PKCE, and ID token verification.

Imports: stdlib, httpx, joserfc. The provider's discovery document and keys are fetched when first
needed and kept for an hour (keys again at once when a token names an unknown key id). An ID token
is accepted only when its signature verifies against the provider's published keys (RS/ES/PS
algorithms, never `none` or HMAC), and iss, aud (and azp), exp, iat and nonce all check out.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

CACHE_S = 3600.0
HTTP_TIMEOUT_S = 10.0
CLOCK_SKEW_S = 60
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
SCOPES = "openid email profile"


class SsoError(Exception):
    """The provider, the flow or the token is not right; the message is safe to show (no token in it)."""


@dataclass(frozen=True)
class Identity:
    subject: str  # issuer-scoped: "<issuer>|<sub>"
    email: str
    email_verified: bool
    name: str
    id_token: str  # kept for the logout hint


@dataclass(frozen=True)
class Pending:
    """What the relying party remembers between the redirect to the provider and the callback."""

    state: str
    nonce: str
    verifier: str

    @classmethod
    def new(cls) -> Pending:
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48))

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class OidcClient:
    def __init__(self, issuer: str, client_id: str, client_secret: str, *, clock_skew_s: int = CLOCK_SKEW_S) -> None:
        self.issuer, self.client_id, self.client_secret = issuer.rstrip("/"), client_id, client_secret
        self.clock_skew_s = clock_skew_s
        self._discovery: tuple[float, dict[str, Any]] | None = None
        self._keys: tuple[float, KeySet] | None = None

    async def discovery(self) -> dict[str, Any]:
        if self._discovery is None or time.monotonic() - self._discovery[0] > CACHE_S:
            document = await self._get_json(self.issuer + "/.well-known/openid-configuration")
            if document.get("issuer", "").rstrip("/") != self.issuer:
                raise SsoError("the identity provider's discovery document names another issuer")
            self._discovery = (time.monotonic(), document)
        return self._discovery[1]

    async def authorization_url(self, redirect_uri: str, pending: Pending) -> str:
        endpoint = (await self.discovery())["authorization_endpoint"]
        query = {"response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
                 "scope": SCOPES, "state": pending.state, "nonce": pending.nonce,
                 "code_challenge": pending.challenge, "code_challenge_method": "S256"}
        return f"{endpoint}?{urlencode(query)}"

    async def logout_url(self, id_token: str, post_logout_redirect_uri: str) -> str | None:
        endpoint = (await self.discovery()).get("end_session_endpoint")
        if not endpoint:
            return None
        query = {"id_token_hint": id_token, "post_logout_redirect_uri": post_logout_redirect_uri,
                 "client_id": self.client_id}
        return f"{endpoint}?{urlencode(query)}"

    async def finish(self, code: str, redirect_uri: str, pending: Pending) -> Identity:
        """Exchange the code (with the PKCE verifier) and verify the ID token that comes back."""
        endpoint = (await self.discovery())["token_endpoint"]
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": pending.verifier}
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
                answer = await client.post(endpoint, data=form, auth=(self.client_id, self.client_secret))
        except httpx.HTTPError as e:
            raise SsoError(f"the identity provider could not be reached ({type(e).__name__})") from None
        if answer.status_code != 200:
            raise SsoError(f"the identity provider refused the login ({answer.status_code})")
        try:
            id_token = answer.json()["id_token"]
        except (ValueError, KeyError, TypeError):
            raise SsoError("the identity provider sent no ID token") from None
        return await self.verify(id_token, pending.nonce)

    async def verify(self, id_token: str, nonce: str) -> Identity:
        claims = await self._verified_claims(id_token)
        now = int(time.time())
        if claims.get("iss", "").rstrip("/") != self.issuer:
            raise SsoError("the ID token was issued by another provider")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.client_id not in audiences or (len(audiences) > 1 and claims.get("azp") != self.client_id):
            raise SsoError("the ID token is meant for another application")
        if not isinstance(claims.get("exp"), int) or claims["exp"] + self.clock_skew_s <= now:
            raise SsoError("the ID token has expired: please log in again")
        if isinstance(claims.get("iat"), int) and claims["iat"] - self.clock_skew_s > now:
            raise SsoError("the ID token was issued in the future")
        if not nonce or not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise SsoError("the ID token does not belong to this login (nonce)")
        subject, email = claims.get("sub"), claims.get("email")
        if not isinstance(subject, str) or not subject or not isinstance(email, str) or not email:
            raise SsoError("the identity provider did not say who you are (sub and email are required)")
        name = claims.get("name") if isinstance(claims.get("name"), str) else email.split("@")[0]
        return Identity(f"{self.issuer}|{subject}", email, claims.get("email_verified") is True, str(name), id_token)

    async def _verified_claims(self, id_token: str) -> dict[str, Any]:
        for refresh in (False, True):
            keys = await self._key_set(refresh=refresh)
            try:
                return dict(jwt.decode(id_token, keys, algorithms=ALGORITHMS).claims)
            except ValueError as e:  # joserfc: no key with the token's kid (rotated keys) among others
                if refresh or "kid" not in str(e).lower():
                    raise SsoError("the ID token's signature does not verify") from None
            except JoseError:
                raise SsoError("the ID token's signature does not verify") from None
        raise SsoError("the ID token's signature does not verify")

    async def _key_set(self, *, refresh: bool) -> KeySet:
        if refresh or self._keys is None or time.monotonic() - self._keys[0] > CACHE_S:
            jwks = await self._get_json((await self.discovery())["jwks_uri"])
            try:
                self._keys = (time.monotonic(), KeySet.import_key_set(jwks))  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError):
                raise SsoError("the identity provider published keys that cannot be read") from None
        return self._keys[1]

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
                answer = await client.get(url)
            document = answer.json()
        except (httpx.HTTPError, ValueError):
            raise SsoError("the identity provider could not be reached") from None
        if answer.status_code != 200 or not isinstance(document, dict):
            raise SsoError(f"the identity provider answered {answer.status_code}")
        return document
