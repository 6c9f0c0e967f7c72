"""kernels/prefetch.py: how much of the next matmul's weight a launch prefetches, and which lines.

The prefetch instruction itself exists only on the GPU (tests/kernels/test_hopper_build.py checks it is
compiled in, where); here the interpreter runs the address arithmetic with the prefetch replaced by a
store that marks each line, so the lines a launch covers can be checked one by one."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels import prefetch
from tests.triton_env import INTERPRET


@pytest.fixture
def pdl_on(monkeypatch):
    monkeypatch.setattr(prefetch, "use_pdl", lambda device: True)


def test_whole_weights_under_the_cap_and_a_prefix_of_every_row_over_it(pdl_on):
    like = torch.empty(1)
    qkv = torch.empty(3072, 4096, dtype=torch.bfloat16)  # Llama-8B qkv_proj at TP=2: 24 MiB, 64 lines a row
    p = prefetch.plan(qkv, 64, like)
    assert p.enabled and (p.num_rows, p.row_bytes, p.prefix_lines) == (3072, 8192, 64)
    gate_up = torch.empty(14336, 4096, dtype=torch.bfloat16)  # 112 MiB: the first 18 lines of each row (32 MiB)
    assert prefetch.plan(gate_up, 64, like).prefix_lines == 32 * 2**20 // 128 // 14336
    # one program (batch 1) takes at most 4096 lines: a launch of few programs issues little
    assert prefetch.plan(qkv, 1, like).prefix_lines == 4096 // 3072


def test_nothing_is_prefetched_when_off_or_without_pdl(pdl_on, monkeypatch):
    like, w = torch.empty(1), torch.empty(64, 64, dtype=torch.bfloat16)
    assert not prefetch.plan(None, 8, like).enabled
    assert not prefetch.plan(torch.empty(8192, 64, dtype=torch.bfloat16), 1, like).enabled  # under a line a row
    monkeypatch.setenv("PAGEDSERVE_PREFETCH_MB", "0")
    assert not prefetch.plan(w, 8, like).enabled
    monkeypatch.setenv("PAGEDSERVE_PREFETCH_MB", "lots")
    with pytest.raises(ValueError, match="PAGEDSERVE_PREFETCH_MB"):
        prefetch.plan(w, 8, like)
    monkeypatch.delenv("PAGEDSERVE_PREFETCH_MB")
    monkeypatch.setattr(prefetch, "use_pdl", lambda device: False)
    assert not prefetch.plan(w, 8, like).enabled


@triton.jit
def _mark(ptrs):
    tl.store(ptrs, tl.full(ptrs.shape, 1, tl.uint8))


@triton.jit
def _cover(ptr, num_rows, row_bytes, prefix_lines, CHUNK: tl.constexpr):
    prefetch.prefetch_rows(ptr, num_rows, row_bytes, prefix_lines, tl.program_id(0), tl.num_programs(0), CHUNK)


@pytest.mark.skipif(not INTERPRET, reason="replaces the prefetch instruction with a store (interpreter only)")
@pytest.mark.parametrize("num_rows, row_lines, prefix_lines, programs", [(7, 4, 3, 3), (5, 2, 2, 8), (40, 3, 1, 6)])
def test_a_launch_covers_exactly_the_prefix_of_every_row(monkeypatch, num_rows, row_lines, prefix_lines, programs):
    monkeypatch.setattr(prefetch, "l2_prefetch", _mark)
    buf = torch.zeros(num_rows, row_lines * prefetch.LINE, dtype=torch.uint8)
    _cover[(programs,)](buf, num_rows, row_lines * prefetch.LINE, prefix_lines, CHUNK=4)
    marked = buf.view(num_rows, row_lines, prefetch.LINE)
    assert (marked[:, :prefix_lines, 0] == 1).all(), "a line of a row's prefix was not prefetched"
    assert marked[:, prefix_lines:].sum() == 0 and marked[:, :, 1:].sum() == 0, "a line past the prefix was"


def test_attention_prefetches_o_proj_only_when_asked(monkeypatch):
    """Off by default: on 2 x H100 it slowed TP=1 batch-64 decode (7.27 -> 7.40 ms a step)."""
    from ipc import envs

    assert envs.prefetch_in_attention() is False
    monkeypatch.setenv("PAGEDSERVE_PREFETCH_ATTENTION", "1")
    assert envs.prefetch_in_attention() is True
    monkeypatch.setenv("PAGEDSERVE_PREFETCH_ATTENTION", "yes")
    with pytest.raises(ValueError, match="PAGEDSERVE_PREFETCH_ATTENTION"):
        envs.prefetch_in_attention()
