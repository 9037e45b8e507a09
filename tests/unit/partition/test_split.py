"""Cuts and the three-way split: every zoo model composes back exactly; bad cuts are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from sealedml import zoo
from sealedml.cli.main import main
from sealedml.cli.partition import random_inputs
from sealedml.partition.graph import PartitionError, candidate_cuts, check_cut
from sealedml.partition.split import compose_max_abs_diff, load_partition, split_model


def _cuts_to_try(model: onnx.ModelProto) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Early/late, middle thirds, and (where the graph branches) multi-tensor cuts."""
    cuts = candidate_cuts(model)
    picks = [(cuts[0], cuts[-1]), (cuts[len(cuts) // 3], cuts[2 * len(cuts) // 3])]
    multi = [c for c in cuts if len(c.tensors) > 1]
    if len(multi) >= 2:
        picks.append((multi[0], multi[-1]))
    return [(f.tensors, b.tensors) for f, b in picks]


@pytest.mark.parametrize("name", ["digits", "mobilenetv2", "resnet50", "digits-cnn", "faces-cnn"])
def test_every_zoo_model_composes_back_exactly(name: str) -> None:
    model = zoo.get(name)
    feeds = random_inputs(model, 2)
    if name == "digits":
        feeds = {"input": zoo.digits().x_test[:2]}
    pairs = _cuts_to_try(model)
    if name == "resnet50":
        assert any(len(f) > 1 for f, _ in pairs), "a cut inside a residual block carries both tensors"
    for front, back in pairs:
        partition = split_model(model, front, back)
        assert compose_max_abs_diff(model, partition, feeds) <= 1e-5, (front, back)
        assert [t.name for t in partition.manifest.front_cut] == list(front)
        assert 0 < partition.manifest.tee_flops_share < 1


@pytest.mark.slow
def test_vgg16_composes_back_exactly() -> None:
    model = zoo.vgg16()
    partition = split_model(model, ["features.4"], ["classifier.1"])  # after block 1, before the second FC
    assert compose_max_abs_diff(model, partition, random_inputs(model, 1)) <= 1e-5


def test_a_residual_cut_must_carry_every_crossing_tensor() -> None:
    model = zoo.resnet50()
    with pytest.raises(
        PartitionError,
        match=r"does not separate the model: the path .*maxpool → layer1\.0\.downsample\.0 .* crosses it",
    ):
        check_cut(model, ["layer1.0.conv1"])  # the block's shortcut bypasses it
    assert check_cut(model, ["maxpool", "layer1.0.conv1"]).tensors == ("maxpool", "layer1.0.conv1")


@pytest.mark.parametrize(
    ("front", "back", "message"),
    [
        (["nope"], ["avgpool"], "no tensor 'nope' in the model"),
        (["features.3.conv.0"], ["avgpool"], "features.3.conv.0 does not separate the model"),
        (["avgpool"], ["features.3.add"], "back cut features.3.add is not after front cut avgpool"),
        (["input"], ["avgpool"], "front cut contains the model input 'input'"),
        (["features.3.add"], ["logits"], "back cut contains the model output 'logits'"),
        (["avgpool"], ["avgpool"], "the middle would be empty"),
        (["features.3.add", "features.3.add"], ["avgpool"], "listed twice"),
        ([""], ["avgpool"], "at least one tensor"),
    ],
)
def test_bad_cuts_are_refused_with_the_reason(front: list[str], back: list[str], message: str) -> None:
    with pytest.raises(PartitionError, match=message.replace(".", r"\.")):
        split_model(zoo.mobilenetv2(), front, back)


def test_constant_tensors_are_not_cuts() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    c = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1, 2], [1, 2]))
    add = helper.make_node("Add", ["x", "c"], ["h"])
    relu = helper.make_node("Relu", ["h"], ["y"])
    model = helper.make_model(helper.make_graph([c, add, relu], "g", [x], [y]))
    with pytest.raises(PartitionError, match="does not depend on the input"):
        check_cut(model, ["c"])
    assert [cut.tensors for cut in candidate_cuts(model)] == [("h",)]


def test_candidate_cuts_never_carry_a_raw_input_or_final_output() -> None:
    model = zoo.toy_multi_io()  # two inputs: one stays live until the end
    graph_io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    for cut in candidate_cuts(zoo.mobilenetv2()) + candidate_cuts(model):
        assert not set(cut.tensors) & graph_io


def test_written_partition_round_trips_and_detects_alteration(tmp_path: Path) -> None:
    model = zoo.mobilenetv2()
    partition = split_model(model, ["features.3.add"], ["avgpool"])
    written = partition.write(tmp_path / "p")
    assert sorted(p.name for p in written) == ["back.onnx", "front.onnx", "middle.onnx", "partition.json"]
    again = load_partition(tmp_path / "p")
    assert again.manifest == partition.manifest
    assert compose_max_abs_diff(model, again, random_inputs(model, 1)) <= 1e-5
    middle = tmp_path / "p" / "middle.onnx"
    middle.write_bytes(middle.read_bytes() + b"\x00")
    with pytest.raises(PartitionError, match=r"middle\.onnx does not match partition\.json"):
        load_partition(tmp_path / "p")
    with pytest.raises(PartitionError, match=r"no partition\.json"):
        load_partition(tmp_path)


def test_manifest_names_the_crossing_tensors_and_their_cost() -> None:
    partition = split_model(zoo.mobilenetv2(), ["features.3.add"], ["avgpool"])
    manifest = partition.manifest
    assert [(t.name, t.dtype, t.shape[1:]) for t in manifest.front_cut] == [("features.3.add", "float32", [24, 56, 56])]
    assert manifest.boundary_bytes_per_sample == (24 * 56 * 56 + 1280) * 4
    assert manifest.parts["middle"].runs_in == "untrusted" and manifest.parts["front"].runs_in == "tee"
    assert sum(p.nodes for p in manifest.parts.values()) == len(zoo.mobilenetv2().graph.node)


def test_cli_split_and_cuts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(zoo.mobilenetv2(), str(model_path))
    assert main(["partition", "cuts", str(model_path), "--json", "--max-tensors", "1"]) == 0
    cuts = json.loads(capsys.readouterr().out)["cuts"]
    assert cuts[0]["cut"] == "features.0" and all(len(c["tensors"]) == 1 for c in cuts)
    argv = ["partition", "split", str(model_path), "--front-cut", "features.3.add", "--back-cut", "avgpool"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] <= 1e-5 and result["nodes"] == {"front": 16, "middle": 82, "back": 2}
    assert main([*argv[:3], "--front-cut", "features.3.conv.0", "--back-cut", "avgpool", "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cut features.3.conv.0 does not separate the model") and err.count("\n") == 1
    assert (
        main(
            ["partition", "split", str(tmp_path / "missing.onnx"), "--front-cut", "a", "--back-cut", "b", "--out", "x"]
        )
        == 1
    )
    assert "missing.onnx: no such file" in capsys.readouterr().err
