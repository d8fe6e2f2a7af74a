"""Public demo mode (--demo; the default on a Hugging Face Space without --auth): each visitor works in a
private sandbox that is deleted some time after their last visit.

Who a visitor is: a random secret in a cookie that the page's first response sets (kept across reloads; in a
Space's iframe too, as a partitioned cookie over https). Gradio asks `DemoMode.visitor`, its auth_dependency,
for the user of every request, so every handler's gr.Request names the visitor as it names a signed-in user,
and the studio's sign-in rules keep each sandbox private: Studio.can_see, the per-user quotas (core.quota),
the job and queue limits. A client without the cookie (an API client, a browser that refuses it) is known
by its page's session instead: a sandbox for as long as that session lasts.
A sweeper in the served app's lifespan stops an expired visitor's jobs and deletes their datasets and
adapters (core.sandbox).
"""
from __future__ import annotations

import asyncio
import html
import re
import secrets
import sys
import time
from contextlib import asynccontextmanager, nullcontext

import anyio
import gradio as gr
from starlette.middleware import Middleware

from core.api import Sandboxes, clean, import_gallery, is_real, owners_on_disk, visitor_name

from .context import Studio, user_of

COOKIE = "lora_studio_visitor"
SECRET = re.compile(r"[0-9a-f]{32}")
COOKIE_DAYS = 400  # the browser's limit; the sandbox itself ends on the server after the idle time
SWEEP_EVERY_S = 60
PAGE = "visitor:page"  # a request that runs no event (the page, its files, uploads) and has no cookie yet
EPHEMERAL = ("This Space's disk is not persistent: your datasets and adapters may vanish when it restarts "
             "(its owner can turn on persistent storage).")


class VisitorCookie:
    """ASGI middleware: a page sent to a browser without a visitor cookie carries a new one. Only pages do:
    the browser asks for the page first, so its later requests all carry the same cookie."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or SECRET.fullmatch(_cookie(scope) or ""):
            return await self.app(scope, receive, send)
        secure = scope.get("scheme") == "https" or _header(scope, b"x-forwarded-proto") == "https"
        # inside a Space's iframe the page is a third party: only a partitioned, secure cookie is kept there
        where = "SameSite=None; Secure; Partitioned" if secure else "SameSite=Lax"
        cookie = f"{COOKIE}={secrets.token_hex(16)}; Path=/; Max-Age={COOKIE_DAYS * 86400}; HttpOnly; {where}"

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                kind = dict(headers).get(b"content-type", b"")
                if kind.startswith(b"text/html"):
                    message = {**message, "headers": [*headers, (b"set-cookie", cookie.encode())]}
            await send(message)
        await self.app(scope, receive, send_with_cookie)


def _header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == name), None)


def _cookie(scope) -> str | None:
    for part in (_header(scope, b"cookie") or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == COOKIE:
            return value
    return None


class DemoMode:
    """The visitors' sandboxes of one studio (studio.demo); `clock` is for tests."""

    def __init__(self, studio: Studio, idle_minutes: float = 60, ephemeral: bool = False, clock=time.time):
        self.studio, self.idle_minutes, self.ephemeral = studio, idle_minutes, ephemeral
        self.sandboxes = Sandboxes(idle_minutes * 60, clock)
        self._warned: set[str] = set()

    async def visitor(self, request) -> str:
        """The user name of `request` (Gradio's auth_dependency), and its visitor seen now."""
        name = await self._name(request)
        if name != PAGE:
            self.sandboxes.seen(name)
        return name

    async def _name(self, request) -> str:
        secret = request.cookies.get(COOKIE)
        if isinstance(secret, str) and SECRET.fullmatch(secret):
            return visitor_name(secret)
        session = request.query_params.get("session_hash") or request.path_params.get("session_hash")
        if not session and request.method not in ("GET", "HEAD"):
            if request.headers.get("content-type", "").startswith("multipart/"):
                return PAGE  # an upload: it runs no event
            try:
                body = await request.json()  # Starlette keeps it for the endpoint
            except ValueError:
                body = None
            session = body.get("session_hash") if isinstance(body, dict) else None
            if not (isinstance(session, str) and session):
                return visitor_name(secrets.token_hex(16))  # an event naming no session: a sandbox of its own
        return visitor_name("session:" + session) if isinstance(session, str) and session else PAGE

    def sweep(self) -> set[str]:
        """Clean the expired sandboxes: stop their jobs, then delete their datasets and adapters (a visitor
        whose job is still stopping is cleaned at the next sweep). Returns the visitors cleaned."""
        expired = self.sandboxes.expired()
        if not expired:
            return set()
        scheduler = self.studio.runs.scheduler
        live = [j for j in scheduler.live() if j.user in {f"user:{v}" for v in expired}]  # context.requester
        for job in live:
            scheduler.stop(job)
        stopping = {j.user.partition(":")[2] for j in live}
        ready = set(expired) - stopping
        left = clean(ready, self.studio.library, self.studio.dataset_store) if ready else set()
        for name in ready - left:
            self.sandboxes.forget(name, expired[name])
            self._warned.discard(name)
        return ready - left

    async def _sweeping(self):
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                await anyio.to_thread.run_sync(self.sweep)
            except Exception as e:  # one failed sweep must not end the sweeper
                print(f"demo: sandbox sweep failed: {type(e).__name__}", file=sys.stderr)

    def launch_options(self, options: dict) -> dict:
        """`options` for demo.launch() with the visitor cookie, the visitor as every request's user, the
        sweeper, and client-side rendering (a page rendered by Node would not carry the cookie)."""
        app_kwargs = dict(options.get("app_kwargs") or {})
        inner = app_kwargs.get("lifespan")

        @asynccontextmanager
        async def lifespan(app):
            async with inner(app) if inner else nullcontext():
                task = asyncio.create_task(self._sweeping())
                try:
                    yield
                finally:
                    task.cancel()

        app_kwargs.update(lifespan=lifespan, middleware=[*app_kwargs.get("middleware", []), Middleware(VisitorCookie)])
        return {**options, "app_kwargs": app_kwargs, "auth_dependency": self.visitor, "ssr_mode": False}

    def chip_html(self) -> str:
        minutes = f"{self.idle_minutes:g} minute{'' if self.idle_minutes == 1 else 's'}"
        return (f"<div class='identity' id='identity'><span class='pill sandbox'>your private sandbox, kept "
                f"{html.escape(minutes)} after your last visit</span></div>")

    def wire(self, blocks: gr.Blocks) -> None:
        """(Inside `blocks`.) Warn each visitor once when the disk is ephemeral."""
        if not self.ephemeral:
            return

        def warn(request: gr.Request):
            user = user_of(request)
            if user not in self._warned:
                self._warned.add(user)
                gr.Warning(EPHEMERAL, duration=None)

        blocks.load(warn, show_progress="hidden", api_visibility="private")


def install(studio: Studio, idle_minutes: float = 60, ephemeral: bool = False, clock=time.time) -> DemoMode:
    """Turn `studio` (before its UI is built) into a public demo: the sign-in rules, with visitors as users."""
    if not (is_real(idle_minutes) and 0 < idle_minutes <= 1e6):
        raise ValueError(f"--demo-idle-minutes must be a number of minutes above 0 (got {idle_minutes!r}).")
    studio.auth = True
    studio.demo = DemoMode(studio, idle_minutes, ephemeral, clock)
    studio.demo.sandboxes.adopt(owners_on_disk(studio.library, studio.dataset_store))
    return studio.demo


def open_gallery(studio: Studio, folder) -> list[str]:
    """Import the Space owner's adapters in `folder` as the read-only gallery (core.sandbox.import_gallery)."""
    return import_gallery(studio.library, folder)
