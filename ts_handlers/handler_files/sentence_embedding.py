"""A torch-model-archiver --handler file: TorchServe calls the installed ts_handlers' handle."""

from ts_handlers.sentence_embedding import handle  # noqa: F401
