"""GGUF export: a run's adapter folded into its base as one file that llama.cpp and Ollama run as is,
with the chat template and stop tokens training used. Pure Python: nothing to compile.

- `run_export.py`: `export_run`, what `sapo-lite merge RUN --out FILE.gguf` calls: reads the run, writes
  the GGUF and its Ollama Modelfile;
- `export.py`: `prepare_export` / `export_gguf`, the streaming writer (a supported model folder + adapter);
- `quants.py`: the quant types the `gguf` package writes, per-tensor types, the K-quant refusal;
- `arch.py`: the config as llama.cpp's converter reads it, the refusal of other architectures, tensor names;
- `families/`: one module per family (llama, qwen, gemma, phi) with its keys, extra tensors and weight changes;
- the adapter is read by `models/lora_file.py` (the reader the folder merge uses too);
- `tokenizer_kv.py`: the `tokenizer.*` keys, copied from the base's GGUF or built like llama.cpp's
  converter; `pretok_hashes.py`: that converter's pre-tokenizer table (MIT, credited there);
- `chat_template.py`: the template's per-message shape and end-of-turn token;
  `ollama.py`: the Modelfile, its Go template checked by a small interpreter against the Jinja rendering.

Architectures, tokenizer handling and tensor types follow llama.cpp's `convert_hf_to_gguf.py` (MIT):
the files must read in llama.cpp exactly like its own conversions.
"""

from ...errors import ExportError

try:
    import gguf  # noqa: F401
except ImportError as exc:  # an optional extra: say how to get it, in one line
    raise ExportError("GGUF export needs the `gguf` package, which is not installed",
                      'pip install "sapo-lite[gguf]"') from exc

from .export import ExportReport, GgufExport, export_gguf, prepare_export  # noqa: E402
from .quants import QUANT_TYPES  # noqa: E402
from .run_export import RunExport, export_run, modelfile_path  # noqa: E402
from .tokenizer_kv import register_pre_tokenizer  # noqa: E402

__all__ = ["QUANT_TYPES", "ExportReport", "GgufExport", "RunExport", "export_gguf", "export_run", "modelfile_path",
           "prepare_export", "register_pre_tokenizer"]
