"""Train the MNIST-style demo classifier on scikit-learn's real handwritten digits.

The 8x8 scans from ``sklearn.datasets.load_digits`` go through the serving handler's own
preprocessing (upsampled to 28x28, normalised with the MNIST mean/std), so training sees exactly
what TorchServe will feed the model. A fixed seed and a stratified held-out split make the run
repeatable; the held-out digits are saved beside the checkpoint for the integration tests.

    python scripts/train_digits.py [--out build/checkpoints/digits] [--force]

``make archives`` then scripts, verifies and archives the checkpoint (archiver_configs/mnist).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ts_handlers.config import load_config
from ts_handlers.image_classification import ImageClassificationConfig, image_to_tensor
from ts_handlers.tools.models import SmallCNN

ROOT = Path(__file__).resolve().parent.parent
MIN_ACCURACY = 0.95
HELDOUT_FILE = "heldout.npz"


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as 8x8 uint8 images (ink bright on dark, like MNIST) and their labels."""
    digits = load_digits()
    images = np.clip(digits.images * 16.0, 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def to_tensors(images: np.ndarray, config: ImageClassificationConfig) -> torch.Tensor:
    return torch.stack(
        [image_to_tensor(Image.fromarray(image, mode="L"), config) for image in images]
    )


def train(args: argparse.Namespace) -> float:
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setup = ROOT / "archiver_configs/mnist/setup_config.json"
    config = load_config(ImageClassificationConfig, setup)
    images, labels = digit_images()
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=args.seed
    )
    x_train, x_test = to_tensors(train_images, config), to_tensors(test_images, config)
    y_train, y_test = torch.from_numpy(train_labels), torch.from_numpy(test_labels)

    model = SmallCNN(in_channels=1, num_classes=10, image_size=config.image_size[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            # Small random shifts make the model robust to off-centre digits.
            inputs = torch.roll(
                x_train[batch], shifts=tuple(torch.randint(-2, 3, (2,))), dims=(2, 3)
            )
            loss = loss_fn(model(inputs), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1:2d}/{args.epochs}: train loss {total / len(x_train):.4f}")

    model.eval()
    with torch.inference_mode():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(
        f"held-out accuracy: {accuracy:.4f} (n={len(y_test)}, "
        f"train n={len(y_train)}, {time.perf_counter() - started:.1f}s)"
    )
    model.save_checkpoint(args.out, extra={"heldout_accuracy": accuracy, "seed": args.seed})
    np.savez_compressed(args.out / HELDOUT_FILE, images=test_images, labels=test_labels)
    return accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build/checkpoints/digits")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    args = parser.parse_args()
    checkpoint = args.out / "config.json"
    if checkpoint.is_file() and (args.out / HELDOUT_FILE).is_file() and not args.force:
        accuracy = json.loads(checkpoint.read_text())["heldout_accuracy"]
        print(f"digits checkpoint up to date: {args.out} (held-out accuracy {accuracy:.4f})")
        return 0
    accuracy = train(args)
    if accuracy < MIN_ACCURACY:
        print(f"held-out accuracy {accuracy:.4f} is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
