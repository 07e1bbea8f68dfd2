"""Quickstart: a whole CALM pipeline on the CPU, on text that ships with Python (no download, no network).

Trains a byte-level BPE tokenizer, a chunk autoencoder (`CalmAutoencoderTrainer`) and a CALM on the frozen
autoencoder (`CalmTrainer`); reports the autoencoder's token accuracy and the CALM's BrierLM on held-out text,
prints samples at T = 1 and T = 0.5, writes a Hub-ready folder (model, tokenizer, model card; the autoencoder
in `autoencoder/`) and reloads it with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`.

Measured with the defaults on a 2-core CPU (2026-11-23, torch 2.13.0, transformers 5.23.0): 5 to 6 minutes in all;
held-out autoencoder token accuracy 99.7 % (90 % with noise of std 0.3 on the latents); the CALM, after 1,000
steps on 0.47M tokens, is still at Brier-1 0.007 and BrierLM 0, and its samples are barely words: the run shows the
whole workflow, not a useful model (see docs/RESULTS.md for GPU runs).

    python examples/quickstart.py                                   # CPU defaults: preset small, 1000 + 1000 steps
    python examples/quickstart.py --max_steps 20                    # a smoke run
    python examples/quickstart.py --train_file my.jsonl --preset calm-m --device cuda --max_steps 5000
"""

import importlib
import inspect
import json
import math
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydoc_data.topics import topics
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments

from modeling_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmAutoencoderTrainer, CalmForCausalLM, CalmTrainer
from modeling_calm.card_calm import build_autoencoder_card, build_model_card
from modeling_calm.data_calm import (
    CalmDataCollator, check_block_size, iter_texts, load_tokenizer, model_context_tokens, save_tokenizer_with_model, train_bpe_tokenizer,
)
from modeling_calm.evaluation_calm import evaluate_brier


CONFIGURATION = Path(__file__).resolve().parents[1] / "configuration"
# The built-in corpus: pydoc's help topics plus the docstrings of these standard-library modules (and of the
# public submodules of the packages), ~1.3 MB of English text about Python, the same on every run.
MODULES = ("abc argparse ast base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal "
           "difflib enum fractions functools glob hashlib heapq inspect io itertools math operator os pathlib "
           "pickle pprint random re shutil socket statistics string struct subprocess tarfile tempfile textwrap "
           "threading time typing uuid zipfile").split()
PACKAGES = ("json", "email", "urllib", "http", "html", "logging", "importlib", "concurrent.futures", "xml.etree",
            "unittest", "asyncio", "sqlite3")
PROMPTS = ["Return a new list", "The following", "If the argument is"]
HELD_OUT_EVERY = 20  # every 20th document is evaluation text


@dataclass
class QuickstartArguments:
    train_file: str | None = field(default=None, metadata={"help": "Your own .txt/.jsonl text instead of Python's."})
    preset: str = field(default="small", metadata={"help": "small | tiny | calm-m | calm-l | calm-xl, or a JSON path."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (bf16 mixed precision)."})
    output_dir: str = field(default="runs/quickstart", metadata={"help": "Where the Hub-ready folder goes."})
    max_steps: int = field(default=1000, metadata={"help": "Training steps of each stage (autoencoder, CALM)."})
    vocab_size: int = field(default=1024, metadata={"help": "Size of the BPE vocabulary to train."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training/evaluation block."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and sampling."})
    hub_repo_id: str | None = field(default=None, metadata={
        "help": "The Hub repo you will push the folder to ('user/name'), named in the model card's loading snippet "
                "(default: a placeholder the card explains; push_calm_to_hub fills it in)."})


def builtin_corpus() -> list[str]:
    """Python's own documentation: the help topics of `pydoc_data` and standard-library docstrings."""
    texts = [topics[name] for name in sorted(topics)]
    names = list(MODULES)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names += [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(path) if m.name[0] != "_"]
    seen = set()
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:  # platform-specific modules (asyncio.windows_events, ...)
            continue
        objects = [(name, module)]
        for attr, obj in sorted(vars(module).items()):
            if attr[0] != "_" and (inspect.isclass(obj) or inspect.isroutine(obj)):
                objects.append((f"{name}.{attr}", obj))
                members = sorted(vars(obj).items()) if inspect.isclass(obj) else []
                objects += [(f"{name}.{attr}.{m}", o) for m, o in members if m[0] != "_" and inspect.isroutine(o)]
        for title, obj in objects:
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:  # re-exported objects appear once
                seen.add(doc)
                texts.append(f"{title}\n\n{doc}")
    return texts


def pack(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Documents, each after a BOS (the document start `generate` stops on), cut into blocks [N, block_size]."""
    ids = []
    for tokens in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *tokens] if tokens else []
    return torch.tensor(ids[: len(ids) // block_size * block_size]).view(-1, block_size)


@torch.no_grad()
def token_accuracy(autoencoder, blocks: torch.Tensor, **forward_kwargs) -> float:
    """Mean token accuracy of the reconstruction of every block; same noise draws on every call."""
    generator = torch.Generator(autoencoder.device).manual_seed(0)
    blocks = blocks.to(autoencoder.device)
    correct = [autoencoder(b, labels=b, generator=generator, **forward_kwargs).accuracy * len(b) for b in blocks.split(64)]
    return float(sum(correct) / len(blocks))


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """All prompts in one batched call: left padding with an attention mask, one seed for the whole batch."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    output = model.generate(**inputs, max_new_tokens=32, seed=0, **kwargs)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    return [repr(text[:100]) for text in texts]  # repr: one line, with the newlines visible


def main(argv: list[str] | None = None) -> None:
    args, = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses(args=argv)
    if args.max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1 (training steps of each stage), got {args.max_steps}.")
    start, out = time.time(), Path(args.output_dir)
    torch.manual_seed(args.seed)

    # 1. Text and tokenizer.
    if args.train_file:
        texts = [t for t in iter_texts(args.train_file) if t.strip()]
        if not texts:
            raise ValueError(f"--train_file {args.train_file!r} holds no text.")
        source = Path(args.train_file).name
    else:
        texts, source = builtin_corpus(), "Python's documentation (pydoc topics and standard-library docstrings)"
    if len(texts) < HELD_OUT_EVERY:
        raise ValueError(
            f"{source} has {len(texts)} non-empty documents; the quickstart holds out every {HELD_OUT_EVERY}th "
            f"for evaluation, so it needs at least {HELD_OUT_EVERY} (documents separated by blank lines in a .txt, "
            "records of a .jsonl)."
        )
    held_out = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train_texts = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    tokenizer = train_bpe_tokenizer(iter(train_texts), vocab_size=args.vocab_size)
    train_blocks, eval_blocks = pack(tokenizer, train_texts, args.block_size), pack(tokenizer, held_out, args.block_size)
    if len(train_blocks) == 0 or len(eval_blocks) == 0:
        raise ValueError(f"{source} is too short for blocks of {args.block_size} tokens; use more text.")
    print(f"{source}: {train_blocks.numel():,} training and {eval_blocks.numel():,} held-out tokens; "
          f"tokenizer of {len(tokenizer)} tokens")

    # 2. The autoencoder, from the preset's sizes with the trained tokenizer's vocabulary.
    preset_path = Path(args.preset) if args.preset.endswith(".json") else CONFIGURATION / f"{args.preset}.json"
    preset = json.loads(preset_path.read_text())
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    ae_values = {k: v for k, v in preset["autoencoder_config"].items() if k != "model_type"}
    autoencoder = CalmAutoencoder(CalmAutoencoderConfig(**{**ae_values, "vocab_size": len(tokenizer), **specials}))
    k = autoencoder.config.patch_size
    if args.block_size % k:
        raise ValueError(f"--block_size {args.block_size} must be a multiple of the preset's K={k} (whole chunks).")
    cuda = args.device == "cuda"

    def training_args(stage: str, steps: int, batch_size: int) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(out / "training" / stage), max_steps=steps, learning_rate=3e-3,
            warmup_steps=min(20, steps // 10), lr_scheduler_type="cosine", weight_decay=0.1,
            adam_beta2=0.95, per_device_train_batch_size=batch_size, logging_steps=50, save_strategy="no",
            report_to="none", seed=args.seed, use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0,
        )

    train_dataset = [{"input_ids": block} for block in train_blocks]
    collator = CalmDataCollator(tokenizer.pad_token_id, patch_size=k)
    print(f"autoencoder: {autoencoder.num_parameters() / 1e6:.2f}M parameters, K={k}, Z={autoencoder.config.latent_size}")
    CalmAutoencoderTrainer(model=autoencoder, args=training_args("autoencoder", args.max_steps, 16), train_dataset=train_dataset,
                           data_collator=collator).train()
    autoencoder.eval()
    accuracy = {"mean": token_accuracy(autoencoder, eval_blocks, sample_latents=False),
                "sampled": token_accuracy(autoencoder, eval_blocks),
                "noise_0.3": token_accuracy(autoencoder, eval_blocks, latent_noise_std=0.3)}

    # 3. The CALM on the frozen autoencoder, with the preset's backbone and head.
    backbone = {**preset["backbone_config"], "vocab_size": len(tokenizer), **specials}
    head = {k: v for k, v in preset.items() if k not in ("model_type", "autoencoder_config", "backbone_config",
                                                          "patch_size", "latent_size", *specials)}
    model = CalmForCausalLM.from_autoencoder(autoencoder, backbone_config=backbone, **head, **specials)
    check_block_size(args.block_size, model_context_tokens(model.config), "--block_size")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"CALM: {trainable / 1e6:.2f}M trainable parameters (autoencoder frozen), {model.config.head_type} head")
    CalmTrainer(model=model, args=training_args("calm", args.max_steps, 16), train_dataset=train_dataset,
                data_collator=collator).train()
    model.eval()

    # 4. BrierLM on the held-out text, and samples.
    brier = evaluate_brier(model, eval_blocks, batch_size=16, seeds=(0, 1, 2))
    samples = {t: generate(model, tokenizer, PROMPTS, temperature=t, num_candidates=200) for t in (1.0, 0.5)}

    # 5. A Hub-ready folder: model, code, tokenizer and card; the autoencoder with its own card in autoencoder/.
    data = dict(dataset=Path(args.train_file).stem if args.train_file else "python-docs", dataset_name=source,
                split="held-out (every 20th document)")
    tokenizer_name = f"byte-level BPE ({len(tokenizer)} tokens) trained on the same text"
    model.save_pretrained(out)
    save_tokenizer_with_model(tokenizer, model, out)  # model_max_length = the context in tokens
    name = args.hub_repo_id.split("/")[-1] if args.hub_repo_id else f"calm-quickstart-{args.preset}"
    build_model_card(model, model_name=name, repo_id=args.hub_repo_id, brier_lm={**brier, **data},
                     autoencoder_accuracy={**accuracy, **data}, training_data=source,
                     tokenizer_name=tokenizer_name).save(out / "README.md")
    autoencoder.save_pretrained(out / "autoencoder")
    tokenizer.save_pretrained(out / "autoencoder")
    build_autoencoder_card(autoencoder, model_name=f"{name}-autoencoder",
                           repo_id=args.hub_repo_id and f"{args.hub_repo_id}-autoencoder",
                           accuracy={**accuracy, **data}, noise_robustness={0.3: accuracy["noise_0.3"]},
                           training_data=source, tokenizer_name=tokenizer_name).save(out / "autoencoder" / "README.md")

    # 6. Reload the folder as any Hub user would, and generate from it.
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).to(model.device)
    reloaded_tokenizer = load_tokenizer(out)  # AutoTokenizer, without reading the remote-code config.json
    reloaded_text = generate(reloaded, reloaded_tokenizer, PROMPTS, temperature=0.5, num_candidates=200)[0]

    mean, std = brier["mean"], brier["std"]
    rows = [
        ("autoencoder accuracy", f"z = mean {accuracy['mean']:.2%}, z sampled {accuracy['sampled']:.2%}, "
                                 f"z sampled + noise 0.3 {accuracy['noise_0.3']:.2%}"),
        ("BrierLM (held-out)", f"{mean['brier_lm']:.2f} +- {std['brier_lm']:.2f} over {len(brier['seeds'])} seeds; "
                               + ", ".join(f"Brier-{n} {mean[f'brier_{n}']:.3f}" for n in range(1, 5))),
        *((f"sample T={t}", text) for t, texts_ in samples.items() for text in texts_),
        ("reloaded, T=0.5", reloaded_text),
        ("saved to", f"{out} (+ {out / 'autoencoder'})"),
        ("total time", f"{(time.time() - start) / 60:.1f} min"),
    ]
    print("\n" + "\n".join(f"{name:<22} {value}" for name, value in rows))


if __name__ == "__main__":
    main()
