"""bench/checkerboard_official_model.py: the official model loaded through its own (pickled) classes, scored on
the same draws as a kdm student, the spread and the paired difference (CPU-sized, a stand-in official class)."""
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# The official module's shape: an object pickled with its class, whose submodules take (x, t).
OFFICIAL_SRC = textwrap.dedent('''
    import torch
    class Enc(torch.nn.Module):
        def __init__(self, w): super().__init__(); self.lin = torch.nn.Linear(2, 2); self.lin.weight.data = w
        def forward(self, x, t): return self.lin(x)
    class Dec(torch.nn.Module):
        def __init__(self): super().__init__(); self.lin = torch.nn.Linear(2, 2)
        def forward(self, z, t): return self.lin(z)
    class KoopmanDistillModelCheckerBoard(torch.nn.Module):
        def __init__(self, enc, dec, K):
            super().__init__()
            self.xT_observables_encoder, self.x0_observables_decoder, self.koopman_operator = enc, dec, K
''')


def load_bench(name: str = "checkerboard_official_model"):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def official(tmp_path):
    """A stand-in official checkout (package `models`, like kdm's own) and a model pickled from it; kdm's
    `models` package is what `models` names again afterwards, as in the bench's own process."""
    import models.kdm2d  # noqa: F401 (kdm's package first, as when the bench has loaded a student)
    code = tmp_path / "kdm"
    (code / "models").mkdir(parents=True)
    (code / "models" / "__init__.py").write_text("")
    (code / "models" / "koopman_model_checkerboard.py").write_text(OFFICIAL_SRC)
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "models" or k.startswith("models.")}
    sys.path.insert(0, str(code))
    try:
        from models.koopman_model_checkerboard import Dec, Enc, KoopmanDistillModelCheckerBoard
        torch.manual_seed(0)
        m = KoopmanDistillModelCheckerBoard(Enc(torch.eye(2) * 2.0), Dec(), torch.nn.Linear(2, 2))
        torch.save(m, code / "model.pt")
        x = torch.randn(5, 2)
        expected = m.x0_observables_decoder(m.koopman_operator(m.xT_observables_encoder(x, None)), None).detach()
    finally:
        sys.path.remove(str(code))
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return code, x, expected


def test_official_one_step_is_decoder_of_operator_of_encoder(official):
    code, x, expected = official
    one_step = load_bench().load_official(str(code), str(code / "model.pt"))
    assert np.allclose(one_step(x.numpy()), expected.numpy(), atol=1e-6)
    import models
    assert Path(models.__file__).parent == REPO / "models"  # kdm's package is back
    assert "models.koopman_model_checkerboard" not in sys.modules


def test_missing_official_classes_say_what_to_pass(tmp_path, official):
    code, _, _ = official
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="does not hold the official classes"):
        load_bench().load_official(str(tmp_path / "empty"), str(code / "model.pt"))
    import models
    assert Path(models.__file__).parent == REPO / "models"


def test_summary_and_table():
    bench = load_bench()
    s = bench.summarise([0.04, 0.02, 0.03])
    assert s["draw0"] == pytest.approx(0.04) and s["mean"] == pytest.approx(0.03)
    assert s["std"] == pytest.approx(0.01)
    row = {k: bench.summarise([0.5, 0.5]) for k in bench.METRICS}
    diff = {k: dict(bench.summarise([0.01, 0.03]), stderr=0.01) for k in bench.METRICS}
    text = bench.table({"n": 100, "draws": 2, "student_version": "kdm-x", "rows": {"student": row, "official": row},
                        "teacher_train_slices": row, "pair_mse": {"student": 1e-3, "official": 2e-3},
                        "paired_difference_student_minus_official": diff})
    assert "| kdm student kdm-x | 0.5000 (0.5000 ± 0.0000)" in text
    assert "| student - official, paired (mean ± stderr) | +0.0200 ± 0.0100" in text
    assert "2 draws (teacher: 2 disjoint train slices)" in text


def test_end_to_end_on_a_tiny_store(official, tmp_path):
    from board_fixtures import tiny_board_store
    from pipeline import presets
    from pipeline.training import train2d
    code, _, _ = official
    store = tiny_board_store(tmp_path, scale=1.5)
    cfg = presets.load("student", "smoke", sets=["train.steps=10", "train.threads=1", "train.batch_size=32"])
    train2d.train_student(store, cfg, str(tmp_path / "student"), progress=False)
    out = tmp_path / "out"
    rc = load_bench().main(["--pairs", store, "--student", str(tmp_path / "student"), "--official-code", str(code),
                            "--official-model", str(code / "model.pt"), "--draws", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "official-vs-student.json").read_text())
    assert res["n"] == 60  # min(10,000, 60 held out, 240 train)
    assert len(res["rows"]["student"]["swd"]["draws"]) == 3
    # the second reference: the whole train split (240 points), the teacher row its held-out x_0 against it
    assert res["train_split_size"] == 240 and len(res["rows"]["official"]["swd_train"]["draws"]) == 3
    assert len(res["teacher_train_slices"]["swd_train"]["draws"]) == 1
    d = res["paired_difference_student_minus_official"]["swd_train"]
    assert d["mean"] == pytest.approx(np.mean(np.subtract(res["rows"]["student"]["swd_train"]["draws"],
                                                          res["rows"]["official"]["swd_train"]["draws"])))
    assert "SWD vs the train split's x_0 (n = 240)" in (out / "official-vs-student.md").read_text()
    assert len(res["teacher_train_slices"]["swd"]["draws"]) == 4  # 240 train points in disjoint 60-point slices
    d = res["paired_difference_student_minus_official"]["swd"]
    assert d["draws"] == pytest.approx(np.subtract(res["rows"]["student"]["swd"]["draws"],
                                                   res["rows"]["official"]["swd"]["draws"]).tolist())
    assert all(v > 0 for v in res["pair_mse"].values())
    assert (out / "official-vs-student.md").read_text().startswith("n = 60 points per draw")


def test_sweep_weights_trained_with_the_heldout_pairs(official, tmp_path):
    """A sweep run with with_heldout trains on train + held-out pairs (as the official model saw all
    trajectories) and its saved EMA weights are scored by the bench under a label that says so."""
    from board_fixtures import tiny_board_store
    from storage_schemas import Eval2DConfig
    code, _, _ = official
    store = tiny_board_store(tmp_path, scale=1.5)
    sweep = load_bench("sweep_checkerboard_import")
    train, *_ = sweep.load_protocol(store, Eval2DConfig())
    both, *_ = sweep.load_protocol(store, Eval2DConfig(), with_heldout=True)
    assert len(train["x_0"]) == 240 and len(both["x_0"]) == 300
    assert np.array_equal(both["x_T"][:240], train["x_T"])
    with open(tmp_path / "rows.jsonl", "w") as out:
        sweep.run(store, {"hidden": 8, "latent": 4, "steps": 3, "batch": 16, "with_heldout": True}, out,
                  save=str(tmp_path / "w.pt"))
    row = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[-1])
    assert row["with_heldout"] is True and row["step"] == 3
    bench = load_bench()
    model, dim, label = bench.load_any_student(str(tmp_path / "w.pt"))
    assert dim == 2 and label.startswith("sweep-") and label.endswith("+held-out")
    x = torch.zeros(4, 2)
    from pipeline.evaluation.sample import generate
    assert generate(model, x.numpy()).shape == (4, 2)
    rc = bench.main(["--pairs", store, "--student", str(tmp_path / "w.pt"), "--official-code", str(code),
                     "--official-model", str(code / "model.pt"), "--draws", "2", "--out", str(tmp_path / "o")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "official-vs-student.json").read_text())
    assert res["student_version"] == label and res["n"] == 60
