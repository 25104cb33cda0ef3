"""Run by tests/test_distributed.py on two CPU processes (gloo): every stage under one strategy, one
launch. ``python dist_stages.py OUT TOKENIZER_FILE ddp|fsdp2``; rank 0 writes OUT/result.json, each rank
its tokenizer state to OUT/tokenizer_rank<r>.pt."""

import json
import os
import sys

import torch
from helpers import metric_images, tiny_feature_net

torch.set_num_threads(1)
import lightning as L  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from datamodules.synthetic import SyntheticDataModule  # noqa: E402
from varctl.callbacks import NonFiniteGuard, TestProgress  # noqa: E402
from varctl.checkpoints import AtomicCheckpointIO  # noqa: E402
from varctl.lit.control import ControlModule  # noqa: E402
from varctl.lit.tokenizer import TokenizerModule  # noqa: E402
from varctl.lit.var import VARModule  # noqa: E402
from varctl.metrics.generation import GenerationMetrics  # noqa: E402
from varctl.models import VAR, ControlBranch  # noqa: E402

out, vae_file, strategy_name = sys.argv[1:4]
result = {}


def trainer(steps: int, **kwargs) -> L.Trainer:
    strategy = "ddp" if strategy_name == "ddp" else ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)  # fmt: skip
    args = dict(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, limit_val_batches=1,
                val_check_interval=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(**{**args, **kwargs})


def data(module, **kwargs) -> SyntheticDataModule:
    dm = SyntheticDataModule(**{"num_train": 64, "num_val": 16, "batch_size": 4, **kwargs})
    dm.connect(**module.data_requirements())
    return dm


def rank_sums(state: dict) -> list[float]:
    """The sum of every floating tensor of ``state`` (full tensors of shards), gathered from both ranks."""
    full = [v.full_tensor() if hasattr(v, "full_tensor") else v for v in state.values()]
    checksum = torch.stack([finite_sum(v) for v in full if v.is_floating_point()]).sum()
    sums = [torch.zeros((), dtype=torch.float64) for _ in range(2)]
    torch.distributed.all_gather(sums, checksum)
    return [s.item() for s in sums]


def total(path, ema: bool = False) -> float:
    state = VAR.load(path, ema=ema).state_dict()
    return sum(finite_sum(v).item() for v in state.values() if v.is_floating_point())


def finite_sum(v: torch.Tensor) -> torch.Tensor:
    """The sum of the finite entries (the attention mask buffer holds -inf, which would hide any change)."""
    v = v.double()
    return v[torch.isfinite(v)].sum()


# ---------------------------------------------------------------------------------------------- tokenizer
if strategy_name == "ddp":
    L.seed_everything(0, verbose=False)
    first = {}

    class FirstStep(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 1:  # hits recorded once, no restart yet
                first["ema_sum"] = module.vae.quantize.ema_vocab_hit_SV.sum(1).clone()

    tiny = {"preset": "tiny", "vocab_size": 64, "z_channels": 8, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
            "patch_nums": [1, 2, 3, 4]}  # fmt: skip
    tok = TokenizerModule(
        vqvae=tiny, perceptual={"weight": 0.0, "val_lpips": False},
        discriminator={"weight": 0.5, "start": 1, "channels": 8, "layers": 2},
        codebook={"restart_dead_codes": True, "restart_every": 2, "dead_code_threshold": 0.5},
        optimizer={"lr": 1e-3},
    )  # fmt: skip
    tr = trainer(4, callbacks=[FirstStep()])
    tr.fit(tok, data(tok, batch_size=2, num_train=16, num_val=4))
    restarted = float(tr.callback_metrics["codebook/restarted_total"])
    torch.save({"state": tok.state_dict(), "restarted": restarted, "first_ema_sum": first["ema_sum"]},
               os.path.join(out, f"tokenizer_rank{tr.global_rank}.pt"))  # fmt: skip
    tr.save_checkpoint(os.path.join(out, "tokenizer.ckpt"))
    tr = trainer(1)  # 5 test images on 2 processes: the one the sampler repeats counts once
    tested = tr.test(tok, data(tok, batch_size=2, num_train=16, num_val=5), verbose=False)[0]
    result["tokenizer_test"] = {k: tested[f"test/{k}"] for k in ("psnr", "ssim", "vq_loss")}

# ---------------------------------------------------------------------------------------------- VAR
torch.manual_seed(0)
var = VARModule(vae_file, var={"depth": 2, "num_classes": 10, "embed_dim": 64, "num_heads": 2},
                optimizer={"lr": 1e-3, "lr_scale_by_batch": False}, ema_decay=0.9,
                token_cache=os.path.join(out, "tokens"))  # built by rank 0 while the other waits  # fmt: skip
tr = trainer(3, gradient_clip_val=2.0, callbacks=[NonFiniteGuard()])  # the guard decides on every rank
tr.strategy.checkpoint_io = AtomicCheckpointIO()  # as the CLI sets it: the save below goes through it
tr.fit(var, data(var))
var_ckpt = os.path.join(out, "var.ckpt")
tr.save_checkpoint(var_ckpt)
x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(1))
labels = torch.tensor([1, 2])
var.var.eval()
with torch.no_grad():
    logits = var.var(labels, x)
sums = rank_sums(var.var.state_dict())
tr.strategy.barrier()
if tr.global_rank == 0:
    with torch.no_grad():
        diff = (VAR.load(var_ckpt).eval()(labels, x) - logits).abs().max().item()
    sharded = type(var.var.blocks[0].attn.proj.weight).__name__ == "DTensor"
    result["var"] = {
        "diff": diff, "rank_sums": sums, "sharded": sharded, "ema_updates": int(var.ema.n_averaged) - 1,
        "val_loss": float(tr.callback_metrics["val/loss"]),
        "cached": len(tr.datamodule.dataset("train").cache),
    }  # fmt: skip

# 15 test images on 2 processes: Lightning's sampler repeats the first after the last, which counts once
tr = trainer(1)
tr.test(var, data(var, num_val=15), verbose=False)
result["var_test_loss"] = float(tr.callback_metrics["test/loss"])


# the same test stopped after its third batch of four and run again (TestProgress): every process goes on
# from the newest save they all have, here the one before the newest, which process 1 lost
class StopAfter(L.Callback):
    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 2:
            raise RuntimeError("killed")


progress = os.path.join(out, "test_progress")
try:
    trainer(1, callbacks=[TestProgress(progress, every_s=0), StopAfter()]).test(
        var, data(var, num_val=15, batch_size=2), verbose=False
    )
except RuntimeError as e:
    assert str(e) == "killed", e
resumed = TestProgress(progress, every_s=0)
tr = trainer(1, callbacks=[resumed])
if tr.global_rank == 1:
    os.unlink(resumed.files(tr)[0])
tr.test(var, data(var, num_val=15, batch_size=2), verbose=False)
result["var_test_loss_resumed"] = [float(tr.callback_metrics["test/loss"]), resumed.done]

# ---------------------------------------------------------------------------------------------- control
torch.manual_seed(0)
spec = {"modalities": ["edges"], "width": 8, "feature_dim": 32, "max_width": 32}
optimizer = {"lr": 1e-3, "lr_scale_by_batch": False}
control = ControlModule(  # with EMA: the average shares the frozen backbone (FSDP2 shards a copy of it)
    vae_file, init_from=var_ckpt, control=spec, optimizer=optimizer, scores={"batches": 1}, ema_decay=0.9
)
tr = trainer(3)
tr.fit(control, data(control, controls=["edges"]))
control_ckpt = os.path.join(out, "control.ckpt")
tr.save_checkpoint(control_ckpt)
sums = rank_sums(control.control.state_dict())
tr.strategy.barrier()
if tr.global_rank == 0:
    branch = ControlBranch.load(control_ckpt)
    result["control"] = {
        "rank_sums": sums, "loaded": sum(v.double().sum().item() for v in branch.state_dict().values()),
        "base_sum": total(var_ckpt), "ckpt_sum": total(control_ckpt),
        "ema_sum": total(control_ckpt, ema=True), "ema_updates": int(control.ema.n_averaged) - 1,
        "f1": float(tr.callback_metrics["val/edges_f1"]),
        "f1_shuffled": float(tr.callback_metrics["val_shuffled/edges_f1"]),
    }  # fmt: skip

# ---------------------------------------------------------------------------------------------- jobs
# a folder of 5 edge maps drawn by 2 processes: each map exactly once (Lightning's unrepeated sampler)
if strategy_name == "ddp":
    from PIL import Image

    from datamodules.jobs import GenerationJobs
    from varctl.callbacks import ImageWriter

    maps = os.path.join(out, "maps")
    if tr.global_rank == 0:
        scenes = data(control, controls=["edges"]).dataset("val")
        os.makedirs(os.path.join(maps, "edges"))
        for i in range(5):
            edges = (scenes[i]["control"]["edges"][0].numpy() * 255).astype("uint8")
            Image.fromarray(edges).save(os.path.join(maps, "edges", f"map_{i}.png"))
    tr.strategy.barrier()

    def draw_jobs() -> tuple[list[int], str]:
        """The folder's jobs drawn by both processes: (images each wrote, the output folder)."""
        jobs = GenerationJobs(root=maps, batch_size=2)
        jobs.connect(**control.data_requirements())
        writer = ImageWriter(jobs.output_dir)
        trainer(1, callbacks=[writer]).predict(control, jobs, return_predictions=False)
        counts = [torch.zeros((), dtype=torch.int64) for _ in range(2)]
        torch.distributed.all_gather(counts, torch.tensor(writer.written))
        return [int(c) for c in counts], jobs.output_dir

    counts, output = draw_jobs()
    files = sorted(os.listdir(output))  # the images and jobs_settings.jsonl
    # resumed with one image left, fewer than the processes: one process has nothing to draw
    tr.strategy.barrier()
    if tr.global_rank == 0:
        os.remove(os.path.join(output, "map_3.png"))
    tr.strategy.barrier()
    resumed, _ = draw_jobs()
    if tr.global_rank == 0:
        result["jobs"] = {"written": counts, "maps": maps, "files": files, "resumed": resumed,
                          "files_resumed": sorted(os.listdir(output))}  # fmt: skip

# ---------------------------------------------------------------------------------------------- injectors
# the other injectors, 2 steps each; CAR fine-tunes the backbone too (side blocks + sharded backbone), its
# side blocks and prefill's prefix under the null condition (conf/control.yaml's car_condition and
# prefix_condition: the VAR's embeddings read twice)
result["injectors"] = {}
for name in ("controlar", "car", "prefill", "ecm"):
    torch.manual_seed(0)
    module = ControlModule(
        vae_file, init_from=var_ckpt, control={**spec, "injector": name, "adapter_dim": 32,
        "control_drop_rate": 0.2, "car_condition": "none" if name == "car" else "class",
        "prefix_condition": "none"},
        optimizer=optimizer, scores={"batches": 1, "control_cfg": 1.0},
        train_backbone=name == "car",
    )  # fmt: skip
    tr = trainer(2)
    tr.fit(module, data(module, controls=["edges"]))
    branch_sums, var_sums = rank_sums(module.control.state_dict()), rank_sums(module.var.state_dict())
    ckpt = os.path.join(out, f"control_{name}.ckpt")
    tr.save_checkpoint(ckpt)
    tr.strategy.barrier()
    if tr.global_rank == 0:
        loaded = ControlBranch.load(ckpt)
        result["injectors"][name] = {
            "branch_sums": branch_sums, "var_sums": var_sums, "injector": loaded.config.injector,
            "loaded": sum(v.double().sum().item() for v in loaded.state_dict().values()),
            "backbone_moved": total(ckpt) != total(var_ckpt),
            "f1": float(tr.callback_metrics["val/edges_f1"]),
        }  # fmt: skip
# ---------------------------------------------------------------------------------------------- metrics
# FID/KID/IS features gathered over the ranks, each rank half of the images: the single-process scores
metrics = GenerationMetrics(tiny_feature_net(), kid_subsets=5, kid_subset_size=10)
half = slice(20 * tr.global_rank, 20 * (tr.global_rank + 1))
metrics.update(metric_images(real=True)[half], real=True)
metrics.update(metric_images(real=False)[half], real=False)
result["generation_metrics"] = metrics.compute()
if tr.global_rank == 0:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
torch.distributed.destroy_process_group()  # gloo's threads left to interpreter shutdown can abort
