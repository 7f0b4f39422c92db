"""The `sapo-lite` command. Thin: each command parses, calls the library, and lets the shared
error boundary in `common.py` turn a SapoError into one line and exit code 1.

Modules by what a user does: `train` (train, estimate, presets), `eval`, `use` (generate,
merge), `look` (plot, buffer, env), `ui` (the web dashboard)."""

from . import eval, look, train, ui, use  # noqa: F401  (each module registers its commands)
from .common import app

__all__ = ["app"]
