"""`python -m sapo_lite`, which `accelerate launch -m sapo_lite` and `torchrun -m sapo_lite` run in each process."""

from .cli import app

app(prog_name="sapo-lite")
