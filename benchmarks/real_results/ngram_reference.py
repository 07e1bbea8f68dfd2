"""Reference points for the real-text Brier scores: the exact expected Brier-1 and Brier-2 of count-based unigram and
bigram models of the training corpus, scored at the same positions as the Transformer baseline of pipeline.py.

For a model q and a true continuation y, E[Brier-n] = 2 q(y_1..n) - sum_x q(x_1..n)^2 (the sampler's estimate has
this expectation), so no sampling is needed here. The bigram model interpolates counts with the unigram:
q(b | a) = (c(a, b) + alpha q(b)) / (c(a) + alpha); Brier-2 chains it: q(y1 y2 | a) = q(y1 | a) q(y2 | y1).
Runs on a CPU in a few seconds (numpy only), from the folder prepare_data.py writes:

    python benchmarks/real_results/ngram_reference.py --data .gpu --json ngram_reference.json
    python benchmarks/real_results/ngram_reference.py --data .gpuh --eval_file heldout.jsonl   # in-domain text
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing the package

from modeling_calm.evaluation_calm import load_text_blocks, true_continuations  # noqa: E402


def ngram_reference(train_ids: np.ndarray, eval_blocks: dict, vocab_size: int, alpha: float = 1.0) -> dict:
    """Expected Brier-1/2 (fractions, not x 100) of the unigram and interpolated bigram models, and the mean
    probability they give the true next token, over the evaluation positions."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    ids = np.asarray(train_ids, dtype=np.int64)
    if ids.size < 2:
        raise ValueError(f"the training array needs at least 2 tokens, got {ids.size}.")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"training ids must lie in [0, {vocab_size}); got [{ids.min()}, {ids.max()}].")
    targets, valid = true_continuations(eval_blocks["input_ids"], eval_blocks.get("attention_mask"),
                                        eval_blocks.get("labels"), max_n=2)
    valid = valid.numpy()
    context = eval_blocks["input_ids"][:, : valid.shape[1]].numpy()[valid]
    y1, y2 = targets[..., 0].numpy()[valid], targets[..., 1].numpy()[valid]
    if context.size == 0:
        raise ValueError("the evaluation blocks have no position with two real targets.")

    unigram = (np.bincount(ids, minlength=vocab_size) + 0.1) / (ids.size + 0.1 * vocab_size)
    square = float((unigram**2).sum())

    # Bigram counts as sorted pair codes; per-row sums needed for sum_b q(b | a)^2 and its Brier-2 counterpart.
    codes, counts = np.unique(ids[:-1] * vocab_size + ids[1:], return_counts=True)
    rows, cols, counts = codes // vocab_size, codes % vocab_size, counts.astype(np.float64)
    row_total = np.bincount(rows, weights=counts, minlength=vocab_size)

    def bigram(a, b):
        code = a * vocab_size + b
        where = np.minimum(np.searchsorted(codes, code), codes.size - 1)
        count = np.where(codes[where] == code, counts[where], 0.0)
        return (count + alpha * unigram[b]) / (row_total[a] + alpha)

    def row_sum(weight_of_col):  # sum_b q(b | a)^2 w(b) for every a
        w = weight_of_col
        return (np.bincount(rows, weights=counts**2 * w[cols], minlength=vocab_size)
                + 2 * alpha * np.bincount(rows, weights=counts * unigram[cols] * w[cols], minlength=vocab_size)
                + alpha**2 * float((unigram**2 * w).sum())) / (row_total + alpha) ** 2

    bigram_square = row_sum(np.ones(vocab_size))  # sum_b q(b | a)^2
    bigram_square_2 = row_sum(bigram_square)  # sum_{b, c} q(b | a)^2 q(c | b)^2

    p1 = bigram(context, y1)
    results = {
        "positions": int(context.size),
        "alpha": alpha,
        "unigram": {
            "mean_p_true": float(unigram[y1].mean()),
            "brier_1": float((2 * unigram[y1] - square).mean()),
            "brier_2": float((2 * unigram[y1] * unigram[y2] - square**2).mean()),
        },
        "bigram": {
            "mean_p_true": float(p1.mean()),
            "brier_1": float((2 * p1 - bigram_square[context]).mean()),
            "brier_2": float((2 * p1 * bigram(y1, y2) - bigram_square_2[context]).mean()),
        },
    }
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=".gpu", help="the folder prepare_data.py wrote")
    parser.add_argument("--block_size", type=int, default=1024, help="evaluation blocks (as pipeline.py)")
    parser.add_argument("--eval_file", default="eval.jsonl",
                        help="evaluation text in the data folder: eval.jsonl (WikiText-103) or heldout.jsonl")
    parser.add_argument("--alpha", type=float, default=1.0, help="bigram interpolation weight of the unigram")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    data = Path(args.data)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    eval_file = data / args.eval_file
    if not eval_file.is_file():
        raise ValueError(f"--eval_file {args.eval_file!r}: no such file in {data} (prepare_data.py writes eval.jsonl, "
                         "and heldout.jsonl with --holdout_every).")
    eval_blocks = load_text_blocks(str(eval_file), tokenizer, args.block_size)
    results = ngram_reference(np.load(data / "train_ids.npy", mmap_mode="r"), eval_blocks, len(tokenizer), args.alpha)
    for name in ("unigram", "bigram"):
        r = results[name]
        print(f"{name:<8} Brier-1 x 100 {100 * r['brier_1']:.2f}  Brier-2 x 100 {100 * r['brier_2']:.3f}  "
              f"mean q(true next token) {r['mean_p_true']:.4f}")
    print(f"({results['positions']:,} positions)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
