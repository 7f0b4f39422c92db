"""The app, its consoles, and the one place where a SapoError becomes `error: ...` and exit 1."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import ConfigError, SapoError, storage_error

# The order a user needs them in: plan and train, look at the result, ship it, inspect.
COMMAND_ORDER = ("train", "estimate", "presets", "eval", "generate", "merge", "plot", "buffer", "ui", "env")
# What an option takes, in words: `FILE` and `N` read better than Python's `<path>` and `<int>`.
TYPE_WORDS = {"<path>": "PATH", "<int>": "N", "<float>": "NUMBER", "<str>": "TEXT", "<list[str]>": "TEXT"}


class Commands(TyperGroup):
    """Typer's group with the commands in COMMAND_ORDER and option types as words."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: rank.get(name, len(rank)))

    def get_params(self, ctx: Any) -> list[Any]:
        return _in_words(super().get_params(ctx), ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _in_words(command.get_params(ctx), ctx)
            command.help = paragraphs_as_lines(command.help)
        return command


def paragraphs_as_lines(text: str | None) -> str | None:
    """A docstring's paragraphs with the source's line breaks removed, so --help wraps each one at the
    terminal's width instead of breaking a sentence where the source file did (Typer keeps those breaks
    after the first paragraph)."""
    if not text:
        return text
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(text).split("\n\n"))


def _in_words(params: list[Any], ctx: Any) -> list[Any]:
    for param in params:
        if param.param_type_name == "argument" and param.metavar is None:
            many = "..." if param.nargs != 1 else ""
            param.metavar = "KEY=VALUE" if param.name == "overrides" else param.name.upper() + many
        param.display_type_rich = functools.partial(_type_in_words, param)
    return params


def _type_in_words(param: Any, ctx: Any) -> str:
    if getattr(param, "is_flag", False) or param.param_type_name == "argument":
        return ""  # a switch takes no value; an argument's name already says what it is
    if param.metavar:
        return param.metavar
    return TYPE_WORDS.get(param.display_type(ctx), param.display_type(ctx).strip("<>").upper())


app = typer.Typer(
    cls=Commands,
    help="Self-Augmented Preference Optimization (SAPO) with LoRA on a 4-bit base.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)  # a line is never broken by the terminal width: logs stay greppable
err_console = Console(stderr=True, soft_wrap=True)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a SapoError as `error: ...` (+ `hint: ...`) and exit 1; SAPO_DEBUG=1 keeps the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SapoError as exc:
            if os.environ.get("SAPO_DEBUG") == "1":
                raise
            _print_error(exc)
            raise typer.Exit(1) from None
        except OSError as exc:  # a file the command reads or writes: one line, like every user error
            error = storage_error(exc, exc.filename)
            if error is None or os.environ.get("SAPO_DEBUG") == "1":
                raise
            _print_error(error)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _print_error(exc: SapoError) -> None:
    # escape: messages hold paths and `pip install "sapo-lite[plot]"`, not rich markup
    err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
    if exc.hint:
        err_console.print(f"[bold]hint:[/] {escape(exc.hint)}", highlight=False)


ROLES = ("base", "policy", "ema", "best")  # best: the policy of the best validation step, where a run kept one
ADAPTERS = ROLES[1:]


def parse_roles(adapter: str) -> list[str]:
    """`base,policy,ema,best` (any subset, in the user's order) from an --adapter option."""
    roles = [r.strip() for r in adapter.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ConfigError(f"unknown role `{', '.join(unknown) or adapter}`",
                          "--adapter takes base, policy, ema and best")
    return roles


def run_and_adapter(path: Path) -> tuple[Path, str | None]:
    """(the run, the adapter its path names): RUN/adapters/best is run RUN with adapter `best`; a run is itself."""
    from ..run.layout import adapter_in_run

    found = adapter_in_run(path)
    if found is None:
        return path, None
    run, name = found
    if name not in ADAPTERS:
        raise ConfigError(f"`{path}` is not one of the run's adapters ({', '.join(ADAPTERS)})",
                          f"pass the run `{run}` with --adapter {' or '.join(ADAPTERS)}")
    return run, name


def roles_for(run: Path, path_adapter: str | None, adapter: str | None) -> str:
    """The --adapter roles of eval/generate: as given; else the base beside the adapter a path names; else base,
    policy and ema, and best where the run kept one. An --adapter list must include the adapter the path names."""
    if path_adapter is None:
        kept_best = (Path(run) / "adapters" / "best" / "adapter_config.json").is_file()
        return adapter or ("base,policy,ema,best" if kept_best else "base,policy,ema")
    if adapter is None:
        return f"base,{path_adapter}"
    if path_adapter not in parse_roles(adapter):
        raise ConfigError(f"the path names the `{path_adapter}` adapter, but --adapter {adapter} leaves it out",
                          f"pass the run itself with --adapter {adapter}, or drop --adapter")
    return adapter


def quiet_libraries() -> None:
    """Keep the terminal for sapo-lite's own output: no library progress bars or deprecation chatter."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    # bitsandbytes' CPU 4-bit matmul backprops through an op without a registered autograd
    # kernel; the gradients are right (tests/test_nf4.py compares them with the dense model).
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels package notice
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its tokenizer reader's notes on templates it does not use
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


