"""The autoencoder as a sentence-transformers chunk embedder (issue 18 item 8)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_calm import CalmAutoencoder
from modeling_calm.embedding_calm import save_chunk_embedder, write_sentence_transformers_files
from tests.utils import single_thread, tiny_autoencoder_config  # noqa: F401


WORDS = "the history of city begins a an in on river was born".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}  # pad 0, bos 1, eos 2
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_last_hidden_state_repeats_each_chunk_mean_per_token():
    model = CalmAutoencoder(tiny_autoencoder_config()).eval()
    ids = torch.randint(3, 99, (2, 12))
    out = model(ids)
    assert out.last_hidden_state.shape == (2, 12, 8)
    torch.testing.assert_close(out.last_hidden_state[:, ::4], out.latent_mean)
    torch.testing.assert_close(out.last_hidden_state[:, 3::4], out.latent_mean)


def test_the_helper_writes_the_sentence_transformers_files(tmp_path):
    model = CalmAutoencoder(tiny_autoencoder_config())
    folder = save_chunk_embedder(model, tmp_path / "embedder", tokenizer=_tokenizer())
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling"]
    assert json.loads((folder / "sentence_bert_config.json").read_text())["processing_kwargs"] == {
        "text": {"pad_to_multiple_of": 4}
    }
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["embedding_dimension"] == 8
    with pytest.raises(ValueError, match="multiple of patch_size K=4"):
        write_sentence_transformers_files(folder, model.config, max_seq_length=6)
    with pytest.raises(ValueError, match="no tokenizer"):
        save_chunk_embedder(model, tmp_path / "bare")


def test_sentence_transformers_encodes_offline_with_remote_code(tmp_path):
    pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    model = CalmAutoencoder(tiny_autoencoder_config(vocab_size=len(WORDS) + 4)).eval()
    tokenizer = _tokenizer()
    folder = save_chunk_embedder(model, tmp_path / "embedder", tokenizer=tokenizer)
    texts = ["the history of city begins", "a river", "on the river was born in a city of history"]
    # The expected embedding: the chunk means of each text (padded to whole chunks alone), weighted by real tokens.
    expected = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", pad_to_multiple_of=4, padding=True)
        with torch.no_grad():
            mean = model.encode(encoded["input_ids"])[0][0]  # [L, Z]
        real = encoded["attention_mask"][0].view(-1, 4).sum(-1).float()  # real tokens per chunk
        expected.append((mean * real[:, None]).sum(0) / real.sum())
    torch.save(torch.stack(expected), tmp_path / "expected.pt")
    # A fresh process without the package on the path: the folder's own remote code, offline.
    script = textwrap.dedent(f"""
        import torch
        from sentence_transformers import SentenceTransformer
        embedder = SentenceTransformer({str(folder)!r}, trust_remote_code=True, device="cpu")
        batched = embedder.encode({texts!r}, convert_to_tensor=True)
        alone = torch.stack([embedder.encode([t], convert_to_tensor=True)[0] for t in {texts!r}])
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone, expected, rtol=1e-4, atol=1e-5)
        assert "modeling_calm" not in __import__("sys").modules
        print("encoded", tuple(batched.shape))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "encoded (3, 8)" in result.stdout
