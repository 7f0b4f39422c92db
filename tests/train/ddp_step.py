"""One DPO optimizer step on 8 fixed pairs, run by tests/train/test_distributed.py.

    python tests/train/ddp_step.py BASE OUT            one process, the 8 pairs as one micro-batch
    torchrun --nproc_per_node 2 tests/train/ddp_step.py BASE OUT
                                                 two processes, 4 pairs each as 2 micro-batches of 2

Writes OUT/rank-K.pt: the policy gradients (averaged, for the data-parallel run) and the
policy LoRA tensors after one SGD step.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from sapo_lite.config.schema import LoraSettings, ModelConfig
from sapo_lite.models.roles import adapter_tensors, attach_adapters, load_base
from sapo_lite.sapo.augment import Pair
from sapo_lite.sapo.losses import LOSSES, PairLogps
from sapo_lite.sapo.pair_logps import pair_logps
from sapo_lite.train.distributed import start_processes

PAIRS, ACCUMULATION = 8, 2


def fixed_pairs(vocab: int) -> list[Pair]:
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(PAIRS):
        length, prompt_len = int(rng.integers(12, 20)), int(rng.integers(3, 8))
        chosen = rng.integers(5, vocab, size=length)
        rejected = chosen.copy()
        rejected[prompt_len + 1 :] = rng.integers(5, vocab, size=length - prompt_len - 1)
        pairs.append(Pair(chosen, rejected, prompt_len, 1, length - prompt_len - 1))
    return pairs


def main(base: str, out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    processes = start_processes()
    model = attach_adapters(load_base(ModelConfig(name=base, quant="none", dtype="fp32"), base, torch.device("cpu")),
                            LoraSettings(r=8, alpha=16, dropout=0.0), None, False)
    # A nonzero LoRA B, so that both LoRA matrices receive gradients.
    with torch.no_grad():
        for name, tensor in adapter_tensors(model, "policy").items():
            if "lora_B" in name:
                tensor.normal_(0, 0.02)
    policy = adapter_tensors(model, "policy")
    optimizer = torch.optim.SGD(list(policy.values()), lr=1.0)  # plain SGD: the update is the gradient
    pairs = fixed_pairs(model.config.vocab_size)
    share = PAIRS // processes.count
    mine = pairs[processes.rank * share : (processes.rank + 1) * share]
    micro_batches = ACCUMULATION if processes.count > 1 else 1
    score = processes.data_parallel(model, micro_batches)
    size = len(mine) // micro_batches
    for start in range(0, len(mine), size):
        batch = mine[start : start + size]
        chosen, rejected, n_chosen, n_rejected = pair_logps(model, batch, 0, torch.device("cpu"), 256, score)
        logps = PairLogps(chosen, rejected, n_chosen, n_rejected,
                          ref_chosen=torch.full((len(batch),), -40.0), ref_rejected=torch.full((len(batch),), -41.0))
        (LOSSES["dpo"].fn(logps, 0.1).loss.mean() / micro_batches).backward()
    grads = {name: tensor.grad.clone() for name, tensor in policy.items()}
    optimizer.step()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"grads": grads, "after": {n: t.detach().clone() for n, t in policy.items()}},
               out / f"rank-{processes.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
