"""`sapo-lite eval` and the end-of-training figure on constraint data, through the CLI on a tiny run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.data.constraints import CHECKERS

runner = CliRunner()
ASSETS = Path(__file__).resolve().parents[2] / "sapo_lite" / "assets"
EVAL_ROWS = [json.loads(line) for line in (ASSETS / "instruct-eval.jsonl").read_text().splitlines()]
TRAIN_ROWS = [json.loads(line) for line in (ASSETS / "instruct.jsonl").read_text().splitlines()]
HELD_OUT = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step tiny run whose held-out data is the bundled instruction set."""
    out = tmp_path_factory.mktemp("runs") / "run"
    # A user's own eval file (a bundled eval set would follow its own bundled training data).
    eval_file = tmp_path_factory.mktemp("data") / "instruct-eval.jsonl"
    eval_file.write_text((ASSETS / "instruct-eval.jsonl").read_text())
    result = runner.invoke(app, [
        "train", "--out", str(out), "train.max_steps=2", "sapo.gen_per_step=4", "train.micro_batch=4",
        f"data.eval_path={eval_file}", f"data.eval_size={HELD_OUT}",
    ])
    assert result.exit_code == 0, result.output
    return out, result.output


def _constraints_in(rows):
    return sum(len(row["constraints"]) for row in rows)


def test_training_reports_constraint_satisfaction_before_and_after(run):
    out, output = run
    total = _constraints_in(EVAL_ROWS[:HELD_OUT])
    assert "held-out instruction following, base (adapters off): " in output
    assert f"of {total} constraints ({HELD_OUT} prompts)" in output
    assert "held-out instruction following: base " in output and "exact match" not in output
    summary = json.loads((out / "summary.json").read_text())
    recorded = json.loads((out / "held-out.json").read_text())
    for role in ("base", "policy"):
        tally = recorded[role]["constraints"]
        assert tally["total"] == total and summary[f"eval_constraints_{role}"] == round(tally["hits"] / total, 4)
        assert f"{tally['hits'] / total:.1%} of {total} constraints" in output
        kinds = {c["kind"] for row in EVAL_ROWS[:HELD_OUT] for c in row["constraints"]}
        assert set(summary[f"eval_per_kind_{role}"]) == kinds
        assert f"eval_answer_accuracy_{role}" in summary
    assert recorded["base"]["constraints"]["total"] == total
    assert sum(t["total"] for t in recorded["base"]["per_kind"].values()) == total


def test_eval_table_and_json_match_the_end_of_training_figures(run, tmp_path):
    out, _ = run
    json_path = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(out), "--limit", str(HELD_OUT), "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    for label in ("all constraints", "prompts fully satisfied", "answer accuracy", "base", "policy", "ema"):
        assert label in result.output
    report = json.loads(json_path.read_text())
    assert report["prompts"] == HELD_OUT and list(report["roles"]) == ["base", "policy", "ema"]
    recorded = json.loads((out / "held-out.json").read_text())
    # Same prompts, same greedy decoding: the same figures the run reported for base and policy.
    assert report["roles"]["base"] == recorded["base"]
    assert report["roles"]["policy"] == recorded["policy"]
    for kind, tally in report["roles"]["ema"]["per_kind"].items():
        assert kind in CHECKERS and f"{tally['rate']:.1%} ({tally['hits']}/{tally['total']})" in result.output


def test_eval_limit_adapter_and_max_new_tokens(run, tmp_path):
    out, _ = run
    json_path = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(out), "--adapter", "policy", "--limit", "3", "--max-new-tokens", "2",
                                 "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert list(report["roles"]) == ["policy"] and report["max_new_tokens"] == 2
    assert report["roles"]["policy"]["constraints"]["total"] == _constraints_in(EVAL_ROWS[:3])


def test_data_without_constraints_falls_back_to_exact_match(run, tmp_path):
    out, _ = run
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse : {i} 2", "response": f"2 {i}"}) + "\n" for i in range(3)))
    json_path = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(out), "--data", str(data), "--adapter", "base", "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    base = json.loads(json_path.read_text())["roles"]["base"]
    assert base["exact_match"]["total"] == 3 and "constraints" not in base
    assert "exact match" in result.output and "all constraints" not in result.output


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A user's own `messages` file of 40 rows under the tiny preset, whose bundled eval set belongs to its
    bundled data: the run holds 4 of the user's rows out instead."""
    folder = tmp_path_factory.mktemp("own")
    rows = [{"messages": [{"role": "user", "content": row["prompt"]},
                          {"role": "assistant", "content": row["response"]}],
             "constraints": row["constraints"], "answer": row["answer"]} for row in TRAIN_ROWS[:40]]
    data = folder / "mine.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = folder / "run"
    result = runner.invoke(app, ["train", "--out", str(out), f"data.path={data}", "train.max_steps=2",
                                 "sapo.gen_per_step=4", "train.micro_batch=4"])
    assert result.exit_code == 0, result.output
    return out, data, rows, result.output


def test_the_resolved_config_says_what_the_run_holds_out_and_why(own_run, tmp_path):
    out, data, rows, output = own_run
    why = f"bundled:tiny-reverse-eval belongs to bundled:tiny-reverse: held out from {data} instead"
    assert f"config: data.eval_path=holdout ({why}" in output
    assert f"eval: 4 examples held out from {data}, not trained on" in output
    config_text = (out / "config.yaml").read_text()
    assert f"  eval_path: holdout  # {why}" in config_text
    dry = runner.invoke(app, ["train", "--out", str(tmp_path / "never"), f"data.path={data}", "--dry-run"])
    assert f"  eval_path: holdout  # {why}" in dry.output and not (tmp_path / "never").exists()
    held_out = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 4 and all(row in rows for row in held_out)  # the user's rows, as written


def test_eval_of_a_run_scores_its_own_held_out_rows_and_says_so(own_run, tmp_path):
    out, data, _, _ = own_run
    result = runner.invoke(app, ["eval", str(out), "--json", str(tmp_path / "eval.json")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert (f"eval: 4 prompts from {out / 'held_out.jsonl'} (the rows this run held out of {data}, never trained "
            "on), greedy") in result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    recorded = json.loads((out / "held-out.json").read_text())
    assert report["prompts"] == 4 and report["roles"]["policy"] == recorded["policy"]  # what the run reported
    again = runner.invoke(app, ["eval", str(out), "--data", str(out / "held_out.jsonl"), "--adapter", "base",
                                "--json", str(tmp_path / "again.json")])
    assert again.exit_code == 0, again.output  # the file reads back as data too
    assert json.loads((tmp_path / "again.json").read_text())["roles"]["base"] == recorded["base"]


def test_eval_answers_writes_each_prompts_answers_and_checks(own_run, tmp_path):
    out, _, _, _ = own_run
    answers = tmp_path / "answers.jsonl"
    result = runner.invoke(app, ["eval", str(out), "--adapter", "base,policy", "--answers", str(answers),
                                 "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    held_out = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [row["messages"][0]["content"] for row in held_out]
    assert [r["reference"] for r in records] == [row["messages"][1]["content"] for row in held_out]
    report = json.loads((tmp_path / "eval.json").read_text())["roles"]
    for role in ("base", "policy"):
        assert all(isinstance(r["answers"][role], str) for r in records)
        passed = [c["passed"][role] for r in records for c in r["constraints"]]
        assert (sum(passed), len(passed)) == (report[role]["constraints"]["hits"], report[role]["constraints"]["total"])
        assert sum(r["answer_correct"][role] for r in records) == report[role]["answer_accuracy"]["hits"]
    assert [c["kind"] for c in records[0]["constraints"]] == [c["kind"] for c in held_out[0]["constraints"]]


def test_one_prompt_is_one_prompt(run, tmp_path):
    out, _ = run
    result = runner.invoke(app, ["eval", str(out), "--limit", "1", "--adapter", "base"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "eval: 1 prompt from " in result.output and "1 prompts" not in result.output


def _eval_error(args):
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, result.output
    return lines[0]


def test_bad_input_is_one_line_each(run, tmp_path):
    out, _ = run
    before = sorted(p.name for p in out.iterdir())
    assert "is not a sapo-lite run" in _eval_error([str(tmp_path / "missing")])
    assert "unknown role `critic`" in _eval_error([str(out), "--adapter", "base,critic"])
    assert "does not exist" in _eval_error([str(out), "--json", str(tmp_path / "no" / "eval.json")])
    assert "--limit 0" in _eval_error([str(out), "--limit", "0"])
    no_prompts = tmp_path / "texts.jsonl"
    no_prompts.write_text('{"text": "hello"}\n')
    assert "no usable column" in _eval_error([str(out), "--data", str(no_prompts)])
    assert sorted(p.name for p in out.iterdir()) == before  # eval never writes into the run


@pytest.mark.slow
def test_unknown_constraint_kind_is_one_line_from_the_console_script(run, tmp_path):
    out, _ = run
    bad_kind = tmp_path / "bad.jsonl"
    bad_kind.write_text(json.dumps({"prompt": "hi", "response": "hello", "constraints": [{"kind": "haiku"}]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "sapo_lite.cli", "eval", str(out), "--data", str(bad_kind)],
                          capture_output=True, text=True, env={**os.environ, "SAPO_DEBUG": "0"}, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == "error: unknown constraint kind `haiku`"


def test_scores_count_constraints_prompts_answers_and_exact_matches():
    import numpy as np

    from sapo_lite.data.examples import Example
    from sapo_lite.data.scoring import score_answers

    ids = np.zeros(1, np.int32)
    examples = [
        Example(ids, ids, "-", [{"kind": "all_lowercase"}, {"kind": "max_words", "n": 3}], "paris"),
        Example(ids, ids, "-", [{"kind": "no_commas"}], "8"),
        Example(ids, ids, "2 1"),
    ]
    score = score_answers("policy", ["it is paris.", "Yes, 8.", "2 1"], examples).to_dict()
    assert score["constraints"] == {"hits": 2, "total": 3, "rate": 0.6667}
    assert score["per_kind"]["no_commas"] == {"hits": 0, "total": 1, "rate": 0.0}
    assert score["prompts_all_satisfied"] == {"hits": 1, "total": 2, "rate": 0.5}
    assert score["answer_accuracy"] == {"hits": 2, "total": 2, "rate": 1.0}
    assert score["exact_match"] == {"hits": 1, "total": 1, "rate": 1.0}
    assert json.loads(json.dumps(score)) == score
