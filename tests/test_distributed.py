"""Every stage on two CPU processes (gloo), one launch per strategy (tests/dist_stages.py): DDP for the
tokenizer, the VAR and the control branch, FSDP2 (ModelParallelStrategy) for the VAR and the branch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _launch(out: Path, tokenizer_file: str, strategy: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "dist_stages.py"), str(out), tokenizer_file, strategy],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def ddp(tokenizer_file, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("ddp")
    return _launch(out, tokenizer_file, "ddp"), out


@pytest.fixture(scope="module")
def fsdp2(tokenizer_file, tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("fsdp2"), tokenizer_file, "fsdp2")


def test_tokenizer_ddp_ranks_agree(ddp):
    _, out = ddp
    r0, r1 = (torch.load(out / f"tokenizer_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["restarted"] > 0 and r0["restarted"] == r1["restarted"]
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # weights, restarted codes and the EMA of hits agree
    # counts are summed over both ranks: 2 ranks x 2 images x pn^2 tokens per step at each scale
    torch.testing.assert_close(r0["first_ema_sum"], torch.tensor([4.0, 16.0, 36.0, 64.0]))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_var_replicas_agree_and_the_checkpoint_is_a_plain_var(strategy, request):
    """DDP replicas stay identical; FSDP2 shards each block, and its full-state checkpoint rebuilds a plain
    VAR whose logits equal the sharded model's. Both train from a token cache."""
    result = request.getfixturevalue(strategy)
    var = (result[0] if strategy == "ddp" else result)["var"]
    assert var["rank_sums"][0] == var["rank_sums"][1]
    assert var["diff"] == 0.0 and var["ema_updates"] == 3 and math.isfinite(var["val_loss"])
    assert var["sharded"] == (strategy == "fsdp2")
    assert var["cached"] == 64  # trained from a token cache that rank 0 built while the other rank waited


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_control_branch_replicas_agree_and_the_backbone_stays(strategy, request):
    """The replicas' branches agree, the checkpoint holds the full branch and the unchanged backbone (its
    EMA too), the control metrics are reduced over both processes."""
    result = request.getfixturevalue(strategy)
    control = (result[0] if strategy == "ddp" else result)["control"]
    assert control["rank_sums"][0] == control["rank_sums"][1]
    assert control["loaded"] == pytest.approx(control["rank_sums"][0], rel=1e-9)
    assert control["ckpt_sum"] == control["base_sum"]  # frozen backbone
    assert control["ema_sum"] == control["base_sum"] and control["ema_updates"] == 3  # and its average
    assert 0.0 <= control["f1"] <= 1.0 and 0.0 <= control["f1_shuffled"] <= 1.0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_injector_trains_under_the_strategy(strategy, request):
    """controlar, car (with the backbone fine-tuned), prefill and ecm under DDP and FSDP2: replicas agree,
    the checkpoint's branch is the trained one, the backbone moves only when it is tuned."""
    result = request.getfixturevalue(strategy)
    injectors = (result[0] if strategy == "ddp" else result)["injectors"]
    assert sorted(injectors) == ["car", "controlar", "ecm", "prefill"]
    for name, r in injectors.items():
        assert r["branch_sums"][0] == r["branch_sums"][1] and r["var_sums"][0] == r["var_sums"][1], (name, r)
        assert r["injector"] == name and r["loaded"] == pytest.approx(r["branch_sums"][0], rel=1e-9), name
        assert r["backbone_moved"] == (name == "car") and 0.0 <= r["f1"] <= 1.0, name


def test_generation_jobs_draw_every_input_exactly_once_under_ddp(ddp, tmp_path):
    """5 edge maps over 2 processes: 5 images written in all (no padded duplicates), the same images as one
    process draws (the seed of each comes from its name); resumed with one image left, one process draws it
    and the other has nothing to do."""
    import lightning as L
    import numpy as np
    from PIL import Image

    from datamodules.jobs import GenerationJobs
    from varctl.callbacks import ImageWriter
    from varctl.lit.control import ControlModule

    result, out = ddp
    jobs = result["jobs"]
    assert sum(jobs["written"]) == 5 and min(jobs["written"]) >= 2
    assert jobs["files"] == ["jobs_settings.jsonl"] + [f"map_{i}.png" for i in range(5)]
    assert jobs["resumed"] == [0, 1] or jobs["resumed"] == [1, 0]  # one left: one process draws it
    assert jobs["files_resumed"] == jobs["files"]
    module = ControlModule.load_from_checkpoint(out / "control.ckpt", map_location="cpu")
    single = GenerationJobs(root=jobs["maps"], output=str(tmp_path), batch_size=5)
    single.connect(**module.data_requirements())
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        callbacks=[ImageWriter(tmp_path)])  # fmt: skip
    trainer.predict(module, single, return_predictions=False)
    for name in jobs["files"][1:]:
        a = np.asarray(Image.open(Path(jobs["maps"]) / "generated" / name)).astype(int)
        assert np.abs(a - np.asarray(Image.open(tmp_path / name))).max() <= 1, name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_generation_metrics_over_two_processes_equal_one_process(strategy, request):
    """Each process scores half of the images: the features are gathered once, and FID, KID, IS,
    precision and recall equal the single-process scores of all of them."""
    from helpers import metric_images, tiny_feature_net

    from varctl.metrics.generation import GenerationMetrics

    result = request.getfixturevalue(strategy)
    gathered = (result[0] if strategy == "ddp" else result)["generation_metrics"]
    alone = GenerationMetrics(tiny_feature_net(), kid_subsets=5, kid_subset_size=10)
    alone.update(metric_images(real=True), real=True)
    alone.update(metric_images(real=False), real=False)
    expected = alone.compute()
    assert expected["num_real_tiny"] == 40 and expected["fd_tiny"] > 0.01
    assert gathered == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_stopped_test_goes_on_from_the_newest_save_of_every_process(strategy, request):
    """Stopped after 3 of 4 test batches a process, process 1's newest save lost: both go on from batch 2
    (FSDP's collectives need as many forwards in each), to the loss of the uninterrupted test."""
    result = request.getfixturevalue(strategy)
    result = result[0] if strategy == "ddp" else result
    assert result["var_test_loss_resumed"] == [pytest.approx(result["var_test_loss"], rel=1e-6), 2]


def test_every_test_image_counts_once_over_two_processes(ddp, tokenizer_file):
    """15 (VAR) and 5 (tokenizer) test images on 2 processes: the one Lightning's sampler repeats is left
    out, so the test scores are the single process's."""
    import lightning as L

    from datamodules.synthetic import SyntheticDataModule
    from varctl.lit.tokenizer import TokenizerModule
    from varctl.lit.var import VARModule

    def alone(module, **data):  # the data of tests/dist_stages.py
        dm = SyntheticDataModule(**data)
        dm.connect(**module.data_requirements())
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        return trainer.test(module, dm, verbose=False)[0]

    result, out = ddp
    var = VARModule.load_from_checkpoint(out / "var.ckpt", map_location="cpu")
    assert result["var_test_loss"] == pytest.approx(
        alone(var, num_val=15, batch_size=4)["test/loss"], rel=1e-6
    )
    tokenizer = TokenizerModule.load_from_checkpoint(out / "tokenizer.ckpt", map_location="cpu")
    scores = alone(tokenizer, num_val=5, batch_size=2)
    assert result["tokenizer_test"] == pytest.approx(
        {k: scores[f"test/{k}"] for k in result["tokenizer_test"]}
    )
