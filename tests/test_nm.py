"""N:M sparsity: exact group counts, input dims that cannot be grouped, and 2:4 that survives ONNX
export along axis 0 of every targeted MatMul weight, as `polygraphy inspect sparsity` reads it."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import numpy_helper

from lmmc.adapters import get_adapter, prunable_linears
from lmmc.artifact import Artifact
from lmmc.data import random_calibration
from lmmc.errors import LmmcError
from lmmc.modelio import make_student
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import CalibrationConfig, parse_recipe
from lmmc.sparsity import NM, nm_mask
from tests.conftest import TINY_TEXT, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 4), (4, 8), (2, 8)])
def test_nm_mask_has_exactly_n_zeros_per_group_and_drops_the_lowest(n, m):
    score = torch.rand(6, 4 * m, generator=torch.Generator().manual_seed(n * 10 + m))
    groups = score.reshape(6, 4, m)
    mask = nm_mask(score, NM(n, m)).reshape(6, 4, m)
    assert torch.equal((~mask).sum(-1), torch.full((6, 4), n))
    dropped_max = groups.masked_fill(mask, -1.0).max(-1).values
    kept_min = groups.masked_fill(~mask, 2.0).min(-1).values
    assert (dropped_max < kept_min).all()


@pytest.mark.parametrize("text, match", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                         ("2-4", "is not N:M")])
def test_bad_nm_is_one_clear_error(text, match):
    for pruner in ("wanda", "sparsegpt", "magnitude"):
        with pytest.raises(LmmcError, match=match):
            parse_recipe({"calibration": {"random": True}, "passes": [{pruner: {"nm": text}}]})


def artifact_for(model: torch.nn.Module, tmp_path: Path) -> Artifact:
    adapter = get_adapter(model.config.model_type)
    art = Artifact(model_ref="tiny", adapter=adapter, teacher=model, student=make_student(model), workdir=tmp_path)
    art.calib = random_calibration(CalibrationConfig(samples=8, eval_samples=4, batch_size=4), model, adapter)
    return art


def test_input_dims_not_a_multiple_of_m_stay_dense_and_are_listed(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "intermediate_size": 66})).eval()
    art = artifact_for(model, tmp_path)
    before = {p.param: p.module.weight.detach().clone() for p in prunable_linears(art.student, art.adapter)}
    metrics = run_pass(get_pass("wanda")(get_pass("wanda").Config(nm="2:4")), art).metrics
    fc2 = sorted(p.param for p in prunable_linears(art.student, art.adapter) if p.role == "fc2")
    assert sorted(metrics["dense_nm"]) == fc2  # fc2 reads the 66 FFN channels; 66 % 4 = 2
    for pl in prunable_linears(art.student, art.adapter):
        w = pl.module.weight
        if pl.role == "fc2":
            assert torch.equal(w, before[pl.param])
        else:
            zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert torch.equal(zeros, torch.full_like(zeros, 2))


def polygraphy_sparse_tensors(path: Path) -> tuple[set[str], set[str]]:
    """(sparse, checked-but-not-sparse) initialiser names as the real polygraphy CLI reports them."""
    pytest.importorskip("polygraphy", reason="polygraphy (the dev extra) is not installed")
    cli = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    out = subprocess.run([cli, "inspect", "sparsity", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    return set(re.findall(r"Found sparse tensor: (\S+)", log)), set(re.findall(r"Found non-sparse tensor: (\S+)", log))


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_2of4_survives_onnx_export_along_axis_0_and_polygraphy_sees_it(tmp_path, pruner):
    art = artifact_for(tiny_model("bert"), tmp_path)
    run_pass(get_pass(pruner)(get_pass(pruner).Config(nm="2:4")), art)
    run_pass(get_pass("onnx")(get_pass("onnx").Config()), art)
    path = art.onnx["text"]
    names = json.loads(path.with_suffix(".names.json").read_text())
    targeted = {p.param for p in prunable_linears(art.student, art.adapter)}
    by_param = {v["param"]: (k, v["transposed"]) for k, v in names.items() if v and v["param"] in targeted}
    assert set(by_param) == targeted
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for param, (init, transposed) in by_param.items():
        array = inits[init]
        assert transposed  # MatMul(X, W) stores W as [in, out]: the 2:4 groups run along axis 0
        groups = array.reshape(array.shape[0] // 4, 4, array.shape[1])
        assert np.array_equal((groups == 0).sum(1), np.full((array.shape[0] // 4, array.shape[1]), 2))
    sparse, dense = polygraphy_sparse_tensors(path)
    targeted_inits = {init for init, _ in by_param.values()}
    assert targeted_inits <= sparse
    assert not targeted_inits & dense


def test_dense_export_is_not_reported_sparse(tmp_path):
    """The polygraphy check can fail: an unpruned export has no 2:4 weights."""
    art = artifact_for(tiny_model("bert"), tmp_path)
    run_pass(get_pass("onnx")(get_pass("onnx").Config()), art)
    names = json.loads(art.onnx["text"].with_suffix(".names.json").read_text())
    targeted = {p.param for p in prunable_linears(art.student, art.adapter)}
    sparse, dense = polygraphy_sparse_tensors(art.onnx["text"])
    targeted_inits = {k for k, v in names.items() if v and v["param"] in targeted}
    assert not targeted_inits & sparse and targeted_inits <= dense
