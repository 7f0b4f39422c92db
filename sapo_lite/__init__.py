"""sapo-lite: Self-Augmented Preference Optimization with LoRA on a 4-bit base."""

__version__ = "0.1.0"
