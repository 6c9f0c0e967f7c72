"""TritonAttentionBackend.forward over several engine steps (chunked prefill, mixed batch, decodes) against
dense causal attention over each request's whole history."""


import pytest
import torch


from gpu_workers.attention.base import AttentionMetadata  # noqa: E402
from gpu_workers.attention.triton_backend import TritonAttentionBackend  # noqa: E402

from tests.triton_env import DEVICE  # noqa: E402
BLOCK_SIZE, NUM_BLOCKS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 96, 8, 2, 16


def _meta(steps, block_tables, split_mixed=True):
    """steps: per request (start, end) positions computed this step; a request with end == 0 is absent.
    split_mixed: a mixed batch lists its decodes and prefills (as prepare_inputs does), so the backend
    runs each kind in its own kernel; False sends the whole batch through the prefill kernel."""
    rows = [(i, s, e) for i, (s, e) in enumerate(steps) if e > 0]
    slots = [block_tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for i, s, e in rows for p in range(s, e)]
    qsl = [0]
    for _, s, e in rows:
        qsl.append(qsl[-1] + e - s)
    seq_lens = [e for _, _, e in rows]
    table = torch.tensor([block_tables[i] for i, _, _ in rows], dtype=torch.int32, device=DEVICE)
    q_lens = [e - s for _, s, e in rows]
    mixed = split_mixed and max(q_lens) > 1 and min(q_lens) == 1

    def ids(keep):
        return torch.tensor([j for j, n in enumerate(q_lens) if keep(n)], dtype=torch.int32, device=DEVICE)

    return AttentionMetadata(
        num_seqs=len(rows), num_tokens=qsl[-1], max_query_len=max(e - s for _, s, e in rows),
        max_seq_len=max(seq_lens), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=table,
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, is_decode_only=all(e - s == 1 for _, s, e in rows),
        decode_seq_ids=ids(lambda n: n == 1) if mixed else None,
        prefill_seq_ids=ids(lambda n: n > 1) if mixed else None)


def _dense_causal(q, k, v, scale):
    """q [n, num_heads, d], k/v [n, num_kv_heads, d]: plain causal attention over one whole request."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    n = q.shape[0]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("split_mixed", [True, False], ids=["mixed-split", "mixed-in-prefill-kernel"])
def test_backend_matches_dense_attention_over_steps(split_mixed):
    lengths = [262, 11, 6, 40]
    q = [torch.randn(n, NUM_HEADS, HEAD_DIM, device=DEVICE) for n in lengths]
    k = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, device=DEVICE) for n in lengths]
    v = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, device=DEVICE) for n in lengths]
    ids = torch.randperm(NUM_BLOCKS).tolist()  # shuffled, non-contiguous blocks; tables padded with 0
    block_tables = [ids[5:71] + [0] * 4, ids[0:3] + [0] * 67, ids[3:5] + [0] * 68, ids[71:81] + [0] * 60]
    k_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)  # noise, not zeros
    v_cache = torch.randn_like(k_cache)
    refs = [_dense_causal(q[i], k[i], v[i], HEAD_DIM ** -0.5) for i in range(len(lengths))]
    backend = TritonAttentionBackend()
    assert backend.name == "triton"

    steps = [
        [(0, 200), (0, 5), (0, 0), (0, 39)],  # prefills: a first chunk, whole prompts
        # mixed: the rest of a chunk, a decode, a new prompt, a decode (decodes at rows 1 and 3)
        [(200, 261), (5, 6), (0, 6), (39, 40)],
        [(261, 262), (6, 7), (0, 0), (0, 0)],  # decode only; 262 tokens of context: split-KV
        [(0, 0), (7, 11), (0, 0), (0, 0)],  # one request alone, a chunk of 4 over 7 cached tokens
    ]
    for step in steps:
        meta = _meta(step, block_tables, split_mixed)
        live = [(i, s, e) for i, (s, e) in enumerate(step) if e > 0]
        out = backend.forward(
            torch.cat([q[i][s:e] for i, s, e in live]), torch.cat([k[i][s:e] for i, s, e in live]),
            torch.cat([v[i][s:e] for i, s, e in live]), k_cache, v_cache, meta, HEAD_DIM ** -0.5)
        ref = torch.cat([refs[i][s:e] for i, s, e in live])
        assert out.shape == (meta.num_tokens, NUM_HEADS, HEAD_DIM)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4, step


def test_backend_rejects_decode_meta_with_several_tokens_per_sequence():
    block_tables = [[3, 1], [0, 2]]
    meta = _meta([(0, 2), (0, 1)], block_tables)
    meta.is_decode_only = True  # wrong: request 0 has two query tokens
    k_cache = torch.randn(4, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    kv = torch.randn(3, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    with pytest.raises(ValueError, match="one token per sequence"):
        TritonAttentionBackend().forward(torch.randn(3, NUM_HEADS, HEAD_DIM, device=DEVICE), kv, kv,
                                         k_cache, torch.randn_like(k_cache), meta, 0.25)


@pytest.mark.parametrize("rope_norm", [None, False, True])
def test_warm_up_compiles_every_decode_variant_a_step_can_pick(monkeypatch, rope_norm):
    """Each Triton variant compiles on first use (about a second): the start-up warm-up must launch every
    decode-kernel variant that later steps pick (split or not, tile size, alone or beside prefills, with
    the step's RoPE inside and the model's q/k norm or not), for batches from 1 to 600 sequences and
    contexts from 1 token to a 4096-token CUDA-graph cap."""
    import importlib

    mod = importlib.import_module("kernels.decode_attention")  # the package exports a function of that name

    launches: list[tuple] = []

    class Recorder:  # records each launch's compile-time choices instead of running it
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(tuple(sorted((k, v) for k, v in kwargs.items() if k.isupper() or k.startswith("num_"))))
            return launch

    monkeypatch.setattr(mod, "_decode_split_kernel", Recorder())
    kv_heads, heads, head_dim, device = 8, 32, 128, torch.device(DEVICE)
    TritonAttentionBackend().warm_up(heads, kv_heads, head_dim, torch.float32, device, max_num_seqs=600,
                                     rope_norm=rope_norm)
    warmed, launches[:] = set(launches), []
    cache = torch.zeros(2, 16, kv_heads, head_dim, device=DEVICE)
    for num_seqs in (1, 3, 8, 16, 33, 34, 64, 256, 600):
        for max_seq_len in (1, 200, 4096):
            q = torch.zeros(num_seqs + 2, heads, head_dim, device=DEVICE)
            seq_lens = torch.full((num_seqs + 1,), max_seq_len, dtype=torch.int32, device=DEVICE)
            table = torch.zeros(num_seqs + 1, 256, dtype=torch.int32, device=DEVICE)
            mod.decode_attention(q[:num_seqs], cache, cache, table[:num_seqs], seq_lens[:num_seqs], max_seq_len, 1.0)
            if rope_norm is not None and mod.rope_inside_pays(num_seqs, kv_heads, device):  # attend_new_tokens
                k = torch.zeros(num_seqs, kv_heads, head_dim, device=DEVICE)
                w = torch.ones(head_dim, device=DEVICE) if rope_norm else None
                rope_table = torch.zeros(4096, head_dim // 2, device=DEVICE)
                mod.decode_attention(q[:num_seqs], cache, cache, table[:num_seqs], seq_lens[:num_seqs], max_seq_len, 1.0,
                                     rope=mod.NewTokens(k, k, seq_lens[:num_seqs].long() - 1, rope_table, rope_table,
                                                        torch.full((num_seqs,), -1, device=DEVICE), w, w))
            qsl = torch.arange(num_seqs + 2, dtype=torch.int32, device=DEVICE)  # + one 2-token prefill
            mod.decode_attention(q, cache, cache, table, seq_lens, max_seq_len, 1.0, query_start_loc=qsl,
                                 seq_ids=torch.arange(num_seqs, dtype=torch.int32, device=DEVICE))
    assert set(launches) <= warmed, set(launches) - warmed
