"""Score a CALM or any transformers causal LM with BrierLM on one text file, over several sampling seeds.

The model loads with `AutoModelForCausalLM.from_pretrained`; a model's own code (auto_map) runs only with
`--trust_remote_code` (a CALM needs no flag: the installed package provides its classes). A CALM is scored
through its `score_brier` (two head samples at every chunk boundary, continued while K < 4), any other causal LM
by sampling two 4-token continuations after every token (modeling_calm.evaluation_calm). The file (.txt, or
.jsonl with a "text" field per document) is cut into blocks of `--block_size` tokens; the last block is padded
and its padding never scored. Prints Brier-1..4 and BrierLM as mean +- std over seeds, and writes a JSON report.

Comparability: a token LM is scored at every token, a CALM only at chunk boundaries (every K-th token), so the
two averages run over different positions of the same text; `num_positions` says how many.

Tiny CPU run (random weights, so BrierLM ~0: a check of the pipeline, seconds):
    printf 'CALM predicts the next vector.\\nEach vector stands for K tokens.\\n%.0s' {1..200} > /tmp/tiny.txt
    python examples/train_tokenizer.py --train_file /tmp/tiny.txt --vocab_size 300 --num_heldout 0 \\
        --output_dir /tmp/calm-tokenizer
    python -c "from modeling_calm import CalmConfig, CalmForCausalLM; \\
        CalmForCausalLM(CalmConfig.from_json_file('configuration/tiny.json')).save_pretrained('/tmp/calm-tiny')"
    python examples/evaluate_brierlm.py --model /tmp/calm-tiny --tokenizer /tmp/calm-tokenizer \\
        --eval_file /tmp/tiny.txt --block_size 64 --seeds 0 1 --device cpu --output /tmp/brierlm.json

Real run (the paper's setting: WikiText-103 test, 1024-token blocks, from /work/shared/corpus):
    python examples/evaluate_brierlm.py --model runs/calm-m --eval_file wikitext103_test_documents.jsonl \\
        --block_size 1024 --seeds 0 1 2 --batch_size 8 --dtype bfloat16 --output results/calm-m-brierlm.json
The same command with `--model` set to a transformers causal LM (and `--tokenizer` if the model folder has
none) scores the baseline on the same blocks.

Several processes (one per GPU, or CPU processes with --device cpu): launch the same command with
`accelerate launch --num_processes 2 examples/evaluate_brierlm.py ...` or
`torchrun --nproc_per_node 2 examples/evaluate_brierlm.py ...`. Every process loads the whole model and scores
every world_size-th batch; the sums are gathered, so the numbers equal a one-process run with the same seeds and
--batch_size. Only the main process prints and writes --output.

Run from the repository root with the package installed (`pip install -e .`) or with `PYTHONPATH=.`.
"""

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
import transformers
from transformers import AutoModelForCausalLM, HfArgumentParser

import modeling_calm
from modeling_calm.data_calm import load_pretrained, load_tokenizer
from modeling_calm.modeling_calm_brier import BRIER_LM_MAX_N
from modeling_calm.evaluation_calm import evaluate_brier, load_text_blocks

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "Model folder or Hub id: a CALM or any transformers causal LM."})
    eval_file: str = field(metadata={"help": ".txt (documents separated by blank lines) or .jsonl (a 'text' field per "
                                         "line) file, read as the training files are."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per block; a multiple of K for a CALM."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One scoring pass per seed."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder or Hub id (default: --model)."})
    output: str | None = field(default=None, metadata={"help": "Write the JSON report here."})
    dtype: str = field(default="auto", metadata={"help": f"Weights dtype, one of {DTYPES} (auto: checkpoint's)."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda if available)."})
    max_blocks: int | None = field(default=None, metadata={"help": "Score only the first N blocks (smoke runs)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model's own code (auto_map .py files); off by default. A CALM "
                                 "needs no flag: the installed modeling_calm package provides its classes."},
    )



def _max_positions(model) -> int | None:
    """Longest sequence the model takes, in its own steps (chunks for a CALM, tokens otherwise)."""
    config = getattr(model.config, "backbone_config", model.config)
    return getattr(config, "max_position_embeddings", None)


def _json_safe(value):
    # One seed leaves std undefined (NaN), which is not valid JSON: write null instead.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict | None:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {args.dtype!r}.")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise ValueError(f"--max_blocks must be >= 1, got {args.max_blocks}.")
    if args.block_size <= BRIER_LM_MAX_N:
        raise ValueError(f"--block_size={args.block_size} must exceed {BRIER_LM_MAX_N}: a position needs "
                         f"{BRIER_LM_MAX_N} true future tokens inside its block.")
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch / torchrun
        if args.device not in (None, "cpu", "cuda"):
            raise ValueError(f"--device {args.device!r}: with several processes give cpu or cuda (or nothing); each "
                             "process takes its own GPU.")
        from accelerate import PartialState

        state = PartialState(cpu=args.device == "cpu")  # initializes the process group (gloo on CPUs, else NCCL)
        device = state.device
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    is_main = state is None or state.is_main_process
    num_processes = 1 if state is None else state.num_processes
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)

    if args.output is not None and is_main:  # fail now, not after the whole evaluation
        output_dir = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output):
            raise ValueError(f"--output {args.output!r} is a directory; give the path of the JSON file to write.")
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--output {args.output!r}: cannot create its folder ({error}).") from error
        if not os.access(output_dir, os.W_OK) or (os.path.exists(args.output) and not os.access(args.output, os.W_OK)):
            raise ValueError(f"--output {args.output!r} is not writable.")

    model = load_pretrained(AutoModelForCausalLM, args.model, args.trust_remote_code, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    is_calm = callable(getattr(model, "score_brier", None))
    k = model.config.patch_size if is_calm else 1
    if args.block_size % k:
        raise ValueError(f"--block_size={args.block_size} must be a multiple of the CALM's patch_size K={k}: it is "
                         f"scored in whole chunks of K tokens (try {args.block_size // k * k}).")
    limit = _max_positions(model)
    if limit is not None and args.block_size // k > limit:
        raise ValueError(f"--block_size={args.block_size} is {args.block_size // k} model steps, more than the "
                         f"model's max_position_embeddings={limit}.")

    blocks = load_text_blocks(args.eval_file, tokenizer, args.block_size, multiple_of=k)
    if args.max_blocks is not None:
        blocks = {name: t[: args.max_blocks] for name, t in blocks.items()}
    vocab = model.config.vocab_size
    if int(blocks["input_ids"].max()) >= vocab:
        raise ValueError(f"The tokenizer produced id {int(blocks['input_ids'].max())}, outside the model's "
                         f"vocabulary of {vocab}: use the model's own tokenizer (--tokenizer).")
    num_blocks = blocks["input_ids"].shape[0]
    scored_at = f"chunk boundaries (every K={k} tokens)" if is_calm else "every token"
    if is_main:
        print(f"{args.model}: {num_blocks} blocks of {args.block_size} tokens from {args.eval_file}, scored at "
              f"{scored_at}, {num_processes} process(es)")

    start = time.perf_counter()
    result = evaluate_brier(model, blocks, batch_size=args.batch_size, seeds=args.seeds, progress=True)
    seconds = time.perf_counter() - start
    if state is not None:
        state.destroy_process_group()
    if not is_main:  # the other processes hold the same result; the main one reports it
        return None


    keys = [f"brier_{n}" for n in range(1, BRIER_LM_MAX_N + 1)] + ["brier_lm"]
    print(f"{result['num_positions']} positions per seed, seeds {args.seeds} (mean +- sample std over seeds), "
          f"{seconds:.1f} s")
    for key in keys:
        print(f"  {'BrierLM' if key == 'brier_lm' else key:<8} {result['mean'][key]:10.4f} +- {result['std'][key]:.4f}")
    report = {
        "model": args.model,
        "tokenizer": args.tokenizer or args.model,
        "eval_file": args.eval_file,
        "block_size": args.block_size,
        "num_blocks": num_blocks,
        "patch_size": k,
        "scored_at": scored_at,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(device),
        "num_processes": num_processes,
        "seconds": seconds,
        "per_seed": result["per_seed"],
        "mean": result["mean"],
        "std": result["std"],
        "pooled": result["pooled"],
        "num_positions": result["num_positions"],
        "versions": {"modeling_calm": modeling_calm.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(_json_safe(report), f, indent=2)
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
