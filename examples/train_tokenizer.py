"""Train a byte-level BPE tokenizer for CALM on .txt / .jsonl files and save it for `AutoTokenizer`.

The first `--num_heldout` texts are kept out of training and used for the summary: an example encoding, the
compression (characters per token) and a lossless round-trip check.

Tiny CPU run (seconds):
    printf 'CALM predicts the next vector.\\nEach vector stands for K tokens.\\n%.0s' {1..200} > /tmp/tiny.txt
    python examples/train_tokenizer.py --train_file /tmp/tiny.txt --vocab_size 300 --num_heldout 10 \\
        --output_dir /tmp/calm-tokenizer

Real run (the 53 MB Wikipedia slice of ../shared/corpus, `xz -dk wiki2018.jsonl.xz` first; .xz is read too):
    python examples/train_tokenizer.py --train_file wiki2018.jsonl --vocab_size 32000 --output_dir runs/tokenizer
On 2026-11-23, on the project's 2-core CPU box, that run took 23 s (wall) and printed 32000 tokens and
4.46 characters per token on the 100 held-out articles, lossless.

Run from the repository root with the package installed (`pip install -e .`) or with `PYTHONPATH=.`.

Then: `AutoTokenizer.from_pretrained("runs/tokenizer")`, and `modeling_calm.data_calm.tokenize_and_pack` to
cut a corpus into blocks.
"""

import itertools
from dataclasses import dataclass, field

from transformers import AutoTokenizer, HfArgumentParser

from modeling_calm.data_calm import DEFAULT_SPECIAL_TOKENS, iter_texts, train_bpe_tokenizer


@dataclass
class TokenizerArguments:
    train_file: list[str] = field(metadata={"help": "One or more .txt / .jsonl files or globs (.gz/.bz2/.xz ok)."})
    output_dir: str = field(metadata={"help": "Where to save the tokenizer (save_pretrained)."})
    vocab_size: int = field(default=32000, metadata={"help": "Vocabulary size, special tokens included."})
    min_frequency: int = field(default=2, metadata={"help": "Least count of a pair to be merged."})
    max_texts: int | None = field(default=None, metadata={"help": "Train on at most this many texts."})
    num_heldout: int | None = field(default=None, metadata={
        "help": "Leading texts kept out of training for the summary (default: 100, or a tenth of a smaller corpus)."})
    text_column: str = field(default="text", metadata={"help": "JSON field of the text in .jsonl files."})
    show_progress: bool = field(default=False, metadata={"help": "Show progress bars."})


def main():
    (args,) = HfArgumentParser(TokenizerArguments).parse_args_into_dataclasses()

    # One lazy stream over all files: the held-out texts are taken off its front, training reads the rest.
    texts = iter_texts(args.train_file, text_column=args.text_column)
    front = list(itertools.islice(texts, 10 * 100))  # decides the default on corpora of fewer than 1,000 texts
    if args.num_heldout is None:
        args.num_heldout = 100 if len(front) == 10 * 100 else len(front) // 10
    heldout = [text for text in front[: args.num_heldout] if text]
    texts = itertools.chain(front[args.num_heldout :], itertools.islice(texts, max(0, args.num_heldout - len(front)), None))
    first = next(texts, None)  # is anything left to train on?
    if first is None:
        raise ValueError(
            f"{args.train_file} hold(s) only {len(heldout)} non-empty text(s), all taken as held-out "
            f"(--num_heldout {args.num_heldout} leading texts): none is left to train on. Give more text or a "
            "smaller --num_heldout."
        )
    tokenizer = train_bpe_tokenizer(
        itertools.chain([first], texts),
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        output_dir=args.output_dir,
        text_column=args.text_column,
        max_texts=args.max_texts,
        show_progress=args.show_progress,
    )

    # Reload from disk, as a training run would, so the summary describes the saved files.
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    print(f"saved to      {args.output_dir}")
    print(f"vocab size    {len(tokenizer)} (asked for {args.vocab_size})")
    specials = {role: (getattr(tokenizer, role), getattr(tokenizer, role + "_id")) for role in DEFAULT_SPECIAL_TOKENS}
    print("special ids   " + ", ".join(f"{token}={token_id}" for token, token_id in specials.values()))
    if not heldout:
        print("no held-out texts (--num_heldout 0 or empty lines only): skipping the compression summary")
        return

    sample = heldout[0][:200]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    print(f"example       {sample!r}")
    print(f"  -> {len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)[:24]}")

    encoded = tokenizer(heldout, add_special_tokens=False)["input_ids"]
    num_chars = sum(len(text) for text in heldout)
    num_tokens = sum(len(ids) for ids in encoded)
    lossless = all(tokenizer.decode(ids) == text for ids, text in zip(encoded, heldout))
    print(f"held-out      {len(heldout)} texts, {num_chars} characters, {num_tokens} tokens")
    print(f"compression   {num_chars / num_tokens:.2f} characters per token")
    print(f"round trip    {'lossless' if lossless else 'LOSSY'} on the held-out texts")
    if not lossless:
        raise SystemExit("decode(encode(text)) != text on a held-out text")


if __name__ == "__main__":
    main()
