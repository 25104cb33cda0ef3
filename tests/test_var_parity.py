"""VAR against the official code's golden tensors (tests/fixtures/reference, README.md there).

Tiny config (depth 2, 10 classes, V=256, Cvae=16, patch_nums 1,2,3,4): teacher-forcing logits and every
recorded autoregressive run. Official-shape layouts and parameter counts are checked on the meta device.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import PATCH_NUMS, REFERENCE, TINY

from varctl.models.var import VAR, VARConfig, config_from_state_dict

LAYOUT = os.path.join(REFERENCE, "var_official_layout")
TOL_LOGITS, TOL_FHAT, TOL_IMG = 1e-5, 1e-5, 1e-4

# runs of autoregressive_infer_cfg recorded with g_seed=1234 (README "Contents of golden.pt")
GREEDY_RUNS = {
    "ar_greedy": dict(cfg=1.5, top_k=1, top_p=0.0),
    "ar_greedy_cfg0": dict(cfg=0.0, top_k=1, top_p=0.0),
    "ar_greedy_cfg4": dict(cfg=4.0, top_k=1, top_p=0.0),
}
# these two depend on torch's CPU random streams: they match because generate draws one multinomial per
# token (then, with more_smooth, one exponential_ per logit) from its own generator in the official order
RNG_ORDER_RUNS = {
    "ar_sampled": dict(cfg=1.5, top_k=50, top_p=0.9),
    "ar_smooth": dict(cfg=1.5, top_k=0, top_p=0.0, more_smooth=True),
}

# golden, vae (tiny official VQVAE) and var (tiny official VAR): fixtures of conftest.py


def _layout(path: str) -> list[tuple[str, list[int], str]]:
    with open(path) as f:
        rows = json.load(f)
    rows = rows["state_dict"] if isinstance(rows, dict) else rows
    return [(r["name"], r["shape"], r["dtype"]) for r in rows]


def _our_layout(model: VAR) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]


def test_tiny_config_read_off_the_tensors(var):
    assert var.config == VARConfig.from_name("tiny")
    assert (var.config.C, var.config.heads, var.config.L, var.config.first_l) == (128, 2, 30, 1)
    assert var.config.drop_path == pytest.approx(0.1 * 2 / 24)


def test_tiny_state_dict_layout_and_buffers():
    """A freshly built tiny VAR has the official keys, order, shapes, dtypes and buffer values."""
    fresh = VAR(VARConfig.from_name("tiny"))
    assert _our_layout(fresh) == _layout(os.path.join(TINY, "layout_var.json"))
    official = torch.load(os.path.join(TINY, "var.pt"), weights_only=True)
    for name in ["lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias", "blocks.1.attn.zero_k_bias"]:
        assert torch.equal(fresh.state_dict()[name], official[name]), name


def test_teacher_forcing_logits(var, golden):
    assert var.config.cond_drop_rate == 0.1  # no dropping in eval mode even with the default rate
    with torch.no_grad():
        logits = var(golden["labels"], golden["x_BLCv_wo_first_l"])
        uncond = var(torch.full_like(golden["labels"], 10), golden["x_BLCv_wo_first_l"])
    assert logits.dtype == torch.float32 and logits.shape == (4, 30, 256)
    assert (logits - golden["logits_BLV"]).abs().max() < TOL_LOGITS
    assert (uncond - golden["logits_BLV_uncond"]).abs().max() < TOL_LOGITS
    assert (logits - uncond).abs().max() > 1e-2  # the condition matters


def _check_run(var, golden, name: str, kwargs: dict) -> None:
    recorded = []
    images = var.generate(
        golden["labels"],
        seed=1234,
        callback=lambda si, lg, idx, f: recorded.append((lg, idx, f.clone())),
        **kwargs,
    )
    assert len(recorded) == len(PATCH_NUMS)
    for si, (logits, idx, f_hat) in enumerate(recorded):
        assert torch.equal(idx, golden[f"{name}_idx_Bl"][si]), f"{name}: tokens of scale {si}"
        assert (logits - golden[f"{name}_logits_cfg"][si]).abs().max() < TOL_LOGITS, f"{name}: logits {si}"
        assert (f_hat - golden[f"{name}_fhat"][si]).abs().max() < TOL_FHAT, f"{name}: f_hat {si}"
    assert images.shape == (4, 3, 64, 64)
    assert (images - golden[f"{name}_img"]).abs().max() < TOL_IMG


@pytest.mark.parametrize("name", list(GREEDY_RUNS))
def test_greedy_sampling_matches_official(var, golden, name):
    _check_run(var, golden, name, GREEDY_RUNS[name])


@pytest.mark.parametrize("name", list(RNG_ORDER_RUNS))
def test_random_sampling_matches_official_rng_order(var, golden, name):
    _check_run(var, golden, name, RNG_ORDER_RUNS[name])


def test_d16_layout_on_meta():
    with torch.device("meta"):
        model = VAR(VARConfig.from_name("d16"))
    reference = json.load(open(os.path.join(LAYOUT, "var_d16_keys.json")))
    assert _our_layout(model) == _layout(os.path.join(LAYOUT, "var_d16_keys.json"))
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]
    assert sum(b.numel() for b in model.buffers()) == reference["num_buffer_elements"]
    assert [list(be) for be in model.config.begin_ends] == reference["begin_ends"]
    assert model.config.drop_path == pytest.approx(reference["drop_path_rate"])


def test_from_official_on_meta_state_dict():
    """``from_official`` reads the d16 configuration off an official-shape state_dict and assigns it."""
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state_dict = {
        name: torch.empty(shape, dtype=dtypes[dtype], device="meta")
        for name, shape, dtype in _layout(os.path.join(LAYOUT, "var_d16_keys.json"))
    }
    model = VAR.from_official(state_dict, None)
    assert model.config == VARConfig.from_name("d16")
    assert all(t.is_meta for t in model.state_dict().values())  # assigned: nothing was allocated
    with pytest.raises(ValueError, match="patch_nums"):
        config_from_state_dict(state_dict, PATCH_NUMS)


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_parameter_counts_all_depths(depth):
    reference = json.load(open(os.path.join(LAYOUT, "var_param_counts_all_depths.json")))[f"d{depth}"]
    with torch.device("meta"):
        model = VAR(VARConfig.from_name(f"d{depth}"))
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]
    assert len(model.state_dict()) == reference["num_state_dict_entries"]
