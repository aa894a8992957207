"""The artifact cache (keys, manifests, partial directories, integrity) and the target registry."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.core.errors import EdgesmithError
from toolchain.pipeline.artifacts import (
    MANIFEST,
    Artifact,
    ArtifactStore,
    fingerprint_path,
    library_versions,
    sha256_file,
    stage_key,
)
from toolchain.pipeline.registry import EXPORTERS, RUNTIMES, Entry, Registry

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"lr": 0.002, "lora": {"rank": 16}}
INPUTS = {"model": "a" * 64, "data": "b" * 64}


def _commit(store: ArtifactStore, files: dict[str, bytes], *, stage_id: str = "train", key: str | None = None,
            figures: dict | None = None) -> Artifact:
    key = key or stage_key("train", CONFIG, INPUTS)
    tmp = store.partial_path(stage_id, key)
    tmp.mkdir(parents=True)
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return store.commit(stage_id, "train", key, CONFIG, INPUTS, figures or {"loss": 1.25}, wall_s=3.14159)


# -- stage keys -----------------------------------------------------------------------------------

def test_stage_key_is_stable():
    first = stage_key("train", CONFIG, INPUTS)

    again = stage_key("train", {"lora": {"rank": 16}, "lr": 0.002}, dict(reversed(list(INPUTS.items()))))

    assert first == again  # key order does not matter
    assert len(first) == 12 and all(c in "0123456789abcdef" for c in first)


@pytest.mark.parametrize("stage, config, inputs", [
    ("merge", CONFIG, INPUTS),
    ("train", {"lr": 0.001, "lora": {"rank": 16}}, INPUTS),
    ("train", {"lr": 0.002, "lora": {"rank": 8}}, INPUTS),
    ("train", CONFIG, {"model": "a" * 64, "data": "c" * 64}),
    ("train", CONFIG, {"model": "a" * 64}),
])
def test_stage_key_changes_with_stage_config_or_inputs(stage, config, inputs):
    assert stage_key(stage, config, inputs) != stage_key("train", CONFIG, INPUTS)


# -- commit ---------------------------------------------------------------------------------------

def test_commit_writes_manifest_and_renames_partial(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    key = stage_key("train", CONFIG, INPUTS)
    files = {"adapter.safetensors": b"weights" * 100, "logs/trainer.json": b'{"step": 1}'}

    art = _commit(store, files, key=key, figures={"loss": 1.25, "steps": 30})

    final = tmp_path / "run" / "artifacts" / f"train-{key}"
    assert art.path == final and final.is_dir()
    assert not store.partial_path("train", key).exists()
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest == art.manifest
    assert (manifest["stage"], manifest["stage_id"], manifest["key"]) == ("train", "train", key)
    assert manifest["config"] == CONFIG and manifest["inputs"] == INPUTS
    assert manifest["figures"] == {"loss": 1.25, "steps": 30}
    assert manifest["wall_s"] == 3.142
    assert manifest["versions"] == library_versions()
    assert "python" in manifest["versions"] and "torch" in manifest["versions"]
    assert manifest["files"] == [
        {"path": "adapter.safetensors", "size": 700, "sha256": sha256_file(final / "adapter.safetensors")},
        {"path": "logs/trainer.json", "size": 11, "sha256": sha256_file(final / "logs" / "trainer.json")},
    ]
    assert len(manifest["hash"]) == 64 and art.hash == manifest["hash"]


def test_commit_links_the_stage_id_to_the_artifact(tmp_path):
    run = tmp_path / "run"
    store = ArtifactStore(run)

    first = _commit(store, {"a.txt": b"one"}, key="k1")
    second = _commit(store, {"a.txt": b"two"}, key="k2")

    link = run / "train"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))  # relative: the run directory can be moved
    assert link.resolve() == second.path.resolve()
    assert (link / "a.txt").read_bytes() == b"two"
    assert first.path.is_dir()  # the earlier artifact is kept for the cache
    assert not list(run.glob(".*link-tmp"))


def test_commit_refuses_to_replace_a_user_directory(tmp_path):
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    store = ArtifactStore(run)

    with pytest.raises(FileExistsError, match="not a link made by edgesmith"):
        _commit(store, {"a.txt": b"x"})

    assert (run / "train").is_dir() and not (run / "train").is_symlink()


def test_recommit_replaces_the_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    _commit(store, {"a.txt": b"old", "stale.txt": b"gone"}, key="k")

    art = _commit(store, {"a.txt": b"new"}, key="k")

    assert [f["path"] for f in art.manifest["files"]] == ["a.txt"]
    assert not (art.path / "stale.txt").exists()


# -- lookup ---------------------------------------------------------------------------------------

def test_lookup_finds_a_committed_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    art = _commit(store, {"a.txt": b"hello"}, key="k")

    found = store.lookup("train", "k")

    assert found is not None and found.path == art.path and found.hash == art.hash
    assert found.figures == {"loss": 1.25}
    assert store.lookup("train", "other") is None


def test_lookup_ignores_a_partial_directory(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    tmp = store.partial_path("train", "k")
    tmp.mkdir(parents=True)
    (tmp / "a.txt").write_bytes(b"half")
    (tmp / MANIFEST).write_text(json.dumps({"hash": "h", "files": []}))

    assert tmp.name == "train-k.partial"
    assert store.lookup("train", "k") is None


def test_lookup_ignores_a_truncated_file(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    art = _commit(store, {"weights.bin": b"\x01" * 1000, "b.txt": b"ok"}, key="k")
    assert art.looks_whole()
    (art.path / "weights.bin").write_bytes(b"\x01" * 999)

    assert not Artifact(art.path, art.manifest).looks_whole()
    assert store.lookup("train", "k") is None


def test_lookup_ignores_a_missing_file_or_broken_manifest(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    gone = _commit(store, {"a.txt": b"x", "b.txt": b"y"}, key="gone")
    broken = _commit(store, {"a.txt": b"x"}, key="broken")
    (gone.path / "b.txt").unlink()
    (broken.path / MANIFEST).write_text('{"files": [')

    assert store.lookup("train", "gone") is None
    assert store.lookup("train", "broken") is None


def test_verify_reports_a_file_changed_at_the_same_size(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    art = _commit(store, {"a.bin": b"A" * 64, "b.bin": b"B" * 64}, key="k")
    assert art.verify() == []
    (art.path / "b.bin").write_bytes(b"C" * 64)

    found = store.lookup("train", "k")

    assert found is not None  # sizes still match: the cheap check passes
    assert found.verify() == ["b.bin"]


# -- input fingerprints ---------------------------------------------------------------------------

def test_fingerprint_changes_when_a_data_file_changes(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n')
    before = fingerprint_path(data)

    assert fingerprint_path(data) == before
    data.write_text('{"text": "b"}\n')

    assert fingerprint_path(data) != before


def test_fingerprint_of_a_directory_tracks_names_and_contents(tmp_path):
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x.arrow").write_bytes(b"1")
    before = fingerprint_path(d)
    (d / "sub" / "x.arrow").write_bytes(b"2")
    changed = fingerprint_path(d)
    (d / "sub" / "x.arrow").write_bytes(b"1")
    (d / "sub" / "x.arrow").rename(d / "sub" / "y.arrow")

    assert changed != before
    assert fingerprint_path(d) not in (before, changed)


# -- registry -------------------------------------------------------------------------------------

def _entry(name: str = "dup", target: str = "pkg.mod:thing", requires: tuple[str, ...] = (),
           extra: str | None = "extra") -> Entry:
    return Entry(name, target, extra, requires, "a test entry")


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(EdgesmithError, match=r"exporter 'dup' is registered twice \(pkg.mod:thing and other:thing\)"):
        Registry("exporter", [_entry(), _entry(target="other:thing")])


def test_registry_get_unknown_names_the_known():
    reg = Registry("runtime", [_entry("b"), _entry("a")])

    with pytest.raises(EdgesmithError, match="unknown runtime 'c'; known: a, b"):
        reg.get("c")
    assert reg.names() == ["b", "a"] and "a" in reg and "c" not in reg


def test_builtin_tables():
    assert {"onnx", "gguf", "gguf-lora"} <= set(EXPORTERS.names())
    assert {"torch", "onnxruntime", "llama.cpp"} <= set(RUNTIMES.names())
    assert EXPORTERS.get("onnx").runtimes == ("onnxruntime",)
    # every entry names a module:attribute and, where it takes options, a config class
    assert all(":" in e.target and (e.config is None or ":" in e.config) for e in [*EXPORTERS, *RUNTIMES])
    assert all(rt in RUNTIMES for e in EXPORTERS for rt in e.runtimes)


def test_listing_targets_imports_no_target_module():
    code = ("import toolchain.pipeline.registry as r; [e.installed() for e in r.RUNTIMES]; "
            "[e.missing() for e in r.EXPORTERS]; r.EXPORTERS.names(); import sys; "
            "print('onnxruntime' in sys.modules, 'torch' in sys.modules, 'onnx' in sys.modules)")

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


def test_load_of_a_missing_module_names_the_pip_extra():
    entry = _entry("fancy", requires=("edgesmith_no_such_module_xyz",), extra="fancy")

    assert entry.missing() == ["edgesmith_no_such_module_xyz"] and not entry.installed()
    with pytest.raises(EdgesmithError) as info:
        entry.load()
    assert "'fancy' needs edgesmith_no_such_module_xyz, which is not installed" in str(info.value)
    assert "pip install 'edgesmith[fancy]'" in str(info.value)


def test_load_without_an_extra_names_the_package():
    entry = _entry("plain", requires=("edgesmith_no_such_module_xyz",), extra=None)

    with pytest.raises(EdgesmithError, match="fix: pip install edgesmith_no_such_module_xyz"):
        entry.load()


def test_load_of_an_installed_entry_returns_the_attribute():
    entry = _entry("ok", target="toolchain.pipeline.artifacts:stage_key", requires=("json",))

    assert entry.load() is stage_key
