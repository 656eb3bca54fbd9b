"""Peak memory of block-sequential Wanda on a LLaVA-style decoder, against the model's size.

    python benchmarks/offload_memory.py                     # the tiny and the 24 x 1024 decoder, on CPU
    python benchmarks/offload_memory.py --device cuda       # model on CPU, one block at a time on the GPU

Each model is a LlavaForConditionalGeneration with random weights: a tiny CLIP vision tower (2 blocks,
32 wide) and a Llama decoder with grouped-query attention and a SwiGLU MLP. The mid-size decoder has 24
blocks, hidden 1024, 16 query heads in 4 key/value groups, MLP width 2816 and a 32,000-token vocabulary
(about 335 M parameters, 1.34 GB in fp32). Calibration is random token ids behind one image; it says
nothing about quality, only about memory, which depends on shapes alone.

Memory model. The pass keeps the model where it is (the CPU) and `lmmc.blockwise.visit_blocks` moves one
block at a time to the execution device. The CPU holds the model, the masks (one byte per prunable
weight, kept for later passes) and, on CPU execution, the working set of the block being pruned: the
calibration activations (every batch's block inputs, then the next block's), one linear's Σx² statistics
and Wanda's score, mask and top-k indices for one matrix. The execution device holds one block's weights
plus those activations and temporaries. Reported: the peak resident set (VmHWM, reset right before the
pass) over the resident set before it, and with --device cuda the peak CUDA memory allocated."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from lmmc.adapters import block_list, get_adapter, prunable_linears
from lmmc.artifact import Artifact
from lmmc.data import CalibData, tower_batches
from lmmc.pipeline import get_pass, load_passes

SIZES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=128),
    "24x1024": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
                    intermediate_size=2816, vocab_size=32000),
}
IMAGE_TOKENS = 9  # (30 / 10)² patches of the vision tower; its class token is dropped


def build(size: str, seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=30, patch_size=10)
    text = transformers.LlamaConfig(max_position_embeddings=2048, **SIZES[size])
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1,
                                   image_seq_length=IMAGE_TOKENS)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def calibration(model: torch.nn.Module, samples: int, tokens: int, batch_size: int) -> CalibData:
    """Random text of `tokens` tokens per sample, the image's tokens first."""
    gen = torch.Generator().manual_seed(0)
    image_token, vocab = model.config.image_token_id, model.config.text_config.vocab_size
    batches = []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        ids = torch.cat([torch.full((n, IMAGE_TOKENS), image_token),
                         torch.randint(0, image_token, (n, tokens - IMAGE_TOKENS), generator=gen)], 1)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "pixel_values": torch.randn(n, 3, 30, 30, generator=gen)})
    return CalibData(tower_batches(batches), tower_batches([]), "random", {"calibration": samples})


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def measure(size: str, device: torch.device, samples: int, tokens: int, batch_size: int) -> dict[str, Any]:
    model = build(size)
    adapter = get_adapter("llava")
    calib = calibration(model, samples, tokens, batch_size)
    language = block_list(model, adapter.tower("language"))[1]
    mb = 1024 ** 2
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in language)
    mask_bytes = sum(pl.module.weight.numel() for pl in prunable_linears(model, adapter))
    hidden = model.config.text_config.hidden_size
    activation_bytes = samples * tokens * hidden * 4  # one block's inputs for every calibration sample
    art = Artifact(model_ref=size, adapter=adapter, teacher=model, student=model, calib=calib, device=device)
    wanda = get_pass("wanda")
    rss_before = _status("VmRSS")
    _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    wanda(wanda.Config(sparsity=0.5)).run(art)
    seconds = time.perf_counter() - start
    out = {
        "size": size,
        "device": str(device),
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "model_MiB": round(model_bytes / mb, 2),
        "decoder_block_MiB": round(block_bytes / mb, 2),
        "masks_MiB": round(mask_bytes / mb, 2),
        "activations_MiB": round(activation_bytes / mb, 2),
        "rss_before_MiB": round(rss_before / mb, 2),
        "peak_rss_MiB": round(_status("VmHWM") / mb, 2),
        "peak_over_before_MiB": round((_status("VmHWM") - rss_before) / mb, 2),
        "seconds": round(seconds, 1),
    }
    if device.type == "cuda":
        out["peak_cuda_MiB"] = round(torch.cuda.max_memory_allocated(device) / mb, 2)
    del art, model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,24x1024", help=f"comma-separated, from {sorted(SIZES)}")
    parser.add_argument("--device", default="cpu", help="execution device; the model stays on the CPU")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sample, image tokens included")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    load_passes()
    rows = [measure(size, torch.device(args.device), args.samples, args.tokens, args.batch_size)
            for size in args.sizes.split(",")]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
