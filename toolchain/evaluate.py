"""The task metric (before and after fine-tuning) and the reference measurements.

The task metric generates greedily for the eval split's prompts and scores the replies against
the references (exact match after trimming whitespace, or containment). The reference stage
records what every exported target is compared with: the merged full-precision model's
log-probabilities on held-out text and its greedy outputs on fixed prompts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from toolchain import data as data_mod
from toolchain import prompts
from toolchain.recipe import BenchSection, EvalSection


def score(prediction: str, reference: str, metric: str) -> float:
    p, r = prediction.strip(), reference.strip()
    if metric == "exact_match":
        return float(p == r)
    if metric == "contains":
        return float(r in p)
    raise ValueError(f"unknown metric {metric!r}")


def task_metric(model_dir: Path, examples: list[dict], ecfg: EvalSection, progress: bool = True) -> dict:
    """Greedy-generate for each eval prompt and score it. Returns score and per-example outputs."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = [data_mod.prompt_and_reference(ex) for ex in examples if "messages" in ex][: ecfg.max_examples]
    outputs: list[str] = []
    batches = range(0, len(pairs), ecfg.batch_size)
    for start in tqdm(batches, desc=f"eval {Path(model_dir).name[:24]}", disable=not progress, leave=False):
        chunk = pairs[start:start + ecfg.batch_size]
        texts = [data_mod.render_prompt(msgs, tok) for msgs, _ in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=ecfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            outputs.append(tok.decode(row, skip_special_tokens=True))
    scores = [score(o, ref, ecfg.metric) for o, (_, ref) in zip(outputs, pairs)]
    return {
        "metric": ecfg.metric, "examples": len(pairs),
        "score": float(np.mean(scores)) if scores else float("nan"),
        "outputs": [{"prompt": msgs[-1]["content"], "reference": ref, "output": o, "correct": bool(s)}
                    for (msgs, ref), o, s in zip(pairs, outputs, scores)],
    }


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
    greedy = [tokenizer(data_mod.render_prompt(p, tokenizer), add_special_tokens=False)["input_ids"]
              for p in prompts.GREEDY_PROMPTS[: bcfg.greedy_prompts]]
    bench = tokenizer(data_mod.render_prompt(prompts.BENCH_PROMPT, tokenizer), add_special_tokens=False)["input_ids"]
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

    from runtimes.base import log_softmax
    from runtimes.torch_runtime import TorchRuntime

    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = reference_inputs(tok, eval_examples, bcfg)
    rt = TorchRuntime(model_dir, threads=bcfg.threads)
    rt.load()
    logprobs = log_softmax(rt.logits(inputs["quality_ids"])).astype(np.float32)
    stops = stop_ids(model_dir)
    greedy = [rt.generate(ids, bcfg.greedy_tokens, stops) for ids in inputs["greedy_prompt_ids"]]
    np.save(out / "logprobs.npy", logprobs)
    ids_doc = dict(inputs, greedy_outputs=greedy, stop_ids=stops)
    (out / "reference.json").write_text(json.dumps(ids_doc))
    nll = -logprobs[np.arange(len(inputs["quality_ids"]) - 1), inputs["quality_ids"][1:]]
    return {"quality_tokens": len(inputs["quality_ids"]), "ppl": float(np.exp(nll.mean())),
            "greedy_outputs": [tok.decode(g) for g in greedy], "bench_prompt_tokens": len(inputs["bench_prompt_ids"])}


def calibration_sample(model_dir: Path, rows: list[dict], ccfg, out: Path) -> dict:
    """Token sequences every quantiser that calibrates shares (imatrix, static int8).

    Training rows rendered with the chat template (what the model will see in use), topped up with
    the built-in prose so even a tiny dataset gives enough tokens; the held-out quality text is
    never used here, so calibration cannot leak into the quality figures.
    """
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(ccfg.seed)
    rows = list(rows)
    rng.shuffle(rows)
    texts = []
    for ex in rows:
        if "messages" in ex:
            texts.append(tok.apply_chat_template(ex["messages"], tokenize=False) if tok.chat_template
                         else "\n".join(m["content"] for m in ex["messages"]))
        elif "text" in ex:
            texts.append(ex["text"])
    texts += prompts.CALIBRATION_TEXTS
    stream: list[int] = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"]
        if len(stream) >= ccfg.samples * ccfg.max_tokens:
            break
    batches = [stream[i:i + ccfg.max_tokens] for i in range(0, len(stream), ccfg.max_tokens)][: ccfg.samples]
    batches = [b for b in batches if len(b) >= 8]
    (out / "calibration.json").write_text(json.dumps({"batches": batches}))
    return {"sequences": len(batches), "tokens": sum(len(b) for b in batches), "max_tokens": ccfg.max_tokens}
