"""Start-up checks of the sampling kernels against the torch stages (gpu_workers/sampling_ops.py).

`Sampler.warm_up` runs each on the worker's device before the first step: it compiles every variant a
step launches, and should one fail or keep other tokens than torch would, the sampler logs it and
keeps the torch path. Each raises RuntimeError naming the row that disagreed.
"""

from __future__ import annotations

import torch

from gpu_workers.sampling_ops import apply_min_p, apply_top_k_top_p, apply_top_p_by_search


_CHECK_ROWS = ((1.0, 50, 1.0, 0.0), (0.8, 0, 0.9, 0.0), (1.2, 0, 1.0, 0.05), (0.7, 40, 0.8, 0.01))
"""(temperature, top_k, top_p, min_p) of the start-up check's rows: each filter, and all together."""


def check_kernel_against_torch(vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raises unless kernels.sampling keeps, on fixed random logits, the tokens the torch filters keep
    (rows where rounding could tip top-p either way are skipped) and draws one of them.

    The logits are 256 distinct values 1/8 apart (exact in bf16) at random token ids, over a tail too far
    below to carry mass: no ties at any threshold, where the two paths may legitimately part."""
    from kernels.sampling import sample

    gen = torch.Generator().manual_seed(0)
    logits = -40 - 3 * torch.rand(len(_CHECK_ROWS), vocab_size, generator=gen)  # [R, V]
    head = 8 - 0.125 * torch.arange(min(256, vocab_size))
    for row in logits:
        row[torch.randperm(vocab_size, generator=gen)[:len(head)]] = head
    logits = logits.to(dtype)
    temperature, top_k, top_p, min_p = (torch.tensor(col) for col in zip(*_CHECK_ROWS))
    y = logits.float() / temperature[:, None]
    before_top_p = apply_top_k_top_p(apply_min_p(y, min_p), top_k.int(), torch.ones_like(top_p), 0)  # [R, V]
    kept_ref = torch.isfinite(apply_top_k_top_p(before_top_p, top_k.int(), top_p, 0))  # [R, V]
    out = sample(logits.to(device), temperature.to(device), top_k.int().to(device), top_p.to(device),
                 min_p.to(device), torch.arange(len(_CHECK_ROWS), device=device))
    kept = y >= out.thresholds.cpu()[:, None]  # [R, V]
    for row, (ref, got) in enumerate(zip(kept_ref, kept)):
        tipping = top_p[row] < 1 and near_top_p_cut(before_top_p[row], top_p[row].item())
        if not (torch.equal(ref, got) or tipping) or not ref[out.token_ids[row].item()]:
            raise RuntimeError(f"row {row} {_CHECK_ROWS[row]}: the kernel keeps {int(got.sum())} tokens, "
                               f"torch {int(ref.sum())}; drew token {out.token_ids[row].item()}")


def near_top_p_cut(y: torch.Tensor, top_p: float) -> bool:
    """Some token of row y [V] has a probability mass before it within rounding of top_p: float32
    paths may keep that token or not, and both are right (the start-up checks skip such rows)."""
    probs = torch.softmax(y.double(), -1).sort(descending=True).values
    return bool(((probs.cumsum(0) - probs - top_p).abs() < 1e-5).any())


def check_gumbel_race(vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raises unless kernels/gumbel.py, on fixed random rows, draws the only token a row keeps (the rest
    -inf, or 60 nats below it, or under the row's threshold), and some token of a row that keeps all.
    Compiles, as it goes, every variant `Sampler._sample` launches: the model's logits scaled by the
    kernel (temperature alone), float32 ones so (after penalties or a logit bias), and float32 scaled
    logits with top-p's threshold or without one."""
    from kernels.gumbel import gumbel_race

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, vocab_size, generator=gen)  # [4, V]
    only = torch.randint(0, vocab_size, (4,), generator=gen)
    x[0] = float("-inf")
    x[1] -= 50
    x[2] = 4 + 0.5 * x[2].sigmoid()  # all but one token under the threshold 5, with most of the mass
    x[[0, 1, 2], only[:3]] = 10.0
    threshold = torch.tensor([float("-inf"), float("-inf"), 5.0, float("-inf")], device=device)
    seeds = torch.randint(0, 1 << 62, (4,), generator=gen).to(device)
    ones = torch.ones(4, device=device)
    for x_dtype, temperature, cut in ((dtype, ones, None), (torch.float32, ones, None),
                                      (torch.float32, None, threshold), (torch.float32, None, None)):
        got = gumbel_race(x.to(x_dtype).to(device), seeds, temperature, cut).tolist()
        want = only[:3 if cut is not None else 2].tolist()
        if got[:len(want)] != want or not 0 <= got[3] < vocab_size:
            raise RuntimeError(f"the Gumbel race ({x_dtype}, temperature {temperature is not None}, threshold "
                               f"{cut is not None}) drew {got}; expected {want} first")


def check_top_p_search(vocab_size: int, device: torch.device) -> None:
    """Raises unless kernels/top_p.py keeps, on fixed random rows, the tokens the sort keeps (rows
    where rounding could tip top-p either way are skipped). Compiles the kernels as it goes."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4, vocab_size, generator=gen) * torch.tensor([[0.5], [2.0], [4.0], [8.0]])  # [4, V]
    top_p = torch.tensor([0.5, 0.9, 0.95, 0.99])
    ref = torch.isfinite(apply_top_k_top_p(y, torch.zeros(4, dtype=torch.int32), top_p, 0))  # [4, V]
    got = torch.isfinite(apply_top_p_by_search(y.to(device), top_p.to(device))).cpu()
    for row in range(4):
        if not (torch.equal(ref[row], got[row]) or near_top_p_cut(y[row], top_p[row].item())):
            raise RuntimeError(f"row {row}: the top-p search keeps {int(got[row].sum())} tokens, the sort "
                               f"{int(ref[row].sum())}")
