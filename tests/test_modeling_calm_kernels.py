"""The fused vocabulary projection + argmax (modeling_calm_kernels): its tokens, tie rule and rounding against
torch's product and `argmax`, run by Triton's interpreter on the CPU (fp16: the interpreter's bf16 is not faithful)
and by the GPU on CUDA (bf16, CALM-M's shapes), and its use by the autoencoder and by recorded decoding."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling_calm.modeling_calm_kernels import projection_argmax, projection_argmax_supported


ROOT = Path(__file__).resolve().parents[1]

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
def test_cpu_tensors_are_not_supported_and_the_error_names_the_rule():
    hidden, weight = torch.randn(3, 32, dtype=torch.bfloat16), torch.randn(50, 32, dtype=torch.bfloat16)
    assert not projection_argmax_supported(hidden, weight)
    with pytest.raises(ValueError, match=r"bf16/fp16 CUDA tensors .* H a multiple of 16; got hidden \(3, 32\)"):
        projection_argmax(hidden, weight)


def test_unsupported_shapes_and_dtypes_are_refused_before_any_launch():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = torch.randn(50, 32, dtype=torch.bfloat16, device=device)
    assert not projection_argmax_supported(torch.randn(3, 32, device=device), weight)  # float32 hidden
    assert not projection_argmax_supported(torch.randn(3, 24, dtype=torch.bfloat16, device=device),
                                           torch.randn(50, 24, dtype=torch.bfloat16, device=device))  # H % 16
    assert not projection_argmax_supported(torch.randn(3, 32, dtype=torch.bfloat16, device=device), weight.t())


# ----------------------------------------------------------------------------------------------------------------
# Triton's interpreter (CPU)

INTERPRETED = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from modeling_calm.modeling_calm_kernels import _launch, _launch_config, projection_argmax
    from modeling_calm.modeling_calm_kernels import projection_argmax_supported

    results = {}
    gen = torch.Generator().manual_seed(0)
    # Small integers: every product and sum is exact in float32, so the tokens must equal torch's exactly, and
    # equal logits (ties) are common, inside a tile, across tiles and across splits.
    cases = [(5, 32, 300), (17, 64, 1000), (40, 48, 257), (130, 16, 129), (3, 32, 5), (1, 64, 3000)]
    for rows, hidden_size, vocab in cases:
        hidden = torch.randint(-3, 4, (rows, hidden_size), generator=gen).half()
        weight = torch.randint(-2, 3, (vocab, hidden_size), generator=gen).half()
        assert projection_argmax_supported(hidden, weight)
        got = projection_argmax(hidden, weight)
        want = F.linear(hidden, weight).argmax(-1)
        # Both epilogues: one max over packed (value, column) keys (the default), and max + argmax.
        unpacked = _launch(hidden, weight, *_launch_config(rows, hidden_size)[:5], 4, False)
        results[f"{rows}x{hidden_size}x{vocab}"] = [
            got.dtype == torch.long, torch.equal(got, want), torch.equal(unpacked, want)
        ]
    # The same 37 token rows repeated over 3,000 tokens: every maximum is shared by tokens in many tiles and splits,
    # and the first one must win.
    hidden = torch.randint(-3, 4, (20, 32), generator=gen).half()
    weight = torch.randint(-2, 3, (37, 32), generator=gen).half().repeat(82, 1)[:3000]
    got = projection_argmax(hidden, weight)
    results["repeated"] = [torch.equal(got, F.linear(hidden, weight).argmax(-1)), bool((got < 37).all())]
    # Rounding: 1024.5 (token 200) rounds to 1024 in fp16, the value of token 3, so token 3 wins the tie,
    # as in torch's fp16 product; an unrounded float32 argmax would say 200.
    hidden = torch.zeros(1, 16).half()
    hidden[0, :2] = 1
    weight = torch.zeros(300, 16).half()
    weight[3, 0] = 1024
    weight[200, 0], weight[200, 1] = 1024, 0.5
    results["rounding"] = [projection_argmax(hidden, weight).tolist(), F.linear(hidden, weight).argmax(-1).tolist()]
    # Refused, with the rule named: float32, a hidden size that is not a multiple of 16, a column-major weight.
    good = torch.zeros(3, 32).half()
    results["refused"] = [
        projection_argmax_supported(good.float(), torch.zeros(50, 32)),
        projection_argmax_supported(torch.zeros(3, 24).half(), torch.zeros(50, 24).half()),
        projection_argmax_supported(good, torch.zeros(32, 50).half().t()),
        projection_argmax_supported(good, torch.zeros(50, 32).half()),
    ]
    try:
        projection_argmax(good.float(), torch.zeros(50, 32))
        results["refusal_error"] = None
    except ValueError as error:
        results["refusal_error"] = str(error)
    # No rows: an empty answer.
    results["empty"] = list(projection_argmax(torch.zeros(0, 16).half(), weight).shape)

    # The autoencoder decodes through the kernel in fp16 and gets decode()'s tokens.
    from tests.utils import tiny_autoencoder_config
    from modeling_calm import CalmAutoencoder
    import modeling_calm.modeling_calm_autoencoder as ae_module

    calls = []
    fused = ae_module._compiler_free_projection_argmax
    ae_module._compiler_free_projection_argmax = lambda h, w: calls.append(h.shape[0]) or fused(h, w)
    torch.manual_seed(0)
    model = CalmAutoencoder(tiny_autoencoder_config(vocab_size=300)).eval().half()
    latents = torch.randn(100, 3, 8).half()
    tokens = model.decode_tokens(latents)
    results["autoencoder"] = [torch.equal(tokens, model.decode(latents).argmax(-1)), list(calls)]
    few = torch.randn(2, 1, 8).half()  # 8 rows: fused too
    results["few"] = [torch.equal(model.decode_tokens(few), model.decode(few).argmax(-1)), list(calls)]
    model.decode_tokens(latents[:50])  # 600 rows: torch's product is faster there, unfused
    model.fused_projection_argmax = False
    model.decode_tokens(latents)
    results["unfused"] = calls
    print(json.dumps(results))
    """
)


@needs_triton
def test_interpreted_kernel_equals_torch_with_its_tie_and_rounding_rules():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode and "only 0-dimensional arrays can be converted to Python scalars" in done.stderr:
        # Triton 3.6's interpreter turns a scalar argument into a 1-element array, which recent NumPy refuses to
        # turn into an int (a loop bound): the interpreter cannot run any kernel with such a loop (the GPU can).
        pytest.skip("this Triton's interpreter cannot run loops over scalar arguments with this NumPy")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ["5x32x300", "17x64x1000", "40x48x257", "130x16x129", "3x32x5", "1x64x3000"]:
        assert results[case] == [True, True, True], case
    assert results["repeated"] == [True, True]
    assert results["rounding"] == [[3], [3]]
    assert results["empty"] == [0]
    assert results["refused"] == [False, False, False, True]
    assert "H a multiple of 16; got hidden (3, 32) torch.float32" in results["refusal_error"]
    assert results["autoencoder"] == [True, [300 * 4]]  # one launch for all 300 latents x K = 4 states
    assert results["few"] == [True, [300 * 4, 2 * 4]]
    assert results["unfused"] == [300 * 4, 2 * 4]  # none for 600 rows, none once switched off


# ----------------------------------------------------------------------------------------------------------------
# CUDA (run on the GPU machine)


@cuda
@pytest.mark.parametrize("rows", [4, 800, 25_600])
def test_cuda_kernel_equals_torch_except_at_rounding_ties_at_calm_m_shapes(rows):
    """CALM-M's decoder width (512) and Llama 3's vocabulary (128,257); rows: batch 1 at T = 1, batch 1 with
    N = 200 candidates, batch 32 with N = 200 (x K = 4). Tokens may differ from torch's only where torch's two
    logits are within one bf16 step of each other (a float32 sum rounding the other way)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, 512, device="cuda", generator=gen).bfloat16()
    weight = (0.05 * torch.randn(128_257, 512, device="cuda", generator=gen)).bfloat16()
    got = projection_argmax(hidden, weight)
    logits = torch.cat([F.linear(part, weight) for part in hidden.split(2048)])
    want = logits.argmax(-1)
    differ = (got != want).nonzero()[:, 0]
    assert differ.numel() <= max(1, rows // 1000), differ.numel()
    top = logits.gather(1, want[:, None])[:, 0].float()
    chosen = logits.gather(1, got[:, None])[:, 0].float()
    step = top.abs() * 2.0**-7  # one bf16 step (8 significant bits) at the maximum
    assert bool(((top - chosen)[differ] <= step[differ]).all())
    # Exact arithmetic (small integers): no rounding freedom left, so every token equals torch's.
    small_hidden = torch.randint(-3, 4, (rows, 512), device="cuda", generator=gen).bfloat16()
    small_weight = torch.randint(-1, 2, (128_257, 512), device="cuda", generator=gen).bfloat16()
    want = torch.cat([F.linear(part, small_weight).argmax(-1) for part in small_hidden.split(2048)])
    assert torch.equal(projection_argmax(small_hidden, small_weight), want)


@cuda
@pytest.mark.parametrize("mode", ["cudagraph", "cudagraph+inductor", "reduce-overhead"])
def test_bf16_decoding_with_the_fused_kernel_equals_eager_decoding_on_cuda(mode):
    from tests.utils import NO_STOPS, left_pad, make_model, random_rows

    model = make_model().cuda().to(torch.bfloat16)
    model.autoencoder.unfused_projection_rows = (0, 0)  # the kernel decodes every step's 3 x 7 x K candidates
    assert model.autoencoder._fuses_projection(torch.zeros(1, 32, device="cuda", dtype=torch.bfloat16))
    ids, mask = left_pad(random_rows([5, 11, 8], seed=4))
    kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=21 * 4, temperature=0.5, num_candidates=7, seed=3,
                  **NO_STOPS)
    eager = model.generate(ids.cuda(), calm_compile=False, **kwargs)
    for _ in range(3):
        out = model.generate(ids.cuda(), calm_compile=True, calm_compile_mode=mode, **kwargs)
        assert model.calm_last_decoding.startswith(("cuda graphs", "compiled")), model.calm_last_decoding
        if mode == "cudagraph":  # the same kernels replayed; inductor's own kernels round bf16 differently
            assert torch.equal(out, eager)
        else:
            assert out.shape == eager.shape
