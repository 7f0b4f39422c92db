"""Each config key's documentation: the docstring written under its field in `schema.py`.

Python keeps no attribute docstrings at run time, so they are read from the schema's source, which
ships in the wheel. The dashboard's launch form shows them beside each key.
"""

from __future__ import annotations

import ast
import functools
import inspect

from . import schema
from .schema import SECTION_NAMES, Config


@functools.cache
def field_docs() -> dict[str, str]:
    """`section.key` -> the field's docstring, one line (e.g. `train.lr` -> "Peak learning rate ...")."""
    classes = {type(getattr(Config(), section)).__name__: section for section in SECTION_NAMES}
    docs: dict[str, str] = {}
    for node in ast.parse(inspect.getsource(schema)).body:
        if not isinstance(node, ast.ClassDef) or node.name not in classes:
            continue
        for field_node, after in zip(node.body, node.body[1:]):
            if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[f"{classes[node.name]}.{field_node.target.id}"] = " ".join(after.value.value.split())
    return docs
