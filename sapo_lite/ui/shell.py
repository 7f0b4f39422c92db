"""The HTML every page shares: the navigation, the stylesheet, and the settings its script reads."""

from __future__ import annotations

import html
import json
from typing import Any

from starlette.responses import HTMLResponse

PAGES = (("/", "Runs"), ("/pairs", "Pairs"), ("/chat", "Chat"), ("/launch", "Launch"))


def page(request: Any, title: str, body: str, scripts: tuple[str, ...]) -> HTMLResponse:
    """One page: `body` (static HTML) plus its scripts; `window.SAPO` carries the dashboard's settings."""
    settings = request.app.state.settings
    nav = "".join(
        f'<a href="{path}"{" class=active" if name == title else ""}>{name}</a>'
        for path, name in PAGES if not (settings.read_only and path == "/launch")
    )
    config: dict[str, Any] = {"readOnly": settings.read_only, "runsDir": str(settings.runs_dir),
                              "pollMs": settings.poll_ms}
    tags = "".join(f'<script src="/static/{name}"></script>' for name in ("common.js", *scripts))
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sapo-lite · {html.escape(title)}</title>
<link rel="stylesheet" href="/static/uPlot.min.css"><link rel="stylesheet" href="/static/style.css">
</head><body>
<header><b>sapo-lite</b><nav>{nav}</nav><span class="where">{html.escape(str(settings.runs_dir))}
{" · read-only" if settings.read_only else ""}</span></header>
<main>{body}</main>
<script>window.SAPO = {json.dumps(config)};</script>{tags}
</body></html>"""
    return HTMLResponse(text)
