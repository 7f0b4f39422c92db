"""Launch and control: start a run from a preset and a form of overrides, stop it, resume it, export it.

The form is built from the config schema: one field a key (`config/schema.py`'s dataclasses), with the
docstring written under that key and the preset's value. Launching checks the overrides with the CLI's own
`load_config`, so a wrong value gives the error `sapo-lite train` would give, before anything starts; the run
itself is `sapo-lite train` in its own process (ui/jobs.py), holding the run lock as every writer does. Stop is
Ctrl-C (SIGINT) to the process holding the run's lock, whoever started it; resume and export are
`train --resume` and `merge`. `--read-only` turns these four off.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ...config.field_docs import field_docs
from ...config.schema import SECTION_NAMES
from ...config.sources import load_config, preset_names, read_preset
from ...errors import SapoError
from ...run.lock import writer_pid
from ..jobs import interrupt
from ..run_state import run_folder
from ..safety import Refused, inside_runs
from ..shell import page

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

BODY = """
<section id="launch"><h2>Launch a run</h2>
<div class="controls"><label>preset <select id="preset"></select></label> <span id="preset-note" class="note"></span>
<label>run name <input id="run-name" size="24"></label></div>
<form id="config-form"></form>
<div><button id="start">start training</button> <span id="launch-error" class="error"></span></div></section>
<section><h2>Control</h2><div class="controls"><label>run <select id="control-run"></select></label>
<span id="control-state" class="note"></span></div>
<div class="controls"><button id="stop">stop (Ctrl-C: finish the step, write a checkpoint)</button></div>
<div class="controls"><button id="resume">resume</button>
<label>overrides <input id="resume-overrides" size="30" placeholder="train.max_steps=200"></label></div>
<div class="controls"><button id="export">export</button>
<label>as <select id="export-format"><option value="hf">merged folder</option><option value="gguf">GGUF file</option>
</select></label><label>quant <select id="export-quant"></select></label>
<label>adapter <select id="export-adapter"><option>policy</option><option>ema</option></select></label></div>
<p id="control-error" class="error"></p></section>
<section><h2>Jobs</h2><div id="jobs"></div></section>
"""


async def control_page(request: Request):
    _writable(request)
    return page(request, "Launch", BODY, ("control.js",))


def _writable(request: Request) -> None:
    if request.app.state.settings.read_only:
        raise Refused("the dashboard is read-only (--read-only): launch, stop, resume and export are off")


def value_text(value: typing.Any) -> str:
    """A config value as the text of a `key=value` override that gives it back."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def schema_fields(preset: str) -> list[dict]:
    """Every key of the config: section, type, choices, the preset's value and the key's documentation."""
    cfg = load_config(preset)
    docs = field_docs()
    fields = []
    for section in SECTION_NAMES:
        part = getattr(cfg, section)
        hints = typing.get_type_hints(type(part))
        for field in dataclasses.fields(part):
            hint = hints[field.name]
            choices = list(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal else None
            fields.append({"key": f"{section}.{field.name}", "section": section, "value": value_text(
                getattr(part, field.name)), "doc": docs.get(f"{section}.{field.name}", ""), "choices": choices,
                "type": _type_words(hint)})
    return fields


def _type_words(hint: typing.Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in (typing.get_args(hint) or (hint,))]
    return " or ".join("null" if n == "NoneType" else n for n in names) if typing.get_origin(hint) is not \
        typing.Literal else "one of the choices"


async def schema(request: Request) -> JSONResponse:
    _writable(request)
    preset = request.query_params.get("preset") or "tiny"
    try:
        fields = schema_fields(preset)
        _, description = read_preset(preset)
    except SapoError as exc:
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=400)
    return JSONResponse({"presets": preset_names(), "preset": preset, "description": description, "fields": fields})


def launch_args(preset: str, name: str, values: dict[str, str], runs_dir) -> list[str]:
    """`train --preset P --out RUNS_DIR/NAME key=value...` for the keys the form changed; checked as `train`
    checks them (a SapoError with the CLI's message and hint)."""
    if not RUN_NAME.fullmatch(name or ""):
        raise Refused("name the run with letters, digits, `.`, `_` or `-` (it becomes a folder in RUNS_DIR)", 400)
    preset_values = {f["key"]: f["value"] for f in schema_fields(preset)}
    overrides = [f"{key}={text}" for key, text in values.items()
                 if key in preset_values and str(text).strip() != preset_values[key]]
    unknown = [f"{key}={text}" for key, text in values.items() if key not in preset_values]
    load_config(preset, None, overrides + unknown)  # the CLI's checks, the CLI's errors
    return ["train", "--preset", preset, "--out", str(inside_runs(runs_dir, name)), *overrides, *unknown]


async def launch(request: Request) -> JSONResponse:
    _writable(request)
    settings = request.app.state.settings
    body = await request.json()
    name = str(body.get("name", ""))
    try:
        args = launch_args(str(body.get("preset") or "tiny"), name, dict(body.get("values") or {}), settings.runs_dir)
    except SapoError as exc:
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=400)
    job = settings.jobs.start("train", name, args)
    return JSONResponse(job.to_dict())


async def stop(request: Request) -> JSONResponse:
    _writable(request)
    settings = request.app.state.settings
    path = run_folder(settings.runs_dir, (await request.json()).get("run"))
    pid = writer_pid(path)
    job = settings.jobs.running_for(path.name)
    if pid is None and job is not None and job.kind in ("train", "resume"):
        pid = job.process.pid  # still loading: it has not taken the lock yet
    if pid is None:
        raise Refused(f"`{path.name}` is not training: there is nothing to stop", 409)
    interrupt(pid)
    return JSONResponse({"stopping": path.name, "pid": pid})


async def resume(request: Request) -> JSONResponse:
    _writable(request)
    settings = request.app.state.settings
    body = await request.json()
    path = run_folder(settings.runs_dir, body.get("run"))
    overrides = str(body.get("overrides") or "").split()
    job = settings.jobs.start("resume", path.name, ["train", "--resume", str(path), *overrides])
    return JSONResponse(job.to_dict())


async def export(request: Request) -> JSONResponse:
    _writable(request)
    settings = request.app.state.settings
    body = await request.json()
    path = run_folder(settings.runs_dir, body.get("run"))
    adapter = str(body.get("adapter") or "policy")
    if body.get("format") == "gguf":
        quant = str(body.get("quant") or "q8_0")
        out = path.parent / f"{path.name}-{adapter}-{quant}.gguf"
        args = ["merge", str(path), "--out", str(out), "--quant", quant, "--adapter", adapter]
    else:
        out = path.parent / f"{path.name}-{adapter}-merged"
        args = ["merge", str(path), "--out", str(out), "--adapter", adapter]
    job = settings.jobs.start("export", path.name, args)
    return JSONResponse({**job.to_dict(), "out": out.name})


async def jobs(request: Request) -> JSONResponse:
    try:
        from ...tools.gguf_export.quants import QUANT_TYPES

        quants = list(QUANT_TYPES)
    except ImportError:  # the `gguf` extra is not installed: merged folders only; `merge` says what to install
        quants = []
    return JSONResponse({"jobs": [job.to_dict() for job in request.app.state.settings.jobs.all()], "quants": quants})


ROUTES = [
    Route("/launch", control_page), Route("/api/schema", schema), Route("/api/launch", launch, methods=["POST"]),
    Route("/api/stop", stop, methods=["POST"]), Route("/api/resume", resume, methods=["POST"]),
    Route("/api/export", export, methods=["POST"]), Route("/api/jobs", jobs),
]
