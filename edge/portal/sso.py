"""Institutional single sign-on: log in through the OpenID provider, and log out of it.

Imports: everything inward. The state, nonce and PKCE verifier of a login in progress live in the
(encrypted) session cookie until the provider sends the person back; the user is found, linked or
created from the verified ID token's claims by the domain (`sign_in_with_identity`).
"""

from __future__ import annotations

import asyncio

from litestar import get
from litestar.params import Parameter
from litestar.response import Redirect, Template

from adapters.oidc import OidcClient, Pending, SsoError
from domain.errors import DomainError
from edge.portal.context import AnyRequest, render, runtime_of, settled, translator

CALLBACK_PATH = "/auth/oidc/callback"
CODE_CHARS_MAX = 4096


def oidc_of(request: AnyRequest) -> OidcClient | None:
    client: OidcClient | None = getattr(request.app.state, "oidc", None)
    return client


def _public(request: AnyRequest, path: str) -> str:
    base = runtime_of(request).settings.public_url or str(request.base_url).rstrip("/")
    return base + path


def _refused(request: AnyRequest, message: str, status_code: int = 400) -> Template:
    return render(request, "login.html", user=None, error=message, email="", sso_enabled=True,
                  status_code=status_code)


@get("/login/sso")
async def start_sso(request: AnyRequest) -> Redirect | Template:
    oidc = oidc_of(request)
    if oidc is None:
        return render(request, "not_found.html", user=None, status_code=404)
    pending = Pending.new()
    try:
        url = await oidc.authorization_url(_public(request, CALLBACK_PATH), pending)
    except SsoError as e:
        return _refused(request, translator(request)("login.sso_failed", reason=str(e)), 502)
    request.set_session({"oidc": {"state": pending.state, "nonce": pending.nonce, "verifier": pending.verifier}})
    return Redirect(url, status_code=303)


@get(CALLBACK_PATH)
async def sso_callback(request: AnyRequest, code: str = "", error: str = "",
                       returned_state: str = Parameter(query="state", default="")) -> Redirect | Template:
    oidc = oidc_of(request)
    t = translator(request)
    if oidc is None:
        return render(request, "not_found.html", user=None, status_code=404)
    remembered = (request.session or {}).get("oidc")
    request.clear_session()  # one try per login: a replayed callback finds nothing
    if error:
        return _refused(request, t("login.sso_cancelled"))
    if not isinstance(remembered, dict) or not returned_state or returned_state != remembered.get("state") or not code \
            or len(code) > CODE_CHARS_MAX:
        return _refused(request, t("login.sso_failed", reason=t("login.sso_stale")))
    pending = Pending(remembered["state"], remembered["nonce"], remembered["verifier"])
    try:
        identity = await oidc.finish(code, _public(request, CALLBACK_PATH), pending)
        user_id = await asyncio.to_thread(runtime_of(request).accounting.sign_in_with_identity, identity.subject,
                                          email=identity.email, email_verified=identity.email_verified,
                                          display_name=identity.name)
    except SsoError as e:
        return _refused(request, t("login.sso_failed", reason=str(e)))
    except DomainError as e:
        return _refused(request, t("login.sso_failed", reason=t.error(e)), 409)
    await settled(request)  # a user created just now is in the read models before the next page asks
    request.set_session({"user_id": str(user_id), "id_token": identity.id_token})
    return Redirect("/", status_code=303)


async def provider_logout_url(request: AnyRequest, id_token: object) -> str | None:
    """Where to send someone who logged in through SSO, so that they leave the provider's session too."""
    oidc = oidc_of(request)
    if oidc is None or not isinstance(id_token, str):
        return None
    try:
        return await oidc.logout_url(id_token, _public(request, "/login"))
    except SsoError:
        return None


sso_routes = [start_sso, sso_callback]
