"""Fault injection: diverged runs, kills during a save, SIGTERM, damaged checkpoints and bad starts. Each case
is produced for real (NaN losses, SIGKILL of a saving process with TMPDIR on another filesystem, truncated
files) and the outcome is checked: what the run says, its exit status, and what is left on disk."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from forked import Forked, varctl
from test_cli import ROOT

from varctl.checkpoints import NonFiniteError, check_checkpoint
from varctl.cli import main
from varctl.files import writer_id

EVERY_2 = ["callbacks.checkpoint.every_n_train_steps=2", "callbacks.images=null"]


def _ckpts(toy_conf: Path) -> Path:
    (run_dir,) = (toy_conf.parent.parent / "runs" / "toy").iterdir()
    return run_dir / "checkpoints"


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _cli(*args: str, env: dict | None = None) -> Forked:
    """``python -m varctl *args`` as a process of its own (forked from a server that did the imports)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "HF_HUB_OFFLINE": "1", **(env or {})}
    return varctl(*args, env=env, cwd=ROOT)


# --- 1. divergence --------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_naming_the_step_and_terms(toy_conf, capsys):
    assert main(["fit", "-c", str(toy_conf), "+model.nan_steps=[3]", *EVERY_2]) == 1
    err = capsys.readouterr().err
    assert "training diverged: non-finite loss (mse) at step 3: mse=nan" in err
    assert "callbacks.nonfinite.action=skip" in err
    last = _load(_ckpts(toy_conf) / "last.ckpt")
    assert last["global_step"] == 2 and torch.isfinite(last["state_dict"]["scale"]).all()


def test_skip_drops_the_update_of_a_nan_step_and_counts_it(toy_conf, capsys):
    # 3 steps with the third skipped leave the weights of 2 clean steps (SGD, same batches)
    args = ["fit", "-c", str(toy_conf), "callbacks.nonfinite.action=skip", "callbacks.images=null"]
    assert main([*args, "+model.nan_steps=[3]", "trainer.max_steps=3", "run.version=skipped"]) == 0
    assert "varctl: skipped step 3: non-finite loss (mse) at step 3" in capsys.readouterr().out
    assert main([*args, "trainer.max_steps=2", "run.version=clean"]) == 0
    runs = toy_conf.parent.parent / "runs" / "toy"
    skipped = _load(runs / "skipped" / "checkpoints" / "last.ckpt")
    clean = _load(runs / "clean" / "checkpoints" / "last.ckpt")
    assert skipped["global_step"] == 3 and clean["global_step"] == 2
    assert skipped["state_dict"]["scale"].item() != 0  # it trained before the skip
    assert torch.equal(skipped["state_dict"]["scale"], clean["state_dict"]["scale"])
    (guard,) = [v for k, v in skipped["callbacks"].items() if k.startswith("NonFiniteGuard")]
    assert guard == {"skipped": 1, "consecutive": 1}


def test_skipping_stops_after_max_consecutive_skips(toy_conf, capsys):
    args = ["callbacks.nonfinite.action=skip", "callbacks.nonfinite.max_consecutive=2", *EVERY_2]
    assert main(["fit", "-c", str(toy_conf), "+model.nan_steps=[2,4,5,6]", *args]) == 1
    captured = capsys.readouterr()
    assert "skipped step 2" in captured.out and "skipped step 4" in captured.out
    assert "at step 5: mse=nan (2 steps in a row skipped, callbacks.nonfinite.max_consecutive)" in (
        captured.err
    )


def test_nonfinite_weights_never_replace_a_good_last_checkpoint(toy_conf, capsys):
    """With the guard off, weights made NaN after step 4 reach the save at step 6: it is refused."""
    args = ["+model.poison_after=4", "callbacks.nonfinite=null", *EVERY_2]
    assert main(["fit", "-c", str(toy_conf), *args]) == 1
    assert "weights at step 6 are not finite (scale)" in capsys.readouterr().err
    ckpts = _ckpts(toy_conf)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    last = _load(ckpts / "last.ckpt")
    assert last["global_step"] == 4 and torch.isfinite(last["state_dict"]["scale"]).all()


def test_the_tokenizer_stage_diverging_at_an_absurd_learning_rate_stops(tmp_path, capsys):
    args = [f"run.root={tmp_path}", "model.vqvae.preset=tiny", "model.optimizer.lr=1e12",
            "model.optimizer.warmup_steps=0", "model.gradient_clip_val=null", "data.batch_size=2",
            "trainer.max_steps=6", "trainer.limit_val_batches=0", "callbacks.images=null",
            "trainer.enable_progress_bar=false"]  # fmt: skip
    assert main(["fit", "-c", str(ROOT / "conf" / "tokenizer.yaml"), *args]) == 1
    err = capsys.readouterr().err
    assert "training diverged: non-finite loss" in err and "nll=" in err and "vq_loss=" in err
    assert not list(tmp_path.glob("tokenizer/*/checkpoints/*.ckpt"))  # nothing diverged was written


def test_sampling_on_nonfinite_logits_names_the_cause(var):
    """The tiny official VAR (conftest): a NaN weight is named; finite weights point at the inputs."""
    broken = copy.deepcopy(var)
    with torch.no_grad():
        broken.blocks[1].ffn.fc2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"logits at scale 0 \(1x1\) .* weights are not finite \(blocks"):
        broken.generate(torch.tensor([1, 2]), top_k=1, seed=0)
    with pytest.raises(NonFiniteError, match="with finite weights: check the conditions"):
        var.generate(torch.tensor([1, 2]), cfg=float("inf"), top_k=1, seed=0)


# --- 2. kills during a save, SIGTERM, damaged checkpoints ---------------------------------------------------
def test_sigkill_during_a_save_keeps_the_old_checkpoint_and_no_orphan_in_tmpdir(toy_conf, tmp_path):
    tmpdir = Path("/dev/shm") / f"varctl-{os.getpid()}" if Path("/dev/shm").is_dir() else tmp_path / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)  # /dev/shm: a tmpfs, another filesystem than the run's
    try:
        big = ["+model.big=40000000", "callbacks.checkpoint.every_n_train_steps=1", "callbacks.images=null",
               "trainer.max_steps=50", "trainer.val_check_interval=1000",
               "callbacks.checkpoint.save_top_k=0"]  # fmt: skip
        proc = _cli("fit", "-c", str(toy_conf), *big, env={"TMPDIR": str(tmpdir)})
        runs = toy_conf.parent.parent / "runs" / "toy"
        deadline, last, temp = time.time() + 120, None, []
        while time.time() < deadline and proc.poll() is None:
            found = list(runs.glob("*/checkpoints/last.ckpt"))
            if found and check_ok(found[0]):
                last = found[0]
                temp = list(last.parent.glob(".last.ckpt.*.tmp"))
                if temp:  # the next save is under way
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
        proc.wait(30)
        assert temp, f"no save was caught in progress: {proc.stderr.read()[-2000:]}"
        saved = _load(last)
        assert saved["global_step"] >= 1 and saved["state_dict"]["ballast"].numel() == 40_000_000
        assert not list(tmpdir.iterdir())  # nothing was written outside the run directory
        # the resume removes the killed save's temporary file and continues from the old checkpoint
        assert main(["fit", "-c", str(toy_conf), f"ckpt_path={last}", "+model.big=40000000",
                     *big[1:4], f"trainer.max_steps={saved['global_step'] + 1}"]) == 0  # fmt: skip
        assert not list(last.parent.glob(".*.tmp"))
        assert _load(last)["global_step"] == saved["global_step"] + 1
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_only_a_resumed_fit_removes_temporaries_and_never_those_of_a_live_writer(toy_conf):
    """validate/test/predict on a run still training must not delete the file of its save in progress; a
    resumed fit removes a dead writer's file and an unnamed one untouched for 10 minutes, nothing else."""
    assert main(["fit", "-c", str(toy_conf), *EVERY_2]) == 0
    ckpts = _ckpts(toy_conf)
    host = writer_id().split("@", 1)[1]
    live = subprocess.Popen(["sleep", "60"])  # another training still writing here
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {
        "live": f".last.ckpt.{live.pid}@{host}.abc.tmp",
        "dead": f".last.ckpt.{dead.pid}@{host}.abc.tmp",
        "fresh": ".step0000010.ckpt.xyz.tmp",
        "old": ".last.ckpt.xyz.tmp",
        "other": ".notes.txt.xyz.tmp",
    }
    try:
        for name in names.values():
            (ckpts / name).write_bytes(b"partial")
        for name in ("old", "other"):
            os.utime(ckpts / names[name], (time.time() - 3600,) * 2)
        for command in ("validate", "test", "predict"):
            assert main([command, "-c", str(toy_conf), f"ckpt_path={ckpts / 'last.ckpt'}"]) == 0
            assert sorted(p.name for p in ckpts.glob(".*.tmp")) == sorted(names.values()), command
        assert main(["fit", "-c", str(toy_conf), f"ckpt_path={ckpts / 'last.ckpt'}", "trainer.max_steps=9",
                     "callbacks.images=null"]) == 0  # fmt: skip
        kept = sorted(names[k] for k in ("live", "fresh", "other"))
        assert sorted(p.name for p in ckpts.glob(".*.tmp")) == kept
    finally:
        live.kill()
        live.wait()


def check_ok(path: Path) -> bool:
    try:
        check_checkpoint(path)
        return True
    except (ValueError, OSError):
        return False


def test_sigterm_writes_last_checkpoint_before_exit(toy_conf):
    args = ["+model.sigterm_at=5", "callbacks.checkpoint.every_n_train_steps=100", "callbacks.images=null",
            "trainer.max_steps=50"]  # fmt: skip
    proc = _cli("fit", "-c", str(toy_conf), *args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # a preempted run does not report success (128 + SIGTERM)
    assert "varctl: SIGTERM at step 5: saved" in out, err[-2000:]
    assert f"varctl: stopped by SIGTERM; resume: ckpt_path={_ckpts(toy_conf) / 'last.ckpt'}" in err
    last = _load(_ckpts(toy_conf) / "last.ckpt")
    assert last["global_step"] == 5
    (state,) = [v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert state["last_model_path"] == str(_ckpts(toy_conf) / "last.ckpt")
    # preempted before the first periodic save: the resume continues in last.ckpt, not in last-v1.ckpt (even
    # with Lightning's version counter on, since the preemption's save recorded itself as the last one)
    counter_on = "callbacks.checkpoint.enable_version_counter=true"
    resume = [f"ckpt_path={_ckpts(toy_conf) / 'last.ckpt'}", "trainer.max_steps=8", *args[1:3], counter_on]
    assert main(["fit", "-c", str(toy_conf), *resume]) == 0
    assert sorted(p.name for p in _ckpts(toy_conf).iterdir()) == ["last.ckpt"]
    assert _load(_ckpts(toy_conf) / "last.ckpt")["global_step"] == 8


def test_sigterm_without_checkpoints_says_that_nothing_was_saved(toy_conf):
    """callbacks.checkpoint=null: the preempted run writes nothing and says so, instead of naming a resume
    file that does not exist."""
    args = ["+model.sigterm_at=3", "callbacks.checkpoint=null", "callbacks.images=null",
            "trainer.max_steps=50"]  # fmt: skip
    proc = _cli("fit", "-c", str(toy_conf), *args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "varctl: SIGTERM at step 3: not saved (callbacks.checkpoint=null)" in out, err[-2000:]
    assert "varctl: stopped by SIGTERM; no checkpoint was written (none asked for)" in err
    assert not list((toy_conf.parent.parent / "runs").rglob("*.ckpt"))


def test_sigterm_stops_predict_before_its_next_batch(toy_conf):
    """Lightning's SIGTERM handler let predict run to its last batch; the job now stops after the batch in
    progress, whose images are written, and exits with 143."""
    assert main(["fit", "-c", str(toy_conf), "run.version=v", "trainer.max_steps=2"]) == 0
    run = toy_conf.parent.parent / "runs" / "toy" / "v"
    proc = _cli("predict", "-c", str(toy_conf), f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                "+model.sigterm_in_predict=1")  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err[-2000:]
    assert "varctl: stopped by SIGTERM before the next batch; the images written are kept" in err
    assert len(list((run / "predictions").glob("*.png"))) == 8  # batches 0 and 1 of 4 (16 images, 4 a batch)


def test_sigterm_stops_test_after_its_batch_and_the_same_command_goes_on(toy_conf, capsys):
    """Lightning ended a test on SIGTERM after the batch, its scores lost; TestProgress keeps them, and the
    same command goes on from the next batch to the results of the uninterrupted test."""
    assert main(["fit", "-c", str(toy_conf), "run.version=v", "trainer.max_steps=2"]) == 0
    ckpt = f"ckpt_path={toy_conf.parent.parent / 'runs' / 'toy' / 'v' / 'checkpoints' / 'last.ckpt'}"
    results = toy_conf.parent.parent / "runs" / "toy" / "v" / "eval" / "test.json"
    assert main(["test", "-c", str(toy_conf), ckpt]) == 0
    whole = json.loads(results.read_text())["metrics"]
    results.unlink()
    proc = _cli("test", "-c", str(toy_conf), ckpt, env={"TOY_SIGTERM_IN_TEST": "1"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err[-2000:]
    assert "varctl test: SIGTERM after test batch 2: the scores so far are in" in out, out
    assert "varctl: stopped by SIGTERM after the batch; the scores so far are kept" in err
    assert not results.exists()
    assert main(["test", "-c", str(toy_conf), ckpt]) == 0
    assert "varctl test: going on after 2 test batches" in capsys.readouterr().out
    resumed = json.loads(results.read_text())["metrics"]
    assert resumed.keys() == whole.keys() and "test/mse" in whole
    assert resumed["test/mse"] == pytest.approx(whole["test/mse"], rel=1e-6)
    assert not list((toy_conf.parent.parent / "runs" / "toy" / "test_progress").iterdir())


def test_test_progress_is_a_setting(toy_conf, capsys):
    """callbacks.test_progress: every_s sets how often a test's progress is kept (0: after every batch, which
    makes its folder), null keeps none (no such callback in the test), and a negative interval is refused
    naming the setting."""
    from varctl.callbacks import TestProgress
    from varctl.cli import run
    from varctl.cli.config import compose, validate

    assert main(["fit", "-c", str(toy_conf), "run.version=v", "trainer.max_steps=2"]) == 0
    ckpt = f"ckpt_path={toy_conf.parent.parent / 'runs' / 'toy' / 'v' / 'checkpoints' / 'last.ckpt'}"
    progress = toy_conf.parent.parent / "runs" / "toy" / "test_progress"

    def kept(*overrides: str) -> list[TestProgress]:
        trainer = run("test", validate(compose(toy_conf, [ckpt, *overrides]), toy_conf), toy_conf)
        return [c for c in trainer.callbacks if isinstance(c, TestProgress)]

    assert kept("callbacks.test_progress=null") == [] and not progress.exists()
    (every,) = kept("callbacks.test_progress.every_s=0")
    assert every.every_s == 0 and every.directory.resolve() == progress.resolve()
    assert progress.is_dir() and not list(progress.iterdir())  # saved on the way, removed at the end
    assert main(["test", "-c", str(toy_conf), ckpt, "callbacks.test_progress.every_s=-1"]) != 0
    assert "callbacks.test_progress: every_s: seconds between two saves" in capsys.readouterr().err


@pytest.mark.parametrize("interval", [2, 4])  # validation mid-epoch, and at the end of the epoch
def test_sigterm_during_validation_is_saved_so_that_the_resumed_run_validates_again(
    toy_conf, capfd, interval
):
    """A SIGTERM in the first of four validation batches: the run saves and stops there, and the resumed run
    repeats that validation whole before training on (Lightning's resume took it for finished: the point
    was lost), and ends at the uninterrupted run's step (and weights, resumed at an epoch's end)."""
    args = [f"trainer.val_check_interval={interval}", "callbacks.checkpoint.every_n_train_steps=100",
            "callbacks.images=null", "trainer.max_steps=8"]  # fmt: skip
    assert main(["fit", "-c", str(toy_conf), *args, "run.version=whole"]) == 0
    whole_validations = re.findall(r"\[toy\] validation batch (\d) at step (\d)", capfd.readouterr().out)
    proc = _cli(
        "fit", "-c", str(toy_conf), *args, "run.version=term", f"+model.sigterm_in_validation={interval}"
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert f"varctl: SIGTERM at step {interval}: saved" in out
    last = toy_conf.parent.parent / "runs" / "toy" / "term" / "checkpoints" / "last.ckpt"
    assert main(["fit", "-c", str(toy_conf), *args, f"ckpt_path={last}"]) == 0
    resumed = re.findall(r"\[toy\] validation batch (\d) at step (\d)", capfd.readouterr().out)
    steps = range(interval, 9, interval)
    assert whole_validations == [(str(b), str(s)) for s in steps for b in range(4)]
    assert resumed == whole_validations  # the interrupted validation again, whole, then the later ones
    whole = _load(toy_conf.parent.parent / "runs" / "toy" / "whole" / "checkpoints" / "last.ckpt")
    assert _load(last)["global_step"] == whole["global_step"] == 8
    if interval == 4:  # the toy's plain loader has no mid-epoch state (the datamodules' loaders have)
        assert torch.equal(_load(last)["state_dict"]["scale"], whole["state_dict"]["scale"])


def test_sigterm_during_gradient_accumulation_stops_at_the_end_of_the_window(toy_conf):
    """SIGTERM in the first of step 2's two micro-batches: the run finishes that step, saves and stops, so
    the resumed run ends with the uninterrupted run's weights (a save between the micro-batches lost the
    first one's gradient and the resumed run took step 2 on the second alone). Step 2 ends the toy's epoch
    of 4 batches, where a save after Lightning's stop did not resume exactly either."""
    args = ["+trainer.accumulate_grad_batches=2", "callbacks.checkpoint.every_n_train_steps=100",
            "callbacks.images=null", "trainer.max_steps=4", "trainer.limit_val_batches=0"]  # fmt: skip
    assert main(["fit", "-c", str(toy_conf), *args, "run.version=whole"]) == 0
    proc = _cli("fit", "-c", str(toy_conf), *args, "run.version=term", "+model.sigterm_at=2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "varctl: SIGTERM during gradient accumulation: stopping after step 2" in out
    runs = toy_conf.parent.parent / "runs" / "toy"
    last = runs / "term" / "checkpoints" / "last.ckpt"
    saved = _load(last)
    assert saved["global_step"] == 2
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 4
    assert main(["fit", "-c", str(toy_conf), *args, f"ckpt_path={last}"]) == 0
    whole, resumed = _load(runs / "whole" / "checkpoints" / "last.ckpt"), _load(last)
    assert whole["global_step"] == resumed["global_step"] == 4
    assert torch.equal(whole["state_dict"]["scale"], resumed["state_dict"]["scale"])


def test_a_moved_run_resumes_into_its_own_last_checkpoint(toy_conf, tmp_path):
    """A run directory moved (or copied elsewhere) and resumed overwrites its last.ckpt: Lightning's version
    counter would write last-v1.ckpt and leave last.ckpt, what ``auto`` and the README point at, stale."""
    assert main(["fit", "-c", str(toy_conf), *EVERY_2]) == 0
    moved = tmp_path / "moved" / "toy" / "r1"
    moved.parent.mkdir(parents=True)
    shutil.move(_ckpts(toy_conf).parent, moved)
    assert main(["fit", "-c", str(toy_conf), *EVERY_2, f"ckpt_path={moved / 'checkpoints' / 'last.ckpt'}",
                 "trainer.max_steps=12"]) == 0  # fmt: skip
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert names == ["last.ckpt", *(f"step{s:07d}.ckpt" for s in (2, 4, 6, 8, 10, 12))]
    assert _load(moved / "checkpoints" / "last.ckpt")["global_step"] == 12


@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "pickle", "directory"])
def test_a_damaged_checkpoint_is_named_with_the_previous_good_one(toy_conf, capsys, damage):
    assert main(["fit", "-c", str(toy_conf), *EVERY_2]) == 0
    ckpts = _ckpts(toy_conf)
    last = ckpts / "last.ckpt"
    if damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "text":
        last.write_text("not a checkpoint\n")
    elif damage == "pickle":  # a payload that would run code: refused unread
        last.write_bytes(pickle.dumps(_Payload()))
    else:
        last.unlink()
        last.mkdir()
    before = sorted(p.name for p in ckpts.parent.iterdir())
    capsys.readouterr()
    assert main(["fit", "-c", str(toy_conf), f"ckpt_path={last}", "trainer.max_steps=12"]) == 2
    err = capsys.readouterr().err
    assert f"varctl: config error: {toy_conf}: ckpt_path: checkpoint {last} " in err
    expected = {"empty": "is empty (0 bytes)", "truncated": "is damaged or not a checkpoint",
                "text": "is damaged or not a checkpoint", "pickle": "refused unread",
                "directory": "is a directory, expected a checkpoint file"}[damage]  # fmt: skip
    assert expected in err
    assert f"the newest good one there is {ckpts / 'step0000008.ckpt'}" in err
    assert not Path("/tmp/varctl-payload-ran").exists()
    assert sorted(p.name for p in ckpts.parent.iterdir()) == before  # nothing written for a failed start


@pytest.mark.parametrize("damage", ["empty", "truncated", "hello", "text", "pickle", "directory"])
def test_a_model_file_that_is_not_one_is_refused_with_the_reason_in_words(tokenizer_file, tmp_path, capsys,
                                                                         damage):  # fmt: skip
    """model.tokenizer (or init_from) naming a file that is not a model file: one line saying why, as for
    ckpt_path. It was torch's advice to load it with weights_only=False (a pickle, or a text file), an empty
    reason, or ': 101' (a KeyError of the byte 'e' of a file reading "hello")."""
    bad = tmp_path / "files" / "vae.pt"
    bad.parent.mkdir()
    good = Path(tokenizer_file).read_bytes()
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "hello":
        bad.write_text("hello\n")
    elif damage == "text":
        bad.write_text("# my tokenizer\nsee the README\n")
    elif damage == "pickle":
        bad.write_bytes(pickle.dumps(_Payload()))
    else:
        bad.mkdir()
    runs = tmp_path / "runs"
    args = ["fit", "-c", str(ROOT / "conf" / "var.yaml"), f"model.tokenizer={bad}", f"run.root={runs}"]
    assert main(args) == 2
    reason = {
        "empty": "is empty (0 bytes): the save or copy that wrote it was interrupted",
        "truncated": "is damaged or not a model file or checkpoint (a torch archive cut short or corrupted: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory)",
        "hello": "is damaged or not a model file or checkpoint (neither a torch.save archive nor a pickle)",
        "text": "is damaged or not a model file or checkpoint (neither a torch.save archive nor a pickle)",
        "pickle": "is a pickle of objects other than tensors and plain values, refused unread (loading it "
        "could run code)",
        "directory": "is a directory, expected a model file or checkpoint",
    }[damage]
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"varctl: config error: {args[2]}: model: {bad} {reason}", err
    assert "weights_only" not in err and not Path("/tmp/varctl-payload-ran").exists()
    assert not runs.exists()  # nothing written


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/varctl-payload-ran",))


# --- 6. bad starts: one line, exit 2, nothing written ----------------------------------------------------
def test_bad_run_roots_are_config_errors(toy_conf, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["fit", "-c", str(toy_conf), f"run.root={a_file}/runs"]) == 2
    assert f"run.root = '{a_file}/runs': {a_file} is a file, expected a directory" in capsys.readouterr().err
    if Path("/proc").is_dir():  # not writable even by root
        assert main(["fit", "-c", str(toy_conf), "run.root=/proc/varctl-runs"]) == 2
        assert "run.root = '/proc/varctl-runs': cannot write in /proc" in capsys.readouterr().err


def test_resolution_conflict_and_missing_images_are_config_errors(tmp_path, capsys):
    conf = str(ROOT / "conf" / "tokenizer.yaml")
    args = [f"run.root={tmp_path}", "model.vqvae.preset=tiny"]
    assert main(["fit", "-c", conf, *args, "data.resolution=48"]) == 2
    err = capsys.readouterr().err
    assert "varctl: config error:" in err and "data.resolution=48 conflicts with the model" in err
    missing = tmp_path / "nowhere"
    assert main(["fit", "-c", conf, *args, "data=folder", f"data.root={missing}"]) == 2
    err = capsys.readouterr().err
    assert "varctl: config error:" in err and str(missing) in err and "Traceback" not in err
    assert not list(tmp_path.glob("tokenizer/*"))  # no empty run directory


# --- 5. resume reproduces the run ---------------------------------------------------------------------------
def _losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


def tiny_var(tokenizer_file) -> list[str]:
    """conf/var.yaml overrides for a tiny VAR on 24 flipped scenes, 6 batches an epoch, condition dropout,
    every step logged, checkpoints without a top-k."""
    return [f"model.tokenizer={tokenizer_file}", "model.var.depth=2", "+model.var.embed_dim=64",
            "+model.var.num_heads=2", "model.var.cond_drop_rate=0.3", "model.optimizer.warmup_steps=2",
            "data.num_train=24", "data.num_val=4", "data.batch_size=4", "data.flip=0.5",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "callbacks.checkpoint.save_top_k=0"]  # fmt: skip


def test_a_run_killed_mid_epoch_resumes_with_the_same_losses(tokenizer_file, tmp_path):
    """The VAR stage on the built-in scenes, 6 batches an epoch, shuffled, flipped (global RNG, no workers),
    condition dropout: a run SIGKILLed before step 5 (mid-epoch) or step 7 (after the epoch's last batch)
    and resumed from last.ckpt logs, from the first resumed step to the end, exactly the losses of the
    uninterrupted run."""
    conf = str(ROOT / "conf" / "var.yaml")
    args = [*tiny_var(tokenizer_file), "trainer.max_steps=10", "trainer.limit_val_batches=0",
            "callbacks.images=null", "callbacks.checkpoint.every_n_train_steps=1"]  # fmt: skip
    assert main(["fit", "-c", conf, *args, f"run.root={tmp_path}", "run.version=whole"]) == 0
    whole = _losses(tmp_path / "var" / "whole")
    assert len(whole) == 10 and len(set(whole.values())) == 10
    for kill, how in ((5, "sigkill"), (7, "crash")):  # a real kill mid-epoch; a crash in-process (cheaper)
        version = f"killed{kill}"
        kill_args = [f"+callbacks.kill={{_target_: toy.KillAt, step: {kill}, crash: {how == 'crash'}}}",
                     f"run.version={version}", f"run.root={tmp_path}"]  # fmt: skip
        if how == "sigkill":
            proc = _cli("fit", "-c", conf, *args, *kill_args)
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == -signal.SIGKILL, err[-2000:]
        else:
            with pytest.raises(RuntimeError, match="crashed before step 7"):
                main(["fit", "-c", conf, *args, *kill_args])
        last = tmp_path / "var" / version / "checkpoints" / "last.ckpt"
        assert _load(last)["global_step"] == kill - 1
        assert main(["fit", "-c", conf, *args, f"run.root={tmp_path}", f"ckpt_path={last}"]) == 0
        assert _load(last)["global_step"] == 10
        resumed = _losses(tmp_path / "var" / version)
        after = sorted(s for s in whole if s >= kill - 1)
        assert {s: resumed[s] for s in after} == {s: whole[s] for s in after}, kill  # exactly, step by step


@pytest.mark.usefixtures("one_thread")  # conftest.py: tiny convs are far faster on 1 thread
def test_a_run_resumed_at_a_validation_step_repeats_the_uninterrupted_run(tokenizer_file, tmp_path):
    """Every shipped config checkpoints at its validation steps, and the checkpoint is saved before that
    validation runs; the resumed run does not repeat it. Validation (its loader, image grids, and here a
    callback that draws) must leave the global generators as they were, or the resumed run's flips and
    condition dropout differ from the uninterrupted run's."""
    conf = str(ROOT / "conf" / "var.yaml")
    args = [*tiny_var(tokenizer_file), "trainer.max_steps=6", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1", "callbacks.images.every_n_steps=1",
            "callbacks.images.max_images=2", "+callbacks.draws={_target_: toy.DrawsInValidation}",
            f"run.root={tmp_path}", "callbacks.checkpoint.every_n_train_steps=3"]  # fmt: skip
    assert main(["fit", "-c", conf, *args, "run.version=whole"]) == 0
    crash = ["+callbacks.kill={_target_: toy.KillAt, step: 4, crash: true}", "run.version=crashed"]
    with pytest.raises(RuntimeError, match="crashed before step 4"):
        main(["fit", "-c", conf, *args, *crash])
    last = tmp_path / "var" / "crashed" / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 3  # saved at the validation step
    assert main(["fit", "-c", conf, *args, f"ckpt_path={last}"]) == 0
    whole, resumed = _losses(tmp_path / "var" / "whole"), _losses(tmp_path / "var" / "crashed")
    assert len(whole) == 6 and {s: resumed[s] for s in (3, 4, 5)} == {s: whole[s] for s in (3, 4, 5)}
    a, b = _load(tmp_path / "var" / "whole" / "checkpoints" / "last.ckpt"), _load(last)
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_segmentation_ids_beyond_the_model_are_refused_naming_the_files(tmp_path):
    """Checked when the data is scanned (the CLI turns it into a config error before the run), not at the
    first batch that holds such a map."""
    import numpy as np
    from helpers import save, textured

    from datamodules import ControlPairsDataModule, SyntheticDataModule

    for i, name in enumerate(("a", "b", "c")):
        save(tmp_path / "images" / f"{name}.png", textured(i))
        ids = np.full((40, 40), 3, dtype=np.uint8)
        ids[:5, :5] = (7, 20, 19)[i]
        save(tmp_path / "segmentation" / f"{name}.png", ids)
    dm = ControlPairsDataModule(str(tmp_path), controls=["segmentation"], batch_size=1, val_fraction=0.34)
    dm.connect(32, ("image", "control"), num_segments=16)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "2 segmentation map file(s) hold ids the model cannot take, expected ids in [0, 16)" in message
    assert f"{tmp_path / 'segmentation' / 'b.png'} (max id 20)" in message and "a.png" not in message
    assert "Set model.control.num_segments=21" in message
    dm = ControlPairsDataModule(str(tmp_path), controls=["segmentation"], batch_size=1, val_fraction=0.34)
    dm.connect(32, ("image", "control"), num_segments=21)
    dm.setup("fit")  # ids up to 20 fit 21 segments
    assert dm.dataset("train")[0]["control"]["segmentation"].max() <= 20

    scenes = SyntheticDataModule(controls=["segmentation"], num_train=4, num_val=2, batch_size=2)
    with pytest.raises(ValueError, match="set model.control.num_segments=11"):
        scenes.connect(32, ("image", "control"), num_segments=8)


def test_a_sharded_checkpoint_folder_passes_the_resume_check(tmp_path):
    """FSDP with save_distributed_checkpoint=true writes a folder with meta.pt: a checkpoint, not an error."""
    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    torch.save({"global_step": 3}, sharded / "meta.pt")
    check_checkpoint(sharded)
    (sharded / "meta.pt").unlink()
    with pytest.raises(ValueError, match="is a directory, expected a checkpoint file"):
        check_checkpoint(sharded)


@pytest.mark.parametrize("crash_step", [4, 5], ids=["after-an-epoch", "mid-epoch"])
def test_a_run_with_loader_workers_resumes_with_the_same_losses(tokenizer_file, tmp_path, crash_step):
    """Two persistent DataLoader workers, no random crops or flips: a run crashed right after an epoch's last
    batch (before step 4 of 3-batch epochs) or in the middle of one (before step 5) and resumed logs the
    uninterrupted run's losses. (The resumed run's new worker pool draws a base seed the persistent pool did
    not: it has a generator of its own, so the shuffle stays the same.)"""
    conf = str(ROOT / "conf" / "var.yaml")
    args = [f"model.tokenizer={tokenizer_file}", "model.var.depth=2", "+model.var.embed_dim=64",
            "+model.var.num_heads=2", "model.var.cond_drop_rate=0.3", "model.optimizer.warmup_steps=2",
            "data.num_train=12", "data.num_val=4", "data.batch_size=4", "data.num_workers=2",
            "trainer.max_steps=6", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "callbacks.images=null", f"run.root={tmp_path}",
            "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=0"]  # fmt: skip
    assert main(["fit", "-c", conf, *args, "run.version=whole"]) == 0
    whole = _losses(tmp_path / "var" / "whole")
    crash = [
        f"+callbacks.kill={{_target_: toy.KillAt, step: {crash_step}, crash: true}}",
        "run.version=crashed",
    ]
    with pytest.raises(RuntimeError, match=f"crashed before step {crash_step}"):
        main(["fit", "-c", conf, *args, *crash])
    last = tmp_path / "var" / "crashed" / "checkpoints" / "last.ckpt"
    assert main(["fit", "-c", conf, *args, f"ckpt_path={last}"]) == 0
    resumed = _losses(tmp_path / "var" / "crashed")
    after = sorted(s for s in whole if s >= crash_step - 1)
    assert len(after) == 7 - crash_step and {s: resumed[s] for s in after} == {s: whole[s] for s in after}
