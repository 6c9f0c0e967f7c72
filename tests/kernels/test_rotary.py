"""apply_rotary (neox RoPE, optionally after Qwen3's per-head q/k RMSNorm) against the model's torch
RotaryEmbedding and RMSNorm, on q/k views of a merged qkv buffer as the model produces them."""


import pytest
import torch


from gpu_workers.models import elementwise  # noqa: E402
from gpu_workers.models.layers import RMSNorm, RotaryEmbedding  # noqa: E402
from kernels import apply_rotary, apply_rotary_and_write_kv, write_kv_cache  # noqa: E402

from tests.triton_env import DEVICE, INTERPRET  # noqa: E402
# The interpreter casts float32 -> bf16 by truncation (the GPU rounds to nearest): looser there.
TOLERANCES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 2e-2 if INTERPRET else 8e-3)]
MAX_POSITION = 4096


@pytest.fixture(autouse=True)
def torch_reference(monkeypatch):
    monkeypatch.setattr(elementwise, "MODE", "torch")  # the modules under comparison run their torch path


def rel_err(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """q [t, num_heads, d], k [t, num_kv_heads, d]: strided views of one merged qkv projection output."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (2 * torch.randn(num_tokens, q_size + 2 * kv_size, device=DEVICE)).to(dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)


def reference(rope, positions, q, k, q_norm=None, k_norm=None):
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return rope(positions, q, k)


def norm_modules(head_dim, dtype):
    mods = [RMSNorm(head_dim, 1e-6).to(DEVICE, dtype) for _ in range(2)]
    for m in mods:
        m.weight.data = (1 + 0.3 * torch.randn(head_dim, device=DEVICE)).to(dtype)
    return mods


@pytest.mark.parametrize("dtype,tol", TOLERANCES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_matches_model(dtype, tol, head_dim, qk_norm):
    rope = RotaryEmbedding(head_dim, MAX_POSITION, 10000.0, {"rope_type": "default"}).to(DEVICE)
    q, k = qkv_views(6, 9, 3, head_dim, dtype)
    positions = torch.randint(0, MAX_POSITION, (6,), device=DEVICE)
    q_before, k_before = q.clone(), k.clone()
    norms = norm_modules(head_dim, dtype) if qk_norm else [None, None]
    ref_q, ref_k = reference(rope, positions, q, k, *norms)

    weights = [m.weight for m in norms] if qk_norm else [None, None]
    out_q, out_k = apply_rotary(q, k, positions, rope.cos_cache, rope.sin_cache, *weights, eps=1e-6)

    assert out_q.shape == q.shape and out_k.shape == k.shape and out_q.dtype == dtype
    assert out_q.is_contiguous() and out_k.is_contiguous()
    assert rel_err(out_q, ref_q) < tol and rel_err(out_k, ref_k) < tol
    assert torch.equal(q, q_before) and torch.equal(k, k_before)  # out of place by default


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_and_kv_write_in_one_kernel(qk_norm):
    """apply_rotary_and_write_kv == apply_rotary, then write_kv_cache of the rotated k and of v: same q,
    same cache contents (a padding token, slot -1, writes nothing)."""
    head_dim, num_heads, num_kv_heads, block_size, num_blocks = 64, 8, 2, 4, 6
    rope = RotaryEmbedding(head_dim, MAX_POSITION, 10000.0, {"rope_type": "default"}).to(DEVICE)
    q, k = qkv_views(5, num_heads, num_kv_heads, head_dim, torch.float32)
    v = torch.randn(5, num_kv_heads, head_dim, device=DEVICE)
    positions = torch.randint(0, MAX_POSITION, (5,), device=DEVICE)
    slots = torch.tensor([13, 2, -1, 22, 7], device=DEVICE)
    weights = [m.weight for m in norm_modules(head_dim, torch.float32)] if qk_norm else [None, None]
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    ref_q, ref_k = apply_rotary(q, k, positions, rope.cos_cache, rope.sin_cache, *weights)
    write_kv_cache(ref_k, v, *ref_caches, slots)

    got_q = apply_rotary_and_write_kv(q, k, v, positions, rope.cos_cache, rope.sin_cache, *caches, slots, *weights)

    assert torch.allclose(got_q, ref_q, atol=1e-6)
    assert torch.allclose(caches[0], ref_caches[0], atol=1e-6) and torch.equal(caches[1], ref_caches[1])
    with pytest.raises(ValueError, match="slot_mapping"):
        apply_rotary_and_write_kv(q, k, v, positions, rope.cos_cache, rope.sin_cache, *caches, slots[:3])
    with pytest.raises(ValueError, match="KV heads"):
        apply_rotary_and_write_kv(q, k, v, positions, rope.cos_cache, rope.sin_cache,
                                  *[c[:, :, :1] for c in caches], slots)


def test_rotary_in_place_int32_positions_and_odd_half():
    """inplace writes into the strided views; int32 positions; head_dim 80 (half = 40, not a power of 2)."""
    head_dim = 80
    rope = RotaryEmbedding(head_dim, MAX_POSITION, 500000.0, {"rope_type": "default"}).to(DEVICE)
    q, k = qkv_views(5, 4, 2, head_dim, torch.float32)
    positions = torch.randint(0, MAX_POSITION, (5,), device=DEVICE, dtype=torch.int32)
    q_norm, k_norm = norm_modules(head_dim, torch.float32)
    ref_q, ref_k = reference(rope, positions.long(), q, k, q_norm, k_norm)
    out_q, out_k = apply_rotary(q, k, positions, rope.cos_cache, rope.sin_cache, q_norm.weight, k_norm.weight,
                                eps=1e-6, inplace=True)
    assert out_q is q and out_k is k
    assert rel_err(q, ref_q) < 1e-5 and rel_err(k, ref_k) < 1e-5


def test_rotary_rejects_bad_inputs():
    rope = RotaryEmbedding(64, 128, 10000.0, {"rope_type": "default"}).to(DEVICE)
    cos, sin = rope.cos_cache, rope.sin_cache
    q, k = qkv_views(3, 4, 2, 64, torch.float32)
    pos = torch.arange(3, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    with pytest.raises(ValueError, match="last dim"):
        apply_rotary(q.transpose(1, 2).contiguous().transpose(1, 2), k, pos, cos, sin)
    with pytest.raises(ValueError, match="dtypes"):
        apply_rotary(q, k.half(), pos, cos, sin)
    with pytest.raises(ValueError, match="share num_tokens"):
        apply_rotary(q, k[:2], pos, cos, sin)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(q, k, pos[:2], cos, sin)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(q, k, pos.float(), cos, sin)
    with pytest.raises(ValueError, match="cos_cache"):
        apply_rotary(q, k, pos, cos.half(), sin)
    with pytest.raises(ValueError, match="sin_cache"):
        apply_rotary(q, k, pos, cos, sin[:, :16])
    with pytest.raises(ValueError, match="even"):
        apply_rotary(q[..., :63], k[..., :63], pos, cos, sin)
    with pytest.raises(ValueError, match="come together"):
        apply_rotary(q, k, pos, cos, sin, q_norm_weight=w)
    with pytest.raises(ValueError, match="k_norm_weight"):
        apply_rotary(q, k, pos, cos, sin, w, w.half())
