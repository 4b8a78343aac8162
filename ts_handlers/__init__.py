"""Verified, hardened TorchServe handlers and the export step that feeds them.

Import the task you serve from its module (``ts_handlers.vision``,
``ts_handlers.text_classification``, ``ts_handlers.embeddings``); importing this package has no
side effects and pulls in no heavy dependency.
"""

__version__ = "0.1.0"
