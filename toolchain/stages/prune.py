"""Stage ``prune``: the merged model cut structurally (and optionally sparsified), healed by distillation.

Its output is *the model* every later stage uses (eval, reference, every export), a standard Hugging
Face checkpoint with its config updated, so every exporter takes it unchanged. The cuts and their
rules are ``toolchain/pruning`` 's: whole decoder layers by the angular distance between a block's input
and output on the calibration sample, MLP channels (the same count in every layer, a multiple of 32 or
256), attention heads by whole GQA groups; channels and groups scored by magnitude or Wanda on the
same calibration sample (and hash) the quantisers read. ``sparse`` adds unstructured or N:M masks as a
quality experiment (no target edgesmith ships runs them faster or smaller: the runtimes densify them);
the mask is re-applied after the healing merge.

Healing (``prune.heal``) trains the pruned model to match the dense fine-tuned one (KL on its logits over
the fine-tune data, the calibration text and texts the dense model writes from the built-in prose's
openings) with LoRA or every matrix, through the training harness.

Figures (manifest and report): size on disk, parameters, geometry before and after, per-layer
importance, and for dense / cut / healed: perplexity on the eval split's answer tokens, its change
against dense, KL and top-1 against dense, and the task metric.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from toolchain.pipeline.schema import opt

if TYPE_CHECKING:
    from toolchain.pipeline.recipe import Recipe


MASKS_FILE = "sparsity/masks.safetensors"  # the sparse masks, re-applied after any later merge


@dataclass
class LayerCut:
    drop: int | None = opt(None, min=1, help="decoder layers removed, the least important first")
    fraction: float | None = opt(None, min=0, max=1, help="share of the decoder layers removed (instead of drop)")


@dataclass
class MlpCut:
    keep: int | None = opt(None, min=1, help="MLP intermediate channels kept in every layer")
    fraction: float | None = opt(None, min=0, max=1, help="share of the channels removed (instead of keep)")
    multiple: int = opt(32, choices=(32, 64, 128, 256),
                        help="the kept count is a multiple of this (32: group-32 quantisers; 256: llama.cpp K-quants)")


@dataclass
class HeadCut:
    keep: int | None = opt(None, min=1, help="query heads kept in every layer (whole GQA groups: a multiple of the group)")
    fraction: float | None = opt(None, min=0, max=1, help="share of the GQA groups removed (instead of keep)")


@dataclass
class SparseCut:
    fraction: float | None = opt(None, min=0, max=1, help="unstructured: share of each row's weights zeroed")
    pattern: str | None = opt(None, choices=("2:4", "4:8"), help="N:M: keep N of every M consecutive weights of a row")

    def check(self):
        if (self.fraction is None) == (self.pattern is None):
            yield "fraction", "give exactly one of fraction and pattern", self.fraction, \
                "e.g. sparse: {fraction: 0.5} or sparse: {pattern: '2:4'}"


@dataclass
class HealSection:
    steps: int = opt(60, min=1, help="optimiser steps of distillation")
    train: str = opt("lora", choices=("lora", "full"),
                     help="what trains: LoRA adapters (merged after) or every decoder matrix (the embedding stays)")
    learning_rate: float = opt(1e-3, min=0, help="peak learning rate (full: use ~1e-4)")
    batch_size: int = opt(8, min=1, help="examples per batch")
    rank: int = opt(16, min=1, help="LoRA rank (train: lora)")
    temperature: float = opt(1.0, min=0.1, help="softmax temperature of the KL")
    ce_weight: float = opt(0.0, min=0, help="weight of the cross-entropy on the labels added to the KL")
    calibration_text: bool = opt(True, help="distil on the calibration text too, not only the fine-tune data")
    generated: int = opt(32, min=0, help="texts the dense model writes (sampled from the built-in prose's openings) "
                         "distilled on too: a cut model loses general text first, and the gates measure on prose")
    generated_tokens: int = opt(128, min=8, help="new tokens per generated text")
    seed: int = opt(0, help="training seed")


@dataclass
class PruneSection:
    score: str = opt("wanda", choices=("magnitude", "wanda"), help="how MLP channels, head groups and sparse weights are ranked")
    layers: LayerCut | None = opt(None, help="remove whole decoder layers")
    mlp: MlpCut | None = opt(None, help="remove MLP intermediate channels")
    heads: HeadCut | None = opt(None, help="remove attention heads by whole GQA groups")
    sparse: SparseCut | None = opt(None, help="unstructured or N:M masks (a quality experiment: no target runs them faster)")
    heal: HealSection | None = opt(None, help="distil the pruned model from the dense one (omit: no healing)")

    def check(self):
        if not (self.layers or self.mlp or self.heads or self.sparse):
            yield "layers", "a prune section must cut something", None, \
                "add layers: {drop: 2}, mlp: {keep: 1024}, heads: {keep: 6} or sparse: {fraction: 0.5}"
        for name in ("layers", "mlp", "heads"):
            cut = getattr(self, name)
            if cut is not None and (cut.fraction is None) == (getattr(cut, "keep", getattr(cut, "drop", None)) is None):
                key = "drop" if name == "layers" else "keep"
                yield f"{name}.{key}", f"give exactly one of {key} and fraction", None, \
                    f"e.g. {name}: {{{key}: 2}} or {name}: {{fraction: 0.25}}"

    def cuts(self) -> dict:
        """The structured cuts as toolchain.pruning reads them (unset keys left out)."""
        out = {}
        for name in ("layers", "mlp", "heads"):
            cut = getattr(self, name)
            if cut is not None:
                out[name] = {k: v for k, v in asdict(cut).items() if v is not None}
        return out


def plan(recipe: "Recipe", state) -> list:
    from toolchain.pipeline.plan import Stage

    pcfg = getattr(recipe, "prune", None)
    if pcfg is None:
        return []
    roles = {"model": state.model, "calibrate": "calibrate", **{i: i for i in state.optional("data")}}
    return [Stage("prune", "prune", [state.model, "calibrate", *state.optional("data")], asdict(pcfg), run,
                  "prune the merged model" + (" and heal it by distillation" if pcfg.heal else ""), roles=roles)]


def preflight(ctx, model_dir: Path) -> None:
    """The cuts checked against the base model's config.json before training (a bad fraction fails in seconds)."""
    from transformers import AutoConfig

    from toolchain.core.errors import RecipeError
    from toolchain.pruning.families import TITLE
    from toolchain.pruning.structured import validate

    pcfg = getattr(ctx.recipe, "prune", None)
    if pcfg is None:
        return
    problems = validate(AutoConfig.from_pretrained(model_dir), "prune", **pcfg.cuts())
    if problems:
        raise RecipeError(TITLE, problems)


def run(ctx, inputs: dict, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.core.files import write_json_atomic
    from toolchain.core.models import save_hf_dir
    from toolchain.pruning import measure
    from toolchain.pruning.calibration import calibrate
    from toolchain.pruning.prune import prune_structured
    from toolchain.pruning.sparse import apply_masks, reapply_masks, save_masks, sparse_masks, sparsity
    from toolchain.pruning.structured import check_consistent

    pcfg = ctx.recipe.prune
    dense_dir = inputs["model"].path
    sequences = json.loads((inputs["calibrate"].path / "calibration.json").read_text())["batches"]
    tok = AutoTokenizer.from_pretrained(dense_dir)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    figures: dict = {"score": pcfg.score, "calibration": {"sequences": len(sequences),
                                                          "hash": inputs["calibrate"].hash}}
    ctx.log(f"  pruning: {', '.join(pcfg.cuts()) or 'masks only'} ({pcfg.score} scores, {len(sequences)} calibration sequences)")
    cuts = pcfg.cuts()
    if cuts:
        figures["structured"] = prune_structured(model, sequences, method=pcfg.score, where="prune", **cuts)
    else:  # the per-layer importance is reported for every run
        figures["structured"] = {"calibration": calibrate(model, sequences, where="prune", linears=False).figures()}
    masks = None
    if pcfg.sparse:
        calib = calibrate(model, sequences, where="prune.sparse", layers=False) if pcfg.score == "wanda" else None
        masks = sparse_masks(model, fraction=pcfg.sparse.fraction, pattern=pcfg.sparse.pattern, method=pcfg.score,
                             calib=calib, where="prune.sparse")
        apply_masks(model, masks, "prune.sparse")
    check_consistent(model, "prune")

    work = out / "_work"
    cut_dir = work / "cut"
    save_hf_dir(model, tok, cut_dir)
    del model
    data_dir = inputs["data"].path if "data" in inputs else None
    final_dir = cut_dir
    if pcfg.heal:
        final_dir = work / "healed"
        figures["heal"] = heal(ctx, cut_dir, dense_dir, data_dir, sequences, tok, pcfg.heal, work / "heal", final_dir)
    if masks is not None:
        final = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32)
        figures["mask_reapplied"] = reapply_masks(final, masks, "prune.sparse")
        figures["sparsity"] = sparsity(final, "prune.sparse")
        save_hf_dir(final, tok, final_dir)
        # in a subfolder: exporters read every top-level .safetensors as the checkpoint
        save_masks(masks, out / MASKS_FILE, {"pattern": pcfg.sparse.pattern, "fraction": pcfg.sparse.fraction})
        del final
    for p in final_dir.iterdir():  # the model later stages read, at the stage's top level
        shutil.move(str(p), out / p.name)

    figures["models"] = compare_models(ctx, dense_dir, cut_dir, out if pcfg.heal else None, data_dir)
    shutil.rmtree(work)
    figures["size_bytes"] = {"dense": measure.weights_bytes(dense_dir), "pruned": measure.weights_bytes(out)}
    write_json_atomic(out / "prune.json", figures, indent=1)
    png = _importance_png(figures)
    if png:
        (out / "importance.png").write_bytes(png)
    return figures


def compare_models(ctx, dense_dir: Path, cut_dir: Path, healed_dir: Path | None, data_dir: Path | None) -> dict:
    """Perplexity, KL and top-1 against dense on the eval split's answer tokens, and the task metric."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.pruning import measure
    from toolchain.stages.data import read_jsonl
    from toolchain.stages.eval import task_metric

    if data_dir is None:
        return {}
    rows = read_jsonl(data_dir / "eval.jsonl")
    dirs = {"dense": dense_dir, "pruned": cut_dir, **({"healed": healed_dir} if healed_dir else {})}
    tok = AutoTokenizer.from_pretrained(dense_dir)
    max_length = ctx.recipe.data.max_length if ctx.recipe.data else 512
    examples = measure.tokenized_rows(rows, tok, max_length)
    models = {k: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for k, d in dirs.items()}
    out = measure.compare(models, examples)
    del models
    chat_rows = [r for r in rows if "messages" in r]
    for name, d in dirs.items():
        if chat_rows and name in out:
            metric = task_metric(d, chat_rows, ctx.recipe.eval, ctx.progress)
            out[name]["task_metric"] = metric["score"]
            out[name]["task_examples"] = metric["examples"]
    return out


def heal(ctx, cut_dir: Path, dense_dir: Path, data_dir: Path | None, sequences, tok, hcfg, work: Path,
         final_dir: Path) -> dict:
    """Distil the cut model from the dense one through the training harness; the healed model goes to final_dir."""
    from toolchain.core import prompts
    from toolchain.pipeline.recipe import DataSection, HftSection, TrainSection
    from toolchain.stages.data import read_jsonl
    from toolchain.training.distill import Distill, openings, teacher_texts
    from toolchain.training.method import method_for
    from toolchain.training.trainer import train

    rows = read_jsonl(data_dir / "train.jsonl") if data_dir else []
    eval_rows = read_jsonl(data_dir / "eval.jsonl") if data_dir else []
    if hcfg.calibration_text or not rows:
        rows = rows + [{"text": tok.decode(seq)} for seq in sequences]
    generated = []
    if hcfg.generated:
        ctx.log(f"  healing: the dense model writes {hcfg.generated} texts of {hcfg.generated_tokens} tokens")
        generated = teacher_texts(dense_dir, openings(prompts.CALIBRATION_TEXTS), hcfg.generated,
                                  hcfg.generated_tokens, seed=hcfg.seed, batch_size=16, progress=ctx.progress)
        rows = rows + [{"text": t} for t in generated]
    inner = method_for("lora" if hcfg.train == "lora" else "hft")
    tcfg = TrainSection(method=inner.name, max_steps=hcfg.steps, learning_rate=hcfg.learning_rate,
                        batch_size=hcfg.batch_size, lr_scheduler="cosine", warmup_ratio=0.1, eval_every="no",
                        save_checkpoints=False, logging_steps=max(1, hcfg.steps // 10), seed=hcfg.seed,
                        threads=ctx.recipe.train.threads)
    tcfg.lora.rank, tcfg.lora.alpha = hcfg.rank, 2.0 * hcfg.rank
    if hcfg.train == "full":
        tcfg.hft = HftSection(fraction=1.0, rounds=1, seed=hcfg.seed)
    max_length = ctx.recipe.data.max_length if ctx.recipe.data else ctx.recipe.calibrate.max_tokens
    dcfg = DataSection(path="-", max_length=max(max_length, ctx.recipe.calibrate.max_tokens), packing=True,
                       train_on_prompt=True)  # the teacher's distribution on every token, prompts included
    method = Distill(inner, dense_dir, hcfg.temperature, hcfg.ce_weight)
    ctx.log(f"  healing: {hcfg.steps} steps of distillation from the dense model ({hcfg.train}, {len(rows)} texts)")
    figures = train(cut_dir, rows, [], tcfg, dcfg, work, method, progress=ctx.progress)
    merged = method.merge(cut_dir, work, final_dir, ctx.recipe, data_dir)
    figures.pop("log_history", None)
    return {"train": figures, "merge": merged, "eval_rows": len(eval_rows), "texts": len(rows),
            "generated": {"texts": len(generated), "sample": generated[:3]}}


def _importance_png(figures: dict) -> bytes | None:
    from toolchain.report import plots

    structured = figures.get("structured", {})
    return plots.importance_png(structured.get("calibration", {}).get("angular_distance"),
                                structured.get("dropped_layers") or ())
