"""`sapo.pairs=spin`: SPIN (Chen et al. 2024, arXiv 2401.01335), the self-play baseline of the SAPO paper.

SPIN trains the policy to prefer the data's answer over a whole answer written from the prompt by
the model of the previous iteration, which is also the DPO reference ("opponent"). Iteration k:
the iterate theta_k answers the prompts, theta_{k+1} is trained from theta_k with reference
theta_k on (data answer, theta_k's answer) pairs.

Here an iteration is `sapo.spin_iteration_steps` optimizer steps. At the first step of each
iteration the policy adapter is copied into the `ref` adapter (models/roles.py), which is then,
for the whole iteration, both the generator and the reference; cached reference log-probs are
cleared, so pairs still in the buffer are scored against the new reference when next drawn.

Departures from SPIN's official code (uclaml/SPIN), and why:
- the previous iterate answers the prompts step by step as the examples are drawn, not all
  prompts at the start of the iteration: theta_k is frozen for the iteration, so each prompt gets
  an answer from the same model either way, and the run keeps one engine (buffer, resume);
- pairs go through the FIFO buffer (weighted draws) instead of `num_train_epochs` passes over the
  iteration's data; the buffer may still hold pairs of the previous iteration, as the official
  iteration 1 trains on the synthetic data of iterations 0 and 1 together (`dataset_mixer`);
- sampling is `sapo.temperature/top_k/top_p` (0.7, 50, 0.95 by default; official: temperature
  0.8, top_p 0.95 in vLLM) and the answer at most `sapo.spin_max_new_tokens` (official
  `max_tokens` 256) and the room left under `data.max_len`; an answer that reaches the limit
  without a stop token is kept, cut there (official: the same, as vLLM returns it);
- the prompt goes through the model's chat template, as training sees it (official generation
  prompt: "### Instruction: ... ### Response: ", a different format than its training template);
- LoRA on the base with AdamW and the run's learning rate (official: full fine-tune, RMSprop,
  5e-7, linear decay per iteration); the loss is sapo-lite's DPO (SPIN's logistic loss is DPO's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...config.schema import Config
from ...models.roles import REF, acting_as, copy_policy_to_reference
from ..augment import SPIN_ANSWER, Pair, generate_segments, is_identical, splice_rejected
from . import MadePairs, PairSource, SourceContext


class SpinAnswers(PairSource):
    def __init__(self, cfg: Config) -> None:
        self.iteration_steps = cfg.sapo.spin_iteration_steps
        self.max_new_tokens = cfg.sapo.spin_max_new_tokens

    def at_step_start(self, model: Any, buffer: Any, step: int) -> None:
        """A new iteration: the policy as it stands becomes the generator and the reference."""
        if iteration_starts(step, self.iteration_steps):
            copy_policy_to_reference(model)
            buffer.invalidate_reference()

    def make(self, ctx: SourceContext, examples: Sequence[Any]) -> MadePairs:
        limits = [min(self.max_new_tokens, ctx.cfg.data.max_len - len(ex.prompt_ids)) for ex in examples]
        with acting_as(ctx.model, REF), ctx.generating():
            answers = _answers(ctx, examples, limits)
        pairs = [_pair(ex, limit, answer, ctx.stop_ids) for ex, limit, answer in zip(examples, limits, answers)]
        return MadePairs(pairs, {"pairs/identical": sum(map(is_identical, pairs)) / max(len(pairs), 1)})


def iteration_starts(step: int, iteration_steps: int) -> bool:
    """Steps 1, N+1, 2N+1, ... open an iteration."""
    return (step - 1) % iteration_steps == 0


def _answers(ctx: SourceContext, examples: Sequence[Any], limits: Sequence[int]) -> list[list[int]]:
    """The generator's answer to each prompt; batches of prompts of similar length (less left padding)."""
    s = ctx.cfg.sapo
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    answers: list[list[int]] = [[] for _ in examples]
    for start in range(0, len(order), s.gen_batch_size):
        batch = order[start : start + s.gen_batch_size]
        generated = generate_segments(
            ctx.model, [examples[i].prompt_ids.tolist() for i in batch], max(limits[i] for i in batch), ctx.pad_id,
            ctx.stop_ids, **ctx.sampling(), static_cache=s.static_cache, decoder=s.decoder,
        )
        for i, answer in zip(batch, generated):
            answers[i] = answer
    return answers


def _pair(example: Any, limit: int, answer: Sequence[int], stop_ids: Sequence[int]) -> Pair:
    """The whole answer up to and incl. its first stop token, or its first `limit` tokens (trunc point 0)."""
    chosen = np.concatenate([example.prompt_ids, example.response_ids]).astype(np.int32)
    rejected = splice_rejected(example.prompt_ids, np.empty(0, np.int32), 0, limit, answer, stop_ids)
    return Pair(chosen, rejected, len(example.prompt_ids), 0, limit, SPIN_ANSWER)
