"""Token sampling for VAR's next-scale prediction: guidance schedules, top-k / top-p filtering, Gumbel
soft embeddings.

Each function reproduces the official VAR sampler's arithmetic and its use of the random generator (one
``torch.multinomial`` per token, then, with ``more_smooth``, one ``exponential_`` draw per logit), so a
seeded call gives the same tokens as the official ``autoregressive_infer_cfg``.

Legend: B batch, l tokens of one scale, V vocabulary, K scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCHEDULES = ("linear", "constant")


def per_scale(value, num_scales: int, name: str) -> list:
    """A scalar broadcast to every scale, or a list with exactly one value per scale."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_scales:
            raise ValueError(
                f"{name}: a per-scale list needs {num_scales} values (one per scale), found {len(value)}"
            )
        return list(value)
    return [value] * num_scales


def guidance_schedule(cfg, schedule: str, num_scales: int) -> list[float]:
    """Guidance strength t of each scale; mixed logits are (1 + t) * cond - t * uncond.

    ``linear`` (official): t = cfg * k / (K - 1), pure conditional at the first scale, cfg at the last.
    ``constant``: t = cfg everywhere. A list ``cfg`` gives t per scale directly and ignores ``schedule``.
    """
    if isinstance(cfg, (Sequence, torch.Tensor)) and not isinstance(cfg, str):
        return [float(t) for t in per_scale(cfg, num_scales, "cfg")]
    if schedule == "constant":
        return [float(cfg)] * num_scales
    if schedule == "linear":
        # the same float arithmetic as the official sampler: ratio first, then cfg * ratio
        return [cfg * (k / (num_scales - 1) if num_scales > 1 else 0.0) for k in range(num_scales)]
    raise ValueError(
        f"cfg_schedule must be one of {SCHEDULES} (or pass cfg as a per-scale list), found {schedule!r}"
    )


def check_sampling_args(top_ks: list, top_ps: list, temperatures: list) -> None:
    for k in top_ks:
        if int(k) != k or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), found {k!r}")
    for p in top_ps:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 = off), found {p!r}")
    for t in temperatures:
        if not t > 0:
            raise ValueError(f"temperature must be > 0, found {t!r}")


def filter_logits(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf the logits outside the top-k (ties with the k-th kept) and outside the nucleus top-p.

    Top-p follows the official rule: sort ascending, drop tokens whose ascending cumulative probability is
    <= 1 - top_p, always keep the most likely token. Returns a new tensor.
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits_BlV = logits_BlV.masked_fill(remove, -torch.inf)
    return logits_BlV


def sample_tokens(logits_BlV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One multinomial draw per token from softmax(logits) -> idx_Bl (int64)."""
    B, l, V = logits_BlV.shape
    probs = logits_BlV.softmax(dim=-1).view(-1, V)  # (B*l, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """Soft Gumbel-softmax weights over the last dim, noise drawn from ``generator``."""
    gumbels = (
        -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format)
        .exponential_(generator=generator)
        .log()
    )
    return ((logits + gumbels) / tau).softmax(dim=-1)


def smooth_embedding(
    logits_BlV: torch.Tensor, codebook_VC: torch.Tensor, ratio: float, generator: torch.Generator | None
) -> torch.Tensor:
    """``more_smooth``: a Gumbel-softmax-weighted mix of code vectors instead of the sampled code, (B, l, C).

    Sharper logits (x(1 + ratio)) and a falling temperature as the scales grow, as in MaskGIT.
    """
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    weights_BlV = gumbel_softmax(logits_BlV.mul(1 + ratio), tau, generator)
    return weights_BlV @ codebook_VC.unsqueeze(0)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A fresh generator on ``device``: seeded when ``seed`` is given, else from a nondeterministic source
    (never touching the global RNG)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
