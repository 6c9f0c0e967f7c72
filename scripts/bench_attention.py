"""Our Triton attention kernels (paged decode, paged varlen prefill) vs torch SDPA, at real model shapes.

    python scripts/bench_attention.py --output-json /tmp/attention.json   # CUDA: bf16, Llama-3.1-8B + Qwen3-0.6B
    python scripts/bench_attention.py --decode-sweep     # decode time per split count and tile config
    TRITON_INTERPRET=1 python scripts/bench_attention.py --device cpu --iters 1   # smoke test: float32, tiny shapes

Ours reads a paged cache (block ids shuffled, as after a long-running server frees and reuses blocks). SDPA
gets the same context as dense contiguous [num_seqs, num_kv_heads, context, head_dim] tensors with
enable_gqa, what a dense engine would hand it; every sequence of a row has the same length, so SDPA pads
nothing. Masks: a decode's one query sees its whole context (no mask); a prefill is_causal; a chunk after
a cached prefix uses causal_lower_right (its queries are the context's last positions).

Each side is timed as one CUDA graph of --iters back-to-back calls (launch overhead included, as in the
engine's graphs). The calls cycle through copies of the inputs (at most one per model layer) until about
256 MiB is read, so a short context is not served from L2, as it would not be between a real step's layers.
  ours/sdpa  time ratio (< 1: ours is faster)
  rel err    ||ours - sdpa|| / ||sdpa|| on the same inputs
  rate       decode: GB/s of K/V, query and output moved; prefill and chunk: TFLOP/s of QK^T and PV
             (4 * num_heads * head_dim flops per visible (query, key) pair)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as bc  # noqa: E402
from kernels import choose_num_splits, decode_attention, prefill_attention  # noqa: E402

_ROTATE_BYTES = 256 << 20  # K/V read per cycle of input copies: several times an H100/H200's 50 MB L2


class Model(NamedTuple):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int  # caps the input copies: a step never reads more distinct caches than this


class Case(NamedTuple):
    num_seqs: int
    query_len: int  # new tokens per sequence: 1 for a decode
    context_len: int  # keys per sequence, its own queries included (cached prefix = context_len - query_len)

    @property
    def kind(self) -> str:
        return "decode" if self.query_len == 1 else "prefill" if self.query_len == self.context_len else "chunk"

    @property
    def label(self) -> str:
        cached = self.context_len - self.query_len
        if self.kind == "chunk":
            return f"{self.num_seqs} x {self.query_len}+{cached} cached"
        return f"{self.num_seqs} x {self.context_len}"


MODELS = {"llama-3.1-8b": Model(32, 8, 128, 32), "qwen3-0.6b": Model(16, 8, 128, 28)}
CASES = [Case(1, 1, 512), Case(1, 1, 4096), Case(64, 1, 1024), Case(256, 1, 512),
         Case(1, 1024, 1024), Case(8, 1024, 1024), Case(4, 512, 1536)]
# --decode-sweep: decode at each split count, also for one rank of Llama-3.1-8B at TP=2 (the short-context,
# moderate-batch case that costs a TP=2 batch-64 step ~0.75 ms)
SWEEP_MODELS = {"llama-3.1-8b": MODELS["llama-3.1-8b"], "llama-8b/tp2": Model(16, 4, 128, 32)}
SWEEP_CASES = [Case(1, 1, 512), Case(16, 1, 256), Case(64, 1, 256), Case(64, 1, 512), Case(64, 1, 1024),
               Case(256, 1, 256)]
SWEEP_SPLITS = [None, 1, 2, 4, 8, 16]  # None: the kernel's own choice (choose_num_splits)
SWEEP_CONFIGS = [None, (32, 4, 2), (64, 2, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2)]
"""(BLOCK_N, num_warps, num_stages) tried at each split count; None: the kernel's own (_launch_config)."""
# --small: a split decode (3 x 150 makes 2 splits under the interpreter), several query tiles (70 > 64)
SMALL_MODELS = {"tiny-gqa": Model(4, 2, 32, 2)}
SMALL_CASES = [Case(1, 1, 40), Case(3, 1, 150), Case(1, 70, 70), Case(2, 20, 20), Case(2, 8, 40)]


class Inputs(NamedTuple):
    query: torch.Tensor  # [num_seqs * query_len, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, blocks_per_seq] int32, shuffled ids
    seq_lens: torch.Tensor  # [num_seqs] int32, all context_len
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    q_dense: torch.Tensor  # [num_seqs, num_heads, query_len, head_dim], contiguous
    k_dense: torch.Tensor  # [num_seqs, num_kv_heads, context_len, head_dim], contiguous
    v_dense: torch.Tensor


def make_inputs(model: Model, case: Case, block_size: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Random paged caches (one spare block of noise; the last block's unused slots are noise too) and the
    same context gathered into dense tensors."""
    n, q_len, ctx = case
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = n * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks, block_size, model.num_kv_heads, model.head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device=device)[:n * blocks_per_seq].view(n, blocks_per_seq).int()

    def dense(cache: torch.Tensor) -> torch.Tensor:  # [n, num_kv_heads, ctx, head_dim]
        return cache[block_tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()

    query = torch.randn(n * q_len, model.num_heads, model.head_dim, device=device, dtype=dtype)
    seq_lens = torch.full((n,), ctx, dtype=torch.int32, device=device)
    query_start_loc = (torch.arange(n + 1, device=device) * q_len).int()
    q_dense = query.view(n, q_len, model.num_heads, model.head_dim).transpose(1, 2).contiguous()
    return Inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, q_dense,
                  dense(k_cache), dense(v_cache))


def run_ours(x: Inputs, case: Case, scale: float, out: torch.Tensor) -> torch.Tensor:
    if case.kind == "decode":
        return decode_attention(x.query, x.k_cache, x.v_cache, x.block_tables, x.seq_lens, case.context_len,
                                scale, out=out)
    return prefill_attention(x.query, x.k_cache, x.v_cache, x.block_tables, x.query_start_loc, x.seq_lens,
                             case.query_len, scale, out=out)


def run_sdpa(x: Inputs, case: Case, scale: float) -> torch.Tensor:
    """[num_seqs * query_len, num_heads, head_dim], the layout of ours."""
    mask = causal_lower_right(case.query_len, case.context_len) if case.kind == "chunk" else None
    out = F.scaled_dot_product_attention(x.q_dense, x.k_dense, x.v_dense, attn_mask=mask,
                                         is_causal=case.kind == "prefill", scale=scale, enable_gqa=True)
    return out.transpose(1, 2).flatten(0, 1)  # [n, num_heads, q_len, d] -> [n * q_len, num_heads, d]


def sdpa_backend(x: Inputs, case: Case) -> str:
    """The kernel SDPA picks (torch's private chooser). For a chunk, the pick for a call without a mask:
    causal_lower_right itself runs flash when flash accepts the inputs, else efficient, else math."""
    choice = torch._fused_sdp_choice(x.q_dense, x.k_dense, x.v_dense, None, 0.0, case.kind == "prefill",
                                     enable_gqa=True)
    return SDPBackend(choice).name.lower().removesuffix("_attention")


def work(model: Model, case: Case, itemsize: int) -> tuple[float, str]:
    """(amount, unit) of one call, amount scaled so that amount / microseconds is in unit: bytes moved
    for a decode (memory-bound), flops otherwise."""
    n, q_len, ctx = case
    if case.kind == "decode":
        return n * (2 * ctx * model.num_kv_heads + 2 * model.num_heads) * model.head_dim * itemsize / 1e3, "GB/s"
    pairs = q_len * (ctx - q_len) + q_len * (q_len + 1) // 2  # visible (query, key) pairs per sequence
    return 4 * n * model.num_heads * model.head_dim * pairs / 1e6, "TFLOP/s"


def bench_row(name: str, model: Model, case: Case, args: argparse.Namespace) -> dict:
    inputs = inputs_for(model, case, args)
    copies = len(inputs)
    scale = model.head_dim ** -0.5
    out = torch.empty_like(inputs[0].query)
    ours_us = bc.time_us(lambda i: run_ours(inputs[i % copies], case, scale, out), args.iters, args.device)
    sdpa_us = bc.time_us(lambda i: run_sdpa(inputs[i % copies], case, scale), args.iters, args.device)
    ours, ref = run_ours(inputs[0], case, scale, out).float(), run_sdpa(inputs[0], case, scale).float()
    amount, unit = work(model, case, args.dtype.itemsize)
    return dict(model=name, kind=case.kind, shape=case.label, num_seqs=case.num_seqs, query_len=case.query_len,
                context_len=case.context_len, ours_us=ours_us, sdpa_us=sdpa_us, ratio=ours_us / sdpa_us,
                rel_err=((ours - ref).norm() / ref.norm()).item(), unit=unit, ours_rate=amount / ours_us,
                sdpa_rate=amount / sdpa_us, sdpa_backend=sdpa_backend(inputs[0], case), copies=copies)


def inputs_for(model: Model, case: Case, args: argparse.Namespace) -> list[Inputs]:
    """Copies of the inputs to cycle through (see the module docstring)."""
    kv_bytes = 2 * case.num_seqs * case.context_len * model.num_kv_heads * model.head_dim * args.dtype.itemsize
    copies = max(1, min(model.num_layers, -(-_ROTATE_BYTES // kv_bytes))) if args.device.type == "cuda" else 1
    return [make_inputs(model, case, args.block_size, args.dtype, args.device) for _ in range(copies)]


def decode_sweep(args: argparse.Namespace) -> list[dict]:
    """Decode microseconds at each split count with the kernel's own tile config, then the best of every
    (split count, tile config) pair: what choose_num_splits / _launch_config should pick."""
    rows = []
    models, cases = (SMALL_MODELS, [Case(3, 1, 150)]) if args.small else (SWEEP_MODELS, SWEEP_CASES)
    configs = SWEEP_CONFIGS[:2] if args.small else SWEEP_CONFIGS
    if args.sweep_cases:
        cases = [Case(n, 1, ctx) for n, ctx in args.sweep_cases]
    if args.sweep_configs:
        configs = [None] + args.sweep_configs
    splits = args.sweep_splits or SWEEP_SPLITS
    print(f"{'model':13} {'shape':10} {'chosen':>6} " + " ".join(f"{'auto' if n is None else n:>7}" for n in splits)
          + "   best (splits, BLOCK_N, warps, stages)")
    for name, model in models.items():
        for case in cases:
            inputs = inputs_for(model, case, args)
            out, scale = torch.empty_like(inputs[0].query), model.head_dim ** -0.5

            def call(i, splits, config):
                x = inputs[i % len(inputs)]
                return decode_attention(x.query, x.k_cache, x.v_cache, x.block_tables, x.seq_lens, case.context_len,
                                        scale, out=out, num_splits=splits, launch_config=config)

            def time_us(splits, config):
                return bc.time_us(lambda i: call(i, splits, config), args.iters, args.device)

            grid = {(n, c): time_us(n, c) for n in splits for c in configs}
            (best_n, best_c), best_us = min(grid.items(), key=lambda kv: kv[1])
            chosen = choose_num_splits(case.num_seqs, model.num_kv_heads, case.context_len, args.device)
            rows.append(dict(model=name, shape=case.label, chosen_splits=chosen,
                             us_by_splits={str(n or "auto"): grid[(n, None)] for n in splits},
                             best=dict(splits=best_n or "auto", config=best_c or "auto", us=best_us),
                             grid=[dict(splits=n or "auto", config=c or "auto", us=t) for (n, c), t in grid.items()]))
            print(f"{name:13} {case.label:10} {chosen:6} " + " ".join(f"{grid[(n, None)]:7.1f}" for n in splits)
                  + f"   {best_us:.1f} us at ({best_n or 'auto'}, {best_c or 'auto'})", flush=True)
            if args.sweep_configs:  # every config's time at each split count
                for c in configs:
                    print(f"    {str(c or 'auto'):>14}: " + " ".join(f"{grid[(n, c)]:7.1f}" for n in splits), flush=True)
    return rows


def _pair(text: str) -> tuple[int, int]:
    seqs, ctx = text.lower().split("x")
    return int(seqs), int(ctx)


def _config(text: str) -> tuple[int, int, int]:
    block_n, warps, stages = (int(v) for v in text.split(","))
    return block_n, warps, stages


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU (the "
                        "triton 3.6 interpreter computes bf16 tl.dot wrongly)")
    parser.add_argument("--iters", type=int, default=50, help="calls per timed CUDA graph")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                        help="tiny shapes for the interpreter (default: on for --device cpu)")
    parser.add_argument("--decode-sweep", action="store_true", help="decode time per split count instead")
    parser.add_argument("--sweep-cases", nargs="+", type=_pair, metavar="SEQSxCONTEXT",
                        help="--decode-sweep: these decode shapes (e.g. 64x256) instead of its own list")
    parser.add_argument("--sweep-configs", nargs="+", type=_config, metavar="BLOCK_N,WARPS,STAGES",
                        help="--decode-sweep: these tile configs (and the kernel's own) instead of its list")
    parser.add_argument("--sweep-splits", nargs="+", type=lambda v: None if v == "auto" else int(v),
                        help="--decode-sweep: these split counts (auto: the kernel's choice)")
    parser.add_argument("--output-json", help="write the rows, card, date and command here")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu needs TRITON_INTERPRET=1 in the environment")
    args.dtype = getattr(torch, args.dtype if args.dtype != "auto" else
                         "bfloat16" if args.device.type == "cuda" else "float32")
    args.small = args.device.type == "cpu" if args.small is None else args.small
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.decode_sweep:
        summary = dict(benchmark="attention_decode_sweep", dtype=str(args.dtype).removeprefix("torch."),
                       block_size=args.block_size, iters=args.iters, rows=decode_sweep(args))
        return bc.finish(summary, args.output_json, __file__, argv)
    models, cases = (SMALL_MODELS, SMALL_CASES) if args.small else (MODELS, CASES)
    card = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"{card}, {args.dtype}, block_size {args.block_size}, {args.iters} calls per timing")
    print(f"{'model':13} {'kind':7} {'shape':21} {'ours us':>9} {'sdpa us':>9} {'ours/sdpa':>9} "
          f"{'ours rate':>9} {'sdpa rate':>9} {'unit':7} {'rel err':>8}  sdpa kernel")
    rows = []
    for name, model in models.items():
        for case in cases:
            r = bench_row(name, model, case, args)
            rows.append(r)
            print(f"{name:13} {r['kind']:7} {r['shape']:21} {r['ours_us']:9.1f} {r['sdpa_us']:9.1f} "
                  f"{r['ratio']:9.2f} {r['ours_rate']:9.4g} {r['sdpa_rate']:9.4g} {r['unit']:7} "
                  f"{r['rel_err']:8.1e}  {r['sdpa_backend']}", flush=True)
    summary = dict(benchmark="attention", dtype=str(args.dtype).removeprefix("torch."), block_size=args.block_size,
                   iters=args.iters, torch=torch.__version__, rows=rows)
    return bc.finish(summary, args.output_json, __file__, argv)


if __name__ == "__main__":
    main()
