"""Artifact directories, their manifests, and the content-addressed stage cache.

Every stage writes one directory holding ``manifest.json``: the stage, its config, the hashes
of its input manifests, library versions, every file with its sha256, and the stage's measured
figures. A directory's name carries the stage *key* — a hash of (stage, config, input hashes) —
so an unchanged recipe finds every output already there, and a changed stage config changes
that stage's key and (through its new manifest hash) the keys of every stage after it.

Writes go to ``<final>.partial`` and are renamed into place when whole: an interrupted run never
leaves a half artifact that looks complete (and ``train --resume`` finds its checkpoints there).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.core.files import symlink_atomic, write_json_atomic

MANIFEST = "manifest.json"
KEY_LEN = 12
# Libraries whose versions are recorded in every manifest (those installed).
TRACKED_LIBS = ("edgesmith", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
                "onnx", "onnxruntime", "gguf", "numpy", "datasets", "llama_cpp_python")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_path(path: Path) -> str:
    """A cheap identity for an input file or directory: sha256 of files up to 64 MiB, and
    (size, mtime) for larger ones so a multi-GB checkpoint is not re-read on every run."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = []
    for p in files:
        st = p.stat()
        rel = p.name if path.is_file() else str(p.relative_to(path))
        ident = sha256_file(p) if st.st_size <= 64 << 20 else f"{st.st_size}:{st.st_mtime_ns}"
        parts.append((rel, ident))
    return hash_obj(parts)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_LIBS:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Artifact:
    """A finished artifact directory and its manifest."""

    path: Path
    manifest: dict

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def figures(self) -> dict:
        return self.manifest.get("figures", {})

    @property
    def size_bytes(self) -> int:
        """Bytes of the files the manifest lists (what a target ships)."""
        return sum(e["size"] for e in self.manifest.get("files", []))

    @classmethod
    def open(cls, path: Path) -> "Artifact | None":
        mf = Path(path) / MANIFEST
        if not mf.is_file():
            return None
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError:
            return None
        art = cls(Path(path), manifest)
        return art if art.looks_whole() else None

    def looks_whole(self) -> bool:
        """Every listed file is present with its recorded size (cheap; `verify` checks hashes)."""
        for entry in self.manifest.get("files", []):
            p = self.path / entry["path"]
            if not p.is_file() or p.stat().st_size != entry["size"]:
                return False
        return True

    def verify(self) -> list[str]:
        """Files whose sha256 no longer matches the manifest."""
        bad = []
        for entry in self.manifest.get("files", []):
            p = self.path / entry["path"]
            if not p.is_file() or sha256_file(p) != entry["sha256"]:
                bad.append(entry["path"])
        return bad


def list_files(root: Path) -> list[dict]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append({"path": str(p.relative_to(root)), "size": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def stage_key(stage: str, config: dict, inputs: dict[str, str], versions: dict[str, str] | None = None) -> str:
    doc = {"stage": stage, "config": config, "inputs": inputs}
    if versions:
        doc["versions"] = versions
    return hash_obj(doc)[:KEY_LEN]


class ArtifactStore:
    """Artifacts of one run: ``<run_dir>/artifacts/<stage-id>-<key>`` plus a link per stage."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "artifacts"

    def path_for(self, stage_id: str, key: str) -> Path:
        return self.root / f"{stage_id}-{key}"

    def lookup(self, stage_id: str, key: str) -> Artifact | None:
        return Artifact.open(self.path_for(stage_id, key))

    def partial_path(self, stage_id: str, key: str) -> Path:
        return self.path_for(stage_id, key).with_name(self.path_for(stage_id, key).name + ".partial")

    def commit(self, stage_id: str, stage: str, key: str, config: dict, inputs: dict[str, str],
               figures: dict, wall_s: float) -> Artifact:
        """Write the manifest into the partial directory and rename it into place."""
        tmp = self.partial_path(stage_id, key)
        final = self.path_for(stage_id, key)
        files = list_files(tmp)
        manifest = {
            "stage": stage, "stage_id": stage_id, "key": key, "config": config, "inputs": inputs,
            "versions": library_versions(), "files": files, "figures": figures,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(wall_s, 3),
        }
        manifest["hash"] = hash_obj({"key": key, "files": [(f["path"], f["sha256"]) for f in files],
                                     "figures_keys": sorted(figures)})
        write_json_atomic(tmp / MANIFEST, manifest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.link(stage_id, final)
        return Artifact(final, manifest)

    def link(self, stage_id: str, target: Path) -> None:
        """``<run_dir>/<stage-id>`` points at the current artifact of that stage."""
        link = self.run_dir / stage_id
        if link.exists() and not link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a link made by edgesmith; move it away")
        symlink_atomic(link, os.path.relpath(target, self.run_dir))
