"""The tensor-parallel group of one worker process, and the collectives the model needs.

    rank r of N:   x ──column-parallel──▶ local heads / local MLP slice ──row-parallel──▶ partial
                   partial ──all_reduce──▶ full hidden states (identical on every rank)
                   local logits [S, V/N] ──all_gather──▶ full logits [S, V] (identical on every rank)
                   greedy: local best keys [S] ──all_reduce(max)──▶ the whole vocabulary's argmax

With tensor_parallel_size 1 no process group exists at all: `get_tp_group()` returns a group of
size 1 whose collectives return their input.

All-reduce on CUDA ranks of one node: messages up to 8 MiB (every decode step's) go over torch
symmetric memory in one kernel (gpu_workers/symm_all_reduce.py; PAGEDSERVE_CUSTOM_ALL_REDUCE=0 turns
it off), larger ones and every other case over NCCL (gloo on CPU). The row-parallel layers' sums are
reduced together with the residual add and RMSNorm that follow them (`all_reduce_add_rms_norm`; one
launch where the symmetric path takes the message, PAGEDSERVE_FUSED_ALL_REDUCE=0 turns that off).

Rendezvous: on one node the store is a file in the engine's private 0700 directory (nothing listens
on a network port for it), and gloo/NCCL traffic stays on the loopback interface unless the user
names one. Across nodes it is torch.distributed's TCP store at master_addr:master_port, hosted by
global rank 0 (on node 0).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpu_workers.symm_all_reduce import SymmMemAllReduce, create_symm_all_reduce
from ipc import envs
from ipc.config import ParallelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPGroup:
    """This process's rank in the tensor-parallel group. `group` is None for a single rank (and for
    the fake groups tests use to build one rank's model in-process, which never communicate)."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    custom_all_reduce: SymmMemAllReduce | None = None
    """All-reduce over symmetric memory (CUDA ranks on one node), for the messages it takes."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks. Callers must use the returned tensor: it is either x, reduced
        in place (NCCL, gloo), or a new tensor (the symmetric-memory path, which leaves x as it was)."""
        if self.world_size == 1:
            return x
        if self.custom_all_reduce is not None:
            out = self.custom_all_reduce.all_reduce(x)  # None: not a message it takes
            if out is not None:
                return out
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise max of `x` over the ranks, in place (NCCL, gloo); returns x."""
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float, slot: int | None = None, prefetch: torch.Tensor | None = None,
                                pushed: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(RMSNorm(sum of x + residual), sum of x + residual) in one fused launch where the
        symmetric-memory path takes x; None otherwise (the caller reduces, then norms). `slot`,
        `prefetch` (the next matmul's weight), `pushed` (x's matmul pushed it, see matmul_push): see
        SymmMemAllReduce.add_rms_norm."""
        if self.custom_all_reduce is None:
            return None
        return self.custom_all_reduce.add_rms_norm(x, residual, weight, eps, slot, prefetch, pushed)

    def matmul_push(self, rows: int, hidden: int, x: torch.Tensor, slot: int | None):
        """(peers, slot) where a row-parallel matmul making [rows, hidden] partial sums of x's dtype for
        `all_reduce_add_rms_norm(..., slot)` pushes them to the peers itself (kernels/gemv.py); else None.
        See SymmMemAllReduce.matmul_push."""
        if self.custom_all_reduce is None:
            return None
        return self.custom_all_reduce.matmul_push(rows, hidden, x.dtype, x.device, slot)

    def matmul_reduce(self, rows: int, hidden: int, x: torch.Tensor, slot: int | None):
        """(peers, slot) where a row-parallel matmul making [rows, hidden] partial sums of x's dtype sums
        them over the ranks in its own epilogue (kernels.gemv.reduce_gemv); else None. See
        SymmMemAllReduce.matmul_reduce."""
        if self.custom_all_reduce is None:
            return None
        return self.custom_all_reduce.matmul_reduce(rows, hidden, x.dtype, x.device, slot)

    def embedding_rms_norm(self, input_ids: torch.Tensor, table: torch.Tensor, vocab_start: int,
                           weight: torch.Tensor, eps: float, prefetch: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(RMSNorm(e), e) for e the embedding of input_ids, this rank holding rows [vocab_start,
        vocab_start + len(table)) of a vocab-parallel table: lookup, all-reduce and norm in one launch
        where the symmetric-memory path takes the message; None otherwise (see
        SymmMemAllReduce.embedding_rms_norm)."""
        if self.custom_all_reduce is None:
            return None
        return self.custom_all_reduce.embedding_rms_norm(input_ids, table, vocab_start, weight, eps, prefetch)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim`, rank 0 first."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        if x.is_cuda:
            out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)  # [world, *x.shape]
            parts = out.unbind(0)
        else:  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


_TP_GROUP = TPGroup()


def get_tp_group() -> TPGroup:
    """The group layers shard over; size 1 until `init_distributed` (or `set_tp_group`) ran."""
    return _TP_GROUP


def set_tp_group(group: TPGroup) -> TPGroup:
    """Install `group` (tests build one rank's model in-process with TPGroup(rank, size)); returns
    the previous one."""
    global _TP_GROUP
    previous, _TP_GROUP = _TP_GROUP, group
    return previous


def ranks_per_node(parallel: ParallelConfig) -> int:
    return parallel.tensor_parallel_size // parallel.nnodes


def local_rank(parallel: ParallelConfig, rank: int) -> int:
    """Index of global `rank` among its node's ranks (its GPU index on that node)."""
    return rank - parallel.node_rank * ranks_per_node(parallel)


def init_method(parallel: ParallelConfig, ipc_root: str) -> str:
    if parallel.nnodes == 1:
        return f"file://{os.path.join(ipc_root, 'tp-store')}"
    return f"tcp://{parallel.master_addr}:{parallel.master_port}"


def init_distributed(parallel: ParallelConfig, rank: int, device: str, ipc_root: str) -> TPGroup:
    """Join the tensor-parallel group as global `rank` (blocks until every rank joined). NCCL on
    CUDA (the process's GPU is set first), plus the symmetric-memory all-reduce when the ranks share
    one node; gloo on CPU. A no-op for tensor_parallel_size 1."""
    world_size = parallel.tensor_parallel_size
    if world_size == 1:
        set_tp_group(TPGroup())
        return get_tp_group()
    if parallel.nnodes == 1:
        envs.pin_collectives_to_loopback()
    kwargs = {}
    if device == "cuda":
        if torch.cuda.device_count() < ranks_per_node(parallel):
            raise ValueError(f"tensor_parallel_size {world_size} over nnodes {parallel.nnodes} needs "
                             f"{ranks_per_node(parallel)} GPUs per node; this one has {torch.cuda.device_count()}")
        cuda = torch.device("cuda", local_rank(parallel, rank))
        torch.cuda.set_device(cuda)
        kwargs["device_id"] = cuda
        # A rank's CPU work is small tensors for the GPU; N ranks each spinning a thread pool as
        # wide as the host starve each other (the cost shows at every step).
        torch.set_num_threads(1)
    else:
        # Ranks of one node share its cores: without this, N ranks each start a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_per_node(parallel)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=init_method(parallel, ipc_root),
                            rank=rank, world_size=world_size, **kwargs)
    logger.info("rank %d of %d joined the tensor-parallel group (%s)", rank, world_size, dist.get_backend())
    custom = None
    # Collective: every rank must take this branch alike, as they do (same config, same inherited
    # environment); set-up failures turn it off on every rank at once, never on some.
    if envs.custom_all_reduce(device, parallel.nnodes):
        custom = create_symm_all_reduce(dist.group.WORLD, rank, world_size, kwargs["device_id"],
                                        peers=range(ranks_per_node(parallel)), fused=envs.fused_all_reduce())
    set_tp_group(TPGroup(rank, world_size, dist.group.WORLD, custom))
    return get_tp_group()


def destroy_distributed() -> None:
    set_tp_group(TPGroup())  # drops this module's reference to the symmetric buffer first
    if dist.is_initialized():
        dist.destroy_process_group()
