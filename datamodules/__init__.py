"""LightningDataModules shared by the tokenizer, VAR and control stages; all yield the dict batch of base.py.

- SyntheticDataModule: procedural shapes with labels, captions and exact control maps (no files).
- ClassFolderDataModule: ImageFolder layout (root/<class>/*.jpg).
- CaptionListDataModule: .jsonl / .csv lists of image, caption[, label].
- ControlPairsDataModule: images with edges / depth / segmentation / sketch maps beside them (or annotators).
- ShardDataModule: shards written by tools/make_shards.py, streamed with litdata (local folder or bucket).
- GenerationJobs: predict-only inputs of generation jobs (maps, images + masks, out-painting; jobs.py).

Annotators are named in configs as `_target_` nodes, e.g. `{_target_: datamodules.CannyAnnotator, low: 100}`.
"""

from datamodules.annotators import (
    Annotator,
    CannyAnnotator,
    SketchAnnotator,
    TorchScriptAnnotator,
    TransformersDepthAnnotator,
    annotate,
)
from datamodules.base import BATCH_KEYS, VarDataModule
from datamodules.files import FileDataModule, FileDataset, Record
from datamodules.folders import (
    CaptionListDataModule,
    ClassFolderDataModule,
    ControlPairsDataModule,
    read_caption_list,
)
from datamodules.jobs import GenerationJobs
from datamodules.scenes import CLASS_NAMES
from datamodules.synthetic import SyntheticDataModule, SyntheticShapes
from datamodules.transforms import collate
from varctl.models.control import MODALITIES

__all__ = [
    "BATCH_KEYS",
    "CLASS_NAMES",
    "MODALITIES",
    "Annotator",
    "CannyAnnotator",
    "SketchAnnotator",
    "CaptionListDataModule",
    "ClassFolderDataModule",
    "ControlPairsDataModule",
    "FileDataModule",
    "FileDataset",
    "GenerationJobs",
    "Record",
    "ShardDataModule",
    "SyntheticDataModule",
    "SyntheticShapes",
    "TorchScriptAnnotator",
    "TransformersDepthAnnotator",
    "VarDataModule",
    "annotate",
    "collate",
    "read_caption_list",
]


def __getattr__(name):
    # litdata (and the boto3 stack it imports) loads only when shards are asked for
    if name == "ShardDataModule":
        from datamodules.shards import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
