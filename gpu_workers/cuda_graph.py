"""CUDA graphs for decode steps.

A decode step of a small batch is bound by kernel-launch overhead, not by the GPU: each layer launches
a dozen kernels. At start-up we capture the model's forward once per batch-size bucket over static
input buffers; a decode step copies its inputs into those buffers (padded to the next bucket) and
replays the graph.

    bucket 8:  input_ids [t0 t1 t2 t3 t4 -  -  - ]   padding rows: slot -1 (no cache write),
               seq_lens  [l0 l1 l2 l3 l4 1  1  1 ]   context of 1 token in block 0; their outputs
               tables    [b0 b1 b2 b3 b4 0  0  0 ]   are discarded.

The attention metadata of a graph says max_seq_len = max_model_len, so the decode kernel's split count
is fixed at capture time; splits past a sequence's end exit at once.
"""

from __future__ import annotations

import logging

import torch

from gpu_workers.attention.base import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256 + 1, 16)) + list(range(288, 1024 + 1, 32))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class CUDAGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.buckets = batch_size_buckets(max_num_seqs)
        max_bs = self.buckets[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_seqs=bs, num_tokens=bs, max_query_len=1, max_seq_len=self.max_model_len,
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
            query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs, is_decode_only=True)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        for bs in reversed(self.buckets):
            meta = self._meta(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta)
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self.model(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bs] = self.model(*args)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and meta.num_seqs <= self.buckets[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the smallest graph that fits; returns hidden states [num_seqs, hidden]."""
        n = meta.num_seqs
        bs = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > n:  # padding rows: write nowhere, attend to one slot of block 0
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
            self.block_tables[n:bs, 0].fill_(0)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
