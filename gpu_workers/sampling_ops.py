"""The sampler's torch stages: min-p, top-k and top-p as one threshold a row, and the logprobs it returns.

gpu_workers/sampler.py runs them in vLLM's order; kernels/top_p.py and kernels/gumbel.py stand in for
the costliest on CUDA, and gpu_workers/sampler_checks.py checks those kernels against these at start-up.
"""

from __future__ import annotations

import torch

from ipc.messages import Logprobs


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens with p < min_p * p_max, tested in log space: logit < max_logit + log(min_p).
    min_p = 0 gives log 0 = -inf and drops nothing."""
    max_logits = logits.amax(dim=-1, keepdim=True)  # [S, 1]
    threshold = max_logits + torch.log(min_p)[:, None]  # [S, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))  # [S, V]


def apply_top_p_by_search(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """apply_top_k_top_p's top-p alone (top_k 0), its threshold from kernels/top_p.py: no sort."""
    from kernels.top_p import top_p_thresholds

    threshold = top_p_thresholds(logits.contiguous(), top_p)  # [S]
    return logits.masked_fill(logits < threshold[:, None], float("-inf"))  # [S, V]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      num_candidates: int, no_top_p: bool = False) -> torch.Tensor:
    """Keeps each row's top_k best tokens, then the smallest prefix of those (by renormalized
    probability) whose mass reaches top_p; the rest become -inf. top_k 0 and top_p 1 disable.

    Both filters only ever look at the C best logits of a row, sorted: C = num_candidates (a
    `topk`, no full sort of the vocabulary) when the caller knows every filtered row fits in it
    (top-k alone, or top-p only on rows with a top_k), else C = V (a full sort, the fallback).
    The filter then becomes one threshold per row, the smallest logit it keeps:

        sorted logits  9  7  6  3  1  ...     top_k 3 -> keep [9 7 6], threshold 6
                                              logits < 6 -> -inf  (ties with 6 survive)
    """
    vocab_size = logits.shape[1]
    num_candidates = num_candidates if 0 < num_candidates < vocab_size else vocab_size
    if num_candidates < vocab_size:
        candidates = logits.topk(num_candidates, dim=-1).values  # [S, C], descending
    else:
        candidates = logits.sort(dim=-1, descending=True).values  # [S, V], descending
    k = top_k.long()  # [S]
    k_disabled = (k <= 0) | (k >= vocab_size)  # [S]
    k = torch.where(k_disabled, num_candidates, k.clamp(max=num_candidates))  # [S]
    keep = torch.arange(num_candidates, device=logits.device)[None, :] < k[:, None]  # [S, C]
    p_disabled = top_p >= 1.0  # [S]
    if not no_top_p:
        probs = candidates.masked_fill(~keep, float("-inf")).softmax(dim=-1)  # [S, C]
        mass_before = probs.cumsum(dim=-1) - probs  # [S, C]; probability of the better tokens
        keep &= (mass_before < top_p[:, None]) | p_disabled[:, None]  # the best token always stays
    threshold = candidates.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)  # [S, 1]
    unfiltered = (k_disabled & p_disabled)[:, None]  # [S, 1]
    threshold = threshold.masked_fill(unfiltered, float("-inf"))  # [S, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))  # [S, V]


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    num_logprobs: list[int]) -> list[Logprobs]:
    """Per row: the chosen token's logprob and 1-based rank, then the row's top-k (descending).

    logprobs [N, V] (already log_softmax'ed), token_ids [N]; row i keeps num_logprobs[i] top entries.
    Rank counts the tokens at least as likely as the chosen one (ties rank it lower, like vLLM).
    """
    vocab_size = logprobs.shape[1]
    max_k = min(max(num_logprobs, default=0), vocab_size)
    top_logprobs, top_ids = logprobs.topk(max_k, dim=-1)  # [N, k], [N, k]
    chosen_ids = token_ids.long()[:, None]  # [N, 1]
    chosen_logprobs = logprobs.gather(1, chosen_ids)  # [N, 1]
    ranks = (logprobs >= chosen_logprobs).sum(dim=-1)  # [N]
    ids = torch.cat([chosen_ids, top_ids], dim=1).tolist()  # [N, 1 + k]
    values = torch.cat([chosen_logprobs, top_logprobs], dim=1).tolist()  # [N, 1 + k]
    return [
        Logprobs(token_ids=ids[i][:1 + min(k, vocab_size)],
                 logprobs=values[i][:1 + min(k, vocab_size)], rank=rank)
        for i, (k, rank) in enumerate(zip(num_logprobs, ranks.tolist()))
    ]


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, k: int) -> list[Logprobs]:
    """Prompt logprobs: logits [L, V] at positions whose next (prompt) token is target_ids [L].
    Entry 0 of each Logprobs is the prompt token with its rank, then the top-k."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [L, V]
    return gather_logprobs(logprobs, target_ids, [k] * logits.shape[0])
