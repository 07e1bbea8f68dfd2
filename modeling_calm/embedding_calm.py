"""The CALM autoencoder as a text embedder for sentence-transformers (not shipped as remote code).

The autoencoder of arXiv 2510.27688 maps each chunk of K tokens to a latent; its forward output carries
`last_hidden_state` `[B, T, Z]`, every token holding its chunk's posterior mean. `save_chunk_embedder` writes the
autoencoder, its tokenizer and the sentence-transformers files beside them:

    modules.json                 Transformer (the autoencoder, through AutoModel with remote code) -> Pooling
    sentence_bert_config.json    feature extraction, the tokenizer pads to a multiple of K, no unpadding
    1_Pooling/config.json        mean over the attention mask

so that `SentenceTransformer(folder, trust_remote_code=True).encode(texts)` returns one Z-vector per text: the mean
of its chunk codes, each chunk weighted by its number of real tokens (padding never counts; a text that fills
whole chunks gets the plain mean of its chunk means). The result does not depend on the other texts of a batch:
every chunk is encoded on its own and padding fills a text's last chunk with the same pad ids alone or batched.

Example:

```python
>>> from sentence_transformers import SentenceTransformer
>>> save_chunk_embedder(autoencoder, "calm-ae-embedder", tokenizer=tokenizer)
>>> SentenceTransformer("calm-ae-embedder", trust_remote_code=True).encode(["a text", "another one"]).shape
(2, 8)
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path


__all__ = ["save_chunk_embedder", "write_sentence_transformers_files"]

POOLING_FOLDER = "1_Pooling"


def write_sentence_transformers_files(folder: str | os.PathLike, config, max_seq_length: int | None = None) -> Path:
    """Write modules.json, sentence_bert_config.json and the Pooling config for a saved autoencoder in `folder`.

    Args:
        folder: a folder holding a saved `CalmAutoencoder` (config.json with `auto_map`) and its tokenizer.
        config: the autoencoder's `CalmAutoencoderConfig` (K = `patch_size`, Z = `latent_size`).
        max_seq_length: longest input in tokens (a multiple of K); None keeps the tokenizer's `model_max_length`.
    """
    folder = Path(folder)
    k, z = int(config.patch_size), int(config.latent_size)
    if max_seq_length is not None and (max_seq_length <= 0 or max_seq_length % k):
        raise ValueError(
            f"`max_seq_length` must be a positive multiple of patch_size K={k} (the model reads whole chunks), "
            f"got {max_seq_length}."
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json: save the autoencoder there first (save_chunk_embedder does).")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_FOLDER, "type": "sentence_transformers.models.Pooling"},
    ]
    transformer = {
        "transformer_task": "feature-extraction",
        "module_output_name": "token_embeddings",
        # Whole chunks: the tokenizer pads every batch to a multiple of K (right padding, masked).
        "processing_kwargs": {"text": {"pad_to_multiple_of": k}},
        # Concatenated (unpadded) inputs would merge the chunks of different texts.
        "unpad_inputs": False,
        "max_seq_length": max_seq_length,
        "do_lower_case": False,
    }
    pooling = {
        "embedding_dimension": z,
        "pooling_mode": "mean",
        "include_prompt": True,
    }
    (folder / POOLING_FOLDER).mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (folder / "sentence_bert_config.json").write_text(json.dumps(transformer, indent=2) + "\n")
    (folder / POOLING_FOLDER / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    return folder


def save_chunk_embedder(autoencoder, folder: str | os.PathLike, tokenizer=None, max_seq_length: int | None = None) -> Path:
    """Save `autoencoder` (and `tokenizer`, which sentence-transformers needs unless the folder has one) as a
    sentence-transformers model in `folder`; see the module docstring for what `encode` returns."""
    folder = Path(folder)
    autoencoder.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    elif not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{folder} has no tokenizer: pass `tokenizer=` (sentence-transformers tokenizes the texts).")
    return write_sentence_transformers_files(folder, autoencoder.config, max_seq_length=max_seq_length)
