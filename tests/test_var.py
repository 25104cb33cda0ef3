"""VAR behaviour beyond the official golden data: condition dropping, the sampler's options, text
conditioning, KV-cache consistency, files and autocast. Tiny models on CPU."""

from __future__ import annotations

import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from helpers import PATCH_NUMS, TINY, perturbed

from varctl.models import VAR, VARConfig
from varctl.models.control import ControlBranch, ControlConfig
from varctl.models.sampling import filter_logits, guidance_schedule
from varctl.models.transformer import QueryGroups, attention
from varctl.models.var import TextCondition
from varctl.models.vqvae import VQVAE, VQVAEConfig

TEXT = dict(condition="text", text_dim=24, text_len=6, text_pooled_dim=20)
# golden, vae (tiny official VQVAE) and var (tiny official VAR): fixtures of conftest.py


def _text(B: int, T: int = 5, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False  # padding in one row
    return TextCondition(torch.randn(B, 20, generator=g), torch.randn(B, T, 24, generator=g), mask)


def _text_var(vae, perturb: bool = True) -> VAR:
    torch.manual_seed(0)
    model = VAR(VARConfig.from_name("tiny", **TEXT), vae)
    if perturb:
        perturbed(model)
    model.set_null_text(
        TextCondition(torch.randn(1, 20), torch.randn(1, 2, 24), torch.ones(1, 2, dtype=torch.bool))
    )
    return model.eval()


def _run(model: VAR, cond, **kwargs):
    """generate + the per-scale (guided logits, tokens, f_hat) it reports."""
    rec = []
    img = model.generate(cond, callback=lambda si, lg, idx, f: rec.append((lg, idx, f.clone())), **kwargs)
    return img, rec


# ---------------------------------------------------------------------------------------------- config
def test_config_presets_and_errors():
    d20 = VARConfig.from_name("d20")
    assert (d20.C, d20.heads, d20.L, d20.first_l) == (1280, 20, 680, 1)
    assert d20.drop_path == pytest.approx(0.1 * 20 / 24)
    assert VARConfig.from_name("d7", num_classes=5).C == 448
    with pytest.raises(ValueError, match="num_heads"):
        VARConfig(depth=4, num_heads=3)
    with pytest.raises(ValueError, match="patch_nums"):
        VARConfig(patch_nums=(1, 3, 2))
    with pytest.raises(ValueError, match="condition"):
        VARConfig(condition="image")
    with pytest.raises(ValueError, match="unknown VAR preset"):
        VARConfig.from_name("huge")


def test_attach_vae_checks_compatibility(var):
    other = VQVAE(VQVAEConfig.from_name("tiny", patch_nums=(1, 2, 4)))
    with pytest.raises(ValueError, match="patch_nums"):
        var.attach_vae(other)
    assert not any(k.startswith(("vae", "_vae")) for k in var.state_dict())
    assert all(m is not var.vae for m in var.modules())


# ---------------------------------------------------------------------------------------------- training
def test_condition_dropping_only_in_train_mode(vae, golden):
    config = VARConfig.from_name("tiny", drop_path_rate=0.0, cond_drop_rate=1.0)  # every label dropped
    model = VAR(config, vae)
    model.load_state_dict(torch.load(os.path.join(TINY, "var.pt"), weights_only=True))
    x, labels = golden["x_BLCv_wo_first_l"], golden["labels"]
    with torch.no_grad():
        model.eval()
        assert (model(labels, x) - golden["logits_BLV"]).abs().max() < 1e-5
        model.train()
        assert (model(labels, x) - golden["logits_BLV_uncond"]).abs().max() < 1e-5


def test_bf16_autocast_forward(var, golden):
    x, labels = golden["x_BLCv_wo_first_l"], golden["labels"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = var(labels, x)
    assert logits.dtype == torch.float32
    err = (logits - golden["logits_BLV"]).abs().max()
    assert 0 < err < 0.05 * golden["logits_BLV"].abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = var.generate(golden["labels"][:2], top_k=1, seed=0)
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1


def test_backward_reaches_every_parameter(vae, golden):
    model = _text_var(vae).train()  # train mode drops conditions: the null text must be set
    x = golden["x_BLCv_wo_first_l"]
    model(_text(4), x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("injector", ["car", "ecm"])
def test_teacher_forcing_attends_by_groups_of_scales_as_one_masked_call_would(monkeypatch, injector):
    """Scales of 64 tokens and more attend as groups of their own, without a bias, to the keys up to their
    end; the smaller ones before them as one masked group. Logits and gradients equal one masked call's,
    for the backbone and the injectors' own attention (CAR's side blocks, ECM's adapters); small schedules
    keep the one masked call."""
    official = QueryGroups.of(torch.zeros(1, 1, 680, 680), VARConfig().begin_ends)
    assert [(b, e, m is None) for b, e, m in official] == [
        (0, 91, False), (91, 155, True), (155, 255, True), (255, 424, True), (424, 680, True)
    ]  # fmt: skip
    pairs = sum((e - b) * e for b, e, _ in official)
    assert pairs / 680**2 < 0.63  # of the score matrix one masked call computes
    tiny = VAR.build("tiny")
    assert tiny.query_groups() is tiny.attn_bias_for_masking

    torch.manual_seed(0)
    fields = dict(num_classes=10, vocab_size=64, z_channels=8, embed_dim=64, num_heads=4, cond_drop_rate=0.0)
    var = perturbed(VAR.build("d2", patch_nums=(1, 2, 4, 8, 10), **fields)).train()
    groups = var.query_groups()
    assert [(b, e, m is None) for b, e, m in groups] == [(0, 21, False), (21, 85, True), (85, 185, True)]
    assert torch.equal(groups[0][2], var.attn_bias_for_masking[:, :, :21, :21])
    config = ControlConfig.for_var(var.config, resolution=160, injector=injector, width=8, feature_dim=16)
    branch = perturbed(ControlBranch.build(config).init_from_backbone(var)).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, var.config.L - 1, 8, generator=g)
    edges = (torch.rand(2, 1, 160, 160, generator=g) > 0.9).float()
    labels = torch.tensor([1, 2])

    def run():
        outs = [var(labels, x), var(labels, x, control=branch.encode({"edges": edges}))]
        params = [*var.parameters(), *branch.parameters()]
        grads = torch.autograd.grad(sum(o.square().mean() for o in outs), params, allow_unused=True)
        return outs, [g for g in grads if g is not None]

    sdpa, rows = F.scaled_dot_product_attention, []

    def counted(q, *args, **kwargs):
        rows.append(q.shape[2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    outs, grads = run()  # the backbone's 2 blocks twice, CAR's side block or ECM's adapter: 3 groups each
    assert sorted(rows) == sorted([21, 64, 100] * 5)
    monkeypatch.setattr(VAR, "query_groups", lambda self: self.attn_bias_for_masking)
    ref_outs, ref_grads = run()
    for out, ref in zip(outs, ref_outs):
        assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    assert len(grads) == len(ref_grads) > 0
    scale = max(ref.abs().max() for ref in ref_grads)  # some gradients are float noise around zero
    for g_, ref in zip(grads, ref_grads):
        assert (g_ - ref).abs().max() <= 1e-5 * scale


def test_query_groups_attention_and_gradients_equal_one_masked_call_at_d16_groups():
    """The five groups of d16's 680 tokens (queries split, keys' and values' prefixes through one zero map in
    the backward) give one masked call's output and gradients of q, k and v; without gradients as well."""
    begin_ends = VARConfig().begin_ends
    scale = torch.cat([torch.full((e - b,), k) for k, (b, e) in enumerate(begin_ends)])
    mask = torch.where(scale[None, :] <= scale[:, None], 0.0, -torch.inf).view(1, 1, 680, 680)  # block-causal
    groups = QueryGroups.of(mask, begin_ends)
    assert len(groups) == 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 680, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    grad_out = torch.randn(2, 680, 2, 8, generator=g, dtype=torch.float64)

    def run(bias):
        out = attention(q, k, v, bias)
        return out, torch.autograd.grad(out, (q, k, v), grad_out)

    out, grads = run(groups)
    ref, ref_grads = run(mask)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, groups), ref)


# ---------------------------------------------------------------------------------------------- sampling
def test_generate_is_seeded_and_ignores_the_global_rng(var, golden):
    labels = golden["labels"][:2]
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = var.generate(labels, top_k=50, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # untouched
    torch.manual_seed(2)
    b = var.generate(labels, top_k=50, seed=7)
    c = var.generate(labels, top_k=50, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    d, e = var.generate(labels, top_k=50), var.generate(labels, top_k=50)  # seed None: fresh each call
    assert (d - e).abs().max() > 1e-3


def test_int_condition_broadcasts(var):
    _, rec = _run(var, 3, batch_size=2, top_k=1, seed=0)
    _, rec_t = _run(var, torch.tensor([3, 3]), top_k=1, seed=0)
    assert all(torch.equal(r[1], s[1]) for r, s in zip(rec, rec_t))
    with pytest.raises(ValueError, match="batch_size"):
        var.generate(3)


def test_cfg_schedules(var, golden):
    labels, K = golden["labels"][:2], len(PATCH_NUMS)
    linear = [1.5 * (k / (K - 1)) for k in range(K)]
    assert guidance_schedule(1.5, "linear", K) == linear
    assert guidance_schedule(2.0, "constant", K) == [2.0] * K
    a, rec_a = _run(var, labels, cfg=1.5, top_k=20, seed=3)
    b, rec_b = _run(var, labels, cfg=linear, top_k=20, seed=3)
    assert torch.equal(a, b)
    c, rec_c = _run(var, labels, cfg=2.0, cfg_schedule="constant", top_k=20, seed=3)
    d, _ = _run(var, labels, cfg=[2.0] * K, top_k=20, seed=3)
    assert torch.equal(c, d)
    assert (rec_c[0][0] - rec_a[0][0]).abs().max() > 1e-3  # constant guides the first scale, linear does not
    with pytest.raises(ValueError, match="cfg"):
        var.generate(labels, cfg=[1.0, 2.0])


def test_filter_logits_values():
    logits = torch.tensor([[[1.0, 3.0, 2.0, 3.0, 0.0]]])
    kept = filter_logits(logits, top_k=1).isfinite()[0, 0].tolist()
    assert kept == [False, True, False, True, False]  # ties with the k-th largest stay
    kept = filter_logits(logits, top_k=3).isfinite()[0, 0].tolist()
    assert kept == [False, True, True, True, False]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().view(1, 1, 4)
    # ascending cumulative: 0.05, 0.20, 0.50, 1.0; top_p=0.7 drops cumulative <= 0.3
    assert filter_logits(logits, top_p=0.7).isfinite()[0, 0].tolist() == [True, True, False, False]
    assert filter_logits(logits, top_p=1e-9).isfinite()[0, 0].tolist() == [True, False, False, False]
    assert torch.equal(filter_logits(logits), logits)


def test_per_scale_temperature_top_k_top_p(var, golden):
    # rows are sampled independently, so two rows reproduce the first two rows of the golden batch
    labels, greedy = golden["labels"][:2], [idx[:2] for idx in golden["ar_greedy_idx_Bl"]]
    for kwargs in (dict(top_k=[1, 1, 1, 1]), dict(top_p=[1e-9] * 4), dict(temperature=[1e-6] * 4)):
        _, rec = _run(var, labels, cfg=1.5, seed=5, **kwargs)
        assert all(torch.equal(r[1], g) for r, g in zip(rec, greedy)), kwargs
    # greedy only at the first three scales: those tokens are fixed, the last scale samples freely
    mixed = [_run(var, labels, top_k=[1, 1, 1, 0], temperature=[1, 1, 1, 5.0], seed=s)[1] for s in (0, 1)]
    for rec in mixed:
        assert all(torch.equal(r[1], g) for r, g in zip(rec[:3], greedy[:3]))
    assert not torch.equal(mixed[0][3][1], mixed[1][3][1])
    assert not torch.equal(mixed[0][3][1], greedy[3])
    with pytest.raises(ValueError, match="top_k"):
        var.generate(labels, top_k=[1, 2])
    with pytest.raises(ValueError, match="temperature"):
        var.generate(labels, temperature=0.0)


def test_return_intermediates(var, vae, golden):
    images, rec = _run(var, golden["labels"][:2], return_intermediates=True, cfg=1.5, top_k=1, seed=0)
    images, steps = images
    assert len(steps) == len(PATCH_NUMS)
    assert steps[-1] is images and (images - golden["ar_greedy_img"][:2]).abs().max() < 1e-4
    for si in (0, 3):
        with torch.no_grad():  # the decoder's inference path, as in generate
            expected = vae.fhat_to_img(rec[si][2]).add(1).mul(0.5)
        assert (steps[si] - expected).abs().max() < 1e-6
    assert (steps[0] - steps[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_kv_cache_logits_equal_teacher_forcing(var, vae, golden, cfg):
    """Each scale's logits during generate equal the masked teacher-forcing pass on the same tokens."""
    labels = golden["labels"][:2]
    _, rec = _run(var, labels, cfg=cfg, cfg_schedule="constant", top_k=0, seed=11)
    x = vae.idx_to_var_input([r[1] for r in rec])
    with torch.no_grad():
        cond, uncond = var(labels, x), var(torch.full_like(labels, 10), x)
    mixed = (1 + cfg) * cond - cfg * uncond
    for (logits, _, _), (b, e) in zip(rec, var.config.begin_ends):
        assert (logits - mixed[:, b:e]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- text
def test_text_model_state_dict_and_class_model_unchanged(vae):
    class_keys = set(VAR(VARConfig.from_name("tiny")).state_dict())
    text_keys = set(VAR(VARConfig.from_name("tiny", **TEXT)).state_dict())
    assert not any("text" in k or "cross" in k for k in class_keys)
    assert class_keys - text_keys == {"class_emb.weight"}
    extra = text_keys - class_keys
    assert {"null_text_pooled", "null_text_tokens", "null_text_mask", "text_pooled_proj.weight"} <= extra
    assert "blocks.1.cross_attn.proj.weight" in extra


def test_fresh_text_model_ignores_tokens(vae, golden):
    """Zero-initialised cross-attention: a fresh text model's output does not depend on the tokens."""
    model = VAR(VARConfig.from_name("tiny", **TEXT), vae).eval()
    x = golden["x_BLCv_wo_first_l"]
    a, b = _text(4, seed=0), _text(4, seed=1)
    b = TextCondition(a.pooled_BE, b.tokens_BTE, torch.ones_like(b.mask_BT))
    with torch.no_grad():
        assert torch.equal(model(a, x), model(b, x))
        perturbed(model)
        assert (model(a, x) - model(b, x)).abs().max() > 1e-3


def test_text_cfg_uses_null_text_and_kv_cache(vae):
    model = _text_var(vae)
    cond = _text(2)
    _, rec = _run(model, cond, cfg=1.5, top_k=30, seed=4)
    x = vae.idx_to_var_input([r[1] for r in rec])
    null = TextCondition(model.null_text_pooled, model.null_text_tokens, model.null_text_mask).expand(2)
    with torch.no_grad():
        c, u = model(cond, x), model(null, x)
    ts = guidance_schedule(1.5, "linear", len(PATCH_NUMS))
    for (logits, _, _), (b, e), t in zip(rec, model.config.begin_ends, ts):
        assert (logits - ((1 + t) * c[:, b:e] - t * u[:, b:e])).abs().max() < 1e-5
    with torch.no_grad():  # train-mode dropping with rate 1 gives the null text
        model.config.cond_drop_rate, _ = 1.0, model.train()
        model.blocks.apply(lambda m: setattr(m, "drop_prob", 0.0) if hasattr(m, "drop_prob") else None)
        assert (model(cond, x) - u).abs().max() < 1e-5
    fresh = VAR(VARConfig.from_name("tiny", **TEXT), vae).eval()
    with pytest.raises(RuntimeError, match="set_null_text"):
        fresh.generate(cond, cfg=1.5)
    assert fresh.generate(cond, cfg=0.0, seed=0).shape == (2, 3, 64, 64)


# ---------------------------------------------------------------------------------------------- files
def test_save_load_round_trips(var, vae, golden, tmp_path):
    x, labels = golden["x_BLCv_wo_first_l"], golden["labels"]
    with torch.no_grad():
        expected = var(labels, x)
    var.save(tmp_path / "var.pt")
    var.export_safetensors(tmp_path / "var.safetensors")
    ckpt = {
        "state_dict": {f"var.{k}": v for k, v in var.state_dict().items()},
        "varctl": {"var": {"config": asdict(var.config), "prefix": "var."}},
    }
    torch.save(ckpt, tmp_path / "lit.ckpt")
    paths = ["var.pt", "var.safetensors", "lit.ckpt", os.path.join(TINY, "var.pt")]
    for name in paths:
        loaded = VAR.load(tmp_path / name, vae=vae).eval()
        assert loaded.config == var.config and loaded.vae is vae, name
        with torch.no_grad():
            assert torch.equal(loaded(labels, x), expected), name
    with pytest.raises(ValueError, match="class_emb"):
        VAR.restore(dict(var.state_dict()), VARConfig.from_name("tiny", **TEXT), "<test>")


def test_load_ema_weights(var, vae, golden, tmp_path):
    """``load(ema=True)`` reads the EMA entry of a varctl Lightning checkpoint (as varctl/lit/var.py writes
    it), ``ema=False`` the trained weights; files without EMA weights are an error naming the file."""
    ema = perturbed(VAR.from_official(os.path.join(TINY, "var.pt"), vae), seed=1).eval()  # stand-in average
    config = asdict(var.config)
    ckpt = {
        "state_dict": {f"var.{k}": v for k, v in var.state_dict().items()}
        | {f"var_ema.module.{k}": v for k, v in ema.state_dict().items()},
        "varctl": {
            "var": {"config": config, "prefix": "var."},
            "var_ema": {"config": config, "prefix": "var_ema.module."},
        },
    }
    torch.save(ckpt, tmp_path / "ema.ckpt")
    x, labels = golden["x_BLCv_wo_first_l"], golden["labels"]
    trained = VAR.load(tmp_path / "ema.ckpt", vae=vae).eval()
    averaged = VAR.load(tmp_path / "ema.ckpt", vae=vae, ema=True).eval()
    assert averaged.config == var.config and averaged.vae is vae
    for k, v in ema.state_dict().items():
        assert torch.equal(averaged.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(trained(labels, x), var(labels, x))
        assert torch.equal(averaged(labels, x), ema(labels, x))
        assert (averaged(labels, x) - trained(labels, x)).abs().max() > 1e-3
    del ckpt["varctl"]["var_ema"]
    torch.save(ckpt, tmp_path / "no_ema.ckpt")
    with pytest.raises(ValueError, match=r"no_ema\.ckpt: no 'var_ema' weights .*\['var'\].*ema_decay > 0"):
        VAR.load(tmp_path / "no_ema.ckpt", ema=True)
    var.save(tmp_path / "var.pt")
    with pytest.raises(ValueError, match=r"var\.pt: a varctl model file holds one set of weights"):
        VAR.load(tmp_path / "var.pt", ema=True)


def test_text_model_round_trip(vae, tmp_path):
    model = _text_var(vae)
    model.save(tmp_path / "text.pt")
    loaded = VAR.load(tmp_path / "text.pt", vae=vae).eval()
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.generate(_text(2), seed=1), model.generate(_text(2), seed=1))


def test_shared_aln_read_off_the_tensors(golden):
    model = perturbed(VAR(VARConfig.from_name("tiny", shared_aln=True))).eval()
    assert "shared_ada_lin.1.weight" in model.state_dict() and "blocks.0.ada_gss" in model.state_dict()
    loaded = VAR.from_official(model.state_dict(), None, patch_nums=PATCH_NUMS).eval()
    assert loaded.config.shared_aln
    with torch.no_grad():
        x, labels = golden["x_BLCv_wo_first_l"], golden["labels"]
        assert torch.equal(loaded(labels, x), model(labels, x))


def test_a_config_value_that_does_not_fit_its_field_is_refused_by_name(tmp_path):
    """From a YAML section, a file's stored config or a load's overrides: a value of the wrong type is one
    ValueError naming the field (and the file), not a TypeError from wherever the value is first used."""
    with pytest.raises(ValueError, match=r"^VARConfig\.depth = '2' \(str\): expected int$"):
        VARConfig.from_dict({"depth": "2"})
    with pytest.raises(
        ValueError, match=r"^VARConfig\.patch_nums = \[1, 2\.5\] \(list\): expected tuple\[int, \.\.\.\]$"
    ):
        VARConfig.from_dict({"patch_nums": [1, 2.5]})
    yaml_values = {"patch_nums": [1, 2], "drop_path_rate": 0}  # a list for a tuple, an int for a float
    assert VARConfig.from_dict(yaml_values).patch_nums == (1, 2)
    file = VAR.build("tiny").save(tmp_path / "var.pt")
    with pytest.raises(
        ValueError, match=r"var\.pt: VARConfig\.cond_drop_rate = 'x' \(str\): expected float$"
    ):
        VAR.load(file, cond_drop_rate="x")
    with pytest.raises(ValueError, match=r"^VARConfig\.cond_drop_rate must be in \[0, 1\], found 1\.5$"):
        VAR.load(file, cond_drop_rate=1.5)
    assert VAR.load(file, cond_drop_rate=0.5).config.cond_drop_rate == 0.5
