"""Build network pickles in EDM's format without EDM: a stand-in ``torch_utils.persistence``.

EDM (NVlabs/edm) pickles its networks with ``torch_utils.persistence``: every class of
``training/networks.py`` and ``training/loss.py`` is wrapped by ``@persistence.persistent_class``; an
instance pickles as ``_reconstruct_persistent_obj(meta)`` where ``meta`` carries the *source of the
whole defining module*, the class name and the instance ``__dict__`` (which includes the constructor
arguments ``_init_args`` / ``_init_kwargs``). Loading with EDM's code executes that source.

``write_fake_edm(root)`` writes, under ``root``:
  torch_utils/persistence.py   the mechanism above (format version 6), minimal but with EDM's structure;
  training/networks.py         EDM's layer classes (this repository's models/songunet.py, which is
                               state_dict-compatible with EDM's) + EDMPrecond/VPPrecond written as in
                               EDM, all decorated as persistent classes;
  training/loss.py             EDMLoss as a persistent class.
``make_pickles(root, [(out, kwargs, 'EDMPrecond'), ...])`` runs a subprocess with ``root`` on sys.path that builds
``EDMPrecond(**kwargs)`` exactly as EDM's training loop does (keyword arguments only), perturbs its
weights, pickles ``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}`` like EDM's snapshots and saves
reference outputs D(x, sigma, labels) to ``<out>.ref.pt``.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PERSISTENCE = '''
"""Stand-in for EDM's torch_utils/persistence.py (format version 6)."""
import copy
import inspect
import sys
import types
import uuid

_version = 6
_decorators = set()
_module_to_src_dict = {}
_src_to_module_dict = {}


def persistent_class(orig_class):
    assert isinstance(orig_class, type)
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    _decorators.add(Decorator)
    return Decorator


def _reconstruct_persistent_obj(meta):
    assert meta["version"] == _version and meta["type"] == "class"
    module = _src_to_module(meta["module_src"])
    orig_class = module.__dict__[meta["class_name"]]
    obj = orig_class.__new__(orig_class)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(meta["state"])
    else:
        obj.__dict__.update(meta["state"])
    return obj


def _module_to_src(module):
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src):
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)
    return module
'''

PRECONDS = '''

# --- EDM's preconditioners (training/networks.py), as written there -------------------------------------
# Executing this module writes a sentinel when EDM_FIXTURE_SENTINEL is set: kdm must never execute it.
import os as _os
if _os.environ.get("EDM_FIXTURE_SENTINEL"):
    open(_os.environ["EDM_FIXTURE_SENTINEL"], "a").write("embedded source executed\\n")


@persistence.persistent_class
class VPPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) \\
            if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) \\
            if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
'''

LOSS = '''
import torch
from torch_utils import persistence


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)
'''

BUILD = '''
import json, pickle, sys
import torch
sys.path.insert(0, sys.argv[1])
from training import networks, loss


def build(out, kwargs, cls):
    torch.manual_seed(0)
    net = getattr(networks, cls)(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net = net.eval().requires_grad_(False).cpu()
    data = dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar.zip",
                                    use_labels=kwargs.get("label_dim", 0) > 0, xflip=False, cache=True))
    with open(out, "wb") as f:
        pickle.dump(data, f)
    g = torch.Generator().manual_seed(1)
    r, c = kwargs["img_resolution"], kwargs["img_channels"]
    x = torch.randn(4, c, r, r, generator=g) * 3
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    labels = torch.eye(kwargs["label_dim"])[torch.tensor([0, 1, 2, 1])] if kwargs.get("label_dim") else None
    ref = {"x": x, "sigma": sigma, "D": net(x, sigma, labels)}
    if labels is not None:
        ref["labels"] = labels
    torch.save(ref, out + ".ref.pt")


for job in json.loads(sys.argv[2]):
    build(*job)
'''


def networks_source() -> str:
    src = (REPO / "models" / "songunet.py").read_text()
    src = src.replace("from __future__ import annotations\n",
                      "from __future__ import annotations\n\nfrom torch_utils import persistence\n", 1)
    src = re.sub(r"^class (\w+)\(nn\.Module\):", r"@persistence.persistent_class\nclass \1(nn.Module):", src,
                 flags=re.M)
    return src + PRECONDS


def write_fake_edm(root: Path) -> Path:
    (root / "torch_utils").mkdir(parents=True, exist_ok=True)
    (root / "training").mkdir(exist_ok=True)
    (root / "torch_utils" / "__init__.py").write_text("")
    (root / "torch_utils" / "persistence.py").write_text(textwrap.dedent(PERSISTENCE))
    (root / "training" / "__init__.py").write_text("")
    (root / "training" / "networks.py").write_text(networks_source())
    (root / "training" / "loss.py").write_text(LOSS)
    return root


def make_pickles(root: Path, jobs: list[tuple[Path, dict, str]]) -> list[Path]:
    """One subprocess builds every (out, kwargs, class name) job."""
    res = subprocess.run([sys.executable, "-c", BUILD, str(root), json.dumps([(str(o), k, c) for o, k, c in jobs])],
                         capture_output=True, text=True, timeout=300, cwd=str(root))
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return [o for o, _, _ in jobs]
