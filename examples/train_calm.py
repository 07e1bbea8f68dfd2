"""Stage 2 of CALM: train the language model on a frozen autoencoder with `CalmTrainer` (energy loss by default).

CPU run (the autoencoder folder, with its tokenizer, comes from examples/train_autoencoder.py; several processes:
torchrun --nproc_per_node 2 ... --use_cpu true --ddp_backend gloo):
    python examples/train_calm.py --preset tiny --recipe tiny --autoencoder runs/autoencoder-tiny \\
        --train_file wiki300.jsonl --output_dir runs/calm-tiny

CALM-M as in the paper (250k steps x 2M tokens, blocks of 8192 tokens, bf16) on 8 GPUs:
    torchrun --nproc_per_node 8 examples/train_calm.py --preset calm-m --recipe calm \\
        --autoencoder runs/autoencoder --train_file "pile/train/*.jsonl" --streaming \\
        --validation_file wikitext103_test_documents.jsonl --output_dir runs/calm-m
Upcycling a trained causal LM of the same vocabulary (its backbone is copied; see README "Upcycling"):
    python examples/train_calm.py --preset tiny --recipe tiny --autoencoder runs/autoencoder-tiny \
        --from_causal_lm runs/llama-tiny --train_file wiki300.jsonl --output_dir runs/calm-upcycled
(CALM-L/XL: `accelerate launch --config_file configuration/accelerate/fsdp.yaml examples/train_calm.py ...` or
`--deepspeed configuration/deepspeed/zero2.json`; see configuration/README.md.)

Evaluation reports eval_loss, eval_fidelity, eval_diversity, eval_brier_1..4 and eval_brier_lm (a quick estimate:
one seed; examples/evaluate_brierlm.py gives the full figure). The output folder and every checkpoint-N/ load with
    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    AutoTokenizer.from_pretrained(path, trust_remote_code=True)   # or modeling_calm.data_calm.load_tokenizer(path)
and the folder's README.md is a model card (modeling_calm.card_calm) with that BrierLM in its model-index.
"""

import argparse
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from modeling_calm import CalmAutoencoder, CalmForCausalLM, CalmTrainer
from modeling_calm.card_calm import brier_from_trainer_metrics, build_model_card, source_names
from modeling_calm.data_calm import (
    CalmDataCollator, load_text_dataset, load_tokenizer, model_context_tokens, set_model_max_length, tokenize_and_pack,
)


CONFIGURATION = Path(__file__).resolve().parents[1] / "configuration"
# Preset fields that come from the trained autoencoder and the tokenizer instead.
FROM_AUTOENCODER = ("model_type", "autoencoder_config", "backbone_config", "patch_size", "latent_size",
                    "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class ModelArguments:
    autoencoder: str = field(metadata={"help": "A trained CalmAutoencoder: folder or Hub id."})
    preset: str = field(
        default="tiny", metadata={"help": "tiny | calm-m | calm-l | calm-xl (configuration/*.json) or a JSON path."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer; default: the autoencoder's folder."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated CalmConfig changes, e.g. 'head_type=flow,num_samples=4'."}
    )
    recipe: str | None = field(
        default=None, metadata={"help": "tiny | calm | autoencoder (configuration/training/*.json) or a JSON path."}
    )
    eval_brier: bool = field(default=True, metadata={"help": "Estimate Brier-1..4 and BrierLM during evaluation."})
    from_causal_lm: str | None = field(
        default=None,
        metadata={"help": "Upcycle: copy the backbone (layers, norm, rotary settings, token embedding) of this trained "
                  "causal LM (folder or Hub id; same vocabulary as the autoencoder) instead of the preset's "
                  "backbone_config; the head settings still come from the preset."},
    )


@dataclass
class DataArguments:
    train_file: list[str] = field(metadata={"help": "Local .txt/.jsonl/.parquet files or globs, or a Hub dataset."})
    validation_file: list[str] | None = field(default=None, metadata={"help": "Evaluation files (optional)."})
    validation_blocks: int = field(
        default=16, metadata={"help": "Without --validation_file: blocks held out of the training data (0: none)."}
    )
    block_size: int | None = field(default=None, metadata={"help": "Tokens per block; default K x max positions."})
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

    ae_path = model_args.autoencoder
    autoencoder = CalmAutoencoder.from_pretrained(ae_path)
    tokenizer = load_tokenizer(model_args.tokenizer or ae_path)
    if len(tokenizer) != autoencoder.config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, the autoencoder {autoencoder.config.vocab_size}.")
    path = Path(model_args.preset)
    preset = json.loads((path if path.is_file() else CONFIGURATION / f"{model_args.preset}.json").read_text())
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    backbone = {**preset["backbone_config"], "vocab_size": len(tokenizer), **specials}
    head = {k: v for k, v in preset.items() if k not in FROM_AUTOENCODER}
    head.update(parse_overrides(model_args.config_overrides))
    if model_args.from_causal_lm:
        model = CalmForCausalLM.from_causal_lm(model_args.from_causal_lm, autoencoder=autoencoder, **head, **specials)
    else:
        model = CalmForCausalLM.from_autoencoder(autoencoder, backbone_config=backbone, **head, **specials)
    k = model.config.patch_size
    block_size = data_args.block_size or model_context_tokens(model.config)
    set_model_max_length(tokenizer, model.config)  # saved with the model (processing_class) in every checkpoint

    with training_args.main_process_first(desc="tokenizing"):
        pack = dict(tokenizer=tokenizer, block_size=block_size, patch_size=k, text_column=data_args.text_column,
                    max_length=model_context_tokens(model.config))
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

    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=CalmDataCollator(tokenizer.pad_token_id, patch_size=k),
        processing_class=tokenizer,
        eval_brier=model_args.eval_brier,
    )
    if trainer.is_world_process_zero():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"CALM: {trainable / 1e6:.1f}M trainable parameters (autoencoder frozen), K={k}, "
              f"{model.config.head_type} head, blocks of {block_size} tokens; {training_args.world_size} process(es)")
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
        ae_name, tokenizer_name = source_names([ae_path, model_args.tokenizer or ae_path])
        eval_data = dict(dataset=", ".join(source_names(data_args.validation_file or data_args.train_file)),
                         split="validation" if data_args.validation_file else "held-out blocks")
        card = build_model_card(  # from the config: parameters counted on the meta device, whatever the sharding
            model.config, model_name=Path(repo).name, repo_id=repo, training_data=source_names(data_args.train_file),
            brier_lm=brier_from_trainer_metrics(metrics, **eval_data, block_size=block_size),
            tokenizer_name=f"{tokenizer_name} ({len(tokenizer):,} tokens; saved with it)",
            base_model=ae_name if "/" in ae_name else None,  # a Hub id, not a local folder
            extra_sections={"Training procedure": f"{result.global_step} steps of examples/train_calm.py on the frozen "
                            f"autoencoder {ae_name}, blocks of {block_size} tokens; final training loss "
                            f"{result.training_loss:.4f}."},
        )
        card.save(str(Path(training_args.output_dir) / "README.md"))
    trainer.save_model()


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # after main(): the DDP wrapper holding the group must be gone first
        gc.collect()
        torch.distributed.destroy_process_group()  # not at interpreter exit, where gloo's threads may abort
