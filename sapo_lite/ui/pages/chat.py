"""Chat: one prompt, answered by each role of a run side by side (base, policy, EMA, and the best validation
step's adapter when the run kept one), or by a merged model folder inside RUNS_DIR.

The answers come from `sapo-lite generate`'s path: tools/open_run.py loads the run's base as training did, with
the run's chat template and stop tokens, and models/generation.py decodes (`stream_answer`: the same tokens as
`generate_answers`, handed over as they come). Greedy by default (as `generate`);
"sample" uses the run's own sampling settings (`sapo.temperature`, `top_k`, `top_p`: how its EMA wrote the
rejected answers). Each role's answer is streamed as it is decoded (JSON lines), one role after the other.
One model is kept loaded; asking another run loads that one instead.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ...config.schema import SapoConfig
from ...errors import SapoError
from ...run.layout import ADAPTER_WEIGHTS, RunDir
from ..run_state import model_folder_names, run_names
from ..safety import Refused, inside_runs
from ..shell import page

ROLES = ("base", "policy", "ema", "best")
MAX_NEW_TOKENS = 1024

BODY = """
<section><h2>Chat</h2>
<div class="controls"><label>model <select id="target"></select></label>
<label><input type="checkbox" id="sample"> sample <span id="sampling" class="note"></span></label>
<label>max new tokens <input type="number" id="max_new_tokens" value="64" min="1" max="1024" size="5"></label></div>
<textarea id="prompt" rows="3" placeholder="A prompt, as a user would write it"></textarea>
<div><button id="send">answer</button> <span id="chat-note" class="note"></span></div>
<div id="answers" class="columns"></div></section>
"""


async def chat_page(request: Request):
    return page(request, "Chat", BODY, ("chat.js",))


def roles_of(run_dir: Path) -> list[str]:
    """The roles a run can answer as now: base always; policy and ema once a checkpoint or the end wrote them;
    best when validation kept one."""
    run = RunDir(run_dir)
    roles = ["base"]
    for role in ("policy", "ema", "best"):
        final = run.adapter(role) / ADAPTER_WEIGHTS
        in_checkpoint = role != "best" and bool(run.completed_checkpoints())
        if final.is_file() or in_checkpoint:
            roles.append(role)
    return roles if len(roles) > 1 else []


def _sampling(run_dir: Path | None) -> dict[str, Any]:
    sapo = RunDir(run_dir).read_config().sapo if run_dir is not None else SapoConfig()
    return {"temperature": sapo.temperature, "top_k": sapo.top_k, "top_p": sapo.top_p}


async def targets(request: Request) -> JSONResponse:
    runs_dir = request.app.state.settings.runs_dir
    found = []
    for name in run_names(runs_dir):
        roles = roles_of(runs_dir / name)
        if roles:
            found.append({"name": name, "kind": "run", "roles": roles, "sampling": _sampling(runs_dir / name)})
    for name in model_folder_names(runs_dir):
        found.append({"name": name, "kind": "model folder", "roles": ["answer"], "sampling": _sampling(None)})
    return JSONResponse({"targets": found})


class LoadedModel:
    """The one model the Chat page keeps in memory, and the lock that lets one request decode at a time."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model: Any = None
        self.lock = threading.Lock()

    def get(self, path: Path, roles: list[str]) -> Any:
        from ...tools.open_run import open_model_folder, open_run

        plain = roles == ["answer"]
        key = (path, tuple(roles), _adapters_stamp(path))  # a newer checkpoint or final adapter reloads
        if key != self.key:
            self.model = None  # the old one is freed before the new one loads
            self.model = open_model_folder(path) if plain else open_run(path, roles)
            self.key = key
        return self.model


def _adapters_stamp(path: Path) -> float:
    run = RunDir(path)
    folders = [run.adapters, *run.completed_checkpoints()[-1:]]
    return max((f.stat().st_mtime for f in folders if f.exists()), default=0.0)


LOADED = LoadedModel()


def answer_lines(path: Path, roles: list[str], prompt: str, max_new_tokens: int,
                 sampling: dict | None) -> Iterator[str]:
    """JSON lines: `{"role": ..., "text": ...}` each time a role's answer grows, `{"role": ..., "done": true}` when
    it is complete, one role after the other; `{"error": ...}` on a SapoError."""
    import contextlib

    from ...models.generation import stream_answer
    from ...models.roles import acting_as

    with LOADED.lock:
        try:
            loaded = LOADED.get(path, roles)
            prompt_ids = loaded.prompt_ids(prompt)
            for role in roles:
                plain = role == "answer"
                with contextlib.nullcontext() if plain else acting_as(loaded.model, role), loaded.generating():
                    for text in stream_answer(loaded.model, loaded.tokenizer, prompt_ids, max_new_tokens,
                                              loaded.stop_ids, **(sampling or {})):
                        yield json.dumps({"role": role, "text": text}) + "\n"
                yield json.dumps({"role": role, "done": True}) + "\n"
        except SapoError as exc:
            yield json.dumps({"error": exc.message, "hint": exc.hint}) + "\n"


async def chat(request: Request) -> StreamingResponse:
    body = await request.json()
    runs_dir = request.app.state.settings.runs_dir
    path = inside_runs(runs_dir, body.get("target"))
    prompt = str(body.get("prompt", ""))
    if not prompt.strip():
        raise Refused("the prompt is empty: write what the models should answer", 400)
    try:
        max_new_tokens = int(body.get("max_new_tokens", 64))
    except (TypeError, ValueError) as exc:
        raise Refused("max new tokens must be a number", 400) from exc
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise Refused(f"max new tokens must be 1 to {MAX_NEW_TOKENS}", 400)
    if path.parent == runs_dir and RunDir(path).is_run():
        roles = [r for r in body.get("roles") or roles_of(path) if r in roles_of(path)]
        sampling = _sampling(path) if body.get("sample") else None
    elif path.parent == runs_dir and path.name in model_folder_names(runs_dir):
        roles = ["answer"]
        sampling = _sampling(None) if body.get("sample") else None
    else:
        raise Refused(f"`{body.get('target')}` is neither a run nor a model folder in {runs_dir}", 404)
    if not roles:
        raise Refused(f"`{path.name}` has no adapters yet: wait for its first checkpoint", 409)
    lines = answer_lines(path, roles, prompt, max_new_tokens, sampling)
    return StreamingResponse(iterate_in_threadpool(lines), media_type="application/x-ndjson")


ROUTES = [Route("/chat", chat_page), Route("/api/chat/targets", targets), Route("/api/chat", chat, methods=["POST"])]
