"""The real ``kdm`` flow refuses before any stage: a location outside the worker's allowed roots
(pipeline.access), and a named dataset that is absent and cannot be downloaded (pipeline.data.sources)."""
import pytest

from pipeline.errors import KDMError
from prefect_helpers import flow_run_log_text


@pytest.fixture
def stage_calls(monkeypatch):
    """Every stage the flow starts is recorded and fails at once: a run the guard lets through is visible
    (and fast), whatever its recipe."""
    import flows.kdm
    calls = []

    def no_stage(stage, cfg, uris, *a, **k):
        calls.append(stage.name)
        raise RuntimeError(f"stage {stage.name} ran")
    monkeypatch.setattr(flows.kdm.stages, "run_stage", no_stage)
    return calls


def test_the_real_flow_refuses_a_root_outside_the_allowed_roots(harness, tmp_path, monkeypatch, stage_calls):
    from flows.kdm import kdm
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    monkeypatch.setenv("KDM_ALLOWED_ROOTS", str(allowed))
    state = kdm(recipe="checkerboard", preset="smoke", root=str(elsewhere), return_state=True)
    assert state.is_failed() and stage_calls == []
    with pytest.raises(KDMError, match=rf"^root {elsewhere} is outside the artifact roots this worker may use "
                                       rf"\(KDM_ALLOWED_ROOTS: {allowed}\)"):
        state.result()
    assert not elsewhere.exists()
    assert f"refused before any work: root {elsewhere} is outside" in flow_run_log_text(state.state_details.flow_run_id)
    # the same run under an allowed root passes the guard and reaches its first stage
    state = kdm(recipe="checkerboard", preset="smoke", root=str(allowed / "runs"), return_state=True)
    assert state.is_failed() and stage_calls == ["teacher"]
    with pytest.raises(RuntimeError, match="stage teacher ran"):
        state.result()


def test_the_real_flow_fails_with_the_offline_line_before_any_stage(harness, tmp_path, monkeypatch, stage_calls):
    from flows.kdm import kdm
    from pipeline.data import sources
    data = tmp_path / "data"
    monkeypatch.setenv("KDM_DATA_DIR", str(data))
    monkeypatch.setenv("KDM_OFFLINE", "1")
    with pytest.raises(KDMError) as e:
        sources.resolve("cifar10")
    line = str(e.value)
    state = kdm(recipe="cifar10", preset="smoke", root=str(tmp_path / "root"), return_state=True)
    assert state.is_failed() and state.message == line and stage_calls == []      # exactly that line
    assert line.startswith(f"dataset cifar10 is not in {data} and KDM_OFFLINE forbids a download: fetch "
                           f"cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a) from "
                           f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    with pytest.raises(KDMError, match="^dataset cifar10 is not in"):
        state.result()
    assert not (tmp_path / "root").exists() and not data.exists()
    assert f"refused before any stage: {line}" in flow_run_log_text(state.state_details.flow_run_id)
