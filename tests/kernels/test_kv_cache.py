"""write_kv_cache against plain indexing: written slots hold the new K/V, padding and other slots keep theirs."""


import pytest
import torch


from kernels import write_kv_cache  # noqa: E402

from tests.triton_env import DEVICE  # noqa: E402


def _reference_write(key, value, k_cache, v_cache, slots):
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    num_blocks, block_size = k_cache.shape[:2]
    keep = slots >= 0
    k_ref.view(num_blocks * block_size, *k_cache.shape[2:])[slots[keep]] = key[keep]
    v_ref.view(num_blocks * block_size, *v_cache.shape[2:])[slots[keep]] = value[keep]
    return k_ref, v_ref


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 16), (3, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_matches_indexing(block_size, num_kv_heads, head_dim, dtype):
    num_blocks, num_tokens = 6, 13
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    # K and V as strided views into one fused qkv projection, as a model produces them.
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[[2, 7]] = -1  # padding tokens: must not be written anywhere
    k_ref, v_ref = _reference_write(key, value, k_cache, v_cache, slots)

    write_kv_cache(key, value, k_cache, v_cache, slots)

    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_write_kv_cache_rejects_bad_inputs():
    k_cache = torch.randn(4, 4, 2, 16, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    key = torch.randn(3, 2, 16, device=DEVICE)
    slots = torch.tensor([0, 5, 9], device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        write_kv_cache(key.half(), key.half(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="last dim"):
        write_kv_cache(key.transpose(1, 2).contiguous().transpose(1, 2), key, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="head_dim"):
        write_kv_cache(key[:, :, :8], key[:, :, :8], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, k_cache, v_cache, slots.float())
