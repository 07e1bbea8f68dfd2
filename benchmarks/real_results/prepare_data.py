"""Tokenise the training corpus once, on the CPU, into a flat uint16 array the GPU run can memory-map.

The GPU machine has no `datasets` and no network, so the run carries this file, the tokenizer and the
evaluation text in an ignored folder (default `.gpu/`).

    python benchmarks/real_results/prepare_data.py --train_file .corpus/wiki2018.jsonl \
        --tokenizer /work/models/tokenizer --eval_file .corpus/wikitext103_test_documents.jsonl --output_dir .gpu
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

# Run from a checkout without installing the package (the GPU machine has no install of it).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modeling_calm.data_calm import iter_texts  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--eval_file", required=True)
    parser.add_argument("--output_dir", default=".gpu")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--holdout_every", type=int, default=0,
                        help="every N-th document goes to heldout.jsonl (in-domain evaluation text) instead of "
                             "training; 0: none")
    args = parser.parse_args()
    if args.holdout_every < 0 or args.holdout_every == 1:
        raise ValueError(f"--holdout_every must be 0 (none) or >= 2, got {args.holdout_every}.")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tokenizer) > np.iinfo(np.uint16).max:
        raise ValueError(f"vocabulary of {len(tokenizer)} does not fit uint16")
    chunks, batch, documents, heldout = [], [], 0, []
    bos = tokenizer.bos_token_id

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray([bos] + ids, dtype=np.uint16))  # BOS starts every document

    seen = 0
    for text in tqdm(iter_texts(args.train_file), desc="tokenising"):
        if not text:
            continue
        seen += 1
        if args.holdout_every and seen % args.holdout_every == 0:
            heldout.append(text)
            continue
        batch.append(text)
        documents += 1
        if len(batch) == args.batch_size:
            flush()
            batch = []
    if batch:
        flush()
    ids = np.concatenate(chunks)
    np.save(out / "train_ids.npy", ids)
    tokenizer.save_pretrained(out / "tokenizer")
    shutil.copy(args.eval_file, out / "eval.jsonl")
    heldout_path = out / "heldout.jsonl"
    if heldout:
        heldout_path.write_text("".join(json.dumps({"text": text}) + "\n" for text in heldout))
    elif heldout_path.exists():
        heldout_path.unlink()  # a previous run's held-out text would no longer be held out
    meta = {"documents": documents, "tokens": int(ids.size), "train_file": Path(args.train_file).name,
            "eval_file": Path(args.eval_file).name, "vocab_size": len(tokenizer),
            "heldout_documents": len(heldout)}
    (out / "data.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
