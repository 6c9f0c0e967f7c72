"""The sampler with its random rows on the Triton kernel (the CUDA default; the interpreter here):
the logit edits before it, greedy rows beside random ones, logprobs, and seeds that keep a request's
tokens its own whatever shares the batch. The kernel's own filters and draws: tests/kernels."""

import torch

from gpu_workers.sampler import RowInfo, Sampler, SamplingBatch
from ipc.sampling_params import SamplingParams
from tests.triton_env import DEVICE


def run(sampler, logits, params, outputs=None, blocked=None):
    outputs = outputs or [[] for _ in params]
    blocked = blocked or [[] for _ in params]
    rows = [RowInfo(p, [1, 2, 3], out, 0, block) for p, out, block in zip(params, outputs, blocked)]
    return sampler(logits.to(DEVICE), SamplingBatch.build(rows, DEVICE))


def test_edits_apply_before_the_kernel_and_greedy_rows_take_the_argmax():
    vocab = 96
    logits = torch.randn(6, vocab) * 2
    favoured, banned = int(logits[1].argmin()), logits[2].topk(4).indices.tolist()
    repeated = int(logits[3].argmax())
    params = [SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, logit_bias={favoured: 100.0}),
              SamplingParams(temperature=0.0),  # greedy, its 4 best tokens blocked (min_tokens)
              SamplingParams(temperature=0.0, frequency_penalty=2.0),  # x 50 repeats
              SamplingParams(temperature=0.7, top_k=1, logprobs=3),
              SamplingParams(temperature=1.2, top_p=0.5, min_p=0.05, seed=9)]
    sampler = Sampler(device=DEVICE, use_triton=True)
    out = run(sampler, logits, params, outputs=[[], [], [], [repeated] * 50, [], []],
              blocked=[[], [], banned, [], [], []])
    assert out.token_ids[:5] == [int(logits[0].argmax()), favoured, int(logits[2].topk(5).indices[4]),
                                 int(logits[3].topk(2).indices[1]), int(logits[4].argmax())]
    raw = torch.log_softmax(logits[4], -1)
    assert out.logprobs[4].token_ids == [out.token_ids[4]] + raw.topk(3).indices.tolist()
    assert abs(out.logprobs[4].logprobs[0] - raw[out.token_ids[4]].item()) < 1e-5
    probs = torch.softmax(logits[5] / 1.2, -1)
    kept = probs >= 0.05 * probs.max()
    assert kept[out.token_ids[5]]  # min_p kept it (top_p narrows further)


def test_bf16_logits_sample_like_their_float32_copy():
    logits = (torch.randn(4, 80) * 2).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.8, top_k=10, seed=i) for i in range(3)] + [SamplingParams(temperature=0)]
    sampler = Sampler(device=DEVICE, use_triton=True)
    assert run(sampler, logits, params).token_ids == run(sampler, logits.float(), params).token_ids


def test_seeded_rows_keep_their_tokens_across_batches_orders_and_engine_seeds():
    vocab = 120
    seeded_logits = torch.randn(vocab) * 0.5  # flat: a repeat by chance is unlikely
    seeded = SamplingParams(seed=1234, top_p=0.95)
    history = [5, 6, 7]
    alone = run(Sampler(seed=0, device=DEVICE, use_triton=True), seeded_logits[None], [seeded], [history])
    others = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=3),
              SamplingParams(seed=99, min_p=0.01)]
    unseeded = []
    for engine_seed, order in [(1, [0, 1, 4, 2, 3]), (7, [4, 3, 2, 1, 0]), (3, [2, 4, 0, 1, 3])]:
        params = [(others + [seeded])[i] for i in order]
        logits = torch.randn(5, vocab)
        row = order.index(4)
        logits[row] = seeded_logits
        outputs = [history if i == 4 else [11] * i for i in order]
        out = run(Sampler(seed=engine_seed, device=DEVICE, use_triton=True), logits, params, outputs)
        assert out.token_ids[row] == alone.token_ids[0]
    for engine_seed in range(6):  # an unseeded row follows the engine's generator
        sampler = Sampler(seed=engine_seed, device=DEVICE, use_triton=True)
        unseeded.append(run(sampler, seeded_logits[None], [SamplingParams()]).token_ids[0])
    assert len(set(unseeded)) > 1


def test_warm_up_builds_the_kernel_and_keeps_it():
    sampler = Sampler(device=DEVICE, use_triton=True)
    sampler.warm_up(vocab_size=64)
    assert sampler.use_triton


def test_a_kernel_that_does_not_build_leaves_the_torch_path_in_charge(monkeypatch, caplog):
    import kernels.sampling

    def broken(*args, **kwargs):
        raise RuntimeError("no such PTX feature")

    monkeypatch.setattr(kernels.sampling, "sample", broken)
    sampler = Sampler(device=DEVICE, use_triton=True)
    sampler.warm_up(vocab_size=64)
    assert not sampler.use_triton and "PAGEDSERVE_TRITON_SAMPLING" in caplog.text
    logits = torch.randn(2, 64)
    out = run(sampler, logits, [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0)])
    assert out.token_ids == logits.argmax(-1).tolist()  # sampled through torch


def test_a_kernel_that_keeps_the_wrong_tokens_fails_the_start_up_check(monkeypatch, caplog):
    import kernels.sampling

    real = kernels.sampling.sample

    def off_by_some(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(thresholds=out.thresholds - 0.5)  # keeps a few tokens too many

    monkeypatch.setattr(kernels.sampling, "sample", off_by_some)
    sampler = Sampler(device=DEVICE, use_triton=True)
    sampler.warm_up(vocab_size=96, logits_dtype=torch.float32)
    assert not sampler.use_triton and "keeps" in caplog.text
