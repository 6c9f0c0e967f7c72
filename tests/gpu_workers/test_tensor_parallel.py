"""Tensor-parallel splits and sharded loading, in-process: one rank's model is built under a fake
group (TPGroup(rank, size), which never communicates) and compared with slices of the checkpoint.
End-to-end TP through real processes is in tests/frontend/test_llm_tensor_parallel.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gpu_workers.attention import get_attention_backend
from gpu_workers.distributed import TPGroup, set_tp_group
from gpu_workers.loader import SafetensorsSlice, load_model, safetensors_files
from gpu_workers.models.parallel_layers import check_tensor_parallel, split_heads
from tests.checkpoints import make_tiny_checkpoint

VOCAB = 387  # no tp > 1 divides it: the embedding and LM head get padding rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """8 query heads; 4 KV heads (split at tp 2 and 4) or 2 (replicated at tp 4)."""
    root = tmp_path_factory.mktemp("tp")
    common = dict(hidden_size=128, num_attention_heads=8, intermediate_size=256, num_hidden_layers=2,
                  vocab_size=VOCAB)
    return {
        "llama_kv4": make_tiny_checkpoint("llama", root / "llama", num_key_value_heads=4, **common),
        "qwen2_kv2_tied": make_tiny_checkpoint("qwen2", root / "qwen2", num_key_value_heads=2,
                                               tie_word_embeddings=True, **common),
    }


@pytest.fixture
def fake_rank():
    """Install TPGroup(rank, size) while a test builds a model; restores the real group after."""
    previous = []

    def install(rank: int, size: int) -> None:
        previous.append(set_tp_group(TPGroup(rank, size)))

    yield install
    if previous:
        set_tp_group(previous[0])


def test_heads_split_or_replicate_kv_so_each_rank_keeps_the_kv_heads_its_queries_use():
    assert split_heads(8, 4, 1, 2) == (4, 2, 2)
    assert split_heads(8, 8, 3, 4) == (2, 2, 6)
    # 2 KV heads on 4 ranks: ranks 0-1 hold kv0 (queries 0-3), ranks 2-3 hold kv1 (queries 4-7).
    assert [split_heads(8, 2, r, 4).kv_head_start for r in range(4)] == [0, 0, 1, 1]
    # SmolLM2: 9 query heads, 3 KV heads over 3 ranks.
    assert [split_heads(9, 3, r, 3) for r in range(3)] == [(3, 1, 0), (3, 1, 1), (3, 1, 2)]
    for rank in range(8):  # every query head of a rank attends to a KV head the rank holds
        split = split_heads(32, 4, rank, 8)
        first_q = rank * split.num_heads
        assert {q // 8 for q in range(first_q, first_q + split.num_heads)} == {split.kv_head_start}


@pytest.mark.parametrize("heads, kv_heads, intermediate, tp, message", [
    (9, 3, 1536, 2, "tensor_parallel_size 2 must divide num_attention_heads 9"),
    (12, 6, 64, 4, "num_key_value_heads 6 must be a multiple or a divisor of tensor_parallel_size 4"),
    (8, 8, 100, 8, "tensor_parallel_size 8 must divide intermediate_size 100"),
])
def test_unsupported_splits_name_the_numbers(heads, kv_heads, intermediate, tp, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(heads, kv_heads, intermediate, tp)
    check_tensor_parallel(heads, kv_heads, intermediate, 1)


def _expected_local(name: str, full: torch.Tensor, rank: int, tp: int, num_kv_heads: int) -> torch.Tensor:
    """What rank `rank` must hold of checkpoint tensor `name`, derived independently of the layers."""
    if ".q_proj." in name or ".gate_proj." in name or ".up_proj." in name:
        return full.chunk(tp, dim=0)[rank]
    if ".k_proj." in name or ".v_proj." in name:
        heads = full.chunk(num_kv_heads, dim=0)  # one chunk per KV head
        if num_kv_heads >= tp:
            per = num_kv_heads // tp
            return torch.cat(heads[rank * per:(rank + 1) * per])
        return heads[rank * num_kv_heads // tp]
    if ".o_proj." in name or ".down_proj." in name:
        return full.chunk(tp, dim=1)[rank]
    if "embed_tokens" in name or "lm_head" in name:
        per = -(-full.shape[0] // tp)
        padded = torch.cat([full, full.new_zeros(per * tp - full.shape[0], full.shape[1])])
        return padded[rank * per:(rank + 1) * per]
    return full  # norms: replicated


def _resident(model, name: str) -> torch.Tensor:
    """Our parameter (or the slice of a merged one) that holds checkpoint tensor `name`."""
    for part, merged, shard in ((".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"),
                                (".v_proj.", ".qkv_proj.", "v"), (".gate_proj.", ".gate_up_proj.", 0),
                                (".up_proj.", ".gate_up_proj.", 1)):
        if part in name:
            module_name, param_name = name.replace(part, merged).rsplit(".", 1)
            layer = model.get_submodule(module_name)
            offset, size = layer.shards[shard][:2]
            return getattr(layer, param_name).narrow(0, offset, size)
    return model.get_parameter(name)


@pytest.mark.parametrize("arch, tp", [("llama_kv4", 2), ("llama_kv4", 4), ("qwen2_kv2_tied", 4)])
def test_each_rank_reads_and_keeps_only_its_slices(checkpoints, fake_rank, monkeypatch, arch, tp):
    path = checkpoints[arch]
    num_kv_heads = json.loads((Path(path) / "config.json").read_text())["num_key_value_heads"]
    with safe_open(safetensors_files(path)[0], framework="pt") as f:
        full = {name: f.get_tensor(name) for name in f.keys()}
    reads: list[int] = []
    real_narrow = SafetensorsSlice.narrow

    def counting_narrow(self, dim, start, length):
        out = real_narrow(self, dim, start, length)
        reads.append(out.numel())
        return out

    monkeypatch.setattr(SafetensorsSlice, "narrow", counting_narrow)
    backend = get_attention_backend("torch", torch.device("cpu"))
    per = -(-VOCAB // tp)
    for rank in range(tp):
        fake_rank(rank, tp)
        reads.clear()
        model = load_model(path, torch.float32, "cpu", backend)
        for name, tensor in full.items():
            assert torch.equal(_resident(model, name), _expected_local(name, tensor, rank, tp, num_kv_heads)), \
                (name, rank)
        resident = sum(p.numel() for _, p in model.named_parameters())  # a tied table counts once
        tables = [p for n, p in model.named_parameters() if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
        padding = sum((per - max(0, min(per, VOCAB - rank * per))) * p.shape[1] for p in tables)
        # Every element read is kept and nothing else was read: no rank materializes a full tensor
        # of which it keeps a slice.
        assert sum(reads) == resident - padding


def test_single_rank_has_no_process_group():
    import torch.distributed as dist
    from gpu_workers.distributed import get_tp_group, init_distributed
    from ipc.config import ParallelConfig
    group = init_distributed(ParallelConfig(1), 0, "cpu", "/nonexistent")
    assert group.world_size == 1 and group.group is None and get_tp_group() is group
    assert not dist.is_initialized()
    x = torch.randn(3, 5)
    assert group.all_reduce(x) is x and group.all_gather(x) is x


class _RecordingGroup(TPGroup):
    """A fake rank of 2 whose collectives pass this rank's values through, recording the staging
    slot of each fused all-reduce + RMSNorm the model asks for (and declining it: reduce, then norm)."""

    def __init__(self, calls: list):
        super().__init__(0, 2)
        object.__setattr__(self, "calls", calls)
        object.__setattr__(self, "prefetches", [])
        object.__setattr__(self, "reduce_asks", [])

    def all_reduce(self, x):
        return x

    def matmul_reduce(self, rows, hidden, x, slot):
        self.reduce_asks.append(slot)
        return None

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, slot=None, prefetch=None, pushed=False):
        assert not pushed, "no symmetric buffers here: nothing can have pushed"
        self.calls.append(slot)
        self.prefetches.append(prefetch)
        return None


@pytest.mark.parametrize("attention_bias, expected", [(False, [0, 1, 0, 1]), (True, [None, None])])
def test_fused_reductions_never_reuse_a_one_barrier_slot_back_to_back(tmp_path, monkeypatch, attention_bias, expected):
    """Slots 0 and 1 skip the fused kernel's second barrier only if no two consecutive calls share one,
    within a forward pass and across passes (kernels/all_reduce_rms_norm.py). With an o_proj bias, its
    sum is not deferred: the MLP's reductions alone would repeat a slot, so they take the safe one."""
    from gpu_workers.models.layers import Attention

    path = make_tiny_checkpoint("llama", tmp_path / "m", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, num_hidden_layers=2, vocab_size=300, attention_bias=attention_bias)
    calls: list = []
    group = _RecordingGroup(calls)
    previous = set_tp_group(group)
    try:
        model = load_model(path, torch.float32, "cpu", get_attention_backend("torch", torch.device("cpu")))
    finally:
        set_tp_group(previous)
    monkeypatch.setattr(Attention, "forward",
                        lambda self, positions, h, kv_cache, meta, residual=None: self.o_proj(h[:, :32].clone(), residual))
    ids = torch.tensor([1, 5, 7])
    for _ in range(2):  # two forward passes back to back
        model(ids, torch.arange(3), [None, None], None)
    assert calls == expected * 2
    # o_proj and down_proj, handed the residual, ask to reduce their rows in the same slots (declined here)
    assert group.reduce_asks == expected * 2
    # each fused reduction prefetches the weight of the matmul right after it: the MLP's gate_up after
    # attention, the next layer's qkv after an MLP, nothing after the last layer (the LM head runs later)
    first, second = model.model.layers
    after_mlp = [second.self_attn.qkv_proj.weight, None]
    per_pass = after_mlp if attention_bias else [first.mlp.gate_up_proj.weight, after_mlp[0],
                                                 second.mlp.gate_up_proj.weight, None]
    assert [id(w) for w in group.prefetches] == [id(w) for w in per_pass * 2]
    # a matmul that may push its partial sums pushes into the slot of the reduction right after it
    assert [(layer.self_attn.o_proj.push_slot, layer.mlp.down_proj.push_slot) for layer in model.model.layers] == \
        [(None, None) if attention_bias else (0, 1)] * 2


@pytest.mark.parametrize("vocab, tp", [(VOCAB, 2), (VOCAB, 4), (6, 4)])  # 6 rows over 4 ranks: one holds padding only
def test_greedy_tokens_gather_each_ranks_best_and_equal_the_full_argmax(fake_rank, vocab, tp):
    """Ranks' keys of their best (logit, token id), maxed across ranks, give exactly the argmax of the
    gathered logits, ties included (the lowest id wins, as torch.argmax's first maximum)."""
    from gpu_workers.models.parallel_layers import ParallelLMHead, tokens_from_keys

    torch.manual_seed(0)
    full = torch.randn(vocab, 16)
    full[3] = full[vocab - 1] = full[1]  # rows 1, 3 and the last tie for the hidden states aligned with row 1
    hidden = torch.randn(5, 16)
    hidden[2] = full[1] * 10  # row 2's best logit is shared by tokens 1, 3 and vocab - 1
    per = -(-vocab // tp)
    heads = []
    for rank in range(tp):
        fake_rank(rank, tp)
        head = ParallelLMHead(vocab, 16)
        head.weight.data.zero_()
        own = max(0, min(per, vocab - rank * per))
        head.weight.data[:own] = full[rank * per:rank * per + own]
        heads.append(head)
    expected = (hidden @ full.T).argmax(dim=-1)
    got = tokens_from_keys(torch.stack([h.local_keys(hidden) for h in heads]).amax(0))  # the all-reduce's max
    assert torch.equal(got, expected)
    assert got[2] == 1
