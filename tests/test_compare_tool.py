"""tools/compare_injectors.py: an interrupted comparison goes on where it stopped. A row is saved after each
of its parts (training, times, the scores without and with control guidance), a rerun does only the parts
missing, and a row whose training stopped resumes that run from its last checkpoint. The stages are
recorded stand-ins here (the real ones are tested with the CLI); what is checked is which of them a rerun
calls and what the saved rows and table hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_injectors as tool  # noqa: E402

METRICS = {
    "test/loss": 1.5, "test/edges_f1": 0.4, "test_shuffled/edges_f1": 0.05, "test_tokenizer/edges_f1": 0.6,
    "test/edges_f1_controlnetpp": 0.45, "test/fd_judge": 0.9, "test_tokenizer/fd_judge": 0.5,
}  # fmt: skip


class Stages:
    """Records the stages called (command, injector, ckpt_path) and stops at the call numbered ``stop_at``;
    a fit writes its run's last.ckpt first, as the checkpoint callback does."""

    def __init__(self, root: Path, stop_at: int | None = None):
        self.root, self.stop_at, self.calls, self.overrides, self.repeats = root, stop_at, [], [], []

    def __call__(self, command, overrides):
        opts = dict(o.split("=", 1) for o in overrides)
        self.calls.append((command, opts["model.control.injector"], opts.get("ckpt_path")))
        self.overrides.append(opts)
        if command == "fit":
            ckpt = Path(opts.get("ckpt_path") or self.root / opts["run.name"] / f"v{len(self.calls)}"
                        / "checkpoints" / "last.ckpt")  # fmt: skip
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text("weights")
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        control = torch.nn.Linear(3, 2)  # 8 parameters
        return SimpleNamespace(
            checkpoint_callback=SimpleNamespace(last_model_path=str(ckpt) if command == "fit" else ""),
            lightning_module=SimpleNamespace(control=control),
            datamodule=SimpleNamespace(val_dataloader=lambda: [None]),
            callback_metrics={k: torch.tensor(v) for k, v in METRICS.items()},
        )


def compare(monkeypatch, root: Path, stages: Stages, *extra: str, injectors=("scalar", "car")) -> dict:
    args = ["--tokenizer", "t.ckpt", "--var", "v.ckpt", "--injectors", *injectors, "--tuned",
            "--root", str(root), *extra]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["compare_injectors.py", *args])
    monkeypatch.setattr(tool, "stage", stages)

    def timings(module, batch, repeats):
        stages.repeats.append(repeats)
        return {"step": 1.1, "sample": 1.05}

    monkeypatch.setattr(tool, "timings", timings)
    monkeypatch.setattr(tool, "loaded", lambda common, ckpt: (stages("validate", common), None))
    monkeypatch.setattr(tool, "cpu_name", lambda: "test CPU")
    try:
        tool.main()
    finally:
        saved = json.loads((root / "comparison.json").read_text())
    return saved["rows"]


def test_an_interrupted_comparison_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys):
    root = tmp_path / "compare"
    # scalar: fit, its plain scores, then stopped in its guided scores
    with pytest.raises(KeyboardInterrupt):
        compare(monkeypatch, root, Stages(root, stop_at=3))
    rows = json.loads((root / "comparison.json").read_text())["rows"]
    assert set(rows) == {"scalar"}
    scalar = rows["scalar"]
    assert scalar["params"] == 8 and scalar["step"] == 1.1 and scalar["f1"] == pytest.approx(0.4)
    assert "f1_guided" not in rows["scalar"]
    assert not (root / "comparison.md").exists()

    # the rerun scores scalar with guidance only; car's training stops after its first checkpoint
    stages = Stages(root, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        compare(monkeypatch, root, stages)
    assert stages.calls == [("test", "scalar", rows["scalar"]["checkpoint"]), ("fit", "car", None)]
    car_last = next((root / "control_car").glob("*/checkpoints/last.ckpt"))

    # the next one resumes car's training run from its last checkpoint, then scores it
    stages = Stages(root)
    rows = compare(monkeypatch, root, stages)
    assert stages.calls == [("fit", "car", str(car_last)), ("test", "car", str(car_last)),
                            ("test", "car", str(car_last))]  # fmt: skip
    assert all(tool.complete(r) for r in rows.values()) and rows["car"]["checkpoint"] == str(car_last)
    table = (root / "comparison.md").read_text()
    assert "| scalar | 0.00M | 1.10x | 1.05x | 1.500 | 0.400 |" in table and "| car |" in table

    # a finished comparison reruns nothing; --retime only the times, from the checkpoints
    stages = Stages(root)
    compare(monkeypatch, root, stages)
    assert stages.calls == []
    compare(monkeypatch, root, stages, "--retime", "--sample-repeats", "7")
    assert [c[0] for c in stages.calls] == ["validate", "validate"] and stages.repeats == [7, 7]

    # other arguments are refused before anything runs, and so is no sampling call to time
    stages = Stages(root)
    with pytest.raises(SystemExit, match="other arguments"):
        compare(monkeypatch, root, stages, "--steps", "5")
    with pytest.raises(SystemExit):
        compare(monkeypatch, root, stages, "--retime", "--sample-repeats", "0")
    assert stages.calls == [] and "--sample-repeats must be at least 1" in capsys.readouterr().err


def test_car_own_is_car_in_cars_layout_beside_the_configs_car(tmp_path, monkeypatch):
    root = tmp_path / "compare"
    stages = Stages(root)
    rows = compare(monkeypatch, root, stages, "model.control.width=16", injectors=("car", "car-own"))
    assert list(rows) == ["car", "car-own"] and all(tool.complete(r) for r in rows.values())
    layout = {"model.control.car_condition": "class", "model.control.car_blocks": "null",
              "model.control.car_targets": "last"}  # fmt: skip
    for (_, injector, _), opts in zip(stages.calls, stages.overrides):
        assert injector == "car" and opts["model.control.width"] == "16"  # the run's overrides: every row
        own = opts["run.name"] == "control_car-own"
        assert {k: opts.get(k) for k in layout} == (layout if own else dict.fromkeys(layout))
    fits = [o["run.name"] for o in stages.overrides if "ckpt_path" not in o]
    assert fits == ["control_car", "control_car-own"]
    assert "| car-own |" in (root / "comparison.md").read_text()
    assert tool.ROWS.index("car-own") == tool.ROWS.index("car") + 1  # the default rows: after car


def test_prefill_class_is_prefill_with_the_class_conditioned_prefix(tmp_path, monkeypatch):
    """The config's prefill takes the null condition (conf/control.yaml); the prefill-class row sets it to
    the class, after prefill in the default rows."""
    root = tmp_path / "compare"
    stages = Stages(root)
    rows = compare(monkeypatch, root, stages, injectors=("prefill", "prefill-class"))
    assert list(rows) == ["prefill", "prefill-class"]
    for (_, injector, _), opts in zip(stages.calls, stages.overrides):
        own = opts["run.name"] == "control_prefill-class"
        assert injector == "prefill"
        assert opts.get("model.control.prefix_condition") == ("class" if own else None)
    conf = yaml.safe_load((Path(tool.__file__).parents[1] / "conf" / "control.yaml").read_text())
    assert conf["model"]["control"]["prefix_condition"] == "none"
    assert tool.ROWS.index("prefill-class") == tool.ROWS.index("prefill") + 1
