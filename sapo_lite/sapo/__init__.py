"""The SAPO algorithm's pieces, none of which knows the training loop.

- `augment.py`: the EMA rewrites a segment of each good response (truncation point, splicing);
- `buffer.py`: the FIFO replay buffer in SQLite;
- `pair_logps.py`: pairs to tensors (shared-prefix or separate layout) and their log-probs;
- `logps.py`: response log-probs without materialising the vocab-sized logits;
- `losses.py`: DPO, ORPO and SFT as pure functions of log-prob tensors (`LOSSES`).
"""
