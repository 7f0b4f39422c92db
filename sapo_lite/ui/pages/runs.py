"""Runs: every run under RUNS_DIR with its state, and its curves from metrics.jsonl.

The page asks `/api/runs` for the list and `/api/metrics?run=NAME&since=N` for the steps it has not seen yet,
every few seconds while a run trains, and never again once none does: a tab left open on finished runs
sends no requests. The curves are metrics.jsonl's numbers as `sapo-lite plot` draws them (its panels, its
smoothing window); the smoothing is a trailing mean computed in the page.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ...errors import SapoError
from ...run.layout import RunDir
from ...tools.plot import LEGENDS, NOISY, PANELS, smoothing_window
from ..run_state import metric_records, run_folder, run_info, run_names
from ..safety import Refused, inside_runs
from ..shell import page

BODY = """
<section><h2>Runs</h2><table id="runs"><thead><tr><th>show</th><th>run</th><th>state</th><th>step</th><th>loss</th>
<th>best validation step</th><th>held-out before &rarr; after</th><th></th></tr></thead><tbody></tbody></table>
<p id="runs-note" class="note"></p></section>
<section><h2>Curves</h2>
<div class="controls"><label>curve <select id="panel"></select></label>
<label><input type="checkbox" id="logscale"> log scale</label>
<label>smoothing window <input type="number" id="window" min="1" max="500" size="4"> steps</label>
<span id="window-note" class="note"></span></div>
<div id="chart"></div></section>
"""


async def runs_page(request: Request):
    return page(request, "Runs", BODY, ("uPlot.iife.min.js", "runs.js"))


async def runs_list(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    # and the runs this dashboard is starting, which have no config.yaml yet: the page keeps asking about them
    starting = {job.run for job in settings.jobs.all() if job.kind == "train" and job.returncode is None}
    names = sorted(set(run_names(settings.runs_dir)) | starting)
    return JSONResponse({"runs": [run_info(settings.runs_dir, name, settings.jobs) for name in names],
                         "panels": [{"title": title, "keys": keys, "ylabel": ylabel} for title, keys, ylabel in PANELS],
                         "legends": LEGENDS, "noisy": sorted(NOISY)})


async def metrics(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    name = request.query_params.get("run")
    path = inside_runs(settings.runs_dir, name)
    if settings.jobs.running_for(path.name) is None or (path / "config.yaml").is_file():
        path = run_folder(settings.runs_dir, name)  # else: a run this dashboard is starting, no config.yaml yet
    try:
        since = max(0, int(request.query_params.get("since", "0")))
    except ValueError as exc:
        raise Refused("since must be a step count", 400) from exc
    records = metric_records(path, since)
    info = run_info(settings.runs_dir, path.name, settings.jobs)
    total = since + len(records)
    return JSONResponse({"records": records, "total": total, "window": smoothing_window(total),
                         "state": info["state"], "capacity": _capacity(path)})


def _capacity(path: Path) -> int | None:
    try:
        return RunDir(path).read_config().sapo.buffer_size
    except SapoError:  # the buffer-fill curve stays empty; the run's row says what is wrong with its config
        return None


ROUTES = [Route("/", runs_page), Route("/api/runs", runs_list), Route("/api/metrics", metrics)]
