"""Lightning checkpoints that survive kills and divergence.

``AtomicCheckpointIO`` (the trainer's checkpoint plugin, set by the CLI) writes every checkpoint to a
temporary file in the checkpoint's own directory, fsyncs it and renames it over the target, whatever TMPDIR
is: a kill at any moment leaves the old file or the new one. It refuses to write weights that are not
finite, so a diverged run never replaces a good ``last.ckpt``. ``check_checkpoint`` reads a checkpoint
before a run starts and names the damaged file and the newest good one beside it. ``FitsCheckpoint`` (a base
of the stages' LightningModules) turns a checkpoint that does not fit the model a config built into an error
that names the settings in which the checkpoint's run differs.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from varctl.files import UnreadableFile, atomic_save, temporary_in_use, torch_load

TMP_SUFFIX = ".tmp"  # atomic_path's temporary files: .<name>.<pid>@<host>.<random>.tmp beside the target


# hyper-parameters that do not shape the weights: left out when a checkpoint does not fit (files, sampling,
# training settings); the stages add their models' own (``FitsCheckpoint.free_settings``)
NOT_SHAPING = frozenset(
    {"tokenizer", "init_from", "control_init_from", "token_cache", "compile_mode", "optimizer", "samples",
     "predict", "scores", "evaluation", "metric_annotators", "label_smoothing", "ema_warmup",
     "train_backbone", "alignment_weight", "scale_loss_weights", "scale_sampling", "recon_loss",
     "recon_weight", "vq_weight", "gradient_clip_val", "codebook"}
)  # fmt: skip


class NonFiniteError(FloatingPointError):
    """Training or sampling met NaN or inf values; the message names where."""


def nonfinite_tensors(state: dict[str, Any], masks: bool = False) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold NaN or inf. With ``masks``, -inf is
    allowed (attention masks are buffers of 0 and -inf); NaN and +inf never are."""

    def bad(t: torch.Tensor) -> bool:
        if masks:
            return bool(torch.isnan(t).any() or torch.isposinf(t).any())
        return not bool(torch.isfinite(t).all())

    return [n for n, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point() and bad(t)]


def short_list(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with saves atomic in the target's folder that refuse non-finite weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}), masks=True)
        if bad:
            raise NonFiniteError(
                f"not writing {path}: the weights at step {checkpoint.get('global_step')} are not finite "
                f"({short_list(bad)}); the checkpoints already written are kept"
            )
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a readable Lightning checkpoint, or None when it is one."""
    if path.is_dir():
        if (path / "meta.pt").is_file():  # a sharded checkpoint (FSDP, save_distributed_checkpoint=true)
            return None
        return "is a directory, expected a checkpoint file (a .ckpt under <run>/checkpoints/)"
    try:  # mmap (zip archives): the tensors are not read, only the archive's index and the pickled structure
        obj = torch_load(path, "checkpoint", mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        return "does not exist"
    except UnreadableFile as e:
        return e.reason
    if not isinstance(obj, dict) or "state_dict" not in obj:
        return "is not a Lightning checkpoint (no 'state_dict' entry)"
    return None


def good_checkpoints(folder: Path, exclude: Path | None = None) -> list[Path]:
    """The readable ``.ckpt`` files of ``folder``, newest first."""
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in found if p != exclude and _problem(p) is None]


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of checkpoints that a killed save left in ``folder``; returns them. A file
    that a live process may still be writing (a run still training there: ``temporary_in_use``) is kept."""
    found = [p for p in folder.glob(f".*.ckpt.*{TMP_SUFFIX}") if p.is_file()]
    stale = [p for p in found if not temporary_in_use(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` when ``path`` is not a readable checkpoint, naming the file, what is wrong and the
    newest good checkpoint beside it (or inside it, for a run directory)."""
    path = Path(path)
    problem = _problem(path)
    if problem is None:
        return
    folders = [path / "checkpoints", path, path.parent] if path.is_dir() else [path.parent]
    others = next((found for f in folders if f.is_dir() and (found := good_checkpoints(f, exclude=path))), [])
    offer = f"; the newest good one there is {others[0]} (ckpt_path={others[0]})" if others else ""
    raise ValueError(f"checkpoint {path} {problem}{offer}")


class CheckpointMismatch(RuntimeError):
    """A checkpoint whose weights do not fit the model that this run's config built."""


def _flat(d, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_differing(saved: dict | None, here: dict, free: tuple[str, ...] = ()) -> list[str]:
    """``model.KEY=<checkpoint's value> (here <this run's>)`` for each hyper-parameter that may shape the
    weights and differs between a checkpoint's run (``saved``) and this one, both having it. ``free``: more
    keys (flattened, e.g. ``var.cond_drop_rate``) that shape nothing."""
    if not saved:
        return []

    def shaping(hparams: dict) -> dict[str, Any]:
        flat = _flat(dict(hparams))
        return {k: v for k, v in flat.items() if k.split(".")[0] not in NOT_SHAPING and k not in free}

    def same(key: str, a, b) -> bool:
        if key == "ema_decay":  # an average is kept or not; its decay shapes nothing
            return ((a or 0) > 0) == ((b or 0) > 0)
        return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)

    a, b = shaping(saved), shaping(here)
    # a key only one side has is a setting of another version (its default there is not recorded)
    return [f"model.{k}={a[k]} (here {b[k]})" for k in sorted(a.keys() & b.keys()) if not same(k, a[k], b[k])]


def _shape_line(line: str) -> str:
    """torch's "size mismatch for K: copying a param with shape torch.Size([a, b]) from checkpoint, the shape
    in current model is torch.Size([c, d])." as "K (a, b) in the file, (c, d) here"."""
    m = re.search(r"size mismatch for (\S+): .*?Size\(\[(.*?)\]\).*?Size\(\[(.*?)\]\)", line)
    return f"{m[1]} ({m[2]}) in the file, ({m[3]}) here" if m else line.strip()


# the stages, by the model kind that marks their checkpoints' ``varctl`` entries (a control checkpoint holds
# its VAR and tokenizer too, a VAR checkpoint its tokenizer): most specific first
STAGES = {"control": "control stage", "var": "VAR stage", "vqvae": "tokenizer stage"}
STAGE_CONFIGS = {
    "control": "conf/control.yaml",
    "var": "conf/var.yaml or conf/var_text.yaml",
    "vqvae": "conf/tokenizer.yaml",
}


def stage_of(checkpoint: dict) -> str | None:
    """The stage (a key of STAGES) that wrote a varctl Lightning checkpoint, or None for another file."""
    entries = checkpoint.get("varctl")
    if not isinstance(entries, dict):
        return None
    return next((kind for kind in STAGES if kind in entries), None)


class FitsCheckpoint:
    """Mixed into the stages' LightningModules: a checkpoint whose state_dict does not fit (strict loading,
    as Lightning restores) raises ``CheckpointMismatch`` naming the file, the weights that differ and the
    settings of the checkpoint's run that differ from this config's, instead of torch's list of keys.
    ``check_fits`` does that before a trainer exists (the CLI calls it), for every strategy."""

    _saved_hparams: dict | None = None
    _checkpoint_path: str | None = None
    free_settings: tuple[str, ...] = ()  # flattened hyper-parameters of the models that shape no weight
    stage: str | None = None  # the model kind that marks this stage's checkpoints (STAGES)

    def check_fits(self, path: str | os.PathLike) -> None:
        """Load the checkpoint file ``path`` as Lightning will (its upgrades, strict): a file that does not
        fit raises ``CheckpointMismatch`` before anything of the run is written. Lightning then loads the
        same weights again. A sharded checkpoint (a folder) is read by its strategy alone."""
        if not Path(path).is_file():
            return
        checkpoint = torch_load(path, "checkpoint", mmap=zipfile.is_zipfile(path))
        self._checkpoint_path = str(path)
        theirs = stage_of(checkpoint)
        if self.stage is not None and theirs is not None and theirs != self.stage:
            hint = ""
            if (theirs, self.stage) == ("var", "control"):
                hint = "; a VAR to train a control branch on is model.init_from"
            if theirs == "vqvae":
                hint = "; a tokenizer to train on is model.tokenizer"
            raise CheckpointMismatch(
                f"{path} is a checkpoint of the {STAGES[theirs]}, and this config builds the "
                f"{STAGES[self.stage]}: use it with {STAGE_CONFIGS[theirs]}, or give this config a "
                f"checkpoint of the {STAGES[self.stage]}{hint}"
            )
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"], strict=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._saved_hparams = checkpoint.get("hyper_parameters")
        super().on_load_checkpoint(checkpoint)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        try:
            result = super().load_state_dict(state_dict, strict=False, assign=assign)
        except RuntimeError as e:  # tensors of other shapes: torch names them, one line each
            resized = re.findall(r"size mismatch for (\S+):", str(e))
            if not resized:
                raise
            shapes = [_shape_line(line) for line in str(e).splitlines() if "size mismatch" in line]
            # the keys that are missing or extra besides: the rest loaded on its own (the run stops anyway)
            rest = super().load_state_dict(
                {k: v for k, v in state_dict.items() if k not in resized}, strict=False, assign=assign
            )
            missing = [k for k in rest.missing_keys if k not in resized]
            raise CheckpointMismatch(self._mismatch(missing, rest.unexpected_keys, shapes)) from None
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointMismatch(self._mismatch(result.missing_keys, result.unexpected_keys))
        return result

    def _mismatch(self, missing=(), unexpected=(), shapes=()) -> str:
        trainer = getattr(self, "_trainer", None)
        path = getattr(trainer, "ckpt_path", None) or self._checkpoint_path or "the checkpoint"
        more = " ..." if len(shapes) > 2 else ""
        parts = [
            f"{len(unexpected)} of its weights have no place here ({short_list(list(unexpected), 3)})",
            f"{len(missing)} weights of this model are not in it ({short_list(list(missing), 3)})",
            f"{len(shapes)} weights have other shapes ({'; '.join(shapes[:2])}{more})",
        ]
        parts = [part for part, n in zip(parts, (unexpected, missing, shapes)) if n]
        differ = settings_differing(self._saved_hparams, dict(self.hparams), self.free_settings)
        hint = (
            f". Its run was trained with {short_list(differ, 6)}: give those settings on the command line"
            if differ
            else ". None of the settings its run recorded differs from this config's (a file of an earlier "
            "version records fewer): compare with the run's config_fit.yaml"
        )
        return f"{path} does not fit the model this config builds: " + "; ".join(parts) + hint


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, shapes, dtypes and values, in order): what a cache was made with.
    Under FSDP, this process's shards."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: its local shard
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")  # its bytes, no copy
    return h.hexdigest()
