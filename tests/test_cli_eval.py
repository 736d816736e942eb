import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as plain `pytest`

from pipeline.cli import metrics as cli_eval
from pipeline.evaluation import image_metrics as im
from pipeline.errors import KDMError
from storage_schemas import SeedRange  # noqa: E402
from storage_schemas.protocol import ExtractorRef  # noqa: E402

torch.set_num_threads(1)


class Means(torch.nn.Module):
    ref = ExtractorRef(id="means-v1", sha256="e" * 64, feature_dim=3, input_resize="none")

    def forward(self, x):
        return x.float().mean((2, 3))


def parser():
    p = argparse.ArgumentParser(prog="kdm")
    cli_eval.add_commands(p.add_subparsers(dest="command"))
    return p


def report(tmp_path, name, seeds):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (60, 3, 4, 4), dtype=np.uint8)
    ref = im.reference_stats(imgs, dataset_id="toy", split="train", extractor=Means(), root=str(tmp_path / "root"))
    ms = im.distribution_metrics(imgs[:30], Means(), ref, subject=name, seeds=seeds, with_kid=False)
    return im.write_report(im.make_report(ms), str(tmp_path / name))


def test_metrics_compare_refuses_other_protocols(tmp_path, capsys):
    a = report(tmp_path, "a", SeedRange(start=0, stop=30))
    b = report(tmp_path, "b", SeedRange(start=0, stop=30))
    c = report(tmp_path, "c", SeedRange(start=30, stop=60))
    p = parser()
    args = p.parse_args(["metrics", "compare", a, b])
    args.fn(args)
    out = capsys.readouterr().out
    assert "| FD-means-v1 |" in out and "| Precision-means-v1 |" in out and "0 refused" in out
    args = p.parse_args(["metrics", "compare", a, c])
    args.fn(args)
    out = capsys.readouterr().out
    assert "not comparable" in out and "seeds.start" in out and "3 refused" in out   # FD, precision, recall
    args = p.parse_args(["metrics", "show", str(tmp_path / "a")])
    args.fn(args)
    assert "FD-means-v1" in capsys.readouterr().out
    args = p.parse_args(["metrics", "compare", a, b, "--subject", "zzz"])
    with pytest.raises(KDMError, match="share no metric"):
        args.fn(args)
