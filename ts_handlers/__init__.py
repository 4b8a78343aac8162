"""Verified, hardened TorchServe handlers and the export step that feeds them.

Each task is one module named after its ``mode`` (``ts_handlers.image_classification``,
``ts_handlers.sequence_classification``, ``ts_handlers.sentence_embedding``,
``ts_handlers.token_classification``), found through the registry in ``ts_handlers.tasks``. The
tooling (build, local server, client, demo models) lives in ``ts_handlers.tools``. Importing
this package has no side effects and pulls in no heavy dependency.
"""

__version__ = "0.1.0"
