"""``kdm extractor`` and ``kdm metrics`` commands: the offline feature extractor and image metric reports.

Wire into pipeline/cli.py's ``build_parser`` with ``cli_eval.add_commands(sub)``.

  kdm extractor train --dataset runs/cifar10 --out runs/extractor --device cuda
  kdm extractor info runs/extractor
  kdm metrics show runs/eval/metrics.json
  kdm metrics compare runs/eval-a/metrics.json runs/eval-b/metrics.json
"""
from __future__ import annotations

from pipeline.cli.common import add_command as add, summary
from pipeline.errors import KDMError

EXAMPLES = __doc__.split("\n\n", 2)[2]


def cmd_extractor_train(a) -> None:
    from storage_schemas.protocol import ExtractorTrainConfig
    from pipeline.evaluation import features
    from pipeline import presets
    cfg = presets.validate(ExtractorTrainConfig, presets.apply_sets({}, a.set), "extractor options")
    m = features.train_extractor_from_dataset(a.dataset, cfg, a.out, device=a.device, progress=not a.quiet)
    acc = f"{m.test_accuracy:.4f}" if m.test_accuracy is not None else "n/a"
    summary(f"extractor {m.id}: test accuracy {acc} ({m.test_images} images), {m.feature_dim}-d features, "
            f"trained in {m.train_seconds:.0f} s on {m.device}, sha256 {m.weights_sha256[:16]} at {a.out}")


def cmd_extractor_info(a) -> None:
    from storage_schemas.protocol import FeatureExtractorManifest
    from pipeline.storage import artifacts
    m = artifacts.read_model(artifacts.join(a.extractor, artifacts.MANIFEST), FeatureExtractorManifest)
    if a.verify:
        from pipeline.evaluation import features
        features.load_extractor(a.extractor)
    print(m.model_dump_json(indent=2))
    summary(f"{a.extractor}: extractor {m.id}, weights sha256 {m.weights_sha256[:16]}"
            + (" (verified)" if a.verify else ""))


def cmd_metrics_show(a) -> None:
    from pipeline.evaluation import image_metrics
    r = image_metrics.read_report(a.report)
    print(image_metrics.metrics_markdown(r.metrics))
    summary(f"{a.report}: {len(r.metrics)} metric values")


def cmd_metrics_compare(a) -> None:
    """Side by side the values both reports hold under the same name, refusing those made under different protocols."""
    from storage_schemas.protocol import ProtocolMismatch, check_comparable
    from pipeline.evaluation import image_metrics
    ra, rb = image_metrics.read_report(a.a), image_metrics.read_report(a.b)
    rows, refused = [], 0
    for ma in ra.metrics:
        for mb in rb.metrics:
            if ma.name != mb.name or (a.subject and a.subject not in (ma.subject, mb.subject)):
                continue
            try:
                check_comparable(ma, mb)
                rows.append(f"| {ma.name} | {ma.subject}: {ma.value:.4g} | {mb.subject}: {mb.value:.4g} | "
                            f"{ma.value / mb.value if mb.value else float('nan'):.3f} |")
            except ProtocolMismatch as e:
                refused += 1
                diff = str(e).split("differing fields:", 1)[-1].strip().replace("\n", " ")
                rows.append(f"| {ma.name} | {ma.subject}: {ma.value:.4g} | {mb.subject}: {mb.value:.4g} | "
                            f"not comparable: {diff} |")
    if not rows:
        raise KDMError(f"{a.a} and {a.b} share no metric names" + (f" for subject {a.subject!r}" if a.subject else ""))
    print("| metric | A | B | A / B |\n|---|---|---|---|\n" + "\n".join(rows))
    summary(f"compared {len(rows)} pairs of values, {refused} refused for differing protocols")


def add_commands(subparsers) -> None:
    ex = subparsers.add_parser("extractor", help="offline feature extractor for FD/KID").add_subparsers(
        dest="sub", metavar="SUBCOMMAND")
    sp = add(ex, "train", cmd_extractor_train, "train the ResNet-9 feature extractor on a prepared image dataset",
             "example: kdm extractor train --dataset runs/cifar10 --out runs/extractor --device cuda")
    sp.add_argument("--dataset", required=True, help="a dataset prepared by pipeline.data.datasets")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ExtractorTrainConfig field")
    sp.add_argument("--device", default="cuda")
    sp.add_argument("--out", required=True, help="extractor artifact directory (any fsspec URL)")
    sp = add(ex, "info", cmd_extractor_info, "print an extractor's manifest", "example: kdm extractor info runs/extractor")
    sp.add_argument("extractor")
    sp.add_argument("--verify", action="store_true", help="check the weights against the manifest's sha256")

    mt = subparsers.add_parser("metrics", help="image metric reports").add_subparsers(dest="sub", metavar="SUBCOMMAND")
    sp = add(mt, "show", cmd_metrics_show, "print a metrics.json as a table", "example: kdm metrics show runs/eval")
    sp.add_argument("report")
    sp = add(mt, "compare", cmd_metrics_compare,
             "compare two reports value by value; values made under different protocols are refused",
             "example: kdm metrics compare runs/eval-a runs/eval-b")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--subject", default=None, help="only rows where either side has this subject")
