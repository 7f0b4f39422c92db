"""What the dashboard lets in: a token on every request when it listens beyond this machine, local Host
headers when it does not, and run paths only inside RUNS_DIR.

- Bound to 127.0.0.1 (the default) only this machine reaches it; a request whose Host header names another
  host is refused, so a web page elsewhere cannot reach it through DNS rebinding.
- Bound to any other address, every request carries the token: `?token=` in the URL `sapo-lite ui` prints
  (the page then keeps it in a same-site cookie), or an `X-Sapo-Token` header. Without it: 403.
- A request that changes something (POST) must send JSON and, when the browser names the page it comes
  from (Origin), come from the dashboard's own page: another site's page cannot launch or stop runs.
- A run is named by its path relative to RUNS_DIR; an absolute path or one with `..` is refused before
  anything is read, and so is a symlink that resolves outside RUNS_DIR.
"""

from __future__ import annotations

import secrets
from http.cookies import SimpleCookie
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
TOKEN_COOKIE = "sapo_token"
TOKEN_HEADER = b"x-sapo-token"


class Refused(Exception):
    """A request the dashboard will not serve: answered with `status` and the message, never a traceback."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def needs_token(host: str) -> bool:
    return host not in LOCAL_HOSTS


def new_token() -> str:
    return secrets.token_urlsafe(18)


def inside_runs(runs_dir: Path, name: str | None) -> Path:
    """RUNS_DIR/name, refused unless it stays inside RUNS_DIR (no absolute path, no `..`, no symlink out)."""
    if not name:
        raise Refused("no run named: pass ?run=NAME, a folder inside RUNS_DIR", 400)
    relative = PurePosixPath(name.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or Path(name).is_absolute():
        raise Refused(f"`{name}` is outside RUNS_DIR: name a run by its folder inside it, without `..`")
    root = runs_dir.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise Refused(f"`{name}` resolves outside RUNS_DIR")
    return path


class Gate:
    """ASGI middleware: the token (non-local hosts) or a local Host header (local binding), on every request."""

    def __init__(self, app: Any, host: str, token: str | None) -> None:
        self.app, self.host, self.token = app, host, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        refusal = _cross_site(scope, headers)
        if refusal:
            await _refuse(send, refusal)
            return
        if self.token is None:
            host = _hostname(headers.get(b"host", b"").decode("latin-1"))
            if host not in LOCAL_HOSTS:
                await _refuse(send, f"Host `{host}` is not this machine: open http://127.0.0.1 instead")
                return
            await self.app(scope, receive, send)
            return
        from_query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        given = from_query or headers.get(TOKEN_HEADER, b"").decode("latin-1") or (
            cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else None)
        if not given or not secrets.compare_digest(given, self.token):
            await _refuse(send, "this dashboard needs its token: open the URL with ?token= that `sapo-lite ui` "
                                "printed (or pass the X-Sapo-Token header)")
            return
        if from_query is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict) -> None:  # keep the token for the page's own requests
            if message["type"] == "http.response.start":
                cookie_line = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie_line.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _cross_site(scope: dict, headers: dict) -> str | None:
    """Why a request that changes something comes from another site's page, or None.

    A page elsewhere can make the browser POST here (a form, a text/plain fetch) without reading the answer;
    JSON bodies need a preflight the dashboard never grants, and the Origin header names the page's site.
    """
    if scope.get("method", "GET") in ("GET", "HEAD"):
        return None
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    if origin and origin.split("://", 1)[-1] != host:
        return f"a request from the page {origin} may not change anything here"
    if not headers.get(b"content-type", b"").startswith(b"application/json"):
        return "requests that change something send JSON (content-type: application/json)"
    return None


def _hostname(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8000
        return host_header[1:].split("]")[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


async def _refuse(send: Any, message: str) -> None:
    body = f"refused: {message}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})
