"""The scheduler process's CPU cost per step, without a GPU: the real Scheduler and SchedulerProc
handlers driven by a fake worker.

    python scripts/bench_scheduler.py                         # 256 requests: decode, then mixed
    python scripts/bench_scheduler.py --profile decode        # cProfile of the decode phase's steps
    python scripts/bench_scheduler.py --output-json out.json

Each step is what the scheduler's loop (scheduler_proc/core.py) does for one StepResult, with two
steps in flight as there. The first five phases lie between the result arriving and the next plan
leaving (`plan_latency`: what a worker waiting for that plan sees); `total` adds the last:

    decode    msgspec-decode the StepResult           (ToScheduler decoder)
    update    Scheduler.update: append tokens, finish
    route     SchedulerProc._send_outputs: route deltas to clients, stats
    schedule  Scheduler.schedule: budgets, block slots, the diff plan, prefix-cache hashes
    encode    msgspec-encode the ExecuteStep          (sent once to every rank)
    send      SchedulerProc._flush_outputs: encode the RequestOutputs (sent after the plan)

The fake worker keeps each request's token count as a real worker does (it appends what it samples),
samples one token per request whose known tokens are all computed, and answers the oldest step in
flight. Its own time is not counted. Workloads:

    decode    N requests with ~`--prompt-len` token prompts, prefilled first, then timed in steady
              decode (no request finishes).
    mixed     4N requests, prompt and output lengths uniform in [100, 1024], at most N running:
              finishing requests make room for new ones, whose prompts arrive in chunks (chunked
              prefill) beside the decodes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import platform
import pstats
import random
import statistics
import sys
import time
from collections import deque

import msgspec

from ipc.messages import ExecuteStep, RequestOutputs, StepResult, ToScheduler
from ipc.sampling_params import SamplingParams
from scheduler_proc.core import MAX_STEPS_IN_FLIGHT, SchedulerProc
from scheduler_proc.scheduler import Scheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

PHASES = ("decode", "update", "route", "schedule", "encode", "send")
_VOCAB = 150_000


class _ClientSender:
    """Stands in for a client's Sender: encodes as the socket would, sends nowhere."""

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()

    def send(self, msg: RequestOutputs) -> None:
        self.encoder.encode(msg)


class FakeWorker:
    """A worker's token bookkeeping: known tokens per request, one sample once all are computed."""

    def __init__(self) -> None:
        self.num_tokens: dict[str, int] = {}
        self.encoder = msgspec.msgpack.Encoder()

    def execute(self, step: ExecuteStep) -> bytes:
        for rid in step.finished_request_ids:
            self.num_tokens.pop(rid, None)
        ids, sampled = [], []
        for new in step.new_requests:
            self.num_tokens[new.request_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
        for data in [*step.cached_requests, *step.new_requests]:
            if data.num_computed_tokens + data.num_scheduled_tokens >= self.num_tokens[data.request_id]:
                n = getattr(data, "num_samples", 1)
                ids.append(data.request_id)
                sampled.append([random.randrange(_VOCAB) for _ in range(n)])
                self.num_tokens[data.request_id] += 1
        return self.encoder.encode(StepResult(step.step_id, ids, sampled))


def make_proc(args: argparse.Namespace) -> SchedulerProc:
    """A SchedulerProc with its real Scheduler and handlers, but no sockets or worker processes."""
    proc = SchedulerProc.__new__(SchedulerProc)
    proc.scheduler = Scheduler(args.num_blocks, args.block_size, args.num_requests, args.max_num_batched_tokens,
                               args.max_model_len, [args.eos_token_id], not args.no_prefix_caching)
    proc.clients = {0: _ClientSender()}
    proc.owner = {}
    proc.outbox = []
    return proc


def add_requests(proc: SchedulerProc, lengths: list[tuple[int, int]]) -> None:
    for i, (prompt_len, output_len) in enumerate(lengths):
        prompt = [random.randrange(_VOCAB) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        proc.scheduler.add_request(f"req-{i}", prompt, params, time.time())
        proc.owner[f"req-{i}"] = 0


class CoreLoop:
    """The scheduler loop's per-step work with the fake worker answering; state lasts across runs."""

    def __init__(self, proc: SchedulerProc) -> None:
        self.proc, self.worker = proc, FakeWorker()
        self.decoder, self.encoder = msgspec.msgpack.Decoder(ToScheduler), msgspec.msgpack.Encoder()
        self.in_flight: deque[ExecuteStep] = deque()

    def run(self, num_steps: int) -> dict[str, list[float]]:
        """num_steps steps; microseconds per phase of each, and tokens scheduled."""
        times: dict[str, list[float]] = {p: [] for p in [*PHASES, "tokens"]}
        for _ in range(num_steps):
            t, num_tokens = self.step()
            for phase, begin, end in zip(PHASES, t, t[1:]):
                times[phase].append((end - begin) * 1e6)
            times["tokens"].append(num_tokens)
        return times

    def step(self) -> tuple[list[float], int]:
        proc, sched = self.proc, self.proc.scheduler
        t = [time.perf_counter()]
        if len(self.in_flight) == MAX_STEPS_IN_FLIGHT:
            raw = self.worker.execute(self.in_flight.popleft())
            t[0] = time.perf_counter()
            result = self.decoder.decode(raw)
            t.append(time.perf_counter())
            deltas = sched.update(result)
            t.append(time.perf_counter())
            proc._send_outputs(deltas, always=True)
            t.append(time.perf_counter())
        else:
            t += [t[0], t[0]]
        if not sched.has_work():
            raise SystemExit("error: the workload ran out of requests; lower --steps or --rounds")
        out = sched.schedule()
        t.append(time.perf_counter())
        if out.step is not None:
            self.encoder.encode(out.step)
            self.in_flight.append(out.step)
        t.append(time.perf_counter())
        proc._flush_outputs()
        t.append(time.perf_counter())
        return t, sum(out.num_scheduled_tokens.values())


def workload(name: str, args: argparse.Namespace) -> SchedulerProc:
    proc = make_proc(args)
    rng = random.Random(args.seed)
    random.seed(args.seed)
    if name == "decode":
        lengths = [(rng.randint(args.prompt_len - 16, args.prompt_len + 16), args.max_model_len // 2)
                   for _ in range(args.num_requests)]
    else:
        lengths = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(4 * args.num_requests)]
    add_requests(proc, lengths)
    return proc


def summarize(rounds: list[dict[str, list[float]]]) -> dict:
    """Mean microseconds per step of each phase, from the round with the smallest total (the others
    met more noise from the rest of the machine), and that round's total percentiles."""
    best = None
    for times in rounds:
        total = [sum(values) for values in zip(*(times[p] for p in PHASES))]
        if best is None or statistics.fmean(total) < statistics.fmean(best[1]):
            best = (times, total)
    times, total = best
    row = {p: statistics.fmean(times[p]) for p in PHASES}
    row.update(plan_latency=sum(row[p] for p in PHASES[:-1]), total=statistics.fmean(total), total_p50=statistics.median(total),
               total_p90=sorted(total)[int(0.9 * len(total))], tokens_per_step=statistics.fmean(times["tokens"]))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=["decode", "mixed"], default=["decode", "mixed"])
    p.add_argument("--num-requests", type=int, default=256, help="running requests (max_num_seqs)")
    p.add_argument("--prompt-len", type=int, default=500, help="decode workload: prompt tokens (+-16)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per workload; the fastest is reported")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default: decode 40, enough to prefill; mixed 300)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=40_000)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--eos-token-id", type=int, default=151645)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=["decode", "mixed"], help="print a cProfile of that workload's timed steps")
    p.add_argument("--output-json", help="write the results here as JSON")
    args = p.parse_args()

    results = {}
    for name in args.workloads:
        warmup = args.warmup if args.warmup is not None else {"decode": 40, "mixed": 300}[name]
        loop = CoreLoop(workload(name, args))
        loop.run(warmup)
        gc.collect()
        if args.profile == name:
            prof = cProfile.Profile()
            prof.runcall(loop.run, args.steps * args.rounds)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            continue
        results[name] = summarize([loop.run(args.steps) for _ in range(args.rounds)])

    cols = [*PHASES, "plan_latency", "total", "total_p50", "total_p90"]
    print("microseconds per step (mean; p50 and p90 of the total)")
    print(f"{'workload':9}" + "".join(f"{c:>{max(len(c), 8) + 1}}" for c in cols) + f"{'tok/step':>9}")
    for name, row in results.items():
        print(f"{name:9}" + "".join(f"{row[c]:{max(len(c), 8) + 1}.1f}" for c in cols)
              + f"{row['tokens_per_step']:9.0f}")
    if results:
        bc.finish({"results": results, "cpu": cpu_name(), "python": platform.python_version()},
                  args.output_json, __file__, None)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
