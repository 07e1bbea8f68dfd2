"""Instruction fine-tuning (SFT) data for CALM: chat and prompt/completion records -> chunk-aligned examples.

Not shipped to the Hub (the modeling files never import it); needs nothing beyond transformers.

Records (one JSON object per line of a .jsonl file, or any iterable of dicts):

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "What is 2+3?"},
                  {"role": "assistant", "content": "5"}]}
    {"prompt": "Question: What is 2+3?\\nAnswer:", "completion": " 5"}
    {"prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", "content": "..."}]}

- `messages`: rendered with the tokenizer's chat template (or `chat_template=`; a tokenizer without one gets
  `DEFAULT_CHAT_TEMPLATE`, with a warning). The LAST message must be the assistant's: it is the answer; every
  earlier turn (earlier assistant turns included) is context. The prompt is the template of the earlier turns
  with `add_generation_prompt=True`, the answer is what the full rendering adds after it.
- `prompt`/`completion` strings are used as they are (no template); lists of messages are read as `messages`.

The chunk-boundary rule. The CALM loss predicts chunk i+1 from the state after chunk i and leaves out every target
chunk holding a -100 label, so an answer that started mid-chunk would lose its first chunk. Therefore:

    [fill x r] [BOS] prompt tokens | answer tokens [EOS] [pad x s]
     \\------ whole chunks, label -100 ------/ \\---- whole chunks, labels = input_ids ----/

- The prompt (after a BOS, when the tokenizer has one and the prompt does not start with it) is completed on the
  LEFT with r = (-len) % K fill tokens, BOS by default (pad without one), so the answer starts on a chunk
  boundary. This is exactly how `generate` lays out a prompt whose length is not a multiple of K (its first
  partial chunk is completed on the left with BOS), so training and inference read the prompt alike;
  `sft_prompt_ids` gives the same prompt ids for `generate`. The fill is attended (it is part of a content chunk):
  the model rejects a mask that covers part of a chunk.
- The answer ends with EOS (added unless the template already ends it with EOS) and its last chunk is completed on
  the right with s = (-len) % K pad tokens that are *targets* (labels = their ids): a chunk with a -100 label would
  not be scored, and the model is to learn that pad follows EOS inside a chunk (`generate` stops at EOS and pads
  after it). Every answer chunk is therefore scored, and nothing else is.
- An example longer than `max_length` (the model's context: `max_position_embeddings` chunks x K, see
  `data_calm.model_context_tokens`) is refused with a ValueError naming the record, or dropped with
  `too_long="drop"` (logged). Nothing is truncated: a cut answer would teach the model to stop mid-answer.

Examples have whole chunks; `CalmDataCollator(pad_token_id, patch_size=K)` batches them, padding rows with whole
masked chunks (label -100). Use it with `CalmTrainer`:

    examples = build_sft_dataset("train.jsonl", tokenizer, patch_size=4, max_length=model_context_tokens(config))
    CalmTrainer(model=model, args=args, train_dataset=examples,
                data_collator=CalmDataCollator(tokenizer.pad_token_id, patch_size=4)).train()

TRL's `SFTTrainer` cannot train a CALM (it computes token-level metrics from logits a CALM does not have, and
does not align targets to chunks): `check_not_trl_sft_trainer` says so clearly; the README explains.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging


logger = logging.get_logger(__name__)

# A plain template for tokenizers without one: "<|role|>\ncontent\n" per message, "<|assistant|>\n" to prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str:
    if chat_template is not None:
        return chat_template
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    logger.warning_once(
        "The tokenizer has no chat template: `messages` are rendered with modeling_calm.sft_calm.DEFAULT_CHAT_TEMPLATE "
        "(set `tokenizer.chat_template` to it before saving, so that inference renders prompts the same way)."
    )
    return DEFAULT_CHAT_TEMPLATE


def _check_messages(messages: Any, name: str, what: str = "messages") -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"{name}: `{what}` must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise ValueError(f"{name}: `{what}[{i}]` must be a dict with string 'role' and 'content', got {message!r}.")
    return [dict(m) for m in messages]


def _render(tokenizer, messages: list[dict], chat_template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=_template(tokenizer, chat_template), tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def sft_texts(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None,
              name: str = "record") -> tuple[str, str]:
    """The `(prompt, answer)` texts of one record (see the module docstring for the formats).

    Raises:
        ValueError: naming the record, for a missing or malformed field, a last message that is not the
            assistant's, an empty answer, or a chat template whose full rendering does not extend the prompt's.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{name}: an SFT record must be a dict with 'messages' or 'prompt' and 'completion', "
                         f"got {type(record).__name__}.")
    if "messages" in record:
        messages = _check_messages(record["messages"], name)
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise ValueError(f"{name}: the answer (`completion`) is empty; every record needs an answer.")
            return prompt, completion
        if isinstance(prompt, str) or isinstance(completion, str):
            raise ValueError(f"{name}: `prompt` and `completion` must both be strings or both lists of messages.")
        messages = _check_messages(prompt, name, "prompt") + _check_messages(completion, name, "completion")
    else:
        raise ValueError(f"{name}: an SFT record needs 'messages', or 'prompt' and 'completion'; it has "
                         f"{sorted(record)}.")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{name}: the last message must be the assistant's (the answer to train on), got role "
                         f"{messages[-1]['role']!r}.")
    if not messages[-1]["content"].strip():
        raise ValueError(f"{name}: the answer (the last assistant message) is empty; every record needs an answer.")
    prompt = _render(tokenizer, messages[:-1], chat_template, generation_prompt=True)
    full = _render(tokenizer, messages, chat_template, generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError(
            f"{name}: the chat template's rendering of the whole conversation does not start with its rendering of "
            "the prompt (add_generation_prompt=True), so the answer cannot be told apart; use a template that "
            "appends each message (or pass chat_template=)."
        )
    return prompt, full[len(prompt):]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _prompt_ids(tokenizer, prompt: str, patch_size: int, fill_token_id: int | None, name: str) -> list[int]:
    ids = _encode(tokenizer, prompt)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    if not ids:
        raise ValueError(f"{name}: the prompt is empty and the tokenizer has no BOS token: the first answer chunk "
                         "needs at least one prompt chunk to be predicted from.")
    fill = fill_token_id if fill_token_id is not None else bos if bos is not None else tokenizer.pad_token_id
    if fill is None:
        raise ValueError("The tokenizer has neither a BOS nor a pad token to fill prompts to whole chunks: pass "
                         "fill_token_id=.")
    return [fill] * (-len(ids) % patch_size) + ids


def sft_prompt_ids(prompt: str | Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, patch_size: int,
                   chat_template: str | None = None, fill_token_id: int | None = None) -> list[int]:
    """The prompt ids of an SFT example (whole chunks), for `generate(input_ids=torch.tensor([ids]))` after
    fine-tuning: a string as it is, or a list of messages (the conversation so far) through the chat template with
    `add_generation_prompt=True`."""
    if not isinstance(prompt, str):
        prompt = _render(tokenizer, _check_messages(prompt, "prompt"), chat_template, generation_prompt=True)
    return _prompt_ids(tokenizer, prompt, patch_size, fill_token_id, "prompt")


def encode_sft_record(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    patch_size: int,
    *,
    max_length: int | None = None,
    chat_template: str | None = None,
    fill_token_id: int | None = None,
    name: str = "record",
) -> dict[str, list[int]]:
    """One record -> `{"input_ids", "labels"}` of whole chunks, laid out by the chunk-boundary rule.

    Args:
        record: a `messages` or `prompt`/`completion` record (module docstring).
        tokenizer: needs an EOS token; its BOS (if any) starts the prompt.
        patch_size: K.
        max_length: the most tokens an example may have (the model's context; None: no limit).
        chat_template: overrides the tokenizer's chat template for `messages`.
        fill_token_id: the left fill of the prompt's first chunk (default BOS, else pad).
        name: how errors name the record.

    Returns:
        `input_ids` and `labels` (-100 on the prompt and its fill), both of a length that is a multiple of K.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size={patch_size!r} must be an integer >= 1 (the model's K).")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token: SFT answers end with EOS, so that the model learns to stop.")
    prompt, answer = sft_texts(record, tokenizer, chat_template, name)
    prompt_ids = _prompt_ids(tokenizer, prompt, patch_size, fill_token_id, name)
    answer_ids = _encode(tokenizer, answer)
    if answer_ids[-1:] != [eos]:
        answer_ids.append(eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answer_ids += [pad] * (-len(answer_ids) % patch_size)
    input_ids = prompt_ids + answer_ids
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(
            f"{name}: {len(input_ids)} tokens ({len(prompt_ids)} prompt + {len(answer_ids)} answer, in chunks of "
            f"K={patch_size}) exceed max_length={max_length} (the model's context); shorten it, or drop such records "
            "(too_long='drop')."
        )
    return {"input_ids": input_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def _named_records(records: str | os.PathLike | Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, Any]]:
    if not isinstance(records, (str, os.PathLike)):
        for i, record in enumerate(records):
            yield f"record {i}", record
        return
    path = os.fspath(records)
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            name = f"{path}:{line_number}"
            try:
                yield name, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{name}: not a JSON object ({error}); a .jsonl file holds one record per line.") \
                    from None


def build_sft_dataset(
    records: str | os.PathLike | Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    patch_size: int,
    *,
    max_length: int | None = None,
    chat_template: str | None = None,
    fill_token_id: int | None = None,
    too_long: Literal["error", "drop"] = "error",
) -> list[dict[str, list[int]]]:
    """Records (a .jsonl path, or any iterable of dicts such as a `datasets.Dataset`) -> SFT examples.

    Errors name the record (`path:line`, or `record i` for an iterable). `too_long="drop"` leaves out the records
    longer than `max_length` (their number is logged) instead of raising. Other arguments: `encode_sft_record`.

    Returns:
        A list of `{"input_ids", "labels"}` dicts, a `train_dataset` for `CalmTrainer` with `CalmDataCollator`.
    """
    if too_long not in ("error", "drop"):
        raise ValueError(f"too_long={too_long!r} must be 'error' or 'drop'.")
    examples, dropped = [], 0
    for name, record in _named_records(records):
        example = encode_sft_record(record, tokenizer, patch_size, chat_template=chat_template,
                                    fill_token_id=fill_token_id, name=name)
        if max_length is not None and len(example["input_ids"]) > max_length:
            if too_long == "drop":
                dropped += 1
                continue
            encode_sft_record(record, tokenizer, patch_size, max_length=max_length, chat_template=chat_template,
                              fill_token_id=fill_token_id, name=name)  # raises the error that names the record
        examples.append(example)
    if dropped:
        logger.warning(f"Dropped {dropped} SFT record(s) longer than max_length={max_length} tokens.")
    if not examples:
        raise ValueError("No SFT example: the records are empty" + (" or all too long." if dropped else "."))
    return examples


def check_not_trl_sft_trainer(trainer) -> None:
    """Raises a clear ValueError when `trainer` is TRL's `SFTTrainer` (or a subclass) around a CALM.

    TRL's SFTTrainer (checked with trl 1.16) computes token-level metrics from `outputs.logits` and the output
    embeddings, which a CALM does not have (it fails at the first step), and its data preparation does not align
    answers to chunks. Use `build_sft_dataset` with `CalmTrainer` instead (`examples/finetune_sft.py`).
    """
    names = {cls.__name__ for cls in type(trainer).__mro__}
    model = getattr(trainer, "model", None)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "SFTTrainer" in names and getattr(getattr(model, "config", None), "model_type", None) == "calm":
        raise ValueError(
            "TRL's SFTTrainer cannot train a CALM: it computes token losses and metrics from logits, and a CALM "
            "predicts continuous chunk vectors (it has no logits and no output embeddings). Build the examples with "
            "modeling_calm.sft_calm.build_sft_dataset and train with CalmTrainer (examples/finetune_sft.py)."
        )
