"""`sapo-lite eval`: how well each role of a run follows held-out instructions, as a table or JSON, and what
each role answered to each prompt (`--answers`)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ..config.schema import HOLDOUT
from ..errors import ConfigError
from .common import app, console, parse_roles, quiet_libraries, reports_errors, roles_for, run_and_adapter

if TYPE_CHECKING:
    from ..config.schema import Config
    from ..run.layout import RunDir


@app.command("eval")
@reports_errors
def evaluate_run(
    run: Annotated[Path, typer.Argument(help="Run directory (the --out of `sapo-lite train`), or one of its adapters "
                                        "(RUN/adapters/best)")],
    adapter: Annotated[
        str | None, typer.Option(help="Roles side by side, from base, policy, ema, best (default base,policy,ema, "
                                 "and best where the run kept one; for RUN/adapters/NAME base,NAME)")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Evaluation data: a .jsonl/.json/.parquet file or bundled:NAME "
                                 "(default: the run's held-out set: its data.eval_path, or RUN/held_out.jsonl)")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file")] = None,
    answers_out: Annotated[
        Path | None, typer.Option("--answers", help="Also write each prompt's answers and the checks they passed "
                                  "to this JSON Lines file")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N prompts")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Longest answer in tokens (default: the run's data.eval_max_new_tokens)")
    ] = None,
) -> None:
    """Greedy answers of each role to held-out prompts, scored per constraint kind and overall.

    By default the run's own held-out set: its data.eval_path, or the rows it held out of its training data
    (RUN/held_out.jsonl).

    Data whose rows carry `constraints` is scored by the checkers in
    sapo_lite/data/constraints.py (plus answer correctness where rows carry `answer`); other data by exact match
    with the reference response and, where rows carry neither constraints nor answers, the reference responses'
    NLL per token (what free-form answers can be scored by).
    """
    from ..data.examples import detect_column, load_rows, prompt_text, row_metadata, tokenize_dataset
    from ..data.scoring import answer_records, counted
    from ..run.layout import RunDir

    run, named = run_and_adapter(run)
    roles = parse_roles(roles_for(run, named, adapter))
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} is not a number of prompts", "pass --limit 1 or more, or leave it out")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    for flag, path in (("--json", json_out), ("--answers", answers_out)):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            problem = "is a folder" if path.is_dir() else f"is in a folder that does not exist ({path.parent})"
            raise ConfigError(f"{flag} {path} {problem}", "pass a file path in an existing folder")
    cfg = RunDir(run).read_config()
    for role in roles:
        if role != "base":
            RunDir(run).adapter_to_load(role)  # a missing adapter fails here, before the model loads
    data_path, described = data, data
    if data is None:
        data_path, described = run_held_out_set(RunDir(run), cfg)
    quiet_libraries()
    rows = load_rows(data_path, None, key="--data")  # a single file whole, else its test split
    # Data without prompts, or with an unknown constraint kind, fails before the model loads.
    detect_column(rows.columns, cfg.data.column, rows.rows)
    for row in rows.rows:
        row_metadata(row)
    import torch

    from ..models.generation import evaluate_role
    from ..tools.open_run import open_run
    from ..train.held_out import is_free_form, reference_nll

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    started = time.perf_counter()
    loaded = open_run(run, roles)
    data_cfg = dataclasses.replace(cfg.data, max_examples=limit)
    tokenized = tokenize_dataset(rows, loaded.tokenizer, data_cfg)
    examples = tokenized.examples
    new_tokens = max_new_tokens or cfg.data.eval_max_new_tokens
    dropped = f" ({tokenized.dropped_long_prompt} dropped: prompt > {cfg.data.max_prompt_len} tokens)"
    console.print(f"eval: {counted(len(examples), 'prompt')} from {described}"
                  f"{dropped if tokenized.dropped_long_prompt else ''}, greedy, at most {new_tokens} new tokens",
                  highlight=False)
    scores = {}
    with loaded.generating():
        for role in roles:
            scores[role] = evaluate_role(loaded.model, loaded.tokenizer, examples, role, new_tokens, loaded.stop_ids)
    figures = {role: score.to_dict() for role, score in scores.items()}
    if is_free_form(examples):  # exact match says little on free-form answers: the references' NLL beside it
        for role in roles:
            figures[role]["reference_nll"] = round(reference_nll(
                loaded.model, examples, role, loaded.tokenizer.pad_token_id, cfg.train.micro_batch,
                cfg.train.logps_chunk_tokens), 4)
    wall_s = time.perf_counter() - started

    report = {
        "run": str(run), "data": data_path, "prompts": len(examples), "max_new_tokens": new_tokens,
        "wall_s": round(wall_s, 2), "roles": figures,
    }
    console.print(results_table(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {json_out}", highlight=False)
    if answers_out is not None:
        records = answer_records(examples, [prompt_text(tokenized, ex) for ex in examples], scores)
        answers_out.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        console.print(f"wrote {answers_out}: each prompt's answers and the checks they passed", highlight=False)
    console.print(f"done in {wall_s:.1f}s", highlight=False)


def run_held_out_set(run_dir: RunDir, cfg: Config) -> tuple[str, str]:
    """(the data `eval RUN` scores by default, how to name it): the run's data.eval_path, or the rows the run held
    out of its own training data."""
    if cfg.data.eval_path == HOLDOUT:
        rows = run_dir.held_out_rows
        if not rows.is_file():
            raise ConfigError(f"`{run_dir}` held out no rows of its data (no {rows.name}: too few examples, or a run "
                              "from before sapo-lite wrote them)", "pass --data FILE.jsonl or --data bundled:NAME")
        return str(rows), f"{rows} (the rows this run held out of {cfg.data.path}, never trained on)"
    if not cfg.data.eval_path:
        raise ConfigError(f"`{run_dir}` has no data.eval_path", "pass --data FILE.jsonl or --data bundled:NAME")
    return cfg.data.eval_path, cfg.data.eval_path



def _cell(tally: dict[str, Any] | None) -> str:
    return "-" if tally is None else f"{tally['rate']:.1%} ({tally['hits']}/{tally['total']})"


def results_table(report: dict[str, Any]) -> Table:
    """Rows: each constraint kind, all constraints, prompts fully satisfied, answers; a column a role."""
    from ..data.scoring import counted  # here: --help loads no numpy

    roles = report["roles"]
    table = Table("", *roles, title=f"{report['data']}: {counted(report['prompts'], 'prompt')}")
    kinds = sorted({kind for score in roles.values() for kind in score.get("per_kind", {})})
    for kind in kinds:
        table.add_row(kind, *(_cell(score["per_kind"].get(kind)) for score in roles.values()))
    if kinds:
        table.add_section()
    rows = [("all constraints", "constraints"), ("prompts fully satisfied", "prompts_all_satisfied"),
            ("answer accuracy", "answer_accuracy"), ("exact match", "exact_match")]
    for label, key in rows:
        if any(key in score for score in roles.values()):
            table.add_row(f"[bold]{label}[/]", *(_cell(score.get(key)) for score in roles.values()))
    if any("reference_nll" in score for score in roles.values()):
        table.add_row("[bold]reference NLL[/] (per token, lower is better)",
                      *(f"{score['reference_nll']:.3f}" if "reference_nll" in score else "-"
                        for score in roles.values()))
    return table
