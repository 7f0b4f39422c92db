"""Training: the loop (`loop.py`) and what it needs around it.

- `session.py`: model, data, optimizer and RNGs, built in named steps;
- `checkpoint.py`, `resume.py`, `finish.py`: checkpoints, resuming from them, the end of a run;
- `held_out.py`: the before/after evaluation written into the run;
- `metrics.py`: step figures, the progress line, TensorBoard and W&B;
- `distributed.py`: what differs between one process and N (`accelerate launch`, `torchrun`);
- `signals.py`: Ctrl-C and SIGTERM; `preflight.py`: checks against the model before training.

Modules are imported directly (`from sapo_lite.train.loop import train`): this package's
import stays cheap, so `sapo-lite --help` does not load torch.
"""
