"""The decoder layers' fused Triton elementwise path (gpu_workers/models/elementwise.py) against their torch
path: whole tiny-model forwards, and the choice of path."""


import pytest
import torch


from gpu_workers.attention import get_attention_backend  # noqa: E402
from gpu_workers.loader import load_model  # noqa: E402
from gpu_workers.models import elementwise  # noqa: E402
from ipc import envs  # noqa: E402
from tests.checkpoints import build_metadata, make_tiny_checkpoint, positions_of  # noqa: E402

from tests.triton_env import DEVICE  # noqa: E402
BLOCK_SIZE, NUM_BLOCKS = 4, 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {  # qwen3: q/k norm fused into RoPE; llama: llama3 RoPE, biases, 5 heads / 1 kv head (head_dim 16)
    "qwen3": ("qwen3", {}),
    "llama": ("llama", {"rope_scaling": LLAMA3_ROPE, "attention_bias": True, "mlp_bias": True, "hidden_size": 80,
                        "num_attention_heads": 5, "num_key_value_heads": 1, "intermediate_size": 200}),
}


@torch.no_grad()
def forward_logits(model, mode, monkeypatch):
    """One mixed step: a 7-token prefill after 2 cached tokens, and a decode at position 5."""
    monkeypatch.setattr(elementwise, "MODE", mode)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)  # same caches and tokens for both modes
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_key_value_heads, head_dim)
    kv_caches = [(torch.randn(shape, generator=gen).to(DEVICE), torch.randn(shape, generator=gen).to(DEVICE))
                 for _ in range(cfg.num_hidden_layers)]
    seqs = [(2, 7, [3, 9, 4]), (5, 1, [7, 1])]
    input_ids = torch.randint(3, cfg.vocab_size, (8,), generator=gen).to(DEVICE)
    meta = build_metadata(seqs, BLOCK_SIZE, DEVICE)
    hidden = model(input_ids, positions_of(seqs).to(DEVICE), kv_caches, meta)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_triton_elementwise_forward_matches_torch_path(variant, tmp_path, monkeypatch):
    arch, overrides = VARIANTS[variant]
    path = make_tiny_checkpoint(arch, tmp_path / variant, **overrides)
    model = load_model(path, torch.float32, DEVICE, get_attention_backend("torch", torch.device(DEVICE)))
    calls = {"rms_norm": 0, "rotary": 0, "silu_and_mul": 0}
    for name in calls:  # count the fused kernels' calls, so a silent fallback to torch would fail the test
        def spy(*args, _name=name, _fn=getattr(elementwise, name)):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(elementwise, name, spy)
    ref = forward_logits(model, "torch", monkeypatch)
    assert calls == {"rms_norm": 0, "rotary": 0, "silu_and_mul": 0}
    got = forward_logits(model, "triton", monkeypatch)
    layers = model.config.num_hidden_layers
    assert calls == {"rms_norm": 2 * layers + 1, "rotary": layers, "silu_and_mul": layers}
    assert got.shape == ref.shape == (8, model.config.vocab_size)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_triton_backend_gets_kv_written_by_the_rotary_kernel(tmp_path, monkeypatch):
    """With the Triton attention backend, the fused path writes K/V in the rotary kernel and calls the
    backend's attention alone (one launch fewer per layer): same logits as the torch path, which goes
    through backend.forward and its separate cache write, on the same mixed step."""
    path = make_tiny_checkpoint("qwen3", tmp_path / "q3")
    model = load_model(path, torch.float32, DEVICE, get_attention_backend("triton", torch.device(DEVICE)))
    calls = []
    monkeypatch.setattr(elementwise, "rotary_and_write_kv",
                        lambda *a, _fn=elementwise.rotary_and_write_kv: calls.append(1) or _fn(*a))
    ref = forward_logits(model, "torch", monkeypatch)
    assert calls == []
    got = forward_logits(model, "triton", monkeypatch)
    assert len(calls) == model.config.num_hidden_layers
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@torch.no_grad()
def decode_step(model, mode, monkeypatch):
    """A decode-only step (three sequences at positions 5, 8 and 2): the logits, and every layer's caches after it."""
    monkeypatch.setattr(elementwise, "MODE", mode)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(1)
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_key_value_heads, head_dim)
    kv_caches = [(torch.randn(shape, generator=gen).to(DEVICE), torch.randn(shape, generator=gen).to(DEVICE))
                 for _ in range(cfg.num_hidden_layers)]
    seqs = [(5, 1, [7, 1]), (8, 1, [3, 9, 4]), (2, 1, [12])]
    input_ids = torch.randint(3, cfg.vocab_size, (3,), generator=gen).to(DEVICE)
    meta = build_metadata(seqs, BLOCK_SIZE, DEVICE)
    assert meta.is_decode_only
    hidden = model(input_ids, positions_of(seqs).to(DEVICE), kv_caches, meta)
    return model.compute_logits(hidden), kv_caches


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_step_does_rope_and_kv_write_inside_attention(variant, tmp_path, monkeypatch):
    """A decode-only step with the Triton backend: each layer's RoPE (and Qwen3's q/k norm) and K/V
    write happen in its decode attention launch (attend_new_tokens), not in a rotary launch; the logits
    and the caches left behind match the torch path's. $PAGEDSERVE_ROPE_IN_ATTENTION=0 goes back to the
    rotary launch."""
    arch, overrides = VARIANTS[variant]
    path = make_tiny_checkpoint(arch, tmp_path / variant, **overrides)
    backend = get_attention_backend("triton", torch.device(DEVICE))
    model = load_model(path, torch.float32, DEVICE, backend)
    calls = {"rotary_and_write_kv": 0, "attend_new_tokens": 0}
    monkeypatch.setattr(elementwise, "rotary_and_write_kv", lambda *a, _fn=elementwise.rotary_and_write_kv:
                        calls.__setitem__("rotary_and_write_kv", calls["rotary_and_write_kv"] + 1) or _fn(*a))
    monkeypatch.setattr(backend, "attend_new_tokens", lambda *a, _fn=backend.attend_new_tokens:
                        calls.__setitem__("attend_new_tokens", calls["attend_new_tokens"] + 1) or _fn(*a))
    assert backend.new_tokens_fusable(build_metadata([(5, 1, [7, 1])] * 16, BLOCK_SIZE, DEVICE), 8, torch.device(DEVICE))
    assert not backend.new_tokens_fusable(build_metadata([(5, 1, [7, 1])] * 17, BLOCK_SIZE, DEVICE), 8,
                                          torch.device(DEVICE))  # 136 programs: more than an H200's 132 SMs
    ref, ref_caches = decode_step(model, "torch", monkeypatch)
    got, caches = decode_step(model, "triton", monkeypatch)
    layers = model.config.num_hidden_layers
    assert calls == {"rotary_and_write_kv": 0, "attend_new_tokens": layers}
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    for (k, v), (rk, rv) in zip(caches, ref_caches):  # later layers' K/V carry earlier layers' rounding
        torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
    for layer in model.model.layers:  # the switch: the rotary launch again
        layer.self_attn.rope_in_attention = False
    got_off, _ = decode_step(model, "triton", monkeypatch)
    assert calls == {"rotary_and_write_kv": layers, "attend_new_tokens": layers}
    assert ((got_off - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_qkv_matmul_takes_rope_and_the_kv_write_where_the_gemv_takes_them(variant, tmp_path, monkeypatch):
    """Where kernels.qkv_rope.takes_qkv_rope says so (forced here, on the interpreter) and decode attention
    would not rotate inside itself, a layer's qkv matmul also applies RoPE and writes K/V (one launch,
    no rotary launch): same logits and caches as the torch path, on a decode step and on a mixed one
    (a prefill chunk's tokens too). Qwen3's q/k norm needs a whole head in one program: it keeps the
    rotary launch."""
    from kernels import qkv_rope as rope_mod

    arch, overrides = VARIANTS[variant]
    # head_dim 32 (qwen3's already): half a head is one 16-wide column tile
    path = make_tiny_checkpoint(arch, tmp_path / variant, **{**overrides, "head_dim": 32})
    model = load_model(path, torch.float32, DEVICE, get_attention_backend("triton", torch.device(DEVICE)))
    for layer in model.model.layers:
        layer.self_attn.rope_in_attention = False
    ref, ref_caches = decode_step(model, "torch", monkeypatch)
    ref_mixed = forward_logits(model, "torch", monkeypatch)
    monkeypatch.setattr(rope_mod, "takes_qkv_rope", lambda rows, n, head_dim, dtype, device: True)
    calls = {"rotary_and_write_kv": 0, "qkv_rope_gemv": 0}
    monkeypatch.setattr(elementwise, "rotary_and_write_kv", lambda *a, _fn=elementwise.rotary_and_write_kv:
                        calls.__setitem__("rotary_and_write_kv", calls["rotary_and_write_kv"] + 1) or _fn(*a))
    monkeypatch.setattr(rope_mod, "qkv_rope_gemv", lambda *a, _fn=rope_mod.qkv_rope_gemv:
                        calls.__setitem__("qkv_rope_gemv", calls["qkv_rope_gemv"] + 1) or _fn(*a))
    got, caches = decode_step(model, "triton", monkeypatch)
    got_mixed = forward_logits(model, "triton", monkeypatch)
    layers = model.config.num_hidden_layers
    fused = variant != "qwen3"
    assert calls == {"rotary_and_write_kv": 0 if fused else 2 * layers, "qkv_rope_gemv": 2 * layers if fused else 0}
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert ((got_mixed - ref_mixed).norm() / ref_mixed.norm()).item() < 1e-5
    for (k, v), (rk, rv) in zip(caches, ref_caches):
        torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


def test_path_choice(monkeypatch):
    cpu = torch.ones(1)
    monkeypatch.setattr(elementwise, "MODE", None)
    monkeypatch.setattr(elementwise, "_ENV_MODE", None)
    assert not elementwise.use_triton(cpu)  # torch by default on CPU: CPU behaviour is unchanged
    monkeypatch.setattr(elementwise, "MODE", "triton")
    assert elementwise.use_triton(cpu)
    monkeypatch.setattr(elementwise, "MODE", None)

    monkeypatch.setenv("PAGEDSERVE_TRITON_ELEMENTWISE", "1")
    assert envs.triton_elementwise() == "triton"
    monkeypatch.setattr(elementwise, "_ENV_MODE", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert elementwise.use_triton(cpu)
    monkeypatch.delenv("TRITON_INTERPRET")  # CPU tensors need the interpreter
    assert not elementwise.use_triton(cpu)
    monkeypatch.setenv("PAGEDSERVE_TRITON_ELEMENTWISE", "0")
    assert envs.triton_elementwise() == "torch"
    monkeypatch.delenv("PAGEDSERVE_TRITON_ELEMENTWISE")
    assert envs.triton_elementwise() is None
    monkeypatch.setenv("PAGEDSERVE_TRITON_ELEMENTWISE", "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        envs.triton_elementwise()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_default_is_triton_unless_disabled(monkeypatch):
    gpu = torch.ones(1, device="cuda")
    monkeypatch.setattr(elementwise, "MODE", None)
    monkeypatch.setattr(elementwise, "_ENV_MODE", None)
    assert elementwise.use_triton(gpu)
    monkeypatch.setattr(elementwise, "_ENV_MODE", "torch")
    assert not elementwise.use_triton(gpu)
