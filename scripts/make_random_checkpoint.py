"""Write a random-weight checkpoint shaped like a real model, for runs that must share weights with transformers.

    python scripts/make_random_checkpoint.py --arch llama-3.1-8b --out /tmp/llama8b
    python scripts/make_random_checkpoint.py --arch qwen3-0.6b --out /tmp/qwen3 --config-only   # for load_format dummy

The directory holds what a hub snapshot holds: config.json (the real architecture's shapes, RoPE settings and
tying, in the hub's own field names), generation_config.json, *.safetensors (one file, or ~4 GB shards with
model.safetensors.index.json; HF parameter names) and a tokenizer whose vocabulary is exactly vocab_size.

Tensors are drawn one at a time (on the GPU when there is one) and streamed straight into the safetensors
files, so peak host memory is the largest tensor (1 GiB for Llama-3.1-8B's embedding), not the model.
The tokenizer is a word-level one over made-up token strings ("t0 t1 ..."), with the real model's special
tokens at their real ids: fast to build and load at 151k entries, and enough for token-id benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time

# The hub's config.json values for each architecture (shapes, RoPE, tying, special token ids).
_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA_COMMON = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                     attention_bias=False, attention_dropout=0.0, mlp_bias=False, pretraining_tp=1,
                     initializer_range=0.02, use_cache=True, torch_dtype="bfloat16")
ARCHS: dict[str, dict] = {
    "llama-3.1-8b": dict(_LLAMA_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=_LLAMA31_ROPE, tie_word_embeddings=False, bos_token_id=128000,
                         eos_token_id=128001),
    "llama-3.1-70b": dict(_LLAMA_COMMON, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                          max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                          rope_scaling=_LLAMA31_ROPE, tie_word_embeddings=False, bos_token_id=128000,
                          eos_token_id=128001),
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151645, hidden_act="silu", attention_bias=False,
                       attention_dropout=0.0, initializer_range=0.02, max_window_layers=28,
                       sliding_window=None, use_sliding_window=False, use_cache=True, torch_dtype="bfloat16"),
    "smollm2-135m": dict(_LLAMA_COMMON, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         rope_scaling=None, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, initializer_range=0.041666666666666664),
}

# Special tokens at their real ids: (bos, eos, pad, {name: id}, extra eos ids of generation_config.json).
_LLAMA31_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                     {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                      "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
                      "<|eot_id|>": 128009}, [128001, 128008, 128009])
_CHATML = {"<|im_start|>", "<|im_end|>"}
SPECIALS = {
    "llama-3.1-8b": _LLAMA31_SPECIALS,
    "llama-3.1-70b": _LLAMA31_SPECIALS,
    "qwen3-0.6b": ("<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                   {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}, [151645, 151643]),
    "smollm2-135m": ("<|im_start|>", "<|im_end|>", "<|im_end|>",
                     {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, [2]),
}
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
UNK = "<unk>"

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def make_config(arch: str, num_layers: int | None = None, dtype: str = "bfloat16") -> dict:
    """The hub config.json of `arch`, optionally with fewer layers (max_window_layers follows)."""
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {arch!r}")
    config = json.loads(json.dumps(ARCHS[arch]))
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {num_layers}")
        config["num_hidden_layers"] = num_layers
        if "max_window_layers" in config:
            config["max_window_layers"] = num_layers
    config["torch_dtype"] = dtype
    return config


def parameter_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every parameter a checkpoint of this Llama / Qwen2 / Qwen3 config stores, in order."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    qk_norm = config.get("model_type") == "qwen3"
    bias = config.get("attention_bias", False) or config.get("model_type") == "qwen2"
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden))]
        if bias:
            shapes += [(p + "self_attn.q_proj.bias", (heads * head_dim,)),
                       (p + "self_attn.k_proj.bias", (kv_heads * head_dim,)),
                       (p + "self_attn.v_proj.bias", (kv_heads * head_dim,))]
        if qk_norm:
            shapes += [(p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,))]
        shapes += [(p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes.append(("model.norm.weight", (hidden,)))
    if not config.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def weight_bytes(config: dict, dtype: str | None = None) -> int:
    """Bytes of all parameters (tied embeddings counted once) in `dtype` (default: the config's)."""
    size = _DTYPE_BYTES[dtype or config.get("torch_dtype") or "bfloat16"]
    total = 0
    for _, shape in parameter_shapes(config):
        n = 1
        for d in shape:
            n *= d
        total += n * size
    return total


def _plan_shards(shapes, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current]


def _random_tensor(name: str, shape, index: int, args, torch_dtype, device):
    import torch

    gen = torch.Generator(device=device).manual_seed(args.seed * 100003 + index)
    if name.endswith("norm.weight"):  # near 1, not exactly: a misplaced norm still changes the output
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    elif name.endswith(".bias"):
        t = 0.1 * torch.randn(shape, generator=gen, device=device)
    else:
        t = args.init_std * torch.randn(shape, generator=gen, device=device)
    return t.to(torch_dtype).cpu().contiguous()


def _write_safetensors(path: str, entries, args, torch_dtype, device, first_index: int) -> None:
    """Streams one safetensors file: the header (computed from the shapes) then each tensor's bytes."""
    import torch

    itemsize = _DTYPE_BYTES[args.dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": _ST_DTYPE[args.dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, shape) in enumerate(entries):
            t = _random_tensor(name, shape, first_index + i, args, torch_dtype, device)
            f.write(t.view(-1).view(torch.uint8).numpy().data)  # raw bytes; numpy has no bfloat16


def write_weights(config: dict, out: str, args) -> list[str]:
    import torch

    torch_dtype = getattr(torch, args.dtype)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    shards = _plan_shards(parameter_shapes(config), _DTYPE_BYTES[args.dtype], int(args.shard_size_gb * 1e9))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    index = 0
    for fname, entries in zip(names, shards):
        _write_safetensors(os.path.join(out, fname), entries, args, torch_dtype, device, index)
        index += len(entries)
    if len(shards) > 1:
        weight_map = {name: fname for fname, entries in zip(names, shards) for name, _ in entries}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": weight_bytes(config, args.dtype)}, "weight_map": weight_map}, f, indent=2)
    return names


def make_tokenizer(arch: str, vocab_size: int):
    """A word-level PreTrainedTokenizerFast of exactly vocab_size entries with `arch`'s special tokens at
    their real ids; every other id is the word "t<id>", and unknown words map to "<unk>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, specials, _ = SPECIALS[arch]
    vocab = {f"t{i}": i for i in range(vocab_size)}
    taken = set(specials.values())
    unk_id = max(i for i in range(vocab_size) if i not in taken)
    for name, i in list(specials.items()) + [(UNK, unk_id)]:
        del vocab[f"t{i}"]
        vocab[name] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = _LLAMA3_TEMPLATE if arch.startswith("llama-3") else _CHATML_TEMPLATE
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=UNK, chat_template=template,
                                   additional_special_tokens=sorted(set(specials) - {bos, eos, pad}))
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def generation_config(arch: str, config: dict) -> dict:
    _, _, pad, specials, eos_ids = SPECIALS[arch]
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0],
            "pad_token_id": specials[pad]}


def write_checkpoint(args) -> None:
    config = make_config(args.arch, args.num_layers, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump(generation_config(args.arch, config), f, indent=2)
    make_tokenizer(args.arch, config["vocab_size"]).save_pretrained(args.out)
    size_gb = weight_bytes(config, args.dtype) / 1e9
    if args.config_only:
        print(f"wrote config + tokenizer of {args.arch} ({size_gb:.2f} GB of {args.dtype} weights if loaded) to {args.out}")
        return
    start = time.perf_counter()
    files = write_weights(config, args.out, args)
    print(f"wrote {args.arch} ({config['num_hidden_layers']} layers, {size_gb:.2f} GB of {args.dtype}) "
          f"in {len(files)} file(s) to {args.out} in {time.perf_counter() - start:.1f} s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--arch", required=True, choices=sorted(ARCHS), help="real architecture whose shapes to copy")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPE_BYTES), help="weight dtype on disk")
    p.add_argument("--num-layers", type=int, default=None, help="fewer decoder layers than the real model")
    p.add_argument("--config-only", action="store_true",
                   help="write config.json, generation_config.json and the tokenizer only (for --load-format dummy)")
    p.add_argument("--init-std", type=float, default=0.02,
                   help="std of the random matrices (larger gives more peaked logits: fewer near-ties in checks)")
    p.add_argument("--seed", type=int, default=0, help="random seed (each tensor gets its own stream)")
    p.add_argument("--device", default="auto", help="where tensors are drawn: auto (cuda if available), cpu, cuda")
    p.add_argument("--shard-size-gb", type=float, default=4.0, help="largest safetensors file, in GB")
    return p.parse_args(argv)


if __name__ == "__main__":
    write_checkpoint(parse_args())
