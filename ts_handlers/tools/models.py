"""Small reference architectures for the demo archives.

``SmallCNN`` is an MNIST-style classifier: two convolution blocks and a two-layer head. It is
scriptable (no Python control flow that TorchScript cannot compile) and describes itself with a
plain ``config.json`` so the export step can rebuild it from a checkpoint folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "image_size": image_size,
        }
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        feature_size = 32 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(feature_size, 64),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(64, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))

    def save_checkpoint(self, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps({**self.config, **(extra or {})}, indent=2))
        torch.save(self.state_dict(), folder / WEIGHTS_FILE)

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> SmallCNN:
        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        model = cls(**{key: config[key] for key in ("in_channels", "num_classes", "image_size")})
        model.load_state_dict(
            torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        )
        return model.eval()
