"""Test helpers: tiny random checkpoints built offline, and AttentionMetadata from per-request numbers.

    path = make_tiny_checkpoint("qwen3", tmp_path / "qwen3", tie_word_embeddings=True)
    meta = build_metadata([(num_computed, num_new, block_ids), ...], block_size=4)

A checkpoint directory is complete and servable: config.json, generation_config.json,
model.safetensors (float32) and a byte-level BPE tokenizer (round-trips any text) whose vocabulary
size equals the model's vocab_size.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from gpu_workers.attention.base import AttentionMetadata

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! This is a tiny tokenizer for testing the inference engine.",
    "Paged attention stores the key and value cache in fixed-size blocks.",
    "Once upon a time, there was a small model that liked to generate text.",
    "What is the capital of France? The capital of France is Paris.",
    "1 2 3 4 5 6 7 8 9 10, numbers and punctuation: ; ' \" ( ) [ ] { } - _ + = ? !",
    "system user assistant You are a helpful assistant.",
]

_ARCH_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE trained in memory, padded with unused added tokens to exactly vocab_size.
    Ids: <s>=0, </s>=1, <pad>=2. Encoding prepends <s>, like Llama tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (needs >= 259)")
    tok.add_tokens([f"<|unused_{i}|>" for i in range(vocab_size - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def make_tiny_checkpoint(arch: str, path, seed: int = 0, **overrides) -> str:
    """Saves a small random float32 model of `arch` ("llama", "qwen2", "qwen3") plus a tokenizer to
    `path`; `overrides` go to the HF config (e.g. tie_word_embeddings=True, rope_scaling={...})."""
    import transformers

    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"arch {arch!r} not in {sorted(_ARCH_CONFIGS)}")
    config_name, model_name = _ARCH_CONFIGS[arch]
    fields = dict(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        # Larger than the usual 0.02 so logits are peaked and greedy choices are not near-ties.
        initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    if arch == "qwen3":
        fields["head_dim"] = 32  # explicit and != hidden_size // num_heads, as in real Qwen3
    fields.update(overrides)
    config = getattr(transformers, config_name)(**fields)
    config.architectures = [model_name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float()
    _perturb_norms_and_biases(model)
    path = os.fspath(path)
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.save_pretrained(path)
    make_tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return path


@torch.no_grad()
def _perturb_norms_and_biases(model) -> None:
    # HF initializes norm scales to 1 and biases to 0, which would hide a misplaced norm or bias.
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.add_(0.1 * torch.randn_like(param))
        elif name.endswith(".bias"):
            param.copy_(0.1 * torch.randn_like(param))


def build_metadata(
    seqs: Sequence[tuple[int, int, Sequence[int]]], block_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """AttentionMetadata for requests given as (num_computed, num_new, block_ids): the step's
    num_new tokens sit at positions num_computed.. of the request, whose context is stored in
    block_ids (which must cover num_computed + num_new tokens)."""
    query_start_loc = [0]
    seq_lens, slots = [], []
    for num_computed, num_new, block_ids in seqs:
        seq_len = num_computed + num_new
        if len(block_ids) * block_size < seq_len:
            raise ValueError(f"{len(block_ids)} blocks of {block_size} cannot hold {seq_len} tokens")
        slots += [block_ids[t // block_size] * block_size + t % block_size for t in range(num_computed, seq_len)]
        query_start_loc.append(query_start_loc[-1] + num_new)
        seq_lens.append(seq_len)
    max_blocks = max(len(b) for _, _, b in seqs)
    tables = [list(b) + [0] * (max_blocks - len(b)) for _, _, b in seqs]
    q_lens = [n for _, n, _ in seqs]
    mixed = max(q_lens) > 1 and min(q_lens) == 1  # as prepare_inputs: each kind's indices

    def ids(keep):
        return torch.tensor([i for i, n in enumerate(q_lens) if keep(n)], dtype=torch.int32, device=device)

    return AttentionMetadata(
        num_seqs=len(seqs),
        num_tokens=query_start_loc[-1],
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
        is_decode_only=all(n == 1 for n in q_lens),
        decode_seq_ids=ids(lambda n: n == 1) if mixed else None,
        prefill_seq_ids=ids(lambda n: n > 1) if mixed else None,
    )


def positions_of(seqs: Sequence[tuple[int, int, Sequence[int]]], device: torch.device | str = "cpu") -> torch.Tensor:
    """[num_tokens] int64 positions of the step's tokens, for the same (num_computed, num_new, block_ids)."""
    pos = [t for c, n, _ in seqs for t in range(c, c + n)]
    return torch.tensor(pos, dtype=torch.int64, device=device)
