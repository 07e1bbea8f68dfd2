"""Smallest honest end-to-end CALM run on the CPU, with no download.

Trains a tiny autoencoder and a tiny CALM on text that ships with Python (the `pydoc_data` help topics), using
UTF-8 bytes as tokens, reports reconstruction accuracy and the energy loss, saves a Hub-ready folder and reloads
it through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`.

    python examples/quickstart.py                      # about a minute on 2 CPU cores
    python examples/quickstart.py --max_steps 20       # a smoke run
"""

import argparse
import json
from pathlib import Path

import torch
from pydoc_data.topics import topics
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from modeling_calm import CalmAutoencoder, CalmConfig, CalmForCausalLM

PRESET = Path(__file__).resolve().parents[1] / "configuration" / "tiny.json"
BYTE_VOCAB = 256 + 3  # bytes + bos/eos/pad


def byte_blocks(block_size: int) -> torch.Tensor:
    data = bytes("\n\n".join(topics.values()), "utf-8")
    ids = torch.tensor(list(data), dtype=torch.long) + 3  # 0, 1, 2 are bos, eos, pad
    n = len(ids) // block_size * block_size
    return ids[:n].view(-1, block_size)


def train(model, blocks, steps, batch_size, lr, desc):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    model.train()
    progress = tqdm(range(steps), desc=desc)
    for _ in progress:
        batch = blocks[torch.randint(0, len(blocks), (batch_size,))]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--output_dir", default="runs/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)

    preset = json.loads(PRESET.read_text())
    preset["autoencoder_config"].update(vocab_size=BYTE_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    preset["backbone_config"].update(vocab_size=BYTE_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = CalmConfig(**{k: v for k, v in preset.items() if k != "model_type"})
    blocks = byte_blocks(64)
    held_out, blocks = blocks[:32], blocks[32:]

    autoencoder = CalmAutoencoder(config.autoencoder_config)
    train(autoencoder, blocks, args.max_steps, 32, 3e-3, "autoencoder")
    with torch.no_grad():
        accuracy = autoencoder(held_out, labels=held_out, sample_latents=False).accuracy.item()
    print(f"autoencoder token accuracy on held-out text (z = posterior mean): {accuracy:.4f}")

    model = CalmForCausalLM(config)
    model.autoencoder.load_state_dict(autoencoder.state_dict())
    train(model, blocks, args.max_steps, 16, 1e-3, "calm")
    with torch.no_grad():
        out = model(held_out, labels=held_out)
    print(f"CALM held-out energy loss {out.loss.item():.3f}, Brier-1..4 {[round(b, 3) for b in out.brier.tolist()]}")

    model.save_pretrained(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(held_out).last_hidden_state, model(held_out).last_hidden_state)
    print(f"saved to {args.output_dir}; reloaded with AutoModelForCausalLM: identical hidden states = {same}")


if __name__ == "__main__":
    main()
