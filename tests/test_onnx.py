"""ONNX export of every tower of every supported family: runtime agreement on new shapes, the
initialiser -> parameter map, and the full checker."""

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from lmmc.adapters import TowerModule, example_inputs, get_adapter, input_names
from lmmc.export.onnx import export_tower, initializer_map
from lmmc.export.ort import fuse_onnx
from tests.conftest import tiny_model


def test_every_tower_matches_pytorch_on_new_shapes(tiny_kind, tmp_path, exported_tower):
    model = tiny_model(tiny_kind)
    adapter = get_adapter(model.config.model_type)
    for tower in adapter.towers:
        path = exported_tower("tiny", tiny_kind, tower.name, tmp_path / f"{tower.name}.onnx")  # export_tower
        onnx.checker.check_model(str(path), full_check=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # traced at batch 2 x 16 tokens; run at batch 3 x 11 with padding to prove the axes are dynamic
        inputs = example_inputs(model, tower, batch=3, seq=11)
        if tower.modality == "text":
            inputs[1][1, 7:] = 0
        got = session.run(None, {n: t.numpy() for n, t in zip(input_names(tower), inputs)})
        with torch.no_grad():
            ref = TowerModule(model, tower)(*inputs)
        for a, b in zip(got, ref):
            assert a.shape == tuple(b.shape)
            assert np.abs(a - b.numpy()).max() <= 1e-4


def test_initialiser_map_points_every_matmul_weight_at_its_parameter(tmp_path, exported_tower):
    model = tiny_model("bert")
    path = exported_tower("tiny", "bert", "text", tmp_path / "text.onnx")  # export_tower
    names = json.loads(path.with_suffix(".names.json").read_text())
    proto = onnx.load(str(path))
    params = dict(model.named_parameters())
    matmul_weights = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul"}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    checked = 0
    for name in matmul_weights & inits.keys():
        entry = names[name]
        assert entry is not None, f"{name} not mapped"
        w = params[entry["param"]].detach().numpy()
        np.testing.assert_array_equal(inits[name], w.T if entry["transposed"] else w)
        checked += 1
    # q, k, v, o, fc1, fc2 in each of the 2 blocks
    assert checked == 12


def test_initialiser_map_leaves_a_scalar_constant_unmapped_when_a_parameter_holds_the_same_number():
    # SigLIP's text graph holds a scalar 0.0 (the attention mask's fill value); its logit_bias is a [1] tensor of 0.0
    module = torch.nn.Module()
    module.bias = torch.nn.Parameter(torch.zeros(1))
    graph = onnx.helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(np.array(0.0, np.float32), "fill"),
                                                                numpy_helper.from_array(np.zeros(1, np.float32), "b")])
    got = initializer_map(onnx.helper.make_model(graph), module)
    assert got == {"fill": None, "b": {"param": "bias", "transposed": False}}


def test_export_and_fusion_log_nothing_a_user_cannot_act_on(tmp_path, caplog):
    # SigLIP's vision tower makes onnxscript's constant folding log a skipped Split per graph
    model = tiny_model("siglip")
    with caplog.at_level(logging.WARNING):
        for tower in get_adapter("siglip").towers:
            export_tower(model, tower, tmp_path / f"{tower.name}.onnx")
            fuse_onnx(tmp_path / f"{tower.name}.onnx", tmp_path / f"{tower.name}.fused.onnx")
    noise = [r.getMessage() for r in caplog.records if r.name.startswith(("onnxscript", "torch.onnx"))]
    assert noise == []


def test_a_tower_keeps_its_weights_inside_unless_its_own_pass_the_limit(tmp_path, monkeypatch):
    """The choice to write weights beside the file was made on the whole model's size: a CLIP tower under
    the limit, in a model over it, got an external data file (and ONNX Runtime's mixed precision, which
    refuses those, then called it over 2 GB). Each tower is judged by its own initialisers."""
    import lmmc.export.onnx as export_onnx

    model = tiny_model("clip")
    adapter = get_adapter(model.config.model_type)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = {}
    for tower in adapter.towers:
        path = export_tower(model, tower, tmp_path / "probe" / f"{tower.name}.onnx")["file"]
        sizes[tower.name] = sum(numpy_helper.to_array(i).nbytes
                                for i in onnx.load(str(tmp_path / "probe" / path)).graph.initializer)
    assert max(sizes.values()) < whole
    limit = (sizes["text"] + sizes["vision"]) / 2  # between the towers: the larger goes external, the other not
    assert min(sizes.values()) < limit < max(sizes.values())
    monkeypatch.setattr(export_onnx, "EXTERNAL_BYTES", limit)
    for tower in adapter.towers:
        path = tmp_path / "out" / f"{tower.name}.onnx"
        export_tower(model, tower, path)
        external = [i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer
                    if i.data_location == onnx.TensorProto.EXTERNAL]
        assert bool(external) == (sizes[tower.name] > limit), tower.name
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = example_inputs(model, tower, batch=2, seq=5)
        got = session.run(None, {n: t.numpy() for n, t in zip(input_names(tower), inputs)})
        with torch.no_grad():
            ref = TowerModule(model, tower)(*inputs)
        assert max(np.abs(a - b.numpy()).max() for a, b in zip(got, ref)) <= 1e-4
