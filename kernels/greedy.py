"""The greedy pick as one max over 64-bit keys: each token's logit and id packed so that the largest
key is the row's argmax, the lowest id among equal logits.

    key(logit, id) = ordered(float32(logit) + 0.0) << 32  |  (2**32 - 1 - id)

    ordered(v): v's float32 bits as int32, the magnitude bits flipped when negative, so that a < b as
                floats <=> ordered(a) < ordered(b) as ints (+ 0.0 turns -0.0 into +0.0: equal logits
                compare equal, as in torch.argmax; a NaN ranks above +inf, as torch.argmax takes it)
    the low word: larger for a lower id, so among equal logits the lowest id wins

    grid (rows, chunks of CHUNK tokens):  each program reads its chunk once, in the logits' own dtype,
    and atomic-maxes its best key into keys[row] (which starts at KEY_MIN).

Under tensor parallelism each rank packs the ids of its own vocabulary rows (vocab_start on) and the
ranks all-reduce their keys with max ([rows] int64: 8 bytes a row, not the logits): the pick of the
whole vocabulary, the same token on every rank. Before, the pick was torch's
argmax over the rank's logits, a gather of the winning value, a stack of (value, id) as float32, the
all-gather, and an argmax and gather across ranks: about a dozen launches (2 x H200, Llama-8B TP=2
batch 64: 3.566 -> 3.536-3.552 ms a step; BENCHMARKS.md, session 13).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import cdiv
from kernels.sampling import SUPPORTED_LOGIT_DTYPES

CHUNK = 4096  # tokens a program reads: [64, 128256] logits make 2,048 programs
BLOCK = 1024  # tokens a step of a program takes
KEY_MIN = -(1 << 63)  # keys start here (an empty row's key)
_KEY_MIN = tl.constexpr(KEY_MIN)
MAX_VOCAB = 1 << 31  # ids and vocab_start + vocab must fit the key's low word


@triton.jit(do_not_specialize=["stride_row", "vocab", "vocab_start"])
def _greedy_keys_kernel(logits_ptr, stride_row, vocab, vocab_start, keys_ptr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    best = tl.full([BLOCK], _KEY_MIN, tl.int64)
    for off in tl.static_range(0, CHUNK, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=mask, other=0.0)
        bits = (x.to(tl.float32) + 0.0).to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        key = (ordered << 32) | (4294967295 - (cols.to(tl.int64) + vocab_start))
        best = tl.maximum(best, tl.where(mask, key, _KEY_MIN))
    tl.atomic_max(keys_ptr + row, tl.max(best, axis=0))


def greedy_keys(logits: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """[rows] int64 keys of each row's argmax over `logits` ([rows, vocab], the last dim contiguous;
    token ids vocab_start on): the largest key of all ranks' is the argmax of the whole vocabulary
    (gpu_workers/models/parallel_layers.py's tokens_from_keys unpacks it; greedy_keys_torch there is
    this kernel's torch twin, for the CPU). One fill and one launch, whatever the row count."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with the last dim contiguous, got {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_LOGIT_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not one of {SUPPORTED_LOGIT_DTYPES}")
    rows, vocab = logits.shape
    if vocab == 0 or not 0 <= vocab_start <= MAX_VOCAB - vocab:
        raise ValueError(f"need 0 < vocab and 0 <= vocab_start, vocab_start + vocab <= 2**31; "
                         f"got {vocab_start}, {vocab}")
    keys = torch.full((rows,), KEY_MIN, dtype=torch.int64, device=logits.device)
    if rows:
        _greedy_keys_kernel[(rows, cdiv(vocab, CHUNK))](logits, logits.stride(0), vocab, vocab_start, keys,
                                                        CHUNK=CHUNK, BLOCK=BLOCK)
    return keys
