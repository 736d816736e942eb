"""The bad-input battery (bench/bad_input_battery.py): its fast subset passes on this checkout, and its
verdicts can fail: key words that only echo the input, leftovers of a refusal and any case that is not
clear make it exit non-zero."""
import importlib.util
import subprocess
import sys

import pytest

from shared_data import REPO


@pytest.fixture(scope="module")
def battery():
    spec = importlib.util.spec_from_file_location("bad_input_battery", REPO / "bench" / "bad_input_battery.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bad_input_battery"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bad_input_battery", None)


def test_the_fast_subset_is_clear(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bad_input_battery.py"), "--cases", "fast",
                        "--workdir", str(tmp_path / "w"), "--repo", str(REPO), "--python", sys.executable],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "battery: 20 of 20 cases clear"


def test_key_words_must_hold_a_reason_phrase(battery):
    run = battery.Run(args=["pairs", "info", "nope"], rc=1, out="", err="kdm pairs: error: nope\n", seconds=0.1)
    verdict, why = battery.error_verdict(run, keys=["nope"])
    assert verdict == "partly clear" and "no reason phrase among the key words" in why
    run.err = "kdm pairs: error: no pair store at nope\n"
    assert battery.error_verdict(run, keys=["nope", "no pair store"]) == ("clear", "refused clearly")
    assert battery.error_verdict(run, keys=["nope", "does not exist"])[0] == "partly clear"


def test_leftovers_and_unclear_cases_fail_the_run(battery, tmp_path, monkeypatch):
    def leaves_output(c):
        c.fail("pairs", "info", "nope", keys=["nope", "no pair store"])
        (c.w / "left").mkdir()
        c.absent("left")

    def clear(c):
        c.fail("pairs", "info", "nope", keys=["nope", "no pair store"])

    monkeypatch.setattr(battery, "CASES", {1: ("clear", clear), 2: ("leaves output", leaves_output)})
    monkeypatch.setattr(battery, "help_timing", lambda b: [0.0])
    assert battery.main(["--cases", "1", "--workdir", str(tmp_path / "a"), "--repo", str(REPO),
                         "--python", sys.executable]) == 0
    assert battery.main(["--cases", "1,2", "--workdir", str(tmp_path / "b"), "--repo", str(REPO),
                         "--python", sys.executable, "--json", str(tmp_path / "b.json")]) == 1
    import json
    rows = {r["number"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows[1]["verdict"] == "clear"
    assert (rows[2]["verdict"], rows[2]["why"]) == ("partly clear", "left left")
