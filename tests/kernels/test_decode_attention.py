"""decode_attention against a dense float64 reference, over shuffled paged caches, with and without splits."""

import os

import pytest
import torch


from kernels import choose_num_splits, decode_attention  # noqa: E402

from tests.triton_env import DEVICE, paged_cache  # noqa: E402
# triton 3.6's interpreter computes bf16 tl.dot on the raw bits (garbage); bf16 is checked on the GPU only.
BF16_ON_GPU = pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="bf16 tl.dot is wrong in the triton 3.6 interpreter"))


def _reference_decode(query, dense, scale):
    """query [num_seqs, num_heads, head_dim]; the last context position attends to all of its context."""
    out = []
    for i, (k, v) in enumerate(dense):
        group = query.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)  # [n, num_heads, head_dim]
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[i].double(), k) * scale
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def _rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2)])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_matches_reference(block_size, num_heads, num_kv_heads, head_dim, num_splits):
    # Two splits of 256 tokens: the 300-token context loops twice in split 0, the 37-token one leaves
    # split 1 empty.
    seq_lens = [1, 37, 150, 300]
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, block_size, num_kv_heads, head_dim,
                                                         torch.float32)
    # The query as a strided view into a fused qkv projection.
    qkv = torch.randn(len(seq_lens), num_heads + 2 * num_kv_heads, head_dim, device=DEVICE)
    query = qkv[:, :num_heads]
    scale = head_dim ** -0.5
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)

    out = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, max(seq_lens), scale,
                           num_splits=num_splits)

    assert _rel_err(out, _reference_decode(query, dense, scale)) < 1e-4


@pytest.mark.parametrize("dtype,tol", [BF16_ON_GPU, (torch.float16, 5e-3)])
def test_decode_half_precision_and_odd_head_dim(dtype, tol):
    seq_lens = [9, 70]
    head_dim, num_heads, num_kv_heads = 80, 6, 2  # head_dim padded to 128 by masks, group of 3
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(seq_lens), num_heads, head_dim, device=DEVICE).to(dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)

    out = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, max(seq_lens), 0.1, num_splits=2)

    assert out.dtype == dtype
    assert _rel_err(out, _reference_decode(query, dense, 0.1)) < tol


def test_small_batch_long_context_is_split():
    device = torch.device(DEVICE)  # the CPU counts as an H200's 132 SMs
    assert choose_num_splits(1, 8, 4096, device) > 1
    assert choose_num_splits(1, 8, 100, device) == 1  # too short to be worth a reduce
    assert choose_num_splits(4096, 8, 4096, device) == 1  # the batch alone fills the GPU
    # a batch filling a quarter of the SMs or more splits only long contexts (a split's combine costs more
    # than it saves on 256 tokens)
    assert choose_num_splits(16, 4, 256, device) == 1
    assert choose_num_splits(16, 4, 4096, device) > 1


def test_decode_default_splits_long_context():
    seq_lens = [700]  # one sequence, 8 KV heads: the default picks several splits
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, 8, 16, torch.float32)
    assert choose_num_splits(1, 8, 700, torch.device(DEVICE)) > 1
    query = torch.randn(1, 8, 16, device=DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)

    out = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, 700, 0.25)

    assert _rel_err(out, _reference_decode(query, dense, 0.25)) < 1e-4


def test_decode_graph_sized_split_cap_with_per_sequence_counts():
    """A CUDA graph launches with max_seq_len = max_model_len: each sequence then takes its own split
    count from its real length (1 token: one split, written directly; 700: several), and a group of 6
    query heads per KV head is combined in one padded set of loads."""
    seq_lens = [1, 5, 300, 700]
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, 2, 16, torch.float32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # the second launch finds every arrival counter reset
        query = torch.randn(len(seq_lens), 12, 16, device=DEVICE)
        out = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, 4096, 0.3)
        assert _rel_err(out, _reference_decode(query, dense, 0.3)) < 1e-4


def test_short_contexts_launch_no_split_programs(monkeypatch):
    """A batch that fills a quarter of the SMs or more splits only contexts over 1024 tokens: given the
    real longest context (eager steps), the launch has no split programs at all and no split-capable
    variant; given max_model_len (a CUDA graph) it keeps them. Same outputs, bit for bit."""
    import importlib

    mod = importlib.import_module("kernels.decode_attention")  # the package exports a function of that name
    launches = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs["MAY_SPLIT"]))
                return kernel[grid](*args, **kwargs)
            return launch

    kernel = mod._decode_split_kernel
    monkeypatch.setattr(mod, "_decode_split_kernel", Spy())
    seq_lens = [150, 300, 40, 9, 200, 260, 33, 129]  # 8 sequences x 8 KV heads = 64 programs: busy, under the SMs
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, 8, 16, torch.float32)
    query = torch.randn(len(seq_lens), 16, 16, device=DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    eager = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, max(seq_lens), 0.25)
    graph = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, 4096, 0.25)
    (eager_grid, eager_split), (graph_grid, graph_split) = launches
    assert eager_grid == (8, 8, 1) and not eager_split
    assert graph_grid[2] > 1 and graph_split
    assert torch.equal(eager, graph)
    assert _rel_err(eager, _reference_decode(query, dense, 0.25)) < 1e-4


def test_decode_more_splits_than_one_combine_load():
    """22 splits of 32 tokens: the last split combines them in two passes of its BLOCK_S-wide loads."""
    seq_lens = [700, 64]
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, 2, 16, torch.float32)
    query = torch.randn(len(seq_lens), 4, 16, device=DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, 700, 0.3, num_splits=40,
                           launch_config=(16, 4, 2))
    assert _rel_err(out, _reference_decode(query, dense, 0.3)) < 1e-4


def test_decode_repeated_launches_with_changing_splits():
    """The last split of each (sequence, KV head) combines the others and resets its arrival counter:
    launches with 3, 2, 1 and 3 splits in a row (as consecutive layers and steps do) are all exact."""
    seq_lens = [300, 5, 129]
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, 2, 16, torch.float32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    for num_splits in (3, 2, 1, 3):
        query = torch.randn(len(seq_lens), 4, 16, device=DEVICE)
        out = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, 300, 0.3, num_splits=num_splits)
        assert _rel_err(out, _reference_decode(query, dense, 0.3)) < 1e-4, num_splits


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_of_selected_sequences_in_a_mixed_batch(num_splits):
    """seq_ids: only sequences 0 and 2 (the decodes of a mixed batch) are computed, each from its row
    query_start_loc[seq]; the prefill rows of `out` are left untouched."""
    seq_lens = [300, 40, 77]  # request 1 is a 4-token prefill chunk: rows 1..4
    q_lens = [1, 4, 1]
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, 2, 16, torch.float32)
    query = torch.randn(sum(q_lens), 8, 16, device=DEVICE)
    qsl = torch.tensor([0, 1, 5, 6], dtype=torch.int32, device=DEVICE)
    seq_ids = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(query, 7.0)
    decode_attention(query, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                     300, 0.25, out=out, num_splits=num_splits, seq_ids=seq_ids, query_start_loc=qsl)
    ref = _reference_decode(query[[0, 5]], [dense[0], dense[2]], 0.25)
    assert _rel_err(out[[0, 5]], ref) < 1e-4
    assert torch.all(out[1:5] == 7.0)  # the prefill's rows: not written


def test_decode_rejects_bad_inputs():
    k_cache, v_cache, block_tables, _ = paged_cache([5, 9], 4, 2, 16, torch.float32)
    seq_lens = torch.tensor([5, 9], dtype=torch.int32, device=DEVICE)
    query = torch.randn(2, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(query.half(), k_cache, v_cache, block_tables, seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="last dim"):
        decode_attention(query.transpose(0, 2).contiguous().transpose(0, 2), k_cache, v_cache,
                         block_tables, seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="KV heads"):
        decode_attention(torch.randn(2, 3, 16, device=DEVICE), k_cache, v_cache, block_tables, seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="rows"):
        decode_attention(query, k_cache, v_cache, block_tables[:1], seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="k_cache"):
        decode_attention(query, k_cache, v_cache[:, :, :1], block_tables, seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(query, k_cache, v_cache, block_tables, seq_lens.float(), 9, 1.0)
    with pytest.raises(ValueError, match="come together"):
        decode_attention(query, k_cache, v_cache, block_tables, seq_lens, 9, 1.0,
                         seq_ids=torch.tensor([1], dtype=torch.int32, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_large_shapes_gpu(dtype, tol, head_dim):
    seq_lens = [1, 17, 1000, 4096, 3333, 64, 2048, 513]
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, 8, head_dim, dtype)
    query = torch.randn(len(seq_lens), 32, head_dim, device=DEVICE).to(dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, max(seq_lens), head_dim ** -0.5)
    assert _rel_err(out, _reference_decode(query, dense, head_dim ** -0.5)) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_seqs", [1, 64])
def test_prefetching_the_next_weight_changes_no_output_gpu(num_seqs):
    """A decode step's launch prefetches o_proj's weight into L2 (kernels/prefetch.py): a hint, so the
    outputs are bitwise those of a launch without it."""
    seq_lens = [(97 * i) % 400 + 1 for i in range(num_seqs)]
    k_cache, v_cache, block_tables, _ = paged_cache(seq_lens, 16, 4, 128, torch.bfloat16)
    query = torch.randn(num_seqs, 16, 128, device=DEVICE).bfloat16()
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    o_proj = torch.randn(4096, 2048, device=DEVICE).bfloat16()
    plain = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, 4096, 0.08)
    with_prefetch = decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, 4096, 0.08,
                                     prefetch_weight=o_proj)
    assert torch.equal(plain, with_prefetch)
