"""LLM: the offline API, as in vLLM.

    llm = LLM()                                    # the bundled SmolLM2-135M-Instruct
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, top_p=0.95))
    print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import atexit
import itertools
import time
import weakref
from typing import Any, Sequence

from tqdm.auto import tqdm

from frontend.engine_args import EngineArgs, load_tokenizer
from frontend.engine_client import EngineCoreClient, EngineDeadError
from frontend.output_processor import OutputProcessor
from frontend.outputs import RequestOutput
from ipc.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 num_gpu_blocks_override: int | None = None, enable_prefix_caching: bool = True,
                 attention_backend: str = "auto", seed: int = 0, **kwargs: Any) -> None:
        args = EngineArgs(model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                          block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          num_gpu_blocks_override=num_gpu_blocks_override,
                          enable_prefix_caching=enable_prefix_caching, attention_backend=attention_backend,
                          seed=seed, **kwargs)
        self.model_path = args.resolve_model_path()
        self.tokenizer = load_tokenizer(args.tokenizer or self.model_path)
        self.config = args.create_engine_config(self.model_path, self.tokenizer)
        self.engine = EngineCoreClient(self.config)
        self.max_model_len = self.config.model.max_model_len
        self.vocab_size = self.config.model.vocab_size
        self._ids = itertools.count()
        self._finalizer = weakref.finalize(self, self.engine.shutdown)
        atexit.register(self._finalizer)

    def get_tokenizer(self):
        return self.tokenizer

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (a str, {"prompt_token_ids": [...]}, or a list of these);
        returns one RequestOutput per prompt, in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling_params")
        for sp in params_list:
            bad = [t for t in sp.allowed_token_ids or () if not t < self.vocab_size]
            if bad:
                raise ValueError(f"allowed_token_ids: token id {bad[0]} is outside the vocabulary "
                                 f"(size {self.vocab_size})")
        requests = [(self._tokenize(p), sp) for p, sp in zip(prompts, params_list)]
        return self._run(requests, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None, continue_final_message: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate.
        continue_final_message (with add_generation_prompt=False) leaves the last, assistant message
        open, for the model to continue it."""
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt=False")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(conv, tokenize=False, chat_template=chat_template,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message)
                   for conv in conversations]
        # The template already holds the BOS token where the model wants one.
        return self.generate([{"prompt": p, "prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)}
                              for p in prompts], sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids, text = list(prompt["prompt_token_ids"]), prompt.get("prompt")
        elif isinstance(prompt, dict) and "prompt" in prompt:
            ids, text = self.tokenizer.encode(prompt["prompt"]), prompt["prompt"]
        else:
            raise ValueError(f"a prompt must be a str or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}")
        return text, ids

    def _run(self, requests: list[tuple[tuple[str | None, list[int]], SamplingParams]],
             use_tqdm: bool) -> list[RequestOutput]:
        processor = OutputProcessor(self.tokenizer)
        order: dict[str, int] = {}
        for i, ((text, ids), params) in enumerate(requests):
            request_id = str(next(self._ids))
            order[request_id] = i
            processor.add_request(request_id, text, ids, params)
            self.engine.add_request(request_id, ids, params)
        results: list[RequestOutput | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        start, num_out_tokens, remaining = time.perf_counter(), 0, len(requests)
        try:
            while remaining:
                deltas, failures = self.engine.get_outputs()
                if failures:
                    raise ValueError(failures[0].message)
                updates, to_abort = processor.process(deltas)
                self.engine.abort(to_abort)
                for update in updates:
                    num_out_tokens += sum(len(t) for t in update.new_token_ids)
                    if update.output.finished:
                        results[order[update.output.request_id]] = update.output
                        remaining -= 1
                        bar.update(1)
                        bar.set_postfix_str(f"output {num_out_tokens / (time.perf_counter() - start):.1f} tok/s")
        except BaseException:
            if self.engine.dead is None:
                self.engine.abort([rid for rid, i in order.items() if results[i] is None])
            raise
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ lifetime

    def shutdown(self) -> None:
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


__all__ = ["LLM", "SamplingParams", "EngineDeadError"]
