"""The main job on the built-in dataset, end to end on a CPU: tokenizer -> class-conditional VAR -> samples
-> control branch (edges -> images) -> control-to-image samples.

    python tools/demo.py [--tokenizer-steps N] [--var-steps N] [--control-steps N] [--root runs]
                         [--no-score] [--no-control]

Each stage is the same as ``python -m varctl fit -c conf/....yaml`` (step counts from the config unless
given); the VAR stage gets the tokenizer's last checkpoint as ``model.tokenizer``, ``predict`` writes sample
PNGs under the VAR run directory, and ``tools/score_samples.py`` then reports how often a sample shows the
class it was generated for. ``test`` then scores samples for the test images' classes in that judge's
features (``fd_judge``, ``kd_judge``, ...; ``<run>/eval/test.json``). The control stage trains a branch on
that VAR (``conf/control.yaml``), reports the edge F1 of its samples against the real images beside the F1,
against the same images, of samples given other images' edges (what ignoring the control would give),
``test`` scores it the same way with generation quality beside, and ``predict`` writes each sample beside
its edge map and the real image.

A demo that stops (killed, Ctrl-C, a crash) goes on with the same command: ``<root>/demo.json`` keeps its
id (the ``run.version`` of every stage) and the training stages it finished with their last checkpoints.
Those are not run again, and the one that stopped resumes from its ``last.ckpt`` (a stage stopped before its
first checkpoint starts again); the sampling and scoring stages run again. A finished demo, or one started
with other options, is followed by a new one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from varctl.callbacks import ImageWriter
from varctl.cli import run
from varctl.cli.config import compose, validate
from varctl.files import atomic_write_text

CONF = Path(__file__).resolve().parents[1] / "conf"


def stage(command: str, file: str, overrides: list[str]):
    path = CONF / file
    data = validate(compose(path, overrides), path)
    start = time.perf_counter()
    trainer = run(command, data, path)
    print(
        f"[demo] {command} {file}: {time.perf_counter() - start:.0f} s, run directory {trainer.log_dir}",
        flush=True,
    )
    return trainer


class Chain:
    """The demo's progress in ``<root>/demo.json`` (the module docstring)."""

    def __init__(self, root: str, options: dict):
        self.file = Path(root) / "demo.json"
        try:
            state = json.loads(self.file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("options") == options and not state.get("finished"):
            self.id, self.done = state["id"], state["done"]
            print(f"[demo] going on with demo {self.id} ({self.file}; stages done: "
                  f"{', '.join(self.done) or 'none'})", flush=True)  # fmt: skip
        else:
            self.id, self.done = time.strftime("demo-%Y%m%d-%H%M%S"), {}
            if self.id == state.get("id"):  # a new demo within the second the last one started
                self.id += "-2"
        self.options = options
        self.save()

    def save(self, finished: bool = False) -> None:
        state = {"id": self.id, "options": self.options, "done": self.done, "finished": finished}
        atomic_write_text(self.file, json.dumps(state, indent=1))

    def fit(self, file: str, overrides: list[str]) -> str:
        """Train the stage of ``file`` (run.version = the demo's id), or resume it; its last checkpoint."""
        if file in self.done and Path(self.done[file]).exists():
            print(f"[demo] fit {file}: done before ({self.done[file]})", flush=True)
            return self.done[file]
        overrides = [*overrides, f"run.version={self.id}"]
        data = validate(compose(CONF / file, overrides), CONF / file)
        run_dir = Path(data["run"]["root"]) / data["run"]["name"] / self.id
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            overrides.append(f"ckpt_path={last}")
            print(f"[demo] fit {file}: resuming from {last}", flush=True)
        elif run_dir.exists():  # stopped before its first checkpoint: nothing to resume
            shutil.rmtree(run_dir)
        trainer = stage("fit", file, overrides)
        self.done[file] = trainer.checkpoint_callback.last_model_path or str(last)
        self.save()
        return self.done[file]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer-steps", type=int, default=None, help="default: conf/tokenizer.yaml")
    parser.add_argument("--var-steps", type=int, default=None, help="default: conf/var.yaml")
    parser.add_argument("--control-steps", type=int, default=None, help="default: conf/control.yaml")
    parser.add_argument("--no-control", action="store_true", help="stop after the class-conditional VAR")
    parser.add_argument("--root", default="runs", help="where the run directories go")
    parser.add_argument("--no-score", action="store_true", help="skip scoring the samples")
    args = parser.parse_args()

    def steps(n: int | None) -> list[str]:
        return [] if n is None else [f"trainer.max_steps={n}"]

    chain = Chain(args.root, {k: v for k, v in vars(args).items() if k != "root"})
    tokenizer = chain.fit("tokenizer.yaml", [*steps(args.tokenizer_steps), f"run.root={args.root}"])
    var_overrides = [f"model.tokenizer={tokenizer}", f"run.root={args.root}"]
    last = chain.fit("var.yaml", [*steps(args.var_steps), *var_overrides])
    pred = stage("predict", "var.yaml", [f"ckpt_path={last}", *var_overrides])
    judge = []  # the class judge's features score generation quality in `test` (no FID weights here)
    if not args.no_score:
        out = next(c.output_dir for c in pred.callbacks if isinstance(c, ImageWriter))
        cache = Path(args.root) / "classifiers"
        tool = Path(__file__).with_name("score_samples.py")
        subprocess.run([sys.executable, str(tool), str(out), "--cache", str(cache)], check=True)
        newest = max(cache.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        judge = [f"model.evaluation.judge_weights={newest}"]
        stage("test", "var.yaml", [f"ckpt_path={last}", *var_overrides, *judge])  # <run>/eval/test.json
    if not args.no_control:
        control_overrides = [
            f"model.tokenizer={tokenizer}",
            f"model.init_from={last}",
            f"run.root={args.root}",
        ]
        ckpt = chain.fit("control.yaml", [*steps(args.control_steps), *control_overrides])
        scoring = ["trainer.limit_val_batches=4", "model.scores.batches=4"]  # 64 val images

        def f1(*overrides: str):
            scored = stage("validate", "control.yaml", [f"ckpt_path={ckpt}", *scoring, *control_overrides,
                                                        *overrides])  # fmt: skip
            return scored.callback_metrics, scored.lightning_module

        flat_metrics, module = f1()  # strength 1 at every scale, the config's
        # the control strength per scale that scored best (README, "What the demo shows"): 1, and 1.5 and 2
        # at the last two scales
        K = module.var.config.num_scales
        boost = "[" + ",".join(["1"] * max(K - 2, 0) + ["1.5", "2"][-K:]) + "]"
        sampling = [f"model.{s}.control_strength={boost}" for s in ("scores", "evaluation", "predict")]
        m, module = f1(*sampling)
        print(
            f"[demo] control ({module.control.config.injector}, control guidance "
            f"{float(module.scoring.control_cfg):g}, control strength {boost}): edge F1 of samples vs. their "
            f"real images {float(m['val/edges_f1']):.3f}; of samples given other images' edges "
            f"{float(m['val_shuffled/edges_f1']):.3f} (no control); of the tokenizer's reconstructions "
            f"{float(m['val_tokenizer/edges_f1']):.3f} (the ceiling)",
            flush=True,
        )
        plain = float(f1(*sampling, "model.scores.control_cfg=0")[0]["val/edges_f1"])
        flat = float(flat_metrics["val/edges_f1"])
        print(f"[demo] control without control guidance: edge F1 {plain:.3f}; with strength 1 at every "
              f"scale: {flat:.3f}", flush=True)  # fmt: skip
        if judge:
            stage("test", "control.yaml", [f"ckpt_path={ckpt}", *control_overrides, *judge, *sampling])
        stage("predict", "control.yaml", [f"ckpt_path={ckpt}", *control_overrides, *sampling])
    chain.save(finished=True)
    print(f"[demo] done: tensorboard --logdir {args.root}", flush=True)


if __name__ == "__main__":
    main()
