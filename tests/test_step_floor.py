"""What loramux adds to a decode step, counted in operators (a GPU's kernel launches): a
batch without adapters launches exactly what transformers' own model launches, and LoRA adds
the same four per targeted layer whether the batch holds one adapter or one per row."""

import dataclasses

import pytest

from loramux.bench import step_floor
from loramux.server.cpu_threads import in_own_thread

CFG = dataclasses.replace(step_floor.StepFloorConfig(), layers=2, rows=4, reps=3, rounds=1)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    model_dir = step_floor.build(CFG, tmp_path_factory.mktemp("step_floor"))
    return in_own_thread(step_floor.measure, CFG, model_dir)


def test_a_batch_without_adapters_launches_what_transformers_launches(measured):
    assert measured["operators_by_name"]["base"] == measured["operators_by_name"]["plain"]


def test_lora_adds_four_operators_per_layer_however_many_adapters(measured):
    assert measured["lora_layers"] == 7 * CFG.layers
    assert measured["lora_operators_per_layer"] == {"mixed": 4.0, "shared": 4.0}
    added = {name: count - measured["operators_by_name"]["base"].get(name, 0)
             for name, count in measured["operators_by_name"]["mixed"].items()}
    added = {name: n for name, n in added.items() if n}
    layers = measured["lora_layers"]
    assert added == {"aten::mm": 2 * layers, "aten::masked_fill_": layers, "aten::addcmul_": layers}
    assert measured["operators_by_name"]["mixed"] == measured["operators_by_name"]["shared"]


def test_the_report_names_every_kind(measured):
    text = step_floor.markdown(measured)
    for kind in ("plain", "base", "mixed", "shared"):
        assert f"| {kind} |" in text
