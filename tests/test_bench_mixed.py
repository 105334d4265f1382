"""``fastpeft bench --op mixed``: rows for every provider and adapter count, outputs checked against
each other before timing, the plot, and the flags it refuses."""

import glob
import json
import os

import pytest

from fastpeft.cli import main


def test_mixed_bench_rows_and_plot(tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    out = str(tmp_path)
    assert main(["bench", "--op", "mixed", "--quick", "--adapters", "1,4", "--M", "16", "--shapes", "32x24",
                 "--r", "4", "--out", out, "--no-progress", "--threads", "1", "--plot"]) == 0
    printed = capsys.readouterr().out
    rows = json.load(open(glob.glob(os.path.join(out, "mixed-*.json"))[0]))["rows"]
    status = {(r["provider"], r["adapters"]): r["status"] for r in rows}
    for n in (1, 4):
        for provider in ("fastpeft", "peft-mixed", "loop", "torch-linear"):
            assert status[(provider, n)] == "ok", (provider, n, [r for r in rows if r["status"] != "ok"])
        assert status[("fastpeft-torch", n)] == "skipped"          # a CPU: fastpeft is the torch path
    fast = [r for r in rows if r["provider"] == "fastpeft"]
    assert all(r["M"] == 16 and r["B"] == 16 and r["vs_peft"] > 0 for r in fast)
    assert all(r["cpu_ms"] > 0 and r["cpu_q20"] <= r["cpu_ms"] <= r["cpu_q80"] and r["vs_peft_cpu"] > 0 for r in fast)
    assert "CPU timings" in printed
    png = glob.glob(os.path.join(out, "mixed-*-time_vs_adapters.png"))
    assert len(png) == 1 and os.path.getsize(png[0]) > 5000


@pytest.mark.parametrize("argv,message", [
    (["--op", "mixed,dense"], "--op mixed runs its own sweep"),
    (["--op", "mixed", "--providers", "peft-lora"], "do not run with --op mixed"),
    (["--providers", "loop"], "run only with --op mixed"),
    (["--adapters", "4"], "--adapters is a flag of --op mixed"),
])
def test_mixed_bench_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
