"""Test setup: no network for weights, GPU tests skip themselves without CUDA; fixtures shared by the tests
(one intra-op thread, the tiny official VQVAE and VAR with their golden tensors, a tiny tokenizer file)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: one process per core, one thread each (and in the
    os.environ["OMP_NUM_THREADS"] = "1"  # processes the tests start); more threads only spin-wait

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import PATCH_NUMS, REFERENCE, TINY  # noqa: E402, F401

from varctl.models import VAR, VQVAE, VQVAEConfig  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    busy 2-core machine, more OpenMP threads spin-wait and make small convs 30-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    """The official code's tensors for the tiny models (reference README.md, "Contents of golden.pt")."""
    return torch.load(os.path.join(TINY, "golden.pt"), weights_only=True)


@pytest.fixture(scope="module")
def vae() -> VQVAE:
    """The tiny official VQVAE (V=256, Cvae=16, scales 1-2-3-4), in eval mode."""
    return VQVAE.from_official(os.path.join(TINY, "vqvae.pt"), patch_nums=PATCH_NUMS).eval()


@pytest.fixture(scope="module")
def var(vae) -> VAR:
    """The tiny official class VAR (depth 2, 10 classes) with ``vae`` attached, in eval mode."""
    return VAR.from_official(os.path.join(TINY, "var.pt"), vae).eval()


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> str:
    """A random tiny tokenizer file (32 px, scales 1-2-4, V=64, Cvae=8), what the stage tests train on."""
    torch.manual_seed(0)
    config = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                         patch_nums=(1, 2, 4))  # fmt: skip
    return str(VQVAE(config).save(tmp_path_factory.mktemp("tokenizer") / "vae.pt"))


@pytest.fixture(scope="session")
def judge_file(tmp_path_factory) -> str:
    """A class judge file (varctl.metrics.classifier, 10 classes, 32 px) with random weights and the
    BatchNorm statistics of real scenes, so its features are not ~0: a feature network for plumbing tests."""
    from datamodules.synthetic import SyntheticShapes
    from varctl.metrics.classifier import SmallClassifier, save_classifier

    torch.manual_seed(0)
    model = SmallClassifier(10, width=16)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batch below
    data = SyntheticShapes(64, 32, controls=())
    with torch.no_grad():
        model.train()(torch.stack([data[i]["image"] for i in range(64)]))
    path = tmp_path_factory.mktemp("judge") / "judge.pt"
    save_classifier(model.eval(), path, {"resolution": 32})
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[str, str]:
    """(architecture, weights file) of a tiny random open_clip model, registered with open_clip."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16,
           "head_width": 32}, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
           "layers": 1}}  # fmt: skip
    (folder / "varctl-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder / "varctl-tiny-clip.json"))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("varctl-tiny-clip").state_dict(), folder / "clip.pt")
    return "varctl-tiny-clip", str(folder / "clip.pt")


CONF = Path(__file__).resolve().parents[1] / "conf"
TOY = """
defaults:
  - trainer: cpu
  - callbacks: default
  - _self_
run: {{name: toy, root: {root}, version: null}}
seed: 0
ckpt_path: null
model:
  _target_: toy.ToyModule
  resolution: 8
  lr: 0.5
data:
  _target_: toy.ToyData
  batch_size: 4
trainer:
  max_steps: 8
  val_check_interval: 4
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.fixture()
def toy_conf(tmp_path: Path) -> Path:
    """conf/toy.yaml under tmp_path: the toy module and data of tests/toy.py with the real trainer and
    callback groups, runs under tmp_path/runs (test_cli.py, test_faults.py)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF / "trainer", conf / "trainer")
    shutil.copytree(CONF / "callbacks", conf / "callbacks")
    (conf / "toy.yaml").write_text(TOY.format(root=tmp_path / "runs"))
    return conf / "toy.yaml"
