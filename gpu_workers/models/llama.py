"""Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM2) on the paged attention backend.

Qwen2/Qwen3 reuse this body with different attention options (see qwen.py). Only the transformers
config object is used; the forward pass is ours.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from gpu_workers.attention.base import AttentionBackend, AttentionMetadata
from gpu_workers.distributed import get_tp_group
from gpu_workers.models.layers import Attention, RMSNorm, RotaryEmbedding, SiluAndMulMLP, rope_parameters
from gpu_workers.models.parallel_layers import (ParallelLMHead, Reduced, VocabParallelEmbedding,
                                                check_tensor_parallel, default_weight_loader)

logger = logging.getLogger(__name__)

# (our merged parameter, HF checkpoint name, shard id inside the merged parameter)
STACKED_PARAMS: tuple[tuple[str, str, object], ...] = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x)), with the residual add fused into the norms
    (and, with tensor parallelism, the all-reduce of attn's and mlp's partial sums too)."""

    def __init__(self, hf_config, rotary_emb: RotaryEmbedding, attn_backend: AttentionBackend,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        hidden = hf_config.hidden_size
        num_heads = hf_config.num_attention_heads
        num_kv_heads = num_kv_heads_of(hf_config)
        eps = hf_config.rms_norm_eps
        mlp_bias = getattr(hf_config, "mlp_bias", False)
        # With tensor parallelism, o_proj and down_proj (when they have no bias) leave their partial
        # sums to the RMSNorm after them, which sums them over the ranks fused with its residual add.
        tp_size = get_tp_group().world_size
        self.attn_partial = tp_size > 1 and not o_bias
        self.mlp_partial = tp_size > 1 and not mlp_bias
        # Fused reductions alternate staging slots (0 after attention, 1 after the MLP: a forward pass
        # ends on 1, the next begins on 0), which saves each a barrier (flag-free: a counter read); with
        # only one of the two partial they could repeat a slot, so they take the any-order one (None).
        both = self.attn_partial and self.mlp_partial
        self.attn_slot, self.mlp_slot = (0, 1) if both else (None, None)
        self.self_attn = Attention(
            hidden, num_heads, num_kv_heads, head_dim_of(hf_config), rotary_emb, attn_backend,
            qkv_bias=qkv_bias, o_bias=o_bias, qk_norm_eps=eps if qk_norm else None,
            reduce_results=not self.attn_partial,
        )
        self.mlp = SiluAndMulMLP(hidden, hf_config.intermediate_size, mlp_bias, reduce_results=not self.mlp_partial)
        self.self_attn.o_proj.push_slot, self.mlp.down_proj.push_slot = self.attn_slot, self.mlp_slot
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions, hidden_states, residual, kv_cache, meta):
        """hidden_states: the previous layer's MLP output: partial sums when mlp_partial (every layer
        alike), or Reduced (its down_proj summed them over the ranks and added the residual itself).
        Returns this layer's MLP output (likewise) and the residual stream."""
        if isinstance(hidden_states, Reduced):
            residual = hidden_states.h
            hidden_states = self.input_layernorm(residual)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual, self.mlp_partial, self.mlp_slot,
                                                           self.self_attn.qkv_proj.weight)
        return self.forward_normed(positions, hidden_states, residual, kv_cache, meta)

    def forward_normed(self, positions, hidden_states, residual, kv_cache, meta):
        """The layer after its input norm: hidden_states is input_layernorm's output (the first
        layer's comes from the embedding, normed with its lookup)."""
        out = self.self_attn(positions, hidden_states, kv_cache, meta, residual if self.attn_partial else None)
        if isinstance(out, Reduced):  # o_proj summed over the ranks and added the residual in its epilogue
            residual = out.h
            hidden_states = self.post_attention_layernorm(residual)
        else:
            hidden_states, residual = self.post_attention_layernorm(out, residual, self.attn_partial, self.attn_slot,
                                                                    self.mlp.gate_up_proj.weight)
        return self.mlp(hidden_states, residual if self.mlp_partial else None), residual


def head_dim_of(hf_config) -> int:
    """Explicit `head_dim` (Qwen3, Mistral Nemo) or hidden_size // num_attention_heads."""
    head_dim = getattr(hf_config, "head_dim", None)
    return head_dim or hf_config.hidden_size // hf_config.num_attention_heads


def num_kv_heads_of(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def check_hf_act(hf_config) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")


class LlamaModel(nn.Module):
    def __init__(self, hf_config, attn_backend: AttentionBackend,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False):
        super().__init__()
        check_hf_act(hf_config)
        check_tensor_parallel(hf_config.num_attention_heads, num_kv_heads_of(hf_config),
                              hf_config.intermediate_size, get_tp_group().world_size)
        theta, scaling = rope_parameters(hf_config)
        self.rotary_emb = RotaryEmbedding(head_dim_of(hf_config), hf_config.max_position_embeddings, theta, scaling)
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, self.rotary_emb, attn_backend, qkv_bias, o_bias, qk_norm)
            for _ in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta):
        first = self.layers[0]
        hidden_states, residual = self.embed_tokens.forward_norm(input_ids, first.input_layernorm,
                                                                 first.self_attn.qkv_proj.weight)
        hidden_states, residual = first.forward_normed(positions, hidden_states, residual, kv_caches[0], meta)
        for layer, kv_cache in zip(self.layers[1:], kv_caches[1:], strict=True):
            hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, meta)
        if isinstance(hidden_states, Reduced):
            return self.norm(hidden_states.h)
        last = self.layers[-1]
        hidden_states, _ = self.norm(hidden_states, residual, last.mlp_partial, last.mlp_slot)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Interface the model runner uses:

        model = LlamaForCausalLM(hf_config, attn_backend)
        hidden = model(input_ids, positions, kv_caches, meta)  # [num_tokens, hidden_size]
        logits = model.compute_logits(hidden)                  # [num_selected, vocab_size], model dtype
        tokens = model.greedy_tokens(hidden)                   # = logits.argmax(-1), no logits gathered
        model.load_weights(weights)                            # iterable of (hf_name, tensor or lazy slice)
    """

    # Attention options the subclasses (Qwen2, Qwen3) override.
    qkv_bias_default = False
    qk_norm = False

    def __init__(self, hf_config, attn_backend: AttentionBackend):
        super().__init__()
        self.config = hf_config
        attention_bias = getattr(hf_config, "attention_bias", self.qkv_bias_default)
        self.model = LlamaModel(
            hf_config, attn_backend, qkv_bias=self.qkv_bias_default or attention_bias,
            o_bias=self.o_bias(hf_config), qk_norm=self.qk_norm,
        )
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.check_sliding_window(hf_config)

    @staticmethod
    def o_bias(hf_config) -> bool:
        return bool(getattr(hf_config, "attention_bias", False))

    @staticmethod
    def check_sliding_window(hf_config) -> None:
        # Mistral v0.1 declares a 4096-token window; full attention is exact below that length.
        window = getattr(hf_config, "sliding_window", None)
        if window and window < hf_config.max_position_embeddings:
            logger.warning("sliding_window=%d is ignored: attention is full-context (exact up to %d tokens)",
                           window, window)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids/positions [num_tokens] int64 -> hidden states [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_selected, hidden_size] -> [num_selected, vocab_size] in the model's dtype, the full
        vocabulary on every tensor-parallel rank. Not upcast here: greedy argmax is the same on the
        model's dtype, and reading [256, 152k] bf16 logits instead of writing and reading a float32 copy
        saved ~0.1 ms of a Qwen3 decode step (H200); the sampler and logprobs upcast themselves."""
        return self.lm_head(hidden_states)

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """compute_logits(hidden_states).argmax(-1) [num_selected] int64, with no gather of the logits
        across tensor-parallel ranks (ParallelLMHead.greedy_tokens)."""
        return self.lm_head.greedy_tokens(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies HF checkpoint tensors into our parameters (q/k/v and gate/up land in their slice of
        the merged weight). Returns the names of our parameters that were fully loaded (a merged
        parameter counts once all its shards arrived), so the loader can report missing ones."""
        params = dict(self.named_parameters())
        shards_seen: dict[str, set] = {}
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name or "rotary_emb.cos_cached" in hf_name:
                continue  # derived buffers some old checkpoints carry; ours are recomputed
            if self.tie_word_embeddings and hf_name == "lm_head.weight":
                continue  # the tied lm_head is embed_tokens
            name, shard_id = _map_name(hf_name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter in {type(self).__name__}")
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
            shards_seen.setdefault(name, set()).add(shard_id)
        loaded = {
            name for name, seen in shards_seen.items()
            if seen == {None} or seen == set(getattr(params[name], "shard_ids", seen))
        }
        if self.tie_word_embeddings and "model.embed_tokens.weight" in loaded:
            loaded.add("lm_head.weight")
        return loaded


def _map_name(hf_name: str) -> tuple[str, object]:
    for merged, part, shard_id in STACKED_PARAMS:
        if part in hf_name:
            return hf_name.replace(part, merged), shard_id
    return hf_name, None
