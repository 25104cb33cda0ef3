"""The command line: subcommands, overrides, config errors, run directories, resume and predict output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from varctl.cli import main
from varctl.models.var import VAR

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "varctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_help_describes_subcommands_and_overrides():
    out = _cli("--help")
    assert out.returncode == 0
    for word in ("fit", "validate", "test", "predict", "key=value", "+key=value"):
        assert word in out.stdout
    out = _cli("fit", "--help")
    assert out.returncode == 0 and "-c FILE" in out.stdout and "--print-config" in out.stdout
    assert "trainer.max_steps" in out.stdout


def test_misspelled_override_fails_fast_naming_key(toy_conf):
    start = time.perf_counter()
    out = _cli("fit", "-c", str(toy_conf), "trainer.max_step=3")
    elapsed = time.perf_counter() - start
    assert out.returncode == 2
    assert "trainer.max_step" in out.stderr and "Did you mean 'trainer.max_steps'" in out.stderr
    assert str(toy_conf) in out.stderr
    assert elapsed < 10


def test_misspelled_key_in_file_and_wrong_type(toy_conf, capsys):
    text = toy_conf.read_text()
    toy_conf.write_text(text.replace("  lr: 0.5", "  lerning_rate: 0.5"))
    assert main(["fit", "-c", str(toy_conf)]) == 2
    err = capsys.readouterr().err
    assert "unknown argument of toy.ToyModule 'model.lerning_rate'" in err and str(toy_conf) in err
    toy_conf.write_text(text)
    assert main(["fit", "-c", str(toy_conf), "model.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "model.lr = 'fast'" in err and "expected float" in err
    assert main(["fit", "-c", str(toy_conf), "+bogus=1"]) == 2
    assert "unknown top-level key 'bogus'" in capsys.readouterr().err
    assert main(["fit", "-c", str(toy_conf), "data._target_=toy.Nope"]) == 2
    assert "cannot be imported" in capsys.readouterr().err
    assert main(["fit", "-c", str(toy_conf.parent / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["fit", "-c", str(toy_conf), "trainer.max_steps"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_a_file_that_is_not_valid_yaml_is_a_config_error_naming_the_line(toy_conf, capsys):
    """An unclosed list or a tab in the -c file, or in a group file it uses: one message naming the file and
    the line, exit 2 (it was a traceback from PyYAML)."""
    text = toy_conf.read_text()
    toy_conf.write_text(text.replace("  lr: 0.5", "  lr: [0.5"))
    assert main(["fit", "-c", str(toy_conf)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"varctl: config error: -c {toy_conf}: not valid YAML: while parsing a flow"), err
    line = 1 + text.splitlines().index("  lr: 0.5")
    assert f'in "{toy_conf}", line {line}, column' in err and "Traceback" not in err
    toy_conf.write_text(text.replace("  lr: 0.5", "\tlr: 0.5"))
    assert main(["fit", "-c", str(toy_conf)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "found character '\\t' that cannot start any token" in err, err
    group = toy_conf.parent / "extra"
    group.mkdir()
    (group / "broken.yaml").write_text("a: {b: 1\n")
    toy_conf.write_text(text)
    assert main(["fit", "-c", str(toy_conf), "+extra=broken"]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and f'in "{group / "broken.yaml"}", line' in err, err


def test_print_config_applies_overrides(toy_conf, capsys):
    assert (
        main(["fit", "-c", str(toy_conf), "--print-config", "trainer.max_steps=5", "data.batch_size=2"]) == 0
    )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_steps"] == 5 and cfg["data"]["batch_size"] == 2
    assert cfg["trainer"]["_target_"] == "lightning.Trainer" and cfg["model"]["lr"] == 0.5


def test_the_shipped_configs_take_run_version_and_delete_a_key_with_a_tilde(capsys):
    """The README's multi-node lines set run.version (a key of every stage config, no '+'), and its
    override syntax names ~key to delete one (refused as 'not key=value' before)."""
    for conf in ("tokenizer", "var", "var_text", "control", "control_d16"):
        args = ["fit", "-c", str(CONF / f"{conf}.yaml"), "--print-config", "run.version=run1",
                "~callbacks.lr_monitor"]  # fmt: skip
        assert main(args) == 0, conf
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert cfg["run"]["version"] == "run1" and "lr_monitor" not in cfg["callbacks"], conf


def test_fit_resume_and_predict(toy_conf, capsys):
    runs = toy_conf.parent.parent / "runs" / "toy"
    assert main(["fit", "-c", str(toy_conf)]) == 0
    (run_dir,) = runs.iterdir()
    saved = yaml.safe_load((run_dir / "config_fit.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 8
    last = run_dir / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=False)
    assert first["global_step"] == 8
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    assert f"run directory {run_dir}" in capsys.readouterr().out

    # resuming continues the same run directory and step count
    assert main(["fit", "-c", str(toy_conf), f"ckpt_path={last}", "trainer.max_steps=12"]) == 0
    assert [p.name for p in runs.iterdir()] == [run_dir.name]
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 12
    assert (run_dir / "config_fit_1.yaml").is_file() and (run_dir / "config_fit.yaml").is_file()
    assert not torch.equal(resumed["state_dict"]["scale"], first["state_dict"]["scale"])

    # predict writes PNGs with the checkpoint's weights; a second predict never overwrites the first
    for expected in ("predictions", "predictions_1"):
        assert main(["predict", "-c", str(toy_conf), f"ckpt_path={last}"]) == 0
        pngs = sorted((run_dir / expected).glob("*.png"))
        assert len(pngs) == 16
    scale = resumed["state_dict"]["scale"].item()
    img = torch.tensor(list(Image.open(pngs[0]).getdata()), dtype=torch.float32)
    assert 0 <= img.min() and img.max() <= 255
    assert abs(scale) > 0.05  # the checkpoint's weights were used: images are not the constant 0.5 grey
    assert img.std() > 1.0


def test_a_run_without_the_checkpoint_callback_writes_no_checkpoint(toy_conf, capsys):
    """callbacks.checkpoint=null: no file, where Lightning would add its own ModelCheckpoint (a save per
    validation and epoch); trainer.enable_checkpointing=true still asks for Lightning's."""
    runs = toy_conf.parent.parent / "runs" / "toy"
    assert main(["fit", "-c", str(toy_conf), "callbacks.checkpoint=null", "run.version=off"]) == 0
    assert (runs / "off" / "config_fit.yaml").is_file() and not list(runs.rglob("*.ckpt"))
    on = ["callbacks.checkpoint=null", "run.version=on", "+trainer.enable_checkpointing=true"]
    assert main(["fit", "-c", str(toy_conf), *on]) == 0
    assert [p.name for p in runs.rglob("*.ckpt")] == ["epoch=1-step=8.ckpt"]
    # the contrary settings are a config error naming them, not a traceback through Hydra
    assert main(["fit", "-c", str(toy_conf), "+trainer.enable_checkpointing=false", "run.version=x"]) == 2
    err = capsys.readouterr().err
    assert "trainer: Trainer was configured with `enable_checkpointing=False` but found" in err
    assert not (runs / "x").exists()


def test_explicit_existing_version_is_not_overwritten(toy_conf, capsys):
    assert main(["fit", "-c", str(toy_conf), "run.version=v1"]) == 0
    capsys.readouterr()
    assert main(["fit", "-c", str(toy_conf), "run.version=v1"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_missing_checkpoint_is_a_config_error(toy_conf, capsys):
    assert main(["validate", "-c", str(toy_conf), "ckpt_path=/nonexistent/last.ckpt"]) == 2
    assert "ckpt_path" in capsys.readouterr().err


def test_constructor_check_is_a_config_error(tmp_path, capsys):
    """A setting the model itself rejects (here the control stage without a VAR to control) is reported as
    a config error naming the key, not a traceback through Hydra."""
    conf = str(ROOT / "conf" / "control.yaml")
    args = ["model.tokenizer=x.ckpt", "model.init_from=x.pt", "model.train_backbone=banana"]
    assert main(["fit", "-c", conf, *args, f"run.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "model.train_backbone must be true, false" in err
    assert not list(tmp_path.iterdir())  # nothing written for a run that never started


def test_sampling_values_generate_refuses_stop_the_run_before_it_starts(tokenizer_file, tmp_path, capsys):
    """A sampling value that ``generate`` refuses (or a label the VAR lacks) is a config error naming its
    section before anything runs, not a traceback at the first validation or predict step."""
    conf = str(ROOT / "conf" / "var.yaml")
    cases = {
        "model.predict.top_p=2": "model: predict.top_p must be in [0, 1] (0 = off), found 2",
        "model.samples.top_k=[0,0,0,-3]": "model: samples.top_k must be an integer >= 0 (0 = off), found -3",
        "+model.evaluation.temperature=0": "model: evaluation.temperature must be > 0, found 0",
        "+model.predict.token_pruning=1.0": "model: predict.token_pruning: ratio must be in [0, 1)",
        "model.predict.labels=[3,10]": "model: predict.labels holds [10], expected labels in [0, 10)",
        "model.predict.num_per_condition=0": "model: predict.num_per_condition must be >= 1, found 0",
    }
    for override, message in cases.items():
        args = [f"model.tokenizer={tokenizer_file}", override, f"run.root={tmp_path}"]
        assert main(["fit", "-c", conf, *args]) == 2
        err = capsys.readouterr().err
        assert "config error" in err and message in err, (override, err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_model_settings_of_the_wrong_type_or_range_stop_the_run_before_it_starts(tokenizer_file, tmp_path,
                                                                                  capsys):  # fmt: skip
    """A value in model.var, model.control or model.vqvae that does not fit its field (a string for a depth,
    a float for a count) or its range is a config error naming the field: it was a TypeError from deep in
    torch, or, for a drop rate, a crash at the first training step after the run had started. So is a fit of
    trainer.max_steps=0 (it trained nothing and succeeded); a value outside a Literal lists the choices."""
    var_file = VAR.build(dict(depth=1, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 4)))
    var_file = var_file.save(tmp_path / "var.pt")
    conf = {stage: str(ROOT / "conf" / f"{stage}.yaml") for stage in ("tokenizer", "var", "control")}
    before = {"tokenizer": [], "var": [f"model.tokenizer={tokenizer_file}"],
              "control": [f"model.tokenizer={tokenizer_file}", f"model.init_from={var_file}"]}  # fmt: skip
    cases = [
        ("var", "model.var.depth=abc", "VARConfig.depth = 'abc' (str): expected int"),
        ("var", "model.var.depth=4.0", "VARConfig.depth = 4.0 (float): expected int"),
        ("var", "model.var.depth=0", "VARConfig.depth must be at least 1, found 0"),
        ("var", "model.var.cond_drop_rate=x", "VARConfig.cond_drop_rate = 'x' (str): expected float"),
        ("var", "model.var.cond_drop_rate=5", "VARConfig.cond_drop_rate must be in [0, 1], found 5"),
        ("control", "model.control.width=abc", "ControlConfig.width = 'abc' (str): expected int"),
        ("control", "model.control.car_blocks=x", ".car_blocks = 'x' (str): expected int | None"),
        ("control", "+model.control.adapter_dim=0", "ControlConfig.adapter_dim must be at least 1, found 0"),
        ("tokenizer", "+model.vqvae.ch=abc", "VQVAEConfig.ch = 'abc' (str): expected int"),
        ("tokenizer", "+model.vqvae.vocab_size=0", "VQVAEConfig.vocab_size must be at least 1, found 0"),
    ]
    runs = tmp_path / "runs"
    assert main(["fit", "-c", conf["tokenizer"], "trainer.max_steps=0", f"run.root={runs}"]) == 2
    assert "trainer.max_steps=0: fit would train nothing (-1: no limit)" in capsys.readouterr().err
    assert main(["fit", "-c", conf["tokenizer"], "model.recon_loss=l3", f"run.root={runs}"]) == 2
    assert "model.recon_loss = 'l3' (str): expected one of 'l1', 'l2' (argument" in capsys.readouterr().err
    for stage, override, message in cases:
        assert main(["fit", "-c", conf[stage], *before[stage], override, f"run.root={runs}"]) == 2, override
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"varctl: config error: {conf[stage]}: model: "), last
        assert last.endswith(message), last
    assert not runs.exists()  # nothing written


@pytest.mark.usefixtures("one_thread")  # conftest.py: tiny convs are far faster on 1 thread
def test_a_run_without_end_with_a_decaying_lr_is_a_config_error(tokenizer_file, tmp_path, capsys):
    """trainer.max_steps=-1 (the shipped trainers set max_epochs=-1): a config error naming the keys before
    anything is written, in both stages that decay the lr; with a constant lr the tokenizer trains (here
    until a crash at step 3)."""
    endless = ["trainer.max_steps=-1", f"run.root={tmp_path}", "trainer.enable_progress_bar=false"]
    stages = {"tokenizer": ["model.vqvae.preset=tiny"], "var": [f"model.tokenizer={tokenizer_file}"]}
    for stage, args in stages.items():
        assert main(["fit", "-c", str(ROOT / "conf" / f"{stage}.yaml"), *args, *endless]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # the one line the user reads
        assert last.startswith("varctl: config error:"), last
        assert "trainer.max_steps=-1 with trainer.max_epochs=-1 trains without end" in last
        assert "model.optimizer.decay='cosine'" in last and "or model.optimizer.decay=constant" in last
    assert not list(tmp_path.iterdir())  # nothing written
    crash = "+callbacks.kill={_target_: toy.KillAt, step: 3, crash: true}"
    args = ["model.optimizer.decay=constant", "data.batch_size=2", "trainer.limit_val_batches=0",
            "callbacks.images=null", "callbacks.checkpoint.every_n_train_steps=1", crash]  # fmt: skip
    with pytest.raises(RuntimeError, match="crashed before step 3"):
        main(["fit", "-c", str(ROOT / "conf" / "tokenizer.yaml"), *stages["tokenizer"], *endless, *args])
    (last,) = tmp_path.glob("tokenizer/*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2: the tokenizer stage takes "
         "one optimizer step per batch (manual optimization)"),
        ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0: the tokenizer stage clips its own "
         "gradients with model.gradient_clip_val (here 1.0)"),
        ("callbacks.nonfinite.action=skipp", "callbacks.nonfinite: callbacks.nonfinite.action must be one of "
         "('stop', 'skip'), got 'skipp'"),
    ],
    ids=["accumulate", "clip", "callback"],
)  # fmt: skip
def test_settings_the_tokenizer_stage_or_a_callback_refuses_are_config_errors(tmp_path, capsys, override,
                                                                             message):  # fmt: skip
    """Lightning refuses clipping and accumulation for the tokenizer's manual optimization, and a callback
    refuses its own settings: one line naming the key, exit 2, nothing written (it was a traceback)."""
    conf = str(ROOT / "conf" / "tokenizer.yaml")
    assert main(["fit", "-c", conf, "model.vqvae.preset=tiny", f"run.root={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"varctl: config error: {conf}: {message}"), err[-2000:]
    assert not list(tmp_path.iterdir())


# --- the main command on a fresh machine: the earlier stages' newest runs ------------------------------
CONF = Path(__file__).resolve().parents[1] / "conf"


def fake_run(root: Path, stage: str, version: str, config: dict | None = None) -> Path:
    ckpt = root / stage / version / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    if config is not None:
        (ckpt.parent.parent / "config_fit.yaml").write_text(yaml.safe_dump(config))
    return ckpt


def test_a_run_prints_what_concerns_it(toy_conf):
    """Not Lightning's tips, its own deprecation warning or its note on the trainer's default test limit; the
    model summary without a FLOPs column of zeros, the progress bar without "Epoch 0/-2"."""
    shown = ["trainer.enable_progress_bar=true", "trainer.enable_model_summary=true"]
    out = _cli("fit", "-c", str(toy_conf), "trainer.max_steps=1", "trainer.val_check_interval=1", *shown)
    assert out.returncode == 0, out.stderr
    printed = out.stdout + out.stderr
    assert "run directory" in printed
    assert "Total params: 1" in printed and "Params" in printed and "Epoch 0" in printed
    for noise in ("Tip:", "LeafSpec", "limit_test_batches", "FLOPs", "Epoch 0/", "already configured"):
        assert noise not in printed, noise


def test_the_summary_shows_flops_where_they_were_counted_and_an_epoch_limit(capsys):
    """A module with an ``example_input_array`` has its FLOPs counted: then they are shown; a run with an
    epoch limit shows it in the bar ("Epoch 0/2", as Lightning does)."""
    from lightning.pytorch.utilities.model_summary import summarize

    from varctl.callbacks.display import ModelSummary, ProgressBar

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)
            self.example_input_array = torch.zeros(2, 4)

        def forward(self, x):
            return self.layer(x)

    summary = summarize(Linear())
    assert summary.total_flops == 2 * 2 * 4 * 3
    ModelSummary().summarize(summary._get_summary_data(), summary.total_parameters,
                             summary.trainable_parameters, summary.model_size, summary.total_training_modes,
                             summary.total_flops)  # fmt: skip
    printed = capsys.readouterr().out
    assert "FLOPs" in printed and "Total FLOPs: 48" in printed and "Total params: 15" in printed
    bar = ProgressBar()
    for max_epochs, description in ((3, "Epoch 0/2"), (-1, "Epoch 0"), (None, "Epoch 0")):
        bar._trainer = L.Trainer(max_epochs=max_epochs, max_steps=5, logger=False, enable_checkpointing=False)
        assert bar._get_train_description(0).strip() == description


def test_only_frozen_modules_in_eval_mode_silence_lightnings_warning():
    from varctl.cli.main import _eval_modules_frozen

    nn = torch.nn

    def model():  # a "tokenizer" with a dropout, and a block that trains with its own dropout
        return nn.ModuleDict({"vae": nn.Sequential(nn.Linear(2, 2), nn.Dropout()),
                              "block": nn.Sequential(nn.Linear(2, 2), nn.Dropout())})  # fmt: skip

    m = model()
    assert _eval_modules_frozen(m)  # all in train mode
    m["vae"].eval().requires_grad_(False)
    assert _eval_modules_frozen(m)  # the frozen part in eval mode, its dropout with it
    m["block"][1].eval()
    assert not _eval_modules_frozen(m)  # a dropout left in eval mode in a block that trains
    m = model()
    m["vae"].eval()
    assert not _eval_modules_frozen(m)  # in eval mode but training
    m["vae"].requires_grad_(False)
    m["vae"][0].bias.requires_grad_(True)
    assert not _eval_modules_frozen(m)  # its bias still trains
    m = model().eval().requires_grad_(False)
    assert _eval_modules_frozen(m)  # everything frozen
    assert not _eval_modules_frozen(object())


def test_control_stage_without_paths_uses_the_newest_earlier_runs(tmp_path):
    from varctl.cli.config import compose
    from varctl.cli.earlier import fill_earlier_stages

    old_tok = fake_run(tmp_path, "tokenizer", "v1")
    new_tok = fake_run(tmp_path, "tokenizer", "v2")
    os.utime(old_tok, ns=(1, 1))
    old_var = fake_run(tmp_path, "var", "v1", {"model": {"tokenizer": str(new_tok)}})
    new_var = fake_run(tmp_path, "var", "v2", {"model": {"tokenizer": str(old_tok)}})
    os.utime(old_var, ns=(1, 1))
    cfg = compose(CONF / "control.yaml", [f"run.root={tmp_path}"])
    chosen = fill_earlier_stages(cfg, "conf/control.yaml")
    # the newest VAR, and the tokenizer it was trained on (not the newest tokenizer)
    assert cfg.model.init_from == str(new_var) and cfg.model.tokenizer == str(old_tok)
    assert len(chosen) == 2 and "newest VAR run" in chosen[0] and "that VAR was trained on" in chosen[1]
    # a VAR given by path: the tokenizer it was trained on too (the newest tokenizer was taken)
    new_var.parent.parent.rename(tmp_path / "elsewhere")
    moved = tmp_path / "elsewhere" / "checkpoints" / "last.ckpt"
    cfg = compose(CONF / "control.yaml", [f"run.root={tmp_path}", f"model.init_from={moved}"])
    chosen = fill_earlier_stages(cfg, "conf/control.yaml")
    assert cfg.model.tokenizer == str(old_tok) and chosen == [
        f"model.tokenizer={old_tok} (the tokenizer that VAR was trained on)"
    ]
    bare = tmp_path / "files" / "var_d16.pth"  # a file outside a run: no run config beside it is read
    bare.parent.mkdir()
    bare.write_bytes(b"")
    (tmp_path / "config_fit.yaml").write_text(yaml.safe_dump({"model": {"tokenizer": str(old_tok)}}))
    cfg = compose(CONF / "control.yaml", [f"run.root={tmp_path}", f"model.init_from={bare}"])
    fill_earlier_stages(cfg, "conf/control.yaml")
    assert cfg.model.tokenizer == str(new_tok)  # the newest run, as for any VAR file that records nothing
    cfg = compose(CONF / "var.yaml", [f"run.root={tmp_path}"])
    fill_earlier_stages(cfg, "conf/var.yaml")
    assert cfg.model.tokenizer == str(new_tok)
    given = compose(CONF / "control_d16.yaml", [f"run.root={tmp_path}", "model.init_from=mine.pt",
                                            "model.tokenizer=tok.pt"])  # fmt: skip
    assert fill_earlier_stages(given, "conf/control.yaml") == [] and given.model.init_from == "mine.pt"


LEGACY = ROOT / "tests" / "fixtures" / "legacy"


def test_a_checkpoint_names_the_earlier_stages_it_was_trained_on(tmp_path):
    """With ckpt_path, ``auto`` is what that run was trained on (its hyper-parameters), where those files
    exist, else the checkpoint itself; never the newest runs under run.root. A damaged checkpoint is named
    first."""
    from varctl.cli.config import ConfigError, compose
    from varctl.cli.earlier import fill_earlier_stages

    newer_tok = fake_run(tmp_path, "tokenizer", "v9")
    fake_run(tmp_path, "var", "v9", {"model": {"tokenizer": str(newer_tok)}})  # newer runs, never taken
    ckpt = LEGACY / "control.ckpt"  # its recorded tokenizer and VAR (tests/data/legacy/...) are gone
    cfg = compose(CONF / "control.yaml", [f"run.root={tmp_path}", f"ckpt_path={ckpt}"])
    chosen = fill_earlier_stages(cfg, "conf/control.yaml")
    assert cfg.model.init_from == str(ckpt) and cfg.model.tokenizer == str(ckpt)
    assert len(chosen) == 2 and all("ckpt_path holds the" in line for line in chosen)
    cfg = compose(CONF / "control.yaml", [f"run.root={tmp_path}", f"model.init_from={ckpt}"])
    fill_earlier_stages(cfg, "conf/control.yaml")  # a stage checkpoint as the VAR: its tokenizer is in it
    assert cfg.model.tokenizer == str(ckpt)

    obj = torch.load(ckpt, weights_only=True)
    tok, var = tmp_path / "trained_on" / "tok.pt", tmp_path / "trained_on" / "var.pt"
    tok.parent.mkdir()
    tok.write_bytes(b""), var.write_bytes(b"")
    obj["hyper_parameters"].update(tokenizer=str(tok), init_from=str(var))
    torch.save(obj, tmp_path / "moved.ckpt")
    cfg = compose(CONF / "control.yaml", [f"run.root={tmp_path}", f"ckpt_path={tmp_path / 'moved.ckpt'}"])
    chosen = fill_earlier_stages(cfg, "conf/control.yaml")
    assert cfg.model.init_from == str(var) and cfg.model.tokenizer == str(tok)
    assert all("that ckpt_path's run was trained on" in line for line in chosen)
    cfg = compose(CONF / "var.yaml", [f"run.root={tmp_path}", f"ckpt_path={tmp_path / 'moved.ckpt'}"])
    fill_earlier_stages(cfg, "conf/var.yaml")
    assert cfg.model.tokenizer == str(tok)

    # a sharded checkpoint (a folder) records its run's settings in meta.pt; its weights are no one file
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    torch.save({"hyper_parameters": obj["hyper_parameters"], "varctl": obj["varctl"]}, sharded / "meta.pt")
    cfg = compose(CONF / "control.yaml", [f"run.root={tmp_path}", f"ckpt_path={sharded}"])
    fill_earlier_stages(cfg, "conf/control.yaml")
    assert cfg.model.init_from == str(var) and cfg.model.tokenizer == str(tok)
    var.unlink()  # gone, and the sharded checkpoint holds no VAR file: never the newest VAR in its place
    cfg = compose(CONF / "control.yaml", [f"run.root={tmp_path}", f"ckpt_path={sharded}"])
    with pytest.raises(ConfigError, match=f"trained on {var}, which is gone.*set model.init_from=PATH"):
        fill_earlier_stages(cfg, "conf/control.yaml")

    # a damaged or missing checkpoint is named as such, not as earlier stages to train first
    empty = tmp_path / "empty"
    (tmp_path / "not_a.ckpt").write_bytes(b"damaged")
    for bad, problem in (("not_a.ckpt", "is damaged or not a checkpoint"), ("typo.ckpt", "does not exist")):
        cfg = compose(CONF / "control.yaml", [f"run.root={empty}", f"ckpt_path={tmp_path / bad}"])
        with pytest.raises(ConfigError, match=f"ckpt_path: checkpoint {tmp_path / bad} {problem}"):
            fill_earlier_stages(cfg, "conf/control.yaml")


def test_a_checkpoint_of_another_stage_is_named_as_such(tmp_path, capsys):
    """ckpt_path holding another stage's checkpoint: one line naming both stages and the config to use (it
    was a list of weights that do not fit, then "none of the settings its run recorded differs")."""
    cases = [
        ("var", "control", "of the control stage, and this config builds the VAR stage: use it with "
         "conf/control.yaml, or give this config a checkpoint of the VAR stage"),
        ("control", "var", "of the VAR stage, and this config builds the control stage: use it with "
         "conf/var.yaml or conf/var_text.yaml, or give this config a checkpoint of the control stage; a VAR "
         "to train a control branch on is model.init_from"),
        ("var", "tokenizer", "of the tokenizer stage, and this config builds the VAR stage: use it with "
         "conf/tokenizer.yaml, or give this config a checkpoint of the VAR stage; a tokenizer to train on is "
         "model.tokenizer"),
        ("tokenizer", "var", "of the VAR stage, and this config builds the tokenizer stage: use it with "
         "conf/var.yaml or conf/var_text.yaml, or give this config a checkpoint of the tokenizer stage"),
    ]  # fmt: skip
    for conf, stage, message in cases:
        ckpt = LEGACY / f"{stage}.ckpt"
        args = ["predict", "-c", str(CONF / f"{conf}.yaml"), f"ckpt_path={ckpt}", f"run.root={tmp_path}"]
        if conf == "control":  # a branch the legacy VAR (depth 1) can take
            args.append("model.control.car_targets=last")
        assert main(args) == 2, (conf, stage)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == f"varctl: config error: {ckpt} is a checkpoint {message}", last
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_control_checkpoint_alone_draws_a_job(tmp_path, capsys):
    """A control checkpoint copied to a machine without its earlier runs runs predict by itself."""
    ckpt = tmp_path / "copied" / "control.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((LEGACY / "control.ckpt").read_bytes())
    edges = tmp_path / "maps" / "edges"
    edges.mkdir(parents=True)
    for i in range(3):
        img = torch.zeros(16, 16, dtype=torch.uint8)
        img[2 + 3 * i, :] = img[:, 12 - 4 * i] = 255
        Image.fromarray(img.numpy()).save(edges / f"e{i}.png")
    branch = ["model.control.injector=scalar", "model.control.width=4", "model.control.feature_dim=8",
              "model.control.max_width=8", "model.ema_decay=0.5"]  # the legacy run's settings  # fmt: skip
    # conf/control.yaml previews 2 predict batches; a job list is drawn whole, here in 3 batches of 1
    args = ["predict", "-c", str(CONF / "control.yaml"), "data=jobs", f"data.root={tmp_path / 'maps'}",
            "data.batch_size=1", f"ckpt_path={ckpt}", f"run.root={tmp_path / 'runs'}", *branch]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert f"model.init_from={ckpt} (ckpt_path holds the VAR's weights)" in err
    assert "data=jobs draws every job (trainer.limit_predict_batches=2" in out
    assert "varctl predict: 3 written, 0 skipped (existing), 0 failed" in out
    written = [np.array(Image.open(tmp_path / "maps" / "generated" / f"e{i}.png")) for i in range(3)]
    assert all(w.std() > 0 for w in written) and not np.array_equal(written[0], written[1])
    # all done: a rerun draws nothing, and one with other settings says its images are not theirs
    assert main(args) == 0 and "0 written, 3 skipped (existing)" in capsys.readouterr().out
    assert main([*args, "data.seed=5"]) == 2
    assert "holds images drawn with other settings (data.seed was 0, now 5" in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_the_config_names_the_settings_of_its_run(tmp_path, capsys):
    """Settings that shape other weights than the checkpoint's stop the run with the settings to give, not
    torch's list of keys: another injector, another width, no EMA where the run kept one."""
    obj = torch.load(LEGACY / "control.ckpt", weights_only=True)
    obj["hyper_parameters"]["control"]["injector"] = "scalar"  # as today's files record it
    ckpt = tmp_path / "control.ckpt"
    torch.save(obj, ckpt)
    (tmp_path / "maps" / "edges").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "maps" / "edges" / "e.png")
    args = ["predict", "-c", str(CONF / "control.yaml"), "data=jobs", f"data.root={tmp_path / 'maps'}",
            f"ckpt_path={ckpt}", f"run.root={tmp_path / 'runs'}", "model.control.width=4",
            "model.control.max_width=8"]  # fmt: skip
    cases = {
        ("model.control.injector=ecm", "model.control.feature_dim=8", "model.ema_decay=0.5"): (
            "of its weights have no place here (model.control.injector.proj_weight",
            "Its run was trained with model.control.injector=scalar (here ecm): give those settings",
        ),
        ("model.control.injector=scalar", "model.control.feature_dim=16", "model.ema_decay=0.5"): (
            "weights have other shapes (model.control.injector.proj_weight (1, 3, 8, 32) in the file, "
            "(1, 3, 16, 32) here",
            "Its run was trained with model.control.feature_dim=8 (here 16)",
        ),
        ("model.control.injector=scalar", "model.control.feature_dim=8"): (
            "of its weights have no place here (ema.n_averaged",
            "Its run was trained with model.ema_decay=0.5 (here 0.0)",
        ),
        ("model.control.injector=scalar", "model.control.feature_dim=16"): (  # other shapes and extra keys
            "of its weights have no place here (ema.n_averaged",
            "weights have other shapes (model.control.injector.proj_weight (1, 3, 8, 32) in the file",
            "model.control.feature_dim=8 (here 16)",
            "model.ema_decay=0.5 (here 0.0)",
        ),
    }
    for overrides, expected in cases.items():
        assert main([*args, *overrides]) == 2
        err = capsys.readouterr().err
        assert f"config error: {ckpt} does not fit the model this config builds" in err
        assert all(part in err for part in expected) and "RuntimeError" not in err, err
    assert not (tmp_path / "maps" / "generated").exists()
    assert not (tmp_path / "runs").exists()  # checked before the run starts: nothing written
    # nor in the checkpoint's own run directory
    run_dir = tmp_path / "own" / "control" / "v1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
    (run_dir / "config_predict.yaml").write_text("an earlier predict's config")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    mismatched = ["model.control.injector=ecm", "model.control.feature_dim=8", "model.ema_decay=0.5"]
    assert main([*args, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", *mismatched]) == 2
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    # the first version's file records no injector: the message says so instead of guessing
    assert main([*args, *mismatched, f"ckpt_path={LEGACY / 'control.ckpt'}"]) == 2
    assert "None of the settings its run recorded differs" in capsys.readouterr().err
    # the settings it names are the ones that load it
    fitting = ["model.control.injector=scalar", "model.control.feature_dim=8", "model.ema_decay=0.5"]
    assert main([*args, *fitting]) == 0
    assert (tmp_path / "maps" / "generated" / "e.png").is_file()


def test_a_load_error_other_than_shapes_keeps_torchs_reason():
    from varctl.checkpoints import CheckpointMismatch, FitsCheckpoint

    class Model(FitsCheckpoint, torch.nn.Module):
        hparams: dict = {}  # what a LightningModule records

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    model = Model()
    state = model.state_dict()
    with pytest.raises(RuntimeError, match="lin.bias") as caught:
        model.load_state_dict({**state, "lin.bias": 3})  # not a tensor: no shapes to name
    assert not isinstance(caught.value, CheckpointMismatch)
    with pytest.raises(CheckpointMismatch, match=r"1 of its weights have no place here \(extra\)"):
        model.load_state_dict({**state, "extra": torch.zeros(1)})
    model.load_state_dict(state)


def test_a_mismatch_names_only_the_settings_that_shape_weights():
    from varctl.checkpoints import settings_differing
    from varctl.lit.control import ControlModule

    saved = {
        "ema_decay": 0.5,
        "train_backbone": False,
        "alignment_weight": 1.0,
        "scale_sampling": "all",
        "var": {"depth": 4, "cond_drop_rate": 0.1},
        "control": {"blocks": (0, 1), "control_drop_rate": 0.1},
    }
    here = {
        "ema_decay": 0.9,
        "train_backbone": True,
        "alignment_weight": 0.5,
        "scale_sampling": "early",
        "var": {"depth": 6, "cond_drop_rate": 0.2},
        "control": {"blocks": [0, 1], "control_drop_rate": 0.3},
    }
    assert settings_differing(saved, here, ControlModule.free_settings) == ["model.var.depth=4 (here 6)"]
    here.update(ema_decay=0.0, control={"blocks": [0, 2]})  # no average kept; other blocks controlled
    assert settings_differing(saved, here, ControlModule.free_settings) == [
        "model.control.blocks=(0, 1) (here [0, 2])", "model.ema_decay=0.5 (here 0.0)",
        "model.var.depth=4 (here 6)",
    ]  # fmt: skip


def test_control_stage_on_a_fresh_machine_names_the_commands_to_run_first(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["fit", "-c", str(CONF / "control.yaml"), f"run.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.init_from=auto but" in err and str(tmp_path / "var") in err
    assert "`python -m varctl fit -c conf/tokenizer.yaml` then `python -m varctl fit -c conf/var.yaml`" in err
    assert time.perf_counter() - start < 30  # stops before building anything
    fake_run(tmp_path, "var", "v1")  # a VAR run without its config: the tokenizer is still missing
    assert main(["fit", "-c", str(CONF / "control.yaml"), f"run.root={tmp_path}"]) == 2
    assert "model.tokenizer=auto but" in capsys.readouterr().err


def test_print_config_marks_the_values_still_to_set(tmp_path, capsys):
    assert main(["fit", "-c", str(CONF / "control.yaml"), "--print-config", f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# still to set (key=VALUE on the command line): model.tokenizer, model.init_from")
    assert "tokenizer: auto" in out and "injector: car" in out
    assert main(["fit", "-c", str(CONF / "control_d16.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# still to set (key=VALUE on the command line): data.root\n")
    assert "tokenizer: vae_ch160v4096z32.pth" in out and "init_from: var_d16.pth" in out


def test_a_dict_for_an_existing_section_names_the_keys_it_lacks(capsys):
    conf = str(ROOT / "conf" / "tokenizer.yaml")
    assert main(["fit", "-c", conf, "model.vqvae={preset: tiny, z_channels: 8}", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "existing section 'model.vqvae'" in err and "(z_channels not among them)" in err
    assert "++model.vqvae={preset: tiny, z_channels: 8}" in err
    assert main(["fit", "-c", conf, "--print-config", "++model.vqvae={preset: tiny, z_channels: 8}"]) == 0
    assert "z_channels: 8" in capsys.readouterr().out
