"""`create_app(settings)`: the HTTP service — portal pages and the `/v1` API — on one `Runtime`.

Imports: everything inward. The lifespan opens the runtime (embedded PostgreSQL if no
DATABASE_URL), creates the schema, makes sure a first administrator exists, and runs the
projection follower until shutdown; closing stops the embedded server this process started.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from litestar import Litestar, Request, Response, asgi, get
from litestar.config.csrf import CSRFConfig
from litestar.contrib.jinja import JinjaTemplateEngine
from litestar.datastructures import CacheControlHeader, ResponseHeader, State
from litestar.enums import ScopeType
from litestar.middleware.session.client_side import CookieBackendConfig
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from adapters.oidc import OidcClient
from edge.gateway.service import running_gateway
from edge.portal.admin_catalog import admin_catalog_routes
from edge.portal.admin_projects import admin_project_routes
from edge.portal.members import member_routes
from edge.portal.project_pages import project_routes
from edge.portal.report_routes import report_routes
from edge.portal.routes import portal_routes
from edge.portal.sso import sso_routes
from edge.portal.unmatched import unmatched_handlers
from edge.portal.usage_page import usage_routes
from edge.runtime import Runtime, load_pepper
from edge.settings import Settings

log = logging.getLogger("lwapi")
TEMPLATES = Path(__file__).parent / "portal" / "templates"
STATIC = Path(__file__).parent / "portal" / "static"
SESSION_MAX_AGE_S = 8 * 3600
FOLLOWER_STOP_TIMEOUT_S = 10.0


def create_app(settings: Settings) -> Litestar:
    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        runtime = await asyncio.to_thread(Runtime.open, settings)
        try:
            await runtime.start_projections()
            assert runtime.follower is not None
            stop = asyncio.Event()
            follower_task = asyncio.create_task(runtime.follower.run(stop), name="projection-follower")
            follower_task.add_done_callback(_report_follower_exit)
            app.state.runtime = runtime
            async with running_gateway(runtime) as gateway:
                app.state.gateway = gateway
                log.info("serving on http://%s:%d", settings.host, settings.port)
                # Everything built so far (modules, the app, the key index, the catalog: ~100k objects) lives
                # as long as the process. Out of the cyclic GC's sight, a full collection no longer walks
                # them: under streaming load those collections stalled every open stream for 30-50 ms.
                gc.freeze()
                yield
            stop.set()
            await asyncio.wait_for(follower_task, FOLLOWER_STOP_TIMEOUT_S)
        finally:
            await runtime.aclose()
            await asyncio.to_thread(runtime.close)

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
    async def metrics(request: Request[Any, Any, Any]) -> bytes:
        """Prometheus metrics: not behind a user key (bind the service to a private address)."""
        gateway = request.app.state.gateway
        runtime = request.app.state.runtime
        now = time.monotonic()
        routes = [(m, r) for m in gateway.catalog.models.values() for r in m.routes]
        lines = [f'lwapi_upstream_in_flight{{model="{m.name}",deployment="{r.name}"}} {r.in_flight}'
                 for m, r in routes]
        lines += ["# TYPE lwapi_upstream_up gauge"] + [
            f'lwapi_upstream_up{{model="{m.name}",deployment="{r.name}"}} {int(r.in_rotation(now))}'
            for m, r in routes]
        head = await runtime.follower.head()
        lag = head - min((await runtime.follower.positions()).values(), default=0)
        set_aside = max((await runtime.follower.set_aside_counts()).values(), default=0)
        extra = ["# TYPE lwapi_upstream_in_flight gauge", *lines, "# TYPE lwapi_projection_lag_events gauge",
                 f"lwapi_projection_lag_events {lag}", "# TYPE lwapi_projection_events_set_aside gauge",
                 f"lwapi_projection_events_set_aside {set_aside}"]
        return bytes(gateway.metrics.render()) + ("\n".join(extra) + "\n").encode()

    @asgi("/v1", is_mount=True, copy_scope=False)
    async def v1(scope: Scope, receive: Receive, send: Send) -> None:
        await scope["app"].state.gateway(scope, receive, send)

    # Sessions live in an encrypted cookie and CSRF tokens are signed, both with keys derived from the
    # service's persistent secret: every worker and every restart accepts them.
    master = load_pepper(settings)
    secure = settings.secure_cookies
    static = create_static_files_router(path="/static", directories=[STATIC],
                                        cache_control=CacheControlHeader(max_age=3600, public=True))
    return Litestar(
        route_handlers=[healthz, metrics, v1, static, *portal_routes, *sso_routes, *project_routes, *member_routes,
                        *usage_routes, *admin_catalog_routes, *admin_project_routes, *report_routes],
        state=State({"oidc": _oidc(settings)}),
        lifespan=[lifespan],
        template_config=TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine),
        middleware=[CookieBackendConfig(secret=_derived(master, "portal-session")[:32], max_age=SESSION_MAX_AGE_S,
                                        httponly=True, samesite="lax", secure=secure, key="lwapi_session",
                                        exclude=["/v1", "/metrics", "/healthz", "/static", "/vendor"]).middleware],
        csrf_config=CSRFConfig(secret=_derived(master, "portal-csrf").hex(), exclude=["/v1", "/healthz"],
                               cookie_httponly=True, cookie_samesite="lax", cookie_secure=secure),
        exception_handlers={500: _internal_error, **unmatched_handlers(security_headers(settings))},
        response_headers=security_headers(settings),
        debug=False,
    )


def security_headers(settings: Settings) -> list[ResponseHeader]:
    """What every page and API answer carries, so a browser runs nothing and frames nothing but our own.

    Styles allow inline (the templates' few style attributes, and Plotly's generated ones); scripts only
    from this service. Forms may also lead to the SSO provider (login and logout redirect there).
    """
    form_action = "'self'"
    if settings.oidc_issuer:
        issuer = urlsplit(settings.oidc_issuer)
        form_action += f" {issuer.scheme}://{issuer.netloc}"
    policy = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
              "font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'self'; "
              f"form-action {form_action}; frame-ancestors 'none'")
    return [ResponseHeader(name="Content-Security-Policy", value=policy),
            ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
            ResponseHeader(name="X-Frame-Options", value="DENY"),
            ResponseHeader(name="Referrer-Policy", value="same-origin"),
            ResponseHeader(name="Permissions-Policy", value="camera=(), microphone=(), geolocation=(), payment=()"),
            ResponseHeader(name="Cross-Origin-Opener-Policy", value="same-origin")]


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    """A bug: logged with its traceback (never with secrets: the request's form is not logged), and a plain page."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response("Something went wrong on our side; it has been logged. Please try again later.",
                    status_code=500, media_type="text/plain; charset=utf-8")


def _oidc(settings: Settings) -> OidcClient | None:
    if settings.oidc_issuer and settings.oidc_client_id and settings.oidc_client_secret:
        return OidcClient(settings.oidc_issuer, settings.oidc_client_id, settings.oidc_client_secret)
    return None


def _derived(master: bytes, purpose: str) -> bytes:
    return hmac.new(master, f"lwapi:{purpose}".encode(), hashlib.sha256).digest()


def create_app_from_env() -> ASGIApp:
    """For worker processes: the settings the parent exported."""
    return with_gateway_in_front(create_app(Settings.from_env()))


def with_gateway_in_front(app: Litestar) -> ASGIApp:
    """`/v1/…` goes straight to the gateway: no middleware, routing or session work per API call
    (the Litestar mount stays for anything that reaches the app another way)."""
    async def front(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP and scope["path"].startswith("/v1/"):
            await app.state.gateway(scope, receive, send)
        else:
            await app(scope, receive, send)
    return front


def _report_follower_exit(task: asyncio.Task[None]) -> None:
    """The follower only returns when asked to; anything else leaves read models stale: say so loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("projection follower stopped: read models are no longer updated", exc_info=task.exception())


def announce_admin(email: str, password: str | None) -> None:
    """Printed once, on the terminal that started the service: the first administrator's login."""
    if password is None:
        print(f"First administrator: {email} (password from LWAPI_ADMIN_PASSWORD)", flush=True)
        return
    print("=" * 72, flush=True)
    print(f"First administrator created: {email}", flush=True)
    print(f"Password (shown only this once): {password}", flush=True)
    print("=" * 72, flush=True)


__all__ = ["Response", "create_app"]
