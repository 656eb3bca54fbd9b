"""Zero-shot accuracy of an image-text sample teacher (digits or shapes) and of its compiled students on the
held-out test images.

    .venv/bin/python benchmarks/digits.py --teacher out/digits/model --data out/digits/data \
        out/digits-ecoflap-wanda60 out/digits-wanda60 out/digits-structured50-distill ...
    .venv/bin/python benchmarks/digits.py --sample shapes --teacher out/shapes/model --data out/shapes/data \
        out/shapes-structured50-distill

Each test image is matched against the class prompts of the sample's teacher script (samples/teachers/:
digits.py's ten, shapes.py's 192), each prompt tokenised as lmmc deploys the model's texts; the teacher runs in
PyTorch, each student in PyTorch (`lmmc.load_student`) and through every artifact its manifest lists
(`lmmc.runtime`: ONNX Runtime, OpenVINO, fp32 and INT8). The table gives accuracy, the ratio to the
teacher's, and from each compile's report.json the sparsity and FLOPs kept per tower.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]


def _teacher_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_teacher", REPO / "samples" / "teachers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = _teacher_script("digits")


def test_set(data: Path, sample=digits) -> tuple[list[Path], np.ndarray]:
    """The distinct test images and their labels."""
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    by_image = sorted({r["image"]: sample.label_of(r) for r in records}.items())
    return [data / p for p, _ in by_image], np.array([label for _, label in by_image])


def accuracy(image_emb: np.ndarray, prompt_emb: np.ndarray, labels: np.ndarray) -> float:
    return digits.zero_shot_accuracy(torch.from_numpy(image_emb), torch.from_numpy(prompt_emb),
                                     torch.from_numpy(labels))


def attribute_line(sample, embeddings: tuple[np.ndarray, np.ndarray], labels: np.ndarray) -> str:
    """The share of images whose chosen prompt names each attribute of their class right (shapes only)."""
    image_emb, prompt_emb = (torch.nn.functional.normalize(torch.from_numpy(e), dim=-1) for e in embeddings)
    chosen = (image_emb @ prompt_emb.T).argmax(dim=-1).numpy()
    classes = sample.classes()
    return ", ".join(f"{name} {np.mean([classes[c][i] == classes[t][i] for c, t in zip(chosen, labels)]):.2%}"
                     for i, name in enumerate(sample.ATTRIBUTES))


@torch.no_grad()
def torch_embeddings(model: torch.nn.Module, model_dir: Path, images: list[Path],
                     prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled embeddings of the images and the class prompts through lmmc's adapter for the model."""
    from PIL import Image

    from lmmc.adapters import get_adapter
    from lmmc.modelio import text_pad_length

    adapter = get_adapter(model.config.model_type)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    # Padded as lmmc deploys the texts: to the full length for a model read at one (SigLIP), where a tokenizer
    # that returns no attention mask leaves the padding attended.
    length = text_pad_length(model.config, adapter)
    text = tokenizer(prompts, padding="max_length" if length else True, max_length=length, return_tensors="pt")
    mask = text.get("attention_mask", torch.ones_like(text["input_ids"]))
    prompts = adapter.tower("text").embed(model, {"input_ids": text["input_ids"], "attention_mask": mask})[1]
    pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    embedded = [adapter.tower("vision").embed(model, {"pixel_values": chunk})[1] for chunk in pixels.split(128)]
    return torch.cat(embedded).numpy(), prompts.numpy()


def _tower_figures(report: dict) -> str:
    """Sparsity and FLOPs kept per tower, from the compile's report.json."""
    parts = []
    sparsity = (report.get("sparsity") or {}).get("sparsity_per_tower") or {}
    if any(sparsity.values()):
        parts.append("sparsity " + ", ".join(f"{t} {v:.1%}" for t, v in sorted(sparsity.items())))
    flops = report.get("flops") or {}
    if any(f["kept"] < 1 for f in flops.values()):
        parts.append("FLOPs kept " + ", ".join(f"{t} {f['kept']:.1%} at {f['tokens']} tokens"
                                               for t, f in sorted(flops.items())))
    return "; ".join(parts)


def student_embeddings(out_dir: Path, images: list[Path], sample=digits) -> tuple[np.ndarray, np.ndarray]:
    """The compiled student's embeddings of the images and class prompts, in PyTorch."""
    import lmmc

    student = lmmc.load_student(out_dir / "student").eval()
    return torch_embeddings(student, out_dir / "student", images, sample.class_prompts())


def rows_for(out_dir: Path, images: list[Path], labels: np.ndarray, threads: int, sample,
             pytorch: tuple[np.ndarray, np.ndarray]) -> list[tuple[str, str, float]]:
    """(artifact, towers note, accuracy) for the PyTorch student (its `student_embeddings`) and every
    artifact in the manifest."""
    from lmmc import runtime

    report = json.loads((out_dir / "report.json").read_text())
    rows = [("pytorch fp32", _tower_figures(report), accuracy(*pytorch, labels))]
    manifest = runtime.read_manifest(out_dir)
    # A fused graph is kept only for a tower where it ran faster: score the kinds every tower has.
    per_tower = [{(a["backend"], a["precision"], a["variant"]) for a in manifest["artifacts"] if a["tower"] == t}
                 for t in manifest["towers"]]
    kinds = sorted(set.intersection(*per_tower))
    for backend, precision, variant in kinds:
        deployment = runtime.open_dir(out_dir, backend, precision, variant, threads)
        image_emb = deployment.encode(images, batch_size=64)
        prompt_emb = deployment.encode(sample.class_prompts())
        name = " ".join(x for x in (backend, precision, variant) if x and x != "plain")
        rows.append((name, "", accuracy(image_emb, prompt_emb, labels)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher's model directory")
    parser.add_argument("--data", type=Path, required=True, help="the data directory holding test.jsonl")
    parser.add_argument("--sample", choices=("digits", "shapes"), default="digits",
                        help="the teacher script in samples/teachers/ whose classes and prompts the data has")
    parser.add_argument("--by-attribute", action="store_true",
                        help="shapes: also the share of each attribute named right, in PyTorch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("outputs", type=Path, nargs="*", help="lmmc compile output directories")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    sample = digits if args.sample == "digits" else _teacher_script(args.sample)
    images, labels = test_set(args.data, sample)
    teacher = transformers.AutoModel.from_pretrained(args.teacher).eval()
    embeddings = torch_embeddings(teacher, args.teacher, images, sample.class_prompts())
    base = accuracy(*embeddings, labels)
    students = {out_dir: student_embeddings(out_dir, images, sample) for out_dir in args.outputs}
    if args.by_attribute:
        print("attributes named right (PyTorch fp32):")
        print(f"  teacher: {attribute_line(sample, embeddings, labels)}")
        for out_dir, pytorch in students.items():
            print(f"  {out_dir.name}: {attribute_line(sample, pytorch, labels)}")
        print()
    print(f"{len(images)} test images, never trained, calibrated or distilled on; prompts: "
          f"\"{sample.PROMPT}\"\n")
    print(f"{'model':34} {'artifact':28} {'accuracy':>8} {'/ teacher':>9}  towers")
    print(f"{'teacher':34} {'pytorch fp32':28} {base:8.2%} {1:9.3f}")
    for out_dir, pytorch in students.items():
        for artifact, note, acc in rows_for(out_dir, images, labels, args.threads, sample, pytorch):
            print(f"{out_dir.name:34} {artifact:28} {acc:8.2%} {acc / base:9.3f}  {note}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
