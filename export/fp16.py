"""FP16 ONNX: the student's graph with weights and matrix work in float16 and the numerically delicate ops
(layer norm, softmax, reductions) kept in float32 behind casts, as TensorRT's strongly typed builds need."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
from onnxruntime.transformers.float16 import convert_float_to_float16

# Layer norm and softmax lose accuracy in fp16; the reductions of the pooling head (a sum over up to
# hundreds of tokens, the L2 norm's sum of squares) can overflow its 65504 limit on outlier features.
KEEP_FP32 = ("LayerNormalization", "Softmax", "ReduceSum", "ReduceMean", "ReduceL2", "Pow", "Sqrt")


def to_fp16_onnx(src: Path, dst: Path, keep_fp32: tuple[str, ...] = KEEP_FP32) -> dict[str, int]:
    """Write `src` with float16 weights and compute to `dst`; inputs and outputs keep their float32 or
    integer types, so the file is a drop-in replacement. Returns the count of float16 and float32
    initialisers."""
    model = onnx.load(str(src))
    # the exporter's value_info names every initialiser; the converter relabels each float16, also the layer
    # norm weights it keeps float32, which ONNX's checker and shape inference then refuse
    weights = {i.name for i in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    # constants beyond fp16's range (the attention mask's -3.4e38) are clipped to +-65504, not made inf
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32))
    # the converter appends its casts at the end of the node list; ONNX wants producers first
    graph = ir.from_proto(half)
    graph.graph.sort()
    half = ir.to_proto(graph)
    onnx.checker.check_model(half, full_check=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(half, str(dst))
    kinds = Counter(onnx.TensorProto.DataType.Name(i.data_type).lower() for i in half.graph.initializer)
    return {"float16_initializers": kinds.get("float16", 0), "float32_initializers": kinds.get("float", 0)}
