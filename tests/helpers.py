"""Helpers every test folder shares: the CLI in-process (`fails`) and as a subprocess (`run`,
`start_paused` at a named phase of the SAPO_TEST_PAUSE_AT hook, so a test can kill it exactly
there), data files, folder snapshots and metrics; small models with random adapters and what
`generate` makes of them, for the decoding tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from sapo_lite.cli import app

TINY = ["--preset", "tiny", "data.eval_path=null", "train.warmup_steps=2", "train.num_threads=1"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sapo_lite.cli", *args]


def run(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "300"})
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start_paused(cwd: Path, phase: str, *args: str, command: list[str] | None = None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """Start `sapo-lite ARGS` (or `command`) and return once it waits at `phase` (`name` or `name:n`)."""
    marker = cwd / f"paused-{time.monotonic_ns()}"
    env = {**(env or os.environ), "COLUMNS": "300", "SAPO_TEST_PAUSE_AT": phase, "SAPO_TEST_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen(command or cli(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not marker.exists():
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"never paused at {phase}: {err[-3000:]}")
    return proc, marker


def metrics(run_dir: Path) -> dict[int, float]:
    """step -> loss; asserts every line is valid JSON and no step appears twice."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["loss"] for r in records}


def one_line_error(proc: subprocess.CompletedProcess) -> list[str]:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and len(lines) <= 2, proc.stderr[-3000:]
    assert len(lines) == 1 or lines[1].startswith("hint: ")
    return lines


runner = CliRunner()


def fails(args: list[str], *expected: str) -> str:
    """Run the CLI in-process; check exit 1, `error:` + at most a `hint:` line, no traceback, and the expected words."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, result.output
    assert len(lines) == 1 or lines[1].startswith("hint: "), result.output
    assert "Traceback" not in result.output
    for word in expected:
        assert word in result.output, (word, result.output)
    return result.output


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    """A TCP port nobody listens on, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_random_adapters(base: Any, seed: int = 1, std: float = 0.3) -> Any:
    """`base` with policy and EMA adapters of random LoRA tensors (so EMA, policy and base all differ),
    in eval mode with the EMA active, as the loop generates."""
    import torch

    from sapo_lite.config.schema import LoraSettings
    from sapo_lite.models.roles import EMA, attach_adapters

    model = attach_adapters(base, LoraSettings(r=4, alpha=8), None, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.eval()
    model.set_adapter(EMA, inference_mode=True)
    return model


def tiny_mistral(seed: int = 0, **overrides: Any) -> Any:
    """A 2-layer Mistral (one KV head for four query heads), random weights, eval mode."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    shape = {"vocab_size": 60, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 1, "sliding_window": 4096, "pad_token_id": 0,
             "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**{**shape, **overrides})).eval()


def hf_tokens(model: Any, contexts: list[list[int]], new_tokens: int, stop_ids: list[int], pad_id: int = 0,
              **sampling: Any) -> list[list[int]]:
    """What `model.generate` writes after each left-padded context (greedy unless sampling is given)."""
    import torch

    from sapo_lite.models.generation import left_pad

    ids, mask = left_pad(contexts, pad_id)
    options = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=stop_ids,
                             pad_token_id=pad_id, **options)
    return out[:, ids.shape[1] :].tolist()


def random_contexts(seed: int, lengths: list[int], low: int = 5, high: int = 49) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=generator).tolist() for n in lengths]
