"""tools/demo.py, the main job: a demo that stops goes on with the same command, the training stages it
finished skipped and the one that stopped resumed from its last checkpoint; a finished demo is followed by
a new one. Two training steps a stage, no scoring, no control stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import demo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_stopped_demo_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    args = ["--tokenizer-steps", "2", "--var-steps", "2", "--no-score", "--no-control", "--root", str(root)]
    monkeypatch.setattr(sys, "argv", ["demo.py", *args])
    calls, stage = [], demo.stage

    def recorded(command, file, overrides):
        calls.append((command, file, [o for o in overrides if o.startswith("ckpt_path=")]))
        trainer = stage(command, file, overrides)
        if calls == [("fit", "tokenizer.yaml", []), ("fit", "var.yaml", [])]:
            raise KeyboardInterrupt  # the VAR stage stopped after its last checkpoint, before the demo knew
        return trainer

    monkeypatch.setattr(demo, "stage", recorded)
    with pytest.raises(KeyboardInterrupt):
        demo.main()
    state = json.loads((root / "demo.json").read_text())
    assert list(state["done"]) == ["tokenizer.yaml"] and not state["finished"]
    last = root / "var" / state["id"] / "checkpoints" / "last.ckpt"
    assert last.exists()

    calls.clear()
    demo.main()
    out = capsys.readouterr().out
    assert f"[demo] going on with demo {state['id']}" in out and "fit tokenizer.yaml: done before" in out
    assert calls == [
        ("fit", "var.yaml", [f"ckpt_path={last}"]),
        ("predict", "var.yaml", [f"ckpt_path={last}"]),
    ]
    again = json.loads((root / "demo.json").read_text())
    assert (
        again["finished"]
        and again["id"] == state["id"]
        and list(again["done"]) == ["tokenizer.yaml", "var.yaml"]
    )

    options = again["options"]
    chain = demo.Chain(str(root), options)  # after a finished demo: a new one
    assert chain.id != state["id"] and chain.done == {}
    assert demo.Chain(str(root), {**options, "var_steps": 3}).done == {}  # other options: a new one too
