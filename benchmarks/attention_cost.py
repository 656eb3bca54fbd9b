"""What one attention sublayer costs in OpenVINO by its shape: heads, query/key size and value size, at a
fixed input (8 x 128 tokens of width 384, 2 threads, bf16 inference where the CPU has it, static shapes).

    python benchmarks/attention_cost.py [--runs 100]

Each row is a block of BERT's self-attention (query, key and value projections, scaled dot-product
attention under a padding mask, output projection, residual add) with random weights, converted from
PyTorch as lmmc's OpenVINO export converts a tower, timed in turns with the others. 'attention' is the
fused subgraph that computes the scores, softmax and weighted sum (OpenVINO's PERF_COUNT). It shows what
a structure pays per attention map, which pruning query/key sizes does not reduce and sharing one map
between heads would."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from lmmc.runtime.openvino import cpu_has_bf16

# (attention maps, query/key size, value size per map): MiniLM's head is 32 wide
SHAPES = [(10, 32, 32), (10, 16, 32), (10, 8, 32), (5, 32, 32), (5, 32, 64), (5, 64, 64)]


class Attention(torch.nn.Module):
    def __init__(self, heads: int, qk: int, v: int, width: int = 384) -> None:
        super().__init__()
        self.heads, self.qk, self.v = heads, qk, v
        self.query, self.key = torch.nn.Linear(width, heads * qk), torch.nn.Linear(width, heads * qk)
        self.value, self.out = torch.nn.Linear(width, heads * v), torch.nn.Linear(heads * v, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor, size: int) -> torch.Tensor:
            return t.view(b, n, self.heads, size).transpose(1, 2)

        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        y = F.scaled_dot_product_attention(split(self.query(x), self.qk), split(self.key(x), self.qk),
                                           split(self.value(x), self.v), attn_mask=bias)
        return self.out(y.transpose(1, 2).reshape(b, n, self.heads * self.v)) + x


def main() -> None:
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, mask = torch.randn(8, 128, 384), torch.ones(8, 128, dtype=torch.long)
    mask[:, 100:] = 0
    core = ov.Core()
    inference = "bf16" if cpu_has_bf16() else "f32"
    requests = {}
    for shape in SHAPES:
        model = ov.convert_model(Attention(*shape).eval(), example_input=(x, mask))
        model.reshape({model.inputs[0].get_any_name(): [8, 128, 384], model.inputs[1].get_any_name(): [8, 128]})
        config = {"INFERENCE_NUM_THREADS": "2", "INFERENCE_PRECISION_HINT": inference, "PERF_COUNT": "YES",
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        requests[shape] = core.compile_model(model, "CPU", config).create_infer_request()
    feed = [x.numpy(), mask.numpy()]
    walls = {s: [] for s in SHAPES}
    subgraph = {s: [] for s in SHAPES}
    for _ in range(5):
        for request in requests.values():
            request.infer(feed)
    for _ in range(args.runs):
        for shape, request in requests.items():
            start = time.perf_counter()
            request.infer(feed)
            walls[shape].append((time.perf_counter() - start) * 1e3)
            subgraph[shape].append(sum(p.real_time.total_seconds() * 1e3 for p in request.profiling_info
                                       if p.node_type == "Subgraph" and p.status == p.Status.EXECUTED))
    print(f"8 x 128 tokens of width 384, 2 threads, {inference} inference, static shapes, {args.runs} runs each "
          f"in turns; medians")
    print("| maps | query/key size | value size | block ms | attention ms | attention ms a map |")
    print("|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        att = statistics.median(subgraph[shape])
        print(f"| {shape[0]} | {shape[1]} | {shape[2]} | {statistics.median(walls[shape]):.3f} | {att:.3f} | "
              f"{att / shape[0]:.3f} |")


if __name__ == "__main__":
    main()
