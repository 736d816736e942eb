"""Teacher registry: one immutable JSON record per registered teacher under the artifact root.

Layout::

    <root>/registry/teachers/<id>.json     a RegisteredTeacher, written once (atomically), never changed

A registration says "this teacher should have a one-step student". The record names what was
registered (``uri``, ``kind``, ``sha256``) and the kdm teacher artifact that a distillation reads
(``teacher_uri``): the registered artifact itself for ``kdm`` / ``flow-matching``, or the artifact an
``edm-pkl`` network pickle was imported to. The id depends only on the kind and the sha256, so
registering the same teacher again finds the same record.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .common import SCHEMA_VERSION, Strict
from .datasets import DatasetRef

REGISTRY_DIR = "registry/teachers"
TEACHER_KINDS = ("edm-pkl", "kdm", "flow-matching")
TeacherKind = Literal["edm-pkl", "kdm", "flow-matching"]
# Short id prefix per kind: ids are file names and Prefect resource ids (kdm.teacher.<id>).
KIND_PREFIX = {"edm-pkl": "edmpkl", "kdm": "kdm", "flow-matching": "fm"}
SHA256 = Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")


class RegisteredTeacher(Strict):
    """One registration (``<root>/registry/teachers/<id>.json``)."""

    format: Literal["kdm-registered-teacher"] = "kdm-registered-teacher"
    schema_version: int = SCHEMA_VERSION
    id: str = Field(pattern=r"^[a-z]+-[0-9a-f]{16}$", description="<kind prefix>-<hash of kind + sha256>")
    uri: str = Field(description="what was registered: a kdm teacher artifact or an EDM network pickle")
    kind: TeacherKind
    sha256: str = SHA256
    sha256_of: Literal["pickle", "weights"] = Field(
        description="'pickle': sha256 of the edm-pkl file; 'weights': of the artifact's weights.safetensors")
    teacher_uri: str = Field(description="the kdm teacher artifact a distillation reads")
    teacher_id: str = Field(description="id in that artifact's manifest")
    model_kind: Literal["flow-matching-mlp", "edm"]
    img_resolution: Optional[int] = Field(None, description="EDM teachers: image size")
    img_channels: Optional[int] = None
    label_dim: int = Field(0, ge=0, description="number of classes; 0 = unconditional")
    dataset: Optional[DatasetRef] = None
    source: str = Field(description="where the teacher came from, in words")
    registered_at: str
    code_version: str

    @property
    def conditional(self) -> bool:
        return self.label_dim > 0

    @property
    def resource_id(self) -> str:
        """Prefect event resource id of this teacher."""
        return f"kdm.teacher.{self.id}"


def registry_path(root: str) -> str:
    return str(root).rstrip("/") + "/" + REGISTRY_DIR


def record_path(root: str, teacher_id: str) -> str:
    return f"{registry_path(root)}/{teacher_id}.json"
