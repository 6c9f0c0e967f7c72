"""The worker's sampler on CPU, against naive per-row references, with fresh random logits every run."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_workers.logit_edits import apply_logit_bias_and_blocks, apply_penalties
from gpu_workers.sampler import RowInfo, Sampler, SamplingBatch, row_seed
from gpu_workers.sampling_ops import compute_prompt_logprobs
from ipc.sampling_params import SamplingParams
from tests.triton_env import DEVICE


def make_batch(params: list[SamplingParams], outputs=None, prompts=None, output_indices=None,
               blocked=None, device: str = "cpu") -> SamplingBatch:
    num_rows = len(params)
    outputs = outputs or [[] for _ in range(num_rows)]
    prompts = prompts or [[1, 2, 3] for _ in range(num_rows)]
    output_indices = output_indices or [0] * num_rows
    blocked = blocked or [[] for _ in range(num_rows)]
    rows = [RowInfo(p, prompt, out, index, block)
            for p, prompt, out, index, block in zip(params, prompts, outputs, output_indices, blocked)]
    return SamplingBatch.build(rows, device)


def reference_filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Naive single-row min_p -> top_k -> top_p, by walking the sorted tokens one at a time."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)  # [V]
    keep = probs >= p.min_p * probs.max()  # [V]
    order = [t for t in torch.argsort(probs, descending=True).tolist() if keep[t]]
    if p.top_k > 0:
        order = order[:p.top_k]
    total = sum(probs[t].item() for t in order)
    kept, mass = [], 0.0
    for t in order:
        if mass >= p.top_p:
            break
        kept.append(t)
        mass += probs[t].item() / total
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()  # [V]


def assert_follows(counts: torch.Tensor, expected: torch.Tensor) -> None:
    """No draw outside the support, every token within 5 sigma, pooled chi-square within bounds."""
    num_draws = int(counts.sum())
    assert counts[expected == 0].sum() == 0, "sampled a filtered token"
    freq = counts.double() / num_draws
    sigma = torch.sqrt(expected * (1 - expected) / num_draws)
    assert torch.all((freq - expected).abs() <= 5 * sigma + 3 / num_draws), (freq, expected)
    expected_counts = expected * num_draws
    big = expected_counts >= 5
    observed = torch.cat([counts.double()[big], counts.double()[~big & (expected > 0)].sum()[None]])
    wanted = torch.cat([expected_counts[big], expected_counts[~big & (expected > 0)].sum()[None]])
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    chi2 = ((observed - wanted) ** 2 / wanted).sum().item()
    dof = max(len(wanted) - 1, 1)
    assert chi2 < dof + 8 * math.sqrt(2 * dof) + 10, (chi2, dof)


def test_greedy_is_argmax():
    logits = torch.randn(8, 1000)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 8))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_rows_mixed_with_random_rows():
    logits = torch.randn(16, 500) * 0.1  # nearly flat: random rows rarely hit the argmax
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(16)]
    batch = make_batch(params)
    assert not batch.all_greedy and not batch.all_random
    sampler = Sampler(seed=int(torch.randint(0, 2**31, ())))
    random_hits_argmax = 0
    for _ in range(5):
        out = sampler(logits, batch)
        argmax = logits.argmax(-1).tolist()
        assert out.token_ids[0::2] == argmax[0::2]
        random_hits_argmax += sum(a == b for a, b in zip(out.token_ids[1::2], argmax[1::2]))
    assert random_hits_argmax < 10


def test_top_k_one_equals_greedy():
    logits = torch.randn(32, 2000)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i if i % 2 else None) for i in range(32)]
    out = Sampler()(logits, make_batch(params))
    assert out.token_ids == logits.argmax(-1).tolist()


FILTER_CASES = [
    SamplingParams(top_k=4),
    SamplingParams(top_p=0.6),
    SamplingParams(min_p=0.1),
    SamplingParams(top_k=6, top_p=0.8),
    SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.02),
    SamplingParams(temperature=1.3, top_p=0.75, min_p=0.05),
    SamplingParams(temperature=0.8),
]


@pytest.mark.parametrize("cases", [[c] for c in FILTER_CASES] + [FILTER_CASES],
                         ids=[f"case{i}" for i in range(len(FILTER_CASES))] + ["mixed_batch"])
def test_filters_follow_renormalized_distribution(cases):
    """Each filter alone, then all of them side by side in one batch (there top-p rows without a
    top_k force the full-sort fallback): draws follow the filtered, renormalized softmax."""
    vocab_size, draws = 12, 20_000
    row_logits = torch.randn(len(cases), vocab_size) * 1.5  # [C, V]
    logits = row_logits.repeat_interleave(draws, dim=0)  # [C * draws, V]
    params = [p for p in cases for _ in range(draws)]
    out = Sampler(seed=int(torch.randint(0, 2**31, ())))(logits, make_batch(params))
    tokens = torch.tensor(out.token_ids).view(len(cases), draws)
    for i, p in enumerate(cases):
        counts = torch.bincount(tokens[i], minlength=vocab_size)
        assert_follows(counts, reference_filtered_probs(row_logits[i], p))


def test_top_p_search_keeps_what_the_sort_keeps_in_a_mixed_batch(monkeypatch):
    """On CUDA the torch path takes top-p's threshold from kernels/top_p.py's search (run here by the
    interpreter) where the CPU sorts the vocabulary: the same kept sets, so the same draws from the
    same generator. Logits of few distinct values put each top-p cut between tie groups, far from
    where rounding could tip it."""
    import kernels.top_p

    calls = []
    search_fn = kernels.top_p.top_p_thresholds
    monkeypatch.setattr(kernels.top_p, "top_p_thresholds", lambda *a: calls.append(1) or search_fn(*a))
    params = FILTER_CASES * 3  # top-p rows without a top_k: the batch needs the full sort
    logits = (torch.randint(-4, 5, (len(params), 3000)).float() * 0.9).to(DEVICE)  # [S, V]
    seed = int(torch.randint(0, 2**31, ()))
    batch = make_batch(params, device=DEVICE)
    by_sort = Sampler(seed=seed, device=DEVICE, top_p_search=False)(logits, batch)
    by_search = Sampler(seed=seed, device=DEVICE, top_p_search=True)(logits, batch)
    assert calls and by_search.token_ids == by_sort.token_ids


def test_the_gumbel_race_draws_what_the_triton_kernel_draws():
    """On CUDA the torch path draws with kernels/gumbel.py's race (run here by the interpreter), keyed
    like the Triton sampler's one-program race: for the same engine seed the two paths draw the very
    same tokens, row by row, seeded or not, and whether the batch has filters (the race reads the
    filtered float32 logits) or temperature alone (it reads the model's bf16 logits and scales them).
    Logits: 256 distinct values 1/8 apart (exact in bf16) above a far tail, so no tie sits at a cut."""
    from gpu_workers.sampler_checks import near_top_p_cut

    vocab = 5000  # two of the race's chunks
    # Cuts that drop most of the mass (top-p 0.3, top-k 3): a race that ignored one would draw a dropped
    # token on most such rows, and there are eight of them.
    filtered = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.0, top_k=30, seed=11),
                SamplingParams(temperature=0.7, min_p=0.05), SamplingParams(temperature=0.0),
                SamplingParams(temperature=1.2, top_k=100, top_p=0.8, min_p=0.01, seed=5),
                SamplingParams(temperature=0.9)] + [
                SamplingParams(temperature=2.0, top_p=0.3, seed=s) for s in range(4)] + [
                SamplingParams(temperature=2.0, top_k=3, seed=s) for s in range(4)]
    alone = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, seed=2), SamplingParams(temperature=0.0)]
    for params in (filtered, alone):
        logits = -40 - 3 * torch.rand(len(params), vocab)  # [S, V]
        for i, row in enumerate(logits):
            while True:  # top-p cuts away from rounding distance of a token's mass-before
                row[:] = -40 - 3 * torch.rand(vocab)
                row[torch.randperm(vocab)[:256]] = 8 - 0.125 * torch.arange(256.0)
                p = params[i]
                if p.top_p >= 1 or not near_top_p_cut(row / p.temperature, p.top_p):
                    break
        logits = logits.to(torch.bfloat16).to(DEVICE)
        seed = int(torch.randint(0, 2**31, ()))
        batch = make_batch(params, outputs=[[3] * i for i in range(len(params))], device=DEVICE)
        race = Sampler(seed=seed, device=DEVICE, use_triton=False, top_p_search=True, race=True)
        triton = Sampler(seed=seed, device=DEVICE, use_triton=True)
        assert race(logits, batch).token_ids == triton(logits, batch).token_ids


def test_warm_up_keeps_the_race_and_drops_one_that_ignores_its_threshold(monkeypatch, caplog):
    import kernels.gumbel

    sampler = Sampler(device=DEVICE, use_triton=False, top_p_search=False, race=True)
    sampler.warm_up(vocab_size=3000, logits_dtype=torch.bfloat16)
    assert sampler.race
    real = kernels.gumbel.gumbel_race
    monkeypatch.setattr(kernels.gumbel, "gumbel_race", lambda x, seeds, temperature=None, threshold=None:
                        real(x, seeds, temperature))
    sampler.warm_up(vocab_size=3000, logits_dtype=torch.bfloat16)
    assert not sampler.race and "PAGEDSERVE_GUMBEL_RACE" in caplog.text
    logits = torch.randn(2, 3000, device=DEVICE)
    out = sampler(logits, make_batch([SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0)],
                                     device=DEVICE))
    assert out.token_ids == logits.argmax(-1).tolist()  # drawn by torch's race


def test_seeded_rows_reproducible_across_batches_and_orders():
    vocab_size = 50_000
    seeded_logits = torch.randn(vocab_size) * 0.5  # flat enough that a repeat is a coincidence
    seeded = SamplingParams(seed=1234, top_p=0.95)
    history = [5, 6, 7]
    alone = Sampler(seed=0)(seeded_logits[None], make_batch([seeded], outputs=[history]))
    others = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=3),
              SamplingParams(seed=99, min_p=0.01)]
    for engine_seed, order in [(1, [0, 1, 4, 2, 3]), (7, [4, 3, 2, 1, 0]), (3, [2, 4, 0, 1, 3])]:
        all_params = others + [seeded]
        params = [all_params[i] for i in order]
        logits = torch.randn(5, vocab_size)
        row = order.index(4)
        logits[row] = seeded_logits
        outputs = [history if i == 4 else [11] * i for i in order]
        out = Sampler(seed=engine_seed)(logits, make_batch(params, outputs=outputs))
        assert out.token_ids[row] == alone.token_ids[0]


def test_seeded_rows_differ_across_output_index_and_position():
    vocab_size, n = 50_000, 8
    logits = (torch.randn(vocab_size) * 0.5).expand(n, vocab_size)
    params = [SamplingParams(seed=42)] * n
    by_index = Sampler()(logits, make_batch(params, output_indices=list(range(n)))).token_ids
    assert len(set(by_index)) > 1
    again = Sampler(seed=5)(logits.flip(0), make_batch(params, output_indices=list(range(n))[::-1]))
    assert again.token_ids[::-1] == by_index
    by_position = Sampler()(logits, make_batch(params, outputs=[[1] * i for i in range(n)])).token_ids
    assert len(set(by_position)) > 1
    assert row_seed(42, 0, 3) != row_seed(42, 1, 3) != row_seed(43, 1, 3)


def naive_penalties(logits, prompt, output, presence, frequency, repetition):
    out = logits.clone()
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in output:
        out[t] -= frequency
    for t in set(output):
        out[t] -= presence
    return out


def random_penalty_batch(num_rows, vocab_size):
    params, prompts, outputs = [], [], []
    for i in range(num_rows):
        params.append(SamplingParams(
            temperature=0.0,
            presence_penalty=float(torch.empty(()).uniform_(-2, 2)),
            frequency_penalty=float(torch.empty(()).uniform_(-2, 2)),
            repetition_penalty=float(torch.empty(()).uniform_(0.5, 2.0)) if i != 1 else 1.0))
        prompts.append(torch.randint(0, vocab_size, (int(torch.randint(0, 20, ())),)).tolist())
        outputs.append(torch.randint(0, vocab_size, (int(torch.randint(0, 30, ())),)).tolist())
    outputs[0] = []  # a row with no output yet
    return params, prompts, outputs


def test_penalties_match_naive_reference():
    num_rows, vocab_size = 6, 40
    logits = torch.randn(num_rows, vocab_size) * 3
    params, prompts, outputs = random_penalty_batch(num_rows, vocab_size)
    batch = make_batch(params, outputs=outputs, prompts=prompts)
    got = apply_penalties(logits, batch)
    for i, p in enumerate(params):
        want = naive_penalties(logits[i], prompts[i], outputs[i], p.presence_penalty,
                               p.frequency_penalty, p.repetition_penalty)
        torch.testing.assert_close(got[i], want)
    # Greedy takes the argmax of the penalized logits, and logprobs stay the raw model's.
    params = [SamplingParams(**{**_fields(p), "logprobs": 2}) for p in params]
    out = Sampler()(logits, make_batch(params, outputs=outputs, prompts=prompts))
    assert out.token_ids == got.argmax(-1).tolist()
    raw = torch.log_softmax(logits, -1)
    for i, entry in enumerate(out.logprobs):
        assert entry.logprobs[0] == pytest.approx(raw[i, out.token_ids[i]].item(), abs=1e-5)


def _fields(p: SamplingParams) -> dict:
    return {name: getattr(p, name) for name in p.__struct_fields__}


def test_frequency_penalty_steers_greedy_away_from_repeats():
    logits = torch.randn(1, 100)
    top = int(logits.argmax())
    params = [SamplingParams(temperature=0.0, frequency_penalty=2.0)]
    gap = (logits[0, top] - logits[0].topk(2).values[1]).item()
    repeats = int(gap / 2.0) + 1
    out = Sampler()(logits, make_batch(params, outputs=[[top] * repeats]))
    assert out.token_ids[0] != top


def test_blocked_tokens_never_sampled():
    vocab_size, num_rows = 30, 4000
    row_logits = torch.randn(vocab_size) * 3
    blocked = row_logits.topk(5).indices.tolist()  # the most likely tokens
    logits = row_logits.expand(num_rows, vocab_size)
    params = [SamplingParams(temperature=0.0 if i == 0 else 1.0) for i in range(num_rows)]
    out = Sampler()(logits, make_batch(params, blocked=[blocked] * num_rows))
    assert not set(out.token_ids) & set(blocked)
    assert out.token_ids[0] == row_logits.topk(6).indices[5].item()


def test_only_allowed_tokens_are_sampled():
    vocab_size, num_rows = 50, 2000
    row_logits = torch.randn(vocab_size) * 3
    allowed = torch.randperm(vocab_size)[:4].tolist()
    logits = row_logits.expand(num_rows, vocab_size).contiguous()
    params = ([SamplingParams(temperature=0.0, allowed_token_ids=allowed), SamplingParams(temperature=0.0)]
              + [SamplingParams(temperature=1.0, allowed_token_ids=allowed)] * (num_rows - 2))
    out = Sampler(device=DEVICE)(logits.to(DEVICE), make_batch(params, device=DEVICE))  # the race on CUDA
    assert out.token_ids[0] == max(allowed, key=lambda t: row_logits[t].item())
    assert out.token_ids[1] == int(row_logits.argmax())  # a row without a list is untouched
    counts = torch.bincount(torch.tensor(out.token_ids[2:]), minlength=vocab_size)
    expected = torch.zeros(vocab_size, dtype=torch.double)
    expected[allowed] = torch.softmax(row_logits[allowed].double(), -1)
    assert_follows(counts, expected)  # the allowed tokens, renormalized among themselves
    got = apply_logit_bias_and_blocks(logits[:3], [{allowed[0]: 2.0}, None, None], [[allowed[1]], [], []],
                                      [allowed + [10**9], None, [10**9]])
    want = torch.full_like(logits[:3], float("-inf"))
    want[0, allowed] = logits[0, allowed]
    want[0, allowed[0]] += 2.0
    want[0, allowed[1]] = float("-inf")
    want[1:] = logits[1:3]  # no list, or one without a token of the vocabulary: untouched
    torch.testing.assert_close(got, want)


def test_logit_bias_applied_before_sampling():
    vocab_size = 64
    logits = torch.randn(3, vocab_size)
    favoured = int(logits[0].argmin())
    params = [SamplingParams(temperature=0.0, logit_bias={favoured: 100.0}),
              SamplingParams(temperature=1.0, logit_bias={favoured: 100.0, 10**9: 5.0}),
              SamplingParams(temperature=0.0)]
    out = Sampler()(logits, make_batch(params, blocked=[[], [], [10**9]]))
    assert out.token_ids == [favoured, favoured, int(logits[2].argmax())]
    bias = {3: 1.5, 7: -2.0}
    got = apply_logit_bias_and_blocks(logits, [bias, None, {}], [[7], [], [1, 2]])
    want = logits.clone()
    want[0, 3] += 1.5
    want[0, 7] = float("-inf")
    want[2, [1, 2]] = float("-inf")
    torch.testing.assert_close(got, want)


def test_sampled_logprobs_are_raw_with_rank_and_sorted_top_k():
    num_rows, vocab_size = 6, 300
    logits = torch.randn(num_rows, vocab_size) * 2
    logits_before = logits.clone()
    requested = [None, 0, 1, 5, 20, 3]
    params = [SamplingParams(temperature=0.9 if i % 2 else 0.0, logprobs=k, top_k=50,
                             presence_penalty=1.0)
              for i, k in enumerate(requested)]
    out = Sampler()(logits, make_batch(params, outputs=[[1, 2, 3]] * num_rows))
    torch.testing.assert_close(logits, logits_before)  # the caller's logits are untouched
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[0] is None
    for i in range(1, num_rows):
        entry, k, token = out.logprobs[i], requested[i], out.token_ids[i]
        assert len(entry.token_ids) == len(entry.logprobs) == 1 + k
        assert entry.token_ids[0] == token
        assert entry.logprobs[0] == pytest.approx(raw[i, token].item(), abs=1e-5)
        assert entry.rank == 1 + int((raw[i] > raw[i, token]).sum())
        top = raw[i].topk(k)
        assert entry.token_ids[1:] == top.indices.tolist()
        assert entry.logprobs[1:] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert entry.logprobs[1:] == sorted(entry.logprobs[1:], reverse=True)


def test_compute_prompt_logprobs_matches_reference():
    length, vocab_size, k = 9, 120, 4
    logits = torch.randn(length, vocab_size) * 2
    targets = torch.randint(0, vocab_size, (length,))
    got = compute_prompt_logprobs(logits, targets, k)
    assert len(got) == length
    for i, entry in enumerate(got):
        row = torch.log_softmax(logits[i].double(), -1)
        target = int(targets[i])
        assert entry.token_ids[0] == target
        assert entry.logprobs[0] == pytest.approx(row[target].item(), abs=1e-5)
        assert entry.rank == 1 + int((row > row[target]).sum())
        assert entry.token_ids[1:] == row.topk(k).indices.tolist()
        assert entry.logprobs[1:] == pytest.approx(row.topk(k).values.tolist(), abs=1e-5)


def test_build_converts_params():
    params = [SamplingParams(top_k=-1), SamplingParams(top_k=5, temperature=0.0, seed=3),
              SamplingParams(top_p=0.5, repetition_penalty=1.2)]
    batch = make_batch(params, outputs=[[], [1, 2], [4]], output_indices=[0, 2, 1])
    assert batch.top_k.tolist() == [0, 5, 0]
    assert batch.top_k.dtype == torch.int32 and batch.temperature.dtype == torch.float32
    assert batch.positions == [0, 2, 1] and batch.output_indices == [0, 2, 1]
    assert batch.seeds == [None, 3, None]
    assert not batch.all_greedy and not batch.all_random and not batch.no_penalties
    assert batch.max_top_k == 5 and not batch.top_p_within_top_k and not batch.no_top_p


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_triton", [False, True])
def test_a_sampled_step_is_queued_without_waiting_for_the_gpu(use_triton):
    """The worker samples right after it queues the step's forward pass: a host-device sync in the
    sampler would hold the host until that forward had run, and the host's work for the next step
    would then add to the GPU's instead of overlapping it. Every sampling feature but logprobs (which
    the host reads now) must stay queued. (The sampler before this test failed it: its parameter
    tensors were copied from pageable memory.)"""
    params = [SamplingParams(temperature=0.8, top_p=0.95),
              SamplingParams(temperature=1.0, top_k=20, seed=3),
              SamplingParams(temperature=0.7, min_p=0.05, logit_bias={7: 2.0}),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.2, repetition_penalty=1.1),
              SamplingParams(temperature=0.9, min_tokens=4)]
    rows = [RowInfo(p, [1, 2, 3], [4, 4, 5], 0, [0, 9] if p.min_tokens else []) for p in params]
    logits = torch.randn(len(params), 32000, device="cuda")
    sampler = Sampler(device="cuda", use_triton=use_triton)
    sampler.warm_up(32000, torch.float32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call below raises
    try:
        token_ids, logprobs = sampler.sample(logits, SamplingBatch.build(rows, "cuda"))
        # Temperature alone (the OpenAI API's default sampling): the race reads the logits unscaled.
        alone = [RowInfo(SamplingParams(temperature=t, seed=seed), [1], [2], 0, []) for t, seed in ((0.8, None), (1.0, 4))]
        alone_ids, _ = sampler.sample(logits[:2], SamplingBatch.build(alone, "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logprobs == [None] * len(params)
    tokens = token_ids.tolist()
    assert tokens[3] == int(logits[3].argmax()) and tokens[5] not in (0, 9)
    assert all(0 <= t < 32000 for t in alone_ids.tolist())
