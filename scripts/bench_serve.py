"""Online serving benchmark, like `vllm bench serve`: streaming /v1/completions against an HTTP server.

    # a server already running (scripts/launch.sh, or any OpenAI-compatible one):
    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --model /tmp/qwen3 --request-rate 8
    # start the server here, measure, stop it (pagedserve: python -m frontend.api_server; hf: scripts/hf_server.py):
    python scripts/bench_serve.py --backend hf --model /tmp/qwen3 --server-arg=--load-format=dummy --max-concurrency 4
    # output throughput against concurrency for both backends: a CSV and a PNG
    python scripts/bench_serve.py --backend pagedserve,hf --model /tmp/qwen3 --sweep-concurrency 1,4,16,64 \\
        --server-arg=--load-format=dummy --sweep-csv sweep.csv --sweep-png sweep.png

Requests carry random token ids as the prompt, max_tokens and ignore_eos (vLLM's extra field), so each yields
exactly its output length. They start at Poisson arrivals of --request-rate per second (inf: all at once),
at most --max-concurrency in flight. Per request: TTFT (send to first token chunk), TPOT ((latency - TTFT)
/ (output tokens - 1)) and ITL (the gaps between token chunks); reported as mean, median and p99 in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


async def send_request(session, url: str, payload: dict) -> RequestResult:
    """POSTs one streaming completion; timestamps every SSE chunk that carries a token."""
    result = RequestResult(prompt_len=len(payload["prompt"]))
    start = last = time.perf_counter()
    chunks, usage_tokens = 0, None
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                body = json.loads(data)
                if "error" in body:
                    result.error = str(body["error"])[:200]
                    return result
                if body.get("usage"):
                    usage_tokens = body["usage"].get("completion_tokens")
                choice = (body.get("choices") or [None])[0]
                # A token arrived unless this is a bare finish chunk (empty text with a finish_reason).
                if choice is not None and (choice.get("text") or choice.get("finish_reason") is None):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except Exception as exc:  # noqa: BLE001 - one failed request is recorded, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.ok = chunks > 0
    return result


async def run_load(base_url: str, model: str, requests: list[bc.Request], request_rate: float,
                   max_concurrency: int | None, temperature: float, seed: int, warmup: list[bc.Request]) -> dict:
    """Sends the requests (Poisson arrivals, bounded concurrency); returns the metrics."""
    import aiohttp
    import numpy as np

    url = base_url.rstrip("/") + "/v1/completions"
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    rng = np.random.default_rng(seed)

    def payload(r: bc.Request) -> dict:
        return {"model": model, "prompt": r.prompt_token_ids, "max_tokens": r.output_len, "temperature": temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def one(session, r: bc.Request) -> RequestResult:
        if limit is None:
            return await send_request(session, url, payload(r))
        async with limit:
            return await send_request(session, url, payload(r))

    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        for r in warmup:
            w = await send_request(session, url, payload(r))
            if not w.ok:
                raise SystemExit(f"error: the warm-up request failed: {w.error}")
        start, tasks = time.perf_counter(), []
        for i, r in enumerate(requests):
            if i and request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
            tasks.append(asyncio.create_task(one(session, r)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return metrics(results, duration)


def metrics(results: list[RequestResult], duration: float) -> dict:
    import numpy as np

    ok = [r for r in results if r.ok]
    out_tokens, in_tokens = sum(r.output_tokens for r in ok), sum(r.prompt_len for r in ok)
    m = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
         "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
         "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
         "total_token_throughput": (in_tokens + out_tokens) / duration}
    series = {"ttft": [r.ttft for r in ok], "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                                                      if r.output_tokens > 1],
              "itl": [g for r in ok for g in r.itl], "e2el": [r.latency for r in ok]}
    for name, values in series.items():
        arr = np.asarray(values or [0.0]) * 1e3
        m.update({f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
                  f"p99_{name}_ms": float(np.percentile(arr, 99))})
    errors = [r.error for r in results if not r.ok]
    if errors:
        m["first_error"] = errors[0]
    return m


def print_metrics(label: str, m: dict) -> None:
    print(f"============ Serving benchmark: {label} ============")
    print(f"{'Successful requests:':<40}{m['completed']:>10}   failed: {m['failed']}")
    print(f"{'Benchmark duration (s):':<40}{m['duration_s']:>10.2f}")
    print(f"{'Request throughput (req/s):':<40}{m['request_throughput']:>10.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{m['output_throughput']:>10.2f}")
    print(f"{'Total token throughput (tok/s):':<40}{m['total_token_throughput']:>10.2f}")
    for name, title in (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
                        ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")):
        print(f"{title + ' (ms):':<40}mean {m[f'mean_{name}_ms']:9.2f}  median {m[f'median_{name}_ms']:9.2f}"
              f"  p99 {m[f'p99_{name}_ms']:9.2f}")
    if m.get("first_error"):
        print(f"first error: {m['first_error']}")


class Server:
    """Starts a backend's server on a free local port and stops it (or wraps --base-url: starts nothing)."""

    def __init__(self, backend: str, args: argparse.Namespace) -> None:
        self.backend, self.args, self.proc = backend, args, None
        self.base_url = args.base_url

    def __enter__(self) -> "Server":
        if self.base_url:
            return self
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if self.backend == "hf":
            cmd = [sys.executable, os.path.join(REPO, "scripts", "hf_server.py"), "--host", "127.0.0.1"]
        else:
            cmd = [sys.executable, "-m", "frontend.api_server"]
        cmd += ["--model", self.args.model, "--port", str(port)] + self.args.server_arg
        if self.args.server_log:
            self.log = open(self.args.server_log, "w")
        else:
            self.log = tempfile.NamedTemporaryFile("w", prefix=f"{self.backend}_server_", suffix=".log", delete=False)
        self.log_path = self.log.name
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        print(f"starting {self.backend} server: {' '.join(cmd)} (log: {self.log_path})", flush=True)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.base_url = f"http://127.0.0.1:{port}"
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + self.args.server_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        with open(self.log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"error: the {self.backend} server did not become healthy (exit code "
                         f"{self.proc.returncode}); its log ends:\n{tail}")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_one(args: argparse.Namespace, backend: str, base_url: str, concurrency: int | None, num_prompts: int,
            requests_all: list[bc.Request], warmup: list[bc.Request]) -> dict:
    requests = requests_all[:num_prompts]
    m = asyncio.run(run_load(base_url, args.served_model_name or args.model, requests, args.request_rate,
                             concurrency, args.temperature, args.seed, warmup))
    label = f"{backend}, concurrency {concurrency or 'unbounded'}, rate {args.request_rate}"
    print_metrics(label, m)
    return {"benchmark": "serve", "backend": backend, "model": args.model, "base_url": base_url,
            "request_rate": str(args.request_rate), "max_concurrency": concurrency, **bc.workload_fields(requests), **m}


def write_sweep(rows: list[dict], csv_path: str, png_path: str | None) -> None:
    cols = ["backend", "max_concurrency", "num_prompts", "output_throughput", "request_throughput",
            "median_ttft_ms", "median_tpot_ms", "p99_itl_ms", "failed"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    if not png_path:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot (the CSV has the numbers)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = [(r["max_concurrency"], r["output_throughput"]) for r in rows if r["backend"] == backend]
        ax.plot([c for c, _ in pts], [t for _, t in pts], marker="o", label=backend)
    ax.set_xscale("log", base=2)
    levels = sorted({r["max_concurrency"] for r in rows})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("max concurrency (requests in flight)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{os.path.basename(rows[0]['model'].rstrip('/'))}: {rows[0]['input_len_max']} in, {rows[0]['output_len_max']} out"
                 f" ({bc.device_name()})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if any(b not in ("pagedserve", "hf") for b in backends):
        raise SystemExit(f"error: --backend takes pagedserve, hf or both comma-separated, got {args.backend!r}")
    if args.base_url and len(backends) > 1:
        raise SystemExit("error: --base-url measures one running server: name one --backend (its label)")
    levels = {b: _levels(args.hf_sweep_concurrency if b == "hf" and args.hf_sweep_concurrency else args.sweep_concurrency,
                         args.max_concurrency) for b in backends}
    num_prompts = {b: args.hf_num_prompts if b == "hf" and args.hf_num_prompts else args.num_prompts for b in backends}
    vocab, specials = _vocab(args)
    most = max([args.num_prompts] + list(num_prompts.values()) + [c or 0 for b in backends for c in levels[b]])
    requests = bc.make_requests(argparse.Namespace(**{**vars(args), "num_prompts": most}), vocab, specials)
    warm_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 1, "num_prompts": args.num_warmups})
    warmup = [bc.Request(r.prompt_token_ids, min(r.output_len, 4)) for r in bc.make_requests(warm_args, vocab, specials)] \
        if args.num_warmups else []
    rows = []
    for backend in backends:
        with Server(backend, args) as server:
            for c in levels[backend]:
                rows.append(run_one(args, backend, server.base_url, c, max(num_prompts[backend], c or 0), requests, warmup))
    rows = [bc.finish(r, None, __file__, argv) for r in rows]
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    if args.sweep_concurrency:
        write_sweep(rows, args.sweep_csv, args.sweep_png)
    return rows


def _levels(sweep: str | None, max_concurrency: int | None) -> list[int | None]:
    return [int(c) for c in sweep.split(",")] if sweep else [max_concurrency]


def _vocab(args: argparse.Namespace) -> tuple[int, list[int]]:
    source = args.tokenizer or (args.model if os.path.isfile(os.path.join(args.model, "config.json")) else None)
    if source:
        return bc.read_config(source)["vocab_size"], bc.special_token_ids(source)
    if not args.vocab_size:
        raise SystemExit("error: --model is no local checkpoint: pass --tokenizer DIR or --vocab-size N")
    return args.vocab_size, []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="pagedserve",
                   help="pagedserve, hf, or 'pagedserve,hf' (with --sweep-concurrency); the server started here, "
                        "or only a label with --base-url")
    p.add_argument("--base-url", default=None, help="a running server (e.g. http://127.0.0.1:8000): start none")
    p.add_argument("--model", required=True, help="checkpoint directory (served, and read for vocab_size); "
                                                   "or the served name, with --tokenizer / --vocab-size")
    p.add_argument("--served-model-name", default=None, help="'model' field sent (default: --model)")
    p.add_argument("--tokenizer", default=None, help="checkpoint directory to read vocab_size and special ids from")
    p.add_argument("--vocab-size", type=int, default=None, help="token ids are drawn below this (no checkpoint at hand)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--num-warmups", type=int, default=1, help="short requests sent (untimed) before the run")
    p.add_argument("--output-json", help="write the JSON summaries here (one line per run)")
    bc.add_workload_args(p, input_len=1024, output_len=128)
    g = p.add_argument_group("servers started here (no --base-url)")
    g.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for the started server, e.g. --server-arg=--load-format=dummy (repeatable)")
    g.add_argument("--server-timeout", type=float, default=600, help="seconds to wait for /health")
    g.add_argument("--server-log", default=None, help="the server's output (default: a temporary file)")
    g = p.add_argument_group("concurrency sweep")
    g.add_argument("--sweep-concurrency", default=None, help="e.g. 1,4,16,64: one run per level and backend "
                                                             "(max(--num-prompts, level) requests, all at once)")
    g.add_argument("--hf-sweep-concurrency", default=None,
                   help="levels for the hf backend only (its server runs one request at a time, so its throughput "
                        "is flat and its runs are slow: fewer levels save minutes)")
    g.add_argument("--hf-num-prompts", type=int, default=None, help="--num-prompts for the hf backend only")
    g.add_argument("--sweep-csv", default="serve_sweep.csv")
    g.add_argument("--sweep-png", default="serve_sweep.png", help="plot (needs matplotlib); '' for none")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
