"""kernels.greedy, the greedy pick as a max over packed (logit, id) keys: the token torch.argmax takes,
ties to the lowest id, across chunks and across ranks' vocabulary slices, in every logits dtype."""

import pytest
import torch

from gpu_workers.models.parallel_layers import greedy_keys_torch, tokens_from_keys
from kernels.greedy import CHUNK, greedy_keys
from tests.triton_env import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_picks_torch_argmax_across_chunks(dtype):
    """Rows over three chunks (the last one partly past the vocabulary), with each row's maximum
    planted in a different chunk, one row all negative, and one with the maximum twice (the lower id
    wins): the kernel's tokens are torch.argmax's and its keys the torch reference's."""
    vocab = 2 * CHUNK + 900
    logits = torch.randn(6, vocab, device=DEVICE).to(dtype)  # [rows, vocab]
    logits[0, 5] = 9.0
    logits[1, CHUNK + 17] = 9.0
    logits[2, vocab - 1] = 9.0
    logits[3] = -logits[3].abs() - 1.0  # every logit negative: the ordering of negative floats
    logits[4, [CHUNK - 1, CHUNK, 2 * CHUNK + 3]] = 7.5  # a tie across chunks: the first one
    keys = greedy_keys(logits)
    assert keys.tolist() == greedy_keys_torch(logits).tolist()
    assert tokens_from_keys(keys).tolist() == logits.argmax(dim=-1).tolist()
    assert tokens_from_keys(keys)[4].item() == CHUNK - 1


def test_negative_zero_ties_with_positive_zero():
    """-0.0 and +0.0 are the same logit: with both the row's maximum, the first one wins, as in
    torch.argmax (comparing raw float bits would rank +0.0 higher)."""
    logits = torch.full((2, 300), -1.0, device=DEVICE)
    logits[0, 10], logits[0, 20] = -0.0, 0.0
    logits[1, 10], logits[1, 20] = 0.0, -0.0
    assert tokens_from_keys(greedy_keys(logits)).tolist() == [10, 10]
    assert tokens_from_keys(greedy_keys_torch(logits)).tolist() == [10, 10]


def test_ranks_slices_combine_to_the_whole_rows_argmax():
    """Three ranks' vocabulary slices of the same rows, each keyed with its own vocab_start: the max
    over the stacked keys is the argmax of the whole row, ties between ranks to the lower id (rank 1
    and rank 2 hold the same best logit in row 0; -inf everywhere in rank 2's slice of row 1)."""
    vocab = 3 * 1000
    logits = torch.randn(3, vocab, device=DEVICE)
    logits[0, [1500, 2500]] = 6.0
    logits[1, 2000:] = float("-inf")
    slices = logits.split(1000, dim=1)
    keys = torch.stack([greedy_keys(part, 1000 * r) for r, part in enumerate(slices)]).amax(0)  # the ranks' max
    assert tokens_from_keys(keys).tolist() == logits.argmax(dim=-1).tolist()
    assert tokens_from_keys(keys)[0].item() == 1500


def test_strided_rows_and_bad_input():
    """A row-strided view (the padded head's own rows) is read in place; bad shapes, dtypes and ids
    past the key's 31 bits are refused before launch."""
    padded = torch.randn(4, 700, device=DEVICE)
    own = padded[:, :650]
    assert tokens_from_keys(greedy_keys(own)).tolist() == own.argmax(dim=-1).tolist()
    with pytest.raises(ValueError, match="rows, vocab"):
        greedy_keys(padded.t())
    with pytest.raises(ValueError, match="dtype"):
        greedy_keys(padded.double())
    with pytest.raises(ValueError, match="vocab_start"):
        greedy_keys(padded, (1 << 31) - 10)
