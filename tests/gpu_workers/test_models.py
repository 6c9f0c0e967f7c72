"""Our Llama / Qwen2 / Qwen3 implementations against transformers on the same tiny checkpoints."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from gpu_workers.attention import get_attention_backend
from gpu_workers.loader import load_model, resolve_model_path
from tests.checkpoints import build_metadata, make_tiny_checkpoint, positions_of

BLOCK_SIZE = 4
NUM_BLOCKS = 48
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {
    "llama": ("llama", {}),
    "llama3_rope_tied": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": True}),
    "llama_linear_rope_bias": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                         "attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
}
PROMPT_LENS = [13, 6, 9]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    path = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(request.param), **overrides)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_model(path, torch.float32, "cpu", get_attention_backend("torch", torch.device("cpu")))
    return path, ref, ours


def new_kv_caches(model):
    cfg = model.config
    num_kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    # Random, not zeros: a read of a slot that was never written shows up as a mismatch.
    return [(torch.randn(shape), torch.randn(shape)) for _ in range(cfg.num_hidden_layers)]


def random_prompts(vocab_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def reference_logits(ref, token_ids):
    return ref(torch.tensor([token_ids])).logits[0].float()  # [len, vocab]


def assert_close(ours, ref):
    err = (ours - ref).abs().max().item()
    assert err < 1e-4 * max(1.0, ref.abs().max().item()), f"max abs diff {err}"


class PagedRunner:
    """Drives our model step by step over a paged cache with shuffled, non-contiguous block ids."""

    def __init__(self, model, num_requests, seed=0):
        self.model = model
        self.kv_caches = new_kv_caches(model)
        free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(free)
        per_request = NUM_BLOCKS // num_requests
        self.block_ids = [free[i * per_request:(i + 1) * per_request] for i in range(num_requests)]

    @torch.no_grad()
    def step(self, chunks):
        """chunks: (request index, num_computed, new token ids). Returns logits per chunk, [n, vocab]."""
        seqs = [(c, len(toks), self.block_ids[i]) for i, c, toks in chunks]
        meta = build_metadata(seqs, BLOCK_SIZE)
        input_ids = torch.tensor([t for _, _, toks in chunks for t in toks], dtype=torch.int64)
        hidden = self.model(input_ids, positions_of(seqs), self.kv_caches, meta)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return logits.split([len(toks) for _, _, toks in chunks])


def test_full_prefill_matches_transformers(checkpoint):
    _, ref, ours = checkpoint
    prompts = random_prompts(ours.config.vocab_size)
    runner = PagedRunner(ours, len(prompts))
    logits = runner.step([(i, 0, p) for i, p in enumerate(prompts)])
    for p, got in zip(prompts, logits):
        assert got.shape == (len(p), ours.config.vocab_size)
        assert_close(got, reference_logits(ref, p))


def test_chunked_prefill_then_decode_matches_transformers(checkpoint):
    _, ref, ours = checkpoint
    prompts = random_prompts(ours.config.vocab_size, seed=1)
    runner = PagedRunner(ours, len(prompts), seed=1)
    # Chunk boundaries per request; request 1 starts decoding while 0 and 2 are still prefilling.
    splits = [[0, 5, 9, 13], [0, 6], [0, 2, 9]]
    seqs = [list(p) for p in prompts]
    computed = [0, 0, 0]
    logits_at = [[] for _ in prompts]  # logits for each position of each request, in order
    for _ in range(3 + 5):
        chunks = []
        for i in range(len(prompts)):
            done_prefill = computed[i] >= len(prompts[i])
            end = computed[i] + 1 if done_prefill else next(s for s in splits[i] if s > computed[i])
            chunks.append((i, computed[i], seqs[i][computed[i]:end]))
        for (i, _, toks), logits in zip(chunks, runner.step(chunks)):
            logits_at[i].append(logits)
            computed[i] += len(toks)
            if computed[i] >= len(prompts[i]):
                seqs[i].append(int(logits[-1].argmax()))  # greedy
    for i, seq in enumerate(seqs):
        assert len(seq) >= len(prompts[i]) + 5
        got = torch.cat(logits_at[i])  # [computed, vocab]
        assert_close(got, reference_logits(ref, seq[:computed[i]]))


def test_unsupported_architecture_names_it(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    backend = get_attention_backend("torch", torch.device("cpu"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(path, torch.float32, "cpu", backend)


def test_missing_model_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model_path(missing)
    with pytest.raises(FileNotFoundError, match="nobody/not-a-cached-model"):
        resolve_model_path("nobody/not-a-cached-model")


def test_dummy_load_from_config_alone(tmp_path):
    src = make_tiny_checkpoint("qwen3", tmp_path / "src")
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    backend = get_attention_backend("torch", torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(cfg_only), torch.float32, "cpu", backend)
    model = load_model(str(cfg_only), torch.float32, "cpu", backend, load_format="dummy")
    assert resolve_model_path(str(cfg_only)) == str(cfg_only)
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(torch.all(p == 1) for p in norms)
    assert 0.01 < model.model.embed_tokens.weight.std().item() < 0.04
    logits = PagedRunner(model, 1).step([(0, 0, [5, 6, 7])])[0]
    assert logits.shape == (3, model.config.vocab_size) and torch.isfinite(logits).all()


def test_bfloat16_load_runs(checkpoint):
    path, ref, _ = checkpoint
    model = load_model(path, torch.bfloat16, "cpu", get_attention_backend("torch", torch.device("cpu")))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    hidden = model(torch.tensor([5, 6, 7, 8]), torch.arange(4), [
        tuple(c.to(torch.bfloat16) for c in kv) for kv in new_kv_caches(model)
    ], build_metadata([(0, 4, list(range(1)))], BLOCK_SIZE))
    logits = model.compute_logits(hidden)
    expected = reference_logits(ref, [5, 6, 7, 8])
    assert logits.dtype == torch.bfloat16  # the model's dtype: the sampler upcasts, argmax needs not
    assert (logits.float() - expected).abs().max() < 0.1 * expected.abs().max()
