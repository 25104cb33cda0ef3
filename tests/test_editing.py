"""Generation for jobs: per-sample seeds (a sample does not depend on its batch) and zero-shot in-painting,
out-painting and editing (``Known``: the kept region comes from the tokenizer's encoding of the input)."""

from __future__ import annotations

import pytest
import torch

from varctl.models.var_generate import Known

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (B, 3, 64, 64) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(smooth, size=(64, 64), mode="bilinear", align_corners=False)


def test_per_sample_seeds_do_not_depend_on_the_batch(var):
    labels = torch.tensor([1, 4, 7])
    together = var.generate(labels, cfg=2.0, top_k=50, seed=[11, 12, 13])
    alone = torch.cat([var.generate(labels[i : i + 1], cfg=2.0, top_k=50, seed=[s]) for i, s in
                       enumerate([11, 12, 13])])  # fmt: skip
    # the same tokens; the images only within float rounding, which kernels may block by batch size
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    reordered = var.generate(labels.flip(0), cfg=2.0, top_k=50, seed=[13, 12, 11])
    torch.testing.assert_close(reordered.flip(0), together, atol=1e-4, rtol=0)
    other = var.generate(labels, cfg=2.0, top_k=50, seed=[11, 99, 13])
    assert (other[1] - together[1]).abs().max() > 1e-2 and torch.allclose(other[0], together[0], atol=1e-5)
    with pytest.raises(ValueError, match="per-sample list needs 3"):
        var.generate(labels, seed=[1, 2])


def test_known_everywhere_gives_the_reconstruction(var, vae):
    x = images(2)
    keep_all = Known.from_image(vae, x, torch.zeros(2, 1, 64, 64))
    out = var.generate(torch.tensor([0, 3]), cfg=1.5, seed=0, known=keep_all)
    recon = vae.idx_to_img(vae.img_to_idx(x)).add(1).mul(0.5)
    torch.testing.assert_close(out, recon, atol=1e-4, rtol=0)


def test_inpainting_keeps_the_outside_and_redraws_the_inside(var, vae):
    x = (images(2, seed=1) * 2).clamp(-1, 1)
    hole = torch.zeros(2, 1, 64, 64)
    hole[:, :, :16, :16] = 1  # the top-left latent cell is redrawn
    known = Known.from_image(vae, x, hole)
    assert known.keep.shape == (2, 1, 4, 4) and known.keep.sum() == 2 * 15
    finals = {}

    def draw(seed):
        def last_fhat(si, logits, idx, f_hat):
            finals[seed] = f_hat.clone()

        return var.generate(torch.tensor([2, 5]), cfg=1.5, top_k=50, seed=seed, known=known,
                            callback=last_fhat)  # fmt: skip

    a, b = draw(0), draw(1)
    # in the latent, the kept cells are the input's f_hat exactly and the hole is drawn anew
    keep = known.keep.bool().expand_as(finals[0])
    torch.testing.assert_close(finals[0][keep], known.fhats[-1][keep], atol=1e-6, rtol=0)
    hole_cells = (slice(None), slice(None), 0, 0)
    assert (finals[0] - known.fhats[-1])[hole_cells].abs().mean() > 0.1
    assert (finals[0] - finals[1])[hole_cells].abs().mean() > 0.1
    # in pixels, away from the hole the output is the tokenizer's reconstruction within its error
    with torch.no_grad():
        recon = vae.idx_to_img(vae.img_to_idx(x)).add(1).mul(0.5)
    real = x.add(1).mul(0.5)
    far = torch.ones(64, 64, dtype=torch.bool)
    far[:32, :32] = False  # the decoder's receptive field blends the hole into the cells next to it
    tokenizer_error = (recon - real)[..., far].abs().mean()
    for out in (a, b):
        assert (out - recon)[..., far].abs().mean() < 0.3 * tokenizer_error
    unconstrained = var.generate(torch.tensor([2, 5]), cfg=1.5, top_k=50, seed=0)
    assert (unconstrained - recon)[..., far].abs().mean() > 1.5 * (a - recon)[..., far].abs().mean()


def test_known_checks_its_shapes(var, vae):
    with pytest.raises(ValueError, match="mask must be"):
        Known.from_image(vae, images(1), torch.zeros(1, 1, 32, 32))
    known = Known.from_image(vae, images(1), torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="for 2 samples"):
        var.generate(torch.tensor([0, 1]), known=known)
