"""ModelRunner: one rank's model, KV cache and sampler, driven by the scheduler's step plans."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from gpu_workers.attention import get_attention_backend
from gpu_workers.distributed import get_tp_group, local_rank  # tensor parallel
from gpu_workers.cuda_graph import CUDAGraphRunner
from gpu_workers.step_profiler import StepProfiler
from gpu_workers.step_timer import StepTimer
from gpu_workers.input_batch import (BlockTable, CachedRequestState, HostStaging, StepInputs,
                                     greedy_without_processors, host_to_device, prepare_inputs)
from gpu_workers.loader import load_hf_config, load_model
from gpu_workers.models import elementwise
from gpu_workers.models.parallel_layers import split_heads  # tensor parallel
from gpu_workers.sampler import RowInfo, Sampler, SamplingBatch
from gpu_workers.sampling_ops import compute_prompt_logprobs
from ipc import envs
from ipc.config import EngineConfig
from ipc.messages import ExecuteStep, Logprobs, StepResult
from ipc.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_PROFILE_PARAMS = SamplingParams(max_tokens=1)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        wc = config.worker
        # tensor parallel: a rank's GPU is its index on its node
        self.device = torch.device(f"cuda:{local_rank(config.parallel, rank)}" if wc.device == "cuda" else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(envs.cpu_threads(config.parallel.tensor_parallel_size))
        self.dtype = _DTYPES[config.model.dtype]
        self.block_size = config.cache.block_size
        self.hf_config = load_hf_config(config.model.model)
        self.attn_backend = get_attention_backend(wc.attention_backend, self.device)
        elementwise.configure_small_gemv(self.hf_config.hidden_size, self.device)
        self.model = load_model(config.model.model, self.dtype, self.device, self.attn_backend,
                                config.model.load_format)
        self.sampler = Sampler(wc.seed, self.device)
        self.eos_token_ids = list(config.model.eos_token_ids)
        self.requests: dict[str, CachedRequestState] = {}
        self.block_table = BlockTable(config.scheduler.max_num_seqs, -(-config.model.max_model_len // self.block_size))
        """Block ids of self.requests, row req.slot each, kept in step with the plans' diffs."""
        self.kv_cache: torch.Tensor | None = None  # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graph_runner: CUDAGraphRunner | None = None
        self.staging = HostStaging(self.device)
        self.timer = StepTimer(self.device, rank)
        self.profiler = StepProfiler(self.device, rank)
        self.in_flight: InFlightStep | None = None
        self.overlap = envs.overlap_steps(self.device.type)
        """Launch step n+1 before step n's tokens reach the host (see worker.py)."""

    # ------------------------------------------------------------------ KV cache

    @property
    def _kv_shape(self) -> tuple[int, int, int]:
        cfg = self.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        tp = get_tp_group()  # tensor parallel: this rank's KV heads only
        kv_heads = split_heads(cfg.num_attention_heads, cfg.num_key_value_heads, tp.rank, tp.world_size).num_kv_heads
        return cfg.num_hidden_layers, kv_heads, head_dim

    def block_bytes(self) -> int:
        layers, kv_heads, head_dim = self._kv_shape
        return 2 * layers * self.block_size * kv_heads * head_dim * self.dtype.itemsize

    def profile_num_blocks(self) -> int:
        """How many KV blocks fit: on GPU, what gpu_memory_utilization leaves after the weights and a
        forward at max_num_batched_tokens; on CPU, the configured memory budget."""
        if self.device.type != "cuda":
            return max(self.config.cache.cpu_kv_cache_bytes // self.block_bytes(), 1)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._dummy_forward(self.config.scheduler.max_num_batched_tokens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.cache.gpu_memory_utilization - peak - non_torch
        num_blocks = int(budget // self.block_bytes())
        logger.warning("rank %d: %.2f GiB peak in profiling, %d KV blocks (%.2f GiB)", self.rank,
                       peak / 2**30, num_blocks, num_blocks * self.block_bytes() / 2**30)
        if num_blocks < 1:
            raise RuntimeError("no memory left for the KV cache; raise gpu_memory_utilization or lower "
                               "max_num_batched_tokens / use a smaller model")
        return num_blocks

    def _dummy_forward(self, num_tokens: int) -> None:
        """A prefill of num_tokens tokens over a throwaway cache, to measure peak activation memory."""
        seq_len = min(num_tokens, self.config.model.max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        self.init_kv_cache(num_seqs * -(-seq_len // self.block_size))
        self._forward_prefills([min(seq_len, num_tokens - i * seq_len) for i in range(num_seqs)])
        self.kv_cache, self.kv_caches = None, []

    def _forward_prefills(self, lens: list[int]) -> None:
        """An eager forward (then the LM head and the greedy pick) of fresh prefills of these lengths over
        the current cache. Their blocks are taken from the front of it and left holding junk: no request
        owns them yet."""
        num_blocks = self.kv_cache.shape[2]
        reqs, table, first = [], BlockTable(len(lens), max(-(-n // self.block_size) for n in lens)), 0
        for i, n in enumerate(lens):
            count = -(-n // self.block_size)
            block_ids = [(first + j) % num_blocks for j in range(count)]
            first += count
            req = CachedRequestState(f"dummy-{i}", [0] * n, n, _PROFILE_PARAMS, block_ids, 0, n, 0, 1, False)
            req.slot = table.add(req.block_ids)
            reqs.append(req)
        inputs = prepare_inputs(reqs, table, self.block_size, self.device)
        with torch.inference_mode():
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
            last = hidden[inputs.sample_rows]  # [num_seqs, hidden]
            self.model.compute_logits(last)
            self.model.greedy_tokens(last)  # compiles kernels/greedy.py's kernel

    def warm_up_kernels(self) -> None:
        """Compile at start-up the kernel variants steps can pick: every attention variant (the
        backend's `warm_up`: decode with or without splits, alone or in a mixed batch; prefill at each
        tile size), then the rest of the model's kernels through eager prefills. Triton compiles each
        variant on first use, about a second, which would otherwise land in a user's first steps.
        Then the sampling kernel, for the model's logit dtype and float32."""
        if self.device.type != "cuda":
            return
        if hasattr(self.attn_backend, "warm_up"):  # every attention variant, incl. mixed batches
            cfg, tp = self.hf_config, get_tp_group()
            _, kv_heads, head_dim = self._kv_shape
            heads = split_heads(cfg.num_attention_heads, cfg.num_key_value_heads, tp.rank, tp.world_size).num_heads
            attn = self.model.model.layers[0].self_attn  # do decode steps attend with their RoPE inside?
            rope_norm = (attn.q_norm is not None) if attn.rope_in_attention else None
            self.attn_backend.warm_up(heads, kv_heads, head_dim, self.dtype, self.device,
                                      self.config.scheduler.max_num_seqs, rope_norm)
        for n in (16, 17, 128):  # query lengths <= 16, > 16, >= 128: the rest of the model's kernels
            self._forward_prefills([min(n, self.config.model.max_model_len)])
        self.sampler.warm_up(self.hf_config.vocab_size, self.dtype)
        torch.cuda.synchronize()

    def init_kv_cache(self, num_blocks: int) -> None:
        layers, kv_heads, head_dim = self._kv_shape
        self.kv_cache = torch.zeros(layers, 2, num_blocks, self.block_size, kv_heads, head_dim,
                                    dtype=self.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(layers)]

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs over the allocated KV cache (CUDA with the Triton backend only:
        the graphs need kernels that skip padded slots)."""
        if self.device.type != "cuda" or self.config.worker.enforce_eager or self.attn_backend.name != "triton":
            return
        self.graph_runner = CUDAGraphRunner(self.model, self.kv_caches, self.config.scheduler.max_num_seqs,
                                            self.config.model.max_model_len, self.block_size, self.device)
        self.graph_runner.capture()

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, step: ExecuteStep) -> StepResult:
        """Run one step to completion (no overlap): launch it, then wait for its tokens."""
        results = self.launch(step)
        results += self.finish_in_flight()
        return results[-1]

    @torch.inference_mode()
    def launch(self, step: ExecuteStep) -> list[StepResult]:
        """Enqueue the step's forward and sampling on the device and return without waiting for its
        tokens. Its decode inputs whose token the previous step is still sampling are taken from that
        step's device tensor, so the GPU runs step n+1 right after step n. Returns the results of
        earlier steps that completed meanwhile: the previous one (its work ran while this one was
        prepared), or, on CPU, this one."""
        results = []
        self.profiler.step()
        if self.in_flight is not None and self._needs_host_tokens(step):
            results.append(self._finish(self.in_flight))  # a penalty reads the token history
            self.in_flight = None
        self.timer.start_step()
        if self.in_flight is not None:
            self.timer.count("overlapped")
        reqs = self._update_states(step)
        if step.blocks_to_copy:
            src, dst = zip(*step.blocks_to_copy)
            self.kv_cache[:, :, list(dst)] = self.kv_cache[:, :, list(src)]
        inputs = prepare_inputs(reqs, self.block_table, self.block_size, self.device, self.staging)
        if inputs.feed_rows is not None:  # tokens still on the device, from the step in flight
            dst, src = inputs.feed_rows
            inputs.input_ids[dst] = self.in_flight.token_ids[src]
        self.timer.mark("prepare")
        gpu_start = self.timer.gpu_start()
        if self.graph_runner is not None and self.graph_runner.can_run(inputs.meta):
            hidden = self.graph_runner.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        launched = self._sample(step.step_id, hidden, inputs)
        self.timer.gpu_end(gpu_start)
        self.timer.mark("launch")
        if self.in_flight is not None:
            results.append(self._finish(self.in_flight))
        self.in_flight = launched
        if not self.overlap:
            results += self.finish_in_flight()
        return results

    def in_flight_done(self) -> bool:
        """The step in flight has its tokens on the host (True when there is none)."""
        return self.in_flight is None or self.in_flight.ready is None or self.in_flight.ready.query()

    def finish_in_flight(self) -> list[StepResult]:
        """Wait for the step in flight, if any, and return its result."""
        if self.in_flight is None:
            return []
        result = self._finish(self.in_flight)
        self.in_flight = None
        return [result]

    def _needs_host_tokens(self, step: ExecuteStep) -> bool:
        """A request of `step` samples with a penalty over its tokens, and one of them is in flight."""
        for data in step.cached_requests:
            req = self.requests.get(data.request_id)
            if req is not None and req.num_pending and req.sampling_params.has_penalties:
                return True
        return False

    def _update_states(self, step: ExecuteStep) -> list[CachedRequestState]:
        """Apply the plan's diff (to the states and the block table); returns the scheduled requests
        in the plan's token order."""
        for rid in step.finished_request_ids:
            self._forget(rid)
        reqs = []
        for data in step.cached_requests:
            req = self.requests[data.request_id]
            req.num_computed_tokens = data.num_computed_tokens
            req.num_scheduled_tokens = data.num_scheduled_tokens
            if data.replace_block_ids:
                req.block_ids = list(data.new_block_ids)
                self.block_table.replace(req.slot, req.block_ids)
            elif data.new_block_ids:
                req.block_ids.extend(data.new_block_ids)
                self.block_table.append(req.slot, data.new_block_ids)
            reqs.append(req)
        for data in step.new_requests:
            self._forget(data.request_id)  # no-op: a request sent anew (preempted) was finished first
            req = CachedRequestState.from_new(data)
            req.slot = self.block_table.add(req.block_ids)
            self.requests[req.request_id] = req
            reqs.append(req)
        return reqs

    def _forget(self, request_id: str) -> None:
        """Drop a request's state and free its block-table row (a step in flight may still hold the
        state: its tokens are appended to it, which touches no row)."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.block_table.free(req.slot)

    def _sample(self, step_id: int, hidden: torch.Tensor, inputs: StepInputs) -> "InFlightStep":
        """Enqueue logits, sampling and the tokens' copy to the host; logprobs, which are rare, are
        read back now."""
        reqs = inputs.sampling_requests
        token_ids, logprobs = None, []
        if reqs:
            num_rows = sum(r.num_samples for r in reqs)
            # The common benchmark case, plain greedy: skip the sampler's set-up, and first try the
            # check per request, which builds no rows.
            rows = None if all(r.argmax_only for r in reqs) else [
                row for req in reqs for row in self._sampling_rows(req)]
            plain_greedy = rows is None or all(map(_plain_greedy, rows))
            # A decode step where every request samples: the sample rows are all rows, in order.
            every_row = inputs.meta.is_decode_only and len(reqs) == hidden.shape[0]
            sampled = hidden if every_row else hidden[inputs.sample_rows]  # [num_sampling_reqs, hidden]
            if plain_greedy and num_rows == len(reqs):  # no logits gathered across ranks
                token_ids, logprobs = self.model.greedy_tokens(sampled), [None] * num_rows
            else:
                logits = self.model.compute_logits(sampled)  # [num_sampling_reqs, vocab]
                if num_rows > len(reqs):  # a request forking into n outputs
                    index = [i for i, r in enumerate(reqs) for _ in range(r.num_samples)]
                    logits = logits[host_to_device(index, torch.int64, self.device)]  # [num_rows, vocab]
                if plain_greedy:
                    token_ids, logprobs = logits.argmax(dim=-1), [None] * num_rows
                else:
                    token_ids, logprobs = self.sampler.sample(logits, SamplingBatch.build(rows, self.device))
        row = 0
        for req in inputs.sampling_requests:
            req.num_pending += 1
            req.pending_row = row  # where the next step finds this token on the device
            row += req.num_samples
        pl = self._prompt_logprobs(hidden, inputs)
        host, ready = None, None
        if token_ids is not None:
            if self.device.type == "cuda":
                host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
                host.copy_(token_ids, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                host = token_ids
        return InFlightStep(step_id, inputs.sampling_requests, token_ids, host, ready, logprobs, pl)

    def _finish(self, step: "InFlightStep") -> StepResult:
        """Wait for a launched step's tokens, append them to the requests, and build its result."""
        if step.ready is not None:
            step.ready.synchronize()
        self.timer.mark("wait")
        tokens = step.host_token_ids.tolist() if step.host_token_ids is not None else []
        any_logprobs = step.logprobs.count(None) < len(step.logprobs)
        sampled, logprobs = [], []
        i = 0
        for req in step.sampling_requests:
            n = req.num_samples
            req.token_ids.append(tokens[i])
            req.num_pending -= 1
            sampled.append(tokens[i:i + n])
            if any_logprobs:
                lps = step.logprobs[i:i + n]
                logprobs.append(lps if lps.count(None) < n else None)
            i += n
        pl_ids, pl_values, pl_starts = step.prompt_logprobs
        self.timer.mark("finish")
        self.timer.end_step()
        return StepResult(step.step_id, [req.request_id for req in step.sampling_requests], sampled,
                          logprobs if any_logprobs else None, pl_ids or None, pl_values or None, pl_starts or None)

    def _sampling_rows(self, req: CachedRequestState) -> list[RowInfo]:
        """One row per sample to draw; the token history is copied only when a penalty reads it."""
        params = req.sampling_params
        history = params.has_penalties
        prompt, output = (req.prompt_token_ids, req.output_token_ids) if history else ([], [])
        position = req.num_tokens - req.num_prompt_tokens
        blocked = self._blocked_tokens(req)
        return [RowInfo(params, prompt, output, req.output_index if req.num_samples == 1 else i, blocked, position)
                for i in range(req.num_samples)]

    def _blocked_tokens(self, req: CachedRequestState) -> list[int]:
        params = req.sampling_params
        if req.num_tokens - req.num_prompt_tokens >= params.min_tokens:
            return []
        return (self.eos_token_ids if not params.ignore_eos else []) + list(params.stop_token_ids or [])

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs):
        ids, values, starts = [], [], []
        for sl in inputs.prompt_logprobs:
            start = sl.request.num_computed_tokens
            starts.append(start + 1 if start else 0)
            if len(sl.hidden_rows) == 0:
                ids.append(sl.request.request_id)
                values.append([None] if sl.leading_none else [])
                continue
            logits = self.model.compute_logits(hidden[sl.hidden_rows.to(self.device)])  # [k, vocab]
            lps: list[Logprobs | None] = compute_prompt_logprobs(
                logits, sl.target_ids.to(self.device), sl.request.sampling_params.prompt_logprobs)
            ids.append(sl.request.request_id)
            values.append(([None] if sl.leading_none else []) + lps)
        return ids, values, starts


class InFlightStep(NamedTuple):
    """A launched step: its tokens may still be on the device (ModelRunner.launch / _finish)."""
    step_id: int
    sampling_requests: list[CachedRequestState]
    token_ids: torch.Tensor | None  # [num_rows] on the device; the next step's inputs may read it
    host_token_ids: torch.Tensor | None  # [num_rows] pinned host copy, valid once `ready` is done
    ready: torch.cuda.Event | None  # None on CPU (nothing to wait for)
    logprobs: list[Logprobs | None]  # per row, already on the host
    prompt_logprobs: tuple[list, list, list]  # (request ids, values, starts), already on the host


def _plain_greedy(row: RowInfo) -> bool:
    """Greedy with nothing that changes the logits first: the sampler would just take the argmax."""
    return not row.blocked_token_ids and greedy_without_processors(row.sampling_params)
