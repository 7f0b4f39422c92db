"""From rows on disk to tokenized examples, and how answers are scored.

- `files.py`: reading data files and folders, bundled sets, hub datasets;
- `rows.py`: the shapes a row may have, and the rows that cannot be used (skipped and counted);
- `examples.py`: rows through the chat template into prompt/response token ids (`Example`);
- `constraints.py`: checkable instructions (no commas, at most N words, ...);
- `scoring.py`: answers scored against constraints, reference answers or exact match.

Modules are imported directly (`from sapo_lite.data.examples import Example`): importing this
package stays cheap, so `sapo-lite --help` does not load tokenizers or datasets.
"""
