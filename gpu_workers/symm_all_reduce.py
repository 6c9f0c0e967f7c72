"""All-reduce over torch's symmetric memory, for tensor-parallel ranks on one node (NVLink): the
small and medium messages of decode steps ([batch, hidden] after every row-parallel layer) in one
kernel launch, where NCCL pays a fixed latency that dominates them. Larger messages go to NCCL.

Each rank allocates one buffer of `max_bytes` with `symm_mem.empty` and exchanges it with its peers
once (`symm_mem.rendezvous`, CUDA IPC): from then on every rank can load and store every peer's
buffer directly. The kernels are torch's own (torch.ops.symm_mem, CUDASymmetricMemoryOps.cu):

    one-shot  (copy x into my buffer | barrier | out = buf_0 + buf_1 + ... read from every peer | barrier)
              one launch (the copy is fused); each rank reads the whole message from every peer.
    two-shot  (copy x into my buffer) then one launch of
              (barrier | rank r sums slice r of every buffer into its own | barrier | gather slices | barrier)
              each rank reads about twice the message in all, whatever the number of ranks: for
              large messages on 4 or 8 ranks.

Invariants:
- Every rank must pick the same path for the same call, or ranks wait in different collectives
  forever. `pick_algorithm` therefore looks only at dtype, byte size and world size, which are the
  same on every rank (the model runs the same shapes everywhere); never at addresses or timing.
- Consecutive calls reuse the one buffer safely: each kernel ends with a cross-rank barrier, so
  once a rank's kernel has finished, no peer still reads its buffer and the next copy may land.
- Capturable in a CUDA graph: the buffer (and the peers' mappings) never move, the ops only
  launch kernels on the current stream (outputs come from the graph's pool), and the barriers'
  signal flags return to zero after every use, so a graph can be replayed any number of times.
- Sums are taken in rank order on every rank: all ranks get bitwise identical results, as the
  tensor-parallel design requires (every rank samples from the same logits).

Fused with the residual add and RMSNorm (`add_rms_norm`): a row-parallel layer's partial sums are
reduced by kernels/all_reduce_rms_norm.py, in a second symmetric buffer of its own, together with the
norm that follows them (one launch instead of two, the reduced rows never written out). The same
kernel takes the vocab-parallel embedding (`embedding_rms_norm`): the lookup in this rank's slice of the
table, the all-reduce and the first layer's norm, in one launch. It takes
exactly the messages the one-shot kernel would; others are reduced first, then normed. Its ranks poll
the pushed rows themselves (the flag-free protocol), or with $PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT=0
signal flags behind a release fence (the A/B baseline).

Set-up (`create_symm_all_reduce`) either succeeds on every rank or is off on every rank: each step's
outcome is agreed over NCCL before the next, and any failure (import, P2P access, rendezvous, a
wrong sum in the self-test) logs why and leaves NCCL in charge. NVLink multicast (multimem ops) is
not used: it is off on our machines (TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import enum
import logging
import os
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.distributed as dist

from ipc import envs

if TYPE_CHECKING:
    from kernels.all_reduce_rms_norm import PeerBuffers

logger = logging.getLogger(__name__)

KiB, MiB = 1 << 10, 1 << 20
MAX_BYTES = 8 * MiB
"""Largest message sent over symmetric memory (the buffer's size); NCCL takes larger ones."""
ONE_SHOT_BELOW: dict[int, int | None] = {2: None, 4: 512 * KiB, 8: 256 * KiB}
"""Per world size: messages below this many bytes go one-shot, the rest two-shot (None: always
one-shot). With 2 ranks one-shot reads no more than two-shot and needs one barrier less; with more
ranks each one-shot reads every peer's whole message, which costs more than it saves past these
sizes (the thresholds of vLLM's custom all-reduce, csrc/custom_all_reduce.cuh)."""
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)  # what torch's kernels dispatch on
ALIGNMENT = 16  # bytes: messages of whole 16-byte vectors take the kernels' widest loads


class Algorithm(enum.Enum):
    NCCL = "nccl"
    ONE_SHOT = "one_shot"
    TWO_SHOT = "two_shot"


def pick_algorithm(nbytes: int, dtype: torch.dtype, world_size: int, max_bytes: int = MAX_BYTES) -> Algorithm:
    """How a CUDA tensor of `nbytes` bytes of `dtype` is all-reduced over `world_size` ranks.

    Depends only on values every rank shares (never on addresses or strides): all ranks must make
    the same choice for the same call."""
    if (dtype not in SUPPORTED_DTYPES or world_size not in ONE_SHOT_BELOW or nbytes == 0
            or nbytes > max_bytes or nbytes % ALIGNMENT):
        return Algorithm.NCCL
    below = ONE_SHOT_BELOW[world_size]
    return Algorithm.ONE_SHOT if below is None or nbytes < below else Algorithm.TWO_SHOT


def choose_algorithm(x: torch.Tensor, world_size: int, max_bytes: int = MAX_BYTES) -> Algorithm:
    """`pick_algorithm` for tensor `x`; NCCL (or gloo) for anything not on a GPU."""
    if not x.is_cuda:
        return Algorithm.NCCL
    return pick_algorithm(x.numel() * x.element_size(), x.dtype, world_size, max_bytes)


class SymmMemAllReduce:
    """One symmetric buffer of `max_bytes`, rendezvoused over `group`; `all_reduce` sums a tensor
    through it, or returns None where NCCL should (see `pick_algorithm`)."""

    def __init__(self, buffer: torch.Tensor, group: dist.ProcessGroup, rank: int, world_size: int,
                 fused_buffer: torch.Tensor | None = None, fused_peers: PeerBuffers | None = None) -> None:
        self.buffer = buffer  # [max_bytes] uint8, symmetric: every peer maps it
        self.fused_buffer = fused_buffer  # kept alive: every peer maps it
        self.fused_peers = fused_peers  # None: add_rms_norm always declines
        self.group_name = group.group_name
        self.rank = rank
        self.world_size = world_size
        self.max_bytes = buffer.numel()
        # Flat views of the buffer, one per dtype: slices of them start at the buffer's first byte.
        self._flat = {dtype: buffer.view(dtype) for dtype in SUPPORTED_DTYPES}

    @classmethod
    def allocate(cls, group: dist.ProcessGroup, rank: int, world_size: int, device: torch.device,
                 max_bytes: int = MAX_BYTES, fused: bool = True) -> SymmMemAllReduce:
        """Allocate the buffer (and with `fused`, the fused kernel's) and exchange it with every rank of
        `group` (collective; raises on failure)."""
        import torch.distributed._symmetric_memory as symm_mem
        from torch.torch_version import TorchVersion

        # Nothing here uses NVLink multicast: keep the rendezvous from creating a multicast object
        # (which can take a shared host's GPUs down), unless the user asked for one explicitly.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        if TorchVersion(torch.__version__) < (2, 11):
            # Older torch finds the group's store only through this (deprecated, a no-op need, in 2.11).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                symm_mem.enable_symm_mem_for_group(group.group_name)
        handle = symm_mem.rendezvous(buffer, group.group_name)
        if handle.world_size != world_size or handle.rank != rank:
            raise RuntimeError(f"rendezvous gave rank {handle.rank} of {handle.world_size}, "
                               f"expected {rank} of {world_size}")
        if not fused:
            return cls(buffer, group, rank, world_size)
        from kernels import all_reduce_rms_norm as fused_kernel  # triton: imported where it is used

        # The fused kernel takes what one-shot takes; each buffer holds a region per rank and slot.
        data_bytes = min(max_bytes, ONE_SHOT_BELOW[world_size] or max_bytes)
        fused_buffer = symm_mem.empty(fused_kernel.buffer_bytes(data_bytes, world_size), dtype=torch.uint8, device=device)
        lamport = envs.fused_all_reduce_lamport()
        if lamport:  # empty slots hold the sentinel, epochs start at 0
            fused_kernel.init_lamport(fused_buffer, data_bytes, world_size)
        else:  # flags and epochs start at 0
            fused_buffer.zero_()
        torch.cuda.synchronize(device)  # ... before any peer's first push or signal (after the set-up's NCCL steps)
        fused_handle = symm_mem.rendezvous(fused_buffer, group.group_name)
        bases = tuple(int(p) for p in fused_handle.buffer_ptrs)
        ptrs = torch.tensor(bases, dtype=torch.int64, device=device)
        return cls(buffer, group, rank, world_size, fused_buffer,
                   fused_kernel.PeerBuffers(ptrs, rank, world_size, data_bytes, lamport, bases))

    def route(self, x: torch.Tensor) -> Algorithm:
        return choose_algorithm(x, self.world_size, self.max_bytes)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor | None:
        """The sum of `x` over the ranks as a new tensor (x is left as it was), or None when the
        message is not for this path (NCCL's then)."""
        algorithm = self.route(x)
        if algorithm is Algorithm.ONE_SHOT:
            return self.one_shot(x)
        if algorithm is Algorithm.TWO_SHOT:
            return self.two_shot(x)
        return None

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     slot: int | None = None, prefetch: torch.Tensor | None = None, pushed: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(RMSNorm(sum of x over the ranks + residual), that sum + residual) in one fused launch, or
        None when `x` is not for it (then reduce and norm apart). Takes what one-shot would take: the
        choice rests on shape, dtype and world size alone, as on every rank. `slot` 0 / 1: callers that
        never pass the same one twice in a row save a barrier, or (flag-free) a counter read
        (kernels/all_reduce_rms_norm.py). `prefetch`:
        the next matmul's weight, partly prefetched into L2 while the kernel waits (kernels/prefetch.py).
        `pushed`: x came from a matmul that pushed it into `slot` itself, as `matmul_push` allowed (then
        the fused kernel only polls)."""
        if pushed and self.matmul_push(*x.shape, x.dtype, x.device, slot) is None:
            raise ValueError(f"a pushed {tuple(x.shape)} {x.dtype} message in slot {slot!r}: not one matmul_push takes")
        if x.dim() != 2 or not self._fused_takes(*x.shape, x.dtype, x.device):
            return None
        from kernels import all_reduce_rms_norm as fused_kernel

        return fused_kernel.all_reduce_add_rms_norm(x, residual, weight, eps, self.fused_peers, slot, prefetch, pushed)

    def matmul_push(self, rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
                    slot: int | None) -> tuple[PeerBuffers, int] | None:
        """(peers, slot) where the row-parallel matmul making a [rows, hidden] message of partial sums for
        `add_rms_norm(..., slot)` pushes it into the peers' staging slot itself (kernels/gemv.py's `push`)
        and that call then only polls; else None. Both sides ask this with the same shape, dtype and
        slot, as every rank does: none of them can push while another waits for a push that never comes.
        Taken by the flag-free protocol's slots 0 / 1 where the matmul runs on the GEMV
        (kernels.gemv.takes_row_parallel)."""
        from kernels import gemv

        peers = self.fused_peers
        if (peers is None or not peers.lamport or slot not in (0, 1)
                or not gemv.takes_row_parallel(rows, hidden, dtype, device, push=True)
                or not self._fused_takes(rows, hidden, dtype, device)):
            return None
        return peers, slot

    def matmul_reduce(self, rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
                      slot: int | None) -> tuple[PeerBuffers, int] | None:
        """(peers, slot) where the row-parallel matmul making a [rows, hidden] message of partial sums
        sums it over the ranks itself, in slot `slot` of the flag-free buffers, and adds the residual
        (kernels.gemv.reduce_gemv; a plain RMSNorm follows); else None. Shape, dtype and slot alone, as
        on every rank: where one rank reduces in its matmul, all do."""
        from kernels import gemv

        peers = self.fused_peers
        if (peers is None or not peers.lamport or slot not in (0, 1)
                or not gemv.takes_reduce(rows, hidden, dtype, device)
                or not self._fused_takes(rows, hidden, dtype, device)):
            return None
        return peers, slot

    def embedding_rms_norm(self, input_ids: torch.Tensor, table: torch.Tensor, vocab_start: int, weight: torch.Tensor,
                           eps: float, prefetch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(RMSNorm(e), e) for e the embedding of input_ids in a vocab-parallel table (this rank's slice
        `table`, from row `vocab_start`): the lookup, the all-reduce of the ranks' lookups and the norm
        in one launch; or None where `add_rms_norm` would decline a message of that size (then look up,
        reduce and norm apart)."""
        if not self._fused_takes(input_ids.shape[0], table.shape[1], table.dtype, table.device):
            return None
        from kernels import all_reduce_rms_norm as fused_kernel

        return fused_kernel.embedding_all_reduce_rms_norm(input_ids, table, vocab_start, weight, eps,
                                                          self.fused_peers, prefetch)

    def _fused_takes(self, rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the fused kernel takes a [rows, hidden] message: what one-shot would take, and what its
        buffers hold. Shape, dtype and world size alone, as on every rank."""
        from kernels import all_reduce_rms_norm as fused_kernel

        return (self.fused_peers is not None and device.type == "cuda"
                and pick_algorithm(rows * hidden * dtype.itemsize, dtype, self.world_size, self.max_bytes)
                is Algorithm.ONE_SHOT and fused_kernel.fits_rows(rows, hidden, dtype, self.fused_peers))

    def _staged(self, x: torch.Tensor) -> torch.Tensor:
        return self._flat[x.dtype][:x.numel()].view(x.shape)  # this rank's buffer, shaped like x

    def one_shot(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks in one kernel (eligible x only: see `pick_algorithm`)."""
        staged = self._staged(x)
        aligned = x.data_ptr() % ALIGNMENT == 0 and x.storage_offset() * x.element_size() % ALIGNMENT == 0
        if x.is_contiguous() and aligned:
            # The kernel copies x into this rank's buffer itself. (The other branch launches the same
            # reduction kernel, so ranks that branch differently still meet in the same barriers.)
            return torch.ops.symm_mem.one_shot_all_reduce_copy(staged, x, "sum", self.group_name)
        staged.copy_(x)
        return torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name)

    def two_shot(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks: reduce-scatter then all-gather through the buffers."""
        staged = self._staged(x)
        staged.copy_(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", self.group_name, out)

    def self_test(self) -> None:
        """The kernels `pick_algorithm` can choose for this world size, on small integers (exact in
        bfloat16), compared element by element with the known sum; raises on the first wrong one.
        Collective."""
        device = self.buffer.device
        cases = [(2048, self.one_shot), (1 << 18, self.one_shot)]
        if ONE_SHOT_BELOW[self.world_size] is not None:
            cases.append((1 << 18, self.two_shot))
        for dtype in SUPPORTED_DTYPES:
            for numel, reduce in cases:
                base = torch.arange(numel, device=device) % 17
                x = (base + self.rank).to(dtype)
                expected = (base * self.world_size + self.world_size * (self.world_size - 1) // 2).to(dtype)
                if not torch.equal(reduce(x), expected):
                    raise RuntimeError(f"{reduce.__name__} of {numel} {dtype} elements gave wrong sums")
            if self.fused_peers is not None:
                self._self_test_fused(dtype)
        torch.cuda.synchronize(device)

    def _self_test_fused(self, dtype: torch.dtype) -> None:
        device, world = self.buffer.device, self.world_size
        base = (torch.arange(64 * 1024, device=device) % 17).view(64, 1024)
        expected = (base * world + world * (world - 1) // 2 + 1).to(dtype)  # + a residual of ones
        weight = torch.ones(1024, dtype=dtype, device=device)
        out = self.add_rms_norm((base + self.rank).to(dtype), torch.ones_like(expected), weight, 1e-6)
        if out is None or not torch.equal(out[1], expected):
            raise RuntimeError(f"the fused all-reduce gave wrong sums ({dtype})")
        e = expected.float()
        normed = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)
        if not torch.allclose(out[0].float(), normed, rtol=1e-2, atol=1e-2):
            raise RuntimeError(f"the fused all-reduce gave a wrong RMSNorm ({dtype})")


# ---------------------------------------------------------------- set-up, on every rank or none


def why_unsupported(world_size: int, device: torch.device, peers: Sequence[int]) -> str | None:
    """Why this rank cannot use symmetric memory with these peer devices, or None if it can."""
    if world_size not in ONE_SHOT_BELOW:
        return f"world size {world_size} is not one of {sorted(ONE_SHOT_BELOW)}"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as e:
        return f"torch.distributed._symmetric_memory does not import ({e})"
    ops = ("one_shot_all_reduce", "one_shot_all_reduce_copy", "two_shot_all_reduce_out")
    missing = [op for op in ops if not hasattr(torch.ops.symm_mem, op)]
    if missing:
        return f"torch {torch.__version__} lacks torch.ops.symm_mem.{', '.join(missing)}"
    backend = os.environ.get("TORCH_SYMMMEM", "CUDA")
    if backend != "CUDA":
        return f"TORCH_SYMMMEM={backend}: the one-/two-shot kernels are used with the CUDA backend only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(device)} < 8.0"
    blocked = [p for p in peers if p != device.index and not torch.cuda.can_device_access_peer(device.index, p)]
    if blocked:
        return f"cuda:{device.index} has no peer access to cuda:{blocked}"
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes % MiB == 0 else f"{nbytes // KiB} KiB"


def _attempt(what: str, fn: Callable[[], object]) -> tuple[object, str | None]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - any failure means NCCL, with the reason logged
        return None, f"{what} failed: {type(e).__name__}: {e}"


def _all_ranks_ok(failure: str | None, group: dist.ProcessGroup, device: torch.device) -> bool:
    """True when no rank of `group` failed (an NCCL all-reduce of the flags; every rank calls this
    the same number of times, so none waits alone)."""
    flag = torch.tensor([0 if failure else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def create_symm_all_reduce(group: dist.ProcessGroup, rank: int, world_size: int, device: torch.device,
                           peers: Sequence[int], max_bytes: int = MAX_BYTES, fused: bool = True) -> SymmMemAllReduce | None:
    """The symmetric-memory all-reduce of this rank, or None on every rank (with a warning saying why)
    if any rank cannot use it. Collective over `group` (NCCL, already initialized); `peers` are the
    device indices of the group's ranks on this node; `fused`: also the all-reduce + RMSNorm kernel."""
    reason, failure = _attempt("checks", lambda: why_unsupported(world_size, device, peers))
    failure = failure or reason
    if _all_ranks_ok(failure, group, device):
        comm, failure = _attempt("allocation and rendezvous",
                                 lambda: SymmMemAllReduce.allocate(group, rank, world_size, device, max_bytes, fused))
        if _all_ranks_ok(failure, group, device):
            _, failure = _attempt("self-test", comm.self_test)
            if _all_ranks_ok(failure, group, device):
                if rank == 0:
                    below = ONE_SHOT_BELOW[world_size]
                    logger.warning("all-reduce over symmetric memory for messages up to %s (one-shot%s%s), "
                                   "NCCL above", _size(max_bytes),
                                   "" if below is None else f" below {_size(below)}, two-shot from there",
                                   "" if comm.fused_peers is None else ", fused with the RMSNorm after it"
                                   + (", flag-free" if comm.fused_peers.lamport else ", with flags"))
                return comm
    logger.warning("rank %d: all-reduce over symmetric memory is off, NCCL takes every message: %s", rank,
                   failure or "another rank could not set it up")
    return None
