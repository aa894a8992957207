"""Training under a launcher: ``torchrun`` with 2 CPU processes on gloo trains the adapter one process
trains at the combined batch, only rank 0 writes, and rank 1 stops after the train stage.

Why the two runs see the same examples: the Trainer's sampler (accelerate's SeedableRandomSampler,
seeded with train.seed) draws the same permutation in every process, and accelerate's batch-sampler
shard gives rank r the batches r, r + 2, ... of batch_size b, so step k's two batches are the single
process's step k at batch 2b (the users' default shuffle, no test-only order). The loss is the sum over
label tokens divided by every rank's label-token count (average_tokens_across_devices), times the
number of ranks because DDP averages gradients: the gradient of the token mean over the global batch.

This file is also the per-rank harness the test starts under torchrun (``python -m
tests.toolchain.test_distributed``): it records every file the rank writes under a watched folder
(Python's audit hooks: open for writing, mkdir, rename, remove, rmtree, symlink).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tolerances import DDP_ADAPTER_ADAMW, DDP_ADAPTER_SGD, DDP_ADAPTER_SGD_EFFECT

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "dates.jsonl"
ROWS, STEPS, PER_RANK = 24, 3, 4  # 24 rows = 3 steps of 2 ranks x 4 = 3 steps of 8 in one process


def seed_the_adapter_init() -> None:
    """LoRA's A matrices are drawn from torch's global generator when the adapter is wrapped, before the
    Trainer seeds anything: here the draw follows train.seed, so both runs start from the same adapter (DDP
    then broadcasts rank 0's weights to rank 1). Without it the pytest process and a fresh rank 0 differ."""
    from toolchain.training.lora import Lora

    plain = Lora.wrap

    def wrap(self, model, tcfg):
        import torch

        torch.manual_seed(tcfg.seed)
        return plain(self, model, tcfg)

    Lora.wrap = wrap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], watch: Path, audit: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tests.toolchain.test_distributed", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", EDGESMITH_TEST_WATCH=str(watch), EDGESMITH_TEST_AUDIT=str(audit),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("EDGESMITH_PROGRESS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def write_recipe(tmp: Path, model_dir: Path, name: str, batch_size: int) -> Path:
    doc = {
        "name": name, "output_dir": str(tmp / "runs"), "model": {"source": str(model_dir)},
        "data": {"path": str(DATA), "eval_size": 8, "max_rows": ROWS + 8, "max_length": 64},
        "train": {"lora": {"rank": 4, "alpha": 8}, "learning_rate": 1e-2, "batch_size": batch_size,
                  "max_steps": STEPS, "logging_steps": 1, "eval_every": "no", "lr_scheduler": "constant",
                  "threads": 1, "seed": 3},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def max_diff(a: Path, b: Path) -> tuple[float, float]:
    """(max |a - b| over every adapter tensor, max |b| over the lora_B tensors: the update's size)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and ta
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    size = max(float(tb[k].abs().max()) for k in tb if "lora_B" in k)
    return diff, size


def writes(audit: Path, rank: int) -> list[str]:
    return json.loads((audit / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir):
    """One torchrun launch: the SGD harness run, then `edgesmith train` on the recipe; then a second launch
    of the same command, which finds the train stage cached."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = write_recipe(tmp, tiny_model_dir, "ddp", PER_RANK)
    spec = {"model": str(tiny_model_dir), "rows": ROWS, "batch_size": PER_RANK, "out": str(tmp / "sgd-ddp")}
    (tmp / "sgd.json").write_text(json.dumps(spec))
    first = torchrun(["both", str(tmp / "sgd.json"), "train", str(recipe), "--quiet"], tmp, tmp / "audit1")
    again = torchrun(["cli", "train", str(recipe), "--quiet"], tmp, tmp / "audit2")
    return tmp, first, again


def test_two_ranks_train_the_adapter_of_one_process_at_the_combined_batch(launched, tiny_model_dir, monkeypatch):
    from toolchain.cli import main

    tmp, first, _ = launched
    from toolchain.training.lora import Lora
    monkeypatch.setattr(Lora, "wrap", Lora.wrap)  # restored after the test
    seed_the_adapter_init()
    single = write_recipe(tmp, tiny_model_dir, "one", 2 * PER_RANK)
    assert main(["train", str(single), "--quiet"]) == 0
    ddp_dir, one_dir = tmp / "runs" / "ddp" / "train", tmp / "runs" / "one" / "train"
    diff, size = max_diff(ddp_dir / "adapter_model.safetensors", one_dir / "adapter_model.safetensors")
    print(f"AdamW: max |ddp - single| {diff:.3g}, max |lora_B| {size:.3g}")
    assert diff <= DDP_ADAPTER_ADAMW.atol
    ddp_fig = json.loads((ddp_dir / "manifest.json").read_text())["figures"]
    one_fig = json.loads((one_dir / "manifest.json").read_text())["figures"]
    assert ddp_fig["steps"] == one_fig["steps"] == STEPS
    assert ddp_fig["train_tokens"] == one_fig["train_tokens"]  # both ranks' tokens, counted once each

    # SGD without clipping: the update is proportional to the gradient, so a loss normalised per rank or
    # not scaled back up for DDP's gradient average (half the gradient here) shows; AdamW would hide it
    spec = {"model": str(tiny_model_dir), "rows": ROWS, "batch_size": 2 * PER_RANK, "out": str(tmp / "sgd-one")}
    sgd_train(spec)
    diff, size = max_diff(tmp / "sgd-ddp" / "adapter_model.safetensors", tmp / "sgd-one" / "adapter_model.safetensors")
    print(f"SGD: max |ddp - single| {diff:.3g}, max |lora_B| {size:.3g}")
    assert diff <= DDP_ADAPTER_SGD.atol
    assert size >= DDP_ADAPTER_SGD_EFFECT.lo  # the update is large enough for a halved gradient to show


def test_only_rank_0_writes_and_rank_1_stops_after_training(launched):
    tmp, first, again = launched
    out = first.stdout
    assert "edgesmith rank 1: training done; rank 0 continues" in out
    assert out.count("train: lora fine-tune ...") == 1  # stage logs come from rank 0 only
    assert out.count("1 stages: 1 ran") == 0 and out.count("stages: ") == 1  # the closing line too
    # rank 1 wrote nothing but the Trainer's checkpoint folder for its own random-number state (what --resume
    # needs to continue every rank exactly; torch.save writes the file from C++, out of the hook's sight),
    # inside rank 0's .partial folder; nothing in the SGD run (no checkpoints). A rank-1 adapter or tokenizer
    # save would show: adapter_config.json and the tokenizer files are written from Python.
    theirs = writes(tmp / "audit1", 1)
    assert theirs, "the audit hook saw nothing: it cannot tell"
    for entry in theirs:
        event, path = entry.split(" ", 1)
        rel = Path(path).relative_to(tmp / "runs" / "ddp" / "artifacts")
        assert rel.parts[0].startswith("train-") and rel.parts[0].endswith(".partial"), entry
        assert rel.parts[1] == "checkpoints" and (len(rel.parts) == 2 or rel.parts[2].startswith("checkpoint-")), entry
        assert (event == "os.mkdir" and len(rel.parts) <= 3) or rel.name == "rng_state_1.pth", entry
    ddp = {str(p.relative_to(tmp / "runs" / "ddp" / "train")) for p in (tmp / "runs" / "ddp" / "train").rglob("*")}
    assert "checkpoints/checkpoint-3/rng_state_1.pth" in ddp and "checkpoints/checkpoint-3/rng_state_0.pth" in ddp
    mine = writes(tmp / "audit1", 0)
    assert any(p.endswith("adapter_config.json") for p in mine)
    for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "loss.png"):
        assert (tmp / "runs" / "ddp" / "train" / name).is_file(), name
    assert (tmp / "sgd-ddp" / "adapter_model.safetensors").is_file()

    # the same launch again: rank 0 finds the train stage cached, and rank 1 skips it with it
    assert "edgesmith rank 1: stage train is cached; rank 0 continues" in again.stdout
    assert "train: cached" in again.stdout and "train: lora fine-tune" not in again.stdout
    assert writes(tmp / "audit2", 1) == []


def test_the_train_key_counts_the_ranks(tmp_path, tiny_model_dir, monkeypatch):
    from toolchain.pipeline.plan import plan
    from toolchain.pipeline.recipe import load_recipe
    from toolchain.pipeline.runner import Runner

    stages = {s.id: s for s in plan(load_recipe(write_recipe(tmp_path, tiny_model_dir, "k", 4)))}
    one = Runner.key(stages["train"], {}), Runner.key(stages["data"], {})
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Runner.key(stages["train"], {}) != one[0]  # 2 ranks x batch 4 is another training than 1 x 4
    assert Runner.key(stages["data"], {}) == one[1]


def test_fsdp_and_deepspeed_config_files_are_checked(tmp_path, tiny_model_dir):
    from toolchain.core.errors import RecipeError
    from toolchain.pipeline.recipe import load_recipe

    path = write_recipe(tmp_path, tiny_model_dir, "f", 4)
    with pytest.raises(RecipeError, match=r"train\.fsdp: must name an existing JSON file, got 'nope\.json'"):
        load_recipe(path, {"train.fsdp": "nope.json"})
    (tmp_path / "bad.json").write_text("{version: 2")
    with pytest.raises(RecipeError, match=r"train\.fsdp: must be a JSON file"):
        load_recipe(path, {"train.fsdp": "bad.json"})
    (tmp_path / "fsdp.json").write_text('{"version": 2}')
    with pytest.raises(RecipeError, match=r"train\.deepspeed: cannot be combined with train\.fsdp"):
        load_recipe(path, {"train.fsdp": "fsdp.json", "train.deepspeed": "fsdp.json"})
    recipe = load_recipe(path, {"train.fsdp": "fsdp.json"})
    assert recipe.train.fsdp == str(tmp_path / "fsdp.json")  # relative to the recipe, made absolute


# --- the per-rank harness ---------------------------------------------------------------------------

def sgd_train(spec: dict) -> dict:
    """train() with plain SGD and no gradient clipping on the first ``rows`` training rows."""
    from toolchain.pipeline.recipe import DataSection, LoraSection, TrainSection
    from toolchain.training.lora import Lora
    from toolchain.training.trainer import train

    class SgdLora(Lora):
        def training_arguments(self, tcfg) -> dict:
            return {"optim": "sgd", "max_grad_norm": 0.0}

    with open(DATA) as f:
        rows = [json.loads(line) for line in f][: spec["rows"]]
    tcfg = TrainSection(lora=LoraSection(rank=4, alpha=8), learning_rate=2.0, batch_size=spec["batch_size"],
                        max_steps=STEPS, logging_steps=1, eval_every="no", lr_scheduler="constant", threads=1,
                        save_checkpoints=False, seed=3)
    out = Path(spec["out"])
    if os.environ.get("RANK", "0") == "0":
        out.mkdir(parents=True, exist_ok=True)
    from toolchain.core import dist
    dist.barrier()
    return train(Path(spec["model"]), rows, [], tcfg, DataSection(path=str(DATA), max_length=64), out, SgdLora(),
                 progress=False)


def _audit(watch: Path, audit: Path) -> None:
    """Record this rank's writes under ``watch`` (not under ``audit``) and dump them when the process ends."""
    import atexit

    rank = os.environ.get("RANK", "0")
    seen: list[str] = []
    watch, audit = str(watch), str(audit)

    def under(p) -> bool:
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        if not isinstance(p, (str, os.PathLike)):
            return False
        p = os.path.abspath(os.fspath(p))
        return p.startswith(watch + os.sep) and not p.startswith(audit)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and under(path):
                seen.append(f"open {os.fspath(path)}")
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            if under(args[0]):
                seen.append(f"{event} {os.fspath(args[0])}")
        elif event in ("os.rename", "os.symlink", "os.link"):
            if under(args[0]) or under(args[1]):
                seen.append(f"{event} {os.fspath(args[1])}")

    def dump():
        os.makedirs(audit, exist_ok=True)
        with open(os.path.join(audit, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)

    atexit.register(dump)
    sys.addaudithook(hook)


def harness(argv: list[str]) -> int:
    _audit(Path(os.environ["EDGESMITH_TEST_WATCH"]), Path(os.environ["EDGESMITH_TEST_AUDIT"]))
    seed_the_adapter_init()
    if argv[0] == "both":  # the SGD run, then the CLI in the same processes (one start-up for both)
        sgd_train(json.loads(Path(argv[1]).read_text()))
        argv = ["cli", *argv[2:]]
    from toolchain.cli import main

    return main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(harness(sys.argv[1:]))
