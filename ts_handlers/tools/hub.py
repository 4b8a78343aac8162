"""Hugging Face Hub ids (``distilbert/distilbert-base-uncased-finetuned-sst-2-english``) where a
model folder is expected: ``ts-handlers init ID`` and ``"model_name": ID`` in setup_config.json.

An id is resolved through ``huggingface_hub``'s cache, the same place ``from_pretrained`` looks
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``): downloaded there
when the network allows, read from it alone with ``HF_HUB_OFFLINE=1``, and refused with what to
do when it is in neither. The snapshot's commit hash is the revision the build records in the
archive's report, so an archive says exactly which weights it holds.

Build-time only: a serving worker never resolves an id (the archive holds the files).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ts_handlers.config import ConfigError
from ts_handlers.errors import first_lines

# "name" or "owner/name": letters, digits, "-", "_", "."; no "..", no leading "." or "-".
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    # The snapshot's commit hash: the exact revision the files come from.
    revision: str
    folder: Path

    def report(self) -> dict[str, str]:
        return {"hub_id": self.repo_id, "revision": self.revision}


def looks_like_hub_id(value: str, base: Path | None = None) -> bool:
    """True for ``owner/name`` or ``name`` that is not an existing file or folder (relative to
    ``base`` when given)."""
    if not value or ".." in value or not _HUB_ID.match(value):
        return False
    path = Path(value) if base is None or Path(value).is_absolute() else base / value
    return not path.exists() and not Path(value).exists()


def cache_dir() -> Path:
    """Where huggingface_hub keeps models, read from the environment now (as the hub does at
    import), so a test or a user's shell that sets it later is followed."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def resolve(repo_id: str, revision: str | None = None) -> HubModel:
    """The local snapshot folder of a Hub model, downloaded first when the network allows."""
    from huggingface_hub import snapshot_download

    cache = cache_dir()
    is_offline = offline()
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache), local_files_only=is_offline
        )
    except Exception as error:  # the hub raises many types (offline, not found, gated, HTTP)
        if is_offline:
            raise ConfigError(
                f"{repo_id!r} is not a local folder, and not in the Hugging Face cache {cache} "
                "(HF_HUB_OFFLINE=1, so nothing is downloaded). Download it where the network "
                f"allows (`hf download {repo_id}`, with the same HF_HOME or HF_HUB_CACHE), or "
                "give the path of a save_pretrained folder"
            ) from None
        raise ConfigError(
            f"{repo_id!r} is not a local folder, and the Hugging Face Hub could not provide it "
            f"({type(error).__name__}: {first_lines(error)}); "
            "check the id (owner/name), your access to it, and the network, or give the path "
            "of a save_pretrained folder"
        ) from None
    folder_path = Path(folder)
    return HubModel(repo_id=repo_id, revision=folder_path.name, folder=folder_path)
