"""Generation jobs: what ``predict`` draws for a user's own inputs (``data=jobs``), with no train/val data.

A job is one output image. Its inputs are control maps (control-to-image), an image and a mask (in-painting,
or editing with a new class or caption), an image alone with ``outpaint`` set (out-painting), or, in a list,
no file but a ``label`` or ``caption`` and a ``name`` (a sample of a class or text model: for example the
images of an FID set, drawn as resumable jobs), given as

- a folder (``root``): one subfolder per modality (``edges/``, ``depth/``, ``segmentation/``) and optionally
  ``images/`` and ``masks/``, files matched by stem; or
- a list (``list``): a .jsonl (one object per line) or .csv (header row) with the columns ``name``, the
  modalities, ``image``, ``mask``, ``label``, ``caption``, ``seed``, ``outpaint`` (jsonl: an object) and the
  sampling overrides ``cfg``, ``control_cfg``, ``control_strength``, ``top_k``, ``top_p``, ``temperature``.
  Paths are relative to the list file.

Every job writes ``<output>/<name>.png`` (``<name>_<k>.png`` with ``samples_per_input`` > 1). An output that
exists is skipped, so a rerun resumes an interrupted job (``overwrite=true`` redraws). A job's seed comes
from ``seed`` and its name (or its row's ``seed``), so an image does not depend on the batch size, the order
or the number of processes. A job whose files cannot be read is reported by name and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.annotators import annotate, check_annotators, default_annotators
from datamodules.base import VarDataModule
from datamodules.files import list_images, stem
from datamodules.transforms import (
    MODALITIES,
    as_tv_tensor,
    batch_map,
    check_controls,
    image_to_tensor,
    load_image,
    load_map,
    map_to_tensor,
    resize_crop,
)
from varctl.models.sampling import check_sampling_args

OVERRIDES = ("cfg", "control_cfg", "control_strength", "top_k", "top_p", "temperature")
CONTROL_OVERRIDES = ("control_cfg", "control_strength")  # a VAR without a control branch has none
COLUMNS = ("name", *MODALITIES, "image", "mask", "label", "caption", "seed", "outpaint", *OVERRIDES)
SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
RECORD = "jobs_settings.jsonl"  # in the output folder: what each of its images was drawn with


class OutputsDiffer(ValueError):
    """The output folder's images were drawn with other settings than this run's (GenerationJobs.record)."""


OUTPAINT_KEYS = ("scale", "x", "y")


@dataclass(frozen=True)
class Job:
    """One output image: its name, input files and per-job settings; ``where`` names it in messages."""

    name: str
    maps: Mapping[str, str] = field(default_factory=dict)
    image: str | None = None
    mask: str | None = None
    label: int = -1
    caption: str = ""
    seed: int | None = None
    outpaint: Mapping[str, float] | None = None
    overrides: Mapping[str, object] = field(default_factory=dict)
    where: str = ""

    @property
    def sampling(self) -> bool:
        """A sample of its label or caption alone: no input file."""
        return not self.maps and self.image is None


def check_outpaint(value, where: str) -> dict[str, float] | None:
    """``{scale, x, y}``: the input takes ``scale`` of the canvas side, placed at fractions x, y of the free
    room (0 left/top, 1 right/bottom); None: no out-painting."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - set(OUTPAINT_KEYS):
        raise ValueError(f"{where}: outpaint must be a mapping with keys {OUTPAINT_KEYS}, found {value!r}")
    try:
        out = {"scale": 0.5, "x": 0.5, "y": 0.5, **{k: float(v) for k, v in value.items()}}
    except (TypeError, ValueError):
        raise ValueError(f"{where}: outpaint values must be numbers, found {value!r}") from None
    if not 0 < out["scale"] < 1 or not all(0 <= out[k] <= 1 for k in ("x", "y")):
        raise ValueError(f"{where}: outpaint needs 0 < scale < 1 and x, y in [0, 1], found {out}")
    return out


def job_seed(seed: int, name: str) -> int:
    """The seed of a job from the job's seed and its name (stable across processes and Python runs)."""
    return zlib.crc32(f"{int(seed)}/{name}".encode()) & 0x7FFFFFFF


def scan_folder(root: str, controls: Sequence[str], control_dirs: Mapping[str, str], image_dir: str,
                mask_dir: str) -> list[Job]:  # fmt: skip
    """Jobs of a folder: every stem found in a modality folder, or in ``image_dir`` (maps then come from
    annotators; a mask in ``mask_dir`` makes it an in-painting job)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: directory not found: {root}")

    def index(folder: str) -> dict[str, str]:
        path = os.path.join(root, folder)
        found: dict[str, str] = {}
        for file in list_images(path) if os.path.isdir(path) else []:
            if stem(file) in found:
                raise ValueError(f"two files share the stem {stem(file)!r}: {found[stem(file)]} and {file}")
            found[stem(file)] = file
        return found

    maps = {m: index(control_dirs.get(m, m)) for m in controls}
    images, masks = index(image_dir), index(mask_dir)
    names = sorted({n for files in maps.values() for n in files} | set(images))
    folded: dict[str, str] = {}
    for n in names:  # on macOS and Windows names that differ in case are one output file
        if n.casefold() in folded:
            raise ValueError(f"data.root={root}: the stems {folded[n.casefold()]!r} and {n!r} differ only in "
                             "case; their outputs would be one file")  # fmt: skip
        folded[n.casefold()] = n
    if not names:
        folders = [control_dirs.get(m, m) for m in controls] + [image_dir]
        raise FileNotFoundError(f"data.root={root}: no image files in any of {folders}")
    stray = sorted(set(masks) - set(images))
    if stray:
        raise ValueError(
            f"data.root={root}: masks {stray[:5]} have no image of the same stem in {image_dir}/"
        )
    return [
        Job(
            name=n,
            maps={m: files[n] for m, files in maps.items() if n in files},
            image=images.get(n),
            mask=masks.get(n),
            where=os.path.join(root, "*", n),
        )  # fmt: skip
        for n in names
    ]


def read_job_list(path: str, controls: Sequence[str]) -> list[Job]:
    """Jobs of a .jsonl or .csv list (see the module docstring); errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.list: file not found: {path}")
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            rows = []
            for line, text in enumerate(f, start=1):
                if text.strip():
                    try:
                        rows.append((line, json.loads(text)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line}: invalid JSON: {err}") from err
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = [
                (reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}) for row in reader
            ]
    else:
        raise ValueError(f"data.list={path} must end with .jsonl or .csv")
    base = os.path.dirname(os.path.abspath(path))
    jobs, seen = [], {}
    for line, row in rows:
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, found {type(row).__name__}")
        row = {k: v for k, v in row.items() if v is not None}  # JSON null: not given, as an empty CSV cell
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"{where}: unknown column(s) {unknown}; known: {list(COLUMNS)}")
        extra = [m for m in MODALITIES if m in row and m not in controls]
        if extra:
            raise ValueError(f"{where}: maps {extra} given but data.controls is {list(controls)}")
        files = {k: os.path.join(base, str(row[k])) for k in (*controls, "image", "mask") if k in row}
        if "mask" in files and "image" not in files:
            raise ValueError(f"{where}: a mask needs the image it applies to (column 'image')")
        sampling = not files and ("label" in row or "caption" in row)  # a class or caption, drawn anew
        if not files and not sampling:
            raise ValueError(
                f"{where}: a job needs control maps ({list(controls)}), an image, or (to draw a sample) a "
                "label or caption"
            )
        if sampling and "name" not in row:
            raise ValueError(f"{where}: a sampling job (a label or caption, no input file) needs a name")
        name = str(row["name"]) if "name" in row else stem(files.get("image") or next(iter(files.values())))
        if not name or "/" in name or "\\" in name or ".." in Path(name).parts:
            raise ValueError(f"{where}: the name {name!r} must be a file name inside the output folder (not "
                             "empty, no path separator, no '..')")  # fmt: skip
        if name.casefold() in seen:  # on macOS and Windows names that differ in case are one file
            other = seen[name.casefold()]
            raise ValueError(f"{where}: the name {name!r} is used by line {other} too (outputs would clash)")
        seen[name.casefold()] = line
        outpaint = row.get("outpaint")
        try:
            if isinstance(outpaint, str):  # a .csv cell
                outpaint = json.loads(outpaint)
            label = _integer(row["label"], "label") if "label" in row else -1
            seed = _integer(row["seed"], "seed") if "seed" in row else None
            if seed is not None and not 0 <= seed < 2**63:
                raise ValueError(f"seed {seed} out of range, expected an integer in [0, 2**63)")
            overrides = {k: _override(k, row[k]) for k in OVERRIDES if k in row}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        outpaint = check_outpaint(outpaint, where)
        if outpaint is not None and "image" not in files:  # maps alone have nothing to place on a canvas
            raise ValueError(f"{where}: outpaint needs an image (column 'image')")
        jobs.append(
            Job(
                name=name,
                maps={m: files[m] for m in controls if m in files},
                image=files.get("image"),
                mask=files.get("mask"),
                label=label,
                caption=str(row.get("caption", "")),
                seed=seed,
                outpaint=outpaint,
                overrides=overrides,
                where=where,
            )  # fmt: skip
        )
    if not jobs:
        raise ValueError(f"data.list={path} holds no jobs")
    return jobs


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, default=str, sort_keys=True).encode()).hexdigest()[:16]


def _read_record(path: str) -> tuple[dict[str, dict], dict[str, tuple[str, str]]]:
    """(settings by id, (row digest, settings id) by image name: the last line wins) of a RECORD file."""
    settings, images = {}, {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a killed run: its image was not recorded
                    continue
                if "settings_id" in entry:
                    settings[entry["settings_id"]] = entry["settings"]
                elif "image" in entry:
                    images[entry["image"]] = (entry["row"], entry["settings"])
    return settings, images


def _changes(old: Mapping, new: Mapping) -> list[str]:
    """The settings that differ between two settings records, in words."""
    found = []
    for section in ("model", "data"):
        a, b = old.get(section) or {}, new.get(section) or {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        found += [f"{section}.{k} was {_short(a.get(k))}, now {_short(b.get(k))}" for k in keys]
    return found


def _append(path: str, entries: list[dict]) -> None:
    """Whole lines appended in one write (O_APPEND: processes writing at once do not interleave them)."""
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


def _integer(value, key: str) -> int:
    """A JSON integer or a CSV cell holding one: a bool or a fraction is refused, not rounded."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass  # refused below
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be an integer, found {value!r}")


def _override(key: str, value) -> float | list[float]:
    """A sampling override (a CSV cell or JSON value): a finite number or a per-scale list of them, top_k,
    top_p and temperature in the ranges the sampler takes (one value per scale: ``check_scales``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip().startswith("[") else float(value)
        except ValueError:
            pass  # refused below, as the text it is
    values = value if isinstance(value, list) else [value]
    if not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError(f"{key} must be a finite number or a per-scale list of them, found {value!r}")
    values = [float(v) for v in values]
    if key == "top_k":  # the sampler's own checks
        check_sampling_args(values, [], [])
    elif key == "top_p":
        check_sampling_args([], values, [])
    elif key == "temperature":
        check_sampling_args([], [], values)
    return values if isinstance(value, list) else values[0]


def check_output(output: str) -> None:
    """``data.output`` must be a folder this process can write in, or one it can make: probed with a
    temporary file in its nearest existing folder, removed at once, before a run directory is made."""
    path = Path(output).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(
            f"data.output={output} is a file: expected a folder (made if missing)"
            if existing == path
            else f"data.output={output}: {existing} is a file, so the folder cannot be made there"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"data.output={output}: cannot make files in {existing} ({e.strerror or e}): set "
                         "data.output to a folder you can write in") from None  # fmt: skip


class JobDataset(Dataset):
    """Jobs -> sample dicts: the batch keys of base.py plus ``name``, ``seed``, ``overrides``, ``present``
    (the modalities given), ``mask`` (1, H, W) with 1 where new content is drawn, ``edit`` and ``error``."""

    def __init__(
        self,
        items: list[tuple[Job, str, int]],
        resolution: int,
        controls: Sequence[str],
        annotators: Mapping[str, Callable],
        crop: str,
        outpaint: Mapping[str, float] | None,
    ):
        self.items, self.resolution, self.controls = items, int(resolution), tuple(controls)
        self.annotators, self.outpaint = dict(annotators), outpaint
        self.geometry = resize_crop(self.resolution, crop, random=False)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        job, name, seed = self.items[index]
        R = self.resolution
        sample = {
            "name": name, "seed": seed, "overrides": dict(job.overrides), "label": job.label,
            "caption": job.caption, "image": torch.zeros(3, R, R), "mask": torch.zeros(1, R, R),
            "edit": False, "has_image": False, "present": (), "control": {}, "error": "",
        }  # fmt: skip
        try:
            sample.update(self._load(job))
        except (OSError, ValueError) as err:  # one bad input is reported and skipped, the job goes on
            sample["error"] = f"{job.where or job.name}: {err}"
        except Exception as err:  # anything else too (a StopIteration would end the loader's whole epoch)
            sample["error"] = f"{job.where or job.name}: {type(err).__name__}: {err}"
        return sample

    def _load(self, job: Job) -> dict:
        R = self.resolution
        if job.sampling:  # its label or caption alone: nothing to load
            return {}  # (a control model refuses it before the run: check_conditions)
        if job.maps and not self.controls and job.mask is None and job.outpaint is None and not self.outpaint:
            raise ValueError(f"control maps {sorted(job.maps)} need a control model (conf/control.yaml)")
        image = None if job.image is None else load_image(job.image)
        files = {m: load_map(path, m) for m, path in job.maps.items() if m in self.controls}
        if job.mask is not None:
            files["mask"] = load_map(job.mask, "edges")  # white (>= half) = redraw
        if image is None and not files:  # maps this model does not take, and no image to draw around
            raise ValueError(
                f"control maps {sorted(job.maps)} need a control model (conf/control.yaml)"
                if job.maps and not self.controls
                else f"none of its inputs is one this model takes (control maps {list(self.controls)})"
            )
        reference = image if image is not None else next(iter(files.values()))
        sizes = {k: tuple(t.shape[-2:]) for k, t in files.items()}
        wrong = {k: v for k, v in sizes.items() if v != tuple(reference.shape[-2:])}
        if wrong:  # one crop must fit all of a job's inputs: a map or mask of another size is refused
            what = "image" if image is not None else next(iter(files))
            raise ValueError(
                f"the {what} is {tuple(reference.shape[-2:])} (H, W) but {wrong} differ: a job's maps and "
                "mask must have its image's size"
            )
        if image is None:
            _, files = self.geometry(as_tv_tensor(torch.zeros_like(reference[:1]), "depth"), files)
        else:
            image, files = self.geometry(image, files)
        out: dict = {}
        outpaint = job.outpaint or (self.outpaint if job.mask is None else None)
        mask = files.pop("mask", None)
        if image is not None:
            pixels = image.permute(1, 2, 0).numpy()
            for m in self.controls:  # the missing maps of a photo come from its annotators
                if m not in files and self.annotators.get(m) is not None:
                    files[m] = as_tv_tensor(map_to_tensor(annotate(self.annotators[m], pixels, m), m), m)
            out.update(image=image_to_tensor(image), has_image=True)
            if outpaint is not None:
                out["image"], mask, files = _place(out["image"], files, outpaint, R)
            if mask is not None:
                out.update(mask=mask.as_subclass(torch.Tensor).float(), edit=True)
        out["control"] = {m: batch_map(files[m], m) for m in self.controls if m in files}
        out["present"] = tuple(out["control"])
        if not out["present"] and not out.get("edit"):
            raise ValueError("no control map and nothing to repaint (give maps, a mask or outpaint)")
        return out


def _place(image: torch.Tensor, maps: dict, outpaint: Mapping[str, float], R: int):
    """Out-painting: the image (and its maps) shrunk to ``scale`` of the canvas at (x, y); the mask is the
    rest of the canvas. Maps stay only where the image is (0 elsewhere: no edges, far, background)."""
    side = max(1, round(outpaint["scale"] * R))
    top, left = round((R - side) * outpaint["y"]), round((R - side) * outpaint["x"])
    canvas = torch.zeros(3, R, R)  # grey in [-1, 1]: the known content is only the placed image
    canvas[:, top : top + side, left : left + side] = F.interpolate(
        image[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )[0]
    mask = torch.ones(1, R, R)
    mask[:, top : top + side, left : left + side] = 0
    placed = {}
    for m, t in maps.items():
        t = t.as_subclass(torch.Tensor)
        small = F.interpolate(
            t[None].float(), size=(side, side), mode="bilinear" if m == "depth" else "nearest"
        )
        full = torch.zeros(1, R, R, dtype=torch.float32)
        full[:, top : top + side, left : left + side] = small[0]
        placed[m] = as_tv_tensor(full.to(t.dtype), m)
    return canvas, mask, placed


def collate_jobs(samples: list[dict]) -> dict:
    """Stack job samples; a modality missing from some samples is zero there (``present`` says which)."""
    modalities = [m for m in MODALITIES if any(m in s["control"] for s in samples)]
    control = {}
    for m in modalities:
        like = next(s["control"][m] for s in samples if m in s["control"])
        control[m] = torch.stack([s["control"].get(m, torch.zeros_like(like)) for s in samples])
    return {
        "job": True,
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64),
        "caption": [s["caption"] for s in samples],
        "control": control,
        **{
            k: [s[k] for s in samples]
            for k in ("name", "seed", "overrides", "present", "edit", "has_image", "error")
        },  # fmt: skip
    }


class JobShares(DistributedSampler):
    """Process r of n draws jobs r, r + n, r + 2n ...: each job once. A share may be empty: a job list
    resumed near its end can hold fewer jobs than processes, which Lightning's own sampler refuses."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(range(rank, len(dataset), num_replicas))
        self.num_samples, self.total_size = len(self.indices), len(dataset)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class GenerationJobs(VarDataModule):
    """Predict-only data: the user's inputs for control-to-image, in-painting, out-painting and editing.

    Args:
        root: a folder of modality folders (and ``images/``, ``masks/``); or
        list: a .jsonl / .csv job list (module docstring); exactly one of the two.
        output: where the images go; default ``<root>/generated`` (``<list folder>/generated``).
        controls: the modalities the model takes (maps of other modalities are an error).
        control_dirs, image_dir, mask_dir: folder names inside ``root``.
        annotators: modality -> annotator, for jobs with an image but no map (edges: Canny by default).
        outpaint: {scale, x, y}: every job with an image and no mask is out-painted (rows may set their own).
        samples_per_input: images per job, ``<name>_<k>.png`` when > 1.
        seed: the job's seed; each image's seed comes from it and the image's name.
        overwrite: redraw outputs that exist (default: skip them, so a rerun resumes).
        sheets: also write ``<name>_sheet.png``: controls | sample | input image (when given).
        keep_input: in-, out-painting and editing keep the input's own pixels outside the mask (blended over
            a few pixels inside its edge); false: the decoder's output everywhere (``varctl.lit.jobs``).
        batch_size, num_workers, resolution, crop: see VarDataModule.
    """

    def __init__(
        self,
        root: str | None = None,
        list: str | None = None,  # noqa: A002 (the config key users write)
        output: str | None = None,
        controls: Sequence[str] = ("edges",),
        control_dirs: Mapping[str, str] | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
        annotators: Mapping[str, Callable] | None = None,
        outpaint: Mapping[str, float] | None = None,
        samples_per_input: int = 1,
        seed: int = 0,
        overwrite: bool = False,
        sheets: bool = False,
        keep_input: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        resolution: int | None = None,
        crop: str = "center",
    ):
        super().__init__(batch_size, num_workers, resolution, crop, seed=seed)
        self.save_settings(ignore=["annotators"])
        if (root is None) == (list is None):
            raise ValueError("data=jobs needs exactly one of data.root (a folder) and data.list (jsonl/csv)")
        if int(samples_per_input) < 1:
            raise ValueError(f"data.samples_per_input must be >= 1, found {samples_per_input}")
        self.root, self.list = root, list
        self.controls = check_controls(controls)
        self.control_dirs = {m: m for m in MODALITIES} | {m: str(d) for m, d in (control_dirs or {}).items()}
        self.image_dir, self.mask_dir = str(image_dir), str(mask_dir)
        self.annotators = {**default_annotators(), **check_annotators(annotators)}
        self.outpaint = check_outpaint(outpaint, "data.outpaint")
        self.samples_per_input, self.overwrite, self.sheets = int(samples_per_input), bool(overwrite), sheets
        self.keep_input = bool(keep_input)
        where = root if root is not None else os.path.dirname(os.path.abspath(list))
        self.output_dir = str(output) if output is not None else os.path.join(where, "generated")
        check_output(self.output_dir)
        self.counts = {"jobs": 0, "skipped": 0}
        self._done: dict[str, str] = {}  # the finished outputs' row digests (items)
        self._job_digests: dict[str, str] = {}
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a process may have no job left

    def jobs(self) -> list[Job]:
        if self.root is not None:
            return scan_folder(self.root, self.controls, self.control_dirs, self.image_dir, self.mask_dir)
        return read_job_list(self.list, self.controls)

    def items(self) -> list[tuple[Job, str, int]]:
        """(job, output name, seed) of every image still to draw: a job whose outputs all exist (its image
        and, with sheets, its sheet, which is written first) is skipped. Two jobs whose outputs would be one
        file (names equal but for case, ``x_sheet`` beside ``x``'s sheet, ``x_0`` beside ``x``'s first
        sample) are refused before anything is drawn."""
        items, skipped, taken, done = [], 0, {}, {}
        jobs = self.jobs()
        inputs = {os.path.realpath(f) for job in jobs for f in (*job.maps.values(), job.image, job.mask) if f}
        for job in jobs:
            for k in range(self.samples_per_input):
                name = job.name if self.samples_per_input == 1 else f"{job.name}_{k}"
                files = [f"{name}.png"] + ([f"{name}_sheet.png"] if self.sheets else [])
                for file in files:
                    path = os.path.join(self.output_dir, file)
                    if os.path.realpath(path) in inputs:  # would pass for a finished output, or be replaced
                        where = job.where or job.name
                        raise ValueError(f"{where}: its output {path} is an input file of the jobs: set "
                                         "data.output to another folder")  # fmt: skip
                    if file.casefold() in taken:
                        raise ValueError(
                            f"{job.where or job.name}: its output {file} is also an output of "
                            f"{taken[file.casefold()]}: rename one of them"
                        )
                    taken[file.casefold()] = job.where or job.name
                base = job.seed if job.seed is not None else self.seed
                seed = job_seed(base, name) if job.seed is None or k else job.seed
                if not self.overwrite and all(
                    os.path.isfile(os.path.join(self.output_dir, f)) for f in files
                ):
                    skipped += 1
                    done[name] = self._job_digest(job, seed)
                    continue
                items.append((job, name, seed))
        self.counts = {"jobs": len(items) + skipped, "skipped": skipped}
        self._done = done  # name -> row digest of the outputs found finished
        self._job_digests = {**done, **{name: self._job_digest(job, seed) for job, name, seed in items}}
        rank_zero_info(
            f"data=jobs: {len(items)} images to draw, {skipped} skipped (in {self.output_dir} already; "
            "data.overwrite=true redraws them)"
        )
        if not items:  # the predict loop does not run: the summary is given here
            _print(f"varctl predict: 0 written, {skipped} skipped (existing), 0 failed, in {self.output_dir}")
        return items

    def record(self, model: Mapping, write: bool = True) -> None:
        """Check the images already in the output folder against this run; ``write``: note this run's
        settings in ``RECORD`` (rank zero; the others only check). ``RECORD`` is a log: a line per run's
        settings (``model``: the weights' digests and sampling section; this data's settings), and a line per
        image once it is written (``drawn``: its name, row digest and settings). An image of other settings,
        or of a job whose row has changed since, is not taken for a finished output: OutputsDiffer, unless
        ``overwrite``. Images without a line (an earlier varctl, or put there) are kept, with a warning."""
        data = {"seed": self.seed, "samples_per_input": self.samples_per_input, "outpaint": self.outpaint,
                "crop": self.crop, "resolution": self.resolution, "keep_input": self.keep_input}  # fmt: skip
        settings = json.loads(json.dumps({"model": model, "data": data}, default=str))
        self._settings_id = _digest(settings)
        path = os.path.join(self.output_dir, RECORD)
        recorded, images = _read_record(path)
        if self._done and not self.overwrite:
            unknown = [n for n in self._done if n not in images]
            rows = [n for n, d in self._done.items() if n in images and images[n][0] != d]
            other = sorted({images[n][1] for n in self._done if n in images} - {self._settings_id})
            if rows or other:
                what = [c for sid in other for c in _changes(recorded.get(sid) or {}, settings)][:6]
                if rows:
                    what.append(f"the rows of {len(rows)} job(s) changed: {', '.join(rows[:5])}"
                                f"{' ...' * (len(rows) > 5)}")  # fmt: skip
                raise OutputsDiffer(
                    f"{self.output_dir} holds images drawn with other settings ({'; '.join(what)}; per "
                    f"{RECORD}): set data.overwrite=true to draw them again, or data.output to another folder"
                )
            if unknown:
                rank_zero_warn(f"{self.output_dir}: {len(unknown)} existing images have no record of their "
                               f"settings ({RECORD}); they are kept as finished")  # fmt: skip
        if write and self._settings_id not in recorded:
            os.makedirs(self.output_dir, exist_ok=True)
            _append(path, [{"settings_id": self._settings_id, "settings": settings}])

    def drawn(self, names: Sequence[str]) -> None:
        """Note images just written (``ImageWriter``), with the row and settings they were drawn with."""
        sid = getattr(self, "_settings_id", None)
        if sid is not None and names:
            entries = [{"image": n, "row": self._job_digests.get(n), "settings": sid} for n in names]
            _append(os.path.join(self.output_dir, RECORD), entries)

    def _job_digest(self, job: Job, seed: int) -> str:
        """What a job's image depends on in its row: its files (relative to the folder or list, so that the
        data may move), label, caption, outpaint, overrides and seed; not its line number."""
        base = self.root if self.root is not None else os.path.dirname(os.path.abspath(self.list))
        row = {k: v for k, v in dataclasses.asdict(job).items() if k != "where"}
        for key in ("image", "mask"):
            row[key] = None if row[key] is None else os.path.relpath(row[key], base)
        row["maps"] = {m: os.path.relpath(f, base) for m, f in sorted(job.maps.items())}
        return _digest([row, seed])

    def check_conditions(self, num_classes: int | None) -> None:
        """The jobs to draw against the model that draws them (its number of classes; None: a text model): a
        job it cannot draw (``_cannot_draw``), a label it lacks, a caption for a class model or a label for a
        text model (which would be ignored) refuse the run before anything is drawn, naming the row and how
        many others are refused with it."""
        dataset = self.dataset("predict")
        jobs = {id(job): job for job, _, _ in dataset.items}.values()  # a job once, not once per sample
        refused = [
            (job, why) for job in jobs if (why := self._cannot_draw(job, dataset.controls, num_classes))
        ]
        if refused:
            (job, why), more = refused[0], [j.name for j, _ in refused[1:]]
            also = f" ({len(more)} more job(s) refused too: {', '.join(more[:5])}{' ...' * (len(more) > 5)})"
            raise ValueError(f"{job.where or job.name}: {why}{also * bool(more)}")

    def _cannot_draw(self, job: Job, controls: Sequence[str], num_classes: int | None) -> str | None:
        """Why this model can never draw ``job`` (a job list's row or a folder's stem), or None."""
        edit = job.mask is not None or job.outpaint is not None or self.outpaint is not None
        if not controls and job.maps and not (job.image is not None and edit):
            return (f"control maps {sorted(job.maps)} need a control model (conf/control.yaml); this VAR has "
                    "no control branch")  # fmt: skip
        if not controls and job.image is not None and not edit:
            return ("an image with neither a mask nor outpaint: a VAR without a control branch has nothing "
                    "to draw (give a mask, white = redraw, or outpaint)")  # fmt: skip
        if controls and job.sampling:
            return (f"a sampling job (no input file), but a control model draws from control maps "
                    f"{list(controls)}: give them")  # fmt: skip
        made = [m for m in controls if m in job.maps or self.annotators.get(m) is not None]
        if controls and job.image is not None and not made and not edit:
            return (f"an image without control maps {list(controls)}, and data.annotators makes none of "
                    "them: give its maps, a mask or outpaint")  # fmt: skip
        control_only = [k for k in CONTROL_OVERRIDES if k in job.overrides]
        if not controls and control_only:
            return f"{control_only} apply to a control model only; this VAR has no control branch"
        if num_classes is None and job.label != -1:
            return f"label {job.label} given, but the model is text-conditioned: give a caption"
        if num_classes is not None and job.caption:
            return "caption given, but the model is class-conditioned: give a label (none: unconditional)"
        if num_classes is not None and not -1 <= job.label < num_classes:
            return (f"label {job.label} out of range, the model has {num_classes} classes: expected "
                    f"[0, {num_classes}) (none: unconditional)")  # fmt: skip
        return None

    def check_scales(self, num_scales: int) -> None:
        """The rows' per-scale sampling lists against the model's number of scales (the command line calls
        it with the model, before the run starts): each needs one value per scale."""
        for job in {id(job): job for job, _, _ in self.dataset("predict").items}.values():
            for key, value in job.overrides.items():
                if isinstance(value, list) and len(value) != num_scales:
                    raise ValueError(
                        f"{job.where or job.name}: {key} holds {len(value)} values, but the model draws "
                        f"{num_scales} scales: give one value per scale, or one number for all"
                    )

    def build_datasets(self) -> dict[str, Dataset]:
        controls = self.controls if self.wants("control") else ()  # a VAR without control: no maps
        return {"predict": JobDataset(self.items(), self.resolution, controls, self.annotators, self.crop,
                                      self.outpaint)}  # fmt: skip

    def predict_dataloader(self) -> DataLoader:
        """Lightning asks for it once the weights are in place (a checkpoint restored) and before any batch,
        also when nothing is left to draw: the output folder's images are checked against the model here
        (``record``)."""
        dataset, trainer = self.dataset("predict"), self.trainer
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        if world > 1 and type(trainer.strategy).__name__ in SHARDED:
            raise ValueError(
                f"data=jobs runs on one process or under DDP, not {type(trainer.strategy).__name__} (a "
                "process with no job left would leave the others waiting in the sharded model's "
                "collectives): use trainer=gpu or trainer=ddp"
            )
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if hasattr(module, "job_settings"):
            self.record(module.job_settings(), write=trainer.is_global_zero)
        sampler = JobShares(dataset, world, trainer.global_rank) if world > 1 else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate_jobs)  # fmt: skip

    def _fit_only(self, *_):
        raise ValueError(
            "data=jobs holds generation inputs for `predict` only; train and validate on a dataset"
        )

    train_dataloader = val_dataloader = test_dataloader = _fit_only
