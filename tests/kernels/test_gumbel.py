"""kernels.gumbel, the sampler's draw over many programs a row, on fresh random logits: the same token
as kernels.sampling's one-program race for the same seed and kept set (across several chunks), the
filtered softmax's distribution, a row's draw its own, and bad inputs refused."""

import pytest
import torch

from ipc.sampling_params import SamplingParams
from kernels.gumbel import CHUNK, gumbel_race
from kernels.sampling import sample
from tests.gpu_workers.test_sampler import assert_follows, reference_filtered_probs
from tests.kernels.test_sampling import params_tensors
from tests.triton_env import DEVICE, INTERPRET

# (temperature, top_k, top_p, min_p): temperature alone, each filter, all together
ROWS = [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 40, 1.0, 0.0), (0.8, 0, 0.9, 0.0),
        (1.2, 0, 1.0, 0.05), (0.6, 200, 0.95, 0.01)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draws_the_token_the_one_program_race_draws(dtype):
    """kernels.sampling.sample filters each row and races over it in one program; given its
    thresholds, the chunked race must draw the very same token: the same Philox draw at every token,
    chunks combined in token order, temperature applied to the logits in their own dtype."""
    vocab = 2 * CHUNK + 900  # three chunks, the last one partly past the vocabulary
    logits = (torch.randn(len(ROWS), vocab, device=DEVICE) * 2).to(dtype)  # [S, V]
    temperature, top_k, top_p, min_p = params_tensors(ROWS)
    seeds = torch.randint(0, 1 << 62, (len(ROWS),), device=DEVICE)
    want = sample(logits, temperature, top_k, top_p, min_p, seeds)
    got = gumbel_race(logits, seeds, temperature, want.thresholds)
    assert got.tolist() == want.token_ids.tolist()
    # The scaled logits the torch path hands over (float32, filtered to -inf), temperature 1: the same.
    y = logits.float() / temperature[:, None]
    y = y.masked_fill(y < want.thresholds[:, None], float("-inf"))
    assert gumbel_race(y, seeds).tolist() == want.token_ids.tolist()


# The interpreter takes ~50 ms a program (a row here), so the CPU runs one case; the race's agreement
# with kernels.sampling's (whose draws have their own distribution tests) covers the rest.
CPU_CASES = [(SamplingParams(temperature=0.8, top_k=6, top_p=0.9), 300)]
GPU_CASES = [(SamplingParams(temperature=0.8), 20_000), (SamplingParams(top_p=0.6), 20_000),
             (SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.02), 20_000)]


@pytest.mark.parametrize("case,draws", CPU_CASES if INTERPRET else GPU_CASES)
def test_draws_follow_the_softmax_of_the_kept_tokens(case, draws):
    """Many rows with one row's logits and distinct seeds, kept set from kernels.sampling's
    thresholds: the frequencies follow the filtered, renormalized softmax at the row's temperature
    (a race with the noise's sign flipped, or scaled by the temperature, fails the chi-square)."""
    vocab = 12
    row_logits = torch.randn(vocab) * 1.5
    logits = row_logits.expand(draws, vocab).contiguous().to(DEVICE)
    params = params_tensors([(case.temperature, max(case.top_k, 0), case.top_p, case.min_p)] * draws)
    seeds = torch.randint(0, 1 << 62, (draws,), device=DEVICE)
    thresholds = sample(logits[:1], *(t[:1] for t in params), seeds[:1]).thresholds.expand(draws).contiguous()
    tokens = gumbel_race(logits, seeds, params[0], thresholds).cpu()
    assert_follows(torch.bincount(tokens, minlength=vocab), reference_filtered_probs(row_logits, case))


def test_a_rows_draw_depends_on_its_seed_alone():
    vocab = CHUNK + 100
    row = torch.randn(vocab, device=DEVICE) * 0.3  # flat: distinct seeds rarely agree
    logits = torch.randn(5, vocab, device=DEVICE)
    logits[3] = row
    seeds = torch.randint(0, 1 << 62, (5,), device=DEVICE)
    assert gumbel_race(logits, seeds)[3] == gumbel_race(row[None], seeds[3:4])[0]
    others = gumbel_race(row[None].expand(6, vocab).contiguous(), torch.arange(6, device=DEVICE) * 7919 + 1)
    assert len(set(others.tolist())) > 1


def test_only_finite_logits_at_or_above_the_threshold_are_drawn():
    vocab = CHUNK + 500
    logits = torch.randn(4, vocab, device=DEVICE)
    logits[0, :-1] = float("-inf")  # one finite token, in the last chunk
    logits[1] = float("-inf")
    logits[1, 7] = -3.0
    threshold = torch.tensor([float("-inf"), float("-inf"), 1.5, 2.0], device=DEVICE)
    seeds = torch.randint(0, 1 << 62, (4,), device=DEVICE)
    got = gumbel_race(logits, seeds, threshold=threshold).tolist()
    assert got[:2] == [vocab - 1, 7]
    assert logits[2, got[2]] >= 1.5 and logits[3, got[3]] >= 2.0


def test_bad_inputs_are_refused():
    logits = torch.randn(3, 100, device=DEVICE)
    seeds = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous rows"):
        gumbel_race(logits.t(), seeds)
    with pytest.raises(ValueError, match="seeds"):
        gumbel_race(logits, seeds.int())
    with pytest.raises(ValueError, match="temperature"):
        gumbel_race(logits, seeds, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="threshold"):
        gumbel_race(logits, seeds, threshold=torch.ones(3, dtype=torch.float64, device=DEVICE))
