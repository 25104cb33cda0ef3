"""Every control injector (varctl/models/control/injectors/) on the tiny official VAR: a new branch leaves
the official logits alone (except prefill, whose prefix is attended from the start), the KV-cached sampler
sees exactly the teacher-forcing logits (with class guidance, control guidance and per-scale strength),
strength 0 is the plain VAR, CAR starts from the backbone's blocks, text VARs, files; multi-control subsets
and the pretrained encoder."""

from __future__ import annotations

import collections
import copy

import pytest
import timm
import torch
from helpers import perturbed
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from varctl.models.control import CAR_OWN_LAYOUT, INJECTORS, ControlBranch, ControlConfig, ControlledVAR
from varctl.models.text import TextCondition
from varctl.models.var import VAR, VARConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# car-none: car with car_condition="none" (side rows shared by guidance); car-fan: also one side block feeding
# both backbone blocks (blocks [0, 1], each through its own zero-initialised layer); prefill-none: the prefix
# under the null condition (its keys and values shared by guidance)
VARIANTS = [*INJECTORS, "car-none", "car-fan", "prefill-none"]
ZERO_INIT = [i for i in VARIANTS if not i.startswith("prefill")]
TINY_VIT = {"encoder_name": "vit_tiny_patch16_224", "encoder_input": 32, "encoder_layers": [0, 1],
            "encoder_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}  # fmt: skip


def make_branch(var, injector="scalar", **fields) -> ControlBranch:
    if injector == "car-none":
        injector, fields = "car", {"car_condition": "none", **fields}
    if injector == "prefill-none":
        injector, fields = "prefill", {"prefix_condition": "none", **fields}
    if injector == "car-fan":
        injector, fields = "car", {"car_condition": "none", "car_blocks": 1, "blocks": [0, 1], **fields}
    fields.setdefault("width", 8)
    fields.setdefault("feature_dim", 16)
    fields.setdefault("adapter_dim", 32)
    config = ControlConfig.for_var(var.config, resolution=64, injector=injector, **fields)
    return ControlBranch.build(config).init_from_backbone(var)


def maps_for(B: int, seed: int = 0, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "edges": (torch.rand(B, 1, size, size, generator=g) > 0.9).float(),
        "depth": torch.rand(B, 1, size, size, generator=g),
        "segmentation": torch.randint(0, 16, (B, 1, size, size), generator=g),
    }


@pytest.mark.parametrize("injector", ZERO_INIT)
def test_new_branch_leaves_the_official_logits_unchanged(var, golden, injector):
    branch = make_branch(var, injector)
    with torch.no_grad():
        logits = var(golden["labels"], golden["x_BLCv_wo_first_l"], control=branch.encode(maps_for(4)))
    assert (logits - golden["logits_BLV"]).abs().max() < 1e-5


@pytest.mark.parametrize("injector", VARIANTS)
def test_controls_drive_the_logits_and_strength_zero_is_the_plain_var(var, golden, injector):
    labels, x = golden["labels"], golden["x_BLCv_wo_first_l"]
    branch = perturbed(make_branch(var, injector))
    with torch.no_grad():
        a = var(labels, x, control=branch.encode(maps_for(4, seed=0)))
        b = var(labels, x, control=branch.encode(maps_for(4, seed=1)))
        off = var(labels, x, control=branch.encode(maps_for(4)).with_strength([0.0] * 4))
    assert (a - b).abs().amax() > 1e-3
    assert (off - golden["logits_BLV"]).abs().max() < 1e-5
    assert (a - golden["logits_BLV"]).abs().amax() > 1e-3


class NewTensorsOfShapes(TorchDispatchMode):
    """Counts the new tensors (not views of an op's inputs) of the given shapes that ops return."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = shapes, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = pytree.tree_leaves((args, kwargs))
        given = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes:
                self.count[tuple(t.shape)] += t.untyped_storage().data_ptr() not in given
        return out


@pytest.mark.parametrize("injector", VARIANTS)
def test_backward_builds_each_parameter_gradient_once(var, golden, injector):
    """No parameter's gradient is summed from a full-size zero tensor per use: scalar's stacked (block, scale)
    maps, indexed once per use, made 160 gradients of 168 MB each at d16 (backward 4x slower)."""
    branch = perturbed(make_branch(var, injector))
    params = collections.Counter(tuple(p.shape) for p in branch.parameters() if p.numel() >= 256)
    frozen = copy.deepcopy(var).requires_grad_(False)
    logits = frozen(golden["labels"], golden["x_BLCv_wo_first_l"], control=branch.encode(maps_for(4)))
    with NewTensorsOfShapes(set(params)) as new:
        logits.square().mean().backward()
    assert all(p.grad is not None for p in branch.parameters())
    assert {s: new.count[s] for s in params if new.count[s] > 2 * params[s]} == {}


def test_cars_own_layout_is_the_configs_default(var):
    """CAR_OWN_LAYOUT (the tools' car-own rows) is what a ControlConfig of car has unless told otherwise:
    depth / 2 class-conditioned side blocks, each feeding one of the last blocks."""
    assert CAR_OWN_LAYOUT == {"car_blocks": None, "car_condition": "class", "car_targets": "last"}
    config = make_branch(var, "car").config
    assert {k: getattr(config, k) for k in CAR_OWN_LAYOUT} == CAR_OWN_LAYOUT
    assert config.side_blocks == var.config.depth // 2
    assert config.injected_blocks == tuple(range(var.config.depth - var.config.depth // 2, var.config.depth))


def test_car_side_branch_starts_as_the_backbone_blocks(var):
    branch = make_branch(var, "car", car_blocks=1)
    side, block = branch.injector.blocks[0].state_dict(), var.blocks[0].state_dict()
    assert side.keys() == block.keys() and all(torch.equal(side[k], block[k]) for k in side)
    assert branch.injector.slot == {1: 0}  # the later backbone block receives it


def test_car_side_block_feeds_every_receiving_block_through_its_own_layer(var, golden):
    """blocks [0, 1] with one side block: both backbone blocks receive its output, each through its own
    zero-initialised layer (m * N // M picks the side block); fewer receiving blocks than side blocks are
    refused by name."""
    branch = make_branch(var, "car", car_blocks=1, blocks=[0, 1])
    inj = branch.injector
    assert inj.slot == {0: 0, 1: 1} and inj.sources == [0, 0] and len(inj.outs) == 2
    labels, x = golden["labels"], golden["x_BLCv_wo_first_l"]
    logits = {}
    for m in (None, 0, 1):  # each receiving layer alone moves the logits
        fed = copy.deepcopy(branch)
        if m is not None:
            torch.nn.init.normal_(fed.injector.outs[m].weight, std=0.05)
        with torch.no_grad():
            logits[m] = var(labels, x, control=fed.encode(maps_for(4)))
    assert (logits[None] - golden["logits_BLV"]).abs().max() < 1e-5
    assert all((logits[m] - logits[None]).abs().amax() > 1e-3 for m in (0, 1))
    assert not torch.allclose(logits[0], logits[1])
    assert make_branch(var, "car", car_blocks=2, blocks=[0, 1]).injector.sources == [0, 1]
    with pytest.raises(ValueError, match="blocks.*car_blocks = 2"):
        make_branch(var, "car", car_blocks=2, blocks=[1])


def test_car_targets_rest_feeds_every_block_after_the_copies():
    """car_targets="rest": the blocks after the N copied ones receive the side outputs, in equal runs (d6,
    N=2: blocks 2, 3 from side block 0 and 4, 5 from side block 1); "last" is CAR's one block each."""
    from varctl.models.control.injectors.car import CARInjector

    small = {"injector": "car", "depth": 6, "embed_dim": 32, "num_heads": 2, "cond_dim": 32, "car_blocks": 2}
    rest = CARInjector(ControlConfig(**small, car_targets="rest"))
    assert rest.slot == {2: 0, 3: 1, 4: 2, 5: 3} and rest.sources == [0, 0, 1, 1] and len(rest.outs) == 4
    last = CARInjector(ControlConfig(**small))
    assert last.slot == {4: 0, 5: 1} and last.sources == [0, 1]
    assert ControlConfig(**{**small, "car_blocks": 1}, car_targets="rest").injected_blocks == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match='car_targets must be "last" when car_blocks is the depth'):
        ControlConfig(**{**small, "car_blocks": 6}, car_targets="rest")
    with pytest.raises(ValueError, match="car_targets must be"):
        ControlConfig(**small, car_targets="first")


def side_outputs(branch):
    """Records the output of CAR's last side block (its rows) at every call."""
    seen = []
    branch.injector.blocks[-1].register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


@pytest.mark.parametrize("condition", ["class", "none"])
def test_car_condition_none_makes_the_side_branch_class_free(var, golden, condition):
    """car_condition="none": the side branch sees the tokens and the control only (the start token and the
    modulation of the null class), so two labels give the same side outputs; CAR's conditioning differs."""
    branch = perturbed(make_branch(var, "car", car_condition=condition))
    seen = side_outputs(branch)
    x, controls = golden["x_BLCv_wo_first_l"], branch.encode(maps_for(4))
    with torch.no_grad():
        a = var(golden["labels"], x, control=controls)
        b = var((golden["labels"] + 1) % var.config.num_classes, x, control=controls)
    same = torch.allclose(seen[0], seen[1], atol=1e-6)
    assert same == (condition == "none")
    assert (a - b).abs().amax() > 1e-3  # the backbone still reads the class


@pytest.mark.parametrize("condition", ["class", "none"])
@pytest.mark.parametrize("control_cfg", [0.0, 1.0])
def test_car_condition_none_runs_a_side_row_per_sample_and_control(var, vae, golden, condition, control_cfg):
    """Sampling 2 samples with class guidance (4 rows) and control guidance too (6 rows): the null-conditioned
    side branch runs 2 rows (the guidance copies share their sample's), then 4 (each sample with and without
    its control); CAR's own runs every row. The samples are the teacher-forced ones
    (test_kv_cache_sampling_equals_teacher_forcing)."""
    branch = perturbed(make_branch(var, "car", car_condition=condition))
    seen = side_outputs(branch)
    var.generate(golden["labels"][:2], top_k=0, cfg=1.5, seed=0, control=branch.encode(maps_for(2)),
                 control_cfg=control_cfg)  # fmt: skip
    side_rows = {("none", 0.0): 2, ("class", 0.0): 4, ("none", 1.0): 4, ("class", 1.0): 6}
    assert {out.shape[0] for out in seen} == {side_rows[condition, control_cfg]}
    assert len(seen) == var.config.num_scales


def sampled(var, vae, cond, **kw):
    """Each scale's guided logits of ``var.generate(cond, top_k=0, **kw)``, and the teacher-forcing input of
    the drawn tokens."""
    rec = []
    var.generate(cond, top_k=0, callback=lambda si, logits, idx, f: rec.append((logits, idx)), **kw)
    return [r[0] for r in rec], vae.idx_to_var_input([r[1] for r in rec])


def teacher_forced(var, labels, x, controls, t, c):
    """(1 + t + c) * full - t * null class - c * control dropped, by teacher forcing."""
    B = labels.shape[0]
    null = torch.full_like(labels, var.config.num_classes)
    dropped = controls.rows(torch.arange(B), torch.zeros(B))
    with torch.no_grad():
        full = var(labels, x, control=controls)
        uncond = var(null, x, control=controls)
        nocontrol = var(labels, x, control=dropped)
    return (1 + t + c) * full - t * uncond - c * nocontrol, full, nocontrol


@pytest.mark.parametrize("injector", VARIANTS)
@pytest.mark.parametrize("t,c", [(0.0, 0.0), (2.0, 0.0), (1.5, 1.0)])
def test_kv_cache_sampling_equals_teacher_forcing(var, vae, golden, injector, t, c):
    """Each scale's guided logits in generate equal teacher forcing on the sampled tokens: class guidance t
    and control guidance c, with a per-scale control strength."""
    labels = golden["labels"][:2]
    branch = perturbed(make_branch(var, injector))
    strength = [1.0, 0.5, 1.0, 2.0]
    controls = branch.encode(maps_for(2, seed=3))
    rec, x = sampled(var, vae, labels, cfg=t, cfg_schedule="constant", seed=11, control=controls,
                     control_cfg=c, control_strength=strength)  # fmt: skip
    mixed, full, nocontrol = teacher_forced(var, labels, x, controls.with_strength(strength), t, c)
    for logits, (b, e) in zip(rec, var.config.begin_ends):
        assert (logits - mixed[:, b:e]).abs().max() < 1e-4
    assert (full - nocontrol).abs().amax() > 1e-3  # the control did act


@pytest.mark.parametrize("injector", VARIANTS)
def test_skipped_guidance_runs_the_controlled_samples_alone(var, vae, golden, injector):
    """``skip_guidance_from`` under control: the guidance copies' rows (null class, control dropped) go, the
    session's per-row state (side branch and adapter caches, modulations, features) follows, and from that
    scale on the logits are the controlled conditional ones of teacher forcing; before it, the guided mix."""
    labels = golden["labels"][:2]
    branch = perturbed(make_branch(var, injector))
    strength = [1.0, 0.5, 2.0, 1.5]
    controls = branch.encode(maps_for(2, seed=4))
    rec, x = sampled(var, vae, labels, cfg=1.5, cfg_schedule="constant", seed=12, control=controls,
                     control_cfg=1.0, control_strength=strength, skip_guidance_from=2)  # fmt: skip
    mixed, full, _ = teacher_forced(var, labels, x, controls.with_strength(strength), 1.5, 1.0)
    for si, (logits, (b, e)) in enumerate(zip(rec, var.config.begin_ends)):
        expected = mixed if si < 2 else full
        assert (logits - expected[:, b:e]).abs().max() < 1e-4, si
    assert (mixed - full).abs().amax() > 1e-3  # the guidance did act before the skip


@pytest.mark.parametrize("injector", VARIANTS)
def test_a_controlled_refiner_draws_the_last_scales_under_its_own_control(var, vae, golden, injector):
    """CoDe under control: the refiner is a smaller ControlledVAR. Its caches and its injector's state (side
    branch and adapter caches, prefix) are filled by teacher-forcing the drawn scales under its own
    control: with the model as its own refiner sampling is unchanged, and a smaller refiner's logits are its
    teacher forcing under its control (guided, per-scale strength)."""
    labels = golden["labels"][:2]
    maps = {"edges": maps_for(2, seed=5)["edges"]}
    strength = [1.0, 0.5, 2.0, 1.5]
    fields = {"blocks": [0, 1]} if injector == "ecm" else {}  # an adapter before a block's keys are cached
    model = ControlledVAR(var, perturbed(make_branch(var, injector, **fields)))
    kw = dict(cfg=1.5, cfg_schedule="constant", seed=13, control_maps=maps, control_cfg=1.0,
              control_strength=strength)  # fmt: skip
    plain, _ = sampled(model, vae, labels, **kw)
    itself, _ = sampled(model, vae, labels, refiner=model, draft_scales=2, **kw)
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(plain, itself))

    torch.manual_seed(1)
    small = perturbed(VAR(VARConfig.from_name("tiny", embed_dim=64, num_heads=2), vae).eval())
    refiner = ControlledVAR(small, perturbed(make_branch(small, injector, **fields)))
    rec, x = sampled(model, vae, labels, refiner=refiner, draft_scales=2, **kw)
    controls = refiner.control.encode(maps).with_strength(strength)
    mixed, full, nocontrol = teacher_forced(small, labels, x, controls, 1.5, 1.0)
    for si, (b, e) in enumerate(var.config.begin_ends):
        if si < 2:  # drawn by the model
            assert (rec[si] - plain[si]).abs().max() < 1e-4, si
        else:
            assert (rec[si] - mixed[:, b:e]).abs().max() < 1e-4, si
    assert (full - nocontrol).abs().amax() > 1e-3  # the refiner's control did act


def test_refiner_under_control_errors(var, vae):
    branch = make_branch(var)
    model = ControlledVAR(var, branch)
    labels = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="a ControlledVAR"):
        model.generate(labels, control_maps=_maps(2), refiner=var, draft_scales=2)
    with pytest.raises(ValueError, match="a control branch of its own"):
        var.generate(labels, control=branch.encode(_maps(2)), refiner=var, draft_scales=2)
    with pytest.raises(ValueError, match="refiner_control needs"):
        var.generate(labels, refiner_control=branch.encode(_maps(2)))


@pytest.mark.parametrize("injector", ["car", "ecm", "scalar"])
def test_switched_off_scales_cost_nothing_and_change_nothing(var, golden, injector, monkeypatch):
    """With the control strength 0 from some scale on, the injector's work stops there (CAR's side blocks,
    ECM's adapters, scalar's projections are not run), and the samples are those of computing it all."""
    from varctl.models.control.injectors.base import Session

    labels = golden["labels"][:2]
    torch.manual_seed(0)  # the branch's initial weights: not those the tests before left to draw
    fields = {"blocks": [0, 1]} if injector == "ecm" else {}  # an adapter whose output later scales read
    branch = perturbed(make_branch(var, injector, **fields))
    controls = branch.encode(maps_for(2, seed=3))
    strength = [1.0, 0.5, 0.0, 0.0]
    calls = []
    inj = branch.injector
    if injector == "scalar":  # its projections are parameters, applied in ``residual``
        residual = inj.residual
        monkeypatch.setattr(inj, "residual", lambda *a: calls.append(1) or residual(*a))
    parts = {"car": lambda: inj.blocks, "ecm": lambda: [a.down for a in inj.adapters]}.get(injector, list)()
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in parts]

    def sample():
        calls.clear()
        out = var.generate(labels, cfg=2.0, top_k=0, seed=4, control=controls, control_strength=strength)
        return out, len(calls)

    images, skipping = sample()
    with monkeypatch.context() as m:
        m.setattr(Session, "off", lambda self, begin, end: False)
        reference, computing = sample()
    for h in hooks:
        h.remove()
    assert torch.equal(images, reference)  # the skipped work only ever added zeros
    assert (var.generate(labels, cfg=2.0, top_k=0, seed=4) - images).abs().amax() > 1e-3  # control acted
    assert skipping > 0 and 2 * skipping == computing  # run at the first two of the 4 scales only


def test_control_guidance_pushes_samples_toward_their_control(var, vae, golden):
    """control_cfg moves the logits away from the control-dropped prediction, and changes the samples."""
    labels = golden["labels"][:2]
    branch = perturbed(make_branch(var, "scalar"), scale=0.2)
    controls = branch.encode(maps_for(2, seed=5))
    plain = var.generate(labels, cfg=0.0, top_k=0, seed=1, control=controls)
    again = var.generate(labels, cfg=0.0, top_k=0, seed=1, control=controls, control_cfg=0.0)
    guided = var.generate(labels, cfg=0.0, top_k=0, seed=1, control=controls, control_cfg=3.0)
    assert torch.equal(plain, again) and (plain - guided).abs().amax() > 1e-2
    with pytest.raises(ValueError, match="control_cfg and control_strength need control="):
        var.generate(labels, control_cfg=1.0)


def test_control_drop_rate_drops_whole_samples(var):
    branch = perturbed(make_branch(var, "scalar", control_drop_rate=0.5))
    torch.manual_seed(0)
    controls = branch.encode(_maps(64), drop=True)
    assert set(controls.keep_B.tolist()) == {0.0, 1.0} and 16 < controls.keep_B.sum() < 48
    assert branch.encode(_maps(64)).keep_B is None  # no dropout outside training


def _maps(B):
    return {k: v for k, v in maps_for(B).items() if k == "edges"}


@pytest.mark.parametrize("injector", VARIANTS)
@pytest.mark.parametrize("skip_from", [None, 2])
def test_text_var_samples_as_it_teacher_forces(vae, injector, skip_from):
    """A text VAR (cross-attention; CAR's side blocks copy it) with each injector, with guidance, and with
    guidance skipped from scale 2 (the rows of the text keys, values and masks follow)."""
    torch.manual_seed(0)
    cfg = VARConfig.from_name("tiny", condition="text", text_dim=16, text_len=4, embed_dim=64, num_heads=2)
    var = perturbed(VAR(cfg, vae).eval())
    g = torch.Generator().manual_seed(0)
    text = TextCondition(torch.randn(2, 16, generator=g), torch.randn(2, 4, 16, generator=g),
                         torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool))  # fmt: skip
    var.set_null_text(TextCondition(torch.zeros(1, 16), torch.zeros(1, 4, 16), torch.ones(1, 4, dtype=bool)))
    branch = perturbed(make_branch(var, injector))
    controls = branch.encode(maps_for(2, seed=2))
    rec, x = sampled(var, vae, text, cfg=1.5, cfg_schedule="constant", seed=3, control=controls,
                     skip_guidance_from=skip_from)  # fmt: skip
    with torch.no_grad():
        tf = var(text, x, control=controls)
        null = var(var.null_condition(2), x, control=controls)
    guided = 2.5 * tf - 1.5 * null
    for si, (logits, (b, e)) in enumerate(zip(rec, var.config.begin_ends)):
        expected = tf if skip_from is not None and si >= skip_from else guided
        assert (logits - expected[:, b:e]).abs().max() < 1e-4, si


@pytest.mark.parametrize("injector", VARIANTS)
def test_each_injector_saves_and_loads(var, golden, injector, tmp_path):
    branch = perturbed(make_branch(var, injector, blocks=[1] if injector in ("scalar", "ecm") else None))
    maps = maps_for(4)
    with torch.no_grad():
        expected = var(golden["labels"], golden["x_BLCv_wo_first_l"], control=branch.encode(maps))
    loaded = ControlBranch.load(branch.save(tmp_path / "control.pt"))
    assert loaded.config == branch.config and loaded.config.injector == injector.split("-")[0]
    with torch.no_grad():
        got = var(golden["labels"], golden["x_BLCv_wo_first_l"], control=loaded.encode(maps))
    assert torch.equal(got, expected)


def test_chosen_blocks_receive_control_and_others_do_not(var, golden):
    """scalar with blocks=[1]: block 0's input is untouched, so a residual only on block 1 of the last scale
    changes only the last scale's logits."""
    branch = make_branch(var, "scalar", blocks=[1])
    assert branch.injector.proj_weight.shape[0] == 1
    with torch.no_grad():
        branch.injector.proj_bias[0, 3] = torch.randn(
            var.config.C, generator=torch.Generator().manual_seed(0)
        )
        logits = var(golden["labels"], golden["x_BLCv_wo_first_l"], control=branch.encode(maps_for(4)))
    b, _ = var.config.begin_ends[3]
    assert (logits[:, :b] - golden["logits_BLV"][:, :b]).abs().max() < 1e-5
    assert (logits[:, b:] - golden["logits_BLV"][:, b:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match=r"ControlConfig\.blocks must be distinct block indices in \[0, 2\)"):
        make_branch(var, "scalar", blocks=[2])
    with pytest.raises(ValueError, match=r"ControlConfig\.injector must be one of"):
        make_branch(var, "controlnet")


# ---------------------------------------------------------------------------------------------- multi-control
@pytest.mark.parametrize("encoder", ["conv", "pretrained"])
def test_any_subset_of_modalities_with_strengths(var, golden, encoder):
    """A three-modality branch takes any subset; a missing modality equals one of strength 0; strengths
    scale a modality's contribution."""
    fields = {"encoder": "pretrained", "encoder_weights": "random", **TINY_VIT} if encoder != "conv" else {}
    branch = perturbed(make_branch(var, "scalar", modalities=["edges", "depth", "segmentation"], **fields))
    maps = maps_for(2)
    labels, x = golden["labels"][:2], golden["x_BLCv_wo_first_l"][:2]
    with torch.no_grad():
        grid_all = branch.encode(maps).grid_BFhw
        for subset in (["edges"], ["depth", "segmentation"], ["segmentation"]):
            part = {m: maps[m] for m in subset}
            zeroed = {m: 0.0 for m in maps if m not in subset}
            sub = branch.encode(part, allow_missing=True)
            ref = branch.encode(maps, modality_strength=zeroed)
            assert (sub.grid_BFhw - ref.grid_BFhw).abs().max() < 1e-5
            assert (sub.grid_BFhw - grid_all).abs().amax() > 1e-4
            logits = var(labels, x, control=sub)
            assert torch.isfinite(logits).all()
    with pytest.raises(KeyError, match=r"control maps \['depth', 'segmentation'\] are missing"):
        branch.encode({"edges": maps["edges"]})  # training data must hold every modality


def test_modality_dropout_zeroes_modalities_per_sample(var):
    branch = make_branch(var, "scalar", modalities=["edges", "depth"], modality_drop_rate=0.5)
    maps = {k: v for k, v in maps_for(32).items() if k != "segmentation"}
    torch.manual_seed(0)
    dropped = branch.encode(maps, drop=True).grid_BFhw
    full = branch.encode(maps).grid_BFhw
    differs = (dropped - full).flatten(1).abs().amax(1) > 1e-6
    assert 4 < int(differs.sum()) < 32  # some samples lost a modality, most kept something


# ---------------------------------------------------------------------------------------------- pretrained
def test_pretrained_encoder_needs_a_named_weights_file(var, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.control\.encoder_weights is not set"):
        make_branch(var, encoder="pretrained", **TINY_VIT)
    missing = tmp_path / "dinov2.pth"
    with pytest.raises(
        FileNotFoundError, match=r"encoder_weights names .*dinov2\.pth'?, which does not exist"
    ):
        make_branch(var, encoder="pretrained", encoder_weights=str(missing), **TINY_VIT)


def test_a_saved_pretrained_branch_loads_and_encodes_without_its_weights_file(var, tmp_path):
    """The branch's file holds the frozen encoder: loaded on a machine without the original weights file,
    it encodes as the saved branch did (its constant buffers, which no file holds, made anew: they were
    left on the meta device). A new branch whose file is not there yet names it at the first encoding."""
    torch.manual_seed(1)
    ref = timm.create_model(TINY_VIT["encoder_name"], pretrained=False, num_classes=0, img_size=32,
                            **TINY_VIT["encoder_kwargs"])  # fmt: skip
    weights = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), weights)
    fields = dict(encoder="pretrained", encoder_weights=str(weights), modalities=["edges", "segmentation"],
                  num_segments=16, **TINY_VIT)  # fmt: skip
    branch = perturbed(make_branch(var, **fields))
    file = branch.save(tmp_path / "branch.pt")
    weights.unlink()
    loaded = ControlBranch.load(file)
    assert not any(b.is_meta for b in loaded.buffers())
    maps = {k: v for k, v in maps_for(2, size=64).items() if k != "depth"}
    torch.testing.assert_close(loaded.encode(maps).tokens_BLF, branch.encode(maps).tokens_BLF, rtol=0, atol=0)
    config = ControlConfig.for_var(var.config, resolution=64, width=8, feature_dim=16, **fields)
    later = ControlBranch.build(config, weights_later=True)  # a checkpoint will bring the weights
    with pytest.raises(FileNotFoundError, match=r"encoder_weights names .*vit\.pth'?, which does not exist"):
        later.encode(maps)
    later.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(later.encode(maps).tokens_BLF, branch.encode(maps).tokens_BLF, rtol=0, atol=0)


def test_pretrained_encoder_reads_the_file_and_stays_frozen(var, tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model(TINY_VIT["encoder_name"], pretrained=False, num_classes=0, img_size=32,
                            **TINY_VIT["encoder_kwargs"])  # fmt: skip
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    branch = make_branch(var, encoder="pretrained", encoder_weights=str(path), **TINY_VIT)
    got = branch.encoder.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    assert not any(p.requires_grad for p in branch.encoder.backbone.parameters())
    assert all(p.requires_grad for p in branch.encoder.align.parameters())
    branch.train()
    assert not branch.encoder.backbone.training
    # layers 0 and 1 concatenated: features equal timm's own intermediates
    img = torch.rand(2, 3, 32, 32)
    mine = branch.encoder.encode_image(img)
    theirs = torch.cat(ref.forward_intermediates(img, indices=[0, 1], output_fmt="NCHW",
                                                 intermediates_only=True), dim=1)  # fmt: skip
    assert mine.shape == (2, 64, 2, 2) and torch.allclose(mine, theirs, atol=1e-6)


def test_alignment_loss_is_the_distance_to_the_real_images_features(var):
    branch = make_branch(var, modalities=["edges", "depth"], encoder="pretrained", encoder_weights="random",
                         **TINY_VIT)  # fmt: skip
    maps = {k: v for k, v in maps_for(2).items() if k != "segmentation"}
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    enc = branch.encoder
    target = enc.encode_image(enc.normalise(images.add(1).mul(0.5)))
    expected = torch.stack([((enc.encode_image(enc.rgb(m, maps[m])) - target) ** 2).mean() for m in maps])
    loss = branch.alignment_loss(maps, images)
    assert torch.allclose(loss, expected.mean(), rtol=1e-5)  # alignment starts as the identity
    loss.backward()
    assert branch.encoder.align["edges"].weight.grad.abs().sum() > 0
    conv = make_branch(var)
    assert conv.alignment_loss({"edges": maps["edges"]}, images) is None


def test_features_are_computed_once_per_generate(var):
    """The frozen encoder runs once per modality per generate call, not once per scale."""
    branch = perturbed(make_branch(var, "car", encoder="pretrained", encoder_weights="random", **TINY_VIT))
    calls = []
    handle = branch.encoder.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    from varctl.models.control import ControlledVAR

    ControlledVAR(var, branch).generate(torch.tensor([1, 2]), control_maps=_maps(2), cfg=2.0, control_cfg=1.0)
    handle.remove()
    assert len(calls) == 1


def test_prefix_overlap_is_the_share_of_each_tokens_cell_under_each_prefix_cell():
    from varctl.models.control.injectors.prefill import overlap

    o = overlap((1, 2, 3, 4), 2)  # rows: 1 + 4 + 9 + 16 tokens; columns: the 2x2 prefix cells
    assert o.shape == (30, 4) and torch.allclose(o.sum(1), torch.ones(30))
    assert torch.allclose(o[0], torch.full((4,), 0.25))  # the 1x1 token covers the four cells equally
    assert torch.equal(o[1:5], torch.eye(4))  # the 2x2 scale: one cell each
    # 3x3: the centre token is a quarter in each cell; the top-middle token half in each top cell
    assert torch.allclose(o[5 + 4], torch.full((4,), 0.25))
    assert torch.allclose(o[5 + 1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.equal(o[14 + 4 * 3 + 3], torch.tensor([0.0, 0.0, 0.0, 1.0]))  # 4x4, bottom right


def test_prefill_trains_after_sampling_under_inference_mode(var, golden):
    """The cached overlap matrix first built under inference mode (a validate or predict run) still serves
    a training step in the same process."""
    from varctl.models.control.injectors.prefill import overlap

    overlap.cache_clear()
    branch = perturbed(make_branch(var, "prefill"))
    with torch.inference_mode():
        var.generate(golden["labels"][:2], cfg=0.0, top_k=0, seed=0, control=branch.encode(maps_for(2)))
    logits = var(golden["labels"], golden["x_BLCv_wo_first_l"], control=branch.encode(maps_for(4)))
    logits.float().logsumexp(-1).mean().backward()
    assert branch.injector.locality.grad.abs().sum() > 0
    var.zero_grad(set_to_none=True)


def test_prefix_locality_makes_tokens_read_the_control_under_them(var, golden):
    """With a strong locality bias, moving the control's content from one corner to the other changes the
    last scale's logits mostly under the corners where it moved; with beta 0 (the plain prefix) the change
    is the same everywhere. Averaged over 5 seeded branches: one random branch's ratio ranges 1.3-4.2."""
    labels, x = golden["labels"][:1], golden["x_BLCv_wo_first_l"][:1]
    pn = var.config.patch_nums[-1]
    begin, end = var.config.begin_ends[-1]
    corner = torch.zeros(1, 1, 64, 64)
    corner[..., :16, :16] = 1.0
    spread = {0.0: [], 12.0: []}
    for seed in range(5):
        torch.manual_seed(seed)  # the branches' initial weights, whatever ran before
        for beta in spread:
            branch = perturbed(make_branch(var, "prefill", prefix_locality=beta))
            with torch.no_grad():
                a = var(labels, x, control=branch.encode({"edges": corner}))
                b = var(labels, x, control=branch.encode({"edges": corner.flip(-1)}))
            change = (a - b)[0, begin:end].abs().mean(-1).view(pn, pn)  # per token of the last scale
            corners = torch.stack((change[: pn // 2, : pn // 2], change[: pn // 2, pn // 2 :])).mean()
            spread[beta].append((corners / change[pn // 2 :].mean()).item())  # top half (moved) vs bottom
    plain, local = (sum(v) / len(v) for v in spread.values())
    assert local > 2 * plain and local > 2 and 0.8 < plain < 1.2


def test_a_prefill_branch_saved_before_the_locality_bias_loads_as_the_plain_prefix(var):
    branch = perturbed(make_branch(var, "prefill"))
    state = {k: v for k, v in branch.state_dict().items() if not k.endswith("locality")}
    old = make_branch(var, "prefill")
    old.load_state_dict(state)
    assert torch.equal(old.injector.locality, torch.zeros_like(old.injector.locality))
    assert all(torch.equal(old.state_dict()[k], v) for k, v in state.items())


def prefix_outputs(var):
    """Records the output rows and tokens of the VAR's last block at every call (the prefix pass first)."""
    seen = []
    handle = var.blocks[-1].register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape[:2])))
    return seen, handle


def test_prefill_teacher_forcing_is_one_masked_pass_over_prefix_and_tokens(var, golden):
    """The prefix's own pass, then the tokens on its keys and values, give the logits of one pass over the
    prefix put before the tokens, with the mask that lets the prefix see only itself and the tokens see it
    (with the locality bias and a per-scale strength) and the earlier scales."""
    from varctl.models.control.injectors.prefill import overlap

    branch = perturbed(make_branch(var, "prefill"))
    labels, x_in = golden["labels"], golden["x_BLCv_wo_first_l"]
    strength = [1.0, 0.5, 0.0, 2.0]
    controls = branch.encode(maps_for(4)).with_strength(strength)
    inj, c = branch.injector, var.config
    with torch.no_grad():
        logits = var(labels, x_in, control=controls)
        cond_BD, _ = var._embed_condition(labels, drop=False)
        tokens = var.word_embed(x_in)
        x = torch.cat((cond_BD.unsqueeze(1) + var.pos_start, tokens), dim=1) + var._lvl_pos()
        b, e = c.begin_ends[inj.scale]
        x = torch.cat((inj.proj(controls.tokens_BLF[:, b:e]) + inj.pos, x), dim=1)
        P, L = inj.prefix_len, c.L
        s = torch.cat([torch.full((end - begin,), v) for v, (begin, end) in zip(strength, c.begin_ends)])
        mask = torch.zeros(1, inj.locality.shape[1], P + L, P + L)
        mask[..., :P, P:] = -torch.inf
        mask[..., P:, P:] = var.attn_bias_for_masking[0, 0]
        mask[..., P:, :P] = inj.locality * overlap(c.patch_nums, inj.side) + s.log().view(-1, 1)
        shared = var.shared_ada_lin(cond_BD)
        for block in var.blocks:
            x = block(x, block.modulation(shared), mask)
        expected = var._head(x[:, P:], var.head_nm.modulation(cond_BD))
    assert (logits - expected).abs().max() < 1e-4
    assert (logits - golden["logits_BLV"]).abs().amax() > 1e-3


@pytest.mark.parametrize("condition", ["class", "none"])
def test_prefix_condition_none_makes_the_prefix_class_free(var, golden, condition):
    """prefix_condition="none": the prefix runs under the null condition, so two labels give the same
    prefix outputs (teacher forcing's last block returns the tokens' and the prefix's); the backbone still
    reads the class."""
    branch = perturbed(make_branch(var, "prefill", prefix_condition=condition))
    outs = []
    handle = var.blocks[-1].register_forward_hook(lambda m, args, out: outs.append(out[1]))
    x, controls = golden["x_BLCv_wo_first_l"], branch.encode(maps_for(4))
    with torch.no_grad():
        a = var(golden["labels"], x, control=controls)
        b = var((golden["labels"] + 1) % var.config.num_classes, x, control=controls)
    handle.remove()
    assert outs[0].shape[1] == branch.injector.prefix_len
    assert torch.allclose(outs[0], outs[1], atol=1e-6) == (condition == "none")
    assert (a - b).abs().amax() > 1e-3


@pytest.mark.parametrize("condition", ["class", "none"])
@pytest.mark.parametrize("control_cfg", [0.0, 1.0])
def test_prefix_condition_none_runs_a_prefix_row_per_sample_and_control(var, golden, condition, control_cfg):
    """Sampling 2 samples with class guidance (4 rows), and control guidance too (6 rows): the prefix under
    the null condition runs once for 2 rows (a sample's guidance copy shares its keys and values), then 4
    (each sample with and without its control); the class-conditioned prefix for every row. The samples
    are the teacher-forced ones (test_kv_cache_sampling_equals_teacher_forcing)."""
    branch = perturbed(make_branch(var, "prefill", prefix_condition=condition))
    seen, handle = prefix_outputs(var)
    var.generate(golden["labels"][:2], top_k=0, cfg=1.5, seed=0, control=branch.encode(maps_for(2)),
                 control_cfg=control_cfg)  # fmt: skip
    handle.remove()
    rows = {("none", 0.0): 2, ("class", 0.0): 4, ("none", 1.0): 4, ("class", 1.0): 6}
    assert seen[0] == (rows[condition, control_cfg], branch.injector.prefix_len)
    assert [s[0] for s in seen[1:]] == [4 + 2 * (control_cfg > 0)] * var.config.num_scales
