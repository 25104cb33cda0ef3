"""AdamW groups, lr scaling and schedule, and the EMA of weights (varctl/lit/optim.py)."""

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from varctl.lit.optim import (
    adamw,
    averaged,
    clean_name,
    clip_gradients,
    configure_adamw,
    decayed_embedding_names,
    lr_factor,
    no_weight_decay_names,
    param_groups,
    regroup_optimizer_state,
    scaled_lr,
    update_average,
    warmup_decay_scheduler,
)
from varctl.models.var import VAR, VARConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.class_emb = nn.Embedding(11, 8)
        self.pos_1LC = nn.Parameter(torch.zeros(1, 5, 8))
        self.word_embed = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.Module()
        self.attn.scale_mul_1H11 = nn.Parameter(torch.zeros(1, 2, 1, 1))
        self.attn.proj = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 16)
        self.gate = nn.Parameter(torch.zeros(8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_no_decay_names_cover_biases_norms_embeddings_positions():
    net = Net()
    net.table = nn.Embedding(4, 8)  # an embedding table (a codebook): not decayed
    names = no_weight_decay_names(net)
    assert names == {
        "table.weight", "pos_1LC", "word_embed.bias", "norm.weight", "norm.bias", "attn.scale_mul_1H11",
        "head.bias", "gate",
    }  # fmt: skip


# The official VAR trainer's weight-decay filter (train.py, utils/lr_control.py filter_params): no decay for
# 1-D parameters, biases, and names containing one of these keys.
OFFICIAL_NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                          "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                          "scale_mul")  # fmt: skip


@pytest.mark.parametrize("name", ["d16", "d30"])
def test_a_var_is_decayed_as_the_official_trainer_decays_it(name):
    with torch.device("meta"):
        var = VAR(VARConfig.from_name(name))
    official = {
        n for n, p in var.named_parameters()
        if p.ndim == 1 or n.endswith("bias") or any(k in n for k in OFFICIAL_NO_DECAY_KEYS)
    }  # fmt: skip
    assert no_weight_decay_names(var) == official
    assert "class_emb.weight" not in official and "lvl_embed.weight" in official


def test_param_groups_split_and_skip_frozen():
    net = Net()
    groups = param_groups(net, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    ids = {id(p) for p in by_name["decay"]["params"]}
    assert ids == {
        id(net.class_emb.weight),
        id(net.word_embed.weight),
        id(net.attn.proj.weight),
        id(net.head.weight),
    }
    n_all = sum(len(g["params"]) for g in groups)
    assert n_all == sum(p.requires_grad for p in net.parameters()) == 11
    # names computed before wrapping still match wrapped names
    assert (
        clean_name("_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.attn.proj.weight")
        == "blocks.0.attn.proj.weight"
    )


def test_scaled_lr():
    assert scaled_lr(1e-4, 256) == pytest.approx(1e-4)
    assert scaled_lr(1e-4, 16, world_size=2) == pytest.approx(1.25e-5)
    assert scaled_lr(1e-4, 16, world_size=2, accumulate=4) == pytest.approx(5e-5)
    assert scaled_lr(3e-4, 64, reference_batch=64) == pytest.approx(3e-4)


def test_lr_factor_values():
    kw = dict(warmup_steps=10, total_steps=110)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(4, **kw) == pytest.approx(0.5)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.5)  # cosine half way
    assert lr_factor(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(110, **kw) == pytest.approx(0.0)
    assert lr_factor(500, **kw) == pytest.approx(0.0)
    assert lr_factor(60, **kw, decay="linear", final_fraction=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, **kw, decay="linear", final_fraction=0.1) == pytest.approx(0.1)
    assert lr_factor(60, **kw, decay="cosine", final_fraction=0.2) == pytest.approx(0.6)
    assert lr_factor(80, **kw, decay="constant") == 1.0
    assert lr_factor(0, warmup_steps=0, total_steps=10) == 1.0
    with pytest.raises(ValueError, match="model.decay"):
        lr_factor(0, 1, 10, decay="step")


def test_scheduler_drives_optimizer_lr():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = warmup_decay_scheduler(opt, warmup_steps=2, total_steps=6, decay="linear", final_fraction=0.0)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5, 0.0])


def test_a_run_without_end_takes_a_constant_lr_and_refuses_a_decay():
    """trainer.max_steps=-1 with max_epochs=-1: Lightning estimates infinitely many steps. A constant lr
    needs no end (warmup, then the peak for ever); a decay is refused naming the keys to set."""
    from varctl.lit.settings import OptimizerSettings

    endless = SimpleNamespace(estimated_stepping_batches=float("inf"), max_steps=-1, max_epochs=-1,
                              precision="32-true", strategy=None)  # fmt: skip
    p = nn.Parameter(torch.zeros(2))
    constant = OptimizerSettings(lr=2.0, lr_scale_by_batch=False, warmup_steps=2, decay="constant")
    sched = configure_adamw(endless, [{"params": [p]}], constant)["lr_scheduler"]["scheduler"]
    assert [sched.lr_lambdas[0](step) for step in (0, 1, 2, 10**6)] == [0.5, 1.0, 1.0, 1.0]
    cosine = OptimizerSettings(lr=2.0, lr_scale_by_batch=False, decay="cosine")
    with pytest.raises(
        ValueError, match=r"trainer.max_steps=-1 .*model.optimizer.decay='cosine'.*decay=constant"
    ):
        configure_adamw(endless, [{"params": [p]}], cosine)


def test_ema_math_with_and_without_warmup():
    """The numbers of the EMA before it became torch's AveragedModel: the initial copy counts as the first
    average, update k (0-based) decays by min(decay, (1 + k) / (10 + k)) with warmup."""
    src = nn.Linear(2, 1)
    with torch.no_grad():
        src.weight.fill_(0.0)
        src.bias.fill_(0.0)
    ema = averaged(src, decay=0.9, warmup=False)
    for target in (1.0, 1.0, 3.0):
        with torch.no_grad():
            src.weight.fill_(target)
        update_average(ema, src)
    # 0 -> 0.1 -> 0.19 -> 0.9*0.19 + 0.1*3
    assert ema.module.weight[0, 0].item() == pytest.approx(0.9 * 0.19 + 0.3)
    assert ema.module.bias.item() == 0.0 and int(ema.n_averaged) == 4
    assert not any(p.requires_grad for p in ema.module.parameters())

    with torch.no_grad():
        src.weight.fill_(0.0)
    warm = averaged(src, decay=0.99, warmup=True)
    expected = 0.0
    for k, target in enumerate((1.0, 1.0, 2.0)):
        with torch.no_grad():
            src.weight.fill_(target)
        update_average(warm, src)
        d = min(0.99, (1 + k) / (10 + k))  # 0.1, 2/11, 3/12
        expected = d * expected + (1 - d) * target
        assert warm.module.weight[0, 0].item() == pytest.approx(expected)
    warm.n_averaged.fill_(10_001)
    before = warm.module.weight[0, 0].item()
    update_average(warm, src)
    assert warm.module.weight[0, 0].item() == pytest.approx(0.99 * before + 0.01 * 2.0)  # the cap


def test_ema_keeps_float32_of_a_bf16_model():
    src = nn.Linear(3, 3).to(torch.bfloat16)
    ema = averaged(src, decay=0.5, warmup=False)
    assert ema.module.weight.dtype == torch.float32
    update_average(ema, src)
    torch.testing.assert_close(ema.module.weight, src.weight.float())  # half of twice the same weights


def test_ema_shares_the_frozen_float32_parameters_and_averages_the_rest():
    """A frozen float32 parameter is its own average: the copy holds the same tensor, never a second one,
    and a checkpoint of both holds it once. Trainable ones are copied and averaged; a frozen bf16 one is
    copied as float32 (the average's dtype)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2), nn.Linear(2, 2).to(torch.bfloat16))
    net[0].requires_grad_(False)
    net[2].requires_grad_(False)
    ema = averaged(net, decay=0.5, warmup=False)
    assert ema.module[0].weight is net[0].weight and ema.module[0].bias is net[0].bias
    assert ema.module[1].weight is not net[1].weight and ema.module[2].weight.dtype == torch.float32
    assert net[0].weight.dtype == torch.float32 and net[2].weight.dtype == torch.bfloat16  # left as they were
    frozen, before = net[0].weight.clone(), net[1].weight.detach().clone()
    with torch.no_grad():
        net[1].weight.add_(1.0)
    update_average(ema, net)
    torch.testing.assert_close(ema.module[1].weight, before + 0.5)  # halfway to the new weights
    assert torch.equal(net[0].weight, frozen) and not net[0].weight.requires_grad

    def saved_bytes(average) -> int:
        buffer = io.BytesIO()
        torch.save({"model": net.state_dict(), "ema": average.state_dict()}, buffer)
        return buffer.tell()

    copied = copy.deepcopy(ema)  # what the average held before: a second set of the frozen weights
    copied.module[0].weight = nn.Parameter(net[0].weight.detach().clone(), requires_grad=False)
    assert saved_bytes(copied) - saved_bytes(ema) >= net[0].weight.numel() * 4  # the 64 x 64 float32 once


def test_a_checkpoint_loads_a_shared_frozen_weight_from_the_models_entry():
    """A run that trained a weight and froze it on resume: the checkpoint's average of it differs, and both
    entries load into the one shared tensor. The model's entry decides, whatever the loading order."""
    from varctl.lit.optim import load_shared_from_model

    parent = nn.Module()
    parent.model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    parent.ema = averaged(parent.model, decay=0.5, warmup=False)  # trained: nothing shared
    with torch.no_grad():
        parent.model[0].weight.add_(1.0)
    update_average(parent.ema, parent.model)
    state = parent.state_dict()
    assert not torch.equal(state["model.0.weight"], state["ema.module.0.weight"])

    resumed = nn.Module()
    resumed.model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    resumed.model[0].requires_grad_(False)  # frozen now
    resumed.ema = averaged(resumed.model, decay=0.5, warmup=False)
    state = dict(state)
    assert load_shared_from_model(state, resumed.model, resumed.ema, "model.", "ema.module.") == [
        "0.weight"
    ]  # the bias did not move: its two entries were equal
    resumed.load_state_dict(state)
    assert torch.equal(resumed.model[0].weight, parent.model[0].weight)  # the trained weight, not its average
    assert resumed.ema.module[0].weight is resumed.model[0].weight
    assert torch.equal(resumed.ema.module[1].weight, parent.ema.module[1].weight)  # a trained one's average


def test_ema_state_roundtrip_restores_average_and_count():
    parent = nn.Module()
    parent.net = nn.Linear(2, 2)
    parent.ema = averaged(parent.net, decay=0.5, warmup=False)
    with torch.no_grad():
        parent.net.weight.add_(1.0)
    update_average(parent.ema, parent.net)
    state = parent.state_dict()
    assert "ema.module.weight" in state and "ema.n_averaged" in state

    other = nn.Module()
    other.net = nn.Linear(2, 2)
    other.ema = averaged(other.net, decay=0.5, warmup=False)
    other.load_state_dict(state)
    assert torch.equal(other.ema.module.weight, parent.ema.module.weight)
    assert int(other.ema.n_averaged) == 2
    with pytest.raises(ValueError, match="ema_decay"):
        averaged(parent.net, decay=1.0)


def test_adamw_is_fused_on_plain_tensors_and_steps_like_the_loop():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    fused = adamw(param_groups(a, 0.05), lr=1e-2)
    loop = adamw(param_groups(b, 0.05), lr=1e-2, allow_fused=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    x = torch.randn(8, 6)
    for _ in range(3):
        for model, opt in ((a, fused), (b, loop)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)  # the same AdamW, other rounding


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_clip_gradients_with_a_fused_optimizer(precision):
    """Lightning refuses to clip for a fused optimizer under mixed precision; bf16 needs no unscaling, so the
    stage clips itself (and leaves every other case to Lightning)."""
    model = nn.Linear(4, 3)
    opt = adamw(param_groups(model, 0.0), lr=1e-3)
    model(torch.randn(5, 4)).mul(100).sum().backward()
    calls = []
    module = SimpleNamespace(
        trainer=SimpleNamespace(precision=precision), clip_gradients=lambda *a, **k: calls.append(k)
    )
    clip_gradients(module, opt, 0.5, "norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    if precision == "bf16-mixed":
        assert calls == [] and norm.item() == pytest.approx(0.5, rel=1e-4)
    else:
        assert calls == [{"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"}] and norm > 1


def test_an_optimizer_state_saved_with_other_groups_is_moved_to_todays():
    """A run saved when the class embedding was not decayed resumes with each parameter's Adam moments."""
    net = Net()
    today = no_weight_decay_names(net)
    before = today | decayed_embedding_names(net)
    assert before - today == {"class_emb.weight"}
    old = adamw(param_groups(net, 0.05, before), lr=1e-3)
    for _ in range(2):
        sum((p * torch.randn_like(p)).sum() for p in net.parameters() if p.requires_grad).backward()
        old.step()
        old.zero_grad()
    state = copy.deepcopy(old.state_dict())
    assert regroup_optimizer_state(state, net, before, today)
    new = adamw(param_groups(net, 0.05, today), lr=1e-3)
    new.load_state_dict(state)
    assert [g["weight_decay"] for g in new.param_groups] == [0.05, 0.0]
    assert any(p is net.class_emb.weight for p in new.param_groups[0]["params"])
    for p in (p for p in net.parameters() if p.requires_grad):
        assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
    # today's groups, or groups that are not those of the names given, are left alone
    assert not regroup_optimizer_state(copy.deepcopy(new.state_dict()), net, today, today)
    assert not regroup_optimizer_state(copy.deepcopy(new.state_dict()), net, before, today)
    other = copy.deepcopy(old.state_dict())  # numbered in another order (as FSDP's full state is)
    other["param_groups"][0]["params"].reverse()
    assert not regroup_optimizer_state(other, net, before, today)
