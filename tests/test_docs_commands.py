"""Every `sapo-lite` command shown in README.md and docs/*.md still runs: a renamed flag or key fails here,
not in a reader's terminal.

The commands are the lines of the ```bash / ```sh / ```console blocks that start with `sapo-lite` (or
`$ sapo-lite`), and the `-m sapo_lite ...` part of `accelerate launch` / `torchrun` lines. Each page's
commands run in order, in a scratch folder of their own holding `runs/tiny` (a copy of a finished
two-step tiny run) and `chats.jsonl` (a few chat rows), with the CLI in this process. What each gets:

1. Every command is parsed by its own command's option parser: an option that does not exist, a missing
   value or a missing argument fails.
2. `presets`, `estimate`, `env`, `--help` and any `--dry-run`: run as written.
3. `train` on the `tiny` preset (or no preset): run with `--out` in the scratch folder and
   `train.max_steps=2 train.num_threads=1` added (the demo's 300 steps would take the test's budget);
   a page with such a run is tested as `slow`.
4. Every other `train` (the GPU presets, the real model: downloads, conversions, minutes to hours of
   training): run with `--dry-run` added, which resolves every KEY=VALUE against the config and loads
   nothing. `train --resume RUN`: with `--dry-run` when RUN is in the scratch folder (the resume's own
   checks run: checkpoint, keys that may change), else its keys are checked against the resumable ones.
   A `model.init_adapter=PATH` that the page does not make in the scratch folder (stage 2 of a recipe
   whose stage 1 takes minutes): the dry-run goes without it, since the checks before loading would
   rightly refuse a missing adapter folder.
5. `generate`, `eval`, `merge`, `plot`, `buffer` on a run or model folder that exists in the scratch
   folder (`runs/tiny`, or what an earlier command of the page made, e.g. `merged/`): run as written.
   On a run the docs do not make cheaply (`RUN`, `runs/smollm2-135m`, a run of your own data): parsed
   only (rule 1), since training it first is what the docs describe as minutes or hours.
6. Any other command: parsed only (rule 1), until a rule here says how to run it cheaply.
7. A `$ sapo-lite ...` line of a console block answered by an `error:` line is an example of a refusal: it
   must still be refused (by the rules above, or when run), never run through.

Lines that do not start with `sapo-lite` (pip, pytest, python bench/..., llama-cli, ollama) are not run.
The command synopses in plain ``` blocks (docs/cli.md) are checked too: every option they name exists.
Beside them: every command answers --help, every relative link finds its page and heading, and
.ci/run runs exactly the README's install and test commands in a virtual environment of its own.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from helpers import write_jsonl
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.config.schema import RESUMABLE_KEYS
from sapo_lite.config.sources import parse_override
from sapo_lite.errors import SapoError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "console", "shell"}
RUN_AS_WRITTEN = {"presets", "estimate", "env"}  # quick, and they write nothing
RUN_COMMANDS = {"generate", "eval", "merge", "plot", "buffer"}  # their first argument is a run or model folder
TINY_RUN_LIMITS = ["train.max_steps=2", "train.num_threads=1"]
FENCE = re.compile(r"^\s*```\s*([\w-]*)\s*$")

runner = CliRunner()
cli = typer.main.get_command(app)


@dataclass
class DocCommand:
    where: str  # `docs/gpu.md:59`
    args: list[str]  # what follows `sapo-lite`
    shell: bool  # from a shell block (run it), or a synopsis in a plain block (check its options)
    refused: bool = False  # a `$ sapo-lite ...` line the page shows answered by an `error:` line: it must fail

    def __str__(self) -> str:
        return f"{self.where}: sapo-lite {shlex.join(self.args)}"


def doc_commands(page: Path, text: str | None = None) -> list[DocCommand]:
    """The sapo-lite commands of one Markdown page, in the page's order."""
    commands, language, pending = [], None, ""
    lines = (page.read_text() if text is None else text).splitlines()
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence:
            language = (fence.group(1) or "plain") if language is None else None
            continue
        if language is None:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):  # a command continued on the next line
            pending = line[:-1] + " "
            continue
        pending = ""
        if language in SHELL_LANGUAGES:
            args = sapo_lite_args(line.removeprefix("$ "))
            if args is not None:
                answer = lines[number].strip() if number < len(lines) else ""
                refused = line.startswith("$ ") and answer.startswith("error:")
                commands.append(DocCommand(f"{page.relative_to(ROOT)}:{number}", args, shell=True, refused=refused))
        elif line.startswith("sapo-lite "):
            commands.append(DocCommand(f"{page.relative_to(ROOT)}:{number}", line.split()[1:], shell=False))
    return commands


def sapo_lite_args(line: str) -> list[str] | None:
    """The arguments after `sapo-lite` (or `-m sapo_lite`), up to a shell operator or comment; None for
    a line that runs something else."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word and (set(word) <= set(";&|") or re.match(r"\d*[<>]", word)):  # an operator or a redirection
            break
        words.append(word)
    if words[:1] == ["sapo-lite"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["-m", "sapo_lite"] and words[0] != "sapo-lite":
            return words[i + 2:]
    return None


class NotInTheCli(Exception):
    """A documented command, option or argument the CLI's parser refuses."""


def parsed(command: DocCommand) -> dict:
    """Rule 1: the command's own parser, as the shell would call it; its parameters as parsed."""
    root = typer.Context(cli, info_name="sapo-lite")
    name, rest = command.args[0], command.args[1:]
    sub = cli.get_command(root, name)
    if sub is None:
        raise NotInTheCli(f"no command `{name}` (commands: {', '.join(cli.list_commands(root))})")
    if not command.shell:  # a synopsis, `[--adapter base,policy,ema]`: only its option names are real
        known = {opt for param in sub.params for opt in param.opts}
        unknown = [opt for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(rest)) if opt not in known]
        if unknown:
            raise NotInTheCli(f"No such option: {', '.join(unknown)}")
        return {}
    if "--help" in rest:
        return {}
    try:
        return sub.make_context(name, list(rest), parent=root).params
    except Exception as exc:  # click's usage errors (Typer ships its own click): they say what is wrong
        if not hasattr(exc, "format_message"):
            raise
        raise NotInTheCli(exc.format_message()) from None


def what_to_run(command: DocCommand, params: dict, scratch: Path) -> list[str] | None:
    """Rules 2-5: the arguments to run, or None when the command is only parsed."""
    name, args = command.args[0], list(command.args)
    if name in RUN_AS_WRITTEN or "--help" in args:
        return args
    if name in RUN_COMMANDS:
        return args if (scratch / folder_argument(name, params)).exists() else None
    if name != "train":
        return None  # a command these rules do not know how to run cheaply (a server, say): parsed only
    if "--dry-run" in args:
        return args
    if params["resume"] is not None:
        if (scratch / params["resume"]).is_dir():
            return [*args, "--dry-run"]
        for text in params["overrides"] or []:
            key, _ = parse_override(text)
            if key not in RESUMABLE_KEYS:
                raise NotInTheCli(f"`{key}` cannot change on resume (resumable: {', '.join(sorted(RESUMABLE_KEYS))})")
        return None
    if params["preset"] in (None, "tiny") and params["config"] is None:
        out = scratch / "runs" / f"doc-{command.where.replace('/', '-').replace(':', '-')}"
        return [*without_option(args, "--out"), "--out", str(out), *TINY_RUN_LIMITS]
    missing_adapter = [word for word in args if word.startswith("model.init_adapter=")
                       and not (scratch / word.split("=", 1)[1]).exists()]
    return [*(word for word in args if word not in missing_adapter), "--dry-run"]


def folder_argument(name: str, params: dict) -> Path:
    """The run or model folder a command works on: its first positional argument, as parsed."""
    sub = cli.get_command(typer.Context(cli, info_name="sapo-lite"), name)
    first = next(param for param in sub.params if param.param_type_name == "argument")
    return Path(params[first.name])


def without_option(args: list[str], option: str) -> list[str]:
    kept, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word == option:
            skip = True
        elif not word.startswith(option + "="):
            kept.append(word)
    return kept


def failure(command: DocCommand, scratch: Path) -> str | None:
    """Why this documented command no longer works, or None when it does."""
    try:
        params = parsed(command)
    except NotInTheCli as exc:
        return f"{command}\n  {exc}"
    if not command.shell:
        return None  # a synopsis: its options exist, its placeholders are not values
    try:
        args = what_to_run(command, params, scratch)
    except (NotInTheCli, SapoError) as exc:
        return None if command.refused else f"{command}\n  {exc}"
    if args is None:
        return None
    result = runner.invoke(app, args)
    if command.refused:  # shown as an example of a refusal: it must still be refused
        return f"{command}\n  shown refused, but ran: sapo-lite {shlex.join(args)}" if result.exit_code == 0 else None
    if result.exit_code != 0:
        tail = "\n  ".join((result.output or repr(result.exception)).strip().splitlines()[-6:])
        return f"{command}\n  ran as: sapo-lite {shlex.join(args)}\n  exit {result.exit_code}:\n  {tail}"
    return None


@pytest.fixture
def scratch(tmp_path, monkeypatch, finished_tiny_run):
    """A folder to run a page's commands in: `runs/tiny` and `chats.jsonl` are there, as the docs assume."""
    shutil.copytree(finished_tiny_run, tmp_path / "runs" / "tiny")
    write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(40)
    ])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def trains(page: Path) -> bool:
    """Whether a page's commands include a tiny training run (rule 3): seconds each, so `slow`."""
    for command in doc_commands(page):
        try:
            args = what_to_run(command, parsed(command), ROOT) if command.shell else None
        except (NotInTheCli, SapoError):
            continue  # the test itself reports it
        if args and args[-len(TINY_RUN_LIMITS):] == TINY_RUN_LIMITS:
            return True
    return False


@pytest.mark.parametrize("page", [pytest.param(page, marks=[pytest.mark.slow] if trains(page) else [])
                                  for page in PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_on_the_page_runs(page, scratch):
    commands = doc_commands(page)
    failures = [message for command in commands if (message := failure(command, scratch))]
    assert not failures, "documented commands that no longer work:\n" + "\n".join(failures)


def test_the_pages_show_the_commands_a_newcomer_needs():
    """The README shows the demo and the test command; the docs show presets and estimate in shell blocks."""
    shown = {c.args[0] for page in PAGES for c in doc_commands(page) if c.shell}
    assert {"train", "presets", "estimate", "generate", "merge", "eval", "plot", "buffer", "env"} <= shown
    readme = ROOT.joinpath("README.md").read_text()
    assert "sapo-lite train --preset tiny" in readme and "\npytest " in readme


def shell_lines(text: str) -> list[str]:
    """Command lines without comments or blank lines."""
    lines = (re.sub(r"(^|\s+)#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    """CI is a newcomer following the README: from its virtual environment on, .ci/run runs the README's
    install block and then its test command, nothing else (system packages may come before)."""
    readme = ROOT.joinpath("README.md").read_text()
    install = re.search(r"## Install\n+```bash\n(.*?)```", readme, flags=re.S).group(1)
    test_command = re.search(r"^pytest\b.*$", readme, flags=re.M).group(0)
    ci = shell_lines(ROOT.joinpath(".ci", "run").read_text())
    venv = [i for i, line in enumerate(ci) if line.startswith("python3 -m venv")]
    assert venv, ".ci/run installs into whatever Python is active: it makes no virtual environment"
    assert ci[venv[0]:] == [*shell_lines(install), *shell_lines(test_command)]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_links_between_the_pages_lead_somewhere():
    """Moving text between pages breaks links first: every relative link (images too) finds its file and
    heading."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https://...
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: ({target})")
    assert not broken, broken


def test_every_command_answers_help():
    commands = cli.list_commands(typer.Context(cli, info_name="sapo-lite"))
    for args in (["--help"], *([name, "--help"] for name in commands)):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output, (args, result.output)


def test_a_renamed_flag_or_key_is_caught(tmp_path, monkeypatch):
    """What this file is for: a page that names a flag or key the CLI no longer has fails it."""
    monkeypatch.chdir(tmp_path)
    page = ROOT / "docs" / "example.md"
    text = ("```bash\n"
            "sapo-lite merge runs/smollm2-135m --out smol.gguf --quantize f16   # was --quant\n"
            "sapo-lite train --preset llama3-8b-qlora train.max_step=5\n"
            "accelerate launch --num_processes 2 -m sapo_lite train --resume runs/x data.path=other.jsonl\n"
            "sapo-lite estimate --preset llama3-8b-qlora --gpu 24\n"
            "```\n"
            "```\n"
            "sapo-lite generate RUN --prompt TEXT [--max-tokens N]\n"
            "```\n")
    messages = [failure(command, tmp_path) for command in doc_commands(page, text)]
    assert len(messages) == 5 and all(messages), messages
    assert "No such option: --quantize" in messages[0]
    assert "train.max_step" in messages[1] and "train.max_steps" in messages[1]  # the key it meant
    assert "`data.path` cannot change on resume" in messages[2]
    assert "No such option: --gpu" in messages[3] and "No such option: --max-tokens" in messages[4]
