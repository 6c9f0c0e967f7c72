"""BlockManager with a tiny cache (block_size 4, 8 blocks): exact block ids, ref counts, free-list
order, copy-on-write and prefix-cache hits."""

from hypothesis import given, settings, strategies as st

from scheduler_proc.block_manager import BlockManager


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


def test_allocate_takes_blocks_from_the_head_of_the_free_list():
    bm = BlockManager(8, 4)
    assert bm.allocate("a", 10)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate("b", 4)
    assert bm.block_table("b") == [3]
    assert bm.num_free_blocks == 4
    assert refs(bm) == [1, 1, 1, 1, 0, 0, 0, 0]


def test_free_returns_blocks_tail_first_and_they_are_reused_in_that_order():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    bm.allocate("a", 12)  # [0, 1, 2]
    bm.free("a")
    assert list(bm.free_queue) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.allocate("b", 32)
    assert bm.block_table("b") == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.num_free_blocks == 0


def test_allocation_that_does_not_fit_changes_nothing():
    bm = BlockManager(8, 4)
    bm.allocate("a", 20)  # 5 blocks
    assert not bm.allocate("b", 16)  # needs 4, 3 free
    assert bm.block_table("b") == []
    assert bm.num_free_blocks == 3
    assert bm.append_slots("a", 20, 36) is None  # needs 4 more
    assert bm.block_table("a") == [0, 1, 2, 3, 4]


def test_append_slots_grows_the_table_only_when_a_block_fills():
    bm = BlockManager(8, 4)
    bm.allocate("a", 3)
    assert bm.append_slots("a", 3, 4) == ([], None)
    assert bm.append_slots("a", 4, 5) == ([1], None)
    assert bm.block_table("a") == [0, 1]


def test_fork_shares_blocks_and_copy_on_write_on_the_partial_block():
    bm = BlockManager(8, 4)
    bm.allocate("p", 6)  # [0, 1]; block 1 holds 2 of 4 tokens
    bm.fork("p", "c0")
    bm.fork("p", "c1")
    bm.free("p")
    assert refs(bm)[:2] == [2, 2]
    # c0 writes token 6 into shared block 1: it gets a private copy first.
    res = bm.append_slots("c0", 6, 7)
    assert res.copy == (1, 2) and res.new_block_ids == []
    assert bm.block_table("c0") == [0, 2]
    assert refs(bm)[:3] == [2, 1, 1]
    # c1 is now the only owner of block 1: it writes in place.
    res = bm.append_slots("c1", 6, 7)
    assert res.copy is None
    assert bm.block_table("c1") == [0, 1]


def test_no_copy_when_the_shared_last_block_is_full():
    bm = BlockManager(8, 4)
    bm.allocate("p", 8)  # [0, 1], both full
    bm.fork("p", "c")
    res = bm.append_slots("c", 8, 9)
    assert res == ([2], None)
    assert bm.block_table("c") == [0, 1, 2]


def test_prefix_cache_hit_reuses_full_blocks_and_leaves_the_last_token():
    bm = BlockManager(8, 4)
    tokens = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    bm.allocate("a", 10)
    bm.cache_full_blocks("a", tokens, 10)
    hit = bm.find_cached_prefix(tokens)
    assert hit.block_ids == [0, 1] and hit.num_tokens == 8
    # Exactly two blocks of prompt: the last block is recomputed for its logits.
    assert bm.find_cached_prefix(tokens[:8]).block_ids == [0]
    # A different second block only matches the first.
    assert bm.find_cached_prefix(tokens[:4] + [1, 2, 3, 4, 5]).block_ids == [0]
    assert bm.allocate("b", 11, hit)
    assert bm.block_table("b") == [0, 1, 3]
    assert refs(bm)[:4] == [2, 2, 1, 1]


def test_freed_cached_blocks_are_revived_until_evicted_lru():
    bm = BlockManager(8, 4)
    tokens = list(range(9))
    bm.allocate("a", 9)  # [0, 1, 2]
    bm.cache_full_blocks("a", tokens, 9)
    bm.free("a")
    assert bm.num_free_blocks == 8
    hit = bm.find_cached_prefix(tokens)
    assert hit.block_ids == [0, 1]
    assert bm.allocate("b", 9, hit)
    assert bm.block_table("b") == [0, 1, 3]  # 0 and 1 revived out of the free queue
    bm.free("b")
    # Fill the cache with other requests: the oldest freed blocks are evicted first.
    assert bm.allocate("c", 16)  # takes 4, 5, 6, 7 (never used)
    assert bm.find_cached_prefix(tokens).block_ids == [0, 1]
    assert bm.allocate("d", 4)  # next in the queue: block 2 (freed first with a)
    assert bm.find_cached_prefix(tokens).block_ids == [0, 1]
    assert bm.allocate("e", 8)  # then 3, then b's tail-first order: 1
    assert bm.block_table("e") == [3, 1]
    assert bm.find_cached_prefix(tokens).block_ids == [0]


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    tokens = list(range(9))
    bm.allocate("a", 9)
    bm.cache_full_blocks("a", tokens, 9)
    assert bm.find_cached_prefix(tokens).num_tokens == 0


# ---------------------------------------------------------------------- property test

op = st.one_of(
    st.tuples(st.just("admit"), st.integers(1, 20), st.integers(0, 2)),
    st.tuples(st.just("append"), st.integers(0, 9), st.integers(1, 6)),
    st.tuples(st.just("fork"), st.integers(0, 9), st.integers(0, 0)),
    st.tuples(st.just("free"), st.integers(0, 9), st.integers(0, 0)),
    st.tuples(st.just("preempt"), st.integers(0, 9), st.integers(0, 0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), st.booleans())
def test_random_operations_never_leak_or_double_free(ops, caching):
    bm = BlockManager(8, 4, enable_prefix_caching=caching)
    live: dict[str, list[int]] = {}  # req -> tokens with slots
    computed: dict[str, int] = {}
    counter = 0
    for kind, a, b in ops:
        names = sorted(live)
        if kind == "admit":
            tokens = [(counter + i) % 3 if b else i for i in range(a)]  # repeated content hits the cache
            counter += 1
            name = f"r{counter}"
            prefix = bm.find_cached_prefix(tokens)
            if bm.allocate(name, len(tokens), prefix):
                live[name], computed[name] = tokens, len(tokens)
                bm.cache_full_blocks(name, tokens, len(tokens))
        elif not names:
            continue
        elif kind == "append":
            name = names[a % len(names)]
            new = live[name] + [a] * b
            if bm.append_slots(name, computed[name], len(new)) is not None:
                live[name], computed[name] = new, len(new)
                bm.cache_full_blocks(name, new, len(new))
        elif kind == "fork":
            parent = names[a % len(names)]
            counter += 1
            child = f"r{counter}"
            bm.fork(parent, child)
            live[child], computed[child] = list(live[parent]), computed[parent]
        else:  # free and preempt both drop every reference
            name = names[a % len(names)]
            bm.free(name)
            del live[name], computed[name]
        _check_invariants(bm, live)
    for name in list(live):
        bm.free(name)
    assert bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)


def _check_invariants(bm: BlockManager, live: dict[str, list[int]]) -> None:
    expected = [0] * bm.num_blocks
    for name, tokens in live.items():
        table = bm.block_table(name)
        assert len(table) == bm.blocks_needed(len(tokens))
        for block_id in table:
            expected[block_id] += 1
    assert refs(bm) == expected
    for block in bm.blocks:
        assert (block.ref_count == 0) == (block.block_id in bm.free_queue)
