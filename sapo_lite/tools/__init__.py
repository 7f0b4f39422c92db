"""What a user runs on a finished (or checkpointed) run; reads the run through `run.layout.RunDir`,
never the training loop's internals.

- `open_run.py`: the run's base with its adapters attached, for generate and eval;
- `merge.py`: an adapter folded into a full-precision copy of the base, shard by shard;
- `gguf_export/`: the same as one GGUF file for llama.cpp and Ollama, with the training chat template;
- `buffer_view.py`: the replay buffer's statistics and pairs; `plot.py`: the run's curves.
"""
