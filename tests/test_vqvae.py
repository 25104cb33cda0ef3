"""Unit tests of the VQVAE tokenizer on CPU with micro configs: config, phi map, files, training pass."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from varctl.models import VQVAE, VQVAEConfig
from varctl.models.quantizer import MultiScaleQuantizer, phi_index_map
from varctl.models.vqvae import OFFICIAL_512, OFFICIAL_PATCH_NUMS, config_from_state_dict

MICRO = dict(
    vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4)
)  # 8 px


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small convs are far faster on 1 thread


def micro(seed: int = 0, **overrides) -> VQVAE:
    """A micro VQVAE whose codebook is spread like its latents, so many codes are used."""
    torch.manual_seed(seed)
    vae = VQVAE(VQVAEConfig(**{**MICRO, **overrides}))
    with torch.no_grad():
        f = vae.encode(images(8, vae.config.resolution, seed + 100))
        vae.quantize.embedding.weight.normal_(0, f.std().item())
    return vae


def images(B: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, size, size, generator=g) * 2 - 1


def numpy_phi_map(S: int, K: int) -> list[int]:
    """The official rule, written with numpy as the official code does."""
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    return [int(np.argmin(np.abs(ticks - si / (S - 1)))) for si in range(S)]


# ---------------------------------------------------------------- config
def test_config_presets_and_derived_values():
    official = VQVAEConfig.from_name("vae_ch160v4096z32")
    assert official == VQVAEConfig()
    assert (official.downsample, official.resolution, official.L, official.first_l) == (16, 256, 680, 1)
    assert official.begin_ends[-1] == (680 - 256, 680) and official.num_scales == 10
    tiny = VQVAEConfig.from_name("tiny")
    assert (tiny.ch, tiny.vocab_size, tiny.z_channels, tiny.patch_nums) == (32, 256, 16, (1, 2, 3, 4))
    assert (tiny.resolution, tiny.L) == (64, 30)
    hi = VQVAEConfig.from_name("vae_ch160v4096z32_512")
    assert hi.patch_nums == OFFICIAL_512 and (hi.resolution, hi.L) == (512, 2240)
    assert VQVAEConfig.from_name("cpu_small").resolution == 64
    assert VQVAEConfig.from_name("tiny", vocab_size=128).vocab_size == 128
    assert VQVAEConfig(patch_nums=[1, 2], ch_mult=[1, 2]).patch_nums == (1, 2)  # YAML/JSON lists


def test_norm_groups_reach_every_group_norm():
    vae = VQVAE(VQVAEConfig.from_name("cpu_small"))
    groups = {m.num_groups for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}
    official = VQVAE(VQVAEConfig.from_name("tiny"))
    assert {m.num_groups for m in official.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ch=48), "VQVAEConfig.ch must be a multiple of norm_groups=32"),
        (dict(ch=36, norm_groups=8), "multiple of norm_groups=8"),
        (dict(norm_groups=0), "norm_groups must be at least 1, found 0"),
        (dict(patch_nums=(1, 3, 2)), "strictly increasing"),
        (dict(patch_nums=()), "patch_nums"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(quant_conv_ks=2), "quant_conv_ks"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        VQVAEConfig(**overrides)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="known: .*tiny"):
        VQVAEConfig.from_name("huge")


# ---------------------------------------------------------------- phi
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6, 8, 10, 16])
def test_phi_index_map_matches_numpy(K):
    for S in range(2, 41):
        assert list(phi_index_map(S, K)) == numpy_phi_map(S, K), (S, K)
    assert phi_index_map(1, K) == (K - 1,)  # one scale: the full-resolution end, no division by zero


def test_phi_map_of_10_scale_schedules():
    expected = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # README: scales 2 and 7 are float64 ties won by the later conv
    for name in ("vae_ch160v4096z32", "vae_ch160v4096z32_512"):
        vae = VQVAE(
            VQVAEConfig.from_name(name, ch=32, ch_mult=(1,), vocab_size=8, z_channels=4)
        )  # small, same phi
        assert list(vae.quantize.quant_resi.index_map(vae.config.num_scales)) == expected


@pytest.mark.parametrize(
    "share, counts, quant_resi, prefix",
    [
        (4, 0, 0.5, "quantize.quant_resi.qresi_ls."),
        (2, 0, 0.5, "quantize.quant_resi.qresi_ls."),
        (1, 0, 0.5, "quantize.quant_resi.qresi."),
        (0, 0, 0.5, "quantize.quant_resi.2."),
        (0, 2, 0.5, "quantize.quant_resi.1."),
        (4, 0, 0.0, None),
    ],
)
def test_phi_layouts_are_read_back_from_shapes(share, counts, quant_resi, prefix):
    config = VQVAEConfig(**MICRO, share_quant_resi=share, default_qresi_counts=counts, quant_resi=quant_resi)
    sd = VQVAE(config).state_dict()
    phi_keys = [k for k in sd if k.startswith("quantize.quant_resi.")]
    if prefix is None:
        assert phi_keys == []
        expected = VQVAEConfig(**MICRO, quant_resi=0.0)
    else:
        assert any(k.startswith(prefix) for k in phi_keys)
        expected = (
            config if share or counts else VQVAEConfig(**MICRO, share_quant_resi=0, default_qresi_counts=3)
        )
    assert config_from_state_dict(sd, MICRO["patch_nums"]) == expected
    loaded = VQVAE.from_official(sd, patch_nums=MICRO["patch_nums"])
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())


def test_phi_is_the_residual_conv_mix():
    vae = micro()
    x = torch.randn(2, 8, 4, 4)
    conv = vae.quantize.quant_resi.qresi_ls[2]
    expected = 0.5 * x + 0.5 * F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-6)


# ---------------------------------------------------------------- tokens and latents
@torch.no_grad()
def test_token_paths_agree_and_check_inputs():
    vae = micro().eval()
    x = images(3)
    idx = vae.img_to_idx(x)
    assert [t.shape for t in idx] == [(3, pn * pn) for pn in MICRO["patch_nums"]]
    assert len({int(v) for t in idx for v in t.flatten()}) > 5  # many codes in use
    fhat = vae.img_to_fhat(x)
    for a, b in zip(vae.idx_to_fhat(idx), fhat, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    img = vae.idx_to_img(idx)
    assert img.shape == x.shape and img.abs().max() <= 1
    assert torch.allclose(img, vae.fhat_to_img(fhat[-1]), atol=1e-5)
    grid = vae.fhat_per_scale_to_img(fhat)
    assert len(grid) == 3 and all(
        torch.allclose(g, vae.fhat_to_img(f), atol=1e-5) for g, f in zip(grid, fhat)
    )
    # a different schedule for the same image: the 1x1 scale sees the same mean latent
    idx2 = vae.img_to_idx(x, patch_nums=(1, 4))
    assert [t.shape[1] for t in idx2] == [1, 16] and torch.equal(idx2[0], idx[0])
    with pytest.raises(ValueError, match="latent size"):
        vae.img_to_idx(x, patch_nums=(1, 2))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(x[:, :1])
    assert isinstance(vae.quantize.embedding, nn.Embedding)
    assert vae.quantize.embedding.weight.shape == (vae.vocab_size, vae.z_channels) == (64, 8)


@torch.no_grad()
def test_znorm_picks_the_most_similar_code():
    vae = micro(using_znorm=True).eval()
    x = images(2)
    f, idx, fhat = vae.encode(x), vae.img_to_idx(x), vae.img_to_fhat(x)
    # the last scale quantises the full-size residual left after the first two scales
    rest_NC = (f - fhat[1]).permute(0, 2, 3, 1).reshape(-1, 8)  # (B*h*w, C), rows (b, y, x)
    cos_NV = F.normalize(rest_NC, dim=-1) @ F.normalize(vae.quantize.embedding.weight, dim=-1).T
    assert torch.equal(idx[2].flatten(), cos_NV.argmax(1))
    l2_idx = micro().eval().img_to_idx(x)  # same weights (same seed) with L2: a different rule
    assert any(not torch.equal(a, b) for a, b in zip(idx, l2_idx))


def check_schedule(vae: VQVAE, x: torch.Tensor) -> None:
    """Teacher-forcing input and ar_step agree with the running f_hat of quantisation."""
    pns = vae.patch_nums
    idx, fhat = vae.img_to_idx(x), vae.img_to_fhat(x)
    x_in = vae.idx_to_var_input(idx)
    assert x_in.dtype == torch.float32 and x_in.shape == (
        x.shape[0],
        vae.config.L - vae.config.first_l,
        vae.z_channels,
    )
    begin = 0
    for k in range(len(pns) - 1):
        l = pns[k + 1] ** 2
        expected = F.interpolate(fhat[k], size=(pns[k + 1],) * 2, mode="area").flatten(2).transpose(1, 2)
        assert torch.allclose(x_in[:, begin : begin + l], expected, atol=1e-5), k
        begin += l
    f_hat = torch.zeros_like(fhat[0])
    for si, pn in enumerate(pns):
        h = vae.quantize.embedding(idx[si]).transpose(1, 2).reshape(x.shape[0], vae.z_channels, pn, pn)
        f_hat, nxt = vae.ar_step(si, f_hat, h)
        assert torch.allclose(f_hat, fhat[si], atol=1e-5), si
        side = pns[si + 1] if si + 1 < len(pns) else pns[-1]
        assert nxt.shape[-1] == side


@torch.no_grad()
def test_micro_schedule_var_input_and_ar_step():
    vae = micro().eval()
    check_schedule(vae, images(2))


@torch.no_grad()
def test_custom_schedule_at_128px():
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig.from_name("tiny", patch_nums=(1, 2, 3, 5, 8))).eval()
    assert vae.config.resolution == 128
    x = images(2, 128)
    check_schedule(vae, x)
    out = vae(x)
    assert out.recon.shape == x.shape and torch.isfinite(out.vq_loss)
    assert out.hits_SV.sum(1).tolist() == [2.0 * pn * pn for pn in (1, 2, 3, 5, 8)]


# ---------------------------------------------------------------- training pass
def test_training_forward_values():
    vae = micro().train()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(100)  # outputs well outside [-1, 1]: recon must not be clamped
    x = images(4)
    out = vae(x)
    with torch.no_grad():
        f = vae.encode(x)
        fhat = vae.img_to_fhat(x)
        idx = vae.img_to_idx(x)
    assert torch.allclose(out.f_BChw, f) and not out.f_BChw.requires_grad
    assert torch.allclose(out.recon, vae.decode(fhat[-1]), rtol=1e-4, atol=1e-3) and out.recon.abs().max() > 1
    beta = vae.config.beta
    expected = sum((1 + beta) * F.mse_loss(fk, f) for fk in fhat) / len(fhat)
    assert out.vq_loss.shape == () and torch.allclose(out.vq_loss, expected, rtol=1e-5)
    assert out.hits_SV.dtype == torch.float32 and out.hits_SV.shape == (3, 64)
    for si, pn in enumerate(MICRO["patch_nums"]):
        assert out.hits_SV[si].sum() == 4 * pn * pn
        assert torch.equal(out.hits_SV[si], idx[si].flatten().bincount(minlength=64).float())


def test_straight_through_and_vq_gradients():
    vae = micro().train()
    x = images(4)
    out = vae(x)
    out.recon.square().mean().backward()  # reconstruction only: straight through to the encoder
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.quantize.embedding.weight.grad is None
    assert all(p.grad is None for p in vae.quantize.quant_resi.parameters())

    vae.zero_grad(set_to_none=True)
    out = vae(x)
    out.vq_loss.backward()  # codebook + phi (codebook term), encoder (commitment term), not the decoder
    grad = vae.quantize.embedding.weight.grad
    used = out.hits_SV.sum(0) > 0
    assert grad[used].abs().sum(1).min() > 0 and grad[~used].abs().sum() == 0
    for k in set(vae.quantize.quant_resi.index_map(3)):
        assert vae.quantize.quant_resi.qresi_ls[k].weight.grad.abs().sum() > 0
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.decoder.parameters())


def test_bf16_autocast_keeps_quantizer_float32():
    vae = micro().train()
    seen = []
    for conv in vae.quantize.quant_resi.qresi_ls:
        conv.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    encoded = []
    vae.quant_conv.register_forward_hook(lambda m, i, o: encoded.append(o.dtype))
    x = images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae(x)
        (out.recon.float().square().mean() + out.vq_loss).backward()
        x_in = vae.idx_to_var_input(vae.img_to_idx(x))
        f_hat, nxt = vae.ar_step(0, torch.zeros(2, 8, 4, 4), torch.randn(2, 8, 1, 1))
    assert encoded[0] == torch.bfloat16  # autocast was active around the quantizer
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert out.vq_loss.dtype == torch.float32 and out.f_BChw.dtype == torch.float32
    assert x_in.dtype == f_hat.dtype == nxt.dtype == torch.float32
    assert vae.quantize.embedding.weight.grad is not None


def test_record_hits_ema_rule():
    q = MultiScaleQuantizer(vocab_size=5, channels=4, patch_nums=(1, 2))
    g = torch.Generator().manual_seed(0)
    hits = [torch.randint(0, 10, (2, 5), generator=g).float() for _ in range(102)]
    q.record_hits(hits[0])
    assert torch.equal(q.ema_vocab_hit_SV, hits[0])  # first call copies
    expected = hits[0].clone()
    for i in range(1, 102):
        q.record_hits(hits[i])
        expected = expected * 0.9 + hits[i] * 0.1 if i < 100 else expected * 0.99 + hits[i] * 0.01
        assert torch.allclose(q.ema_vocab_hit_SV, expected, rtol=1e-5), i
    with pytest.raises(ValueError, match="hits_SV has shape"):
        q.record_hits(torch.zeros(3, 5))
    # the call count is not stored: loaded statistics count as warmed up, foreign-length ones are dropped
    fresh = MultiScaleQuantizer(vocab_size=5, channels=4, patch_nums=(1, 2))
    fresh.load_state_dict(q.state_dict())
    assert fresh.num_hit_records == 100 and torch.equal(fresh.ema_vocab_hit_SV, q.ema_vocab_hit_SV)
    three = MultiScaleQuantizer(vocab_size=5, channels=4, patch_nums=(1, 2, 3))
    three.load_state_dict(q.state_dict())
    assert three.num_hit_records == 0 and three.ema_vocab_hit_SV.shape == (3, 5)
    assert not three.ema_vocab_hit_SV.any()


def test_restart_codes():
    vae = micro()
    before = vae.quantize.embedding.weight.detach().clone()
    vae.quantize.ema_vocab_hit_SV.copy_(torch.arange(64.0).expand_as(vae.quantize.ema_vocab_hit_SV))
    rows = torch.tensor([3, 40])
    new = torch.randn(2, 8)
    vae.quantize.restart_codes(rows, new)
    after = vae.quantize.embedding.weight.detach()
    assert torch.equal(after[rows], new)
    ema = vae.quantize.ema_vocab_hit_SV
    assert (ema[:, rows] == 31.5).all() and (ema[:, 4] == 4.0).all()  # the uniform rate, others kept
    keep = torch.ones(64, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(after[keep], before[keep])
    with pytest.raises(ValueError, match="restart_codes"):
        vae.quantize.restart_codes(rows, torch.randn(3, 8))


def test_init_is_explicit_and_trainable(monkeypatch):
    """The official build disables reset_parameters; our init must not depend on it."""
    monkeypatch.setattr(nn.Conv2d, "reset_parameters", lambda self: self.weight.data.fill_(float("nan")))
    monkeypatch.setattr(nn.GroupNorm, "reset_parameters", lambda self: None)
    vae = VQVAE(VQVAEConfig(**MICRO))
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    w = vae.encoder.down[1].block[0].conv1.weight  # fan_in 32*9
    bound = 1 / math.sqrt(32 * 9)
    assert w.abs().max() <= bound and w.std() > bound / 3
    assert torch.equal(vae.encoder.norm_out.weight, torch.ones(64))
    assert vae.quantize.embedding.weight.abs().max() <= 1 / 64


# ---------------------------------------------------------------- files
def assert_same_model(a: VQVAE, b: VQVAE, x: torch.Tensor) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    a.eval(), b.eval()
    with torch.no_grad():
        ia, ib = a.img_to_idx(x), b.img_to_idx(x)
        assert all(torch.equal(u, v) for u, v in zip(ia, ib, strict=True))
        assert torch.equal(a.idx_to_img(ia), b.idx_to_img(ib))
        assert torch.equal(a(x).recon, b(x).recon)


def test_save_load_roundtrips(tmp_path):
    vae = micro(seed=3)
    vae.quantize.record_hits(vae(images(4)).hits_SV.detach())
    x = images(2, seed=5)
    vae.save(tmp_path / "vae.pt")
    vae.export_safetensors(tmp_path / "vae.safetensors")
    lightning = {
        "state_dict": {"vae." + k: v for k, v in vae.state_dict().items()} | {"disc.w": torch.zeros(1)},
        "varctl": {"vqvae": {"config": asdict(vae.config), "prefix": "vae."}},
    }
    torch.save(lightning, tmp_path / "last.ckpt")
    torch.save(vae.state_dict(), tmp_path / "official.pth")
    for name in ("vae.pt", "vae.safetensors", "last.ckpt"):
        loaded = VQVAE.load(tmp_path / name)
        assert_same_model(vae, loaded, x)
        assert loaded.quantize.num_hit_records == 100
    official = VQVAE.from_official(tmp_path / "official.pth", patch_nums=MICRO["patch_nums"])
    assert_same_model(vae, official, x)
    # without a schedule in the file, load() assumes the official one
    assert VQVAE.load(tmp_path / "official.pth").patch_nums == OFFICIAL_PATCH_NUMS
    # a second model is different: the checks above can fail
    assert not torch.equal(micro(seed=4)(x).recon, vae(x).recon)


def test_load_errors_name_the_file_and_keys(tmp_path):
    vae = micro()
    sd = vae.state_dict()
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        VQVAE.load(tmp_path / "nothere.pt")

    torch.save({"format": "varctl", "kind": "var", "config": {}, "state_dict": {}}, tmp_path / "var.pt")
    with pytest.raises(ValueError, match=r"var\.pt.*'var' file, expected a 'vqvae'"):
        VQVAE.load(tmp_path / "var.pt")

    bad = dict(sd)
    del bad["decoder.conv_out.bias"]
    bad["decoder.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth.*decoder\.conv_out\.bias.*decoder\.extra\.weight"):
        VQVAE.load(tmp_path / "bad.pth")

    file = {"format": "varctl", "kind": "vqvae", "state_dict": sd}
    torch.save({**file, "config": {**asdict(vae.config), "vocab_size": 32}}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"(?s)shape\.pt.*quantize\.embedding\.weight"):
        VQVAE.load(tmp_path / "shape.pt")

    torch.save({**file, "config": {**asdict(vae.config), "width": 3}}, tmp_path / "key.pt")
    with pytest.raises(ValueError, match=r"key\.pt: unknown VQVAEConfig key 'width'"):
        VQVAE.load(tmp_path / "key.pt")

    meta = {"format": "varctl", "kind": "var", "config": json.dumps({})}
    save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / "var.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"var\.safetensors.*'var'"):
        VQVAE.load(tmp_path / "var.safetensors")

    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.pth")
    with pytest.raises(ValueError, match=r"foo\.pth: not a VQVAE state_dict"):
        VQVAE.from_official(tmp_path / "foo.pth")
