"""Fine-tune a saved CALM on text files with LoRA and save the adapter (and, with --merge, the merged model).

LoRA goes on the backbone, its input compression and the generative head; the autoencoder stays frozen and
untouched (see modeling_calm/peft_calm.py). The text is packed into fixed blocks of --block_size tokens (a
multiple of K) and trained with the model's own energy loss. Every `TrainingArguments` flag works too
(--per_device_train_batch_size, --gradient_accumulation_steps, --save_steps, --bf16, ...).

Tiny CPU run (seconds; a random tiny CALM from the preset, with a tokenizer trained on the same text):
    printf 'CALM predicts the next vector.\\nEach vector stands for K tokens.\\n\\n%.0s' {1..50} > /tmp/tiny.txt
    python examples/train_tokenizer.py --train_file /tmp/tiny.txt --vocab_size 512 --num_heldout 5 \\
        --output_dir /tmp/calm-tiny
    python -c "from modeling_calm import CalmConfig, CalmForCausalLM as M; \\
        M(CalmConfig.from_json_file('configuration/tiny.json')).save_pretrained('/tmp/calm-tiny')"
    python examples/finetune_lora.py --model /tmp/calm-tiny --train_file /tmp/tiny.txt --block_size 32 \\
        --per_device_train_batch_size 2 --max_steps 10 --lora_r 4 --output_dir /tmp/calm-lora --merge

Real run (GPU):
    python examples/finetune_lora.py --model runs/calm-m --train_file my_domain.jsonl --block_size 2048 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --max_steps 2000 --bf16 \\
        --output_dir runs/calm-m-lora

Load the adapter back with `AutoPeftModelForCausalLM.from_pretrained("runs/calm-m-lora", trust_remote_code=True)`,
or the merged model with `AutoModelForCausalLM.from_pretrained("runs/calm-m-lora/merged", trust_remote_code=True)`.
Run from the repository root with the package installed (`pip install -e ".[data]"`) or with `PYTHONPATH=.`.
"""

import os
from dataclasses import dataclass, field

from peft import get_peft_model
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments, set_seed

from modeling_calm import CalmTrainer
from modeling_calm.card_calm import build_model_card
from modeling_calm.data_calm import (
    CalmDataCollator, load_pretrained, load_text_dataset, load_tokenizer, model_context_tokens,
    save_tokenizer_with_model, tokenize_and_pack,
)
from modeling_calm.peft_calm import calm_lora_config


@dataclass
class FinetuneArguments:
    model: str = field(metadata={"help": "Folder or Hub id of a CalmForCausalLM."})
    train_file: list[str] = field(metadata={"help": "One or more .txt (documents separated by blank lines) / .jsonl / "
                                            ".parquet files or globs."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder or id (default: --model)."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per training block, a multiple of K."})
    text_column: str = field(default="text", metadata={"help": "Text field of .jsonl / .parquet files."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target: str = field(
        default="backbone+head",
        metadata={"help": "Parts to adapt, joined by '+': attention, mlp, compression, head, backbone, all."},
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA) instead of LoRA."})
    merge: bool = field(
        default=False, metadata={"help": "Also save the merged model (with a model card) in OUTPUT_DIR/merged."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model's own code (auto_map .py files); off by default. A CALM "
                                 "needs no flag: the installed modeling_calm package provides its classes."},
    )



@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    # Defaults that suit adapters and scripts; every other TrainingArguments default is kept.
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (LoRA wants ~1e-4..1e-3)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})


def main():
    args, training_args = HfArgumentParser((FinetuneArguments, FinetuneTrainingArguments)).parse_args_into_dataclasses()
    set_seed(training_args.seed)

    model = load_pretrained(AutoModelForCausalLM, args.model, args.trust_remote_code)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    patch_size = model.config.patch_size
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.config.vocab_size}: "
            "use the tokenizer the CALM was trained with."
        )
    if args.block_size % patch_size:
        raise ValueError(f"--block_size {args.block_size} must be a multiple of the model's K={patch_size}.")

    texts = load_text_dataset(args.train_file, text_column=args.text_column)
    with training_args.main_process_first(desc="tokenizing"):
        blocks = tokenize_and_pack(
            texts, tokenizer, args.block_size, patch_size=patch_size, text_column=args.text_column,
            max_length=model_context_tokens(model.config),
        )
    steps = args.block_size // patch_size
    print(f"{len(blocks)} training blocks of {args.block_size} tokens ({steps} steps of K={patch_size})")

    lora = calm_lora_config(
        r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target=args.lora_target,
        use_dora=args.use_dora,
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    # CalmTrainer: the model's per-batch mean loss scaled correctly under gradient accumulation, dataloader_pin_memory
    # off on a CPU (no warning per dataloader), non-finite checks. Blocks have a fixed length: the collator stacks them.
    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=blocks,
        data_collator=CalmDataCollator(tokenizer.pad_token_id, patch_size=patch_size),
    )
    result = trainer.train()
    print(f"trained {result.global_step} steps, mean training loss {result.training_loss:.4f}")

    model.save_pretrained(training_args.output_dir)  # adapter_config.json + adapter_model.safetensors
    save_tokenizer_with_model(tokenizer, model, training_args.output_dir)
    print(f"saved the adapter to {training_args.output_dir}")
    if args.merge:
        merged_dir = os.path.join(training_args.output_dir, "merged")
        merged = model.merge_and_unload()  # a plain CalmForCausalLM with the LoRA updates folded in
        merged.save_pretrained(merged_dir)  # weights, config with auto_map, and the modeling code
        save_tokenizer_with_model(tokenizer, merged, merged_dir)
        card = build_model_card(
            merged,
            model_name=os.path.basename(os.path.normpath(training_args.output_dir)),
            base_model=None if os.path.exists(args.model) else args.model,  # metadata wants a Hub id
            training_data=args.train_file,
            extra_sections={"Fine-tuning": f"LoRA (r={args.lora_r}, alpha={args.lora_alpha}, {args.lora_target}) "
                            f"for {result.global_step} steps on top of {args.model}, merged into the weights."},
        )
        card.save(os.path.join(merged_dir, "README.md"))
        print(f"saved the merged model and its card to {merged_dir}")


if __name__ == "__main__":
    main()
