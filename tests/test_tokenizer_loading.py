"""Tokenizers saved with a CALM: they load without remote code or a prompt and know the model's context (tokens)."""

import json

import pytest
from transformers import TrainingArguments

from modeling_calm import CalmForCausalLM, CalmTrainer
from modeling_calm.data_calm import (
    CalmDataCollator, load_tokenizer, model_context_tokens, save_tokenizer_with_model, tokenize_and_pack,
    train_bpe_tokenizer,
)
from tests.utils import run_without_package, tiny_calm_config

TEXTS = [f"document {i} says hello to the tiny model number {i % 7}" for i in range(40)]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calm")
    model = CalmForCausalLM(tiny_calm_config())
    model.save_pretrained(folder)
    save_tokenizer_with_model(train_bpe_tokenizer(iter(TEXTS), vocab_size=300), model, folder)
    return folder


def test_context_in_tokens_is_saved(model_folder):
    assert model_context_tokens(tiny_calm_config()) == 64 * 4
    saved = json.loads((model_folder / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 256 and saved["tokenizer_class"] == "TokenizersBackend"


def test_plain_load_in_a_fresh_process(model_folder):
    # As a Hub user would: the package absent, stdin closed (a "[y/N]" prompt fails at once), warnings on.
    out = run_without_package(f"""
        import logging, warnings
        warnings.simplefilter("error")
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
        records = []
        handler = logging.Handler(); handler.emit = records.append
        hf_logging.get_logger().addHandler(handler)
        tok = AutoTokenizer.from_pretrained({str(model_folder)!r}, trust_remote_code=True)
        assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
        print(type(tok).__name__, tok.model_max_length, len(tok(["x" * 2000], truncation=True)["input_ids"][0]))
    """, cwd=model_folder.parent)
    assert out.split() == ["TokenizersBackend", "256", "256"]


def test_load_tokenizer_never_reads_the_remote_config(model_folder, capfd):
    tok = load_tokenizer(model_folder)
    err = capfd.readouterr().err
    assert type(tok).__name__ == "TokenizersBackend" and tok.model_max_length == 256 and tok.bos_token == "<|bos|>"
    assert "[y/N]" not in err and "model of type" not in err


def test_block_sizes_beyond_the_context_are_refused(model_folder, tmp_path):
    from datasets import Dataset

    tokenizer = load_tokenizer(model_folder)
    texts = Dataset.from_dict({"text": TEXTS * 10})
    with pytest.raises(ValueError, match=r"block_size=260 exceeds the model's context of 256 tokens"):
        tokenize_and_pack(texts, tokenizer, 260, patch_size=4, max_length=256)
    model = CalmForCausalLM(tiny_calm_config())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    collator = CalmDataCollator(0, patch_size=4)
    too_long = tokenize_and_pack(texts, tokenizer, 260, patch_size=4)
    with pytest.raises(ValueError, match=r"longest train_dataset example, of length=260 exceeds .* 256 tokens"):
        CalmTrainer(model=model, args=args, train_dataset=too_long, data_collator=collator)
    with pytest.raises(ValueError, match=r"longest eval_dataset\['a'\] example, of length=272 exceeds"):
        CalmTrainer(model=model, args=args, eval_dataset={"a": [{"input_ids": [1] * 272}]}, data_collator=collator)
    trainer = CalmTrainer(model=model, args=args, train_dataset=tokenize_and_pack(texts, tokenizer, 256, patch_size=4),
                          data_collator=collator)
    assert trainer.args.dataloader_pin_memory is False  # a CPU run: nothing to pin, no warning per dataloader
