"""Tensor-parallel linear and vocabulary layers (Megatron-style, over `get_tp_group()`; all of it
vanishes at size 1). Each rank keeps its heads' slice of qkv_proj and its slice of gate_up_proj
(column-parallel), the matching input columns of o_proj and down_proj (row-parallel, one all-reduce
each), and its rows of the vocabulary (embedding: masked lookup + all-reduce; LM head: all-gather of
the logits). Weights are plain parameters with a `weight_loader(param, loaded, shard_id)` attribute
that reads only this rank's slice of the checkpoint tensor. Merged projections keep each shard's
slice contiguous:

    qkv_proj.weight rows (rank r): [ q: r's heads | k: r's kv heads | v: r's kv heads ]
    gate_up_proj.weight rows (rank r): [ gate: r's intermediate slice | up: same slice ]
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.distributed import get_tp_group
from gpu_workers.models import elementwise

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Any], None]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Copies a whole checkpoint tensor into `param` (casting dtype, moving device).

    `loaded` is a torch.Tensor or a lazy checkpoint slice (gpu_workers.loader.SafetensorsSlice): both
    have `.shape` and `.narrow(dim, start, length)`, and only what is narrowed gets read."""
    assert shard_id is None, f"unsharded parameter got shard_id {shard_id!r}"
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint tensor shape {tuple(loaded.shape)} != parameter shape {tuple(param.shape)}")
    param.data.copy_(loaded.narrow(0, 0, loaded.shape[0]))


def _new_param(*shape: int) -> nn.Parameter:
    # Uninitialized on purpose: the loader overwrites every value, and skipping init keeps
    # construction of a multi-billion-parameter model fast.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


# ---------------------------------------------------------------- tensor-parallel splits


class HeadSplit(NamedTuple):
    """The attention heads one rank keeps."""

    num_heads: int
    num_kv_heads: int
    kv_head_start: int
    """Index of this rank's first KV head in the checkpoint."""


def check_tensor_parallel(num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int) -> None:
    """ValueError naming the numbers when a model cannot be split over tp_size ranks."""
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide num_attention_heads {num_heads}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"num_key_value_heads {num_kv_heads} must be a multiple or a divisor of "
                         f"tensor_parallel_size {tp_size}")
    if intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide intermediate_size {intermediate_size}")


def split_heads(num_heads: int, num_kv_heads: int, tp_rank: int, tp_size: int) -> HeadSplit:
    """Query heads are split evenly. KV heads are split too when there are at least tp_size of them;
    otherwise each is replicated on tp_size // num_kv_heads consecutive ranks, the ones whose query
    heads attend to it:

        8 q heads, 2 kv heads, tp 4:  rank 0: q0 q1 | kv0   rank 1: q2 q3 | kv0
                                      rank 2: q4 q5 | kv1   rank 3: q6 q7 | kv1
    """
    if num_kv_heads >= tp_size:
        local_kv = num_kv_heads // tp_size
        return HeadSplit(num_heads // tp_size, local_kv, tp_rank * local_kv)
    return HeadSplit(num_heads // tp_size, 1, tp_rank * num_kv_heads // tp_size)


# ---------------------------------------------------------------- linear layers


class Reduced(NamedTuple):
    """A row-parallel layer's output already summed over the ranks, with the residual added, by its
    matmul's own epilogue (kernels.gemv.reduce_gemv): the new residual stream. The RMSNorm after it is
    a plain one of h (no all-reduce launch between them)."""

    h: torch.Tensor  # [num_tokens, hidden]


class Linear(nn.Module):
    """y = x W^T (+ b), W [output_size, input_size], replicated on every rank. The parallel variants
    below keep only this rank's slice of W."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.tp = get_tp_group()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = _new_param(output_size, input_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = _new_param(output_size)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elementwise.linear(x, self.weight, self.bias)


class ColumnShard(NamedTuple):
    """Where one checkpoint tensor's slice lands in a merged column-parallel weight."""

    offset: int
    """First row in this rank's merged weight."""
    size: int
    """Rows this rank keeps."""
    source_start: int
    """First row this rank reads from the checkpoint tensor."""
    full_size: int
    """Rows of the whole checkpoint tensor."""


class MergedColumnParallelLinear(Linear):
    """Several projections of the same input fused into one matmul, output columns split across
    ranks; this rank's slices of the shards are laid end to end (gate_up: [gate_r | up_r])."""

    def __init__(self, input_size: int, shards: dict[Any, ColumnShard], bias: bool = False):
        super().__init__(input_size, sum(s.size for s in shards.values()), bias)
        self.shards = shards
        self.weight.shard_ids = tuple(shards)
        if self.bias is not None:
            self.bias.shard_ids = tuple(shards)

    @classmethod
    def split_evenly(cls, input_size: int, output_sizes: dict[Any, int], bias: bool = False):
        """Each shard's rows divided evenly over the ranks, in rank order."""
        rank, size = get_tp_group().rank, get_tp_group().world_size
        shards, offset = {}, 0
        for shard_id, full in output_sizes.items():
            local = full // size
            shards[shard_id] = ColumnShard(offset, local, rank * local, full)
            offset += local
        return cls(input_size, shards, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None and self.tp.world_size == 1:  # a checkpoint that already stores the merged tensor
            default_weight_loader(param, loaded)
            return
        if shard_id not in self.shards:
            raise ValueError(f"merged checkpoint tensors cannot be split across ranks (shard {shard_id!r})")
        shard = self.shards[shard_id]
        if loaded.shape[0] != shard.full_size or tuple(loaded.shape[1:]) != tuple(param.shape[1:]):
            raise ValueError(f"shard {shard_id!r}: checkpoint shape {tuple(loaded.shape)} does not fit "
                             f"{shard.full_size} rows x {tuple(param.shape[1:])}")
        param.data.narrow(0, shard.offset, shard.size).copy_(loaded.narrow(0, shard.source_start, shard.size))


class QKVParallelLinear(MergedColumnParallelLinear):
    """The merged q/k/v projection of this rank's heads (see split_heads):

        weight rows: [ q: local heads * head_dim | k: local kv heads * head_dim | v: same ]
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = get_tp_group()
        split = split_heads(num_heads, num_kv_heads, tp.rank, tp.world_size)
        q_size, kv_size = split.num_heads * head_dim, split.num_kv_heads * head_dim
        kv_start = split.kv_head_start * head_dim
        super().__init__(hidden_size, {
            "q": ColumnShard(0, q_size, tp.rank * q_size, num_heads * head_dim),
            "k": ColumnShard(q_size, kv_size, kv_start, num_kv_heads * head_dim),
            "v": ColumnShard(q_size + kv_size, kv_size, kv_start, num_kv_heads * head_dim),
        }, bias)
        self.split = split


class RowParallelLinear(Linear):
    """Input columns split across ranks (the input is already this rank's slice: its heads' attention
    output, or its slice of the MLP); the partial products are summed with one all-reduce, then the
    (replicated) bias is added once. With reduce_results=False (no bias) the layer returns this rank's
    partial sums and the next RMSNorm reduces them (fused with its residual add where it can)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True):
        super().__init__(input_size // get_tp_group().world_size, output_size, bias)
        if bias and not reduce_results:
            raise ValueError("a row-parallel layer with a bias must reduce its results (the bias is added after the sum)")
        self.reduce_results = reduce_results
        self.push_slot: int | None = None
        """reduce_results=False: the staging slot of the fused all-reduce that sums this layer's partial
        sums (the decoder layer sets it), where the matmul may push them itself (TPGroup.matmul_push)."""

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if param is self.bias or self.tp.world_size == 1:
            default_weight_loader(param, loaded, shard_id)
            return
        local = self.input_size
        if tuple(loaded.shape) != (self.output_size, local * self.tp.world_size):
            raise ValueError(f"checkpoint tensor shape {tuple(loaded.shape)} != "
                             f"{(self.output_size, local * self.tp.world_size)}")
        param.data.copy_(loaded.narrow(1, self.tp.rank * local, local))

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None, push=None) -> torch.Tensor:
        """x @ W^T (+ bias): at decode sizes on the GEMV (kernels.gemv.takes_row_parallel), pushing its
        rows to the peers with `push`; else `elementwise.linear`."""
        from kernels import gemv

        if push is not None or (x.dim() == 2 and gemv.takes_row_parallel(x.shape[0], self.output_size, x.dtype, x.device)
                                and self.weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)):
            return gemv.row_parallel_gemv(x.contiguous(), self.weight, bias, push=push)
        return elementwise.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | Reduced:
        """reduce_results=False: this rank's partial sums; or, given the `residual` and where
        TPGroup.matmul_reduce takes these rows, Reduced(the sum over the ranks + residual), summed by the
        matmul's own epilogue."""
        if self.tp.world_size == 1:
            return self._matmul(x, self.bias)
        if residual is not None and not self.reduce_results and x.dim() == 2 and x.dtype == self.weight.dtype:
            reduce = self.tp.matmul_reduce(x.shape[0], self.output_size, x, self.push_slot)
            if reduce is not None:
                from kernels import gemv

                return Reduced(gemv.reduce_gemv(x.contiguous(), self.weight, *reduce, residual))
        if not self.reduce_results:  # this rank's partial sums [num_tokens, output_size], summed by the next norm
            # pushed into the peers' staging slot too, from the matmul's epilogue, where the norm expects that
            return self._matmul(x, None, self.tp.matmul_push(x.shape[0], self.output_size, x, self.push_slot))
        out = self._matmul(x, None)
        out = self.tp.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding table split by vocabulary rows: rank r keeps rows [r*V', (r+1)*V') of the
    table padded to V' * tp_size rows (padding rows are zero). A token outside this rank's rows
    looks up zeros, so the all-reduce of the ranks' lookups is the full embedding."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp.world_size)
        self.vocab_start = self.tp.rank * self.rows_per_rank
        self.weight = _new_param(self.rows_per_rank, hidden_size)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if self.tp.world_size == 1:
            default_weight_loader(param, loaded, shard_id)
            return
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"checkpoint tensor shape {tuple(loaded.shape)} != {(self.vocab_size, param.shape[1])}")
        rows = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))
        param.data[rows:].zero_()
        if rows:
            param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)  # [num_tokens, hidden_size]
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)  # [num_tokens, hidden_size]
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def forward_norm(self, input_ids: torch.Tensor, norm: nn.Module, prefetch: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(e), e) for e the embedding of input_ids, `norm` the first layer's RMSNorm. With tensor
        parallelism the lookup, the all-reduce and the norm are one launch where the symmetric-memory
        path takes them (it also prefetches `prefetch`, the first matmul's weight, into L2)."""
        if self.tp.world_size > 1:
            fused = self.tp.embedding_rms_norm(input_ids, self.weight, self.vocab_start, norm.weight, norm.eps, prefetch)
            if fused is not None:
                return fused
        embedded = self(input_ids)
        return norm(embedded), embedded


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection with the embedding's vocabulary split (so a tied head is the same table);
    every rank gathers the full logits, so all ranks sample the same tokens. Greedy steps reduce
    only each rank's best token, packed as a key (`greedy_tokens`)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = elementwise.linear(hidden_states, self.weight)  # [num_tokens, rows_per_rank]
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[:, :self.vocab_size]  # [num_tokens, vocab_size]

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """forward(hidden_states).argmax(-1), the first maximum on ties, without gathering the logits:
        each rank packs its best (logit, token id) per row into one int64 key (kernels/greedy.py),
        and the ranks' keys are all-reduced with max: the largest is the whole vocabulary's argmax, the
        lowest id among equal logits, on every rank. At batch 64 on Llama-8B TP=2 a [64, 128256]
        gather and argmax became a [64, 2] gather (3.66 -> 3.63 ms a step on 2 x H200, BENCHMARKS.md,
        session 7), then a [64] max of keys: after the LM head a fill, the key kernel, the all-reduce
        and two ops that unpack the ids, instead of about 12 launches."""
        keys = self.tp.all_reduce_max(self.local_keys(hidden_states))  # [num_tokens]
        return tokens_from_keys(keys)

    def local_keys(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens] int64: this rank's best logit and its token id per row, packed as a key."""
        logits = elementwise.linear(hidden_states, self.weight)  # [num_tokens, rows_per_rank]
        own = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))  # padding rows excluded
        if own == 0:  # a rank holding only padding rows (tiny vocabularies): it never wins
            return torch.full((logits.shape[0],), KEY_MIN, dtype=torch.int64, device=logits.device)
        return elementwise.greedy_keys(logits[:, :own], self.vocab_start)


KEY_MIN = -(1 << 63)
_LOW = (1 << 32) - 1


def greedy_keys_torch(logits: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """[rows] int64 keys of each row's argmax over `logits` ([rows, vocab], token ids vocab_start
    on), packed as kernels/greedy.py packs them: ordered(float32(logit) + 0.0) << 32 | (2**32 - 1 - id),
    so the largest key, over any number of ranks' slices, is the argmax of the whole row with ties to
    the lowest id. The CPU path, and the kernel's reference in tests."""
    best = logits.argmax(dim=-1)  # [rows]: the first maximum
    value = logits.gather(1, best[:, None]).squeeze(1).float() + 0.0  # -0.0 -> +0.0
    bits = value.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # monotone in the float's value
    return (ordered << 32) | (_LOW - (best + vocab_start))


def tokens_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """[rows] int64 keys (each row's largest, over every rank) -> [rows] int64 token ids."""
    return _LOW - (keys & _LOW)
