"""BlockManager: the paged KV cache's bookkeeping. Pure Python, no torch.

The KV cache is `num_blocks` fixed-size blocks of `block_size` token slots. A request owns a block
table (list of block ids); token t lives in block `table[t // block_size]` at offset
`t % block_size`. Blocks are reference-counted so several requests can share them:

    fork (n > 1):       parent [7 3 5*]   child [7 3 5*]     ref(7)=ref(3)=ref(5)=2
    child appends:      child  [7 3 9 ]   copy 5 -> 9 first  (copy-on-write of the shared partial block)

Prefix caching: a block that is full is keyed by a hash chained over (parent block's hash, its token
ids), so equal prefixes map to equal keys. A new request reuses the longest chain of cached blocks. A
block whose ref count drops to 0 joins the free queue but keeps its hash: until it is popped for reuse
(least recently freed first), a later request can still revive it.

Invariants: every block is either referenced (ref > 0) or in the free queue, never both; a request's
table holds ceil(num_slots / block_size) blocks; a hashed block's tokens never change.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple


class CachedPrefix(NamedTuple):
    block_ids: list[int]
    num_tokens: int


class AppendResult(NamedTuple):
    new_block_ids: list[int]
    """Blocks appended to the table."""
    copy: tuple[int, int] | None
    """(src, dst) when copy-on-write replaced the table's last block before appending."""


_IN_PLACE = AppendResult([], None)
"""The result of most decode steps (no new block, no copy), built once: results are only read."""


class _Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [_Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first. Values unused; OrderedDict gives O(1) removal.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.tables: dict[str, list[int]] = {}
        self.num_hashed: dict[str, int] = {}  # how many leading blocks of a table are hashed

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (0 to 1)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def block_table(self, req_id: str) -> list[int]:
        return self.tables.get(req_id, [])

    def blocks_needed(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    def find_cached_prefix(self, token_ids: list[int]) -> CachedPrefix:
        """Longest run of cached full blocks matching token_ids. Leaves at least the last token
        uncovered, because its logits must be computed."""
        if not self.enable_prefix_caching:
            return CachedPrefix([], 0)
        block_ids: list[int] = []
        parent = None
        max_blocks = (len(token_ids) - 1) // self.block_size
        for i in range(max_blocks):
            chunk = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = hash((parent, chunk))
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            block_ids.append(block_id)
        return CachedPrefix(block_ids, len(block_ids) * self.block_size)

    # ------------------------------------------------------------------ updates

    def allocate(self, req_id: str, num_slots: int, prefix: CachedPrefix | None = None) -> bool:
        """Give a new request a table holding `num_slots` slots, starting with the cached prefix's
        blocks. Returns False, changing nothing, if the free blocks do not suffice."""
        assert req_id not in self.tables, f"{req_id} already has blocks"
        prefix_ids = prefix.block_ids if prefix else []
        # Reviving a cached block with ref 0 takes it out of the free queue too.
        revived = sum(1 for b in prefix_ids if self.blocks[b].ref_count == 0)
        num_new = max(self.blocks_needed(num_slots) - len(prefix_ids), 0)
        if num_new + revived > self.num_free_blocks:
            return False
        for block_id in prefix_ids:
            self._take(block_id)
        self.tables[req_id] = list(prefix_ids) + [self._pop_free() for _ in range(num_new)]
        self.num_hashed[req_id] = len(prefix_ids)
        return True

    def append_slots(self, req_id: str, num_computed: int, num_slots: int) -> AppendResult | None:
        """Grow a request's table to hold `num_slots` slots; the step writes slots
        [num_computed, num_slots). If that write lands in a last block that is shared, copy the block
        first (copy-on-write). Returns None, changing nothing, if the free blocks do not suffice."""
        table = self.tables[req_id]
        capacity = len(table) * self.block_size
        cow = (num_computed < capacity and num_slots > num_computed
               and self.blocks[table[-1]].ref_count > 1)
        if num_slots <= capacity and not cow:
            return _IN_PLACE  # the last block has room and is this request's alone
        num_new = max(self.blocks_needed(num_slots) - len(table), 0)
        if num_new + int(cow) > self.num_free_blocks:
            return None
        copy = None
        if cow:
            last = self.blocks[table[-1]]
            dst = self._pop_free()
            last.ref_count -= 1
            table[-1] = dst
            copy = (last.block_id, dst)
        new_ids = [self._pop_free() for _ in range(num_new)]
        table.extend(new_ids)
        return AppendResult(new_ids, copy)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares every block of the parent."""
        table = self.tables[parent_id]
        for block_id in table:
            self.blocks[block_id].ref_count += 1
        self.tables[child_id] = list(table)
        self.num_hashed[child_id] = self.num_hashed[parent_id]

    def free(self, req_id: str) -> None:
        """Drop the request's references. Blocks reaching 0 join the free queue (tail), last block first
        so a request's prefix is evicted after its tail."""
        table = self.tables.pop(req_id, None)
        self.num_hashed.pop(req_id, None)
        for block_id in reversed(table or []):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"double free of block {block_id}"
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def cache_full_blocks(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        """Register the hashes of the request's blocks that `num_computed` tokens fill completely.
        Blocks hashed by an earlier call are skipped, so a step costs O(blocks it newly fills)."""
        if not self.enable_prefix_caching:
            return
        start = self.num_hashed[req_id]
        # Tokens sampled by a step still in flight are not known yet: their blocks wait.
        end = min(num_computed, len(token_ids)) // self.block_size
        if end <= start:
            return  # no block newly full: most decode steps
        table = self.tables[req_id]
        end = min(end, len(table))
        parent = self.blocks[table[start - 1]].block_hash if start else None
        for i in range(start, end):
            chunk = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = hash((parent, chunk))
            block = self.blocks[table[i]]
            if block.block_hash is None:
                block.block_hash, block.token_ids = parent, chunk
                self.cached.setdefault(parent, block.block_id)
        self.num_hashed[req_id] = max(start, end)

    # ------------------------------------------------------------------ internals

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: the cached content is about to be overwritten
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
