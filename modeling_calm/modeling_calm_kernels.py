"""A fused vocabulary projection and argmax for decoding latents into tokens on CUDA (arXiv 2510.27688).

Decoding turns each latent into K tokens by the argmax of a projection onto the whole vocabulary. The batch
temperature sampler of the paper (Algorithm 2) decodes N candidates per sequence and step: at batch 32 and N = 200,
25,600 decoder states times 128,257 tokens. Written out, those logits are 6.6 GB of bf16 per step, and writing and
reading them back costs more than the product itself. `projection_argmax` computes the product tile by tile in a
Triton kernel and keeps a running maximum per row in registers, so no logit ever reaches memory.

The tokens are those of `F.linear(hidden, weight).argmax(-1)` in the weights' dtype: every logit is accumulated in
float32 and rounded to the weights' dtype before the comparison, as torch's product rounds its output, and ties go
to the lower index, as in `torch.argmax`. Only the order of the float32 sums differs from cuBLAS's, so a logit that
lies within float32 rounding of a bf16 rounding boundary can round the other way: the token can then differ where
two logits are equal up to one bf16 step (tested on CUDA).

Triton is optional: without it (or off CUDA) `projection_argmax_supported` is False and the caller uses torch.
Under Triton's interpreter (`TRITON_INTERPRET=1`) the kernel also runs on CPU tensors; the tests use that.
"""

from __future__ import annotations

import os

import torch


try:  # optional dependency: CUDA installs of torch bring it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is missing
    triton = None

__all__ = ["projection_argmax", "projection_argmax_supported"]

# Programs launched per streaming multiprocessor: enough to hide the tail of the last wave.
_PROGRAMS_PER_SM = 4
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


if triton is not None:

    @triton.jit
    def _projection_argmax_kernel(
        hidden_ptr,
        weight_ptr,
        best_ptr,
        index_ptr,
        rows,
        vocab,
        tiles_per_split,
        stride_hidden,
        stride_weight,
        HIDDEN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PACKED: tl.constexpr,
        LOW_BITS: tl.constexpr,
    ):
        # Program (m, s): rows [m * BLOCK_M, (m + 1) * BLOCK_M) against vocabulary tiles [s * tiles_per_split,
        # (s + 1) * tiles_per_split) of BLOCK_N tokens; writes, for split s, each row's best rounded logit (PACKED:
        # as an order-preserving int32 key) and its token.
        row_block = tl.program_id(0)
        split = tl.program_id(1)
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < rows
        offs_k = tl.arange(0, BLOCK_K)
        local = tl.arange(0, BLOCK_N)
        if PACKED:
            best = tl.full([BLOCK_M], -2147483648, tl.int32)
        else:
            best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_index = tl.zeros([BLOCK_M], tl.int32)
        for step in range(0, tiles_per_split):
            tile = split * tiles_per_split + step
            offs_n = tile * BLOCK_N + local
            col_mask = offs_n < vocab
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in range(0, HIDDEN, BLOCK_K):
                h = tl.load(
                    hidden_ptr + offs_m[:, None] * stride_hidden + (k + offs_k)[None, :],
                    mask=row_mask[:, None],
                    other=0.0,
                )
                w = tl.load(
                    weight_ptr + offs_n[:, None] * stride_weight + (k + offs_k)[None, :],
                    mask=col_mask[:, None],
                    other=0.0,
                )
                acc = tl.dot(h, tl.trans(w), acc)
            # Round as torch's product does before comparing (+ 0.0 turns -0 into +0, which torch finds equal).
            logits = acc.to(hidden_ptr.dtype.element_ty).to(tl.float32) + 0.0
            if PACKED:
                # A rounded logit's float32 bits end in LOW_BITS zeros. Their order-preserving integer (negative
                # floats: magnitude bits flipped) keeps the value in the high bits; the low bits take
                # (2^LOW_BITS - 1 - column), so one max gives the largest value and, among equal values, the first
                # column. Columns past the vocabulary get the smallest key.
                bits = logits.to(tl.int32, bitcast=True)
                ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
                key = ((ordered >> LOW_BITS) << LOW_BITS) | ((1 << LOW_BITS) - 1 - local)[None, :]
                key = tl.where(col_mask[None, :], key, -2147483648)
                tile_key = tl.max(key, axis=1)
                tile_best = tile_key >> LOW_BITS
                tile_index = (1 << LOW_BITS) - 1 - (tile_key & ((1 << LOW_BITS) - 1))
            else:
                logits = tl.where(col_mask[None, :], logits, float("-inf"))
                tile_best = tl.max(logits, axis=1)
                tile_index = tl.argmax(logits, axis=1)  # the first of equal maxima
            better = tile_best > best  # strictly: an earlier tile keeps a tie
            best = tl.where(better, tile_best, best)
            best_index = tl.where(better, tile * BLOCK_N + tile_index, best_index)
        tl.store(best_ptr + split * rows + offs_m, best, mask=row_mask)
        tl.store(index_ptr + split * rows + offs_m, best_index, mask=row_mask)


def projection_argmax_supported(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `projection_argmax(hidden, weight)` runs here: Triton importable, both on one CUDA device, bf16 or
    fp16 of one dtype, a hidden size that is a multiple of 16, a row-major weight."""
    return (
        triton is not None
        and (hidden.is_cuda or (hidden.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"))
        and weight.device == hidden.device
        and hidden.dtype in _SUPPORTED_DTYPES
        and weight.dtype == hidden.dtype
        and hidden.dim() == 2
        and weight.dim() == 2
        and hidden.shape[1] == weight.shape[1]
        and hidden.shape[1] % 16 == 0
        and weight.stride(1) == 1
        and hidden.numel() < 2**31  # the kernel's offsets are 32-bit
        and weight.shape[0] * weight.stride(0) < 2**31
    )


def _launch_config(rows: int, hidden_size: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM) for `rows` decoder states of
    `hidden_size`: the fastest of `benchmarks/bench_projection_argmax.py`'s sweep on an H200 (docs/RESULTS.md)."""
    block_k = next(k for k in ((32,) if rows > 1024 else ()) + (64, 32, 16) if hidden_size % k == 0)
    if rows <= 16:
        return 16, 128, block_k, 4, 4, 8
    if rows <= 1024:
        return 64 if rows > 32 else 32, 64, block_k, 4, 3, 4
    return 128, 128, block_k, 8, 4, 8


def projection_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.LongTensor:
    """`F.linear(hidden, weight).argmax(-1)` without the logits in memory: `hidden [R, H]`, `weight [V, H]` ->
    `[R]` token ids (see the module docstring for the rounding and ties). Requires
    `projection_argmax_supported(hidden, weight)`."""
    if not projection_argmax_supported(hidden, weight):
        raise ValueError(
            "projection_argmax needs Triton and bf16/fp16 CUDA tensors hidden [R, H] and weight [V, H] of one dtype "
            f"and device with H a multiple of 16; got hidden {tuple(hidden.shape)} {hidden.dtype} on {hidden.device}, "
            f"weight {tuple(weight.shape)} {weight.dtype} on {weight.device}."
        )
    if hidden.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=hidden.device)
    return _launch(hidden.contiguous(), weight, *_launch_config(hidden.shape[0], hidden.shape[1]))


def _launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int = 3,
    programs_per_sm: int = _PROGRAMS_PER_SM,
    packed: bool = True,
) -> torch.LongTensor:
    """The kernel at one launch configuration (`benchmarks/bench_projection_argmax.py` compares them)."""
    rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    row_blocks = triton.cdiv(rows, block_m)
    tiles = triton.cdiv(vocab, block_n)
    processors = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 4
    splits = max(1, min(tiles, programs_per_sm * processors // row_blocks))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    best = torch.empty(splits, rows, dtype=torch.int32 if packed else torch.float32, device=hidden.device)
    index = torch.empty(splits, rows, dtype=torch.int32, device=hidden.device)
    # Triton launches on the current CUDA device: make it the tensors' one.
    with torch.cuda.device(hidden.device if hidden.is_cuda else -1):  # -1: no-op (the interpreter)
        _projection_argmax_kernel[(row_blocks, splits)](
            hidden,
            weight,
            best,
            index,
            rows,
            vocab,
            tiles_per_split,
            hidden.stride(0),
            weight.stride(0),
            HIDDEN=hidden_size,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            PACKED=packed,
            LOW_BITS=16 if hidden.dtype == torch.bfloat16 else 13,  # float32 bits below a bf16 / fp16 significand
            num_warps=num_warps,
            num_stages=num_stages,
        )
    # Splits cover increasing token ranges: the first split holding the maximum holds its lowest token.
    winner = best.argmax(0, keepdim=True)  # [1, R]
    return index.gather(0, winner)[0].long()
