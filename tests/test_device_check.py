"""benchmarks/device_check.py, the prepared GPU check, keeps working: the same code on a tiny model."""
import json

from benchmarks import device_check


def test_quick_device_check_runs_every_case_on_the_cpu(tmp_path):
    assert device_check.main(["--device", "cpu", "--quick", "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text(encoding="utf-8"))
    assert {r["case"] for r in rows} == {"train", "memory", "speed", "feeding"}
    assert all(r["status"] == "ok" for r in rows), rows
    planned = [r for r in rows if r["case"] == "memory" and "planned" in r["setting"]]
    assert len(planned) == 4 and all("predicted" in r["result"] for r in planned)
