"""Data pipeline for CALM: text loading, tokenizer training, packing into K-aligned blocks, batching.

Not shipped to the Hub (the modeling files never import it). `datasets` is optional (`pip install
modeling-calm[data]`) and imported inside the functions that need it; tokenizer training and the collator work
without it.

The pipeline, top to bottom:

    texts = load_text_dataset("wiki2018.jsonl")                       # datasets.Dataset with a "text" column
    tokenizer = train_bpe_tokenizer("wiki2018.jsonl", output_dir="runs/tokenizer")   # or any HF tokenizer
    blocks = tokenize_and_pack(texts, tokenizer, block_size=2048, patch_size=4)      # input_ids, labels
    Trainer(..., train_dataset=blocks, data_collator=CalmDataCollator(tokenizer.pad_token_id, patch_size=4))

Choices made here:
- Text files follow one rule, for training and evaluation alike (`iter_texts`): a .txt file holds documents
  separated by blank lines, with the line breaks inside a document kept; a .jsonl file holds one document per
  record.
- Documents are joined with one separator token each. The default is the tokenizer's BOS placed *before* every
  document (EOS after it when there is no BOS): CALM learns to emit a document start, which `generate` can use
  as its stop token (the authors' training text had no separator, so their model rarely stops).
- Packing is exact: documents are concatenated in order and cut into blocks of `block_size` tokens; only the
  final remainder (< block_size tokens) of the corpus is dropped, whatever the batch size (the usual
  `group_texts` recipe drops a remainder per map batch instead). A stream is packed shard by shard (a shard is
  usually a file), so that DataLoader workers can share it; it drops one remainder per shard.
- Labels are a copy of `input_ids`. CALM encodes its target chunks with the autoencoder, so a label may never be
  rewritten from a token value (`DataCollatorForLanguageModeling` turns every pad id, and therefore every EOS
  when pad == eos, into -100). Only `CalmDataCollator` writes -100, and only on the padding it adds.
- Packed blocks have a fixed length, so the dataset stores no `attention_mask`; the collator returns one.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import itertools
import json
import lzma
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

logger = logging.get_logger(__name__)

# Local file suffix -> `datasets` builder. Compressed variants (".jsonl.gz", ".txt.xz") are read by both
# `datasets` and `iter_texts`, so they are accepted too.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

# Roles -> strings of the special tokens of `train_bpe_tokenizer`, in id order. The padding token gets id 0:
# the autoencoder's input token dropout replaces tokens by id 0, which then is a token no real text contains.
# There is no unknown token: byte-level BPE covers every byte, so it could never be produced.
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
_SPECIAL_TOKEN_ROLES = ("pad_token", "bos_token", "eos_token", "unk_token")
_BYTE_ALPHABET_SIZE = 256


def _require_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "modeling_calm.data_calm needs the `datasets` package to load and pack corpora: "
            "pip install modeling-calm[data]"
        ) from err
    return datasets


# ----------------------------------------------------------------------------------------------------------------
# Files and raw texts
# ----------------------------------------------------------------------------------------------------------------


def _split_suffix(path: str) -> tuple[str, str | None]:
    """`"a/b.jsonl.gz"` -> `(".jsonl", ".gz")`; `"a/b.txt"` -> `(".txt", None)`."""
    stem, suffix = os.path.splitext(path)
    compression = None
    if suffix.lower() in _OPENERS:
        compression = suffix.lower()
        stem, suffix = os.path.splitext(stem)
    return suffix.lower(), compression


def _expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One path, a glob or a list of both -> the files, in the order given (globs sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for pattern in map(os.fspath, paths):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"No file matches the pattern {pattern!r}.")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise FileNotFoundError(f"No such file: {pattern!r}.")
    if not files:
        raise ValueError("No input files were given.")
    return files


def _open_text(path: str):
    opener = _OPENERS.get(_split_suffix(path)[1], open)
    return opener(path, "rt", encoding="utf-8")


def _is_empty_file(path: str) -> bool:
    if os.path.getsize(path) == 0:
        return True
    if _split_suffix(path)[0] == ".parquet":
        return False  # a parquet file without rows is caught after loading
    with _open_text(path) as f:  # a compressed file of nothing has a few bytes
        return f.read(1) == ""


def iter_texts(
    path: str | os.PathLike | Sequence[str | os.PathLike], text_column: str = "text"
) -> Iterator[str]:
    """Yields the documents of .txt or .jsonl files lazily, one at a time, without `datasets`.

    This is the one reader of the project's text files, used for training (`load_text_dataset`,
    `train_bpe_tokenizer`) and for evaluation (`modeling_calm.evaluation_calm.load_text_blocks`); the rule:

    - `.txt`: documents are separated by blank lines (one or more lines holding only whitespace). The line breaks
      inside a document are kept (as "\\n"); the blank lines between documents are not part of any document. A
      file without blank lines is one document.
    - `.jsonl`: one document per record, its `text_column` field (blank lines and null values are skipped).

    Files may be compressed (.gz, .bz2, .xz); documents never run across files.

    Args:
        path: a file, a glob, or a list of them; files are read in the order given.
        text_column: the JSON field holding the text.
    """
    # Not a generator itself: a missing file or a wrong extension fails here, not at the first next().
    files = _expand_paths(path)
    for file in files:
        if _split_suffix(file)[0] not in (".txt", ".jsonl"):
            raise ValueError(f"Cannot read texts from {file!r}: iter_texts reads .txt and .jsonl files only.")
    return _read_texts(files, text_column)


def _read_texts(files: list[str], text_column: str) -> Iterator[str]:
    for file in files:
        is_jsonl = _split_suffix(file)[0] == ".jsonl"
        with _open_text(file) as f:
            if not is_jsonl:
                document: list[str] = []
                for line in f:
                    if line.strip():
                        document.append(line.rstrip("\r\n"))
                    elif document:
                        yield "\n".join(document)
                        document = []
                if document:
                    yield "\n".join(document)
                continue
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{file}, line {line_number}: not valid JSON ({err.msg}).") from err
                if not isinstance(record, dict) or text_column not in record:
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(
                        f"{file}, line {line_number}: no field {text_column!r} (fields: {fields}); "
                        "pass text_column= to name the text field."
                    )
                text = record[text_column]
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"{file}, line {line_number}: the field {text_column!r} is not a string.")
                if text is not None:
                    yield text


def _document_rows(files: list[str], stamps: list[tuple[int, int]], text_column: str) -> Iterator[dict[str, str]]:
    """Generator of `load_text_dataset` for .txt files; `stamps` (size, mtime) only key the `datasets` cache."""
    for document in _read_texts(files, "text"):
        yield {text_column: document}


def load_text_dataset(
    train_file_or_name: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str = "train",
    streaming: bool = False,
    text_column: str = "text",
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    **load_kwargs: Any,
) -> Dataset | IterableDataset:
    """Loads a text corpus from local files or the Hugging Face Hub with `datasets.load_dataset`.

    Local files (.txt, .jsonl, .json, .parquet, optionally compressed .gz/.bz2/.xz): .txt files are read by
    `iter_texts` (documents separated by blank lines, line breaks inside a document kept; the same rule as the
    evaluation reader), the others go through the `json` or `parquet` builder (one document per record). Anything that is neither an existing file nor a glob is taken
    as a Hub dataset name.

    Args:
        train_file_or_name: a file, a glob, a list of them (all of one format), or a Hub dataset name.
        split: the split to return.
        streaming: return an `IterableDataset` that reads the files lazily.
        text_column: the column that must hold the text (checked where the columns are known).
        data_files: for a Hub dataset only, passed on to `load_dataset`.
        **load_kwargs: passed on to `load_dataset` (`cache_dir`, `revision`, `name`, ...); for .txt files, to
            `Dataset.from_generator` (`cache_dir`, `keep_in_memory`, ...).

    Returns:
        A `datasets.Dataset`, or an `IterableDataset` when `streaming`.
    """
    datasets = _require_datasets()
    is_local = not isinstance(train_file_or_name, str) or (
        os.path.exists(train_file_or_name)
        or glob.has_magic(train_file_or_name)
        or _split_suffix(train_file_or_name)[0] in _BUILDERS
    )
    if is_local:
        if data_files is not None:
            raise ValueError("data_files= is for Hub datasets; pass local files as the first argument instead.")
        files = _expand_paths(train_file_or_name)
        builders = set()
        for file in files:
            suffix = _split_suffix(file)[0]
            if suffix not in _BUILDERS:
                raise ValueError(
                    f"Unknown extension {suffix!r} of {file!r}: expected one of {sorted(_BUILDERS)} "
                    f"(optionally compressed: {sorted(_OPENERS)})."
                )
            builders.add(_BUILDERS[suffix])
            if _is_empty_file(file):
                raise ValueError(f"The file {file!r} is empty.")
        if len(builders) > 1:
            raise ValueError(f"The files {files} mix formats ({sorted(builders)}); load one format at a time.")
        builder = builders.pop()
        if builder == "text":
            # One generator per file (datasets shards list arguments), keyed by size and mtime for the cache.
            stamps = [(os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
            gen_kwargs = dict(files=files, stamps=stamps, text_column=text_column)
            features = datasets.Features({text_column: datasets.Value("string")})
            if streaming:
                dataset = datasets.IterableDataset.from_generator(
                    _document_rows, features=features, gen_kwargs=gen_kwargs
                )
            else:
                dataset = datasets.Dataset.from_generator(
                    _document_rows, features=features, gen_kwargs=gen_kwargs, **load_kwargs
                )
        else:
            dataset = datasets.load_dataset(
                builder, data_files={split: files}, split=split, streaming=streaming, **load_kwargs
            )
        source = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
    else:
        dataset = datasets.load_dataset(
            train_file_or_name, data_files=data_files, split=split, streaming=streaming, **load_kwargs
        )
        source = f"the Hub dataset {train_file_or_name!r} (split {split!r})"

    if not streaming and len(dataset) == 0:
        raise ValueError(f"The dataset loaded from {source} is empty.")
    if dataset.column_names is not None and text_column not in dataset.column_names:
        raise ValueError(
            f"The dataset loaded from {source} has no column {text_column!r} (columns: {dataset.column_names}); "
            "pass text_column= to name the text column."
        )
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer training
# ----------------------------------------------------------------------------------------------------------------


def train_bpe_tokenizer(
    files_or_iterator: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    vocab_size: int = 32000,
    min_frequency: int = 2,
    special_tokens: Mapping[str, str] | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    text_column: str = "text",
    max_texts: int | None = None,
    batch_size: int = 1000,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (GPT-2 style) with the `tokenizers` library.

    The tokenizer is lossless: `decode(encode(s)) == s` for any text (no normalisation, no prefix space, no
    clean-up of spaces), and it adds no special tokens when encoding; separators are inserted by
    `tokenize_and_pack`. Special tokens (by default `DEFAULT_SPECIAL_TOKENS`: `<|pad|>` = 0, `<|bos|>` = 1,
    `<|eos|>` = 2) come first in the vocabulary, in the order given, then the 256 byte symbols, then merges.

    Args:
        files_or_iterator: a .txt/.jsonl file, a glob, or a list of them (read lazily, see `iter_texts`), or
            any other iterable of strings (pass `iter(texts)` for an in-memory list of texts).
        vocab_size: size of the final vocabulary, special tokens included (smaller if the corpus runs out of
            merges that occur `min_frequency` times).
        min_frequency: the least count a pair needs to be merged.
        special_tokens: role -> string, roles among `pad_token`, `bos_token`, `eos_token`, `unk_token`.
        output_dir: when given, the tokenizer is saved there with `save_pretrained` (load it back with
            `AutoTokenizer.from_pretrained(output_dir)`).
        text_column: the JSON field holding the text in .jsonl files.
        max_texts: train on at most this many texts.
        batch_size: texts handed to the trainer at a time.
        show_progress: show progress bars while reading and while merging.

    Returns:
        A `PreTrainedTokenizerFast` with `bos_token`, `eos_token` and `pad_token` set (those given).
    """
    special_tokens = _check_tokenizer_settings(special_tokens, vocab_size, min_frequency, max_texts)
    texts = _training_texts(files_or_iterator, text_column, max_texts, show_progress)
    num_texts = 0

    def batches() -> Iterator[list[str]]:
        nonlocal num_texts
        while batch := list(itertools.islice(texts, batch_size)):
            num_texts += len(batch)
            yield batch

    tokenizer, trainer = _byte_level_bpe(vocab_size, min_frequency, special_tokens, show_progress)
    tokenizer.train_from_iterator(batches(), trainer=trainer)
    if num_texts == 0:
        raise ValueError(f"No texts to train the tokenizer on in {files_or_iterator!r}.")
    if tokenizer.get_vocab_size() < vocab_size:
        logger.warning(
            f"The corpus gave only {tokenizer.get_vocab_size()} tokens of the {vocab_size} asked for "
            f"(no more pairs occur {min_frequency} times); use a larger corpus or a smaller vocab_size."
        )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **special_tokens
    )
    logger.info(f"Trained a byte-level BPE tokenizer of {len(wrapped)} tokens on {num_texts} texts.")
    if output_dir is not None:
        wrapped.save_pretrained(output_dir)
        logger.info(f"Saved the tokenizer to {output_dir}.")
    return wrapped


def _check_tokenizer_settings(special_tokens, vocab_size: int, min_frequency: int, max_texts) -> dict[str, str]:
    """`train_bpe_tokenizer`'s settings checked; returns the special tokens (role -> string)."""
    special_tokens = dict(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    unknown_roles = set(special_tokens) - set(_SPECIAL_TOKEN_ROLES)
    if unknown_roles:
        raise ValueError(f"Unknown special token roles {sorted(unknown_roles)}: use {list(_SPECIAL_TOKEN_ROLES)}.")
    if len(set(special_tokens.values())) != len(special_tokens):
        raise ValueError(f"special_tokens={special_tokens} gives two roles the same string.")
    smallest = _BYTE_ALPHABET_SIZE + len(special_tokens)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs the {_BYTE_ALPHABET_SIZE} byte symbols "
            f"plus {len(special_tokens)} special tokens, at least {smallest}."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1.")
    if max_texts is not None and max_texts < 1:
        raise ValueError(f"max_texts={max_texts} must be >= 1 or None.")
    return special_tokens


def _training_texts(files_or_iterator, text_column: str, max_texts: int | None, show_progress: bool) -> Iterator[str]:
    """The texts `train_bpe_tokenizer` reads: files through `iter_texts`, any other iterable as is."""
    if isinstance(files_or_iterator, (str, os.PathLike, list, tuple)):
        try:
            texts = iter_texts(files_or_iterator, text_column=text_column)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} To train on texts in memory, pass an iterator: iter(texts).") from err
    else:
        texts = iter(files_or_iterator)
    texts = itertools.islice(texts, max_texts)
    if show_progress:
        from tqdm.auto import tqdm

        texts = tqdm(texts, desc="reading texts", unit=" texts", total=max_texts)
    return texts


def _byte_level_bpe(vocab_size: int, min_frequency: int, special_tokens: dict[str, str], show_progress: bool):
    """An untrained byte-level BPE tokenizer and its trainer: `(Tokenizer, BpeTrainer)`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # The GPT-2 split regex keeps leading spaces attached to words; bytes are mapped to printable symbols, so
    # every string (any unicode, any whitespace) has an encoding and decodes back exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    return tokenizer, trainer


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers of model folders
# ----------------------------------------------------------------------------------------------------------------


def model_context_tokens(config) -> int | None:
    """The context of a CALM in tokens: the backbone's `max_position_embeddings` (which counts chunks) times K.

    `config` is a `CalmConfig` (or anything with `backbone_config` and `patch_size`); None for other configs.
    """
    backbone = getattr(config, "backbone_config", None)
    chunks = getattr(backbone, "max_position_embeddings", None)
    patch_size = getattr(config, "patch_size", None)
    if not isinstance(chunks, int) or not isinstance(patch_size, int):
        return None
    return chunks * patch_size


def set_model_max_length(tokenizer: PreTrainedTokenizerBase, config) -> PreTrainedTokenizerBase:
    """Sets `tokenizer.model_max_length` to the model's context in tokens (`model_context_tokens`), so that
    `truncation=True`, pipelines and lm-evaluation-harness know it once the tokenizer is saved with the model."""
    context = model_context_tokens(config)
    if context is not None:
        tokenizer.model_max_length = context
        tokenizer.init_kwargs["model_max_length"] = context
    return tokenizer


def save_tokenizer_with_model(tokenizer: PreTrainedTokenizerBase, model_or_config, folder) -> None:
    """`tokenizer.save_pretrained(folder)` for a model folder, with `model_max_length` set to the model's context
    (`tokenizer_config.json` also names the `tokenizer_class`, as transformers writes it, which `load_tokenizer`
    reads)."""
    set_model_max_length(tokenizer, getattr(model_or_config, "config", model_or_config))
    tokenizer.save_pretrained(folder)


def check_block_size(block_size: int, max_length: int | None, what: str = "block_size") -> None:
    """Raises a ValueError when `block_size` tokens exceed the model's context `max_length` (None: no limit)."""
    if max_length is not None and block_size > max_length:
        raise ValueError(
            f"{what}={block_size} exceeds the model's context of {max_length} tokens (the backbone's "
            "max_position_embeddings chunks x K): use a smaller block size or a model with a longer context."
        )


def _has_remote_config(name_or_path, **kwargs) -> bool:
    from transformers import PreTrainedConfig

    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(name_or_path, **kwargs)
    except (OSError, ValueError):  # a tokenizer-only folder or repo
        return False
    return "AutoConfig" in (config_dict.get("auto_map") or {})


def load_pretrained(auto_class, name: str, trust_remote_code: bool = False, **kwargs):
    """`auto_class.from_pretrained(name)` that runs a folder's or repo's own code only with `trust_remote_code`
    (the examples' `--trust_remote_code` flag, off by default). A CALM needs no flag: the installed package
    provides its classes. Without the flag, a model that needs its own code gets an error saying how to allow it."""
    try:
        return auto_class.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise ValueError(f"{name!r} ships its own modeling code, which this script runs only if you ask: pass "
                         "--trust_remote_code if you trust that code (read its .py files first).") from error


def load_tokenizer(name_or_path, **kwargs) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name_or_path)` that runs no remote code and never prompts.

    transformers (5.17-5.24) reads `config.json` through `AutoConfig` before it looks at the tokenizer files, so a
    model folder whose config class is remote code (every CALM) makes a plain `AutoTokenizer.from_pretrained` ask
    "[y/N]" in a terminal (15 s) and then warn. The tokenizer itself is plain, so its class is taken from
    `tokenizer_config.json` instead and no config is read. Other names load exactly as `AutoTokenizer` does.
    """
    from transformers import AutoTokenizer, PreTrainedConfig

    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder")
                  if k in kwargs}
    if "config" not in kwargs and _has_remote_config(name_or_path, **hub_kwargs):
        kwargs["config"] = PreTrainedConfig()  # model_type "": the class comes from tokenizer_config.json
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization and packing
# ----------------------------------------------------------------------------------------------------------------


def _separator_id(tokenizer: PreTrainedTokenizerBase, separator: str | None) -> tuple[str | None, int | None]:
    if separator not in ("auto", "bos", "eos", None):
        raise ValueError(f"separator={separator!r} must be 'auto', 'bos', 'eos' or None.")
    if separator == "auto":
        if tokenizer.bos_token_id is not None:
            separator = "bos"
        elif tokenizer.eos_token_id is not None:
            separator = "eos"
        else:
            logger.warning("The tokenizer has neither a BOS nor an EOS token: documents are packed without separator.")
            return None, None
    if separator is None:
        return None, None
    token_id = tokenizer.bos_token_id if separator == "bos" else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(f"separator={separator!r} but the tokenizer has no {separator.upper()} token.")
    return separator, token_id


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    separator: str | None,
    sep_id: int | None,
) -> dict[str, list[list[int]]]:
    # None (a null JSON field) counts as an empty document; empty documents (blank lines of a .txt file)
    # contribute nothing, not even a separator. Rows are kept so that streamed columns stay aligned.
    texts = [text or "" for text in batch[text_column]]
    # add_special_tokens=False: tokenizers that add BOS themselves (Llama) would otherwise double the separator.
    # split_special_tokens=True: a document that contains the text "<|bos|>" gets that text, not a separator.
    encoded = tokenizer(
        texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False, verbose=False
    )["input_ids"]
    if separator == "bos":
        encoded = [[sep_id] + ids if ids else ids for ids in encoded]
    elif separator == "eos":
        encoded = [ids + [sep_id] if ids else ids for ids in encoded]
    return {"input_ids": encoded}


def _pack_blocks(shards: list, block_size: int, batch_size: int) -> Iterator[dict[str, list[int]]]:
    """Concatenates the `input_ids` of the shards in order and yields every full block of `block_size` tokens.

    The remainder of one batch is carried into the next, so only the last < block_size tokens are dropped.
    A generator, so that its state starts afresh on every pass over a streamed dataset.
    """
    carry = np.empty(0, dtype=np.int64)
    for shard in shards:
        for batch in shard.iter(batch_size=batch_size):
            new = np.fromiter(itertools.chain.from_iterable(batch["input_ids"]), dtype=np.int64)
            tokens = np.concatenate([carry, new])
            num_blocks = len(tokens) // block_size
            for block in tokens[: num_blocks * block_size].reshape(num_blocks, block_size):  # (num_blocks, block_size)
                ids = block.tolist()
                yield {"input_ids": ids, "labels": list(ids)}
            carry = tokens[num_blocks * block_size :]


def _pack_stream(dataset, tokenize_kwargs: dict, features, pack_kwargs: dict):
    """`tokenize_and_pack` of a streamed dataset: lazy, one shard after the other."""
    datasets = _require_datasets()
    # Lazy; the other columns stay in the mapped stream, the packer reads only input_ids.
    tokenized = dataset.map(
        _tokenize_batch, batched=True, batch_size=pack_kwargs["batch_size"], fn_kwargs=tokenize_kwargs
    )
    # datasets calls the generator once per entry of `shards` (and hands the entries to DataLoader workers), so
    # every shard is packed on its own and drops its own remainder.
    shards = [tokenized.shard(num_shards=tokenized.num_shards, index=i) for i in range(tokenized.num_shards)]
    return datasets.IterableDataset.from_generator(
        _pack_blocks, features=features, gen_kwargs=dict(shards=shards, **pack_kwargs)
    )


def tokenize_and_pack(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    patch_size: int = 1,
    separator: Literal["auto", "bos", "eos"] | None = "auto",
    text_column: str = "text",
    batch_size: int = 1000,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    max_length: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenizes documents, joins them with a separator token and cuts the stream into blocks for CALM.

    Every block holds exactly `block_size` tokens (a multiple of K = `patch_size`, so it splits into
    `block_size // patch_size` chunks); documents run across block borders. The documents are concatenated in
    dataset order and only the final remainder of fewer than `block_size` tokens is dropped. A streamed dataset
    is packed lazily, one shard (usually one file) after the other, each dropping its own remainder: a stream
    of one shard gives exactly the blocks of the non-streaming path, and `DataLoader` workers can share the
    shards of a larger one.

    Args:
        dataset: a `Dataset` or `IterableDataset` with a text column (see `load_text_dataset`).
        tokenizer: any Hugging Face tokenizer; it is called with `add_special_tokens=False` and
            `split_special_tokens=True` (special-token strings inside a text stay text).
        block_size: tokens per block, a multiple of `patch_size`.
        patch_size: K, tokens per chunk of the model the blocks are for.
        separator: the token between documents: `"bos"` before each document, `"eos"` after it, `None` for
            none, `"auto"` for BOS if the tokenizer has one, else EOS. Empty documents are skipped.
        text_column: the column holding the text.
        batch_size: documents tokenized (and packed) at a time.
        num_proc: processes for tokenizing a `Dataset` (packing is a fast sequential pass).
        cache_dir: where `datasets` caches the packed `Dataset` (default: its usual cache).
        max_length: the model's context in tokens (`model_context_tokens(model.config)`); a longer `block_size`
            is refused, since the model could not read such a block.

    Returns:
        A `Dataset` (or `IterableDataset` for a streamed input) with the int64 columns `input_ids` and `labels`
        (an exact copy; no -100 anywhere), each a list of `block_size` token ids.
    """
    datasets = _require_datasets()
    if patch_size < 1:
        raise ValueError(f"patch_size={patch_size} must be >= 1.")
    if block_size < 1 or block_size % patch_size != 0:
        raise ValueError(
            f"block_size={block_size} must be a positive multiple of patch_size={patch_size}: "
            "each block is cut into chunks of patch_size tokens."
        )
    check_block_size(block_size, max_length)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    separator, sep_id = _separator_id(tokenizer, separator)
    column_names = dataset.column_names
    if column_names is not None and text_column not in column_names:
        raise ValueError(f"The dataset has no column {text_column!r} (columns: {column_names}).")

    tokenize_kwargs = dict(tokenizer=tokenizer, text_column=text_column, separator=separator, sep_id=sep_id)
    block = datasets.List(datasets.Value("int64"), length=block_size)
    features = datasets.Features({"input_ids": block, "labels": block})
    pack_kwargs = dict(block_size=block_size, batch_size=batch_size)

    if isinstance(dataset, datasets.IterableDataset):
        return _pack_stream(dataset, tokenize_kwargs, features, pack_kwargs)

    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        fn_kwargs=tokenize_kwargs,
        remove_columns=column_names,
        num_proc=num_proc,
        desc="Tokenizing",
    )
    import pyarrow.compute as pc

    num_tokens = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py() or 0
    num_blocks = num_tokens // block_size
    if num_blocks == 0:
        raise ValueError(
            f"The corpus has {num_tokens} tokens ({len(dataset)} documents, separators included), fewer than "
            f"block_size={block_size}: no block can be made. Use more text or a smaller block_size."
        )
    packed = datasets.Dataset.from_generator(
        _pack_blocks, features=features, gen_kwargs=dict(shards=[tokenized], **pack_kwargs), cache_dir=cache_dir
    )
    logger.info(
        f"Packed {num_tokens} tokens of {len(dataset)} documents into {num_blocks} blocks of {block_size} tokens; "
        f"dropped the last {num_tokens - num_blocks * block_size} tokens."
    )
    return packed


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CalmDataCollator:
    """Stacks examples into a batch whose length is a multiple of K, padding where the examples differ.

    Packed blocks (`tokenize_and_pack`) are stacked as they are (`transformers.default_data_collator` would do
    the same for them); variable-length examples (fine-tuning data, single documents) are padded in whole chunks
    (pad_to_multiple_of K), as the model requires. An example whose length is not a multiple of K first has its
    last chunk (its first, with left padding) completed: those fill positions get `pad_token_id`, `attention_mask` 1
    (the chunk stays one content chunk) and label -100 (so that chunk is never a target; a warning says so, once).
    The batch is then padded with whole pad chunks to the longest example: `pad_token_id` in `input_ids`, 0 in
    `attention_mask`, -100 in `labels`. Padding is found from the example lengths, never from token values, so
    a real EOS keeps its label even when pad == eos. Labels given by an example are kept as they are; without
    them, labels are a copy of `input_ids`. Other keys are dropped.

    Args:
        pad_token_id: the id written into padding positions; needed only when padding happens.
        patch_size: K; the batch length is rounded up to a multiple of it.
        padding_side: `"right"` (training) or `"left"`.
        label_pad_token_id: the label of padding positions.
    """

    pad_token_id: int | None = None
    patch_size: int = 1
    padding_side: Literal["right", "left"] = "right"
    label_pad_token_id: int = -100

    def __post_init__(self):
        if self.patch_size < 1:
            raise ValueError(f"patch_size={self.patch_size} must be >= 1.")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={self.padding_side!r} must be 'right' or 'left'.")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CalmDataCollator got an empty list of examples.")
        input_ids, labels, masks = [], [], []
        for i, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            example_labels = feature.get("labels")
            lab = ids.clone() if example_labels is None else torch.as_tensor(example_labels, dtype=torch.long)
            example_mask = feature.get("attention_mask")
            mask = torch.ones_like(ids) if example_mask is None else torch.as_tensor(example_mask, dtype=torch.long)
            if ids.dim() != 1 or lab.shape != ids.shape or mask.shape != ids.shape:
                raise ValueError(
                    f"Example {i}: input_ids must be 1-D and labels/attention_mask of the same shape; got "
                    f"{tuple(ids.shape)}, {tuple(lab.shape)}, {tuple(mask.shape)}."
                )
            input_ids.append(ids)
            labels.append(lab)
            masks.append(mask)

        lengths = [len(ids) for ids in input_ids]
        k = self.patch_size
        chunked = [-(-n // k) * k for n in lengths]  # each example rounded up to whole chunks
        length = max(chunked)
        if self.pad_token_id is None and any(n != length for n in lengths):
            raise ValueError(
                f"Examples of lengths {sorted(set(lengths))} need padding to {length} (a multiple of "
                f"patch_size={k}), but pad_token_id is None."
            )
        if any(n != c for n, c in zip(lengths, chunked)):
            logger.warning_once(
                f"CalmDataCollator: examples whose length is not a multiple of K={k} get their "
                f"{'last' if self.padding_side == 'right' else 'first'} chunk completed with pad tokens (attended, "
                "label -100): that chunk is never a training target. Pack the data (tokenize_and_pack) to use it all."
            )
        batch_ids = torch.full((len(features), length), self.pad_token_id or 0, dtype=torch.long)  # (B, T)
        batch_labels = torch.full((len(features), length), self.label_pad_token_id, dtype=torch.long)
        batch_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, (ids, lab, mask, n, c) in enumerate(zip(input_ids, labels, masks, lengths, chunked)):
            # The example's whole chunks (fill included) and, inside them, its own tokens.
            chunks = slice(0, c) if self.padding_side == "right" else slice(length - c, length)
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            batch_mask[row, chunks] = 1
            batch_ids[row, span] = ids
            batch_labels[row, span] = lab
            batch_mask[row, span] = mask
        return {"input_ids": batch_ids, "attention_mask": batch_mask, "labels": batch_labels}
