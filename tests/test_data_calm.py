"""Tests of modeling_calm.data_calm: tokenizer training, loading, packing, collating, the example script.

Every corpus is a few kilobytes written into tmp_path; nothing touches the network.
"""

import gzip
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from modeling_calm.data_calm import (  # noqa: E402
    DEFAULT_SPECIAL_TOKENS,
    CalmDataCollator,
    iter_texts,
    load_text_dataset,
    tokenize_and_pack,
    train_bpe_tokenizer,
)


datasets = pytest.importorskip("datasets")
REPO_ROOT = Path(__file__).resolve().parents[1]

WORDS = "the cat sat on a mat while dogs ran über straße naïve 日本語 🙂 and then , . !".split()
ROUND_TRIP = [
    "Hello world, this is CALM.",
    "  two leading spaces and a trailing one ",
    "\nstarts with a newline\n\nand has a blank line\n",
    "tabs\tand  double  spaces , odd . spacing",
    "Ünïcödé — 日本語のテキスト 🙂 émoji ﬁ ligature",
    "<|eos|> written out in text",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str | None]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keeps every datasets cache file (Arrow files, locks) of this module in a temporary folder."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
        yield cache


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", make_docs(120))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe_tokenizer(corpus, vocab_size=300, min_frequency=2)


# ---------------------------------------------------------------------------------------------------------------
# iter_texts and train_bpe_tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_iter_texts_txt_jsonl_and_compressed(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nthird line\r\n", encoding="utf-8")
    assert list(iter_texts(tmp_path / "a.txt")) == ["first line", "third line"]  # documents: blank-line separated
    write_jsonl(tmp_path / "b.jsonl", ["x", None, "y"])
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "zipped"}) + "\n\n")
    assert list(iter_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"])) == ["first line", "third line", "x", "y"]
    assert list(iter_texts(str(tmp_path / "c.jsonl*"), text_column="body")) == ["zipped"]
    with pytest.raises(ValueError, match="no field 'text'"):
        list(iter_texts(tmp_path / "c.jsonl.gz"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt and \.jsonl"):
        iter_texts(tmp_path / "d.csv")  # raised at the call, before any reading
    with pytest.raises(FileNotFoundError):
        iter_texts(tmp_path / "missing.txt")


def test_tokenizer_special_tokens_and_round_trip(tokenizer):
    assert len(tokenizer) == 300
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == list(DEFAULT_SPECIAL_TOKENS.values())
    # No special token is added on encode: separators are the packer's job.
    assert tokenizer("the cat")["input_ids"] == tokenizer("the cat", add_special_tokens=False)["input_ids"]
    for text in ROUND_TRIP + make_docs(20, seed=1):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Merges were learned: frequent words are single tokens.
    assert len(tokenizer(" the")["input_ids"]) == 1


def test_tokenizer_save_and_reload_offline(tmp_path, corpus):
    from transformers import AutoTokenizer

    trained = train_bpe_tokenizer(
        (t for t in iter_texts(corpus)), vocab_size=280, output_dir=tmp_path / "tok", show_progress=True
    )
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(reloaded) == len(trained) == 280
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    for text in ROUND_TRIP:
        ids = reloaded(text)["input_ids"]
        assert ids == trained(text)["input_ids"]
        assert reloaded.decode(ids) == text


def test_tokenizer_options_and_errors(corpus):
    custom = train_bpe_tokenizer(
        corpus, vocab_size=270, special_tokens={"eos_token": "</s>", "pad_token": "<pad>"}, max_texts=10
    )
    assert (custom.eos_token_id, custom.pad_token_id, custom.bos_token_id) == (0, 1, None)
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(corpus, vocab_size=200)
    with pytest.raises(ValueError, match="roles"):
        train_bpe_tokenizer(corpus, vocab_size=300, special_tokens={"sep_token": "<sep>"})
    with pytest.raises(ValueError, match="No texts"):
        train_bpe_tokenizer(iter([]), vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"iter\(texts\)"):  # a list is read as file names, not texts
        train_bpe_tokenizer(["just some text"], vocab_size=300)


# ---------------------------------------------------------------------------------------------------------------
# load_text_dataset
# ---------------------------------------------------------------------------------------------------------------


def test_load_text_dataset_formats(tmp_path, corpus):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("three\n", encoding="utf-8")
    texts = load_text_dataset(str(tmp_path / "*.txt"))
    assert texts["text"] == ["one", "two", "three"]
    jsonl = load_text_dataset(corpus)
    assert jsonl.column_names == ["text", "id"] and len(jsonl) == 120
    jsonl.to_parquet(str(tmp_path / "docs.parquet"))
    assert load_text_dataset(tmp_path / "docs.parquet")["text"] == jsonl["text"]
    with gzip.open(tmp_path / "docs.jsonl.gz", "wb") as f:
        f.write(corpus.read_bytes())
    assert load_text_dataset(tmp_path / "docs.jsonl.gz")["text"] == jsonl["text"]
    streamed = load_text_dataset([corpus], streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert next(iter(streamed))["text"] == jsonl[0]["text"]


def test_load_text_dataset_errors(tmp_path, corpus):
    (tmp_path / "empty.txt").touch()
    with pytest.raises(ValueError, match=r"empty\.txt.* is empty"):
        load_text_dataset(tmp_path / "empty.txt")
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(ValueError, match=r"empty\.jsonl.* is empty"):
        load_text_dataset(str(tmp_path / "empty.jsonl"), streaming=True)
    with gzip.open(tmp_path / "empty.txt.gz", "wb"):
        pass
    with pytest.raises(ValueError, match=r"empty\.txt\.gz.* is empty"):
        load_text_dataset(tmp_path / "empty.txt.gz")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"Unknown extension '\.csv'"):
        load_text_dataset(tmp_path / "data.csv")
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="mix formats"):
        load_text_dataset([tmp_path / "a.txt", corpus])
    with pytest.raises(ValueError, match="no column 'body'"):
        load_text_dataset(corpus, text_column="body")
    with pytest.raises(FileNotFoundError, match="No file matches"):
        load_text_dataset(str(tmp_path / "nothing*.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# tokenize_and_pack
# ---------------------------------------------------------------------------------------------------------------


def expected_stream(tokenizer, texts, separator):
    """The token stream packing must reproduce: each non-empty document with its separator, in order."""
    stream = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if ids and separator == "bos":
            ids = [tokenizer.bos_token_id] + ids
        if ids and separator == "eos":
            ids = ids + [tokenizer.eos_token_id]
        stream.extend(ids)
    return stream


@pytest.mark.parametrize("separator", ["bos", "eos", None])
def test_pack_blocks_are_exact_and_lose_only_the_tail(corpus, tokenizer, separator):
    docs = load_text_dataset(corpus)
    block_size, patch_size = 24, 4
    # batch_size 7 puts many block borders across tokenization batches: no token may be lost there.
    packed = tokenize_and_pack(docs, tokenizer, block_size, patch_size=patch_size, separator=separator, batch_size=7)
    assert packed.column_names == ["input_ids", "labels"]
    stream = expected_stream(tokenizer, docs["text"], separator)
    assert len(packed) == len(stream) // block_size > 10
    assert len(stream) % block_size > 0  # the corpus really has a tail to drop
    blocks = list(packed["input_ids"])
    assert all(len(block) == block_size and len(block) % patch_size == 0 for block in blocks)
    assert list(itertools.chain.from_iterable(blocks)) == stream[: len(packed) * block_size]
    assert packed["labels"] == blocks
    assert -100 not in set(itertools.chain.from_iterable(packed["labels"]))
    # One separator per document (every document here is non-empty), of the kind asked for.
    separator_id = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, None: None}[separator]
    for special in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        assert stream.count(special) == (len(docs) if special == separator_id else 0)
    if separator == "bos":
        assert blocks[0][0] == tokenizer.bos_token_id
    batch = CalmDataCollator(pad_token_id=tokenizer.pad_token_id, patch_size=patch_size)(list(packed.select(range(3))))
    assert batch["input_ids"].shape == (3, block_size) and batch["labels"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())


def test_pack_separator_between_documents(tokenizer):
    texts = ["the cat", "", "a dog", None, "then"]
    docs = datasets.Dataset.from_dict({"text": texts})
    pieces = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("the cat", "a dog", "then")]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    with_bos = [bos, *pieces[0], bos, *pieces[1], bos, *pieces[2]]
    with_eos = [*pieces[0], eos, *pieces[1], eos, *pieces[2], eos]
    # auto = BOS when the tokenizer has one; empty and null documents get no separator.
    assert tokenize_and_pack(docs, tokenizer, len(with_bos))["input_ids"] == [with_bos]
    assert tokenize_and_pack(docs, tokenizer, len(with_eos), separator="eos")["input_ids"] == [with_eos]
    no_bos = train_bpe_tokenizer(iter(texts[:1] * 3), vocab_size=260, special_tokens={"eos_token": "<|eos|>"})
    no_bos_eos = [token for t in ("the cat", "a dog", "then") for token in [*no_bos(t)["input_ids"], 0]]
    packed = tokenize_and_pack(docs, no_bos, 1, separator="auto")["input_ids"]  # blocks of one token: nothing dropped
    assert no_bos.eos_token_id == 0 and list(itertools.chain.from_iterable(packed)) == no_bos_eos
    # A document that spells out a special token keeps it as text: only real document starts get a BOS.
    literal = datasets.Dataset.from_dict({"text": ["a <|bos|> b <|eos|>"]})
    ids = list(itertools.chain.from_iterable(tokenize_and_pack(literal, tokenizer, 1)["input_ids"]))
    assert ids.count(tokenizer.bos_token_id) == 1 and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids[1:]) == "a <|bos|> b <|eos|>"
    with pytest.raises(ValueError, match="no BOS token"):
        tokenize_and_pack(docs, no_bos, 2, separator="bos")
    with pytest.raises(ValueError, match="separator='sep'"):
        tokenize_and_pack(docs, tokenizer, 2, separator="sep")


def test_streaming_gives_the_same_blocks(tmp_path, tokenizer):
    files = [write_jsonl(tmp_path / f"part{i}.jsonl", make_docs(40, seed=i)) for i in range(2)]
    kwargs = dict(block_size=16, patch_size=4, batch_size=5)  # block borders fall across tokenization batches
    per_file = [tokenize_and_pack(load_text_dataset(f), tokenizer, **kwargs) for f in files]

    streamed = tokenize_and_pack(load_text_dataset(files[0], streaming=True), tokenizer, **kwargs)
    assert isinstance(streamed, datasets.IterableDataset) and streamed.column_names == ["input_ids", "labels"]
    assert [ex["input_ids"] for ex in streamed.take(5)] == per_file[0]["input_ids"][:5]
    # A whole pass, after the partial one, starts afresh (no carried remainder) and gives every block.
    everything = list(streamed)
    assert [ex["input_ids"] for ex in everything] == per_file[0]["input_ids"]
    assert all(ex["labels"] == ex["input_ids"] for ex in everything)

    # Two files are two shards, packed one after the other, each dropping its own remainder.
    joint = tokenize_and_pack(load_text_dataset(files), tokenizer, **kwargs)
    streamed = tokenize_and_pack(load_text_dataset(files, streaming=True), tokenizer, **kwargs)
    assert streamed.num_shards == 2
    blocks = [ex["input_ids"] for ex in streamed]
    assert blocks == list(per_file[0]["input_ids"]) + list(per_file[1]["input_ids"])
    assert blocks[: len(per_file[0])] == joint["input_ids"][: len(per_file[0])]
    assert len(joint) - len(blocks) in (0, 1)


def test_pack_errors(tokenizer):
    docs = datasets.Dataset.from_dict({"text": ["the cat sat on the mat"]})
    with pytest.raises(ValueError, match=r"block_size=10 must be a positive multiple of patch_size=4"):
        tokenize_and_pack(docs, tokenizer, 10, patch_size=4)
    with pytest.raises(ValueError, match=r"has \d+ tokens .*fewer than block_size=4096"):
        tokenize_and_pack(docs, tokenizer, 4096, patch_size=4)
    with pytest.raises(ValueError, match="no column 'body'"):
        tokenize_and_pack(docs, tokenizer, 8, text_column="body")


# ---------------------------------------------------------------------------------------------------------------
# CalmDataCollator
# ---------------------------------------------------------------------------------------------------------------


def test_collator_keeps_eos_labels_when_pad_is_eos():
    eos = 2  # pad == eos: the DataCollatorForLanguageModeling pitfall
    collator = CalmDataCollator(pad_token_id=eos, patch_size=4)
    features = [{"input_ids": [5, 6, eos, 7, 8, eos]}, {"input_ids": [9, eos, 3]}]
    batch = collator(features)
    assert batch["input_ids"].shape == (2, 8)  # longest is 6, rounded up to a multiple of K=4
    assert batch["labels"].tolist() == [[5, 6, eos, 7, 8, eos, -100, -100], [9, eos, 3, -100, -100, -100, -100, -100]]
    assert batch["input_ids"].tolist() == [[5, 6, eos, 7, 8, eos, eos, eos], [9, eos, 3, eos, eos, eos, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]  # whole chunks (issue 16 item 8)
    # Given labels (with their own -100) are kept; left padding mirrors right padding.
    left = CalmDataCollator(pad_token_id=0, patch_size=2, padding_side="left")(
        [{"input_ids": torch.tensor([4, 5, 6]), "labels": [-100, 5, 6]}, {"input_ids": [7]}]
    )
    assert left["labels"].tolist() == [[-100, -100, 5, 6], [-100, -100, -100, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert all(t.dtype == torch.long for t in left.values())


def test_collator_errors():
    with pytest.raises(ValueError, match="pad_token_id is None"):
        CalmDataCollator(patch_size=4)([{"input_ids": [1, 2, 3]}])
    assert CalmDataCollator(patch_size=4)([{"input_ids": [1, 2, 3, 4]}])["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="same shape"):
        CalmDataCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="padding_side"):
        CalmDataCollator(padding_side="middle")
    with pytest.raises(ValueError, match="patch_size=0"):
        CalmDataCollator(patch_size=0)


@pytest.mark.slow
def test_module_imports_without_datasets():
    # A fresh interpreter where `import datasets` fails: the module, the collator and tokenizer training work,
    # the datasets paths explain what to install.
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "import modeling_calm.data_calm as d\n"
        "assert d.CalmDataCollator(0, 4)([{'input_ids': [1, 2, 3]}])['input_ids'].shape == (1, 4)\n"
        "try:\n    d.load_text_dataset('x.txt')\nexcept ImportError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install modeling-calm[data]" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# examples/train_tokenizer.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_tokenizer_example_script(tmp_path):
    train_file = tmp_path / "tiny.txt"
    train_file.write_text("\n\n".join(make_docs(60, seed=3)) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "train_tokenizer.py"), "--train_file", str(train_file),
         "--vocab_size", "300", "--num_heldout", "5", "--output_dir", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "compression" in result.stdout and "lossless" in result.stdout
    assert (out / "tokenizer.json").is_file()
    # A file with no more texts than --num_heldout leaves nothing to train on: a clear error, no tokenizer written.
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(make_docs(3, seed=4)) + "\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "train_tokenizer.py"), "--train_file", str(short),
         "--num_heldout", "5", "--output_dir", str(tmp_path / "tok_short")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "only 3 non-empty text(s)" in result.stderr
    assert "none is left to train on" in result.stderr and not (tmp_path / "tok_short").exists()
