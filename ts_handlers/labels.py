"""Class names from ``index_to_name.json``, checked against the model they belong to.

TorchServe's convention is ``{"0": "cat", "1": "dog", ...}``. A file with a name missing or too
many names serves answers with a label missing or fails every request, so both the build and a
worker's load refuse it with the fix in the message.
"""

from __future__ import annotations

import json
from pathlib import Path

from ts_handlers.config import ConfigError

LABELS_FILE = "index_to_name.json"


def read_labels(path: Path, num_classes: int | None) -> list[str] | None:
    """Labels ordered by class index, or None when there is no file."""
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ConfigError(f'{path} must be a JSON object {{"0": "name", "1": "name", ...}}')
    expected = [str(index) for index in range(len(mapping) if num_classes is None else num_classes)]
    if sorted(mapping, key=_index_order) != expected:
        missing = sorted(set(expected) - set(mapping), key=_index_order)
        extra = sorted(set(mapping) - set(expected), key=_index_order)
        count = f"the model outputs {num_classes} classes" if num_classes is not None else ""
        raise ConfigError(
            f"{path} has {len(mapping)} names; {count or 'keys must be 0..n-1'}"
            + (f"; missing keys {', '.join(missing)}" if missing else "")
            + (f"; unexpected keys {', '.join(extra)}" if extra else "")
            + f". Give exactly one name per class index 0..{len(expected) - 1}, "
            "or remove the file to use the model's own labels"
        )
    return [mapping[key] for key in expected]


def check_label_count(labels: list[str], num_classes: int, source: str) -> None:
    if len(labels) != num_classes:
        raise ConfigError(
            f"{source} names {len(labels)} labels but the model outputs {num_classes} classes"
        )


def _index_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 62, key)
