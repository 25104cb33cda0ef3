"""The VAR training stage (varctl/lit/var.py): wiring, learning, sampling, checkpoints, EMA, precision,
predict, DDP and FSDP2 on CPU. Tiny tokenizer (random weights, 32 px, scales 1-2-4, V=64) and tiny VARs."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

from datamodules.synthetic import CLASS_NAMES, SyntheticDataModule
from varctl.callbacks import ImageLogger, ImageWriter
from varctl.lit.var import VARModule
from varctl.metrics.classifier import class_names_from_files
from varctl.models.lifecycle import read_weights
from varctl.models.var import VAR
from varctl.models.vqvae import VQVAE

V = 64
TINY_VAR = {"depth": 2, "num_classes": 10, "embed_dim": 64, "num_heads": 2}
TINY_TEXT = {
    "name": "ViT-B-32",
    "pretrained": None,
    "model_cfg": {"embed_dim": 32, "text_cfg": {"width": 32, "heads": 2, "layers": 1, "context_length": 24}},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny convs are far faster on 1 thread


@pytest.fixture(scope="module")
def vae_file(tokenizer_file):
    return tokenizer_file  # conftest.py: V=64, Cvae=8, scales 1-2-4, 32 px


FAST = {"lr": 2e-3, "lr_scale_by_batch": False, "warmup_steps": 5, "decay": "constant"}


def make_module(vae_file, condition="class", **kw):
    kw.setdefault("var", TINY_VAR)
    if condition == "text":
        kw.setdefault("text_encoder", TINY_TEXT)
    return VARModule(vae_file, **kw)


def make_data(module, batch_size=8, num_train=64, num_val=16):
    dm = SyntheticDataModule(num_train=num_train, num_val=num_val, batch_size=batch_size)
    dm.connect(**module.data_requirements())
    return dm


def make_trainer(tmp_path, **kw):
    args = dict(
        accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, val_check_interval=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(tmp_path), gradient_clip_val=2.0,
    )  # fmt: skip
    args.update(kw)
    return L.Trainer(**args)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


# ---------------------------------------------------------------------------------------------- wiring
def test_config_comes_from_tokenizer_and_text_encoder(vae_file):
    m = make_module(vae_file)
    assert m.data_requirements() == {"resolution": 32, "keys": ("image", "label")}
    c = m.var.config
    assert (c.vocab_size, c.z_channels, c.patch_nums, c.L, c.cond_drop_rate) == (V, 8, (1, 2, 4), 21, 0.1)
    assert not any(p.requires_grad for p in m.vae.parameters())
    t = make_module(vae_file, "text", var={**TINY_VAR, "cond_drop_rate": 0.2})
    assert t.data_requirements()["keys"] == ("image", "caption")
    tc = t.var.config
    assert (tc.condition, tc.text_dim, tc.text_len, tc.text_pooled_dim, tc.cond_drop_rate) == (
        "text",
        32,
        24,
        32,
        0.2,
    )
    torch.testing.assert_close(t.var.null_text_pooled, t.text_encoder.empty().pooled_BE)
    with pytest.raises(
        ValueError, match=r"VARConfig\.vocab_size=512 conflicts with vocab_size=64, .*tokenizer"
    ):
        make_module(vae_file, var={**TINY_VAR, "vocab_size": 512})
    with pytest.raises(ValueError, match=r"unknown VARConfig key 'dept'; did you mean 'depth'"):
        make_module(vae_file, var={"dept": 2})


def test_num_classes_mismatch_names_the_setting(vae_file, tmp_path):
    m = make_module(vae_file, var={**TINY_VAR, "num_classes": 5})
    with pytest.raises(ValueError, match=r"model\.var\.num_classes=5 .* has 10 classes"):
        make_trainer(tmp_path).fit(m, make_data(m))


@pytest.mark.parametrize("condition", ["class", "text"])
def test_short_fit_with_ema_logs_metrics_and_sample_grid(vae_file, tmp_path, condition):
    torch.manual_seed(0)
    m = make_module(vae_file, condition, ema_decay=0.9, samples={"captions": ["a red circle", "a blue star"]})
    dm = make_data(m)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    grids = ImageLogger(every_n_steps=1, max_images=3)
    trainer = make_trainer(tmp_path, logger=logger, log_every_n_steps=1, callbacks=[grids])
    trainer.fit(m, dm)
    metrics = trainer.callback_metrics
    # a fresh VAR predicts nearly uniformly: cross-entropy ~ ln V
    assert abs(metrics["train/loss"].item() - math.log(V)) < 0.1
    assert abs(metrics["val/loss"].item() - math.log(V)) < 0.1
    assert {"train/loss_s0", "train/acc_s2", "val/loss_s2", "val/acc_s1", "train/grad_norm"} <= set(metrics)
    # lr = 1e-4 * 8 / 256 (batch scaling); biases, norms, embeddings, positions without weight decay
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["decay"]["initial_lr"] == pytest.approx(1e-4 * 8 / 256)
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(m.var.pos_1LC) in no_decay and id(m.var.blocks[0].attn.proj.weight) not in no_decay
    assert int(m.ema.n_averaged) == 3  # the initial copy and two updates
    # the sample grid: one row per condition, one column per scale (3 scales of 32 px, 1 px padding)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir).Reload()
    tag = "val/samples_text" if condition == "text" else "val/samples"
    image = events.Images(tag)[-1]
    rows = 2 if condition == "text" else 3
    assert (image.width, image.height) == (3 * 33 + 1, rows * 33 + 1)


def test_bf16_mixed_fit(vae_file, tmp_path):
    m = make_module(vae_file, "text")
    trainer = make_trainer(tmp_path, precision="bf16-mixed")
    trainer.fit(m, make_data(m))
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert (
        all(p.dtype == torch.float32 for p in m.var.parameters())
        and m.vae.quant_conv.weight.dtype == torch.float32
    )
    x = torch.randn(2, 20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m.var(m.text_encoder(["a", "b"]), x)
    assert logits.dtype == torch.float32  # the loss stays float32 under autocast (16-mixed loss scaling too)


def test_fp16_loss_scaling_fit_and_resume(vae_file, tmp_path):
    """16-mixed: fp16 autocast with a GradScaler (on a GPU Trainer(precision="16-mixed") builds the same
    plugin; a CPU Trainer maps that flag to bf16, so the plugin is passed here). The logged norm, and so the
    clipping, see unscaled gradients; the scaler state is checkpointed and restored on resume."""
    norms = {}
    for name, plugins in (("32", []), ("16", [MixedPrecision("16-mixed", "cpu")])):
        torch.manual_seed(0)
        m = make_module(vae_file, optimizer={"lr": 2e-3, "lr_scale_by_batch": False})
        trainer = make_trainer(
            tmp_path, max_steps=2, limit_val_batches=0, plugins=plugins, log_every_n_steps=1
        )
        trainer.fit(m, make_data(m))
        norms[name] = trainer.callback_metrics["train/grad_norm"].item()
        assert all(p.dtype == torch.float32 for p in m.var.parameters())
    assert norms["16"] == pytest.approx(norms["32"], rel=2e-2), norms  # scaled gradients would be 65536x
    scaler = trainer.precision_plugin.scaler
    scaler.update(1024.0)  # a distinct value, to see it come back
    ckpt = tmp_path / "fp16.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["MixedPrecision"]["scale"] == 1024.0
    m2 = make_module(vae_file, optimizer={"lr": 2e-3, "lr_scale_by_batch": False})
    resumed = make_trainer(
        tmp_path, max_steps=3, limit_val_batches=0, plugins=[MixedPrecision("16-mixed", "cpu")]
    )
    resumed.fit(m2, make_data(m2), ckpt_path=str(ckpt))
    assert resumed.global_step == 3 and resumed.precision_plugin.scaler.get_scale() == 1024.0


# ---------------------------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def trained(vae_file, tmp_path_factory):
    """80 steps of batch 16 on the built-in shapes, EMA on: (module, data, losses, checkpoint)."""
    torch.manual_seed(0)
    m = make_module(vae_file, optimizer=FAST, ema_decay=0.95)
    dm = make_data(m, batch_size=16, num_train=256)
    rec = LossRecorder()
    root = tmp_path_factory.mktemp("trained")
    trainer = make_trainer(root, max_steps=80, limit_val_batches=0, callbacks=[rec])
    trainer.fit(m, dm)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return m, dm, rec.losses, ckpt


def test_training_loss_falls(trained):
    _, _, losses, _ = trained
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 80 and first > 3.9
    assert last < 0.8 * first, (first, last)  # measured: ~4.11 -> ~2.7


def _token_hist(idx: torch.Tensor) -> torch.Tensor:
    return torch.bincount(idx.flatten(), minlength=V).float() / idx.numel()


def sample_vs_data_tv(m: VARModule, dm, to_condition) -> tuple[float, float]:
    """Total variation between the token histogram of 16 val images and that of samples drawn for their
    conditions, for the trained VAR and for a fresh one: (trained, untrained)."""
    items = [dm.dataset("val")[i] for i in range(16)]
    target_BL, _ = m.tokenize(torch.stack([it["image"] for it in items]))
    data_hist = _token_hist(target_BL)
    cond = to_condition(items)

    def tv(var):
        tokens = []
        out = var.eval().generate(
            cond, cfg=1.5, seed=0, vae=m.vae, callback=lambda si, lg, idx, f: tokens.append(idx)
        )
        assert out.shape == (16, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
        return 0.5 * (_token_hist(torch.cat(tokens, dim=1)) - data_hist).abs().sum().item()

    torch.manual_seed(0)
    untrained = VAR(m.var.config)
    if m.text_encoder is not None:
        untrained.set_null_text(m.text_encoder.empty())
    return tv(m.var), tv(untrained)


def test_samples_follow_the_training_token_statistics(trained):
    m, dm, _, _ = trained
    tv_trained, tv_untrained = sample_vs_data_tv(
        m, dm, lambda items: torch.tensor([i["label"] for i in items])
    )
    # measured ~0.13 trained vs ~0.64 untrained
    assert tv_trained < 0.3 and tv_untrained > 0.45, (tv_trained, tv_untrained)


@pytest.fixture(scope="module")
def trained_text(vae_file, tmp_path_factory):
    """The text-conditioned variant on the built-in captions, 80 steps of batch 16: (module, data, losses)."""
    torch.manual_seed(0)
    m = make_module(vae_file, "text", optimizer=FAST)
    dm = make_data(m, batch_size=16, num_train=256)
    rec = LossRecorder()
    trainer = make_trainer(
        tmp_path_factory.mktemp("text"), max_steps=80, limit_val_batches=0, callbacks=[rec]
    )
    trainer.fit(m, dm)
    return m, dm, rec.losses


def test_text_variant_learns_and_samples_from_captions(trained_text):
    m, dm, losses = trained_text
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 80 and first > 3.9
    assert last < 0.8 * first, (first, last)  # measured: ~4.08 -> ~2.91
    tv_trained, tv_untrained = sample_vs_data_tv(
        m, dm, lambda items: m.text_encoder([i["caption"] for i in items])
    )
    # measured ~0.15 trained vs ~0.64 untrained
    assert tv_trained < 0.3 and tv_untrained > 0.45, (tv_trained, tv_untrained)


def test_checkpoint_rebuilds_plain_models(trained, vae_file):
    m, _, _, ckpt = trained
    plain = VAR.load(ckpt).eval()
    x = torch.randn(3, 20, 8)
    labels = torch.tensor([0, 4, 9])
    m.var.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(labels, x), m.var(labels, x), rtol=0, atol=0)
    obj = torch.load(ckpt, weights_only=False)
    assert obj["varctl"]["var"]["prefix"] == "model." and obj["varctl"]["vqvae"]["prefix"] == "vae."
    # the optimizer's no-decay group, by name (a resume moves a state saved with other groups)
    no_decay = set(obj["varctl_no_decay"])
    assert "lvl_embed.weight" in no_decay and "class_emb.weight" not in no_decay
    assert len(no_decay) == len(obj["optimizer_states"][0]["param_groups"][1]["params"])
    vae = VQVAE.load(ckpt)
    ref = VQVAE.load(vae_file)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), ref.state_dict().values()))
    ema_sd, _, _ = read_weights(ckpt, "var", ema=True)
    assert all(torch.equal(v, m.ema.module.state_dict()[k]) for k, v in ema_sd.items())
    assert int(obj["state_dict"]["ema.n_averaged"]) == 81  # the initial copy and 80 updates


def test_ema_differs_and_is_what_validation_uses(trained, tmp_path):
    m, dm, _, _ = trained
    diff = (m.ema.module.head.weight - m.var.head.weight).abs().max().item()
    assert diff > 1e-4
    trainer = make_trainer(tmp_path, limit_val_batches=1)
    val_loss = trainer.validate(m, dm, verbose=False)[0]["val/loss"]
    batch = next(iter(dm.val_dataloader()))
    target_BL, x = m.tokenize(batch["image"])

    def loss_of(var):
        with torch.no_grad():
            logits = var.eval()(batch["label"], x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_BL.flatten()).item()

    assert val_loss == pytest.approx(loss_of(m.ema.module), abs=1e-5)
    assert abs(loss_of(m.var) - val_loss) > 1e-4


def test_test_loop_reports_per_scale_metrics(trained, tmp_path):
    m, dm, _, _ = trained
    trainer = make_trainer(tmp_path, limit_val_batches=2, limit_test_batches=2)
    val = trainer.validate(m, dm, verbose=False)[0]
    test = trainer.test(m, dm, verbose=False)[0]
    assert {f"test/{k}_s{i}" for k in ("loss", "acc") for i in range(3)} <= set(test)
    # the built-in data has no test split, so `test` reads the val split: the same numbers
    assert test["test/loss"] == pytest.approx(val["val/loss"], abs=1e-6)
    assert test["test/acc"] == pytest.approx(val["val/acc"], abs=1e-6)
    assert test["test/loss"] < math.log(V) - 0.5  # trained, far below a uniform guess


def test_resume_restores_ema_and_continues(vae_file, tmp_path):
    torch.manual_seed(0)
    m = make_module(vae_file, ema_decay=0.9)
    dm = make_data(m)
    trainer = make_trainer(tmp_path, limit_val_batches=0)
    trainer.fit(m, dm)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    m2 = make_module(vae_file, ema_decay=0.9)
    trainer2 = make_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer2.fit(m2, make_data(m2), ckpt_path=str(ckpt))
    assert trainer2.global_step == 3 and int(m2.ema.n_averaged) == 4


def test_checkpoints_hold_the_ema_of_their_step_and_a_resume_keeps_every_update(vae_file, tmp_path):
    """The average is updated right after each optimizer step (once per 2 accumulated batches here), before
    ModelCheckpoint saves: the checkpoint of step k holds the initial copy and k updates, and a run resumed
    from step 2 ends with the uninterrupted run's average, bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from varctl.callbacks import ResumeRandomState

    def fit(folder, max_steps, ckpt=None):
        torch.manual_seed(0)
        m = make_module(vae_file, ema_decay=0.9, optimizer=FAST)
        saves = ModelCheckpoint(dirpath=tmp_path / folder, filename="{step}", every_n_train_steps=1,
                                save_top_k=-1)  # fmt: skip
        trainer = make_trainer(tmp_path, max_steps=max_steps, limit_val_batches=0, accumulate_grad_batches=2,
                               enable_checkpointing=True, callbacks=[saves, ResumeRandomState()])  # fmt: skip
        trainer.fit(m, make_data(m, batch_size=4), ckpt_path=ckpt)
        return m

    whole = fit("whole", 4)
    for step in range(1, 5):
        state = torch.load(tmp_path / "whole" / f"step={step}.ckpt", weights_only=True)["state_dict"]
        assert int(state["ema.n_averaged"]) == step + 1
    assert int(whole.ema.n_averaged) == 5
    resumed = fit("resumed", 4, ckpt=str(tmp_path / "whole" / "step=2.ckpt"))
    a, b = whole.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and int(b["n_averaged"]) == 5
    assert not torch.equal(a["module.head.weight"], whole.var.head.weight)  # an average, not a copy


def test_a_skipped_step_leaves_the_ema_alone(vae_file, tmp_path):
    """callbacks.nonfinite with action=skip drops step 2's update (a NaN gradient): neither the weights nor
    the average move, so 3 steps make 2 updates."""
    from varctl.callbacks import NonFiniteGuard

    class NanGradientAt(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step + 1 == 2:
                next(p for p in pl_module.model.parameters() if p.grad is not None).grad.fill_(float("nan"))

    torch.manual_seed(0)
    m = make_module(vae_file, ema_decay=0.9, optimizer=FAST)
    guard = NonFiniteGuard(action="skip")
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[NanGradientAt(), guard])
    trainer.fit(m, make_data(m, batch_size=4))
    assert trainer.global_step == 3 and guard.skipped == 1 and int(m.ema.n_averaged) == 3


def test_text_checkpoint_leaves_out_the_text_encoder(vae_file, tmp_path):
    m = make_module(vae_file, "text")
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(m, make_data(m))
    ckpt = tmp_path / "text.ckpt"
    trainer.save_checkpoint(ckpt)
    obj = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("text_encoder.") for k in obj["state_dict"])
    loaded = VARModule.load_from_checkpoint(ckpt)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.var.state_dict().values(), m.var.state_dict().values())
    )
    plain = VAR.load(ckpt)
    assert plain.config.condition == "text" and torch.equal(plain.null_text_mask, m.var.null_text_mask)


def test_predict_generates_configured_labels(vae_file, tmp_path):
    m = make_module(vae_file, predict={"labels": [0, 3], "num_per_condition": 3, "seed": 5})
    dm = make_data(m, batch_size=4)
    trainer = make_trainer(tmp_path, limit_predict_batches=3)
    out = trainer.predict(m, dm)
    names = [n for o in out for n in o["names"]]
    assert names == [f"class_{CLASS_NAMES[c]}_{i}" for c in (0, 3) for i in range(3)]
    images = torch.cat([o["images"] for o in out])
    assert images.shape == (6, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    again = torch.cat([o["images"] for o in trainer.predict(m, dm)])
    assert torch.equal(images, again)  # seeded
    with pytest.warns(UserWarning, match="6 images are configured but the predict dataloader has room for 4"):
        short = make_trainer(
            tmp_path, limit_predict_batches=1, callbacks=[ImageWriter(tmp_path / "out")]
        ).predict(m, dm)
    assert torch.equal(short[0]["images"], images[:4])
    with pytest.raises(ValueError, match=r"predict\.labels holds \[12\], expected labels in \[0, 10\)"):
        make_module(vae_file, predict={"labels": [12]})  # refused when the module is built
    # a short last batch (val split of 5: batches of 4 and 1) still draws the next jobs, not earlier ones
    short_last = trainer.predict(m, make_data(m, batch_size=4, num_val=5))
    assert [n for o in short_last for n in o["names"]] == names
    assert torch.equal(torch.cat([o["images"] for o in short_last]), images)


def test_predict_generates_configured_captions(vae_file, tmp_path):
    captions = ["a large white star on the left", "a small yellow ring"]
    m = make_module(vae_file, "text", predict={"captions": captions, "num_per_condition": 2, "seed": 3})
    dm = make_data(m, batch_size=4)
    trainer = make_trainer(tmp_path, limit_predict_batches=1)
    out = trainer.predict(m, dm)
    assert out[0]["names"] == [f"caption{j}_{i}_{c}" for j, c in enumerate(captions) for i in range(2)]
    assert class_names_from_files([f"b0_{n}.png" for n in out[0]["names"]], CLASS_NAMES) == [3, 3, 4, 4]
    images = out[0]["images"]
    assert torch.equal(images, trainer.predict(m, dm)[0]["images"])  # seeded
    assert not torch.equal(images[0], images[1])  # two draws per caption
    assert (images[:2] - images[2:]).abs().mean() > 1e-3  # the caption conditions the samples


def test_init_from_fine_tunes_a_saved_var(vae_file, tmp_path):
    source = make_module(vae_file)
    path = source.var.save(tmp_path / "var.pt")
    m = make_module(vae_file, init_from=str(path), var={"cond_drop_rate": 0.3})
    assert m.var.config.cond_drop_rate == 0.3 and m.var.config.depth == 2
    assert all(
        torch.equal(a, b) for a, b in zip(m.var.state_dict().values(), source.var.state_dict().values())
    )
    with pytest.raises(ValueError, match=r"var\.pt: depth=3 conflicts with the file, which has depth=2"):
        make_module(vae_file, init_from=str(path), var={**TINY_VAR, "depth": 3})
    with pytest.raises(
        ValueError, match=r"var\.pt: condition='text' conflicts with the file, which has condition='class'"
    ):
        make_module(vae_file, "text", init_from=str(path))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_mode_compiles_in_place(vae_file, mode):
    """The option's effect (the compiled forward's values are checked on a GPU, tests/test_gpu.py: compiling
    on a 2-core CPU takes a minute): each block, or for CUDA graphs the whole forward, compiled in place."""
    m = make_module(vae_file, compile_mode=mode)
    keys = list(m.var.state_dict())
    m.configure_model()
    per_block = mode != "reduce-overhead"
    assert all((block._compiled_call_impl is not None) == per_block for block in m.var.blocks)
    assert (m.var._compiled_call_impl is not None) != per_block
    assert list(m.var.state_dict()) == keys  # in place: no _orig_mod. in the checkpoint's names
    assert torch._dynamo.config.recompile_limit >= 2 * len(m.var.blocks) or not per_block
    with pytest.raises(ValueError, match="compile_mode='fast'"):
        make_module(vae_file, compile_mode="fast").configure_model()
