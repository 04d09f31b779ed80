"""Loopback OpenID Connect provider for the portal SSO tests.

A real, certified OpenID Provider -- panva's ``oidc-provider`` (pinned in ``package-lock.json``) -- run with
Node (>= 20.18; oidc-provider 9 officially wants Node 22 LTS and prints an "Unsupported runtime" warning on 20,
which is harmless here) by ``provider.mjs``.  Authorization-code flow with PKCE (S256 required for every client),
scopes ``openid email profile``, claims ``sub email email_verified name`` (also in the ID token), RP-initiated
logout, JWKS, in-memory storage, configurable ID token lifetime.  Login and consent are plain HTML forms (no
JavaScript) so both a browser and :func:`login_with_httpx` can drive them.

Python use (e.g. from a pytest fixture)::

    from tests.oidc.server import OidcClient, OidcUser, ensure_installed, login_with_httpx, start_provider

    ensure_installed()  # `npm ci` in tests/oidc when node_modules is missing or older than package-lock.json
    provider = start_provider(
        clients=[OidcClient("portal", "s3cret", redirect_uris=("http://127.0.0.1:8080/auth/oidc/callback",),
                            post_logout_redirect_uris=("http://127.0.0.1:8080/",))],
        users=[OidcUser(sub="u1", email="alice@example.test", name="Alice", password="pw")],
        id_token_ttl_s=300,
        log_dir=tmp_path,
    )
    try:
        ...  # provider.issuer == "http://127.0.0.1:<port>"; discovery at provider.discovery_url
        redirect = login_with_httpx(authorize_url, "alice@example.test", "pw")  # RP callback URL, not followed
    finally:
        provider.stop()

By hand::

    cd tests/oidc && npm ci --no-audit --no-fund
    node provider.mjs --port 9400                 # built-in demo client "lwapi-portal" / user alice@example.test
    node provider.mjs --config my-config.json     # or OIDC_PROVIDER_CONFIG='{"clients": [...], ...}'
    curl http://127.0.0.1:9400/.well-known/openid-configuration

``provider.mjs`` prints ``ready <issuer>`` on stdout once it listens; everything else goes to stderr.  The login
form (``#login-form``) posts ``login`` (e-mail or sub) and ``password``; a wrong password answers 401 with
``#login-error``.  A consent form (``#consent-form``) only appears when the provider asks again (``prompt=consent``);
``#abort-form`` ends the flow with ``error=access_denied``.  The logout confirmation is ``#op.logoutForm``.
The provider's cookies are named ``test_op_*`` so they do not collide with the portal's cookies on 127.0.0.1
(browsers share cookies between ports of one host).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

OIDC_DIR = Path(__file__).resolve().parent
PROVIDER_SCRIPT = OIDC_DIR / "provider.mjs"
PACKAGE_LOCK = OIDC_DIR / "package-lock.json"
NODE_MODULES = OIDC_DIR / "node_modules"
INSTALL_STAMP = NODE_MODULES / ".lwapi-package-lock.sha256"
INSTALL_LOCK = OIDC_DIR / ".npm-ci.lock"
MIN_NODE = (20, 18)
READY_PREFIX = "ready "


class OidcProviderError(RuntimeError):
    """The test OpenID provider could not be installed, started or driven."""


class LoginFailed(OidcProviderError):
    """The provider rejected the e-mail/password (HTTP 401 login page)."""


@dataclass(frozen=True)
class OidcClient:
    """A confidential client (relying party) registered at the provider."""

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()
    # oidc-provider 9 accepts client_secret_basic AND client_secret_post at /token for a client registered with
    # either of the two (they share the secret); the registered value only shows in the client's metadata.
    token_endpoint_auth_method: str = "client_secret_basic"

    def metadata(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uris": list(self.redirect_uris),
            "post_logout_redirect_uris": list(self.post_logout_redirect_uris),
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "response_types": ["code"],
            "grant_types": ["authorization_code"],
        }


@dataclass(frozen=True)
class OidcUser:
    """A test end-user; ``login`` accepts the e-mail (case-insensitive) or the sub."""

    sub: str
    email: str
    password: str
    name: str = ""
    email_verified: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "sub": self.sub,
            "email": self.email,
            "password": self.password,
            "name": self.name or self.email,
            "email_verified": self.email_verified,
        }


DEFAULT_CLIENT = OidcClient(
    client_id="lwapi-portal",
    client_secret="lwapi-portal-secret",
    redirect_uris=("http://127.0.0.1:8080/auth/oidc/callback",),
    post_logout_redirect_uris=("http://127.0.0.1:8080/",),
)
DEFAULT_USERS = (
    OidcUser(sub="user-alice", email="alice@example.test", name="Alice Example", password="alice-password"),
    OidcUser(
        sub="user-bob", email="bob@example.test", name="Bob Example", password="bob-password", email_verified=False
    ),
)


@dataclass
class Provider:
    """A running provider process; call :meth:`stop` (or use it as a context manager)."""

    issuer: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    clients: tuple[OidcClient, ...]
    users: tuple[OidcUser, ...]
    id_token_ttl_s: int
    started_in_s: float = field(default=0.0)

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def discovery(self) -> dict[str, Any]:
        response = httpx.get(self.discovery_url, timeout=10)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self, timeout_s: float = 5.0) -> None:
        _stop_process(self.process, timeout_s)

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def _stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise OidcProviderError(
            f"`{name}` not found on PATH: the OIDC test provider needs Node.js >= "
            f"{MIN_NODE[0]}.{MIN_NODE[1]} with npm (https://nodejs.org/)"
        )
    return path


def _check_node(node: str) -> None:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+.*", out)
    if match is None or (int(match[1]), int(match[2])) < MIN_NODE:
        raise OidcProviderError(
            f"{node} reports {out!r}; the OIDC test provider needs Node.js >= {MIN_NODE[0]}.{MIN_NODE[1]}"
        )


def _lock_digest() -> str:
    return hashlib.sha256(PACKAGE_LOCK.read_bytes()).hexdigest()


def _installed() -> bool:
    try:
        return INSTALL_STAMP.read_text().strip() == _lock_digest() and (NODE_MODULES / "oidc-provider").is_dir()
    except FileNotFoundError:
        return False


def ensure_installed() -> None:
    """Run ``npm ci --no-audit --no-fund`` in tests/oidc unless node_modules matches package-lock.json.

    Safe to call from several processes at once (file lock).  Raises :class:`OidcProviderError` when node or
    npm is missing or too old, or when ``npm ci`` fails (with its output).
    """
    node = _tool("node")
    _check_node(node)
    if _installed():
        return
    npm = _tool("npm")
    with INSTALL_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed():
            return
        digest = _lock_digest()
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=OIDC_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise OidcProviderError(
                f"`npm ci` in {OIDC_DIR} failed with exit code {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        INSTALL_STAMP.write_text(digest + "\n")


def _client_metadata(client: OidcClient | Mapping[str, Any]) -> dict[str, Any]:
    return client.metadata() if isinstance(client, OidcClient) else dict(client)


def _as_client(client: OidcClient | Mapping[str, Any]) -> OidcClient:
    if isinstance(client, OidcClient):
        return client
    return OidcClient(
        client_id=client["client_id"],
        client_secret=client["client_secret"],
        redirect_uris=tuple(client["redirect_uris"]),
        post_logout_redirect_uris=tuple(client.get("post_logout_redirect_uris", ())),
        token_endpoint_auth_method=client.get("token_endpoint_auth_method", "client_secret_basic"),
    )


def _as_user(user: OidcUser | Mapping[str, Any]) -> OidcUser:
    if isinstance(user, OidcUser):
        return user
    return OidcUser(
        sub=user["sub"],
        email=user["email"],
        password=user["password"],
        name=user.get("name", ""),
        email_verified=user.get("email_verified", True),
    )


def start_provider(
    *,
    port: int | None = None,
    clients: Sequence[OidcClient | Mapping[str, Any]] = (DEFAULT_CLIENT,),
    users: Sequence[OidcUser | Mapping[str, Any]] = DEFAULT_USERS,
    id_token_ttl_s: int = 300,
    log_dir: Path | str,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 30.0,
    install: bool = True,
) -> Provider:
    """Start ``provider.mjs`` and wait until its discovery document answers 200.

    ``port=None`` lets the provider bind a free port itself (no race); the issuer is then read from its
    ``ready <issuer>`` line.  Clients/users may be :class:`OidcClient`/:class:`OidcUser` or plain dicts (client
    dicts are passed through as oidc-provider client metadata).  stdout+stderr go to
    ``log_dir/oidc-provider-<n>.log``.  On failure the process is stopped and the error carries the log tail.
    """
    if install:
        ensure_installed()
    node = _tool("node")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"oidc-provider-{port or 'auto'}-{time.monotonic_ns()}.log"
    config = {
        "host": host,
        "port": port or 0,
        "id_token_ttl_s": id_token_ttl_s,
        "clients": [_client_metadata(c) for c in clients],
        "users": [_as_user(u).to_json() for u in users],
    }
    env = {**os.environ, "OIDC_PROVIDER_CONFIG": json.dumps(config)}
    started = time.monotonic()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [node, str(PROVIDER_SCRIPT)],
            cwd=OIDC_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        issuer = _wait_ready(process, log_path, started + startup_timeout_s)
    except BaseException:
        _stop_process(process, 5.0)
        raise
    return Provider(
        issuer=issuer,
        port=urlsplit(issuer).port or 0,
        process=process,
        log_path=log_path,
        clients=tuple(_as_client(c) for c in clients),
        users=tuple(_as_user(u) for u in users),
        id_token_ttl_s=id_token_ttl_s,
        started_in_s=time.monotonic() - started,
    )


def _wait_ready(process: subprocess.Popen[bytes], log_path: Path, deadline: float) -> str:
    issuer: str | None = None
    last_error = "no ready line yet"
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise OidcProviderError(
                    f"OIDC provider exited with code {process.returncode} before it was ready; "
                    f"log {log_path}:\n{_tail(log_path, 40)}"
                )
            if issuer is None:
                for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.startswith(READY_PREFIX):
                        issuer = line.removeprefix(READY_PREFIX).strip()
                        break
            if issuer is not None:
                try:
                    response = http.get(f"{issuer}/.well-known/openid-configuration")
                    if response.status_code == 200 and response.json().get("issuer") == issuer:
                        return issuer
                    last_error = f"discovery answered {response.status_code}"
                except httpx.HTTPError as exc:
                    last_error = f"discovery failed: {exc!r}"
            time.sleep(0.05)
    raise OidcProviderError(f"OIDC provider not ready in time ({last_error}); log {log_path}:\n{_tail(log_path, 40)}")


@dataclass
class _Form:
    id: str
    action: str
    method: str
    fields: dict[str, str]


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self.ids: set[str] = set()
        self._current: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if "id" in attr:
            self.ids.add(attr["id"])
        if tag == "form":
            self._current = _Form(attr.get("id", ""), attr.get("action", ""), attr.get("method", "get").lower(), {})
            self.forms.append(self._current)
        elif (
            tag == "input"
            and self._current is not None
            and attr.get("name")
            and attr.get("type", "text").lower() not in {"submit", "button", "image", "reset"}
        ):
            self._current.fields[attr["name"]] = attr.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _walk(client: httpx.Client, start_url: str, credentials: tuple[str, str] | None, max_steps: int) -> str:
    """Follow the provider's redirects and forms; return the first URL that leaves the provider's origin, or the
    URL of a provider page without a form to submit (e.g. the post-logout success page)."""
    provider_origin = _origin(start_url)
    method, url, data = "GET", start_url, None
    for _ in range(max_steps):
        response = client.request(method, url, data=data, follow_redirects=False)
        if response.is_redirect:
            location = urljoin(str(response.url), response.headers["location"])
            if _origin(location) != provider_origin:
                return location
            method, url, data = "GET", location, None
            continue
        parser = _FormParser()
        parser.feed(response.text)
        if response.status_code == 401 and "login-error" in parser.ids:
            raise LoginFailed(f"provider rejected the credentials at {response.url}")
        if response.status_code != 200:
            raise OidcProviderError(f"{method} {response.url} answered {response.status_code}: {response.text[:2000]}")
        forms = {f.id: f for f in parser.forms}
        if "login-form" in forms:
            if credentials is None:
                raise OidcProviderError(f"provider asks for a login at {response.url}")
            form = forms["login-form"]
            form.fields.update(login=credentials[0], password=credentials[1])
        elif "consent-form" in forms:
            form = forms["consent-form"]
        else:
            posts = [f for f in parser.forms if f.method == "post" and f.id != "abort-form"]
            if not posts:
                return str(response.url)
            form = posts[0]
        target = urljoin(str(response.url), form.action)
        if _origin(target) != provider_origin:
            raise OidcProviderError(f"form on {response.url} posts to {target} (use response_mode=query)")
        method, url, data = "POST", target, form.fields
    raise OidcProviderError(f"no result after {max_steps} steps starting at {start_url}")


def login_with_httpx(
    authorize_url: str,
    email: str,
    password: str,
    *,
    client: httpx.Client | None = None,
    max_steps: int = 12,
) -> str:
    """Drive the provider from ``authorize_url`` (its authorization endpoint with the RP's parameters) through the
    login (and, if asked, consent) pages and return the redirect to the relying party -- normally
    ``<redirect_uri>?code=...&state=...&iss=...`` or ``?error=...`` -- without requesting it.

    Pass ``client`` to keep the provider's session cookies (for SSO without a second login, or for
    :func:`logout_with_httpx` afterwards).  Raises :class:`LoginFailed` on wrong credentials.
    """
    if client is None:
        with httpx.Client(timeout=10) as own:
            return _walk(own, authorize_url, (email, password), max_steps)
    return _walk(client, authorize_url, (email, password), max_steps)


def logout_with_httpx(end_session_url: str, *, client: httpx.Client | None = None, max_steps: int = 6) -> str:
    """Open the provider's ``end_session_endpoint`` URL, confirm the sign-out and return the redirect to the
    ``post_logout_redirect_uri`` (with ``state``) without requesting it -- or the provider's own "signed out"
    page URL when no post_logout_redirect_uri was given.  Pass the ``client`` used for the login to end that
    session."""
    if client is None:
        with httpx.Client(timeout=10) as own:
            return _walk(own, end_session_url, None, max_steps)
    return _walk(client, end_session_url, None, max_steps)
