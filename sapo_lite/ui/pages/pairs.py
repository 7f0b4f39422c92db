"""Pairs: what the replay buffer holds, as a reader wants it, read-only while the run writes it.

Each pair: the prompt, the chosen and the rejected response with the rewritten segment highlighted at its cut
point, the step it was made, its ending (tail kept / stopped / cut off) and whether the rewrite is identical to
the chosen text; or the validation split's pairs (RUN/validation.sqlite, what the policy is scored on every
`train.eval_every` steps). The texts are `buffer --show`'s (tools/buffer_view.py `pair_text`), from the same read-only
connection; filters: identical, cut off, step range, and origin for buffers that hold pairs of more than one origin.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ...errors import SapoError
from ...run.layout import RunDir
from ...sapo.augment import CUT_OFF, is_identical
from ...tools.buffer_view import newest_pairs, open_buffer_readonly, open_pairs_readonly, pair_text
from ..run_state import run_folder
from ..safety import Refused
from ..shell import page

SCAN = 5000  # pairs read to filter from: more than a buffer holds by default (2000)
SHOWN = 50

BODY = """
<section><h2>Pairs</h2>
<div class="controls"><label>run <select id="run"></select></label>
<label>pairs <select id="source"><option value="">replay buffer</option><option value="validation">validation split
</option></select></label>
<label>identical rewrites <select id="identical"><option value="">show</option><option value="hide">hide</option>
<option value="only">only</option></select></label>
<label>cut off <select id="cut_off"><option value="">show</option><option value="hide">hide</option>
<option value="only">only</option></select></label>
<label>steps <input type="number" id="first_step" min="0" size="5"> to <input type="number" id="last_step" min="0"
 size="5"></label>
<label id="origin-filter" hidden>origin <select id="origin"><option value="">all</option></select></label>
<button id="refresh">refresh</button></div>
<p id="pairs-note" class="note"></p><div id="pairs"></div></section>
"""


async def pairs_page(request: Request):
    return page(request, "Pairs", BODY, ("pairs.js",))


@functools.lru_cache(maxsize=4)
def _decoder(run_dir: Path, config_mtime: float) -> tuple[Any, list[int]]:
    """The run's tokenizer with its chat template, and its stop tokens: what `buffer --show` decodes with."""
    from ...data.examples import install_chat_template, stop_token_ids
    from ...models.roles import load_tokenizer

    cfg = RunDir(run_dir).read_config()
    tokenizer = load_tokenizer(RunDir(run_dir).base_model_name(cfg), cfg.model.trust_remote_code)
    install_chat_template(tokenizer, cfg.data.chat_template)
    return tokenizer, stop_token_ids(tokenizer)


def read_pairs(run_dir: Path, query: dict[str, str]) -> dict[str, Any]:
    first, last = _step(query, "first_step"), _step(query, "last_step")
    tokenizer, stop_ids = _decoder(run_dir, (run_dir / "config.yaml").stat().st_mtime)

    def decode(ids) -> str:
        return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    if query.get("source") == "validation":  # the validation split's pairs, scored every train.eval_every steps
        path = RunDir(run_dir).validation_pairs
        if not path.is_file():
            raise Refused(f"`{run_dir.name}` has no validation pairs (data.val_size and train.eval_every make them)",
                          404)
        db = open_pairs_readonly(path)
    else:
        db = open_buffer_readonly(run_dir)  # mode=ro: never writes into a run, even one training now
    try:
        candidates = newest_pairs(db, SCAN, first or 0, last)
    finally:
        db.close()
    rows = []
    for pair in candidates:
        text = pair_text(pair, decode, stop_ids)
        identical = is_identical(pair)
        origin = pair.origin
        if (not _passes(query.get("identical"), identical) or not _passes(query.get("cut_off"), text.ending == CUT_OFF)
                or (query.get("origin") and origin != query["origin"])):
            continue
        rows.append({"id": pair.pair_id, "step": pair.step_added, "drawn": pair.times_drawn, "identical": identical,
                     "ending": text.ending, "cut_tokens": [pair.trunc_point, pair.trunc_point + pair.segment_len],
                     "origin": origin, **vars(text)})
        if len(rows) == SHOWN:
            break
    origins = sorted({pair.origin for pair in candidates})  # the origin filter only where there is a choice
    return {"pairs": rows, "scanned": len(candidates), "shown_at_most": SHOWN,
            "origins": origins if len(origins) > 1 else None}


def _passes(choice: str | None, flag: bool) -> bool:
    return (choice == "only" and flag) or (choice == "hide" and not flag) or not choice


def _step(query: dict[str, str], key: str) -> int | None:
    text = query.get(key, "")
    if not text:
        return None
    if not text.isdigit():
        raise Refused(f"{key} must be a step number, got `{text}`", 400)
    return int(text)


async def pairs(request: Request) -> JSONResponse:
    run_dir = run_folder(request.app.state.settings.runs_dir, request.query_params.get("run"))
    try:
        found = await run_in_threadpool(read_pairs, run_dir, dict(request.query_params))
    except SapoError as exc:  # no buffer yet, a buffer that cannot be read: the CLI's words
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=409)
    return JSONResponse(found)


ROUTES = [Route("/pairs", pairs_page), Route("/api/pairs", pairs)]
