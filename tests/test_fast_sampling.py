"""The opt-in fast samplers of ``VAR.generate``: cached token pruning (FastVAR), guidance skipped at late
scales, and a refiner that takes the last scales over (CoDe). Each is checked against what it promises:
off by default, the same computation where it claims one, and the documented change where it makes one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import PATCH_NUMS, perturbed
from test_var import _run, _text, _text_var

from varctl.models import VAR, VARConfig
from varctl.models.sampling import guidance_schedule
from varctl.models.token_pruning import PruningPlan, TokenPruning

pytestmark = pytest.mark.usefixtures("one_thread")
PRUNE = TokenPruning(ratio=0.5, scales=2, keep_blocks=0)  # the tiny VAR has 2 blocks: prune both


def _small(vae, depth: int = 1, seed: int = 3) -> VAR:
    torch.manual_seed(seed)
    model = VAR(VARConfig.from_name("tiny", depth=depth, num_heads=2, embed_dim=64), vae).eval()
    return perturbed(model)


def _teacher(model, labels, rec, cfg):
    """Teacher-forcing logits of the drawn tokens: (conditional, null-class) pairs per scale."""
    x = model.vae.idx_to_var_input([r[1] for r in rec])
    with torch.no_grad():
        return model(labels, x), model(torch.full_like(labels, model.config.num_classes), x)


# ---------------------------------------------------------------------------------------------- pruning
def test_layer_pruning_keeps_pivotal_tokens_and_fills_from_the_reference():
    plan = PruningPlan(PRUNE, PATCH_NUMS, depth=2)
    assert plan.reference_scale == 1 and plan.at(0, 0) is None
    layer = lambda x: 2 * x + 1  # noqa: E731
    ref_in = torch.randn(2, 4, 3)
    assert torch.equal(plan.at(1, 0)(layer, ref_in, "ffn"), layer(ref_in))  # recorded, all tokens
    x = torch.zeros(2, 9, 3)
    x[:, [0, 4, 8]] = torch.tensor([5.0, -4.0, 3.0])  # far from the mean: the pivotal tokens
    x[1, 4] = 0.1  # in row 1, token 4 is not among the farthest
    x[1, 2] = 9.0
    out = plan.at(2, 0)(layer, x, "ffn")  # 9 tokens, ratio 0.5: round(4.5) = 4 kept
    filled = F.interpolate(layer(ref_in).transpose(1, 2).reshape(2, 3, 2, 2), size=(3, 3), mode="area")
    filled = filled.flatten(2).transpose(1, 2)
    kept = {0: [0, 4, 8], 1: [0, 2, 8]}  # and one of the remaining (equal scores)
    for r, ids in kept.items():
        for i in range(9):
            if i in ids:
                assert torch.equal(out[r, i], layer(x)[r, i]), (r, i)
        others = [i for i in range(9) if not torch.equal(out[r, i], layer(x)[r, i])]
        assert len(others) == 5 and all(torch.allclose(out[r, i], filled[r, i]) for i in others)


def test_pruning_is_off_by_default_and_at_ratio_zero(var):
    labels = torch.tensor([1, 5])
    base = var.generate(labels, cfg=1.5, top_k=20, seed=3)
    for off in (None, 0.0, {"ratio": 0.0}):
        assert torch.equal(var.generate(labels, cfg=1.5, top_k=20, seed=3, token_pruning=off), base)


def test_pruning_keeping_every_token_computes_the_same_logits(var):
    labels = torch.tensor([2, 7])
    _, exact = _run(var, labels, cfg=2.0, top_k=0, seed=5)
    tiny_ratio = TokenPruning(ratio=0.01, scales=2, keep_blocks=0)  # round(l * 0.99) = l: gathered, scattered
    _, pruned = _run(var, labels, cfg=2.0, top_k=0, seed=5, token_pruning=tiny_ratio)
    for (a, ia, _), (b, ib, _) in zip(exact, pruned):
        assert (a - b).abs().max() < 1e-5 and torch.equal(ia, ib)


def test_pruning_runs_the_layers_on_fewer_tokens_and_changes_samples(var):
    seen = []
    hook = var.blocks[0].ffn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        labels = torch.tensor([2, 7])
        exact = var.generate(labels, cfg=2.0, top_k=0, seed=5)
        seen.clear()
        pruned = var.generate(labels, cfg=2.0, top_k=0, seed=5, token_pruning=PRUNE)
    finally:
        hook.remove()
    assert seen == [1, 4, round(9 * 0.5), 8]  # scales 2 and 3 run half their tokens
    assert (pruned - exact).abs().max() > 1e-3


def test_pruning_with_a_text_model(vae):
    model = _text_var(vae)
    images = model.generate(_text(2), cfg=1.5, seed=0, token_pruning=PRUNE)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


# ---------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("skip_from", [2, 3])
def test_skipped_guidance_gives_the_conditional_logits_from_that_scale(var, skip_from):
    labels = torch.tensor([3, 8])
    _, rec = _run(var, labels, cfg=2.0, top_k=30, seed=1, skip_guidance_from=skip_from)
    cond, null = _teacher(var, labels, rec, 2.0)
    ts = guidance_schedule(2.0, "linear", len(PATCH_NUMS))
    for si, ((logits, _, _), (b, e)) in enumerate(zip(rec, var.config.begin_ends)):
        t = ts[si] if si < skip_from else 0.0
        expected = (1 + t) * cond[:, b:e] - t * null[:, b:e]
        assert (logits - expected).abs().max() < 1e-5, si


def test_skipping_no_scale_changes_nothing(var):
    labels = torch.tensor([0, 9])
    base = var.generate(labels, cfg=1.5, top_k=20, seed=2)
    assert torch.equal(var.generate(labels, cfg=1.5, top_k=20, seed=2, skip_guidance_from=4), base)
    with pytest.raises(ValueError, match="skip_guidance_from"):
        var.generate(labels, skip_guidance_from=9)


def test_skipped_guidance_with_a_text_model(vae):
    model = _text_var(vae)
    cond = _text(2)
    _, rec = _run(model, cond, cfg=1.5, top_k=30, seed=4, skip_guidance_from=2)
    x = vae.idx_to_var_input([r[1] for r in rec])
    with torch.no_grad():
        c = model(cond, x)
    b, e = model.config.begin_ends[3]
    assert (rec[3][0] - c[:, b:e]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- refiner
@pytest.mark.parametrize("draft", [1, 3])
def test_the_model_refining_itself_reproduces_plain_sampling(var, draft):
    """A refiner's prefill fills its KV caches by teacher forcing: with the drafter itself as the refiner,
    every logit equals the one-model run's."""
    labels = torch.tensor([4, 6])
    _, plain = _run(var, labels, cfg=1.5, top_k=0, seed=8)
    _, refined = _run(var, labels, cfg=1.5, top_k=0, seed=8, refiner=var, draft_scales=draft)
    for (a, ia, _), (b, ib, _) in zip(plain, refined):
        assert (a - b).abs().max() < 1e-5 and torch.equal(ia, ib)


def test_a_smaller_refiner_draws_the_last_scales(var, vae):
    refiner = _small(vae)
    labels = torch.tensor([1, 2])
    _, plain = _run(var, labels, cfg=1.5, top_k=30, seed=6)
    _, rec = _run(var, labels, cfg=1.5, top_k=30, seed=6, refiner=refiner, draft_scales=2)
    for si in (0, 1):  # drafted: the drafter's logits and tokens
        assert torch.equal(rec[si][1], plain[si][1]) and (rec[si][0] - plain[si][0]).abs().max() < 1e-5
    cond, null = _teacher(refiner, labels, rec, 1.5)
    ts = guidance_schedule(1.5, "linear", len(PATCH_NUMS))
    for si in (2, 3):  # refined: the refiner's guided logits on the same tokens
        b, e = refiner.config.begin_ends[si]
        expected = (1 + ts[si]) * cond[:, b:e] - ts[si] * null[:, b:e]
        assert (rec[si][0] - expected).abs().max() < 1e-5


def test_all_three_together(var, vae):
    refiner = _small(vae)
    pruning = TokenPruning(ratio=0.5, scales=1, keep_blocks=0)
    images = var.generate(
        torch.tensor([1, 2]), cfg=1.5, seed=0, refiner=refiner, draft_scales=2, skip_guidance_from=3,
        token_pruning=pruning,
    )  # fmt: skip
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_refiner_errors(var, vae):
    labels = torch.tensor([1])
    other = VAR(VARConfig.from_name("tiny", num_classes=7), vae).eval()
    with pytest.raises(ValueError, match="num_classes: 10 vs 7"):
        var.generate(labels, refiner=other, draft_scales=2)
    with pytest.raises(ValueError, match="draft_scales must be in"):
        var.generate(labels, refiner=var, draft_scales=4)
    with pytest.raises(ValueError, match="reference scale"):
        var.generate(labels, refiner=var, draft_scales=2, token_pruning=PRUNE)
