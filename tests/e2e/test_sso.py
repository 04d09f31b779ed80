"""Single sign-on against a real OpenID provider on loopback (panva's certified oidc-provider, run with Node).

Login with the authorization-code flow and PKCE, first-login user creation, linking an invited user,
logout through the provider, and ID tokens that are tampered with, expired or replayed being refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from adapters.database import eventstore_env
from adapters.oidc import OidcClient, Pending, SsoError
from domain.access import SYSTEM
from domain.accounting import Accounting
from tests.conftest import fresh_database
from tests.e2e.conftest import free_port, start_service, stop_service
from tests.oidc.server import OidcClient as ProviderClient
from tests.oidc.server import OidcUser, Provider, ensure_installed, login_with_httpx, logout_with_httpx, start_provider

SECRET = "portal-client-secret"
USERS = [OidcUser(sub="alice-1", email="alice@uni.edu", name="Alice Chen", password="alice-pw"),
         OidcUser(sub="bob-1", email="bob@uni.edu", name="Bob", password="bob-pw", email_verified=False),
         OidcUser(sub="carol-1", email="carol@uni.edu", name="Carol Lin", password="carol-pw")]


def _provider(port: int, log_dir: Path, *, ttl_s: int = 300, redirect: str | None = None) -> Provider:
    ensure_installed()
    portal = f"http://127.0.0.1:{port}"
    client = ProviderClient("lwapi-portal", SECRET, redirect_uris=(redirect or portal + "/auth/oidc/callback",),
                            post_logout_redirect_uris=(portal + "/login",))
    return start_provider(clients=[client], users=USERS, id_token_ttl_s=ttl_s, log_dir=log_dir)


@pytest.fixture(scope="module")
def sso(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Provider, Accounting]]:
    port = free_port()
    provider = _provider(port, tmp_path_factory.mktemp("oidc"))
    data_dir = Path(tempfile.mkdtemp(prefix="lwapi-sso.", dir="/tmp"))
    try:
        with fresh_database(pg_server_url) as database_url:
            app = Accounting(env=eventstore_env(database_url), key_pepper=bytes(range(32)))
            service, _ = start_service(database_url, data_dir, {
                "LWAPI_OIDC_ISSUER": provider.issuer, "LWAPI_OIDC_CLIENT_ID": "lwapi-portal",
                "LWAPI_OIDC_CLIENT_SECRET": SECRET}, port=port)
            try:
                yield f"http://127.0.0.1:{port}", provider, app
            finally:
                stop_service(service)
                app.close()
    finally:
        provider.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def sso_login(portal: str, email: str, password: str) -> tuple[httpx.Client, httpx.Client, httpx.Response]:
    """(the portal's browser, the provider's browser, the portal's answer to the callback)."""
    browser = httpx.Client(base_url=portal, follow_redirects=False, timeout=30, cookies={"lwapi_lang": "en"})
    at_provider = httpx.Client(follow_redirects=False, timeout=30)
    start = browser.get("/login/sso")
    assert start.status_code == 303, start.text
    callback = login_with_httpx(start.headers["location"], email, password, client=at_provider)
    assert callback.startswith(portal + "/auth/oidc/callback?")
    return browser, at_provider, browser.get(callback)


def test_the_login_page_offers_single_sign_on(sso: tuple[str, Provider, Accounting]) -> None:
    portal, _, _ = sso
    page = httpx.get(portal + "/login", cookies={"lwapi_lang": "en"})
    assert 'href="/login/sso"' in page.text and "institutional single sign-on" in page.text


def test_first_login_creates_the_user_then_logout_ends_the_provider_session(
        sso: tuple[str, Provider, Accounting]) -> None:
    portal, provider, app = sso
    browser, at_provider, landed = sso_login(portal, "alice@uni.edu", "alice-pw")
    assert landed.status_code == 303 and landed.headers["location"] == "/"
    home = browser.get("/")
    assert home.status_code == 200 and "Alice Chen" in home.text and "not a member of any project" in home.text
    user = app.find_user_by_subject(f"{provider.issuer}|alice-1")
    assert (user.email, user.display_name) == ("alice@uni.edu", "Alice Chen")
    # the same person again: the same user, no second account
    again, _, _ = sso_login(portal, "alice@uni.edu", "alice-pw")
    assert app.find_user_by_email("alice@uni.edu").id == user.id
    again.close()

    out = browser.post("/logout", data={"_csrf_token": browser.cookies.get("csrftoken") or ""})
    assert out.status_code == 303 and out.headers["location"].startswith(provider.issuer)
    assert "id_token_hint=" in out.headers["location"]
    back = logout_with_httpx(out.headers["location"], client=at_provider)
    assert back.startswith(portal + "/login")
    assert browser.get("/").headers["location"] == "/login"
    browser.close()
    at_provider.close()


def test_an_invited_user_is_linked_but_an_unverified_email_takes_nothing_over(
        sso: tuple[str, Provider, Accounting]) -> None:
    portal, provider, app = sso
    carol = app.register_user("carol@uni.edu", "Carol (invited)")
    project = app.create_project(SYSTEM, "carol-lab", "Carol's Lab", carol)
    browser, _, landed = sso_login(portal, "carol@uni.edu", "carol-pw")
    assert landed.headers["location"] == "/"
    assert "Carol&#39;s Lab" in browser.get("/").text or "Carol's Lab" in browser.get("/").text
    assert app.find_user_by_subject(f"{provider.issuer}|carol-1").id == carol and project

    app.register_user("bob@uni.edu", "Bob (local account)")
    refused_browser, _, refused = sso_login(portal, "bob@uni.edu", "bob-pw")
    assert refused.status_code == 409 and "already belongs to another account" in refused.text
    assert refused_browser.get("/").headers["location"] == "/login"


def test_a_callback_is_good_once_and_only_with_its_own_state(sso: tuple[str, Provider, Accounting]) -> None:
    portal, _, _ = sso
    browser = httpx.Client(base_url=portal, follow_redirects=False, timeout=30, cookies={"lwapi_lang": "en"})
    start = browser.get("/login/sso")
    callback = login_with_httpx(start.headers["location"], "alice@uni.edu", "alice-pw")
    forged = callback.replace("state=", "state=x")
    assert browser.get(forged).status_code == 400  # the state does not match (and the attempt is spent)
    assert browser.get(callback).status_code == 400  # nothing pending any more
    assert "this login has expired or was already used" in browser.get(callback).text
    stranger = httpx.Client(base_url=portal, follow_redirects=False, timeout=30)
    assert stranger.get(callback).status_code == 400  # someone else's callback: no pending login here
    assert browser.get("/auth/oidc/callback?error=access_denied&state=x").status_code == 400


def _id_token(provider: Provider, redirect: str, client: OidcClient) -> tuple[str, Pending]:
    pending = Pending.new()
    url = asyncio.run(client.authorization_url(redirect, pending))
    callback = login_with_httpx(url, "alice@uni.edu", "alice-pw")
    code = parse_qs(urlsplit(callback).query)["code"][0]
    identity = asyncio.run(client.finish(code, redirect, pending))
    return identity.id_token, pending


def test_tampered_expired_and_foreign_id_tokens_are_refused(tmp_path: Path) -> None:
    redirect = "http://127.0.0.1:9/callback"
    provider = _provider(9, tmp_path, ttl_s=2, redirect=redirect)
    try:
        client = OidcClient(provider.issuer, "lwapi-portal", SECRET, clock_skew_s=0)
        token, pending = _id_token(provider, redirect, client)
        assert asyncio.run(client.verify(token, pending.nonce)).email == "alice@uni.edu"
        head, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["email"] = "mallory@uni.edu"
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        with pytest.raises(SsoError, match="signature"):
            asyncio.run(client.verify(f"{head}.{forged}.{signature}", pending.nonce))
        with pytest.raises(SsoError, match="nonce"):
            asyncio.run(client.verify(token, "another-login"))
        with pytest.raises(SsoError, match="another application"):
            asyncio.run(OidcClient(provider.issuer, "someone-else", SECRET).verify(token, pending.nonce))
        unsigned = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        with pytest.raises(SsoError, match="signature"):
            asyncio.run(client.verify(f"{unsigned}.{payload}.", pending.nonce))
        time.sleep(3.2)  # the provider issued it for 2 s
        with pytest.raises(SsoError, match="expired"):
            asyncio.run(client.verify(token, pending.nonce))
    finally:
        provider.stop()
