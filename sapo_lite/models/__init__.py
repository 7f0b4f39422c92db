"""The model: one base, three roles, and what is built or estimated around it.

- `roles.py`: loading the base (NF4 or full precision), the `policy` and `ema` adapters, the
  reference, the EMA update and `acting_as(model, role)`;
- `generation.py`: left-padded batched decoding and held-out answers of a role;
- `decoding.py`: the lean decode loop for the EMA's rewrites, over a model's `decode_plan.py`
  (or why it cannot run), with `sampling.py` (transformers' sampling on the top-k candidates) and
  `matmul.py` (oneDNN, checked, or `F.linear`); `merged_phase.py`: the EMA merged into scratch
  copies of the weights for a generation phase; `weight_layout.py`: CPU fp32 weights stored
  [in, out], q/k/v and gate/up side by side, which the decode loop reads faster;
- `gguf_base.py`: a GGUF file (or a named GGUF model) dequantised into a plain model folder;
- `tiny.py`: the small Llama and tokenizer built locally for the offline demo and the tests;
- `memory_estimate.py`: GPU memory of a run, term by term; `threads.py`: CPU threads for torch,
  and more for generating while other cores are idle.
"""
