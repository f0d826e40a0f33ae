"""benchmarks/device_check.py, the prepared GPU check, keeps working: the same code on a tiny model."""
import json
import sys

from conftest import doc_command, run


def test_quick_device_check_runs_every_case_on_the_cpu(tmp_path):
    # docs/scaling.md's command, on a CPU and a tiny model.
    argv = doc_command("benchmarks/device_check.py")
    assert argv[1:3] == ["benchmarks/device_check.py", "--json"]
    proc = run([sys.executable, argv[1], "--device", "cpu", "--quick", "--json", str(tmp_path / "rows.json")],
               timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text(encoding="utf-8"))
    assert {r["case"] for r in rows} == {"train", "memory", "speed", "feeding"}
    assert all(r["status"] == "ok" for r in rows), rows
    planned = [r for r in rows if r["case"] == "memory" and "planned" in r["setting"]]
    assert len(planned) == 4 and all("predicted" in r["result"] and "images/s" in r["result"] for r in planned)
    assert "| case | setting | result | status |" in proc.stdout
