"""Issue 16 ("Nothing silent"), item 8, collator side: CalmDataCollator pads variable-length examples in whole
chunks, so its batches are accepted by the model in training and evaluation."""

import pytest
import torch

from modeling_calm import CalmForCausalLM
from modeling_calm.data_calm import CalmDataCollator
from tests.utils import tiny_calm_config


def test_padding_never_covers_part_of_a_chunk_and_the_model_takes_the_batch():
    k = 4
    features = [{"input_ids": list(range(3, 3 + n))} for n in (13, 9, 4)]
    model = CalmForCausalLM(tiny_calm_config(k=k))
    for side in ("right", "left"):
        batch = CalmDataCollator(pad_token_id=0, patch_size=k, padding_side=side)(features)
        chunks = batch["attention_mask"].reshape(3, -1, k)
        assert torch.equal(chunks.amin(-1), chunks.amax(-1)), side  # every chunk all content or all padding
        assert batch["attention_mask"].sum(-1).tolist() == [16, 12, 4]  # each example rounded up to whole chunks
        # Its own tokens keep their labels; the fill of the incomplete chunk is never a target.
        assert ((batch["labels"] != -100).sum(-1)).tolist() == [13, 9, 4]
        for mode in ("train", "eval"):
            getattr(model, mode)()
            assert torch.isfinite(model(**batch).loss), (side, mode)


def test_the_chunk_fill_is_explained_once(caplog):
    from transformers.utils import logging

    logging.get_logger("modeling_calm.data_calm").warning_once.cache_clear()  # other tests may have warned
    logging.enable_propagation()
    try:
        collator = CalmDataCollator(pad_token_id=0, patch_size=4)
        with caplog.at_level("WARNING"):
            collator([{"input_ids": [5, 6, 7, 8, 9]}])
            collator([{"input_ids": [5, 6, 7, 8, 9]}])
        messages = [r.getMessage() for r in caplog.records if "CalmDataCollator" in r.getMessage()]
        assert len(messages) == 1 and "never a training target" in messages[0]
    finally:
        logging.disable_propagation()
