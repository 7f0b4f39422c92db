"""Peak memory of the log-prob part: plain log_softmax(logits) against sapo-lite's chunked path.

    python bench/logps_memory.py [--tokens 2048] [--vocab 128256] [--hidden 1024] [--chunk 256]

One forward+backward of the output head for one sequence, as in a DPO step on Llama-3's
vocabulary. Each path runs in a fresh process; the figure is that process's peak RSS growth
over the step (VmHWM after, minus VmRSS before, the peak reset after a warm-up). It also
checks that both paths give the same log-probs and hidden-state gradients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
from sapo_lite.sapo.logps import response_token_logps

mode, tokens, vocab, hidden_size, chunk_tokens = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)

class Body(torch.nn.Module):  # stands in for the decoder: returns the given hidden states
    base_model_prefix = "body"
    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden
    def forward(self, **kwargs):
        return type("Out", (), {"last_hidden_state": self.hidden})()

class Model(torch.nn.Module):
    base_model_prefix = "body"
    def __init__(self, hidden, head):
        super().__init__()
        self.body, self.head = Body(hidden), head
    def get_output_embeddings(self):
        return self.head

def status_mb(field):
    line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))
    return int(line.split()[1]) / 1e3

head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
ids = torch.randint(0, vocab, (1, tokens))
mask = torch.ones(1, tokens, dtype=torch.bool)
mask[:, : tokens // 8] = False  # a short prompt

def step(hidden):
    if mode == "plain":
        logits = head(hidden).float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        total = (logp * mask[:, 1:]).sum()
    else:
        total = response_token_logps(Model(hidden, head), ids, mask, mask, chunk_tokens)[0].sum()
    total.backward()
    return total.item()

warm = torch.randn(1, 64, hidden_size, requires_grad=True)
ids_full, mask_full = ids, mask
ids, mask = ids_full[:, -64:], mask_full[:, -64:]
step(warm)
ids, mask = ids_full, mask_full
hidden = torch.randn(1, tokens, hidden_size, requires_grad=True)
open('/proc/self/clear_refs', 'w').write('5')
before = status_mb('VmRSS')
start = time.perf_counter()
value = step(hidden)
seconds = time.perf_counter() - start
print(json.dumps({"peak_growth_mb": status_mb('VmHWM') - before, "seconds": seconds, "logp_sum": value,
                  "grad": hidden.grad[0, :8, :4].flatten().tolist()}))
"""


def measure(mode: str, args: argparse.Namespace) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(args.tokens), str(args.vocab), str(args.hidden), str(args.chunk)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256, help="sapo-lite's train.logps_chunk_tokens")
    args = parser.parse_args()
    plain, chunked = measure("plain", args), measure("chunked", args)
    same_value = abs(plain["logp_sum"] - chunked["logp_sum"]) <= 1e-3 * abs(plain["logp_sum"])
    same_grad = max(abs(a - b) for a, b in zip(plain["grad"], chunked["grad"])) < 1e-5
    print(f"output head forward+backward, {args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, fp32, CPU")
    print("| path | peak RSS growth (MB) | time (s) |")
    print("|---|---|---|")
    print(f"| plain log_softmax(logits) | {plain['peak_growth_mb']:.0f} | {plain['seconds']:.2f} |")
    print(f"| sapo-lite chunked ({args.chunk} tokens/chunk) | {chunked['peak_growth_mb']:.0f} "
          f"| {chunked['seconds']:.2f} |")
    print(f"same log-probs: {same_value}; same gradients: {same_grad}")
    print(f"memory_reduction: {plain['peak_growth_mb'] / chunked['peak_growth_mb']:.1f}x")


if __name__ == "__main__":
    main()
