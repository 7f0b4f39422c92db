"""The dashboard's app and its server: the pages (one module each in `pages/`), the gate, the assets.

Starlette answers the requests and uvicorn serves them; both come with `pip install "sapo-lite[ui]"`. The chart
library (uPlot, MIT) is vendored in `static/`, so the dashboard needs no network. Every request goes through
`safety.Gate`; a `Refused` from any page becomes its status and one line of text.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from ..errors import ConfigError
from .jobs import Jobs
from .pages import chat, control, pairs, runs
from .safety import Gate, Refused, needs_token, new_token

STATIC = Path(__file__).parent / "static"


@dataclass
class Settings:
    runs_dir: Path
    read_only: bool = False
    poll_ms: int = 2000
    """How often a page asks for news about a run that is training (never for a finished one)."""
    jobs: Jobs = field(init=False)

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir).resolve()
        self.jobs = Jobs(Path.cwd())


async def _refused(request: Request, exc: Exception) -> PlainTextResponse | JSONResponse:
    assert isinstance(exc, Refused)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return PlainTextResponse(f"refused: {exc.message}\n", status_code=exc.status)


def build_app(settings: Settings, host: str = "127.0.0.1", token: str | None = None) -> Gate:
    """The ASGI app behind the gate: `token` is required on every request when given."""
    routes = [*runs.ROUTES, *pairs.ROUTES, *chat.ROUTES, *control.ROUTES,
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes, exception_handlers={Refused: _refused})
    app.state.settings = settings
    return Gate(app, host, token)


def serve(runs_dir: Path, host: str, port: int, token: str | None, read_only: bool, say) -> None:
    """Serve until Ctrl-C; `say` prints the URL to open (with the token when one is needed)."""
    import uvicorn

    if needs_token(host):
        token = token or new_token()
    else:
        token = None  # this machine only: the Host check guards it
    _check_can_listen(host, port)
    settings = Settings(runs_dir, read_only=read_only)
    app = build_app(settings, host, token)
    shown = f"[{host}]" if ":" in host else host
    say(f"sapo-lite dashboard for {settings.runs_dir}: http://{shown}:{port}/" + (f"?token={token}" if token else ""))
    if read_only:
        say("read-only: launch, stop, resume and export are off")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        settings.jobs.stop_all()


def _check_can_listen(host: str, port: int) -> None:
    """A port in use or an address not on this machine: one line, before uvicorn would log a traceback-like error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                              f"choose another --port (e.g. --port {port + 1}), or a --host of this machine") from None
