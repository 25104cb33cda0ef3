"""Evaluation results as JSON files, and a comparison table across runs.

A results file (``<run>/eval/test.json``, ``test_1.json`` ... : never overwritten) holds every score of one
evaluation under ``metrics`` and everything that determines them under ``provenance``: checkpoint and
input files with their sha256, sampler settings per scale and seeds, the number of images, the metric
networks with their weights' sha256, the protocol of each control score, the reference statistics used,
the data settings and library versions. ``tools/evaluate.py --table runs/`` prints ``table`` of them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from varctl.files import atomic_write_text

FORMAT = "varctl-eval-1"


def fresh_path(directory: str | os.PathLike, stem: str) -> Path:
    """``<directory>/<stem>.json``, or ``<stem>_<n>.json`` when taken."""
    path, n = Path(directory) / f"{stem}.json", 1
    while path.exists():
        path, n = Path(directory) / f"{stem}_{n}.json", n + 1
    return path


def _plain(value):
    """JSON-able: floats that are not finite become strings (JSON has no NaN), tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_results(directory: str | os.PathLike, stem: str, metrics: Mapping, provenance: Mapping) -> Path:
    """Write a results file atomically under a fresh name; returns its path."""
    record = {"format": FORMAT, "metrics": _plain(dict(metrics)), "provenance": _plain(dict(provenance))}
    path = fresh_path(directory, stem)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def load_results(root: str | os.PathLike) -> list[tuple[Path, dict]]:
    """Every results file under ``root`` (a file, or a folder searched recursively), oldest first."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.json"), key=lambda p: p.stat().st_mtime)
    out = []
    for f in files:
        try:
            record = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("format") == FORMAT:
            out.append((f, record))
    return out


def table(results: Sequence[tuple[Path, dict]], columns: Sequence[str] | None = None, root=None) -> str:
    """A text table: a row per results file (its run folder and checkpoint hash), a column per score
    (``columns``, or every score any file holds; ``-`` where a file lacks it)."""
    if not results:
        return "(no results files)"
    if columns is None:
        seen: dict[str, None] = {}
        for _, r in results:
            seen.update(dict.fromkeys(k for k in r["metrics"] if not k.endswith("_std")))
        columns = list(seen)
    rows = []
    for path, r in results:
        where = path.parent.parent if path.parent.name == "eval" else path.parent
        name = str(where.relative_to(root)) if root is not None and where.is_relative_to(root) else str(where)
        ckpt = (r["provenance"].get("checkpoint") or {}).get("sha256") or ""
        cells = []
        for c in columns:
            v = r["metrics"].get(c)
            cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, (int, float)) else str(v))
        rows.append([f"{name}/{path.stem}", ckpt[:10]] + cells)
    header = ["results", "ckpt"] + list(columns)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
