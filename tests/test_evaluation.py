"""Generation quality in `test` (varctl.lit.evaluation), the results file (varctl.callbacks.EvaluationWriter),
a stopped test going on (varctl.callbacks.TestProgress) and tools/evaluate.py. Feature network: the test
judge (random weights, conftest.py): plumbing and values of
the wiring, not quality."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import StopAfter
from PIL import Image

from datamodules.synthetic import SyntheticDataModule, SyntheticShapes
from varctl.callbacks import EvaluationWriter, TestProgress
from varctl.lit.var import VARModule
from varctl.metrics.generation import GenerationMetrics, JudgeFeatures, StaleReference
from varctl.metrics.results import load_results, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_VAR = {"depth": 2, "num_classes": 10, "embed_dim": 64, "num_heads": 2}


def make(tokenizer_file, judge_file, **evaluation):
    ev = {"batches": 2, "networks": ["judge", "inception"], "judge_weights": judge_file, "cfg": 1.0,
          "kid_subsets": 10, "seed": 5, **evaluation}  # fmt: skip
    m = VARModule(tokenizer_file, var=TINY_VAR, evaluation=ev)
    dm = SyntheticDataModule(num_train=16, num_val=24, batch_size=8)
    dm.connect(**m.data_requirements())
    return m, dm


def run_test(m, dm, tmp_path, **kw):
    writer = EvaluationWriter(tmp_path / "eval", {"seed": 0, "model": {}}, None)
    kw = {"limit_test_batches": 3, **kw}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[writer], **kw)  # fmt: skip
    return trainer.test(m, dm, verbose=False)[0], writer.path


def test_test_scores_samples_of_the_test_conditions_and_writes_the_results(
    tokenizer_file, judge_file, tmp_path
):
    torch.manual_seed(0)
    m, dm = make(tokenizer_file, judge_file)
    scores, path = run_test(m, dm, tmp_path)
    assert scores["test/num_generated_judge"] == 16 and scores["test/num_real_judge"] == 16  # 2 batches of 8
    # the same numbers by hand: a sample per image of the first two test batches, seeded per batch
    judge = JudgeFeatures(judge_file)
    by_hand = GenerationMetrics(judge, kid_subsets=10, seed=5)
    loader = dm.test_dataloader()
    for i, batch in zip(range(2), loader):
        by_hand.update(batch["image"].add(1).mul(0.5), real=True)
        by_hand.update(m.generate(batch["label"], m.evaluation, seed_offset=i).clamp(0, 1), real=False)
    expected = by_hand.compute()
    for key in ("fd_judge", "kd_judge", "is_judge", "precision_judge", "recall_judge"):
        assert scores[f"test/{key}"] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert scores["test/fd_judge"] > 0 and "test/loss" in scores
    record = json.loads(path.read_text())
    assert record["metrics"]["test/fd_judge"] == pytest.approx(scores["test/fd_judge"], rel=1e-6)
    prov = record["provenance"]
    ev = prov["evaluation"]
    assert ev["networks"]["judge"]["sha256"] == judge.weights_sha256
    assert any("inception metrics skipped" in s and "inception_weights" in s for s in ev["skipped"])
    assert prov["sampling"]["cfg_per_scale"] == [0.0, 0.5, 1.0] and prov["sampling"]["seed"] == 5
    assert prov["test_batches"] == [3] and prov["versions"]["torch"] == torch.__version__
    assert ev["metric_settings"][0]["kid_subsets"] == 10


def test_reference_statistics_are_cached_and_checked_in_test(tokenizer_file, judge_file, tmp_path):
    torch.manual_seed(0)
    cache = str(tmp_path / "ref.safetensors")  # one file per network: ref.judge.safetensors
    m, dm = make(tokenizer_file, judge_file, reference_stats=cache)
    first, _ = run_test(m, dm, tmp_path)
    assert (tmp_path / "ref.judge.safetensors").exists()
    again, path = run_test(m, dm, tmp_path)
    assert again["test/fd_judge"] == pytest.approx(first["test/fd_judge"], rel=1e-6)
    ref = json.loads(path.read_text())["provenance"]["evaluation"]["reference_stats"]["judge"]
    assert ref["how"] == "cached" and ref["num_images"] == 16
    # other test images (another data seed): the cache is refused, naming the field
    m2, dm2 = make(tokenizer_file, judge_file, reference_stats=cache)
    dm2.hparams["seed"] = 7
    with pytest.raises(StaleReference, match="source_fingerprint"):
        run_test(m2, dm2, tmp_path)
    # a run cut short by limit_test_batches caches the images it scored (8), which a full run refuses
    short = str(tmp_path / "short.safetensors")
    m3, dm3 = make(tokenizer_file, judge_file, reference_stats=short)
    _, path = run_test(m3, dm3, tmp_path, limit_test_batches=1)
    refs = json.loads(path.read_text())["provenance"]["evaluation"]["reference_stats"]
    assert refs["judge"]["num_images"] == 8
    m4, dm4 = make(tokenizer_file, judge_file, reference_stats=short)
    with pytest.raises(StaleReference):
        run_test(m4, dm4, tmp_path)


def test_no_network_weights_means_no_sampling_in_test(tokenizer_file, tmp_path):
    m, dm = make(tokenizer_file, None)
    scores, path = run_test(m, dm, tmp_path)
    assert not any("judge" in k or "fid" in k for k in scores) and "test/loss" in scores
    assert json.loads(path.read_text())["provenance"]["evaluation"] is None


def write_pngs(folder: Path, images: torch.Tensor, names=None) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{names[i] if names else i:03}.png")


def test_evaluate_tool_scores_folders_caches_the_reference_and_tabulates(judge_file, tmp_path, capsys):
    data = SyntheticShapes(24, 32, controls=())
    real = torch.stack([data[i]["image"] for i in range(24)]).add(1).mul(0.5)
    write_pngs(tmp_path / "run" / "ref", real)
    write_pngs(tmp_path / "run" / "same", real)
    write_pngs(tmp_path / "run" / "noisy", (real + 0.2 * torch.randn(real.shape)).clamp(0, 1))
    common = ["--judge-weights", judge_file, "--kid-subsets", "5"]
    cache = str(tmp_path / "ref_{network}.safetensors")
    same = evaluate.main([str(tmp_path / "run/same"), str(tmp_path / "run/ref"), *common, "--paired",
                          "--reference-stats", cache])  # fmt: skip
    assert abs(same["fd_judge"]) < 1e-4 and same["paired/psnr"] > 80  # PSNR of identical images: inf, capped
    # identical images: F1 1 for every image with edges, 0 (the protocols' value) for one without
    import kornia

    with_edges = [bool(kornia.filters.canny(x[None], 0.1, 0.2)[1].any()) for x in real]
    assert same["paired/edges_f1"] == 1.0
    assert same["paired/edges_f1_controlnetpp"] == pytest.approx(sum(with_edges) / len(real), abs=1e-6)
    noisy = evaluate.main([str(tmp_path / "run/noisy"), "--reference-stats", cache, *common])
    assert noisy["fd_judge"] > 100 * max(abs(same["fd_judge"]), 1e-6)
    results = load_results(tmp_path / "run" / "eval")
    assert len(results) == 2 and results[1][1]["provenance"]["reference_stats"]["judge"]["how"] == "cached"
    # a changed reference folder: the cache is refused
    (tmp_path / "run/ref/000.png").write_bytes((tmp_path / "run/ref/001.png").read_bytes())
    with pytest.raises(SystemExit, match="source_fingerprint.*Recompute it .*--refresh-reference"):
        evaluate.main(
            [str(tmp_path / "run/same"), str(tmp_path / "run/ref"), *common, "--reference-stats", cache]
        )
    missing = str(tmp_path / "pt_inception.pth")  # a weights file that is not there: named, no traceback
    with pytest.raises(SystemExit, match=r"\[evaluate\] .*pt_inception\.pth"):
        evaluate.main([str(tmp_path / "run/same"), str(tmp_path / "run/ref"), "--inception-weights", missing])
    capsys.readouterr()
    evaluate.main(["--table", str(tmp_path)])
    out = capsys.readouterr().out
    assert "fd_judge" in out and out.count("run/evaluate") == 2 and "paired/psnr" in out
    assert table([]) == "(no results files)"
    listed = tmp_path / "ref.txt"  # the reference as a list of files (000.png now a copy of 001.png)
    listed.write_text("".join(f"run/ref/{i:03d}.png\n" for i in range(24)))
    from_list = evaluate.main([str(tmp_path / "run/noisy"), str(listed), *common])
    from_folder = evaluate.main([str(tmp_path / "run/noisy"), str(tmp_path / "run/ref"), *common])
    assert from_list["fd_judge"] == pytest.approx(from_folder["fd_judge"], rel=1e-6)


def test_a_text_model_gets_the_clip_score_of_its_test_captions(tokenizer_file, tiny_clip, tmp_path):
    torch.manual_seed(0)
    name, weights = tiny_clip
    text = {"name": "ViT-B-32", "pretrained": None, "model_cfg": {"embed_dim": 32, "text_cfg": {
        "width": 32, "heads": 2, "layers": 1, "context_length": 24}}}  # fmt: skip
    ev = {"batches": 1, "networks": [], "clip_model": name, "clip_weights": weights, "cfg": 1.0}
    m = VARModule(tokenizer_file, var=TINY_VAR, text_encoder=text, evaluation=ev)
    dm = SyntheticDataModule(num_train=16, num_val=8, batch_size=8)
    dm.connect(**m.data_requirements())
    scores, path = run_test(m, dm, tmp_path)
    assert 0 <= scores["test/clip_score"] <= 100
    record = json.loads(path.read_text())
    assert record["provenance"]["evaluation"]["networks"]["clip"]["network"] == f"open_clip:{name}"


def test_the_reference_fingerprint_follows_the_test_files(tmp_path):
    """A datamodule that reads files is fingerprinted by its test files (names relative to their common
    folder, sizes, times): an edited image changes it, and so does another number of images."""
    from types import SimpleNamespace

    from varctl.lit.evaluation import split_fingerprint

    def datamodule(root: Path):
        records = [SimpleNamespace(image=str(p)) for p in sorted(root.rglob("*.png"))]
        split = SimpleNamespace(records=records)
        return SimpleNamespace(hparams={"root": str(root)}, dataset=lambda name: split)

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "data" / cls / f"{i}.png").write_bytes(bytes([i]) * 10)
    source, first = split_fingerprint(datamodule(tmp_path / "data"), "test", 4)
    assert "4 files" in source
    (tmp_path / "data" / "b" / "1.png").write_bytes(b"changed")
    assert split_fingerprint(datamodule(tmp_path / "data"), "test", 4)[1] != first
    assert split_fingerprint(datamodule(tmp_path / "data"), "test", 3)[1] != first  # fewer images
    # the settings that change pixels count; the order only where it is asked for (a token cache)
    data = datamodule(tmp_path / "data")
    now = split_fingerprint(data, "test", 4)[1]
    data.hparams["crop"] = "none"
    assert split_fingerprint(data, "test", 4)[1] != now
    data.hparams["crop"] = None
    shuffled = datamodule(tmp_path / "data")
    split = shuffled.dataset("test")
    split.records.reverse()
    assert split_fingerprint(shuffled, "test", 4)[1] == split_fingerprint(data, "test", 4)[1]
    assert split_fingerprint(shuffled, "test", 4, True)[1] != split_fingerprint(data, "test", 4, True)[1]


def test_rows_of_keeps_the_rows_of_tensors_lists_dicts_and_tuples():
    from varctl.lit.evaluation import rows_of

    keep = torch.tensor([True, False, True])
    x = torch.arange(6).view(3, 2)
    assert rows_of(x, None) is x
    assert rows_of(x, keep).tolist() == [[0, 1], [4, 5]]
    assert rows_of(["a", "b", "c"], keep) == ["a", "c"]
    loss, maps = rows_of((x, {"edges": x + 1}), keep)  # token_losses' pair; a batch's control maps
    assert loss.tolist() == [[0, 1], [4, 5]] and maps["edges"].tolist() == [[1, 2], [5, 6]]
    assert rows_of(None, keep) is None and rows_of(x, torch.zeros(3, dtype=torch.bool)).shape == (0, 2)


def test_a_stopped_test_goes_on_where_it_stopped_with_the_scores_of_an_uninterrupted_one(
    tokenizer_file, judge_file, tmp_path, capsys
):
    """TestProgress keeps every metric state (teacher-forcing losses, the generated and real features) each
    batch; a test stopped after its second batch and run again samples the third batch alone and logs the
    scores of the uninterrupted test (from its first batch when the newest save is lost); progress of
    other weights is discarded."""
    torch.manual_seed(0)
    m, dm = make(tokenizer_file, judge_file, batches=3)
    fresh = [copy.deepcopy(m) for _ in range(3)]
    whole, _ = run_test(m, dm, tmp_path)
    directory, config = tmp_path / "progress", {"model": {"x": 1}, "data": {"num_workers": 3}}

    def test(module, *callbacks):
        calls = []
        generate = module.generate
        module.generate = lambda *a, **k: calls.append(a) or generate(*a, **k)
        progress = TestProgress(directory, config, every_s=0)  # after every batch
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_test_batches=3,
                            callbacks=[progress, *callbacks])  # fmt: skip
        return trainer.test(module, dm, verbose=False)[0], len(calls)

    for lost_newest in (False, True):  # a kill between two processes' saves: the one before goes on
        with pytest.raises(RuntimeError, match="killed"):
            test(copy.deepcopy(fresh[0]), StopAfter(1))
        files = sorted(directory.iterdir())
        assert [p.name.split(".", 1)[1] for p in files] == ["rank0.previous.pt", "rank0.pt"]
        if lost_newest:
            files[1].unlink()
        config["data"]["num_workers"] = 0  # loading settings change no score
        scores, sampled = test(copy.deepcopy(fresh[1]))
        done = 1 if lost_newest else 2
        assert sampled == 3 - done and f"going on after {done} test batches" in capsys.readouterr().out
        assert scores.keys() == whole.keys() and scores["test/num_generated_judge"] == 24
        for key, value in whole.items():
            assert scores[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert list(directory.iterdir()) == []  # removed when the test ended

    with pytest.raises(RuntimeError, match="killed"):
        test(fresh[0], StopAfter(1))
    with torch.no_grad():
        fresh[2].model.head.weight.mul_(2)  # other weights: the kept progress is not theirs
    scores, sampled = test(fresh[2])
    assert sampled == 3 and "made with other weights or settings: discarded" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="killed"):
        test(copy.deepcopy(fresh[0]), StopAfter(1))
    for file in directory.iterdir():  # cut short (a full disk, a copy): named as unreadable, not as stale
        file.write_bytes(file.read_bytes()[:100])
    scores, sampled = test(copy.deepcopy(fresh[0]))
    printed = capsys.readouterr().out
    assert sampled == 3 and printed.count("cannot be read (is damaged or not a test progress file (") == 2
    assert scores["test/loss"] != pytest.approx(whole["test/loss"], rel=1e-6)  # its own, from batch 0


def test_a_weights_file_of_another_kind_stops_the_test_before_it_starts(tokenizer_file, judge_file, tmp_path,
                                                                        capsys):  # fmt: skip
    """A checkpoint given as the judge, or the judge as the FID Inception: one line naming the setting and
    why, before the run directory (it was a traceback at the first test batch; the Inception's message held
    torch's whole list of missing keys, 25 KB)."""
    from varctl.cli import main

    runs, conf = tmp_path / "runs", Path(__file__).parents[1] / "conf" / "var.yaml"
    base = [
        "test",
        "-c",
        str(conf),
        f"model.tokenizer={tokenizer_file}",
        "model.var.depth=1",
        f"run.root={runs}",
    ]
    judge, inception = "model.evaluation.judge_weights", "model.evaluation.inception_weights"
    cases = {
        f"{judge}={tokenizer_file}": "not a varctl class judge (no 'num_classes' entry)",
        f"{inception}={judge_file}": "not the FID Inception-v3 weights (Missing key(s) in state_dict: ",
    }
    for override, message in cases.items():
        message = f"{override}: {message}"
        assert main([*base, override]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in last and len(last) < 600, last
    assert not runs.exists()
