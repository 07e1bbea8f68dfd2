"""One reader and one rule for text files, in training (`data_calm`) and evaluation (`load_text_blocks`)."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from modeling_calm.data_calm import iter_texts, load_text_dataset, tokenize_and_pack
from modeling_calm.evaluation_calm import load_text_blocks


TEXT = "Title one\nfirst line of one.\nsecond line of one.\n\n\n  \nTitle two\nonly line of two.\n"
DOCUMENTS = ["Title one\nfirst line of one.\nsecond line of one.", "Title two\nonly line of two."]


def char_tokenizer():
    alphabet = sorted(set(TEXT) | {"\n"})
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(TEXT.replace("\n", "\r\n", 1), encoding="utf-8")  # a Windows line break is a line break too
    return path


def test_one_rule_for_training_and_evaluation(text_file, tmp_path):
    assert list(iter_texts(text_file)) == DOCUMENTS
    dataset = load_text_dataset(text_file)
    assert dataset["text"] == DOCUMENTS
    assert list(load_text_dataset(text_file, streaming=True)) == [{"text": d} for d in DOCUMENTS]

    tokenizer = char_tokenizer()
    newline = tokenizer.convert_tokens_to_ids("\n")
    train_ids = tokenize_and_pack(dataset, tokenizer, 4, patch_size=4)["input_ids"]
    train_ids = [i for block in train_ids for i in block]
    eval_ids = load_text_blocks(text_file, tokenizer, 4, multiple_of=4)["input_ids"].flatten().tolist()
    # Training puts BOS before each document; evaluation puts EOS between documents; the documents are the same
    # two, with their inner line breaks.
    assert train_ids.count(tokenizer.bos_token_id) == 2 and train_ids.count(newline) == 3
    assert eval_ids.count(tokenizer.eos_token_id) == 1 and eval_ids.count(newline) == 3
    assert "".join(tokenizer.convert_ids_to_tokens([i for i in eval_ids if i > 2])) == "".join(DOCUMENTS)

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS), encoding="utf-8")
    assert load_text_dataset(jsonl)["text"] == DOCUMENTS == list(iter_texts(jsonl))
    assert load_text_blocks(jsonl, tokenizer, 4, multiple_of=4)["input_ids"].flatten().tolist() == eval_ids


def test_edited_file_is_read_again(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo\n", encoding="utf-8")
    assert load_text_dataset(path)["text"] == ["one", "two"]
    path.write_text("three\nfour\n", encoding="utf-8")
    assert load_text_dataset(path)["text"] == ["three\nfour"]  # not the cached dataset of the old content


def test_bad_jsonl_records_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: no field 'text'"):
        list(iter_texts(bad))
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: the field 'text' is not a string"):
        load_text_blocks(bad, char_tokenizer(), 4)


def test_train_tokenizer_scales_its_held_out_default_to_a_small_corpus(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(f"text {i} of a small corpus, only thirty of them" for i in range(30)), encoding="utf-8")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "train_tokenizer.py"), "--train_file", str(corpus), "--vocab_size",
         "300", "--output_dir", str(tmp_path / "tok")], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and "compression" in result.stdout  # 3 held out, 27 trained
