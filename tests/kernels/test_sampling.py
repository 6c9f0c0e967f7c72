"""kernels.sampling against the sampler's torch filters (the reference), on fresh random logits: the
kept set of every row, greedy rows, the draws' distribution, and seeds that make a row's draw its own.
The interpreter runs one program per row at ~0.1 s, so CPU shapes are small; the GPU runs more draws."""

import pytest
import torch

from gpu_workers.sampling_ops import apply_min_p, apply_top_k_top_p
from ipc.sampling_params import SamplingParams
from kernels import sampling
from kernels.sampling import sample
from tests.gpu_workers.test_sampler import assert_follows, reference_filtered_probs
from tests.triton_env import DEVICE, INTERPRET

# (temperature, top_k, top_p, min_p): each filter alone, together, none, and greedy
ROW_PARAMS = [
    (1.0, 5, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.05), (0.8, 20, 0.8, 0.0),
    (0.5, 12, 0.95, 0.02), (1.0, 0, 0.5, 0.01), (1.0, 0, 1.0, 0.0), (0.0, 3, 0.5, 0.1),
    (2.0, 1, 1.0, 0.0), (1.0, 400, 0.99, 0.0),  # half blocked: on the CPU, top_k > the finite logits
]


def params_tensors(rows, device=DEVICE):
    t, k, p, m = zip(*rows)
    f = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
    return f(t), torch.tensor(k, dtype=torch.int32, device=device), f(p), f(m)


def reference_kept(logits, temperature, top_k, top_p, min_p):
    """The torch sampler's filters with a full sort: [S, V] bool, True where a token may be drawn."""
    y = logits.float() / torch.where(temperature < 1e-5, 1.0, temperature)[:, None]
    y = apply_min_p(y, min_p)
    return torch.isfinite(apply_top_k_top_p(y, top_k, top_p, num_candidates=0))


def top_p_is_ambiguous(logits, temperature, top_k, top_p, min_p, row) -> bool:
    """True when a token's mass-before lies within rounding of top_p: summation order may tip it."""
    if top_p[row] >= 1:
        return False
    y = logits[row].float() / temperature[row]
    y = apply_min_p(y[None], min_p[row:row + 1])
    y = apply_top_k_top_p(y, top_k[row:row + 1], torch.ones(1, device=y.device), num_candidates=0)[0]
    probs = torch.softmax(y.double(), dim=-1).sort(descending=True).values
    mass_before = probs.cumsum(0) - probs
    return bool(((mass_before - top_p[row].double()).abs() < 1e-5).any())


def top_k_is_tied(logits, temperature, top_k, top_p, min_p, row) -> bool:
    """True when top-p follows a top-k whose k-th largest logit is tied with the next: there the kernel
    renormalizes over every tied token (kernels/sampling.py's docstring), the torch path over exactly k.
    Common in bfloat16 at a real vocabulary's size: ~20 tokens share each value near a top-400 cut."""
    k = int(top_k[row])
    if top_p[row] >= 1 or k <= 0:
        return False
    y = apply_min_p((logits[row].float() / temperature[row])[None], min_p[row:row + 1])[0]
    y = y[torch.isfinite(y)].sort(descending=True).values
    return k < y.numel() and bool(y[k - 1] == y[k])


def tied_top_k_kept(logits, temperature, top_k, top_p, min_p, row):
    """The kernel's kept set of such a row: top-k keeps every token tied with its threshold, then top-p
    keeps y >= the largest value t whose mass(y >= t), renormalized over those, reaches top_p."""
    y = logits[row].float() / temperature[row]
    y = apply_min_p(y[None], min_p[row:row + 1])
    y = apply_top_k_top_p(y, top_k[row:row + 1], torch.ones(1, device=y.device), num_candidates=0)[0]
    finite = torch.isfinite(y)
    values, order = y[finite].sort(descending=True)
    mass = torch.softmax(y[finite].double(), dim=-1)[order].cumsum(0)
    distinct, counts = torch.unique_consecutive(values, return_counts=True)
    mass_at_least = mass[counts.cumsum(0) - 1]  # mass(y >= each distinct value), descending values
    cut = distinct[int((mass_at_least < top_p[row].double()).sum().clamp(max=distinct.numel() - 1))]
    return finite & (y >= cut)


@pytest.mark.parametrize("dtype,scale,max_candidates", [
    (torch.float32, 2.5, None), (torch.bfloat16, 2.5, None),
    (torch.float32, 12.0, None),  # logits spread past the 32-nat histogram: its open bucket in play
    (torch.float32, 2.5, 8),  # brackets overflow the scratch: every search runs over the whole row
])
def test_kept_set_matches_the_torch_filters(dtype, scale, max_candidates, monkeypatch):
    if max_candidates is not None:
        monkeypatch.setattr(sampling, "MAX_CANDIDATES", max_candidates)
    vocab = 300 if INTERPRET else 151_936
    logits = (torch.randn(len(ROW_PARAMS), vocab, device=DEVICE) * scale).to(dtype)
    logits[1, :40] = float("-inf")  # blocked tokens (min_tokens, a -100 bias)
    logits[4, 10:30] = logits[4].max()  # ties at the top
    logits[9, vocab // 2:] = float("-inf")  # fewer finite logits than top_k
    temperature, top_k, top_p, min_p = params_tensors(ROW_PARAMS)
    seeds = torch.randint(0, 1 << 62, (len(ROW_PARAMS),), device=DEVICE)
    out = sample(logits, temperature, top_k, top_p, min_p, seeds)
    ref = reference_kept(logits, temperature, top_k, top_p, min_p)
    finite = torch.isfinite(logits)
    checked = 0
    for row, (t, *_) in enumerate(ROW_PARAMS):
        if t == 0.0:
            assert out.token_ids[row] == logits[row].float().argmax()  # greedy: the first argmax
            continue
        expected = ref[row]
        if top_k_is_tied(logits, temperature, top_k, top_p, min_p, row):
            expected = tied_top_k_kept(logits, temperature, top_k, top_p, min_p, row)
        assert expected[out.token_ids[row]], f"row {row} drew a filtered token"
        if top_p_is_ambiguous(logits, temperature, top_k, top_p, min_p, row):
            continue
        kept = (logits[row].float() / temperature[row] >= out.thresholds[row]) & finite[row]
        assert torch.equal(kept, expected), (row, kept.sum().item(), expected.sum().item())
        checked += 1
    assert checked >= len(ROW_PARAMS) - 3


def test_top_p_after_a_tied_top_k_renormalizes_over_every_tied_token():
    """Coarse logits (~12 tokens share each value), so every top-k threshold is tied: the kept set is
    the documented tie-inclusive one, which on some rows differs from the torch path's exactly-k."""
    g = torch.Generator().manual_seed(5)
    rows = [(1.0, 5, 0.9, 0.0), (1.0, 20, 0.7, 0.0), (0.8, 50, 0.95, 0.0), (1.0, 100, 0.8, 0.0),
            (1.2, 30, 0.5, 0.01), (1.0, 64, 0.99, 0.0)]
    logits = (torch.randint(-12, 12, (len(rows), 300), generator=g).float() / 4).to(DEVICE)
    temperature, top_k, top_p, min_p = params_tensors(rows)
    out = sample(logits, temperature, top_k, top_p, min_p, torch.arange(len(rows), device=DEVICE) + 11)
    ref = reference_kept(logits, temperature, top_k, top_p, min_p)
    differs = 0
    for row in range(len(rows)):
        assert top_k_is_tied(logits, temperature, top_k, top_p, min_p, row)
        expected = tied_top_k_kept(logits, temperature, top_k, top_p, min_p, row)
        assert expected[out.token_ids[row]], f"row {row} drew a filtered token"
        kept = logits[row] / temperature[row] >= out.thresholds[row]
        assert torch.equal(kept, expected), (row, kept.sum().item(), expected.sum().item())
        differs += not torch.equal(kept, ref[row])
    assert differs >= 1  # the case is real: exactly-k renormalization would keep another set


def test_top_k_one_and_greedy_rows_give_the_first_argmax():
    logits = torch.randn(6, 200, device=DEVICE)
    logits[2, 50] = logits[2, 120] = logits[2].max() + 1  # a tie: the lower id wins, as torch.argmax
    rows = [(0.0, 0, 1.0, 0.0), (1.5, 1, 1.0, 0.0)] * 3
    out = sample(logits, *params_tensors(rows), torch.arange(6, device=DEVICE))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


# On the CPU: the filters together, then temperature alone over 12 tokens with enough draws that a
# wrong race (e.g. the Gumbel noise's sign flipped, which still samples 2 tokens right) fails chi-square.
CPU_CASES = [(SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.02), 150),
             (SamplingParams(temperature=0.9), 700)]
GPU_CASES = [(SamplingParams(top_k=4), 20_000), (SamplingParams(top_p=0.6), 20_000),
             (SamplingParams(min_p=0.1), 20_000), (SamplingParams(temperature=0.8), 20_000),
             (SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.02), 20_000)]


@pytest.mark.parametrize("case,draws", CPU_CASES if INTERPRET else GPU_CASES)
def test_draws_follow_the_filtered_distribution(case, draws):
    """Many rows with one row's logits and distinct seeds: the draws' frequencies follow the filtered,
    renormalized softmax (the same check as the torch sampler's test)."""
    vocab = 12
    row_logits = torch.randn(vocab) * 1.5
    logits = row_logits.expand(draws, vocab).contiguous().to(DEVICE)
    rows = [(case.temperature, max(case.top_k, 0), case.top_p, case.min_p)] * draws
    seeds = torch.randint(0, 1 << 62, (draws,), device=DEVICE)
    tokens = sample(logits, *params_tensors(rows), seeds).token_ids.cpu()
    assert_follows(torch.bincount(tokens, minlength=vocab), reference_filtered_probs(row_logits, case))


def test_a_rows_draw_depends_on_its_seed_alone():
    vocab = 64
    row = torch.randn(vocab, device=DEVICE) * 0.3  # flat: distinct seeds rarely agree
    logits = torch.randn(6, vocab, device=DEVICE)
    logits[4] = row
    rows = [(1.0, 0, 1.0, 0.0)] * 6
    seeds = torch.randint(0, 1 << 62, (6,), device=DEVICE)
    batch = sample(logits, *params_tensors(rows), seeds).token_ids
    alone = sample(row[None], *params_tensors(rows[:1]), seeds[4:5]).token_ids
    assert batch[4] == alone[0]
    others = sample(row[None].expand(8, vocab).contiguous(), *params_tensors(rows[:1] * 8),
                    torch.arange(8, device=DEVICE) * 7919 + 1).token_ids
    assert len(set(others.tolist())) > 1


def test_bad_inputs_raise_before_launch():
    logits = torch.randn(2, 10, device=DEVICE)
    good = params_tensors([(1.0, 0, 1.0, 0.0)] * 2)
    seeds = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        sample(logits, good[0], good[1].long(), good[2], good[3], seeds)
    with pytest.raises(ValueError, match="logits"):
        sample(logits.t(), *good, seeds)
    with pytest.raises(ValueError, match="seeds"):
        sample(logits, *good, seeds[:1])
