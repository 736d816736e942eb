"""The pairs and student stages with several processes (torchrun inside the stage), run on the CPU with
gloo: same artifacts and versions as one process, and clear errors before and after launching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from image_fixtures import TINY_UNET, image_folder, single_thread, write_archive
from pipeline import stages
from pipeline.recipes import cifar10
from pipeline.recipes.common import PairsStage
from pipeline.training import torchrun
from pipeline.data.datasets import prepare_image_dataset
from pipeline.errors import KDMError
from pipeline.training.image_train import read_image_student_manifest
from pipeline.teachers.bootstrap import load_edm_teacher_config, train_edm_teacher
from storage_schemas import SamplerSettings, SeedRange
from storage_schemas.distill_image import DistillImageConfig, ImagePairsStageConfig, ImageStudentStageConfig
from storage_schemas.recipes import StageRequest
from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig, SongUNetConfig
from store_checks import assert_same_store

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ImagePairsStageConfig(seeds=SeedRange(start=0, stop=12), heldout_seeds=SeedRange(start=12, stop=16),
                              sampler=SamplerSettings(kind="edm-heun", steps=2), chunk_size=4)


def student_cfg(batch_size: int = 4) -> ImageStudentStageConfig:
    model = KDMImageConfig(img_resolution=8, unet=SongUNetConfig(**TINY_UNET), distance="pseudo-huber", adv_weight=0.0)
    train = ImageTrainConfig(device="cpu", precision="fp32", batch_size=batch_size, steps=2, threads=1, log_every=1,
                             checkpoint_every=2, buffer_chunks=2, read_threads=1, channels_last=False, ema_decay=0.9)
    return ImageStudentStageConfig(preset="tiny-test", model=model, train=train)


def run_cfg(root, device: str = "cpu", gpus: int = 1, batch_size: int = 4) -> DistillImageConfig:
    """A cifar10 run config with the tiny pairs and student settings above."""
    return DistillImageConfig.model_validate({"preset": "smoke", "root": str(root), "device": device, "gpus": gpus,
                                              "pairs": PAIRS.model_dump(mode="json"),
                                              "student": student_cfg(batch_size).model_dump(mode="json")})


QUIET = stages.StageContext(progress_bars=False)


def pairs_stage(root, teacher: str, **kw) -> dict:
    return stages.run_stage(PairsStage(), run_cfg(root, **kw), {"teacher": teacher}, QUIET)


def student_stage(root, pairs_uri: str, **kw) -> dict:
    return stages.run_stage(cifar10.ImageStudent(), run_cfg(root, **kw), {"filter": pairs_uri}, QUIET)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny unconditional EDM teacher (8x8) bootstrapped on the CPU in two steps."""
    root = tmp_path_factory.mktemp("teacher")
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 4, "test": 1})
    ds = str(root / "ds")
    prepare_image_dataset(str(write_archive(root / "a.tgz", members)), ds, progress=False)
    sets = ["unet.model_channels=8", "unet.channel_mult=[1,2]", "unet.num_blocks=1", "unet.attn_resolutions=[4]",
            "batch_size=8", "steps=2", "preview_samples=0", "device=cpu", "lr_rampup_images=8", "use_labels=false"]
    with single_thread():
        train_edm_teacher(ds, load_edm_teacher_config("cifar10-mini", sets=sets), str(root / "t"), progress=False)
    return str(root / "t")


@pytest.fixture(scope="module")
def one_process(teacher, tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("one"))
    with single_thread():
        p = pairs_stage(root, teacher)
        s = student_stage(root, p["uri"])
    return {"root": root, "pairs": p, "student": s}


def test_gpus_is_a_typed_setting_outside_every_version():
    assert DistillImageConfig.model_validate({"preset": "smoke"}).gpus == 1
    cfg = DistillImageConfig.model_validate({"preset": "smoke", "gpus": 4})
    assert cfg.gpus == 4
    with pytest.raises(ValueError, match="gpus\n.*greater than or equal to 1"):
        DistillImageConfig.model_validate({"preset": "smoke", "gpus": 0})
    req = StageRequest(config=DistillImageConfig.model_validate({"preset": "smoke"}), stage="pairs",
                       inputs={"teacher": "t"})
    assert req.config.gpus == 1
    # The stage configs (the only inputs of the versions) carry no process count.
    assert "gpus" not in cfg.pairs.model_dump() and "gpus" not in cfg.student.model_dump()
    from pipeline.pairs.generate import pairs_version
    assert pairs_version("t", cfg.pairs.generate_config("cpu")) == pairs_version(
        "t", DistillImageConfig.model_validate({"preset": "smoke"}).pairs.generate_config("cpu"))


def test_two_processes_make_the_same_pair_store_and_student(one_process, teacher, tmp_path, capsys):
    root = str(tmp_path)
    p = stages.run_request(StageRequest(config=run_cfg(root, gpus=2), stage="pairs", inputs={"teacher": teacher}),
                           QUIET)
    one = one_process["pairs"]
    assert not p["skipped"] and p["version"] == one["version"]
    assert p["content_hash"] == one["content_hash"] and (p["count"], p["heldout_count"]) == (12, 4)
    assert_same_store(one["uri"], p["uri"])                     # chunk files byte for byte
    out = capsys.readouterr().out
    assert "--nproc_per_node=2" not in out                      # the command's own output is forwarded
    assert "worker 1/2 finished its shards" in out and f"pairs {p['version']}:" in out

    s = stages.run_request(StageRequest(config=run_cfg(root, gpus=2), stage="student", inputs={"filter": p["uri"]}),
                           QUIET)
    assert not s["skipped"] and s["version"] == one_process["student"]["version"]
    assert s["uri"] == f"{root}/students/{s['version']}" and s["steps"] == 2
    m = read_image_student_manifest(s["uri"])
    assert m.world_size == 2 and m.train.batch_size == 4 and m.preset == "tiny-test"   # 2 per process per step
    assert m.model == student_cfg().model and read_image_student_manifest(one_process["student"]["uri"]).world_size == 1
    again = student_stage(root, p["uri"], gpus=2)
    assert again["skipped"] and again["version"] == s["version"]     # found, nothing launched


def test_more_gpus_than_visible_is_an_error_before_launching(one_process, teacher, monkeypatch, tmp_path):
    launched = []
    monkeypatch.setattr(torchrun.subprocess, "Popen", lambda *a, **k: launched.append(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(KDMError) as e:
        student_stage(tmp_path, one_process["pairs"]["uri"], device="cuda", gpus=2)
    assert str(e.value) == ("student stage: gpus=2 asks for 2 GPUs but 1 is visible (torch.cuda.device_count()); "
                            "set gpus <= 1 or run the stage on a worker with 2 GPUs")
    with pytest.raises(KDMError, match="pairs stage: gpus=4 asks for 4 GPUs but 1 is visible"):
        pairs_stage(tmp_path, teacher, device="cuda", gpus=4)
    with pytest.raises(KDMError, match=r"train.batch_size 4 is not divisible by gpus=3 \(each process takes"):
        student_stage(tmp_path, one_process["pairs"]["uri"], gpus=3)
    assert launched == []


def test_a_failing_torchrun_command_names_the_command_and_its_exit_code(tmp_path):
    lines = []
    with pytest.raises(KDMError) as e:
        torchrun.run_torchrun(2, "cpu", ["pairs", "info", str(tmp_path / "missing")], "pairs stage",
                              echo=lines.append)
    msg = str(e.value)
    assert msg.startswith("pairs stage: `") and "failed with exit code 1" in msg
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m pipeline.cli pairs info" in msg
    assert str(tmp_path / "missing") in msg and any("missing" in ln for ln in lines)   # the workers' error, forwarded


def test_commands_read_the_stage_configs_from_a_file(one_process, teacher, tmp_path, capsys, monkeypatch):
    """What the stage hands to torchrun: the typed config as JSON (--config), read back unchanged."""
    from pipeline.cli import main
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)                       # the dry runs' relative --out "u" must not appear here
    pairs_file = str(tmp_path / "pairs.json")
    (tmp_path / "pairs.json").write_text(PAIRS.generate_config("cpu").model_dump_json())
    assert main(["pairs", "generate-images", "--teacher", teacher, "--config", pairs_file, "--out", "u",
                 "--dry-run"]) == 0
    assert f"version {one_process['pairs']['version']}," in capsys.readouterr().out
    assert main(["pairs", "generate-images", "--teacher", teacher, "--config", pairs_file, "--seeds", "0-3",
                 "--device", "cpu", "--out", "u"]) == 1
    assert (f"error: --config {pairs_file} holds the whole pairs config; drop --seeds, --device"
            in capsys.readouterr().err)
    assert main(["pairs", "generate-images", "--teacher", teacher, "--out", "u"]) == 1
    assert "give --seeds START-END (or --config FILE" in capsys.readouterr().err

    student = student_cfg()
    student_file = str(tmp_path / "student.json")
    (tmp_path / "student.json").write_text(student.model_dump_json())
    assert main(["train-image", "--pairs", one_process["pairs"]["uri"], "--config", student_file, "--out", "u",
                 "--dry-run"]) == 0
    assert f"would train {one_process['student']['version']} -> u" in capsys.readouterr().out
    assert main(["train-image", "--pairs", one_process["pairs"]["uri"], "--config", student_file,
                 "--preset", "cifar10-uncond", "--out", "u"]) == 1
    assert "give either --preset NAME or --config FILE" in capsys.readouterr().err
    assert list(cwd.iterdir()) == []


def test_flow_and_command_line_take_gpus(capsys):
    import inspect
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate
    from flows.kdm import kdm
    from pipeline.cli.distill import load_config
    from pipeline.recipes import build_config
    assert "gpus" in inspect.signature(kdm.fn).parameters
    validate({"recipe": "cifar10", "preset": "mini", "gpus": 2}, parameter_schema(kdm.fn).model_dump_for_openapi(),
             raise_on_error=True)
    assert build_config({"recipe": "cifar10", "preset": "mini", "gpus": 8}, gpus=2).gpus == 2   # the shortcut wins
    assert build_config(None, recipe="cifar10", preset="smoke").gpus == 1
    assert load_config("cifar10", "smoke", False, ["gpus=2"], ".").gpus == 2
