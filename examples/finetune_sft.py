"""Instruction fine-tuning (SFT) of a saved CALM on chat or prompt/completion records, full or with --lora.

Records are JSON lines (see modeling_calm/sft_calm.py): {"messages": [{"role": "user", "content": ...}, ...,
{"role": "assistant", "content": ...}]} rendered with the tokenizer's chat template (a tokenizer without one gets
sft_calm.DEFAULT_CHAT_TEMPLATE, saved with the output), or {"prompt": ..., "completion": ...}. Only the answer (the
last assistant message, or the completion) is trained: the prompt is filled on the left to whole chunks of K
tokens (with BOS, as `generate` fills a prompt), so the answer starts on a chunk boundary; the answer ends with EOS
and its last chunk is completed with pad tokens. A record longer than the model's context is an error (or dropped
with --drop_long). Training uses CalmTrainer and the model's own energy loss; every `TrainingArguments` flag works.

Tiny CPU run (seconds): the tokenizer and tiny CALM of finetune_lora.py's docstring, then
    printf '{"prompt": "Q: 2+3?\\nA:", "completion": " 5"}\\n%.0s' {1..20} > /tmp/sft.jsonl
    python examples/finetune_sft.py --model /tmp/calm-tiny --train_file /tmp/sft.jsonl --max_steps 10 \\
        --per_device_train_batch_size 4 --output_dir /tmp/calm-sft            # add --lora for LoRA (+ --merge)

The output folder is Hub-ready (weights, config with the remote code, tokenizer with its chat template, card); with
--lora it holds the adapter, and with --merge also the merged model in OUTPUT_DIR/merged. Prompt at inference:
`modeling_calm.sft_calm.sft_prompt_ids(messages_or_text, tokenizer, K)` gives the prompt ids as trained.
"""

import os
from dataclasses import dataclass, field

from peft import get_peft_model
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments, set_seed

from modeling_calm import CalmTrainer
from modeling_calm.card_calm import build_model_card
from modeling_calm.data_calm import (
    CalmDataCollator, load_pretrained, load_tokenizer, model_context_tokens, save_tokenizer_with_model,
)
from modeling_calm.peft_calm import calm_lora_config
from modeling_calm.sft_calm import DEFAULT_CHAT_TEMPLATE, build_sft_dataset


@dataclass
class SftArguments:
    model: str = field(metadata={"help": "Folder or Hub id of a CalmForCausalLM."})
    train_file: str = field(metadata={"help": "A .jsonl file of records: 'messages', or 'prompt' and 'completion'."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder or id (default: --model)."})
    drop_long: bool = field(default=False, metadata={"help": "Drop records longer than the model's context "
                                                     "(default: stop with an error naming the record)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of every weight."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target: str = field(
        default="backbone+head",
        metadata={"help": "Parts to adapt, joined by '+': attention, mlp, compression, head, backbone, all."},
    )
    merge: bool = field(default=False, metadata={"help": "With --lora: also save the merged model in "
                                                 "OUTPUT_DIR/merged."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model's own code (auto_map .py files); off by default. A CALM "
                                 "needs no flag: the installed modeling_calm package provides its classes."},
    )


@dataclass
class SftTrainingArguments(TrainingArguments):
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (full fine-tuning; LoRA "
                                                         "wants ~1e-4..1e-3)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})



def main(argv: list[str] | None = None):
    args, training_args = HfArgumentParser((SftArguments, SftTrainingArguments)).parse_args_into_dataclasses(argv)
    if args.merge and not args.lora:
        raise ValueError("--merge merges LoRA adapters: it needs --lora (a full fine-tune saves the model itself).")
    set_seed(training_args.seed)
    model = load_pretrained(AutoModelForCausalLM, args.model, args.trust_remote_code)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: use the tokenizer the CALM was trained with.")
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # saved with the model: inference renders prompts alike
    k = model.config.patch_size
    with training_args.main_process_first(desc="tokenizing"):
        examples = build_sft_dataset(args.train_file, tokenizer, k, max_length=model_context_tokens(model.config),
                                     too_long="drop" if args.drop_long else "error")
    answer_chunks = sum(sum(label != -100 for label in e["labels"]) for e in examples) // k
    print(f"{len(examples)} SFT examples, {answer_chunks} answer chunks of K={k} to train on")

    if args.lora:
        model = get_peft_model(model, calm_lora_config(r=args.lora_r, alpha=args.lora_alpha,
                                                       dropout=args.lora_dropout, target=args.lora_target))
        model.print_trainable_parameters()
    # CalmTrainer: the model's own loss (answer chunks only), pin_memory off on a CPU, non-finite checks.
    trainer = CalmTrainer(model=model, args=training_args, train_dataset=examples,
                          data_collator=CalmDataCollator(tokenizer.pad_token_id, patch_size=k))
    result = trainer.train()
    print(f"trained {result.global_step} steps, mean training loss {result.training_loss:.4f}")

    out = training_args.output_dir
    model.save_pretrained(out)  # the model (weights, config with auto_map, code) or, with --lora, the adapter
    save_tokenizer_with_model(tokenizer, model, out)
    kind = f"LoRA (r={args.lora_r}, alpha={args.lora_alpha}, {args.lora_target})" if args.lora else "Full"
    section = (f"{kind} instruction fine-tuning for {result.global_step} steps on {len(examples)} records of "
               f"{os.path.basename(args.train_file)}, on top of {args.model}; the loss covers the answer chunks only.")
    folder = out
    if args.merge:
        folder = os.path.join(out, "merged")
        model = model.merge_and_unload()
        model.save_pretrained(folder)
        save_tokenizer_with_model(tokenizer, model, folder)
        section += " The adapter is merged into the weights."
    if not args.lora or args.merge:
        build_model_card(model, model_name=os.path.basename(os.path.normpath(out)),
                         base_model=None if os.path.exists(args.model) else args.model,
                         training_data=args.train_file, extra_sections={"Instruction fine-tuning": section},
                         ).save(os.path.join(folder, "README.md"))
    print(f"saved to {folder}")


if __name__ == "__main__":
    main()
