"""The scan's check of the data files, and the report of what it skipped or resized.

Every image and control-map file that the datasets use is opened once, in a thread pool (PIL decodes without
the GIL, and threads hide the file system's latency), when the datamodule builds its datasets: a bad file is
skipped or refused before the first step, and all of them are named at once. `check_files`:

- "decode" (default): reads each file through, cheaply. A JPEG is decoded at 1/8 scale (`draft`: libjpeg's
  DCT scaling still entropy-decodes every block, so a truncated or corrupt file fails, for about 2/3 of a
  full decode); a PNG is `verify()`d (the CRC of every chunk up to IEND, without inflating the pixels);
  other image formats are loaded; control maps are read as the dataset reads them, so that their content
  is checked too (a colour depth map, an RGB segmentation map). Truncation is found through PIL's default
  `ImageFile.LOAD_TRUNCATED_IMAGES = False`, a global this leaves alone.
- "header": opens each file only: finds missing, empty and non-image files and reads the sizes that
  `max_aspect` and `on_size_mismatch` need, not truncated or corrupt pixel data.
- "trust": reads nothing before the run.

A sample with a file that cannot be used, or an image beyond `max_aspect`, is skipped or refused by
`on_bad_file`; a map of another size than its image is resized, skipped or refused by `on_size_mismatch`.
Whatever the settings, a file that fails during the run is skipped by FileDataset with a warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from datamodules.transforms import UNREADABLE, read_map, unreadable, upright_size
from varctl.files import atomic_write_text

CHECKS = ("decode", "header", "trust")
ON_BAD_FILE = ("skip", "error")
ON_SIZE_MISMATCH = ("resize", "skip", "error")
REPORT_NAME = "data_report.json"  # in the run directory, unless data.report_file names another path
SHOWN = 5  # bad files named in the warning line; the report and a refusal name them all

Key = tuple[str, "str | None"]  # (path, modality); None for an image


class BadFilesError(OSError, ValueError):
    """Data files that cannot be used. An OSError (it is about files) and a ValueError (what the CLI turns
    into a one-line config error), two bases as io.UnsupportedOperation has."""


class BadFileWarning(UserWarning):
    """A data file skipped or resized, at the scan or during the run."""


@dataclass(frozen=True)
class FileInfo:
    """What the scan learnt of one file: its (width, height) when opened, why it cannot be used ("" = it can),
    and whether that is because it cannot be read at all."""

    size: tuple[int, int] | None = None
    problem: str = ""
    unreadable: bool = False
    max_id: int | None = None  # a segmentation map's largest id (when read through)


def check_choice(value: str, choices: Sequence[str], key: str) -> str:
    if value not in choices:
        raise ValueError(f"data.{key} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_max_aspect(value: float | None) -> float | None:
    if value is not None and not float(value) >= 1.0:
        raise ValueError(f"data.max_aspect is long side / short side, >= 1 (null = any), got {value}")
    return None if value is None else float(value)


def aspect_problem(size: tuple[int, int], max_aspect: float | None) -> str:
    """Why an image of `size` (width, height) is refused by `max_aspect`; "" when it is not."""
    w, h = size
    ratio = max(w, h) / max(1, min(w, h))
    if max_aspect is None or ratio <= max_aspect:
        return ""
    return f"aspect ratio {ratio:.1f}:1 ({w} x {h} px) is beyond data.max_aspect={max_aspect:g}"


def size_problem(size: tuple[int, int], image: tuple[int, int]) -> str:
    """A map of `size` against its image's (width, height)."""
    return f"{size[0]} x {size[1]} px, its image {image[0]} x {image[1]} px"


def inspect_file(path: str, modality: str | None, check: str) -> FileInfo:
    """Open (and for "decode" read through) one image (`modality` None) or map file."""
    if not os.path.isfile(path):
        return FileInfo(problem="file not found", unreadable=True)
    if os.path.getsize(path) == 0:
        return FileInfo(problem="empty file (0 bytes)", unreadable=True)
    size = max_id = None
    try:
        with Image.open(path) as img:
            size = upright_size(img)  # as the loaders read it (EXIF orientation applied)
            if check == "decode" and modality is not None:
                values = read_map(img, modality)
                max_id = int(values.max()) if modality == "segmentation" and values.size else None
            elif check == "decode":
                _decode(img)
    except UNREADABLE as err:  # PIL's unidentified, truncated, broken-CRC and bad-chunk errors
        return FileInfo(problem=unreadable(err), unreadable=True)
    except ValueError as err:  # read_map: content that does not fit the modality
        return FileInfo(size=size, problem=str(err))
    return FileInfo(size=size, max_id=max_id)


def _decode(img: Image.Image) -> None:
    """The cheapest read of an image that still finds truncated and corrupt data (module docstring)."""
    if img.format == "JPEG":
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    elif img.format == "PNG":
        img.verify()
    else:
        img.load()


def inspect_files(keys: Iterable[Key], check: str) -> dict[Key, FileInfo]:
    """`inspect_file` of each (path, modality), in a thread pool; nothing is opened for "trust"."""
    keys = list(dict.fromkeys(keys))
    if check == "trust" or not keys:
        return {key: FileInfo() for key in keys}
    with ThreadPoolExecutor() as pool:  # min(32, CPUs + 4) threads
        return dict(zip(keys, pool.map(lambda key: inspect_file(*key, check), keys)))


@dataclass
class Verdicts:
    """The records of each split that are kept, and report entries (dicts) of the files skipped, resized and
    refused."""

    kept: dict[str, list]
    skipped: list[dict]
    resized: list[dict]
    refused: list[dict]


def sort_records(
    splits: Mapping[str, Sequence],
    infos: Mapping[Key, FileInfo],
    controls: Sequence[str],
    max_aspect: float | None,
    on_bad_file: str,
    on_size_mismatch: str,
) -> Verdicts:
    """Apply the policies to each record (`Record`: image, maps) from its files' `FileInfo`s."""
    verdicts = Verdicts({split: [] for split in splits}, [], [], [])
    for split, records in splits.items():
        for record in records:
            faults = []  # (entry, action)
            image = infos[(record.image, None)]
            reason = image.problem
            if not reason and image.size is not None:
                reason = aspect_problem(image.size, max_aspect)
            if reason:
                faults.append((_entry(split, record, record.image, "image", reason, image), on_bad_file))
            for modality in controls:
                path = record.maps.get(modality)
                if path is None:
                    continue
                info = infos[(path, modality)]
                if info.problem:
                    faults.append((_entry(split, record, path, modality, info.problem, info), on_bad_file))
                elif image.size and info.size and info.size != image.size:
                    entry = _entry(split, record, path, modality, size_problem(info.size, image.size))
                    entry["setting"] = f"data.on_size_mismatch={on_size_mismatch}"
                    if on_size_mismatch == "resize":
                        verdicts.resized.append(entry)
                    else:
                        faults.append((entry, on_size_mismatch))
            for entry, action in faults:
                entry.setdefault("setting", f"data.on_bad_file={on_bad_file}")
                (verdicts.refused if action == "error" else verdicts.skipped).append(entry)
            if not faults:
                verdicts.kept[split].append(record)
    return verdicts


def _entry(split: str, record, path: str, kind: str, reason: str, info: FileInfo | None = None) -> dict:
    entry = {"split": split, "sample": record.image, "file": path, "kind": kind, "reason": reason}
    if info is not None and info.unreadable:
        entry["unreadable"] = True
    return entry


def describe(entry: Mapping[str, Any]) -> str:
    """One report entry as a clause: `cannot read image file PATH: REASON`, `edges map file PATH: REASON`."""
    what = "image" if entry["kind"] == "image" else f"{entry['kind']} map"
    verb = "cannot read " if entry.get("unreadable") else ""
    return f"{verb}{what} file {entry['file']}: {entry['reason']}"


def refusal(refused: Sequence[Mapping[str, Any]]) -> BadFilesError:
    """The error naming every refused file and the setting that refused it."""
    settings = sorted({e["setting"] for e in refused})
    hints = []
    if any(s.startswith("data.on_bad_file") for s in settings):
        hints.append("set data.on_bad_file=skip to train without them")
    if any(s.startswith("data.on_size_mismatch") for s in settings):
        hints.append("set data.on_size_mismatch=resize to resize such maps to their image (skip: drop them)")
    return BadFilesError(
        f"{len(refused)} data file(s) refused ({', '.join(settings)}): "
        + "; ".join(describe(e) for e in refused)
        + f". Fix or remove them, or {', or '.join(hints)}"
    )


def summary(report: Mapping[str, Any], where: str) -> str:
    """The warning line of a scan that skipped or resized files (the first SHOWN of each named)."""
    parts = []
    for key, done in (("skipped", "skipped"), ("resized", "resized to their image's size")):
        entries = report[key]
        if entries:
            shown = "; ".join(describe(e) for e in entries[:SHOWN])
            more = f"; and {len(entries) - SHOWN} more" if len(entries) > SHOWN else ""
            settings = ", ".join(sorted({e["setting"] for e in entries}))
            parts.append(f"{len(entries)} file(s) {done} ({settings}): {shown}{more}")
    return f"data: {' | '.join(parts)}. All of them are listed in {where}"


def write_report(path: str, report: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def during_run_file(report_file: str) -> str:
    """The JSON-lines file beside the report where samples skipped during the run are appended."""
    return os.path.splitext(report_file)[0] + ".during_run.jsonl"


def log_event(path: str | None, event: Mapping[str, Any]) -> None:
    """Append one line to the during-run file (workers and ranks append whole lines; O_APPEND keeps them
    apart). A file that cannot be written costs the line, never the run."""
    if path is None:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
    except OSError:
        pass
