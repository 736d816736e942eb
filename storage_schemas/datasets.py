"""Image-dataset format: a Zarr v3 group with one child group per split (``train``, ``test``).

Each split group holds ``images`` (uint8, (N, C, H, W), chunked along N) and ``label`` (int32, (N,),
the index into ``class_names``). The manifest below lives in the root group's attributes under the key
``kdm`` and is written last; the group is committed by renaming ``<url>.partial`` to ``<url>``.
Order inside a split: class names sorted, then file names sorted within each class.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .common import SCHEMA_VERSION, ArraySpec, Strict

DATASET_SPLITS = ("train", "test")
DATASET_ARRAYS = ("images", "label")


class DatasetSplitInfo(Strict):
    count: int = Field(ge=0)
    label_histogram: tuple[int, ...] = Field(description="images per class, in class_names order")
    arrays: dict[str, ArraySpec]
    content_hash: str = Field(description="sha256 over the raw bytes of images then label")

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetSplitInfo":
        if sum(self.label_histogram) != self.count:
            raise ValueError(f"label_histogram sums to {sum(self.label_histogram)}, count is {self.count}")
        missing = [a for a in DATASET_ARRAYS if a not in self.arrays]
        if missing:
            raise ValueError(f"arrays is missing {missing}")
        return self


class DatasetSource(Strict):
    """Which published file a dataset was prepared from (pipeline/data/sources.py). Releases of one dataset
    can differ in their pixels (the CIFAR-10 JPEG mirror is re-encoded), so every FD names its source."""

    id: str = Field(description="cifar10-python (the official release), cifar10-jpeg-mirror, or archive (not a "
                                "known file)")
    dataset: Optional[str] = Field(None, description="the dataset's name (cifar10); None for an unknown archive")
    file: str = Field(description="the published file name")
    format: Literal["cifar10-python", "image-folder"]
    url: Optional[str] = Field(None, description="where the published file is downloaded from (None: no URL)")
    checksum: str = Field(description="the published checksum, '<algorithm>:<hex>'")
    sha256: str = Field(min_length=64, max_length=64, description="sha256 of the file that was read")
    description: str
    note: str = Field(description="what the source means for comparing metrics (e.g. the JPEG mirror's pixels "
                                  "differ from the official release)")

    def text(self) -> str:
        """One phrase for reports: ``<description> (<checksum>): <note>``."""
        return f"{self.description} ({self.checksum}): {self.note}"


class DatasetManifest(Strict):
    format: Literal["kdm-dataset"] = "kdm-dataset"
    schema_version: int = SCHEMA_VERSION
    version: str = Field(min_length=8, description="content-addressed id of source + preparation recipe")
    kind: Literal["image-folder"] = "image-folder"
    class_names: tuple[str, ...] = Field(min_length=1)
    image_shape: tuple[int, int, int] = Field(description="(C, H, W) of every image")
    splits: dict[str, DatasetSplitInfo]
    chunk_size: int = Field(ge=1, description="images per Zarr chunk")
    source_uri: str
    source_sha256: str = Field(min_length=64, max_length=64)
    source: Optional[DatasetSource] = Field(None, description="the published file it was prepared from (None: "
                                                              "prepared before sources were recorded)")
    content_hash: str = Field(description="sha256 over the splits' content hashes, in sorted split order")
    prepare_seconds: float = Field(ge=0)
    code_version: str
    created: str

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetManifest":
        if not self.splits:
            raise ValueError("a dataset needs at least one split")
        unknown = [s for s in self.splits if s not in DATASET_SPLITS]
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; valid: {', '.join(DATASET_SPLITS)}")
        for name, info in self.splits.items():
            if len(info.label_histogram) != len(self.class_names):
                raise ValueError(f"splits.{name}.label_histogram has {len(info.label_histogram)} entries for "
                                 f"{len(self.class_names)} classes")
            shape = tuple(info.arrays["images"].shape)
            if shape != (info.count, *self.image_shape):
                raise ValueError(f"splits.{name}.arrays.images.shape {shape} != (count, *image_shape)")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class DatasetRef(Strict):
    """What a teacher was trained on."""

    version: str
    content_hash: str
    uri: str
    split: str = "train"
