"""One-line handler files for ``torch-model-archiver --handler``.

The archiver copies the file ``--handler`` names into the archive (a ``module:function`` value
is refused as a missing file), and TorchServe imports it and calls its ``handle``. Each file
here imports a task's ``handle`` from the installed package, so the archive holds no handler
code of its own::

    torch-model-archiver --handler "$(ts-handlers handler-file sequence_classification)" ...

``ts-handlers handler-file TASK`` prints the path of the file for TASK
(docs/migrating-from-torchserve-examples.md).
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def handler_file(mode: str) -> Path:
    """The one-line handler file of a built-in task; KeyError names the tasks that have one."""
    path = FOLDER / f"{mode}.py"
    if mode.startswith("_") or not path.is_file():
        raise KeyError(f"no handler file for {mode!r}; tasks with one: {', '.join(modes())}")
    return path


def modes() -> list[str]:
    return sorted(path.stem for path in FOLDER.glob("*.py") if not path.stem.startswith("_"))
