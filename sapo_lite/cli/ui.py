"""`sapo-lite ui`: the dashboard (sapo_lite/ui) over a folder of runs, in the browser."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError, SapoError
from .common import app, console, quiet_libraries, reports_errors

UI_MODULES = ("starlette", "uvicorn")


@app.command()
@reports_errors
def ui(
    runs_dir: Annotated[Path, typer.Argument(help="The folder holding the runs (each run a folder in it)")] = Path(
        "runs"),
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8765,
    host: Annotated[str, typer.Option(help="Address to listen on; any other than 127.0.0.1 needs the token")] = (
        "127.0.0.1"),
    token: Annotated[str | None, typer.Option(help="The token other hosts must send (default: a new one, printed)")
                     ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Watch only: no launch, stop, resume or export")
                         ] = False,
) -> None:
    """A web dashboard: runs and their curves live, the pairs the EMA makes, chat with each role, and launch,
    stop, resume and export runs.

    Listens on 127.0.0.1 (this machine only) unless --host says otherwise; then every request needs the token
    printed at start (or given with --token). Only files inside RUNS_DIR are served.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a port", "choose 1 to 65535, e.g. --port 8765")
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ConfigError(f"`{runs_dir}` is not a folder", "pass the folder that holds your runs, e.g. runs/")
    if token is not None and len(token) < 12:
        raise ConfigError("--token is too short to guard the dashboard", "use 12 characters or more, or drop "
                          "--token to have one made")
    try:
        from ..ui.server import serve
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in UI_MODULES:
            raise
        raise SapoError(f"the dashboard needs {missing}, which is not installed",
                        'pip install "sapo-lite[ui]" (from a checkout: pip install ".[ui]")') from None
    quiet_libraries()
    if not runs_dir.exists():  # a first run can be launched from the page; a mistyped folder should not pass unseen
        console.print(f"`{runs_dir}` did not exist: made it, empty (runs launched from the page go there; to watch "
                      "existing runs, pass the folder that holds them)", highlight=False, markup=False)
    runs_dir.mkdir(parents=True, exist_ok=True)
    serve(runs_dir, host, port, token, read_only, lambda line: console.print(line, highlight=False, markup=False))
