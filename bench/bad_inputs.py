"""Bad and unusual inputs a new user writes, and the message sapo-lite answers each with.

    python bench/bad_inputs.py            # one block per input: what was given, exit code, stderr

Not a timing: a review list. Every input runs through the real CLI (in this process, the tiny
preset, nothing trained past the checks), in a fresh temporary folder. The tests assert the
same messages (tests/test_input_*.py, tests/cli/test_errors.py); this prints them side by side.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOOD = {"prompt": "reverse : 1 2 3", "response": "3 2 1"}
CHAT = [{"role": "user", "content": "reverse : 1 2 3"}, {"role": "assistant", "content": "3 2 1"}]


def jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# (what a user did, files to write {name: text}, CLI arguments; {tmp} is the temporary folder)
CASES = [
    ("a null response", {"d.jsonl": jsonl(GOOD, {"prompt": "reverse : 1", "response": None}, GOOD)}, ["d.jsonl"]),
    ("an empty response", {"d.jsonl": jsonl(GOOD, {"prompt": "reverse : 1", "response": ""}, GOOD)}, ["d.jsonl"]),
    ("a number as the response", {"d.jsonl": jsonl(GOOD, {"prompt": "r", "response": 42}, GOOD)}, ["d.jsonl"]),
    ("rows of two shapes", {"d.jsonl": jsonl(GOOD, {"messages": CHAT}, GOOD)}, ["d.jsonl"]),
    ("a conversation ending with the user", {"d.jsonl": jsonl({"messages": CHAT}, {"messages": CHAT[:1]},
                                                             {"messages": CHAT})}, ["d.jsonl"]),
    ("an image content part", {"d.jsonl": jsonl({"messages": CHAT}, {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, CHAT[1]]},
        {"messages": CHAT})}, ["d.jsonl"]),
    ("Latin-1 bytes in a JSONL file", {"d.jsonl": None}, ["d.jsonl"]),
    ("a .txt data file", {"d.txt": "reverse : 1 2 3\n"}, ["d.txt"]),
    ("an empty folder as data", {"empty/": ""}, ["empty"]),
    ("a split the local file lacks", {"d.jsonl": jsonl(GOOD)}, ["d.jsonl", "data.split=validation"]),
    ("a data file that does not exist", {}, ["missing.jsonl"]),
    ("a malformed JSON Lines row", {"d.jsonl": jsonl(GOOD) + "{not json\n"}, ["d.jsonl"]),
    ("YAML with a bad indent", {"c.yaml": "train:\n  lr: 0.1\n   max_steps: 3\n"}, ["--config", "{tmp}/c.yaml"]),
    ("a folder as --config", {}, ["--config", "{tmp}"]),
    ("a config file given to --preset", {"mine.yaml": "train:\n  lr: 1.0e-4\n"}, ["--preset", "{tmp}/mine.yaml"]),
    ("a misspelt key", {}, ["train.learning_rate=1e-4"]),
    ("a bad value", {}, ["train.lr=fast"]),
    ("a LoRA target the model lacks", {}, ["lora.target_modules=qkv_proj"]),
    ("a micro-batch larger than the buffer", {}, ["sapo.buffer_size=4", "train.micro_batch=8"]),
    ("an unknown pair rule", {}, ["sapo.identical=skip"]),
    ("--resume with --overwrite", {}, ["--resume", "{tmp}", "--overwrite"]),
    ("a model that is not there", {}, ["model.name=/nowhere/model"]),
]
OTHER_COMMANDS = [
    ("estimate on a negative GPU size", ["estimate", "--gpu-gb", "-3"]),
    ("generate with an empty prompt", ["generate", "{tmp}", "--prompt", ""]),
    ("plot to a .txt file", ["plot", "{tmp}", "--out", "x.txt"]),
    ("merge of a folder that is not a run", ["merge", "{tmp}", "--out", "{tmp}/merged"]),
    ("buffer of a folder that is not a run", ["buffer", "{tmp}"]),
    ("eval of a folder that is not a run", ["eval", "{tmp}"]),
    ("eval --answers into a folder that does not exist", ["eval", "{tmp}", "--answers", "{tmp}/no/answers.jsonl"]),
    ("generate on a folder that is neither a run nor a model", ["generate", "{tmp}", "--prompt", "hi"]),
]


def run(args: list[str], tmp: Path) -> tuple[int, str]:
    from typer.testing import CliRunner

    from sapo_lite.cli import app

    result = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp)) for a in args])
    return result.exit_code, (result.stderr or result.output).strip()


def is_data_file(arg: str) -> bool:
    return not arg.startswith("-") and "=" not in arg


def main() -> None:
    cases = [(what, files, ["train", "--out", "{tmp}/run", "data.eval_path=null", "train.max_steps=1",
                            *([f"data.path={{tmp}}/{args[0]}", *args[1:]] if is_data_file(args[0]) else args)])
             for what, files, args in CASES]
    cases += [(what, {}, args) for what, args in OTHER_COMMANDS]
    one_line = 0
    for what, files, args in cases:
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            for name, text in files.items():
                if name.endswith("/"):
                    (tmp / name).mkdir()
                elif text is None:  # not UTF-8: a Latin-1 e-acute in the second row
                    (tmp / name).write_bytes(jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "response": "1"}\n')
                else:
                    (tmp / name).write_text(text)
            code, stderr = run(args, tmp)
            run_left = (tmp / "run").exists()
        lines = [line for line in stderr.splitlines() if line.startswith(("error:", "hint:"))]
        one_line += code == 1 and "Traceback" not in stderr and bool(lines) and not run_left
        print(f"## {what}\n$ sapo-lite {' '.join(args)}\nexit {code}{', run folder left behind' if run_left else ''}")
        print("\n".join(lines or stderr.splitlines()[-3:]) + "\n")
    print(f"{one_line} of {len(cases)} inputs: exit 1, an error line (and hint), no traceback, no run folder left")
    code, answer = run(["estimate", "--gpu-gb", "3"], Path("."))  # not an error: an answer
    print(f"\n## estimate on a 3 GB card (an answer, exit {code})\n{answer}")


if __name__ == "__main__":
    main()
