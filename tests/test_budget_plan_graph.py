"""graph discovery, the budget grammar and ledger, and the plan file."""
from __future__ import annotations

import json

import pytest

from mpqkit.budget import Ledger, parse_budget
from mpqkit.errors import BudgetError, InfeasibleBudgetError, PlanError, UnknownNameError
from mpqkit.graph import discover
from mpqkit.plan import LayerQuant, Plan
from mpqkit.solve import Allocation

from conftest import make_tiny


@pytest.fixture
def graph():
    return discover(make_tiny(), (3, 8, 8))


def test_graph_layers_macs_and_tie_groups(graph):
    assert graph.names == ["conv1", "conv2", "conv3", "conv4", "fc"]
    c2 = graph["conv2"]
    assert c2.in_shape == (8, 8, 8) and c2.out_shape == (8, 8, 8)
    assert c2.macs == 8 * 8 * 8 * 8 * 3 * 3  # out numel × in_ch × k × k
    assert graph["fc"].macs == 8 * 4
    assert graph.tie_groups == [("conv2", "conv3")]
    assert graph.default_fixed() == ["conv1", "fc"]
    with pytest.raises(UnknownNameError, match="conv2"):
        graph["conv22"]


def test_torchvision_tie_groups():
    import torchvision

    g = discover(torchvision.models.resnet18(weights=None).eval(), (3, 64, 64))
    assert ("layer2.0.conv1", "layer2.0.downsample.0") in g.tie_groups
    assert len(g) == 21


@pytest.mark.parametrize("text,key,value", [
    ("size=1.5MB", "size", 1.5 * 2**20), ("size=512KB", "size", 512 * 1024), ("size=0.1x", "size-frac", 0.1),
    ("cr=10.7", "cr", 10.7), ("avg-bits=3", "avg-bits", 3.0), ("bitops=0.35G", "bitops", 0.35e9),
    ("act-mem=64KB", "act-mem", 65536), ("act-mem-sum=1MB", "act-mem-sum", 2**20),
])
def test_budget_grammar(text, key, value):
    (t,) = parse_budget(text)
    assert t.key == key and t.value == pytest.approx(value)


def test_budget_several_terms():
    assert [t.key for t in parse_budget("avg-bits=4, bitops=2G")] == ["avg-bits", "bitops"]


@pytest.mark.parametrize("bad", ["size", "size=abc", "avg-bits=-1", "speed=3", "size=3furlongs", "bitops=1MB",
                                 "avg-bits=3x", "cr=0", "avg-bits=40", "size=1MB,,"])
def test_malformed_budget(bad):
    with pytest.raises(BudgetError):
        parse_budget(bad)


def test_ledger_costs(graph):
    ledger = Ledger(graph, ["conv2", "conv3", "conv4"])
    uniform8 = {n: (8, 8) for n in graph.names}
    w = sum(l.weight_numel for l in graph.layers)
    assert ledger.value("size", uniform8) == pytest.approx(w + graph.other_params * 4)
    assert ledger.value("bitops", uniform8) == sum(l.macs * 64 for l in graph.layers)
    assert ledger.value("avg-bits", {**uniform8, "conv2": (2, 8)}) == pytest.approx(
        (2 * graph["conv2"].weight_numel + 8 * graph["conv3"].weight_numel + 8 * graph["conv4"].weight_numel)
        / sum(graph[n].weight_numel for n in ["conv2", "conv3", "conv4"]))
    assert ledger.value("act-mem", uniform8) == max(l.in_numel for l in graph.layers)  # 8 bits = 1 byte
    s = ledger.summary({})
    assert s["compression"] == pytest.approx(1.0)


def test_infeasible_budget_names_smallest_value(graph):
    ledger = Ledger(graph, ["conv2", "conv3", "conv4"])
    prob = Allocation(ledger, ["conv2", "conv3", "conv4"], [2, 4, 8], [8],
                      fixed={"conv1": (8, 8), "fc": (8, 8)}, constraints=ledger.resolve(parse_budget("avg-bits=1.5")))
    with pytest.raises(InfeasibleBudgetError, match=r"avg-bits=1.5.*smallest feasible value is avg-bits=2\.0000"):
        prob.check_feasible()
    smallest = ledger.extreme("size", prob.choice_map(), prob.fixed)
    prob.constraints = ledger.resolve(parse_budget(f"size={smallest * 0.99 / 1024}KB"))
    with pytest.raises(InfeasibleBudgetError, match=f"size={smallest / 2**20:.5f}MB"):
        prob.check_feasible()


def full_layers(graph, **bits: LayerQuant) -> dict[str, LayerQuant]:
    """Every layer of ``graph`` (a complete plan): the given ones, the others at 8/8."""
    return {n: bits.get(n, LayerQuant(8, 8)) for n in graph.names}


def test_plan_round_trip_and_validation(graph, tmp_path):
    plan = Plan(layers=full_layers(graph, conv2=LayerQuant(4, 8), conv4=LayerQuant(2, None)), model_name="tiny",
                model_sha256="abc", method="eval-delta", budget="avg-bits=3")
    p = plan.save(tmp_path / "plan.json")
    back = Plan.load(p)
    assert back.to_dict() == plan.to_dict()
    back.validate(graph)
    back.validate(graph, model_sha256="abc")
    with pytest.raises(PlanError, match="sha256"):
        back.validate(graph, model_sha256="def")


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["layers"].update({"conv9": {"w_bits": 4, "a_bits": 8}}), "unknown layer 'conv9'"),
    (lambda d: d["layers"].pop("conv1"), "does not cover 1 of the model's 5 quantizable layers: conv1"),
    (lambda d: d["layers"]["conv2"].update({"w_bits": 17}), "outside 1..16"),
    (lambda d: d["layers"]["conv2"].update({"a_bits": 0}), "outside 1..16"),
    (lambda d: d["layers"]["conv2"].update({"w_bits": 3.5}), "integer"),
    (lambda d: d.update({"mpqkit_plan": 2}), "version"),
    (lambda d: d.pop("mpqkit_plan"), "not an mpqkit plan"),
    (lambda d: d.update({"layers": [1, 2]}), "layers"),
])
def test_bad_plans(graph, tmp_path, mutate, match):
    d = Plan(layers=full_layers(graph, conv2=LayerQuant(4, 8))).to_dict()
    mutate(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=match):
        Plan.load(path).validate(graph)


def test_truncated_plan(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(Plan(layers={"conv2": LayerQuant(4, 8)}).to_dict())[:40])
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
