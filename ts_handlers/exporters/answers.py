"""What the tasks' answer printers (``ts-handlers predict``) share."""

from __future__ import annotations

from typing import Any


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_label_list(answer: Any) -> bool:
    return (
        isinstance(answer, list)
        and bool(answer)
        and all(isinstance(item, dict) and {"label", "score"} <= set(item) for item in answer)
    )


def format_labels(answer: list[dict[str, Any]]) -> str:
    """Labels and scores as aligned rows."""
    width = max(len(str(item["label"])) for item in answer)
    return "\n".join(f"{str(item['label']):<{width}}  {item['score']:.4f}" for item in answer)
