"""Instruction fine-tuning (issue 18, item 7): chunk-aligned SFT examples (modeling_calm/sft_calm.py), the loss they
give (answer chunks only), examples/finetune_sft.py end to end (full and --lora), and what TRL's SFTTrainer does on
a CALM. Also item 9: no pin_memory warning from finetune_lora.py on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modeling_calm import CalmConfig, CalmForCausalLM
from modeling_calm.data_calm import CalmDataCollator, load_tokenizer, train_bpe_tokenizer
from modeling_calm.sft_calm import (
    DEFAULT_CHAT_TEMPLATE, build_sft_dataset, check_not_trl_sft_trainer, encode_sft_record, sft_prompt_ids, sft_texts,
)
from tests.utils import tiny_autoencoder_config, tiny_calm_config


ROOT = Path(__file__).resolve().parents[1]
K = 4
SENTENCES = ["What is two plus three? The answer is five.", "Name a colour of the sky. Blue.",
             "CALM predicts the next vector of K tokens.", "Question: Answer: user assistant system"]
RECORDS = [
    {"prompt": "What is two plus three?", "completion": " The answer is five."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}]},
    {"prompt": [{"role": "user", "content": "What is two plus three?"}],
     "completion": [{"role": "assistant", "content": "Five."}]},
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe_tokenizer(iter(SENTENCES * 5), vocab_size=300, min_frequency=1)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and tok.chat_template is None
    return tok


def _model(tokenizer) -> CalmForCausalLM:
    vocab = len(tokenizer)
    config = CalmConfig(
        autoencoder_config=tiny_autoencoder_config(vocab_size=vocab),
        backbone_config=dict(tiny_calm_config().backbone_config.to_dict(), vocab_size=vocab),
        noise_size=8, num_mlp_layers=2, num_samples=4, num_target_samples=16,
    )
    torch.manual_seed(0)
    model = CalmForCausalLM(config)
    nn.init.normal_(model.head.output.fc2.weight, std=0.1)  # a "trained" head: the loss depends on the inputs
    return model.eval()


def _answer_start(labels) -> int:
    return next(i for i, label in enumerate(labels) if label != -100)


# ------------------------------------------------------------------------------------------------------------------
# The examples: layout rule
# ------------------------------------------------------------------------------------------------------------------


def test_boundary_rule_holds_for_prompts_of_every_length_mod_k(tokenizer):
    residues = set()
    for n in range(12):
        prompt, completion = "two " * n + "plus three?", " Five" + "." * n
        example = encode_sft_record({"prompt": prompt, "completion": completion}, tokenizer, K)
        ids, labels = example["input_ids"], example["labels"]
        prompt_ids = [1] + tokenizer(prompt, add_special_tokens=False)["input_ids"]  # BOS, then the prompt
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [2]  # then EOS
        residues.add(len(prompt_ids) % K)
        start = _answer_start(labels)
        assert len(ids) == len(labels) and len(ids) % K == 0 and start % K == 0
        fill = -len(prompt_ids) % K
        assert ids[:start] == [1] * fill + prompt_ids  # filled on the left with BOS, as generate fills a prompt
        assert labels[:start] == [-100] * start
        assert labels[start:] == ids[start:] == answer_ids + [0] * (-len(answer_ids) % K)  # pads are targets
        assert ids[:start] == sft_prompt_ids(prompt, tokenizer, K)  # the same prompt ids for generate
    assert residues == set(range(K))


def test_messages_use_the_chat_template_and_only_the_last_answer_is_trained(tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    prompt, answer = sft_texts(record, tokenizer)  # no template on the tokenizer: the default one
    assert prompt == "<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nName a colour.\n<|assistant|>\n"
    assert answer == "Blue.\n"
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    prompt, answer = sft_texts(record, tokenizer, chat_template=template)
    assert prompt.endswith("[user] Name a colour.<|eos|>[assistant] ") and answer == "Blue.<|eos|>"
    example = encode_sft_record(record, tokenizer, K, chat_template=template)
    answer_ids = example["input_ids"][_answer_start(example["labels"]):]
    assert answer_ids.count(2) == 1  # the template's EOS ends the answer; no second one is added
    conversational = encode_sft_record(RECORDS[2], tokenizer, K)
    as_messages = encode_sft_record({"messages": RECORDS[2]["prompt"] + RECORDS[2]["completion"]}, tokenizer, K)
    assert conversational == as_messages
    assert sft_prompt_ids(record["messages"][:-1], tokenizer, K) == example_prompt(record, tokenizer)


def example_prompt(record, tokenizer):
    example = encode_sft_record(record, tokenizer, K)
    return example["input_ids"][:_answer_start(example["labels"])]


@pytest.mark.parametrize("record, match", [
    ({"text": "no fields"}, "needs 'messages', or 'prompt' and 'completion'"),
    ({"prompt": "Q?"}, "needs 'messages', or 'prompt' and 'completion'"),
    ({"prompt": "Q?", "completion": "  "}, r"answer \(`completion`\) is empty"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": ""}]}, "answer .* is empty"),
    ({"messages": [{"role": "user", "content": "Q?"}]}, "last message must be the assistant's"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]"),
    ({"prompt": "Q?", "completion": [{"role": "assistant", "content": "A"}]}, "both be strings or both lists"),
    ("just text", "must be a dict"),
])
def test_bad_records_raise_a_value_error_naming_the_record(tokenizer, record, match):
    with pytest.raises(ValueError, match=f"record 1: .*{match}"):
        build_sft_dataset([RECORDS[0], record], tokenizer, K)


def test_over_long_records_are_refused_or_dropped(tokenizer, tmp_path, caplog):
    long_record = {"prompt": "two plus three " * 40, "completion": " Five."}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(long_record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: \d+ tokens .* exceed max_length=64 \(the model's context\)"):
        build_sft_dataset(path, tokenizer, K, max_length=64)
    examples = build_sft_dataset(path, tokenizer, K, max_length=64, too_long="drop")
    assert examples == [encode_sft_record(RECORDS[0], tokenizer, K)]
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:1: not a JSON object"):
        build_sft_dataset(path, tokenizer, K)


# ------------------------------------------------------------------------------------------------------------------
# The loss covers exactly the answer chunks
# ------------------------------------------------------------------------------------------------------------------


def _loss(model, batch, scored: int, generator_seed: int = 0):
    """The model's loss with explicit noise for `scored` positions: the forward raises unless the model scores
    exactly that many target chunks."""
    g = torch.Generator().manual_seed(generator_seed)
    config = model.config
    noise = torch.rand(config.num_samples, scored, config.noise_size, generator=g) - 0.5
    target_noise = torch.randn(config.num_target_samples, scored, config.latent_size, generator=g)
    with torch.no_grad():
        return model(**batch, noise=noise, target_noise=target_noise, return_brier=False).loss, (noise, target_noise)


def test_the_loss_only_covers_answer_chunks(tokenizer):
    model = _model(tokenizer)
    examples = build_sft_dataset(RECORDS, tokenizer, K)
    batch = CalmDataCollator(tokenizer.pad_token_id, patch_size=K)(examples)
    answer_chunks = sum(len(e["labels"]) - _answer_start(e["labels"]) for e in examples) // K
    loss, (noise, target_noise) = _loss(model, batch, answer_chunks)
    with pytest.raises(ValueError, match="one entry per valid target position"):
        _loss(model, batch, answer_chunks + 1)  # the model scores exactly the answer chunks, no more

    # The loss is the plain mean over the answer chunks: each one scored alone (same noise) averages to it.
    labels = batch["labels"]
    answer = (labels.view(len(examples), -1, K) != -100).all(-1)  # [B, L] answer chunks
    singles = []
    for row, chunk in answer.nonzero().tolist():
        alone = torch.full_like(labels, -100)
        alone[row, chunk * K:(chunk + 1) * K] = labels[row, chunk * K:(chunk + 1) * K]
        j = len(singles)
        with torch.no_grad():
            singles.append(model(**{**batch, "labels": alone}, noise=noise[:, j:j + 1],
                                 target_noise=target_noise[:, j:j + 1], return_brier=False).loss)
    torch.testing.assert_close(loss, torch.stack(singles).mean())

    # Other prompt tokens (same lengths): the same chunks are scored; another answer token changes the loss.
    swapped = {**batch, "input_ids": batch["input_ids"].clone()}
    prompt = (labels == -100) & (batch["attention_mask"] == 1)
    swapped["input_ids"][prompt] = 5
    _loss(model, swapped, answer_chunks)
    first = _answer_start(examples[0]["labels"])
    changed = {**batch, "input_ids": batch["input_ids"].clone(), "labels": labels.clone()}
    token = int(changed["input_ids"][0, first])
    changed["input_ids"][0, first] = changed["labels"][0, first] = 7 if token != 7 else 8
    assert not torch.allclose(_loss(model, changed, answer_chunks)[0], loss)
    # Unmasking the prompt's labels would score its chunks too: the -100 labels are what leaves them out.
    unmasked = {**batch, "labels": torch.where(prompt, batch["input_ids"], labels)}
    prompt_chunks = sum(_answer_start(e["labels"]) // K - 1 for e in examples)
    _loss(model, unmasked, answer_chunks + prompt_chunks)


# ------------------------------------------------------------------------------------------------------------------
# examples/finetune_sft.py and finetune_lora.py end to end
# ------------------------------------------------------------------------------------------------------------------


def _run(script: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args, "--report_to", "none"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pin_memory" not in result.stdout + result.stderr  # item 9: no pin_memory warning on a CPU
    return result


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calm")
    _model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_sft_example_runs_and_saves_a_folder_that_loads(model_dir, tmp_path, lora):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    train_file = tmp_path / "sft.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 3), encoding="utf-8")
    out = tmp_path / "sft"
    extra = ["--lora", "--lora_r", "4", "--merge"] if lora else []
    result = _run("finetune_sft.py", ["--model", str(model_dir), "--train_file", str(train_file), "--output_dir",
                                      str(out), "--per_device_train_batch_size", "3", "--max_steps", "2",
                                      "--learning_rate", "1e-2", "--save_strategy", "no", *extra], tmp_path)
    assert "9 SFT examples" in result.stdout and "trained 2 steps" in result.stdout
    assert load_tokenizer(out).chat_template == DEFAULT_CHAT_TEMPLATE  # inference renders prompts as trained
    base = CalmForCausalLM.from_pretrained(model_dir)
    if lora:
        assert (out / "adapter_config.json").exists()
        adapted = AutoPeftModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert type(adapted.get_base_model()).__name__ == "CalmForCausalLM"
        out = out / "merged"
    tuned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert "Instruction fine-tuning" in (out / "README.md").read_text()
    moved = [n for n, w in tuned.state_dict().items() if not torch.equal(w, base.state_dict()[n])]
    assert moved and not any(n.startswith("autoencoder.") for n in moved)
    ids = torch.tensor([sft_prompt_ids("What is two plus three?", load_tokenizer(out), K)])
    assert tuned.generate(input_ids=ids, max_new_tokens=8, seed=0).shape[1] > ids.shape[1]


def test_finetune_sft_refuses_merge_without_lora(model_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import finetune_sft
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match="--merge merges LoRA adapters: it needs --lora"):
        finetune_sft.main(["--model", str(model_dir), "--train_file", "x.jsonl", "--output_dir", str(tmp_path),
                           "--merge"])


def test_finetune_lora_prints_no_pin_memory_warning_on_cpu(model_dir, tmp_path):
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n\n".join(SENTENCES * 5) + "\n", encoding="utf-8")
    _run("finetune_lora.py", ["--model", str(model_dir), "--train_file", str(train_file), "--output_dir",
                              str(tmp_path / "lora"), "--block_size", "16", "--per_device_train_batch_size", "2",
                              "--max_steps", "1", "--lora_r", "4"], tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# TRL
# ------------------------------------------------------------------------------------------------------------------


def test_trl_sft_trainer_cannot_train_a_calm_and_our_check_says_why(tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from modeling_calm import CalmTrainer

    model = _model(tokenizer).train()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, save_strategy="no", dataloader_pin_memory=False)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([RECORDS[0]] * 4))
    with pytest.raises(ValueError, match="TRL's SFTTrainer cannot train a CALM.*CalmTrainer"):
        check_not_trl_sft_trainer(trainer)
    # What it does without the check (trl 1.16): its fused LM head calls the backbone on token ids, which the
    # backbone's pre-hook refuses with the reason (before: an AttributeError on get_output_embeddings() being None).
    # If this starts to pass, TRL changed: re-check whether SFTTrainer can train a CALM through the model's loss.
    with pytest.raises(ValueError, match=r"The CALM backbone reads chunk embeddings \(inputs_embeds\).*CalmTrainer"):
        trainer.train()
    check_not_trl_sft_trainer(CalmTrainer(model=_model(tokenizer), args=args, train_dataset=[]))  # no error
