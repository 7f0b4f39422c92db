"""Settings: the typed schema (`schema.py`: one dataclass a section, a docstring a field, `validate`)
and where values come from (`sources.py`: presets, a YAML file, `key=value` overrides)."""

from .schema import Config, to_yaml, validate
from .sources import load_config, preset_names, read_preset

__all__ = ["Config", "load_config", "preset_names", "read_preset", "to_yaml", "validate"]
