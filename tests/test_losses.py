"""Losses, patch discriminator and codebook statistics of the tokenizer stage (values, not only shapes)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from varctl.lit import losses
from varctl.metrics import codebook
from varctl.models.discriminator import PatchDiscriminator


# ---------------------------------------------------------------------------------------------- losses
def test_hinge_losses_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2 -> mean 1
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert losses.hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # a perfect discriminator (margins met) has zero loss
    assert losses.hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -3.0)).item() == 0.0


def test_reconstruction_loss_selects_l1_or_l2():
    a = torch.zeros(1, 3, 2, 2)
    b = torch.tensor([1.0, -3.0, 2.0, 0.0]).repeat(3).view(1, 3, 2, 2)
    assert losses.reconstruction_loss(b, a, "l1").item() == pytest.approx(6 / 4)
    assert losses.reconstruction_loss(b, a, "l2").item() == pytest.approx(14 / 4)
    with pytest.raises(ValueError, match="model.recon_loss"):
        losses.reconstruction_loss(a, b, "l3")


def test_adaptive_weight_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # d nll / d w: norm 5
    b = torch.tensor([[0.5, 0.0], [0.0, 0.0]])  # d g / d w: norm 0.5
    nll, g = (w * a).sum() * 1.0, (w * b).sum() + (w**2).sum() * 0.0
    weight = losses.adaptive_weight(nll, g, w)
    assert weight.item() == pytest.approx(5 / (0.5 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    (nll + g).backward()  # the graphs were retained
    assert torch.equal(w.grad, a + b)
    # a generator loss with no gradient at w is clamped at max_weight
    w2 = torch.nn.Parameter(torch.ones(3))
    assert losses.adaptive_weight((w2 * 10).sum(), (w2 * 0).sum(), w2, max_weight=1e4).item() == 1e4


def test_adopt_weight():
    assert losses.adopt_weight(0.8, step=9, start=10) == 0.0
    assert losses.adopt_weight(0.8, step=10, start=10) == 0.8


# ---------------------------------------------------------------------------------------------- discriminator
@pytest.mark.parametrize("res,layers,grid", [(32, 2, 6), (64, 3, 6), (64, 2, 14)])
def test_discriminator_shapes_and_gradients(res, layers, grid):
    torch.manual_seed(0)
    d = PatchDiscriminator(3, channels=16, layers=layers)
    x = torch.randn(3, 3, res, res, requires_grad=True)
    logits = d(x)
    assert logits.shape == (3, 1, grid, grid)
    logits.mean().backward()
    assert x.grad.abs().sum() > 0
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_discriminator_logits_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    d = PatchDiscriminator(3, channels=16, layers=2)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(d(x)[:2], d(x[:2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        PatchDiscriminator(layers=0)


# ---------------------------------------------------------------------------------------------- LPIPS
def test_perceptual_random_backbone_is_a_deterministic_nonnegative_distance():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    a = losses.PerceptualLoss("alex", pretrained=False)
    torch.manual_seed(123)  # the global RNG must not change the network
    b = losses.PerceptualLoss("alex", pretrained=False)
    assert torch.equal(a(x, y), b(x, y))
    assert torch.all(a(x, x) == 0)
    d_near, d_far = a(x, y), a(x, -x)
    assert torch.all(d_near > 0) and torch.all(d_far > d_near)
    a.train()
    assert not a.training and not any(m.training for m in a.modules())
    assert not any(p.requires_grad for p in a.parameters())


def test_perceptual_pretrained_without_weights_fails_fast_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    for net, file in (("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")):
        with pytest.raises(FileNotFoundError) as info:
            losses.PerceptualLoss(net, pretrained=True)
        msg = str(info.value)
        assert "model.perceptual.pretrained" in msg and "TORCH_HOME" in msg
        assert str(tmp_path / "hub" / "checkpoints" / file) in msg
    assert time.perf_counter() - start < 5.0  # no download attempts or retries


def test_perceptual_pretrained_loads_backbone_and_heads_from_files(tmp_path, monkeypatch):
    import lpips
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = losses.backbone_weights_file("alex")
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    features = {
        k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")
    }
    torch.save(features, path)  # the convolutions are all LPIPS uses of the torchvision file
    p = losses.PerceptualLoss("alex", pretrained=True)
    net = dict(p.lpips.net.named_parameters())
    assert torch.equal(net["slice1.0.weight"], features["features.0.weight"])
    assert torch.equal(net["slice5.10.bias"], features["features.10.bias"])
    heads = torch.load(f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    for k in range(5):
        assert torch.equal(getattr(p.lpips, f"lin{k}").model[1].weight, heads[f"lin{k}.model.1.weight"])
    torch.save({k: v for k, v in features.items() if not k.startswith("features.10")}, path)
    with pytest.raises(ValueError, match="features.10"):
        losses.PerceptualLoss("alex", pretrained=True)


# ------------------------------------------------------------------------------------- codebook statistics
HITS_SV = torch.tensor(
    [
        [10.0, 10.0, 0.0, 0.0],  # uniform rate 5: margin 0.4, dead below 0.5
        [4.0, 4.0, 4.0, 0.0],  # rate 3: margin 0.24, dead below 0.3
        [97.0, 1.0, 1.0, 1.0],  # rate 25: margin 2, dead below 2.5
    ]
)


def test_usage_perplexity_and_dead_codes_exact():
    assert codebook.usage(HITS_SV, margin=0.08).tolist() == [50.0, 75.0, 25.0]
    p = torch.tensor([0.97, 0.01, 0.01, 0.01])
    expected = [2.0, 3.0, math.exp(-(p * p.log()).sum().item())]
    torch.testing.assert_close(codebook.perplexity(HITS_SV), torch.tensor(expected), rtol=1e-6, atol=0)
    dead = codebook.dead_codes(HITS_SV, threshold=0.1)
    assert dead.tolist() == [
        [False, False, True, True],
        [False, False, False, True],
        [False, True, True, True],
    ]
    assert codebook.dead_everywhere(HITS_SV, threshold=0.1).tolist() == [False, False, False, True]
    stats = codebook.codebook_stats(HITS_SV, dead_threshold=0.1)
    assert (
        float(stats["usage/s0"]) == 50.0
        and float(stats["dead/s2"]) == 3.0
        and float(stats["dead/all"]) == 1.0
    )
    assert float(stats["perplexity/s1"]) == pytest.approx(3.0)
    # no hits yet: nothing counts as used or dead, perplexity 0
    zeros = torch.zeros(2, 4)
    assert codebook.usage(zeros).tolist() == [0.0, 0.0] and codebook.perplexity(zeros).tolist() == [0.0, 0.0]
    assert not codebook.dead_codes(zeros, 0.1).any()


def test_codebook_usage_metric_accumulates_counts():
    m = codebook.CodebookUsage(num_scales=2, vocab_size=4)
    m.update(torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]]))
    m.update(torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 1]]))
    out = m.compute()
    assert out["usage"].tolist() == [25.0, 100.0]
    torch.testing.assert_close(out["perplexity"], torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="hits_SV"):
        m.update(torch.zeros(3, 4))
