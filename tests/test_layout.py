"""The architecture the tree shows: dependencies point one way, every pipeline sub-package says what it
owns, recipes are stage lists over the one skeleton, and the old parallel names are gone."""
import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("storage", "data", "teachers", "pairs", "training", "evaluation", "recipes", "cli")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("storage_schemas", {"pipeline", "models", "flows", "torch", "zarr", "prefect"}),
    ("models", {"pipeline", "flows", "prefect"}),
    ("pipeline", {"flows"}),
    ("flows", {"models"}),
])
def test_dependencies_point_one_way(package, forbidden):
    bad = {str(p.relative_to(REPO)): sorted(_imports(p) & forbidden) for p in (REPO / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_prefect_is_imported_only_where_it_is_optional():
    """Stages run without Prefect: pipeline/ imports it only inside functions (the registry's event)."""
    for p in (REPO / "pipeline").rglob("*.py"):
        top = [n for n in ast.parse(p.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = {(n.module or "") if isinstance(n, ast.ImportFrom) else n.names[0].name for n in top}
        assert not any(m.startswith("prefect") for m in mods), p


def test_every_pipeline_subpackage_says_what_it_owns():
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((REPO / "pipeline" / name / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 20, name


def test_recipes_are_stage_lists_over_one_skeleton():
    from pipeline import recipes, stages
    cifar = recipes.build_config(recipe="cifar10", preset="smoke")
    board = recipes.build_config(recipe="checkerboard", preset="checkerboard")
    imported = recipes.build_config(recipe="checkerboard", preset="checkerboard-import")
    assert recipes.stage_names(cifar) == ["dataset", "extractor", "teacher", "pairs", "filter", "student",
                                          "evaluation", "report"]
    assert recipes.stage_names(board) == ["teacher", "pairs", "filter", "student", "evaluation", "report"]
    assert recipes.stage_names(imported) == ["pairs", "filter", "student", "evaluation", "report"]
    for cfg in (cifar, board, imported):
        seen: set[str] = set()
        for stage in recipes.stages_of(cfg):
            assert isinstance(stage, stages.Stage) and set(stage.inputs) <= seen, stage.name
            seen.add(stage.name)
    # the pairs stage is one class for both data kinds
    assert type(recipes.stage_named(cifar, "pairs")) is type(recipes.stage_named(board, "pairs"))


def test_old_flow_and_command_names_are_gone():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    history = {"BENCHMARKS.md", "RESULTS.md", "tests/test_layout.py"}     # measured records keep their words
    old = ("distill-image", "distill_cifar10", "stages_image", "kdm_flow", "flows/distill_image",
           "distill-cifar10/distill-cifar10")
    hits = []
    for f in files:
        if f in history or not (REPO / f).is_file() or f.endswith((".png", ".npy", ".gz")):
            continue
        text = (REPO / f).read_text(errors="replace")
        hits += [f"{f}: {o}" for o in old if o in text]
    assert hits == []
