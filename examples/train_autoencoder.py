"""Stage 1 of CALM: train the chunk autoencoder (K tokens <-> one vector) with `CalmAutoencoderTrainer`.

CPU run (300 steps, about 2 minutes on 2 cores, ~80 % token accuracy; wiki300.jsonl = the first 300 lines of
../shared/corpus/wiki2018.jsonl.xz, the tokenizer from examples/train_tokenizer.py on it with --vocab_size 512;
several processes: torchrun --nproc_per_node 2 ... --use_cpu true --ddp_backend gloo):
    python examples/train_autoencoder.py --preset tiny --recipe tiny --tokenizer runs/tokenizer \\
        --train_file wiki300.jsonl --output_dir runs/autoencoder-tiny

The paper's autoencoder (Llama-3 tokenizer + [PAD], 30k steps x 512k tokens, bf16) on 8 GPUs:
    torchrun --nproc_per_node 8 examples/train_autoencoder.py --preset calm-m --recipe autoencoder \\
        --tokenizer meta-llama/Meta-Llama-3-8B --train_file "pile/train/0[01].jsonl" --streaming \\
        --validation_file wikitext103_test_documents.jsonl --output_dir runs/autoencoder

The output folder (and every checkpoint-N/ in it) holds a Hub-ready model with its code and the tokenizer: the
`--autoencoder` of examples/train_calm.py. Its README.md is a model card (modeling_calm.card_calm) with the final
evaluation (token accuracy, also under latent noise) in its model-index. Elsewhere, it loads with
    AutoModel.from_pretrained(folder, trust_remote_code=True)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)   # or modeling_calm.data_calm.load_tokenizer(folder)

Flags: the three dataclasses below and every `TrainingArguments` flag; `--recipe` (configuration/training/*.json)
sets defaults that command-line flags override.
"""

import argparse
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from modeling_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmAutoencoderTrainer
from modeling_calm.card_calm import accuracy_from_trainer_metrics, build_autoencoder_card, source_names
from modeling_calm.data_calm import CalmDataCollator, load_text_dataset, load_tokenizer, tokenize_and_pack


CONFIGURATION = Path(__file__).resolve().parents[1] / "configuration"


@dataclass
class ModelArguments:
    tokenizer: str = field(metadata={"help": "Tokenizer folder or Hub id; sets vocab_size and bos/eos/pad ids."})
    preset: str = field(
        default="tiny",
        metadata={"help": "tiny | autoencoder | calm-m | calm-l | calm-xl (configuration/*.json) or a JSON path; "
                  "a CALM preset contributes its autoencoder_config."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated config changes, e.g. 'latent_size=32,kl_weight=0.01'."}
    )
    recipe: str | None = field(
        default=None, metadata={"help": "tiny | autoencoder | calm (configuration/training/*.json) or a JSON path."}
    )
    latent_noise_stds: list[float] = field(
        default_factory=lambda: [0.3], metadata={"help": "Extra latent noise levels for eval_accuracy_noise_*."}
    )


@dataclass
class DataArguments:
    train_file: list[str] = field(metadata={"help": "Local .txt/.jsonl/.parquet files or globs, or a Hub dataset."})
    validation_file: list[str] | None = field(default=None, metadata={"help": "Evaluation files (optional)."})
    validation_blocks: int = field(
        default=16, metadata={"help": "Without --validation_file: blocks held out of the training data (0: none)."}
    )
    block_size: int = field(default=2048, metadata={"help": "Tokens per packed block (a multiple of K)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the training files (needs --max_steps)."})
    text_column: str = field(default="text", metadata={"help": "Column (JSON field) holding the text."})


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    recipe = pre.parse_known_args(argv)[0].recipe
    if recipe:
        path = Path(recipe) if Path(recipe).is_file() else CONFIGURATION / "training" / f"{recipe}.json"
        values = json.loads(path.read_text())
        unknown = set(values) - {action.dest for action in parser._actions}
        if unknown:
            raise ValueError(f"Recipe {path} has keys that are no flag of this script: {sorted(unknown)}.")
        parser.set_defaults(**values)  # command-line flags still win
    return parser.parse_args_into_dataclasses(args=argv)


def parse_overrides(text: str | None) -> dict:
    values = {}
    for key, value in (item.split("=", 1) for item in (text or "").split(",") if item.strip()):
        try:
            values[key.strip()] = json.loads(value)
        except json.JSONDecodeError:  # a bare string, e.g. head_type=flow
            values[key.strip()] = value
    return values


def main():
    model_args, data_args, training_args = parse_args()

    tokenizer = load_tokenizer(model_args.tokenizer)
    if tokenizer.pad_token is None:  # the paper appends [PAD] to Llama-3's 128,256 tokens
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    path = Path(model_args.preset)
    values = json.loads((path if path.is_file() else CONFIGURATION / f"{model_args.preset}.json").read_text())
    values = values.get("autoencoder_config", values)  # a CALM preset nests the autoencoder
    values.pop("model_type", None)
    values.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    values.update(parse_overrides(model_args.config_overrides))
    config = CalmAutoencoderConfig(**values)
    model = CalmAutoencoder(config)

    with training_args.main_process_first(desc="tokenizing"):
        pack = dict(tokenizer=tokenizer, block_size=data_args.block_size, patch_size=config.patch_size,
                    text_column=data_args.text_column)
        column = data_args.text_column
        texts = load_text_dataset(data_args.train_file, streaming=data_args.streaming, text_column=column)
        train = tokenize_and_pack(texts, **pack)
        evaluation = None
        if data_args.validation_file:
            evaluation = tokenize_and_pack(load_text_dataset(data_args.validation_file), **pack)
        elif data_args.validation_blocks > 0 and not data_args.streaming:
            held_out = min(data_args.validation_blocks, len(train) // 2)
            evaluation = train.select(range(len(train) - held_out, len(train)))
            train = train.select(range(len(train) - held_out))
    if evaluation is None:
        training_args.eval_strategy = "no"

    trainer = CalmAutoencoderTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=CalmDataCollator(tokenizer.pad_token_id, patch_size=config.patch_size),
        processing_class=tokenizer,
        latent_noise_stds=model_args.latent_noise_stds,
    )
    if trainer.is_world_process_zero():
        print(f"autoencoder: {model.num_parameters() / 1e6:.1f}M parameters, K={config.patch_size}, "
              f"Z={config.latent_size}; {training_args.world_size} process(es)")
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    metrics = {}
    if evaluation is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():  # the card before save_model, which (with --push_to_hub) uploads it
        repo = trainer.hub_model_id or training_args.output_dir  # the Hub repo (set by the Trainer) when pushing
        eval_data = dict(dataset=", ".join(source_names(data_args.validation_file or data_args.train_file)),
                         split="validation" if data_args.validation_file else "held-out blocks")
        accuracy, robustness = accuracy_from_trainer_metrics(metrics, **eval_data)
        card = build_autoencoder_card(
            config, model_name=Path(repo).name, repo_id=repo, accuracy=accuracy, noise_robustness=robustness,
            training_data=source_names(data_args.train_file),
            tokenizer_name=f"{source_names(model_args.tokenizer)[0]} ({len(tokenizer):,} tokens; saved with it)",
            extra_sections={"Training procedure": f"{result.global_step} steps of examples/train_autoencoder.py on "
                            f"blocks of {data_args.block_size} tokens; final training loss "
                            f"{result.training_loss:.4f}."},
        )
        card.save(str(Path(training_args.output_dir) / "README.md"))
    trainer.save_model()


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # after main(): the DDP wrapper holding the group must be gone first
        gc.collect()
        torch.distributed.destroy_process_group()  # not at interpreter exit, where gloo's threads may abort
