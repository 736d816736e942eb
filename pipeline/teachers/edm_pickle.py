"""Import a released EDM network pickle (``edm-cifar10-32x32-uncond-vp.pkl`` ...) as a kdm teacher.

The format (NVlabs/edm ``torch_utils/persistence.py``, format version 6)
------------------------------------------------------------------------
A network pickle is a plain ``pickle`` of a dict ``{'ema': net, 'loss_fn': ..., 'augment_pipe': ...,
'dataset_kwargs': {...}}``. Every EDM class (EDMPrecond, SongUNet, UNetBlock, Conv2d, ... and
EDMLoss) is a *persistent class*: its instances pickle as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {'type': 'class', 'version': 6, 'module_src': <full source of the defining module>,
'class_name': 'EDMPrecond', 'state': <the instance __dict__>}``. The state of a torch module holds
``_parameters`` / ``_buffers`` / ``_modules`` (child modules: persistent objects again, or plain torch
containers such as ``torch.nn.ModuleDict``) and the constructor arguments ``_init_args`` /
``_init_kwargs``. Tensors are pickled by torch (``torch._utils._rebuild_tensor_v2`` over storages that
are themselves small ``torch.save`` blobs, ``torch.storage._load_from_bytes``). EDM's own loader executes
``module_src`` in a fresh module to rebuild the classes, so loading the file runs code from it, and it
needs EDM's ``torch_utils`` and ``dnnlib`` on ``sys.path``.

What this module does instead
-----------------------------
It never executes the embedded source and needs nothing of EDM: a restricted unpickler resolves only an
allowlist of globals (torch's tensor/storage rebuilders, OrderedDict, numpy scalars, torch.nn container
classes as inert stand-ins) and maps ``_reconstruct_persistent_obj`` to a record of ``meta``; nested
storages are read with ``torch.load(weights_only=True)``. From the record of ``ema`` it takes the state
dict (walking ``_parameters``/``_buffers``/``_modules`` like ``nn.Module.state_dict``) and the constructor
arguments, builds kdm's own preconditioner (models/edm.py) from them, loads the weights strictly and
writes a teacher artifact (``weights.safetensors`` + ``config.json`` + ``manifest.json`` with the
pickle's sha256 and origin). Because the rebuilt network is kdm's stock EDM whatever the pickle's code
says, the embedded source is compared with EDM's known ``training/networks.py`` layouts
(pipeline.teachers.edm_source) and the manifest records the match, or warnings saying what differs. Parsing a pickle is still parsing untrusted input, so it is refused unless
the caller opts in (``allow_pickle=True``) and pins the file's sha256.
"""
from __future__ import annotations

import copyreg
import inspect
import io
import logging
import math
import pickle
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import save as st_save

from models.edm import PRECONDS
from models.songunet import SongUNet
from storage_schemas import (EDMNetConfig, EDMPickleSource, TeacherManifest, code_version, recipe_version,
                             VersionInputs, utc_now)
from storage_schemas.kdm_image import SongUNetConfig
from storage_schemas.teacher import PRECOND_CLASSES, PRECOND_DEFAULTS

from pipeline.storage import artifacts
from pipeline.errors import KDMError
from pipeline.teachers.edm_source import check_network_source
from pipeline.teachers.flow_matching import build_edm_network, read_teacher_manifest

logger = logging.getLogger("kdm.edm_pickle")

PERSISTENCE_VERSION = 6
# EDM's default model_type per preconditioner (EDMPrecond defaults to ADM's DhariwalUNet).
EDM_DEFAULT_MODEL_TYPE = {"VPPrecond": "SongUNet", "VEPrecond": "SongUNet", "EDMPrecond": "DhariwalUNet"}
INTERFACE_KWARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "model_type")


class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have rebuilt, kept as data."""

    def __init__(self, meta: dict):
        if not isinstance(meta, dict):
            raise pickle.UnpicklingError("persistent object metadata is not a dict")
        self.type = meta.get("type")
        self.version = meta.get("version")
        self.class_name = meta.get("class_name")
        self.module_src = meta.get("module_src")
        self.state = meta.get("state") or {}
        if self.type != "class":
            raise pickle.UnpicklingError(f"persistent object of type {self.type!r}; only 'class' is known")

    def __repr__(self) -> str:
        return f"<persistent {self.class_name} (format {self.version})>"


class TorchModuleStub:
    """Inert stand-in for a torch.nn container (e.g. ModuleDict) found inside a persistent module."""

    torch_class = "?"

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else (state[0] or {})


class EasyDictStub(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict)."""


def _load_storage_bytes(b: bytes):
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype=dtype)[0] if data is not None else dtype.type()


def _numpy_reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"numpy reconstruct of {cls!r} refused")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("torch._tensor", "Tensor"): torch.Tensor,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
    ("dnnlib.util", "EasyDict"): EasyDictStub,
    ("dnnlib", "EasyDict"): EasyDictStub,
}
for _name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter", "_rebuild_parameter_with_state"):
    if hasattr(torch._utils, _name):
        _SAFE_GLOBALS[("torch._utils", _name)] = getattr(torch._utils, _name)
if hasattr(torch._tensor, "_rebuild_from_type_v2"):
    _SAFE_GLOBALS[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
_STUB_TYPES: dict[str, type] = {}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module.startswith("torch.nn.modules.") and name[:1].isupper():
            key = f"{module}.{name}"
            if key not in _STUB_TYPES:
                _STUB_TYPES[key] = type(name, (TorchModuleStub,), {"torch_class": key})
            return _STUB_TYPES[key]
        raise pickle.UnpicklingError(
            f"the pickle references {module}.{name}, which an EDM network pickle does not need; refusing to "
            f"resolve it (only torch tensors, torch.nn containers and EDM persistent objects are read)")


def _check_opt_in(src: str, actual: str, allow_pickle: bool, sha256: Optional[str]) -> None:
    if not allow_pickle:
        raise KDMError(
            f"refusing to unpickle {src}: a network pickle is executable content (EDM's loader runs the source "
            f"embedded in it; kdm reads it without running that code, but still parses untrusted pickle data). "
            f"Check where the file came from, then pass allow_pickle=True (CLI: --allow-pickle) together with "
            f"sha256={actual} (CLI: --sha256 {actual}); this file's sha256 is {actual}")
    if not sha256:
        raise KDMError(f"refusing to unpickle {src} without a pinned sha256: pass sha256 (CLI: --sha256) with the "
                       f"digest you expect; this file's sha256 is {actual}")
    if sha256.lower() != actual:
        raise KDMError(f"sha256 mismatch for {src}: pinned {sha256.lower()}, actual {actual}; the file is not the "
                       f"one you vetted (re-download it or update the pin after checking it)")


def read_edm_pickle(src: str, *, allow_pickle: bool = False, sha256: Optional[str] = None) -> tuple[dict, str]:
    """The pickled dict (persistent objects as PersistentRecord) and the file's sha256."""
    try:
        raw = artifacts.read_bytes(src)
    except FileNotFoundError:
        raise KDMError(f"EDM network pickle {src} does not exist") from None
    actual = artifacts.sha256_bytes(raw)
    _check_opt_in(src, actual, allow_pickle, sha256)
    try:
        data = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        raise KDMError(f"{src} is not a readable EDM network pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise KDMError(f"{src} is not a readable EDM network pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise KDMError(f"{src} holds a {type(data).__name__}, not EDM's dict of 'ema', 'loss_fn', ...")
    return data, actual


def _state_of(obj) -> dict:
    if isinstance(obj, PersistentRecord):
        return obj.state
    if isinstance(obj, TorchModuleStub):
        return getattr(obj, "state", {})
    raise KDMError(f"unexpected object {type(obj).__name__} inside the network (not a module)")


def module_state_dict(obj, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """``nn.Module.state_dict`` of a pickled module record: parameters, persistent buffers, children."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    st = _state_of(obj)
    for name, p in (st.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for name, b in (st.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b.detach()
    for name, child in (st.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, prefix + name + "."))
    return out


def _bound_kwargs(record: PersistentRecord) -> dict:
    cls = PRECONDS.get(record.class_name)
    if cls is None:
        raise KDMError(f"the network is a {record.class_name}; kdm reads {', '.join(PRECONDS)} (EDM preconditioners)")
    args = tuple(record.state.get("_init_args") or ())
    kwargs = dict(record.state.get("_init_kwargs") or {})
    if args:
        try:
            bound = inspect.signature(cls).bind_partial(*args, **kwargs)
        except TypeError as e:
            raise KDMError(f"constructor arguments of {record.class_name} do not fit EDM's signature: {e}") from None
        kwargs = dict(bound.arguments)
        kwargs.update(kwargs.pop("model_kwargs", {}))
    return kwargs


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def net_config_from_kwargs(class_name: str, kwargs: dict) -> EDMNetConfig:
    """EDMNetConfig from an EDM preconditioner's constructor kwargs (EDM's defaults fill the gaps)."""
    precond = {v: k for k, v in PRECOND_CLASSES.items()}.get(class_name)
    if precond is None:
        raise KDMError(f"{class_name} is not an EDM preconditioner kdm can rebuild ({', '.join(PRECOND_CLASSES.values())})")
    kw = {k: _plain(v) for k, v in kwargs.items()}
    model_type = kw.pop("model_type", EDM_DEFAULT_MODEL_TYPE[class_name])
    if model_type != "SongUNet":
        raise KDMError(f"the network's U-Net is {model_type}; kdm implements EDM's SongUNet (DDPM++/NCSN++) only")
    for key in ("img_resolution", "img_channels"):
        if key not in kw:
            raise KDMError(f"constructor arguments of {class_name} lack {key}")
    unet_params = inspect.signature(SongUNet).parameters
    unet_fields = set(SongUNetConfig.model_fields)
    unet = {name: unet_params[name].default for name in unet_fields}
    precond_kwargs = {}
    unknown = []
    for k, v in kw.items():
        if k in ("img_resolution", "img_channels", "label_dim", "use_fp16", "augment_dim"):
            continue
        if k in unet_fields:
            unet[k] = v
        elif k in PRECOND_DEFAULTS[precond]:
            default = PRECOND_DEFAULTS[precond][k]
            if not (v == default or (math.isinf(default) and math.isinf(float(v)))):
                precond_kwargs[k] = float(v)
        else:
            unknown.append(k)
    if unknown:
        raise KDMError(f"constructor arguments {sorted(unknown)} of {class_name} are unknown to kdm's EDM wrapper")
    try:
        return EDMNetConfig(precond=precond, img_resolution=kw["img_resolution"], img_channels=kw["img_channels"],
                            label_dim=kw.get("label_dim", 0), use_fp16=bool(kw.get("use_fp16", False)),
                            augment_dim=kw.get("augment_dim", 0), precond_kwargs=precond_kwargs,
                            unet=SongUNetConfig(**unet))
    except ValueError as e:
        raise KDMError(f"constructor arguments of {class_name} are outside what kdm supports: {e}") from None


def extract_network(data: dict, key: str = "ema") -> tuple[EDMNetConfig, "OrderedDict[str, torch.Tensor]", PersistentRecord]:
    if key not in data:
        raise KDMError(f"the pickle has no entry {key!r} (entries: {', '.join(map(str, data))})")
    rec = data[key]
    if not isinstance(rec, PersistentRecord):
        raise KDMError(f"entry {key!r} is a {type(rec).__name__}, not an EDM persistent network")
    if rec.version != PERSISTENCE_VERSION:
        raise KDMError(f"entry {key!r} uses persistence format {rec.version}; kdm reads format {PERSISTENCE_VERSION}")
    cfg = net_config_from_kwargs(rec.class_name, _bound_kwargs(rec))
    return cfg, module_state_dict(rec), rec


def embedded_sources(obj) -> list[str]:
    """The ``module_src`` of every persistent object in a pickled network (the network and its children)."""
    out = []
    if isinstance(obj, PersistentRecord) and obj.module_src:
        out.append(obj.module_src)
    if isinstance(obj, (PersistentRecord, TorchModuleStub)):
        for child in (_state_of(obj).get("_modules") or {}).values():
            out += embedded_sources(child)
    return out


def edm_teacher_id_inputs(pickle_sha256: str, key: str) -> VersionInputs:
    return VersionInputs.of("edm", recipe_version(), "edm-pickle", pickle_sha256, key)


def edm_teacher_id(pickle_sha256: str, key: str) -> str:
    return edm_teacher_id_inputs(pickle_sha256, key).version


def import_edm_pickle(src: str, out: str, *, allow_pickle: bool = False, sha256: Optional[str] = None,
                      key: str = "ema") -> TeacherManifest:
    """Convert an EDM network pickle into a teacher artifact at ``out`` (a no-op if it is there)."""
    data, actual = read_edm_pickle(src, allow_pickle=allow_pickle, sha256=sha256)
    version = edm_teacher_id(actual, key)
    if artifacts.check_target(out, version, read_teacher_manifest):
        return read_teacher_manifest(out)
    cfg, state, rec = extract_network(data, key)
    net = build_edm_network(cfg)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise KDMError(f"the weights of {src}[{key!r}] do not fit the rebuilt {rec.class_name}: {e}") from None
    loss = None
    loss_rec = data.get("loss_fn")
    if isinstance(loss_rec, PersistentRecord):
        loss = {k: float(v) for k, v in loss_rec.state.items() if isinstance(v, (int, float, np.generic))
                and not isinstance(v, bool)} or None
    layout, source_warnings = check_network_source(embedded_sources(rec))
    for w in source_warnings:
        logger.warning("%s: %s", src, w)
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
    tmp = artifacts.begin(out, fresh=True)
    artifacts.write_bytes(artifacts.join(tmp, "weights.safetensors"), weights)
    artifacts.write_json(artifacts.join(tmp, "config.json"), cfg)
    name = str(src).rstrip("/").rsplit("/", 1)[-1]
    manifest = TeacherManifest(
        id=version, version_inputs=edm_teacher_id_inputs(actual, key), kind="edm", model=cfg,
        weights_sha256=artifacts.sha256_bytes(weights), source=EDMPickleSource(uri=str(src), sha256=actual, key=key, class_name=rec.class_name,
                               persistence_version=rec.version, loss=loss, network_source=layout,
                               source_warnings=source_warnings),
        origin=f"imported from EDM network pickle {name} (sha256 {actual}, entry {key!r}) by kdm teacher import-edm",
        code_version=code_version(), created=utc_now())
    artifacts.write_json(artifacts.join(tmp, artifacts.MANIFEST), manifest)
    artifacts.commit(out)
    return manifest
