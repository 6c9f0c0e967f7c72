"""Host (CPU) cost of one worker step, per phase, for N concurrent requests: no model, no GPU.

    python scripts/bench_prepare.py                                  # 256 requests: decode and mixed steps
    python scripts/bench_prepare.py --num-requests 64 --output-json /tmp/prepare.json
    python scripts/bench_prepare.py --digest                         # a hash of every step's inputs and results

A real ModelRunner (dummy weights of a tiny config) runs the steps through ModelRunner.launch, overlapped
as on CUDA, but over a stub model whose forward and logits cost nothing. What is timed is therefore the
worker's own host work, the part that keeps a fast GPU waiting when the batch is large:

    update    ModelRunner._update_states: the plan's diff applied to the per-request states
    inputs    prepare_inputs: flat token / position / slot arrays, block tables, one staging copy per
              dtype (on the CPU a clone), and the feed of tokens still on the device
    launch    the stub forward, then sampling's host side (rows, greedy check, pending rows)
    finish    ModelRunner._finish: tokens appended, StepResult built
    total     wall time of one launch() call (the above plus the penalty check and the timer)

Each is the median over --steps steps (robust to garbage-collector pauses and a busy host) of the
run, among --repeats, with the lowest median total; so the phases need not add up to the total.

Workloads (a small planner plays the scheduler and sends diffs, as scheduler_proc does):
    decode    every request decodes one token per step; contexts start uniform in --context-range
    mixed     each step --arrivals requests finish and as many new ones arrive, prefilled in chunks of
              --chunk-size tokens beside the decodes of the rest

--digest hashes every step's model inputs and results instead of timing (the numbers then include the
hashing): two versions of the worker that print the same digest built the same steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import deque

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from gpu_workers.model_runner import ModelRunner  # noqa: E402
from ipc.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from ipc.messages import CachedRequestData, ExecuteStep, NewRequestData  # noqa: E402
from ipc.sampling_params import SamplingParams  # noqa: E402

PHASES = ("update", "inputs", "launch", "finish", "total")
_TINY_CONFIG = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=16,
                    intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=8, max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True)


class StubModel:
    """Stands in for the model: hidden row i is i (so the sampled rows show in the logits' input), and
    the logits are a fixed random table, so each row's argmax is a token that depends on the row. The
    vocabulary is tiny so that the argmax, which a GPU runs asynchronously, costs next to nothing here."""

    def __init__(self, digest: "hashlib._Hash | None", vocab: int = 8) -> None:
        self.hidden = torch.arange(65536, dtype=torch.float32)[:, None]  # [max_tokens, 1]
        self.logits = torch.randn(4096, vocab, generator=torch.Generator().manual_seed(0))  # [rows, vocab]
        self.digest = digest

    def __call__(self, input_ids, positions, kv_caches, meta):
        if self.digest is not None:
            for t in (input_ids, positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables):
                self.digest.update(t.numpy().tobytes())
        return self.hidden[:input_ids.shape[0]]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden[:, 0].long()  # [num_rows] the step's token rows that are sampled
        if self.digest is not None:
            self.digest.update(rows.numpy().tobytes())
        return self.logits[rows % self.logits.shape[0]]

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden).argmax(dim=-1)


class Planner:
    """The scheduler's side, reduced to what the worker sees: per request its token count and blocks;
    running requests first (a decode token or the next prefill chunk), then the new arrivals."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        self.free_blocks = deque(range(1_000_000))
        self.running: list[dict] = []
        self.finished: list[str] = []
        self.step_id = 0
        self.next_id = 0
        self.params = SamplingParams(max_tokens=1 << 20, ignore_eos=True, temperature=args.temperature)

    def arrive(self, prompt_len: int, num_computed: int = 0) -> None:
        prompt = self.rng.integers(3, _TINY_CONFIG["vocab_size"], prompt_len).tolist()
        self.running.append(dict(id=f"req-{self.next_id}", prompt=prompt, computed=num_computed, blocks=[],
                                 sent_blocks=0, on_worker=False))
        self.next_id += 1

    def finish_oldest(self, n: int) -> None:
        """The n longest-running decoding requests end (their blocks are freed)."""
        done = [r for r in self.running if r["computed"] >= len(r["prompt"])][:n]
        for r in done:
            self.running.remove(r)
            self.free_blocks.extend(r["blocks"])
            self.finished.append(r["id"])

    def plan(self) -> ExecuteStep:
        new, cached = [], []
        for r in self.running:
            n = min(self.args.chunk_size, len(r["prompt"]) - r["computed"]) if r["computed"] < len(r["prompt"]) else 1
            while len(r["blocks"]) * self.args.block_size < r["computed"] + n:
                r["blocks"].append(self.free_blocks.popleft())
            if not r["on_worker"]:
                new.append(NewRequestData(r["id"], r["prompt"], [], self.params, list(r["blocks"]), r["computed"], n))
                r["on_worker"] = True
            else:
                cached.append(CachedRequestData(r["id"], r["computed"], n, r["blocks"][r["sent_blocks"]:]))
            r["sent_blocks"] = len(r["blocks"])
            r["computed"] += n
        step = ExecuteStep(self.step_id, new, cached, self.finished)
        self.step_id += 1
        self.finished = []
        return step


def make_runner(args: argparse.Namespace, digest) -> ModelRunner:
    os.environ["PAGEDSERVE_STEP_TIMING"] = "1"  # the runner's own StepTimer splits the phases
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as model_dir:  # read only by the constructor
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(_TINY_CONFIG, f)
        config = EngineConfig(ModelConfig(model_dir, max_model_len=8192, load_format="dummy"),
                              CacheConfig(block_size=args.block_size),
                              SchedulerConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=65536))
        runner = ModelRunner(config)
    runner.model = StubModel(digest)
    runner.timer.every = 1 << 60  # no periodic log line
    runner.overlap = not args.no_overlap
    return runner


def run_workload(args: argparse.Namespace, mixed: bool, digest=None) -> dict:
    runner = make_runner(args, digest)
    planner = Planner(args)
    lo, hi = args.context_range
    for _ in range(args.num_requests):
        length = int(planner.rng.integers(lo, hi + 1))
        planner.arrive(length, num_computed=length - 1)  # known context: the first step decodes
    update_s = [0.0]
    update_states = runner._update_states

    def timed_update(step):
        start = time.perf_counter()
        reqs = update_states(step)
        update_s[0] += time.perf_counter() - start
        return reqs

    runner._update_states = timed_update
    per_step: dict[str, list[float]] = {k: [] for k in PHASES}  # seconds, one entry per timed step
    results = []
    for i in range(args.warmup + args.steps):
        if mixed and i > 0:
            planner.finish_oldest(args.arrivals)
            for _ in range(args.arrivals):
                planner.arrive(int(planner.rng.integers(lo, hi + 1)))
        step = planner.plan()
        before, update_before = dict(runner.timer.totals), update_s[0]
        start = time.perf_counter()
        results += runner.launch(step)
        total = time.perf_counter() - start
        if i >= args.warmup:
            t = {k: v - before.get(k, 0.0) for k, v in runner.timer.totals.items()}
            update = update_s[0] - update_before
            for phase, seconds in (("update", update), ("inputs", t["prepare"] - update), ("launch", t["launch"]),
                                   ("finish", t.get("finish", 0.0) + t.get("wait", 0.0)), ("total", total)):
                per_step[phase].append(seconds)
    results += runner.finish_in_flight()
    if digest is not None:
        for res in results:
            digest.update(json.dumps([res.step_id, res.request_ids, res.sampled_token_ids]).encode())
    return {k: round(float(np.median(v)) * 1e6, 1) for k, v in per_step.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256, help="concurrent requests")
    p.add_argument("--context-range", type=int, nargs=2, default=[100, 1100], metavar=("MIN", "MAX"),
                   help="context / prompt lengths, uniform (mean 600 by default)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=256, help="mixed: prefill tokens per request per step")
    p.add_argument("--arrivals", type=int, default=2, help="mixed: requests finishing and arriving per step")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the fast path); else sampling")
    p.add_argument("--steps", type=int, default=300, help="timed steps per workload")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="runs per workload; the one of lowest total is kept")
    p.add_argument("--no-overlap", action="store_true", help="finish each step before the next (the CPU default)")
    p.add_argument("--workloads", nargs="+", choices=["decode", "mixed"], default=["decode", "mixed"])
    p.add_argument("--digest", action="store_true", help="hash every step's inputs and results (see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", help="also write the JSON summary here")
    args = p.parse_args()
    torch.set_num_threads(1)

    summary = {"num_requests": args.num_requests, "context_range": args.context_range, "block_size": args.block_size,
               "chunk_size": args.chunk_size, "arrivals": args.arrivals, "temperature": args.temperature,
               "overlap": not args.no_overlap, "steps": args.steps}
    print(f"{'workload':9} " + " ".join(f"{k + ' us':>10}" for k in PHASES))
    for name in args.workloads:
        if args.digest:
            h = hashlib.sha256()
            run_workload(args, name == "mixed", h)
            summary[f"{name}_digest"] = h.hexdigest()[:16]
            print(f"{name:9} digest {summary[f'{name}_digest']}")
            continue
        best = min((run_workload(args, name == "mixed") for _ in range(args.repeats)), key=lambda r: r["total"])
        print(f"{name:9} " + " ".join(f"{best[k]:10.1f}" for k in PHASES))
        summary[name] = best
    bc.finish(summary, args.output_json, __file__, None)


if __name__ == "__main__":
    main()
