"""kernels/qkv_rope.py (the qkv matmul with RoPE and the K/V cache write in its epilogue) against F.linear
then RoPE and the cache write, and where the model routes to it."""

import pytest
import torch

from kernels.gemv import gemv
from tests.triton_env import DEVICE


def _rel_err(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def _qkv_rope_case(rows, dtype, bias, head_dim=32, num_heads=4, num_kv_heads=2, k=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = (num_heads + 2 * num_kv_heads) * head_dim
    x = torch.randn(rows, k, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    positions = torch.randint(0, 50, (rows,), generator=gen).to(DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(64).float(), inv_freq)
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    slots = torch.randperm(12 * 4, generator=gen)[:rows].to(DEVICE)
    slots[rows // 2] = -1  # a padding token: nothing stored
    shape = (12, 4, num_kv_heads, head_dim)
    caches = [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    return x, weight, b, positions, cos, sin, slots, caches


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows", [5, 40])  # 40: the 64-row dot tile
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_with_rope_in_the_epilogue_is_the_matmul_then_rope_and_the_cache_write(dtype, tol, rows, bias):
    """qkv_rope_gemv = F.linear, then RoPE on q and k (each head's halves rotated by its token's
    position), k and v stored at their slots: q returned, the caches written, the padding token's
    slot (-1) untouched, every other cache row as it was."""
    from kernels.qkv_rope import qkv_rope_gemv

    nh, nkv, d = 4, 2, 32
    x, weight, b, positions, cos, sin, slots, (k_cache, v_cache) = _qkv_rope_case(rows, dtype, bias)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = qkv_rope_gemv(x, weight, b, positions, cos, sin, k_cache, v_cache, slots, nh, nkv)
    y = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    yq, yk, yv = y.split([nh * d, nkv * d, nkv * d], -1)

    def rope(t, heads):  # [rows, heads * d] -> [rows, heads, d], neox halves
        t = t.view(rows, heads, d)
        c, s = cos[positions].double()[:, None], sin[positions].double()[:, None]
        t1, t2 = t[..., :d // 2], t[..., d // 2:]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

    assert q.shape == (rows, nh, d) and q.dtype == dtype
    assert _rel_err(q, rope(yq, nh)) < tol
    stored = slots >= 0
    flat_k, flat_v = k_cache.view(-1, nkv, d), v_cache.view(-1, nkv, d)
    assert _rel_err(flat_k[slots[stored]], rope(yk, nkv)[stored]) < tol
    assert _rel_err(flat_v[slots[stored]], yv.view(rows, nkv, d)[stored]) < tol
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[stored].cpu()] = False
    assert torch.equal(flat_k[untouched.to(DEVICE)], k_before.view(-1, nkv, d)[untouched.to(DEVICE)])
    assert torch.equal(flat_v[untouched.to(DEVICE)], v_before.view(-1, nkv, d)[untouched.to(DEVICE)])


@pytest.mark.parametrize("block_n", [16, 32])
def test_qkv_with_rope_rounds_as_the_matmul_then_the_rotary_kernel(block_n):
    """Bitwise what the GEMV's qkv output through kernels/rotary.py's apply_rotary_and_write_kv gives
    (fp16, head_dim 64: a head's half in 2 or 1 column tiles)."""
    from kernels.qkv_rope import qkv_rope_gemv
    from kernels.rotary import apply_rotary_and_write_kv

    nh, nkv, d = 4, 2, 64
    x, weight, b, positions, cos, sin, slots, (k_cache, v_cache) = _qkv_rope_case(24, torch.float16, True, head_dim=d)
    config = (block_n, 64, 4, 2, 1)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    y = gemv(x, weight, b, config=(2 * block_n, 64, 4, 2, 1), block_m=32)
    yq, yk, yv = y.split([nh * d, nkv * d, nkv * d], -1)
    q_ref = apply_rotary_and_write_kv(yq.reshape(24, nh, d), yk.reshape(24, nkv, d), yv.reshape(24, nkv, d),
                                      positions, cos, sin, k_ref, v_ref, slots)
    q = qkv_rope_gemv(x, weight, b, positions, cos, sin, k_cache, v_cache, slots, nh, nkv, config=config)
    assert torch.equal(q, q_ref) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_qkv_with_rope_refuses_what_it_cannot_tile():
    from kernels.qkv_rope import qkv_rope_gemv

    x, weight, b, positions, cos, sin, slots, (k_cache, v_cache) = _qkv_rope_case(3, torch.float32, False)
    with pytest.raises(ValueError, match="is not \\[\\(4 \\+ 2 \\* 1\\) \\* 32, K\\]"):
        qkv_rope_gemv(x, weight, b, positions, cos, sin, k_cache, v_cache, slots, 4, 1)
    with pytest.raises(ValueError, match="tile half a head \\(16\\)"):
        qkv_rope_gemv(x, weight, b, positions, cos, sin, k_cache, v_cache, slots, 4, 2, config=(32, 64, 4, 2, 1))
    with pytest.raises(ValueError, match="slot_mapping must be a contiguous \\[3\\]"):
        qkv_rope_gemv(x, weight, b, positions, cos, sin, k_cache, v_cache, slots[:2], 4, 2)
    with pytest.raises(ValueError, match="must hold 2 KV heads of 32 in torch.float16"):
        qkv_rope_gemv(x.half(), weight.half(), b, positions, cos, sin, k_cache, v_cache, slots, 4, 2)


def test_qkv_takes_rope_only_on_cuda_at_decode_sizes(monkeypatch):
    from kernels import qkv_rope as rope_mod

    cuda = torch.device("cuda", 0)
    assert not rope_mod.takes_qkv_rope(64, 6144, 128, torch.bfloat16, torch.device("cpu"))  # no PDL, no GPU
    monkeypatch.setattr("kernels.qkv_rope.use_pdl", lambda device: True)
    monkeypatch.setattr("kernels.qkv_rope.QKV_ROPE_MIN_ROWS", 17)
    assert rope_mod.takes_qkv_rope(64, 6144, 128, torch.bfloat16, cuda)
    assert rope_mod.takes_qkv_rope(17, 3072, 64, torch.float32, cuda)
    assert not rope_mod.takes_qkv_rope(16, 6144, 128, torch.bfloat16, cuda)  # under the measured minimum
    assert not rope_mod.takes_qkv_rope(65, 6144, 128, torch.bfloat16, cuda)  # a prefill's rows: cuBLAS
    assert not rope_mod.takes_qkv_rope(64, 1536, 128, torch.bfloat16, cuda)  # too narrow
    assert not rope_mod.takes_qkv_rope(64, 6144, 80, torch.bfloat16, cuda)  # half a head is no 16-wide tile
    monkeypatch.setenv("PAGEDSERVE_QKV_ROPE_GEMV", "1")
    assert rope_mod.takes_qkv_rope(1, 6144, 128, torch.bfloat16, cuda)
    monkeypatch.setenv("PAGEDSERVE_QKV_ROPE_GEMV", "0")
    assert not rope_mod.takes_qkv_rope(64, 6144, 128, torch.bfloat16, cuda)
    monkeypatch.setenv("PAGEDSERVE_QKV_ROPE_GEMV", "yes")
    with pytest.raises(ValueError, match="PAGEDSERVE_QKV_ROPE_GEMV must be 0 or 1"):
        rope_mod.takes_qkv_rope(64, 6144, 128, torch.bfloat16, cuda)
    monkeypatch.setattr("kernels.qkv_rope._num_sms", lambda device: 132)  # an H200's
    cfg, block_m = rope_mod.qkv_rope_config(64, 6144, 128, torch.bfloat16, cuda)
    assert cfg[0] == 32 and block_m == 64  # Llama-8B TP=1: 96 programs of 2 x 32
    assert rope_mod.qkv_rope_config(64, 3072, 128, torch.bfloat16, cuda)[0][0] == 16  # a TP=2 rank: 96 of 2 x 16
