"""Decoding with any role of a model (base, policy, ema): left-padded batches in, answers out.

`left_pad` lays out contexts of different lengths so every row ends at the last column (what
batched decoding with a KV cache needs); `generate_answers` decodes prompts greedily or with
sampling and returns the text; `stream_answer` gives one prompt's answer as it grows (the
dashboard's Chat page); `evaluate_role` answers held-out examples as one role and scores the
answers (data/scoring.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..data.examples import Example
from ..data.scoring import RoleScore, score_answers
from .decode_plan import plan_for
from .decoding import lean_generate
from .roles import acting_as
from .sampling import greedy


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded so that every sequence ends at the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
    temperature: float = 0.0, batch_size: int = 32, decoder: str = "lean", static_cache: bool = False,
    top_k: int | None = None, top_p: float | None = None,
) -> list[str]:
    """Decoded answers (special tokens dropped, stripped); greedy unless `temperature` > 0.

    Greedy answers go through the lean decode loop (decoding.py) where the model allows it and `decoder`
    is `lean`: the same tokens as `generate` (tests/models/test_decoding.py), in about half the time, which
    is most of a held-out evaluation or a validation pass. Sampling, `decoder="hf"` (a run's
    `sapo.decoder`) and every other model use `generate`, with a preallocated cache where `static_cache`;
    `top_k` (0: off) and `top_p`, when given, narrow what it samples from (else the model's generation
    config decides).
    """
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        sampling.update({name: value for name, value in (("top_k", top_k), ("top_p", top_p)) if value is not None})
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        plan = plan_for(model, batch, max_new_tokens) if temperature <= 0 and decoder == "lean" else None
        if plan is not None:
            tokens = lean_generate(plan, batch, max_new_tokens, tokenizer.pad_token_id, stop_ids, greedy)
            answers += tokenizer.batch_decode(tokens, skip_special_tokens=True)
            continue
        ids, mask = left_pad(batch, tokenizer.pad_token_id)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id,
            cache_implementation="static" if static_cache else None, **sampling,
        )
        answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]



def evaluate_role(
    model: Any, tokenizer: Any, examples: Sequence[Example], role: str, max_new_tokens: int,
    stop_ids: Sequence[int], batch_size: int = 32, decoder: str = "lean", static_cache: bool = False,
) -> RoleScore:
    """Greedy answers of `base` or an adapter to every example, scored (`decoder`, `static_cache`: see
    `generate_answers`)."""
    with acting_as(model, role):
        answers = generate_answers(
            model, tokenizer, [ex.prompt_ids.tolist() for ex in examples], max_new_tokens, stop_ids,
            batch_size=batch_size, decoder=decoder, static_cache=static_cache,
        )
    return score_answers(role, answers, examples)


def stream_answer(
    model: Any, tokenizer: Any, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int],
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
) -> Iterator[str]:
    """One prompt's answer as it is decoded: the text so far, each time a token adds to it; the last value is
    what `generate_answers` returns for the same prompt and settings (decoded the same way, stripped).

    `generate` runs in a thread and hands each new token over through a queue (transformers' streamer
    protocol); the text is decoded from all tokens so far, so a character split across tokens comes out whole.
    """
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        sampling.update({name: value for name, value in (("top_k", top_k), ("top_p", top_p)) if value is not None})
    tokens: queue.Queue = queue.Queue()
    streamer = _TokenQueue(tokens)
    ids, mask = left_pad([prompt], tokenizer.pad_token_id)
    failure: list[BaseException] = []

    def decode() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                               eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                               **sampling)
        except BaseException as exc:  # handed to the reader, which raises it in its own thread
            failure.append(exc)
        finally:
            tokens.put(None)

    thread = threading.Thread(target=decode, daemon=True, name="stream-answer")
    thread.start()
    answer: list[int] = []
    text = ""
    while (token := tokens.get()) is not None:
        answer.append(token)
        now = tokenizer.decode(answer, skip_special_tokens=True).strip()
        if now != text:
            text = now
            yield text
    thread.join()
    if failure:
        raise failure[0]
    if not text:
        yield ""  # an answer that stopped at once (or held only special tokens) is still an answer


class _TokenQueue:
    """transformers' streamer protocol: `put` gets the prompt once, then each new token; `end` when done."""

    def __init__(self, tokens: queue.Queue) -> None:
        self.tokens = tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        pass
