"""``python -m varctl {fit,validate,test,predict} -c FILE [key=value ...]``: compose, instantiate, run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

SUBCOMMANDS = {
    "fit": "train a model (resume with ckpt_path=PATH)",
    "validate": "run the validation loop once (weights from ckpt_path=PATH)",
    "test": "run the test loop once (weights from ckpt_path=PATH)",
    "predict": "run predict_step and write the images under the run directory (weights from ckpt_path=PATH)",
}
OVERRIDE_HELP = """\
overrides (Hydra syntax, after the options):
  key=value            set an existing key, e.g. trainer.max_steps=500 data.batch_size=16
  +key=value           add a key that the file does not have
  ~key                 delete a key
  group=option         pick another file of a config group, e.g. trainer=ddp data=folder
Values are YAML: 1e-4, true, null, [1,2,3], "text with spaces".
"""
RUN_VERSION_ENV = "VARCTL_RUN_VERSION"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m varctl",
        description="varctl: train and sample scale-wise visual autoregressive (VAR) models with Lightning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n"
        + "".join(f"  {k:10s} {v}\n" for k, v in SUBCOMMANDS.items())
        + "\n"
        + OVERRIDE_HELP
        + "\nexample: python -m varctl fit -c conf/tokenizer.yaml trainer.max_steps=200",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    for name, text in SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            help=text,
            description=f"{name}: {text}.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=OVERRIDE_HELP
            + f"\nexample: python -m varctl {name} -c conf/var.yaml trainer.max_steps=100",
        )
        p.add_argument(
            "-c", "--config", required=True, metavar="FILE", help="YAML file in conf/, e.g. conf/var.yaml"
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from varctl.cli.config import ConfigError, as_yaml, compose, validate
    from varctl.cli.earlier import fill_earlier_stages, still_to_set

    try:
        cfg = compose(args.config, args.overrides)
        if args.print_config:  # values still to set are shown as ??? (or null), not an error
            chosen = fill_earlier_stages(cfg, args.config, strict=False)
            unset = still_to_set(cfg)
            print("".join(f"# {line}\n" for line in chosen), end="")
            if unset:
                print(f"# still to set (key=VALUE on the command line): {', '.join(unset)}")
            print(as_yaml(cfg), end="")
            return 0
        data = validate(cfg, args.config)  # with the earlier stages' runs where the config says auto
    except ConfigError as e:
        print(f"varctl: config error: {e}", file=sys.stderr)
        return 2
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from datamodules.jobs import OutputsDiffer
    from varctl.callbacks.writer import JobsFailed
    from varctl.checkpoints import CheckpointMismatch, NonFiniteError
    from varctl.metrics.generation import StaleReference

    try:
        run(args.command, data, args.config)
    except (ConfigError, CheckpointMismatch, OutputsDiffer, StaleReference) as e:
        print(f"varctl: config error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, JobsFailed) as e:
        print(f"varctl: {e}", file=sys.stderr)
        return 1
    except SIGTERMException as e:  # preempted: last.ckpt is written (callbacks.preemption); not a success
        saved, command = getattr(e, "saved_path", None), getattr(e, "command", None)
        if saved:
            then = f"; resume: ckpt_path={saved}"
        elif command == "fit":
            then = "; no checkpoint was written (none asked for)"
        elif command == "predict":
            then = " before the next batch; the images written are kept (jobs skip them when run again)"
        elif command == "test":
            then = " after the batch; the scores so far are kept: the same command goes on from there"
        else:
            then = ""
        print(f"varctl: stopped by SIGTERM{then}", file=sys.stderr)
        return 128 + 15
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Destroy the process group a distributed run set up, while the interpreter is whole: gloo's worker
    threads left to interpreter shutdown can abort the process (SIGABRT, "terminate called without an active
    exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _check_run_root(root: str, config_file: str | Path) -> None:
    """run.root must be a directory this process can write in (or create): probed with a temporary file in
    its nearest existing folder, which is removed at once."""
    import tempfile

    from varctl.cli.config import ConfigError

    path = Path(root)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{config_file}: run.root = {root!r}: {existing} is a file, expected a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            f"{config_file}: run.root = {root!r}: cannot write in {existing} ({e.strerror or e}); "
            f"set run.root to a writable directory"
        ) from None


def _check_ckpt(ckpt: str | None, config_file: str | Path, command: str) -> None:
    """ckpt_path must be a readable checkpoint; the message names the damaged file and a good one beside it.
    A resumed fit removes the temporary files that a killed save left beside it; validate, test and predict
    never do: the checkpoint may belong to a run still training, whose save in progress that file is."""
    from varctl.checkpoints import check_checkpoint, remove_stale_temporaries
    from varctl.cli.config import ConfigError

    if ckpt is None:
        return
    path = Path(ckpt)
    try:
        check_checkpoint(path)
    except ValueError as e:
        raise ConfigError(f"{config_file}: ckpt_path: {e}") from None
    if command == "fit" and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        remove_stale_temporaries(path.parent)


def _run_dir(command: str, data: dict) -> tuple[str, str, str]:
    """(root, name, version). A resumed run continues in its own directory; DDP children share the version."""
    from varctl.cli.config import ConfigError

    run = data.get("run") or {}
    root, name = run.get("root", "runs"), run.get("name", "default")
    version = run.get("version") or os.environ.get(RUN_VERSION_ENV)
    ckpt = data.get("ckpt_path")
    launched_child = os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get(RUN_VERSION_ENV)
    if run.get("version") and command == "fit" and not ckpt and not launched_child:
        if (Path(root) / name / version / "checkpoints").exists():
            raise ConfigError(
                f"run.version={version}: {Path(root) / name / version} already holds checkpoints; "
                f"resume it with ckpt_path=<that run>/checkpoints/last.ckpt, or pick another run.version"
            )
    if version is None and ckpt and Path(ckpt).parent.name == "checkpoints":
        run_dir = Path(ckpt).resolve().parent.parent
        root, name, version = str(run_dir.parent.parent), run_dir.parent.name, run_dir.name
    if version is None:
        stamp = version = time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while (Path(root) / name / version).exists():  # two runs started in the same second
            version, n = f"{stamp}-{n}", n + 1
    os.environ[RUN_VERSION_ENV] = version  # inherited by the processes a DDP launcher starts
    return root, name, version


def _fresh(path: Path) -> Path:
    """``path``, or ``path`` with a numeric suffix when it exists: never overwrite an earlier run's output."""
    n, candidate = 1, path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate


def _build(data: dict, key: str, config_file: str | Path, **kwargs):
    """Instantiate the node at ``key`` (dotted: ``callbacks.nonfinite``) with ``kwargs``; a constructor's own
    check of its settings (ValueError, FileNotFoundError, Lightning's MisconfigurationException: messages
    that name the setting) becomes a ConfigError instead of a traceback through Hydra."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from varctl.cli.config import ConfigError

    node = data
    for part in key.split("."):
        node = node[part]
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError, MisconfigurationException)):
            raise ConfigError(f"{config_file}: {key}: {cause}") from cause
        raise


def _callback(data: dict, name: str, config_file: str | Path, given: dict | None):
    """The callback ``callbacks.<name>``; ``given``: arguments from the run (the run's config, its folder),
    passed to the constructor directly rather than through Hydra, which would read the config's values as
    its own nodes and interpolations."""
    key = f"callbacks.{name}"
    if not given:
        return _build(data, key, config_file)
    make = _build(data, key, config_file, _partial_=True)
    try:
        return make(**given)
    except ValueError as e:
        from varctl.cli.config import ConfigError

        raise ConfigError(f"{config_file}: {key}: {e}") from e


def run(command: str, data: dict, config_file: str | Path):
    """Build data, model and trainer from a validated config and run ``command``; returns the trainer."""
    previous = os.environ.get(RUN_VERSION_ENV)
    try:
        return _run(command, data, config_file)
    finally:  # several runs in one process (tools/demo.py, tests) must not share a run directory
        if previous is None:
            os.environ.pop(RUN_VERSION_ENV, None)
        else:
            os.environ[RUN_VERSION_ENV] = previous


def _display(trainer: dict, callbacks: list) -> list:
    """varctl's model summary and progress bar (varctl/callbacks/display.py) in place of Lightning's defaults,
    where the trainer shows them and the config names none of its own."""
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    from varctl.callbacks import display

    if not _RICH_AVAILABLE:  # Lightning's plain summary and tqdm bar
        return []
    shown = [("enable_model_summary", ModelSummary, display.ModelSummary),
             ("enable_progress_bar", ProgressBar, display.ProgressBar)]  # fmt: skip
    return [
        ours()
        for key, kind, ours in shown  # the key unset or null: Lightning shows it
        if trainer.get(key) is not False and not any(isinstance(c, kind) for c in callbacks)
    ]


def _run(command: str, data: dict, config_file: str | Path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from varctl.callbacks import EvaluationWriter, ImageWriter, PreemptionCheckpoint
    from varctl.checkpoints import AtomicCheckpointIO
    from varctl.cli.config import ConfigError, as_yaml
    from varctl.files import atomic_write_text

    _quiet_lightning()
    ckpt = data.get("ckpt_path")
    _check_ckpt(ckpt, config_file, command)  # before anything is built or written: a failed start, no run
    _check_run_root((data.get("run") or {}).get("root", "runs"), config_file)
    if data.get("seed") is not None:
        L.seed_everything(data["seed"], workers=True, verbose=False)
    root, name, version = _run_dir(command, data)
    logger = TensorBoardLogger(save_dir=root, name=name, version=version, default_hp_metric=False)
    log_dir = Path(logger.log_dir)

    datamodule = _build(data, "data", config_file)
    model = _build(data, "model", config_file)
    if not hasattr(model, "data_requirements") or not hasattr(datamodule, "connect"):
        raise ConfigError(
            f"{config_file}: model must define data_requirements() and data must define connect()"
        )
    _check_data(command, model, datamodule, config_file)
    if ckpt and hasattr(model, "check_fits"):
        model.check_fits(ckpt)  # weights that do not fit the model: CheckpointMismatch, nothing written yet
    if not ckpt and hasattr(model, "load_pending_weights"):
        try:  # files a new model reads (a frozen pretrained encoder); a checkpoint brings its own
            model.load_pending_weights()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{config_file}: {e}") from e

    named = (data.get("callbacks") or {}).items()
    # what a callback takes from the run rather than from its config node
    given = {"test_progress": {"directory": Path(root) / name / "test_progress", "run_config": data}}
    callbacks = [_callback(data, k, config_file, given.get(k)) for k, node in named if node]
    out_dir = _fresh(log_dir / "predictions")
    if getattr(datamodule, "output_dir", None) is not None:  # generation jobs write where the user says
        out_dir = Path(datamodule.output_dir)
        limit = data["trainer"].get("limit_predict_batches")
        whole = limit is None or (isinstance(limit, float) and limit == 1.0)  # the int 1 is one batch
        if command == "predict" and not whole:  # the stage's preview limit: not for jobs
            print(f"varctl predict: data=jobs draws every job (trainer.limit_predict_batches={limit} is for "
                  "the stage's own preview and does not apply)", flush=True)  # fmt: skip
            data["trainer"] = {**data["trainer"], "limit_predict_batches": None}
    if command == "predict":
        callbacks.append(ImageWriter(out_dir))
    if command == "test":  # <run>/eval/test.json: the scores with what produced them
        callbacks.append(EvaluationWriter(log_dir / "eval", data, ckpt))
    callbacks += _display(data["trainer"], callbacks)
    extra = {}  # callbacks.checkpoint=null: no checkpoints, rather than Lightning's default ModelCheckpoint
    if (
        not any(isinstance(c, ModelCheckpoint) for c in callbacks)
        and "enable_checkpointing" not in data["trainer"]
    ):
        extra["enable_checkpointing"] = False
    trainer = _build(data, "trainer", config_file, logger=logger, callbacks=callbacks, **extra)
    if command == "fit" and 0 in (trainer.max_steps, trainer.max_epochs):
        key = "max_steps" if trainer.max_steps == 0 else "max_epochs"
        raise ConfigError(f"{config_file}: trainer.{key}=0: fit would train nothing (-1: no limit)")
    if command == "fit" and hasattr(model, "check_trainer"):
        try:
            model.check_trainer(trainer)  # trainer settings the stage cannot train with: nothing written yet
        except ValueError as e:
            raise ConfigError(f"{config_file}: {e}") from e
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # atomic in their own folder, finite weights only

    if trainer.is_global_zero:
        log_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_fresh(log_dir / f"config_{command}.yaml"), as_yaml(data))
        print(
            f"varctl {command}: run directory {log_dir}  (tensorboard --logdir {Path(root) / name})",
            flush=True,
        )

    with warnings.catch_warnings():
        if _eval_modules_frozen(model):  # the frozen tokenizer (and backbone) are in eval mode on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        try:
            _call(trainer, command, model, datamodule, ckpt, out_dir)
        except SIGTERMException as e:  # for the message of main(): the command, what the preemption saved
            saved = [c.saved_path for c in callbacks if isinstance(c, PreemptionCheckpoint)]
            e.command, e.saved_path = command, saved[0] if saved else None
            raise
    return trainer


def _check_data(command: str, model, datamodule, config_file: str | Path) -> None:
    """The data (scanned here) and the files the command reads against the model, before anything of the
    run is written: each problem is a ConfigError naming the setting."""
    from varctl.cli.config import ConfigError

    try:
        datamodule.connect(**model.data_requirements())
        if hasattr(model, "check_controls"):
            model.check_controls(datamodule)  # before the scan, which would report the maps as missing
        datamodule.setup("fit" if command == "fit" else command)  # scan the data now: errors before the run
        if hasattr(model, "check_data"):
            model.check_data(datamodule)  # the data's classes and controls against the model
        if hasattr(datamodule, "check_scales") and hasattr(model, "var"):  # data=jobs: rows' per-scale lists
            datamodule.check_scales(model.var.config.num_scales)
        if command == "fit" and hasattr(model, "check_token_cache"):
            model.check_token_cache(datamodule)  # a stale or damaged cache, or data no cache can hold
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{config_file}: data: {e}") from e
    if command == "test" and getattr(model, "evaluation", None) is not None:
        from varctl.lit.evaluation import check_evaluation_weights

        try:  # the feature networks' files: a wrong one is refused now, not at the first test batch
            check_evaluation_weights(model.evaluation)
        except ValueError as e:
            raise ConfigError(f"{config_file}: {e}") from None


def _call(trainer, command: str, model, datamodule, ckpt: str | None, out_dir: Path) -> None:
    if command == "fit":
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    elif command == "validate":
        trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt)
    elif command == "test":
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)
    else:
        from varctl.callbacks.writer import ImageWriter, JobsFailed

        trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt, return_predictions=False)
        writer = next(c for c in trainer.callbacks if isinstance(c, ImageWriter))
        written, failed = writer.totals(trainer) or (None, 0)  # generation jobs: over all processes
        if trainer.is_global_zero and written != 0:
            print(f"varctl predict: images written to {out_dir}", flush=True)
        elif trainer.is_global_zero and not failed:
            print(f"varctl predict: nothing to draw, every job's image is in {out_dir} already "
                  "(data.overwrite=true redraws them)", flush=True)  # fmt: skip
        if failed:  # each was named as it failed; the ones written stay, and a rerun skips them
            kept = (
                f"the {written} written to {out_dir} are kept (a rerun skips them)"
                if written
                else "no image was written"
            )
            raise JobsFailed(f"{failed} generation job(s) failed (named above: 'skipped NAME: why'); {kept}")


NOISE = (
    "\N{ELECTRIC LIGHT BULB} Tip:",  # advertising
    "Trainer already configured with model summary callbacks",  # varctl's own summary (_display)
)


def _concerns_the_run(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(NOISE)


def _quiet_lightning() -> None:
    """Drop what Lightning prints on every run that does not concern the run: its advertising tips (litlogger,
    litmodels), its note that varctl's model summary replaces its own, and the deprecation warning that its
    own ``_pytree`` module raises in torch."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _concerns_the_run not in log.filters:
        log.addFilter(_concerns_the_run)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _eval_modules_frozen(model) -> bool:
    """Whether every module of ``model`` in eval mode lies in a frozen part of it (a module in eval mode with
    parameters, none of which trains: the tokenizer, a frozen backbone): then Lightning's warning about
    modules in eval mode at the start of training is about a choice, not a slip (a dropout left in eval
    mode in a block that trains still warns)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return False
    frozen = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if not module.training and params and not any(p.requires_grad for p in params):
            frozen.append(name)

    def inside(name: str) -> bool:
        return any(root == "" or name == root or name.startswith(f"{root}.") for root in frozen)

    return all(inside(name) for name, module in model.named_modules() if not module.training)


if __name__ == "__main__":
    raise SystemExit(main())
