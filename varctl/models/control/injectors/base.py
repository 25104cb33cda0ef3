"""The one interface between a control injector and the VAR.

An ``Injector`` (a module of the control branch, built from its ControlConfig) turns the encoded control of
one batch into a ``Session`` for one teacher-forcing ``VAR.forward`` or one KV-cached ``VAR.generate``. The
VAR calls the session only at these points:

- ``prefix()``: the ``Prefix`` of P tokens that every token attends to before the earlier scales (their
  input and condition), or None; ``attention_bias(mask, begin, end)``: the additive attention bias of
  tokens [begin, end) on the prefix and tokens [0, end);
- ``block_input(i, x, begin, end)``: the hidden states of tokens [begin, end) (whole scales) entering
  block i; ``block_output(i, x, begin, end)``: leaving it.

[begin, end) is [0, L) in teacher forcing and one scale while sampling, or the scales [0, end) at once when a
refiner's KV caches are filled from the scales drawn before it. R rows: the batch, or while sampling with
guidance its conditional, null-class and control-dropped copies (``Controls.rows``).

Legend: R rows, L all tokens, l tokens of one scale, C VAR width, F control feature width, P prefix tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from varctl.models.control.config import ControlConfig
from varctl.models.transformer import QueryGroups


@dataclass
class Context:
    """What one VAR call gives its injector session."""

    var: nn.Module  # the VAR (its blocks, mask and scales)
    tokens_RLF: torch.Tensor  # the control feature of every token of every scale (zeros: null control)
    grid_RFhw: torch.Tensor  # the feature map F_c (zeros: null control)
    strength_K: tuple[float, ...] | None  # per-scale control strength; None: 1 everywhere
    shared: torch.Tensor  # what the VAR's blocks take as ``modulation(shared)`` (R rows)
    text: tuple | None  # the VAR's (ctx_RTC, bias, gate) for cross-attention, or None
    cached: bool  # True inside generate (KV caches), False in teacher forcing (block-causal mask)
    # each row's first row of the same sample and control: rows that differ in their condition only (a
    # sample's guidance copies); None: every row is a sample of its own
    first_R: list[int] | None = None


@dataclass
class Prefix:
    """Tokens that attend only to each other and that every token attends to first: their input ``x``
    (U, P, C), what the VAR's blocks condition them on (``shared``, the blocks' modulation input, 1 or U
    rows, and ``text``, the VAR's (ctx, bias, gate) of U rows or None; ``shared`` None: each row's own
    condition, whose modulations and text the VAR has already), and each of the R rows' prefix row
    (``index_R``; None: U = R, row r's own)."""

    x: torch.Tensor
    shared: torch.Tensor | None = None
    text: tuple | None = None
    index_R: torch.Tensor | None = None


class Injector(nn.Module):
    """Base of the injectors: no prefix, identity hooks; subclasses override what they use."""

    name: str

    def __init__(self, config: ControlConfig):
        super().__init__()
        self.config = config
        self.slot = {b: j for j, b in enumerate(config.injected_blocks)}  # block -> its parameters' index

    def init_from_backbone(self, var: nn.Module) -> None:
        """Initialise from the backbone VAR when a new branch is built (CAR copies blocks)."""

    def session(self, ctx: Context) -> Session:
        return Session(self, ctx)


class Session:
    """One forward or generate call of an injector; subclasses keep their per-call state (side caches)."""

    def __init__(self, injector: Injector, ctx: Context):
        self.injector, self.ctx = injector, ctx
        self.begin_ends = injector.config.begin_ends
        self._scale_at = {b: k for k, (b, _) in enumerate(self.begin_ends)}

    def prefix(self) -> Prefix | None:
        return None

    def keep_rows(self, n: int) -> None:
        """Only the first ``n`` rows (the samples, with their control) go on: ``generate``'s
        ``skip_guidance_from`` drops the guidance copies. The per-row inputs are cut here; a session with
        per-row state of its own (modulations, KV caches) cuts it too."""
        ctx, text = self.ctx, self.ctx.text
        self.ctx = replace(
            ctx,
            tokens_RLF=ctx.tokens_RLF[:n],
            grid_RFhw=ctx.grid_RFhw[:n],
            shared=ctx.shared[:n],
            text=None if text is None else tuple(t[:n] for t in text),
            first_R=None if ctx.first_R is None else ctx.first_R[:n],
        )

    def attention_bias(self, mask: torch.Tensor | None, begin: int, end: int) -> torch.Tensor | None:
        return mask

    def block_input(self, i: int, x: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        return x

    def block_output(self, i: int, x: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        return x

    # ------------------------------------------------------------------ helpers for the injectors
    def scales(self, begin: int, end: int) -> list[int]:
        """The scales that tokens [begin, end) cover (whole scales only)."""
        L = self.begin_ends[-1][1]
        if begin not in self._scale_at or (end != L and end not in self._scale_at):
            raise ValueError(f"control covers whole scales {self.begin_ends}, not [{begin}, {end})")
        k, out = self._scale_at[begin], []
        while k < len(self.begin_ends) and self.begin_ends[k][1] <= end:
            out.append(k)
            k += 1
        return out

    def features(self, begin: int, end: int) -> torch.Tensor:
        return self.ctx.tokens_RLF[:, begin:end]

    def strength(self, begin: int, end: int, like: torch.Tensor) -> torch.Tensor | None:
        """(1, end - begin, 1): each token's control strength, or None when it is 1 throughout."""
        s = self.ctx.strength_K
        if s is None:
            return None
        ks = self.scales(begin, end)
        if all(s[k] == 1 for k in ks):
            return None
        per = [torch.full((e - b,), float(s[k])) for k in ks for b, e in [self.begin_ends[k]]]
        return torch.cat(per).to(like.device, like.dtype).view(1, -1, 1)

    def scaled(self, r: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        s = self.strength(begin, end, r)
        return r if s is None else r * s

    def mask(self, begin: int, end: int) -> torch.Tensor | QueryGroups | None:
        """The block-causal attention bias of tokens [begin, end) on tokens [0, end) (the KV caches), for
        ``transformer.attention``; teacher forcing's whole sequence as the VAR's ``QueryGroups``; None while
        sampling one scale, which sees all of them."""
        var = self.ctx.var
        if self.ctx.cached and len(self.scales(begin, end)) == 1:
            return None
        if not self.ctx.cached and (begin, end) == (0, var.config.L):
            return var.query_groups()
        return var.attn_bias_for_masking[:, :, begin:end, :end]

    def off(self, begin: int, end: int) -> bool:
        """Whether the control strength is 0 at every scale of [begin, end): its residuals need not be
        computed (a switched-off scale costs nothing)."""
        s = self.ctx.strength_K
        return s is not None and all(s[k] == 0 for k in self.scales(begin, end))

    def off_from(self, begin: int) -> bool:
        """Whether the strength is 0 at the scale starting at ``begin`` and at every later one: then an
        injector with state carried across scales (side branches' and adapters' KV caches) can stop."""
        return self.off(begin, self.begin_ends[-1][1])

    def unconditioned_rows(self) -> tuple[list[int], list[int]]:
        """For a pass that reads a row's tokens and control but not its condition: the rows it runs for
        (the first row of each sample and control) and each row's index among them. A sample and its
        class-guidance copy share one; a control-dropped copy has one of its own."""
        first = self.ctx.first_R
        first = list(range(self.ctx.tokens_RLF.shape[0])) if first is None else first
        reps = sorted(set(first))
        at = {r: u for u, r in enumerate(reps)}
        return reps, [at[f] for f in first]

    def null_condition(self, U: int):
        """The VAR's null condition (the null class or the empty caption) for U rows of a pass of the
        VAR's blocks: the shared modulation input (1 row), the text (U rows) and the first scale's tokens
        (1 row), embedded in float32 as the VAR embeds a condition."""
        var = self.ctx.var
        with torch.autocast(var.lvl_1L.device.type, enabled=False):
            cond_1D, text = var._embed_condition(var.null_condition(1), drop=False)
            sos = var._start_tokens(cond_1D)  # (1, first_l, C)
        text = None if text is None else tuple(t.expand(U, *t.shape[1:]) for t in text)
        return var.shared_ada_lin(cond_1D), text, sos


class BlockInputSession(Session):
    """Adds ``injector.residual(session, j, begin, end)`` (R, l, C) to the input of each injected block
    (j its slot), times the strength: the residual injectors (scalar, controlar)."""

    def block_input(self, i, x, begin, end):
        j = self.injector.slot.get(i)
        if j is None or self.off(begin, end):
            return x
        return x + self.scaled(self.injector.residual(self, j, begin, end).to(x.dtype), begin, end)
