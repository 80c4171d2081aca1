"""Guards of a web server that reads folders and starts processes.

- Host check: a request whose Host header is not one of the server's own names is refused, so a web page
  on another site cannot reach it through DNS rebinding (its requests carry the attacker's host name).
- Access token (with `--listen`, when other machines can connect): every request carries it, as the
  `?token=` of the address printed at start (then kept in a cookie) or an `Authorization: Bearer` header.
- CSRF: every state-changing request (not GET/HEAD/OPTIONS) sends the `X-CSRF-Token` header equal to the
  server's token, which pages get in a cookie only this server's scripts can read (double submit: another
  site can neither read the cookie nor send the header without this server's consent).
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, field

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

TOKEN_COOKIE = "lora_scripts_token"
CSRF_COOKIE = "lora_scripts_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class SecuritySettings:
    allowed_hosts: frozenset[str]  # host names and addresses, lower case, without port
    access_token: str | None = None  # required on every request when set (--listen)
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))


def own_host_names(listen: bool, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The names a browser may use for this server: the loopback names, and with `listen` this machine's
    name and addresses; `extra` adds names (a reverse proxy's, a port-forward's)."""
    names = set(LOCAL_NAMES) | {name.lower() for name in extra}
    if listen:
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        try:
            names |= {info[4][0].lower() for info in socket.getaddrinfo(hostname, None)}
        except OSError:
            pass
    return frozenset(names)


def host_name(header: str) -> str:
    """`example.org:7860` → `example.org`; `[::1]:7860` → `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class SecurityMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, settings: SecuritySettings):  # noqa: ANN001 - an ASGI app
        super().__init__(app)
        self.settings = settings

    async def dispatch(self, request: Request, call_next) -> Response:  # noqa: ANN001
        settings = self.settings
        if host_name(request.headers.get("host", "")) not in settings.allowed_hosts:
            return _refuse(
                400, "This server answers only to its own address; open the address it printed at start."
            )
        from_query = None
        if settings.access_token is not None:
            given = (
                request.query_params.get("token")
                or request.cookies.get(TOKEN_COOKIE)
                or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            )
            if not given or not secrets.compare_digest(given, settings.access_token):
                return _refuse(
                    401, "Open the address the server printed at start: it carries the access token."
                )
            from_query = request.query_params.get("token")
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not secrets.compare_digest(sent, settings.csrf_token):
                return _refuse(
                    403, "This request lacks the page's CSRF token; reload the page and try again."
                )
        response = await call_next(request)
        if from_query:
            response.set_cookie(TOKEN_COOKIE, from_query, httponly=True, samesite="strict")
        if request.cookies.get(CSRF_COOKIE) != settings.csrf_token:
            response.set_cookie(CSRF_COOKIE, settings.csrf_token, httponly=False, samesite="strict")
        return response


def _refuse(status: int, message: str) -> Response:
    return JSONResponse({"errors": [message]}, status_code=status)
