"""Where a tensor-parallel decode step's fused all-reduces spend their time, from the step profiler's
timelines (gpu_workers/step_profiler.py; `scripts/gpu_bench.sh tp-trace` writes one per rank).

    python scripts/trace_tp.py worker-0-*.trace.json.gz worker-1-*.trace.json.gz [--tp1 tp1-worker-0-*.trace.json.gz]

Per kernel class, microseconds a step on each rank (and TP=1's, if given). Then, for every fused
all-reduce + RMSNorm call (the n-th call on each rank is the same collective):
  dur        the kernel's duration on each rank
  skew       how much later the later rank's kernel started (its peer waited that long inside the kernel)
  late dur   the later-starting rank's duration: the call's cost without waiting for a peer
  gap        from the end of the kernel before it to its start, on the later rank (the launch bubble)
The ranks' clocks are the hosts' (CUPTI timestamps on one machine), so they compare to within about a
microsecond.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict

CLASSES = [  # (class, substrings of the kernel name), first match wins
    ("all-reduce+norm", ("lamport", "all_reduce_add_rms_norm")),
    ("attention", ("decode_split",)),
    ("rotary+kv", ("rotary",)),
    ("silu*mul", ("silu", "act_and_mul")),
    ("rms_norm", ("rms_norm",)),
    ("greedy", ("greedy", "argmax")),
    ("nccl", ("nccl",)),
    ("gemm", ("gemm", "sm90", "cutlass", "nvjet", "xmma", "cublas")),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def load(path: str) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every GPU kernel, in start order, on the host's clock."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        trace = json.load(f)
    base = trace.get("baseTimeNanoseconds", 0) / 1e3
    kernels = [(base + e["ts"], base + e["ts"] + e["dur"], e["name"]) for e in trace["traceEvents"]
               if e.get("cat") == "kernel" and "dur" in e]
    return sorted(kernels)


def per_class(kernels, steps: int) -> dict[str, float]:
    total = defaultdict(float)
    for start, end, name in kernels:
        total[kernel_class(name)] += end - start
    return {cls: t / steps for cls, t in sorted(total.items(), key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ranks", nargs="+", help="one timeline per rank, rank 0 first")
    p.add_argument("--tp1", help="a TP=1 timeline of the same workload")
    p.add_argument("--steps", type=int, default=20, help="steps each timeline holds (the profiler's window)")
    args = p.parse_args()
    ranks = [load(path) for path in args.ranks]
    steps = args.steps
    tables = {f"rank {r}": per_class(k, steps) for r, k in enumerate(ranks)}
    if args.tp1:
        tables["TP=1"] = per_class(load(args.tp1), steps)
    print(f"{steps} steps; kernel time per step, us")
    classes = list(dict.fromkeys(c for t in tables.values() for c in t))
    print(f"{'class':18}" + "".join(f"{name:>12}" for name in tables))
    for cls in classes:
        print(f"{cls:18}" + "".join(f"{t.get(cls, 0.0):12.1f}" for t in tables.values()))

    calls = [[(i, k) for i, k in enumerate(kernels) if kernel_class(k[2]) == "all-reduce+norm"] for kernels in ranks]
    n = min(len(c) for c in calls)
    if len(ranks) < 2 or n == 0:
        return
    durs, skews, late_durs, gaps, prev_classes = [], [], [], [], defaultdict(list)
    for j in range(n):
        starts = [c[j][1][0] for c in calls]
        late = max(range(len(ranks)), key=lambda r: starts[r])
        i, (start, end, _) = calls[late][j]
        prev = ranks[late][i - 1]
        durs += [c[j][1][1] - c[j][1][0] for c in calls]
        skews.append(max(starts) - min(starts))
        late_durs.append(end - start)
        gaps.append(start - prev[1])
        prev_classes[kernel_class(prev[2])].append(end - start)

    def stats(xs):
        xs = sorted(xs)
        return (f"mean {statistics.fmean(xs):6.2f}  median {xs[len(xs) // 2]:6.2f}  "
                f"p10 {xs[len(xs) // 10]:6.2f}  p90 {xs[len(xs) * 9 // 10]:6.2f}")

    print(f"\n{n} fused all-reduce calls on each rank, us")
    print(f"  dur (both ranks)  {stats(durs)}")
    print(f"  skew              {stats(skews)}")
    print(f"  late dur          {stats(late_durs)}")
    print(f"  gap before (late) {stats(gaps)}")
    for cls, xs in prev_classes.items():
        print(f"  late dur after {cls:10} ({len(xs)} calls): {stats(xs)}")


if __name__ == "__main__":
    main()
