"""Where Triton kernels run in tests: the GPU when there is one, else Triton's interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton); and the shuffled
paged KV caches the attention kernel tests share."""

import math
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype):
    """Random caches (unused slots too) and block tables whose ids are a shuffled, non-contiguous set.
    Returns k_cache, v_cache, block_tables [num_seqs, max_blocks] int32, and each sequence's dense K, V."""
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks full of noise
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=DEVICE)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32, device=DEVICE)
    dense, used = [], 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = perm[used:used + nb]
        used += nb
        block_tables[i, :nb] = ids.int()
        dense.append((k_cache[ids].flatten(0, 1)[:n], v_cache[ids].flatten(0, 1)[:n]))  # [n, kv_heads, dim]
    return k_cache, v_cache, block_tables, dense
