"""Train the shipped byte-level BPE tokenizer on the train split of the prompt corpus.

Reads ShareGPT and Puffin prompts with ``moeless_jax.model.text.load_corpus`` (deduplicated; 10 % of the
documents, chosen by content hash, are held out and never seen here), trains a byte-level BPE tokenizer on the
train split only, and writes ``--out`` (the tokenizer JSON) and a ``README.md`` beside it that says what the
tokenizer is, what it was trained on and how. Prints corpus statistics and the add-one smoothed unigram
perplexity on the held-out split (documents each followed by ``<eos>``, as the model's training windows see
them), the baseline a trained model must beat.

Usage:
  python scripts/train_tokenizer.py --data-dir DATA [--vocab-size 4096]
      [--out moeless_jax/model/assets/tokenizer.json]

DATA is the folder holding ``sharegpt/*.json`` and ``moe-beyond/prompt_datasets/tagged_puffin_prompts.txt``
(docs/traces.md says where they come from).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.model.text import Corpus, load_corpus, unigram_perplexity  # noqa: E402
from moeless_jax.model.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("moeless_jax/model/assets/tokenizer.json")

# Where each known file comes from, by its path prefix in the data folder: (short name, upstream).
UPSTREAM = {
    "sharegpt/": ("ShareGPT", "first human turns of user-shared ChatGPT conversations (the ShareGPT dataset, "
                  "`anon8231489123/ShareGPT_Vicuna_unfiltered` on Hugging Face), files as published in the "
                  "GitHub repository `ml-energy/leaderboard-v2`"),
    "moe-beyond/": ("Puffin", "human turns of the `LDJnr/Puffin` dataset (Hugging Face), file "
                    "`prompt_datasets/tagged_puffin_prompts.txt` of the GitHub repository "
                    "`ngavhane/moe-beyond`"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True,
                   help="folder with sharegpt/*.json and/or moe-beyond/prompt_datasets/ (required)")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="largest number of ids, special tokens included")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="tokenizer JSON to write (relative paths are from the repository root)")
    return p.parse_args(argv)


def corpus_stats(corpus: Corpus, tokenizer: Tokenizer) -> dict:
    """Documents, characters and tokens per split, and the unigram baseline on the held-out split."""
    ids = {name: tokenizer.encode_batch(getattr(corpus, name)) for name in ("train", "heldout")}
    with_eos = {name: [doc + [tokenizer.eos_id] for doc in docs] for name, docs in ids.items()}
    ppl = unigram_perplexity(with_eos["train"], with_eos["heldout"], tokenizer.vocab_size)
    stats = {"vocab_size": tokenizer.vocab_size}
    for name in ("train", "heldout"):
        docs = getattr(corpus, name)
        chars = sum(len(doc) for doc in docs)
        tokens = sum(len(doc) for doc in ids[name])
        utf8_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
        stats[name] = {"documents": len(docs), "characters": chars, "utf8_bytes": utf8_bytes,
                       "tokens": tokens, "tokens_with_eos": tokens + len(docs),
                       "bytes_per_token": round(utf8_bytes / tokens, 3)}
    stats["unigram_heldout_perplexity"] = round(ppl, 2)
    stats["unigram_heldout_cross_entropy_nats"] = round(math.log(ppl), 4)
    return stats


def readme(corpus: Corpus, stats: dict, requested_vocab: int, out_name: str, json_bytes: int) -> str:
    def short_name(file: str) -> str:
        return next(name for prefix, (name, _) in UPSTREAM.items() if file.startswith(prefix))

    source_rows = "\n".join(f"| `{src['file']}` | {short_name(src['file'])} | {src['documents']} | "
                            f"`{src['sha256']}` |" for src in corpus.sources)
    used = {short_name(s["file"]) for s in corpus.sources}
    upstream_lines = "\n".join(f"- **{name}**: {text}." for name, text in UPSTREAM.values() if name in used)
    tr, ho = stats["train"], stats["heldout"]
    return f"""# Shipped tokenizer

`{out_name}` ({json_bytes / 1024:.0f} KiB) is the byte-level BPE tokenizer of the small MoE language model,
loaded by `moeless_jax.model.tokenizer.default_tokenizer()`.

- **What it is**: byte-level BPE (GPT-2 style byte-level pre-tokenizer and decoder, no normalizer), built with
  the `tokenizers` package. Every UTF-8 string round-trips exactly: `decode(encode(s)) == s`.
- **Vocabulary**: {stats['vocab_size']} ids (requested {requested_vocab}): the special tokens `<pad>` = 0,
  `<bos>` = 1, `<eos>` = 2, the 256 byte symbols, and learned merges. Special tokens are never produced from
  input text.
- **Trained on**: the train split of the prompt corpus read by `moeless_jax.model.text.load_corpus` —
  {tr['documents']} deduplicated documents, {tr['characters']:,} characters. The {ho['documents']} held-out
  documents (10 %, chosen by a hash of each document's text) were not used.

| file (in the data folder) | source | documents | sha256 |
| --- | --- | --- | --- |
{source_rows}

{upstream_lines}

## Licence notes

The prompt text is research-use material: the ShareGPT conversations were shared by users of ChatGPT and their
upstream licensing is unclear; the Puffin prompts come from `LDJnr/Puffin` (check that dataset card's licence
before redistributing), and `ngavhane/moe-beyond` has no licence file. **None of that text is in this
repository**: this folder holds only the learned vocabulary and merges, which are statistics of the text.

## Statistics (this tokenizer)

| split | documents | characters | tokens | bytes per token |
| --- | --- | --- | --- | --- |
| train | {tr['documents']} | {tr['characters']:,} | {tr['tokens']:,} | {tr['bytes_per_token']} |
| held-out | {ho['documents']} | {ho['characters']:,} | {ho['tokens']:,} | {ho['bytes_per_token']} |

Baseline for the language model: an add-one smoothed unigram model fitted on the train tokens (each document
followed by `<eos>`) has perplexity **{stats['unigram_heldout_perplexity']}** on the held-out tokens
(cross-entropy {stats['unigram_heldout_cross_entropy_nats']} nats per token),
`moeless_jax.model.text.unigram_perplexity`.

## How it was made

```bash
python scripts/train_tokenizer.py --data-dir DATA --vocab-size {requested_vocab}
```

where `DATA` is the folder holding `sharegpt/` and `moe-beyond/prompt_datasets/`.
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out if args.out.is_absolute() else REPO / args.out
    corpus = load_corpus(args.data_dir)
    tokenizer = train_tokenizer(corpus.train, args.vocab_size)
    tokenizer.save(out)
    stats = corpus_stats(corpus, tokenizer)
    json_bytes = out.stat().st_size
    out_name = out.name if out.parent == REPO / DEFAULT_OUT.parent else str(args.out)
    (out.parent / "README.md").write_text(readme(corpus, stats, args.vocab_size, out_name, json_bytes))
    summary = {"out": str(args.out), "json_bytes": json_bytes, "sources": list(corpus.sources), **stats}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
