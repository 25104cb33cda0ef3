"""The control branch (varctl/models/control.py) on the tiny official VAR: zero-init leaves the official
numerics untouched, residuals reach the logits per scale, the KV-cache sampler sees the same residuals as
teacher forcing, input encoding, checks and files."""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed

from varctl.models.control import ControlBranch, ControlConfig, control_input

pytestmark = pytest.mark.usefixtures("one_thread")


def make_branch(var, **fields) -> ControlBranch:
    fields.setdefault("width", 8)
    fields.setdefault("feature_dim", 16)
    return ControlBranch(ControlConfig.for_var(var.config, resolution=64, **fields))


def maps_for(B: int, seed: int = 0, size: int = 64, num_segments: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "edges": (torch.rand(B, 1, size, size, generator=g) > 0.9).float(),
        "depth": torch.rand(B, 1, size, size, generator=g),
        "segmentation": torch.randint(0, num_segments, (B, 1, size, size), generator=g),
    }


def test_config_follows_the_var_and_checks_fields(var):
    c = ControlConfig.for_var(var.config, resolution=64, modalities=["edges", "segmentation"])
    assert (c.depth, c.embed_dim, c.patch_nums, c.resolution) == (2, 128, (1, 2, 3, 4), 64)
    assert c.in_channels == 1 + 16 and c.num_downsamples == 4
    with pytest.raises(ValueError, match=r"ControlConfig\.modalities must be .*found \('edges', 'normal'\)"):
        ControlConfig(modalities=["edges", "normal"])
    with pytest.raises(
        ValueError, match=r"ControlConfig\.resolution must be the last scale \(4\) times a power"
    ):
        ControlConfig(patch_nums=(1, 2, 4), resolution=48)


def test_fresh_branch_leaves_the_official_logits_unchanged(var, golden):
    """Zero-initialised projections: teacher forcing with control equals the golden official logits."""
    branch = make_branch(var, modalities=["edges", "depth"])
    control = branch.encode(maps_for(4))
    with torch.no_grad():
        logits = var(golden["labels"], golden["x_BLCv_wo_first_l"], control=control)
    assert (logits - golden["logits_BLV"]).abs().max() < 1e-5


def test_residuals_change_logits_only_from_their_scale_on(var, golden):
    """A residual on scale k alone changes the logits of scales >= k (block-causal attention), never < k."""
    labels, x = golden["labels"], golden["x_BLCv_wo_first_l"]
    branch = make_branch(var)
    k = 2
    with torch.no_grad():
        # not a constant: the blocks' LayerNorms remove a shift equal on all channels
        branch.injector.proj_bias[:, k] = torch.randn(
            var.config.C, generator=torch.Generator().manual_seed(0)
        )
        logits = var(labels, x, control=branch.encode(maps_for(4)))
        base = var(labels, x)
    b, e = var.config.begin_ends[k]
    assert torch.equal(logits[:, :b], base[:, :b])
    assert (logits[:, b:] - base[:, b:]).abs().amax() > 1e-2


def test_control_maps_drive_the_logits(var, golden):
    labels, x = golden["labels"], golden["x_BLCv_wo_first_l"]
    branch = perturbed(make_branch(var, modalities=["edges", "depth", "segmentation"]))
    with torch.no_grad():
        a = var(labels, x, control=branch.encode(maps_for(4, seed=0)))
        again = var(labels, x, control=branch.encode(maps_for(4, seed=0)))
        b = var(labels, x, control=branch.encode(maps_for(4, seed=1)))
    assert torch.equal(a, again)
    assert (a - b).abs().amax() > 1e-3


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_kv_cache_sampling_sees_the_teacher_forcing_residuals(var, vae, golden, cfg):
    """Each scale's guided logits during generate equal teacher forcing on the sampled tokens, with the same
    control in the conditional and the null half."""
    labels = golden["labels"][:2]
    branch = perturbed(make_branch(var, modalities=["edges", "depth"]))
    control = branch.encode(maps_for(2, seed=3))
    rec = []
    var.generate(
        labels, cfg=cfg, cfg_schedule="constant", top_k=0, seed=11, control=control,
        callback=lambda si, logits, idx, f: rec.append((logits, idx)),
    )  # fmt: skip
    x = vae.idx_to_var_input([r[1] for r in rec])
    with torch.no_grad():
        cond = var(labels, x, control=control)
        uncond = var(torch.full_like(labels, 10), x, control=control)
        plain = var(labels, x)
    mixed = (1 + cfg) * cond - cfg * uncond
    for (logits, _), (b, e) in zip(rec, var.config.begin_ends):
        assert (logits - mixed[:, b:e]).abs().max() < 1e-5
    assert (cond - plain).abs().amax() > 1e-3  # the control did act


def test_each_tokens_feature_is_the_area_average_of_the_feature_map_under_it(var):
    """The tokens' features of all scales come from one product with ``area_pooling``: each is the area
    interpolation of the feature map to its scale (the adaptive windows of 8 -> 3, 5, 6 included), then the
    branch's LayerNorm; in float32 and under bfloat16 autocast."""
    import torch.nn.functional as F

    from varctl.models.control.branch import area_pooling

    pool = area_pooling(8, (1, 3, 5, 6, 8), torch.device("cpu"))
    assert pool.shape == (64, 1 + 9 + 25 + 36 + 64)
    torch.testing.assert_close(pool.sum(0), torch.ones(135))  # every token averages its window
    assert pool[:, 1].nonzero().flatten().tolist() == [r * 8 + c for r in range(3) for c in range(3)]

    branch = make_branch(var)
    maps = maps_for(2, seed=4)

    def interpolated() -> torch.Tensor:  # the tokens as an area interpolation per scale would give them
        f = branch.features(maps)
        per_scale = [F.interpolate(f, size=(pn, pn), mode="area").flatten(2) for pn in var.config.patch_nums]
        return branch.norm(torch.cat(per_scale, dim=2).transpose(1, 2))

    with torch.no_grad():
        torch.testing.assert_close(branch.encode(maps).tokens_BLF, interpolated())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(branch.encode(maps).tokens_BLF.float(), interpolated().float())


def test_control_input_encodes_and_checks_maps():
    c = ControlConfig(modalities=("segmentation", "edges"), num_segments=4, patch_nums=(1, 2), resolution=8)
    maps = {"edges": torch.zeros(2, 1, 8, 8), "segmentation": torch.full((2, 1, 8, 8), 2)}
    maps["edges"][0, 0, 3, 4] = 1
    x = control_input(c, maps)
    assert x.shape == (2, 5, 8, 8)
    assert torch.equal(x[:, 2], torch.ones(2, 8, 8)) and x[:, [0, 1, 3]].abs().sum() == 0  # one-hot id 2
    assert x[0, 4, 3, 4] == 1 and x[:, 4].sum() == 1
    with pytest.raises(KeyError, match=r"control maps \['edges'\] are missing .*data\.controls"):
        control_input(c, {"segmentation": maps["segmentation"]})
    with pytest.raises(ValueError, match=r"control\['edges'\] must be \(B, 1, 8, 8\), found \(2, 1, 4, 4\)"):
        control_input(c, {**maps, "edges": torch.zeros(2, 1, 4, 4)})
    with pytest.raises(
        ValueError, match=r"ids in \[0, 7\], expected \[0, 4\); raise model\.control\.num_seg"
    ):
        control_input(
            c, {**maps, "segmentation": torch.full((2, 1, 8, 8), 7).index_fill_(2, torch.tensor([0]), 0)}
        )


def test_mismatched_branch_or_batch_is_named(var, golden):
    from varctl.models.var import VAR, VARConfig

    other = VAR(VARConfig.from_name("tiny", depth=3, embed_dim=128, num_heads=2))
    branch = make_branch(other)
    with pytest.raises(ValueError, match=r"control branch is for depth=3.*this VAR has depth=2"):
        var(golden["labels"], golden["x_BLCv_wo_first_l"], control=branch.encode(maps_for(4)))
    with pytest.raises(ValueError, match="control holds 3 samples, the batch has 4"):
        var(golden["labels"], golden["x_BLCv_wo_first_l"], control=make_branch(var).encode(maps_for(3)))
    with pytest.raises(ValueError, match="control holds 3 samples, the batch has 2"):
        var.generate(golden["labels"][:2], control=make_branch(var).encode(maps_for(3)))


def test_save_load_and_safetensors_round_trip(var, golden, tmp_path):
    branch = perturbed(make_branch(var, modalities=["depth"]))
    control_maps = maps_for(4)
    with torch.no_grad():
        expected = var(golden["labels"], golden["x_BLCv_wo_first_l"], control=branch.encode(control_maps))
    for path in (branch.save(tmp_path / "control.pt"), branch.export_safetensors(tmp_path / "c.safetensors")):
        loaded = ControlBranch.load(path)
        assert loaded.config == branch.config
        with torch.no_grad():
            got = var(golden["labels"], golden["x_BLCv_wo_first_l"], control=loaded.encode(control_maps))
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="a varctl 'var' file, expected a 'control' file"):
        ControlBranch.load(var.save(tmp_path / "var.pt"))
