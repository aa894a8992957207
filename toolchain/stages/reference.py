"""Stage ``reference``: what every exported target is compared with.

The model later stages use, run on the torch runtime: its log-probabilities on held-out text, its
greedy outputs on fixed prompts, and the bench prompt's ids, all stored for the bench workers.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from toolchain.core import prompts
from toolchain.core.chat import render_prompt
from toolchain.core.files import write_json_atomic
from toolchain.core.metrics import log_softmax
from toolchain.pipeline.plan import Context, PlanState, Stage
from toolchain.pipeline.recipe import BenchSection, Recipe
from toolchain.stages.data import read_jsonl


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    texts = [prompts.QUALITY_TEXT, prompts.GREEDY_PROMPTS, prompts.BENCH_PROMPT]
    return [Stage("reference", "reference", [state.model, *state.optional("data")],
                  {"bench": asdict(recipe.bench), "texts": texts}, run, "reference logits and greedy outputs",
                  roles={"model": state.model, **{i: i for i in state.optional("data")}})]


def run(ctx: Context, inputs: dict, out: Path) -> dict:
    examples = read_jsonl(inputs["data"].path / "eval.jsonl") if "data" in inputs else []
    return write_reference(inputs["model"].path, examples, ctx.recipe.bench, out)


def reference_inputs(tokenizer, eval_examples: list[dict], bcfg: BenchSection) -> dict:
    """Token ids for the quality text, the greedy prompts and the bench prompt."""
    text = prompts.QUALITY_TEXT
    for ex in eval_examples:
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= bcfg.quality_tokens:
            break
        if "messages" in ex:
            text += "\n\n" + tokenizer.apply_chat_template(ex["messages"], tokenize=False) \
                if tokenizer.chat_template else "\n\n" + " ".join(m["content"] for m in ex["messages"])
        else:
            text += "\n\n" + ex["text"]
    quality_ids = tokenizer(text, add_special_tokens=False)["input_ids"][: bcfg.quality_tokens]
    greedy = [tokenizer(render_prompt(p, tokenizer), add_special_tokens=False)["input_ids"]
              for p in prompts.GREEDY_PROMPTS[: bcfg.greedy_prompts]]
    bench = tokenizer(render_prompt(prompts.BENCH_PROMPT, tokenizer), add_special_tokens=False)["input_ids"]
    if len(bench) < bcfg.prompt_tokens:  # repeat the text so prefill sees exactly prompt_tokens
        bench = (bench * (bcfg.prompt_tokens // max(1, len(bench)) + 1))
    return {"quality_ids": quality_ids, "greedy_prompt_ids": greedy, "bench_prompt_ids": bench[: bcfg.prompt_tokens]}


def stop_ids(model_dir: Path) -> list[int]:
    """EOS ids from generation_config.json (falling back to config.json)."""
    for name in ("generation_config.json", "config.json"):
        p = Path(model_dir) / name
        if p.is_file():
            eos = json.loads(p.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def write_reference(model_dir: Path, eval_examples: list[dict], bcfg: BenchSection, out: Path) -> dict:
    """Run the merged model on the torch runtime and store what targets are compared with."""
    from transformers import AutoTokenizer

    from toolchain.pipeline.registry import RUNTIMES

    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = reference_inputs(tok, eval_examples, bcfg)
    rt = RUNTIMES.get("torch").load()(model_dir, threads=bcfg.threads)
    rt.load()
    logprobs = log_softmax(rt.logits(inputs["quality_ids"])).astype(np.float32)
    stops = stop_ids(model_dir)
    greedy = [rt.generate(ids, bcfg.greedy_tokens, stops) for ids in inputs["greedy_prompt_ids"]]
    np.save(out / "logprobs.npy", logprobs)
    ids_doc = dict(inputs, greedy_outputs=greedy, stop_ids=stops)
    write_json_atomic(out / "reference.json", ids_doc, indent=None)
    nll = -logprobs[np.arange(len(inputs["quality_ids"]) - 1), inputs["quality_ids"][1:]]
    return {"quality_tokens": len(inputs["quality_ids"]), "ppl": float(np.exp(nll.mean())),
            "greedy_outputs": [tok.decode(g) for g in greedy], "bench_prompt_tokens": len(inputs["bench_prompt_ids"])}
