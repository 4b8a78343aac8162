"""A torch-model-archiver --handler file: TorchServe calls the installed ts_handlers' handle."""

from ts_handlers.sequence_classification import handle  # noqa: F401
