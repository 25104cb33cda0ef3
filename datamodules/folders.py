"""Real data on disk: class folders, image + caption lists, and image / control-map pairs.

Every layout has either explicit split folders (root/train, root/val, optionally root/test) or one root split
deterministically by `val_fraction` and `seed`. Paths in caption lists are relative to the list file.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_warn

from datamodules.base import split_indices
from datamodules.files import MAX_ASPECT, FileDataModule, Record, list_images, stem
from datamodules.transforms import MODALITIES, check_modalities, is_image_file


def _split_roots(root: str, inner: str = "") -> dict[str, str] | None:
    """{"train": root/train, "val": root/val[, "test": root/test]} when root/train/<inner> exists, else None;
    a missing root is an error."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: directory not found: {root}")
    if not os.path.isdir(os.path.join(root, "train", inner)):
        return None
    if not os.path.isdir(os.path.join(root, "val", inner)):
        raise FileNotFoundError(
            f"{root} has a train/ split but no val/ split: add {os.path.join(root, 'val')}"
        )
    names = ("train", "val", "test")
    return {n: os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n, inner))}


def _by_fraction(records: list[Record], val_fraction: float, seed: int, what: str) -> dict[str, list[Record]]:
    train, val = split_indices(len(records), val_fraction, seed, what)
    return {"train": [records[i] for i in train], "val": [records[i] for i in val]}


def _scan_root(
    root: str, records_of: Callable[[str], list[Record]], val_fraction: float, seed: int, inner: str = ""
) -> dict[str, list[Record]]:
    """The records of root/train, root/val (and root/test) when root has split folders, else of root split
    by `val_fraction`; `records_of(folder)` reads one folder."""
    roots = _split_roots(root, inner)
    if roots:
        return {split: records_of(folder) for split, folder in roots.items()}
    return _by_fraction(records_of(root), val_fraction, seed, f"data.root={root}")


def _subfolders(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


class ClassFolderDataModule(FileDataModule):
    """ImageFolder layout root/<class>/<image>; class names sorted; label = index of the class folder.

    Args:
        root: a folder of class folders, or one holding train/ and val/ (and optionally test/) class folders.
        controls, annotators: control maps computed with annotators (see ControlPairsDataModule).
        batch_size, num_workers, resolution, crop, flip, val_fraction, seed: see VarDataModule.
        check_files, on_bad_file, max_aspect, report_file: the check of the files, see FileDataModule.
    """

    def __init__(
        self,
        root: str,
        controls: Sequence[str] = (),
        annotators: Mapping[str, Callable] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        resolution: int | None = None,
        crop: str = "center",
        flip: float = 0.0,
        val_fraction: float = 0.05,
        seed: int = 0,
        check_files: str = "decode",
        on_bad_file: str = "skip",
        max_aspect: float | None = MAX_ASPECT,
        report_file: str | None = None,
    ):
        super().__init__(
            controls, annotators, batch_size, num_workers, resolution, crop, flip, val_fraction, seed,
            check_files=check_files, on_bad_file=on_bad_file, max_aspect=max_aspect, report_file=report_file,
        )  # fmt: skip
        self.save_settings(ignore=["annotators"])
        self.root = str(root)
        self._classes: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """The class folders of root/train, or of root when it has no split folders."""
        if self._classes is None:
            roots = _split_roots(self.root)
            folder = roots["train"] if roots else self.root
            self._classes = _subfolders(folder)
            if not self._classes:
                raise FileNotFoundError(f"data.root: no class folders in {folder}")
        return self._classes

    def _records(self, folder: str) -> list[Record]:
        classes = {name: i for i, name in enumerate(self.class_names)}
        found = _subfolders(folder)
        unknown = [d for d in found if d not in classes]
        if unknown:
            raise ValueError(
                f"{folder} has class folders {unknown} missing from the train classes {list(classes)}"
            )
        records = []
        for name in found:
            files = _images_under(os.path.join(folder, name))
            if not files:
                raise FileNotFoundError(f"class folder {os.path.join(folder, name)} holds no image files")
            records += [Record(image=f, label=classes[name]) for f in files]
        return records

    def scan(self) -> dict[str, list[Record]]:
        return _scan_root(self.root, self._records, self.val_fraction, self.seed)


def read_caption_list(path: str, require_files: bool = True) -> list[Record]:
    """Records of a .jsonl (one object per line) or .csv (header row) list with image, caption[, label];
    a listed image that does not exist raises FileNotFoundError unless `require_files` is false (the
    datamodule's check of the files skips or refuses it with the other bad files)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption list not found: {path}")
    if path.endswith(".jsonl"):
        rows = _jsonl_rows(path)
    elif path.endswith(".csv"):
        rows = _csv_rows(path)
    else:
        raise ValueError(f"caption list {path} must end with .jsonl or .csv")
    base = os.path.dirname(os.path.abspath(path))
    records = []
    for line, row in rows:
        where = f"{path}:{line}"
        for key in ("image", "caption"):
            if row.get(key) is None:
                raise ValueError(f"{where}: missing key {key!r}")
            if not str(row[key]).strip():
                why = " (the null caption is learnt through model.var.cond_drop_rate)" * (key == "caption")
                raise ValueError(f"{where}: the {key} is empty{why}")
        image = os.path.join(base, str(row["image"]))
        if require_files and not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: image file not found: {image}")
        label = row.get("label")
        try:
            label = -1 if label in (None, "") else int(label)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label must be an integer, got {label!r}") from None
        records.append(Record(image=image, label=label, caption=str(row["caption"])))
    if not records:
        raise ValueError(f"caption list {path} has no entries")
    return records


def _jsonl_rows(path: str) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line}: invalid JSON: {err}") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
            rows.append((line, row))
    return rows


def _csv_rows(path: str) -> list[tuple[int, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in ("image", "caption") if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {missing}; found {reader.fieldnames}")
        return [(reader.line_num, row) for row in reader]


class CaptionListDataModule(FileDataModule):
    """Images with captions (and optional integer labels) listed in .jsonl or .csv files.

    Args:
        train_list: list file of the train split (or of all data when val_list is None).
        val_list: list file of the val split; None = hold out val_fraction of train_list.
        controls, annotators: control maps computed with annotators (see ControlPairsDataModule).
        batch_size, num_workers, resolution, crop, flip, val_fraction, seed: see VarDataModule.
        check_files, on_bad_file, max_aspect, report_file: the check of the files, see FileDataModule.
    """

    def __init__(
        self,
        train_list: str,
        val_list: str | None = None,
        controls: Sequence[str] = (),
        annotators: Mapping[str, Callable] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        resolution: int | None = None,
        crop: str = "center",
        flip: float = 0.0,
        val_fraction: float = 0.05,
        seed: int = 0,
        check_files: str = "decode",
        on_bad_file: str = "skip",
        max_aspect: float | None = MAX_ASPECT,
        report_file: str | None = None,
    ):
        super().__init__(
            controls, annotators, batch_size, num_workers, resolution, crop, flip, val_fraction, seed,
            check_files=check_files, on_bad_file=on_bad_file, max_aspect=max_aspect, report_file=report_file,
        )  # fmt: skip
        self.save_settings(ignore=["annotators"])
        self.train_list, self.val_list = str(train_list), None if val_list is None else str(val_list)

    def scan(self) -> dict[str, list[Record]]:
        records = read_caption_list(self.train_list, require_files=False)
        if self.val_list is not None:
            return {"train": records, "val": read_caption_list(self.val_list, require_files=False)}
        return _by_fraction(records, self.val_fraction, self.seed, f"data.train_list={self.train_list}")

    @property
    def num_classes(self) -> int | None:
        """1 + the largest label in the lists; None when no entry has a label."""
        labels = [r.label for records in self.splits.values() for r in records]
        return max(labels) + 1 if max(labels) >= 0 else None


class ControlPairsDataModule(FileDataModule):
    """Images with control maps beside them, matched by file stem: root/images/x.jpg + root/edges/x.png ...

    A modality whose map file (or folder) is missing is computed on the fly by its annotator from the resized
    and cropped image: canny for edges by default; depth and segmentation need `annotators` set.

    Args:
        root: a folder with `image_dir` and the map folders, or one holding train/ and val/ (and optionally
            test/) folders laid out that way.
        controls: the modalities to load when the model asks for "control"
            (edges, depth, segmentation, sketch).
        image_dir: folder of the images inside root (or inside each split folder).
        control_dirs: modality -> folder of its maps (default: the modality's name).
        caption_dir: folder of <stem>.txt captions (a missing file gives the caption "").
        annotators: modality -> annotator (a callable uint8 (H, W, 3) image -> map); configs give `_target_`
            nodes, e.g. {edges: {_target_: datamodules.CannyAnnotator, low: 100, high: 200},
            depth: {_target_: datamodules.TorchScriptAnnotator, path: dpt.pt},
            segmentation: {_target_: pkg.module.function, _partial_: true}}. Edges default to Canny.
        batch_size, num_workers, resolution, crop, flip, val_fraction, seed: see VarDataModule.
        check_files, on_bad_file, max_aspect, on_size_mismatch, report_file: the check of the files (a map
            of another size than its image: on_size_mismatch), see FileDataModule.
    """

    def __init__(
        self,
        root: str,
        controls: Sequence[str] = ("edges",),
        image_dir: str = "images",
        control_dirs: Mapping[str, str] | None = None,
        caption_dir: str = "captions",
        annotators: Mapping[str, Callable] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        resolution: int | None = None,
        crop: str = "center",
        flip: float = 0.0,
        val_fraction: float = 0.05,
        seed: int = 0,
        check_files: str = "decode",
        on_bad_file: str = "skip",
        max_aspect: float | None = MAX_ASPECT,
        on_size_mismatch: str = "resize",
        report_file: str | None = None,
    ):
        super().__init__(
            controls, annotators, batch_size, num_workers, resolution, crop, flip, val_fraction, seed,
            check_files=check_files, on_bad_file=on_bad_file, max_aspect=max_aspect,
            on_size_mismatch=on_size_mismatch, report_file=report_file,
        )  # fmt: skip
        self.save_settings(ignore=["annotators"])
        self.root, self.image_dir, self.caption_dir = str(root), str(image_dir), str(caption_dir)
        self.control_dirs = {m: m for m in MODALITIES}
        check_modalities(control_dirs or {}, "data.control_dirs")
        self.control_dirs.update({m: str(d) for m, d in (control_dirs or {}).items()})

    def _records(self, folder: str) -> list[Record]:
        image_dir = os.path.join(folder, self.image_dir)
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"data.image_dir: folder not found: {image_dir}")
        maps = {m: _index_by_stem(os.path.join(folder, self.control_dirs[m])) for m in self.controls}
        records = []
        for name, image in _index_by_stem(image_dir).items():  # x.jpg and x.png: refused
            caption_file = os.path.join(folder, self.caption_dir, name + ".txt")
            caption = ""
            if os.path.isfile(caption_file):
                with open(caption_file, encoding="utf-8") as f:
                    caption = f.read().strip()
            found = {m: index[name] for m, index in maps.items() if name in index}
            records.append(Record(image=image, caption=caption, maps=found))
        images = {stem(r.image) for r in records}
        for modality, index in maps.items():  # maps are matched to images by stem: name the ones left over
            unmatched = sorted(path for name, path in index.items() if name not in images)
            if not unmatched:
                continue
            shown = ", ".join(os.path.basename(p) for p in unmatched[:3]) + " ..." * (len(unmatched) > 3)
            where = os.path.dirname(unmatched[0])
            what = (f"{len(unmatched)} {modality} map file(s) in {where} match no image of {image_dir} by "
                    f"name ({shown}); maps go with the image of their stem")  # fmt: skip
            if len(unmatched) == len(index):  # none matches: a naming scheme, not a stray file
                raise ValueError(f"{what}: name each like its image (images/x.png, {modality}/x.png)")
            rank_zero_warn(f"{what}: they are not used")
        return records

    def scan(self) -> dict[str, list[Record]]:
        return _scan_root(self.root, self._records, self.val_fraction, self.seed, inner=self.image_dir)


def _images_under(top: str) -> list[str]:
    """The image files under ``top``, folder by folder in sorted order; linked folders are followed (as a
    linked class folder is), each real folder once, so a link back up is no loop."""
    seen, folders = set(), []
    for dirpath, dirnames, names in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        folders.append((dirpath, names))
    return [os.path.join(d, f) for d, names in sorted(folders) for f in sorted(names) if is_image_file(f)]


def _index_by_stem(folder: str) -> dict[str, str]:
    """stem -> image or map file in `folder` ({} when the folder does not exist); two files of one stem are
    refused (they would share a map or caption)."""
    if not os.path.isdir(folder):
        return {}
    index: dict[str, str] = {}
    for path in list_images(folder):
        name = stem(path)
        if name in index:
            raise ValueError(f"two files share the stem {name!r}: {index[name]} and {path}")
        index[name] = path
    return index
