"""kernels/top_p.py: top-p thresholds by a search over many programs a row, against the torch path's
sort (gpu_workers.sampling_ops.apply_top_k_top_p with top_k off), on fresh random rows: the kept sets must be
equal wherever rounding cannot tip the last token either way."""

import pytest
import torch

from gpu_workers.sampling_ops import apply_top_k_top_p, apply_top_p_by_search
from kernels.top_p import CHUNK, top_p_thresholds
from tests.triton_env import DEVICE


def sorted_kept(y: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The torch path's kept set [S, V] (a full sort)."""
    return torch.isfinite(apply_top_k_top_p(y, torch.zeros(len(y), dtype=torch.int32), top_p, 0))


def tipping(row: torch.Tensor, p: float) -> bool:
    """Some token's mass before it lies within rounding of p: either answer is right there."""
    probs = torch.softmax(row.double(), -1).sort(descending=True).values
    return bool(((probs.cumsum(0) - probs - p).abs() < 1e-5).any())


def test_kept_sets_equal_the_sort_on_flat_peaked_filtered_and_tied_rows():
    vocab = CHUNK + 1500  # two chunks, the second partial
    top_p = torch.tensor([0.9, 0.95, 0.5, 0.8, 0.9, 0.9, 1.0])

    def draw(row: int) -> torch.Tensor:
        y = torch.randn(vocab) * [0.2, 1.0, 3.0, 8.0, 2.0, 1.5, 1.0][row]  # flat to peaked
        if row == 4:
            y[torch.randperm(vocab)[:vocab // 2]] = float("-inf")  # half filtered before top-p (min-p, top-k)
        if row == 5:
            y = y.bfloat16().float() / 0.7  # bf16 logits over a temperature: many ties
        return y

    rows = []
    for row in range(len(top_p)):  # redraw a row whose answer rounding could tip (~10-25% of flat rows)
        y = draw(row)
        for _ in range(30):
            if top_p[row] == 1 or not tipping(y, top_p[row].item()):
                break
            y = draw(row)
        else:
            raise AssertionError(f"row {row}: 30 draws, each within rounding of top_p")
        rows.append(y)
    y = torch.stack(rows)  # [S, V]
    got = torch.isfinite(apply_top_p_by_search(y.to(DEVICE), top_p.to(DEVICE))).cpu()
    want = sorted_kept(y, top_p)
    for row in range(len(y)):
        assert torch.equal(got[row], want[row]), (row, int(got[row].sum()), int(want[row].sum()))
    assert got[6].all()  # top_p 1 keeps everything
    assert vocab // 2 < got[0].sum() < vocab and 1 < got[1].sum() < vocab  # the rows really filter


def test_tokens_tied_with_the_last_one_kept_all_stay():
    # Masses 0.4, then three tied tokens of 0.15 each, then the rest: top_p 0.5 crosses inside the tie.
    probs = torch.tensor([0.4, 0.15, 0.15, 0.15] + [0.15 / 96] * 96)
    y = probs.log()[None, :].repeat(2, 1)  # [2, 100]
    y[1] = y[1].flip(0)  # the same values at other token ids
    thresholds = top_p_thresholds(y.to(DEVICE), torch.tensor([0.5, 0.5], device=DEVICE)).cpu()
    assert torch.equal(thresholds, torch.full((2,), y[0, 1].item()))
    kept = y >= thresholds[:, None]
    assert kept.sum(1).tolist() == [4, 4] and torch.equal(kept, sorted_kept(y, torch.tensor([0.5, 0.5])))


def test_a_rows_threshold_does_not_depend_on_the_rows_beside_it():
    y = torch.randn(3, 3000) * torch.tensor([[1.0], [4.0], [0.5]])
    top_p = torch.tensor([0.9, 0.7, 0.95])
    together = top_p_thresholds(y.to(DEVICE), top_p.to(DEVICE)).cpu()
    for row in range(3):
        alone = top_p_thresholds(y[row:row + 1].to(DEVICE), top_p[row:row + 1].to(DEVICE)).cpu()
        assert alone.item() == together[row].item()  # bitwise: a seeded request's tokens are its own


def test_bad_inputs_are_refused():
    y = torch.randn(2, 50, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        top_p_thresholds(y.half(), torch.full((2,), 0.9, device=DEVICE))
    with pytest.raises(ValueError, match="top_p must be"):
        top_p_thresholds(y, torch.full((3,), 0.9, device=DEVICE))
