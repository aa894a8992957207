"""DoRA and rsLoRA as LoRA options: the recipe keys reach peft and the train manifest; each kind merges
to the unmerged model's logits (checked by the merge itself and independently here), a wrong merge is
refused; a DoRA-merged folder is a plain checkpoint the ONNX and GGUF exporters take; the gguf-lora
target refuses DoRA in the recipe and in the exporter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tolerances import LORA_MERGE, MERGE_ADAPTER_EFFECT, ONNX_FP32_LOGITS
from toolchain.core.errors import PreflightError, RecipeError, StageError
from toolchain.pipeline.recipe import LoraSection, TrainSection
from toolchain.training.lora import METHOD
from toolchain.training.merge import MERGE_TIERS, check_sequences, compare_logits, merge, sequence_logits

REPO = Path(__file__).resolve().parents[2]
KINDS = {"lora": dict(), "dora": dict(dora=True), "rslora": dict(rslora=True)}


def tcfg(**lora) -> TrainSection:
    return TrainSection(lora=LoraSection(rank=4, alpha=8, **lora))


def make_adapter(base_dir: Path, out: Path, seed: int = 0, **lora):
    """The method's own adapter on the tiny model, made non-trivial: B drawn N(0, 0.5) (peft starts it at
    zero), DoRA magnitudes moved 30% off the weight norms they start at. Returns the PeftModel."""
    torch.manual_seed(seed)
    t = tcfg(**lora)
    model = METHOD.wrap(METHOD.load_base(base_dir, t), t)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def merged_kinds(tmp_path_factory, tiny_model_dir):
    """kind -> (adapter dir, merged dir, merge figures), each made once."""
    out = {}
    for kind, lora in KINDS.items():
        root = tmp_path_factory.mktemp(kind)
        make_adapter(tiny_model_dir, root / "adapter", **lora)
        (root / "merged").mkdir()
        out[kind] = (root / "adapter", root / "merged", merge(tiny_model_dir, root / "adapter", root / "merged"))
    return out


@pytest.mark.parametrize("dora,rslora", [(False, False), (True, False), (False, True), (True, True)])
def test_recipe_options_reach_peft_and_the_manifest(dora, rslora):
    t = tcfg(dora=dora, rslora=rslora)
    cfg = METHOD.adapter_config(t)
    assert (cfg.use_dora, cfg.use_rslora) == (dora, rslora)
    figures = METHOD.figures(t)
    assert (figures["dora"], figures["rslora"]) == (dora, rslora)
    assert figures["method"] == "lora" and figures["rank"] == 4


def test_saved_adapters_record_their_kind(merged_kinds):
    for kind, (adapter, _, figures) in merged_kinds.items():
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert (bool(cfg["use_dora"]), bool(cfg["use_rslora"])) == (kind == "dora", kind == "rslora")
        assert figures["adapter_kind"] == kind
        assert figures["merge_check"]["tier"] == {"rel_max": MERGE_TIERS[kind].rel_max,
                                                  "kl_max": MERGE_TIERS[kind].kl_max}


@pytest.mark.parametrize("kind", list(KINDS))
def test_merged_model_matches_the_unmerged_adapter(kind, merged_kinds, tiny_model_dir):
    """Independently of the merge's own check: a fresh PeftModel against the merged folder read back."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, merged_dir, figures = merged_kinds[kind]
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    seqs = check_sequences(AutoTokenizer.from_pretrained(merged_dir))
    unmerged = sequence_logits(PeftModel.from_pretrained(load(tiny_model_dir), adapter), seqs)
    got = compare_logits(unmerged, sequence_logits(load(merged_dir), seqs))
    assert got["rel_logit_diff"] < LORA_MERGE.rtol and got["mean_kl"] < LORA_MERGE.kl
    check = figures["merge_check"]
    assert check["rel_logit_diff"] < LORA_MERGE.rtol and check["mean_kl"] < LORA_MERGE.kl
    assert check["positions"] == sum(len(s) for s in seqs)
    effect = compare_logits(sequence_logits(load(tiny_model_dir), seqs), sequence_logits(load(merged_dir), seqs))
    assert effect["rel_logit_diff"] > MERGE_ADAPTER_EFFECT.lo


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_merge_that_doubles_the_delta_is_refused(kind, merged_kinds, tiny_model_dir, tmp_path, monkeypatch):
    from peft.tuners.lora.layer import Linear

    real = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: 2 * real(self, adapter))
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(StageError, match=f"merged {kind} model's logits diverge"):
        merge(tiny_model_dir, merged_kinds[kind][0], out)
    assert list(out.iterdir()) == []


def test_the_merge_is_checked_on_the_eval_split(merged_kinds, tiny_model_dir, tmp_path, dates_rows):
    from transformers import AutoTokenizer

    from toolchain.core.chat import tokenize_example

    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dates_rows[:5]))
    out = tmp_path / "merged"
    out.mkdir()
    figures = merge(tiny_model_dir, merged_kinds["dora"][0], out, data_dir=data, max_length=32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [len(tokenize_example(r, tok, 32, True)["input_ids"]) for r in dates_rows[:5]]
    assert (figures["merge_check"]["sequences"], figures["merge_check"]["positions"]) == (5, sum(lengths))


def test_dora_merge_is_a_plain_checkpoint(merged_kinds, tiny_model_dir):
    from safetensors import safe_open

    _, merged_dir, _ = merged_kinds["dora"]
    keys = lambda d: set(safe_open(str(d / "model.safetensors"), "pt").keys())  # noqa: E731
    assert keys(merged_dir) == keys(tiny_model_dir)
    drop = {"transformers_version", "dtype", "torch_dtype", "rope_theta"}  # rope_theta: patch_config copies it up
    config = lambda d: {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k not in drop}  # noqa: E731
    assert config(merged_dir) == config(tiny_model_dir)


def test_onnx_exports_the_dora_merge(merged_kinds, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from transformers import AutoModelForCausalLM

    from exporters.onnx import export

    _, merged_dir, _ = merged_kinds["dora"]
    out = tmp_path / "onnx"
    export(merged_dir, out, {"graph": "fused", "genai": False})
    ids = np.array([[5, 17, 42, 99, 7, 3, 250, 11]], dtype=np.int64)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
    got = session.run(["logits"], feeds)[0]
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=ONNX_FP32_LOGITS.atol, rtol=0)


def test_gguf_exports_the_dora_merge(merged_kinds, tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from exporters.gguf import write_gguf

    _, merged_dir, _ = merged_kinds["dora"]
    path = tmp_path / "m.gguf"
    write_gguf(merged_dir, path, out_type="F32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    weights = load_file(str(merged_dir / "model.safetensors"))
    # the merged DoRA weights, not the base's: down_proj has no layout transform, so it is stored as is
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.ffn_down.weight"].data),
                                  weights["model.layers.0.mlp.down_proj.weight"].numpy())
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd as the output
    np.testing.assert_array_equal(np.asarray(tensors["token_embd.weight"].data),
                                  weights["model.embed_tokens.weight"].numpy())


# -- gguf-lora and DoRA -----------------------------------------------------------------------------

def test_recipe_refuses_gguf_lora_with_dora(tmp_path):
    from toolchain.pipeline.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"name: d\ndata: {{path: {REPO / 'examples/data/dates.jsonl'}}}\n"
                    "train: {lora: {dora: true}}\ntargets:\n  - {name: a, format: gguf-lora}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = [p for p in info.value.problems if p.where.endswith(" targets[0].format")]
    assert len(problems) == 1, [str(p) for p in info.value.problems]
    text = str(problems[0])
    assert problems[0].value == "gguf-lora"
    assert "DoRA" in problems[0].rule
    assert "format gguf" in problems[0].fix and "train.lora.dora: false" in problems[0].fix
    assert "gguf-lora" in text


def test_recipe_takes_gguf_lora_with_rslora(tmp_path):
    from toolchain.pipeline.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"name: d\ndata: {{path: {REPO / 'examples/data/dates.jsonl'}}}\n"
                    "train: {lora: {rslora: true}}\ntargets:\n  - {name: a, format: gguf-lora}\n")
    assert load_recipe(path).train.lora.rslora is True


def test_gguf_lora_exporter_refuses_a_dora_adapter_before_writing(merged_kinds, tiny_model_dir, tmp_path):
    from exporters.gguf.lora import export

    out = tmp_path / "out"
    with pytest.raises(PreflightError, match="use_dora is true") as info:
        export(merged_kinds["dora"][1], out, {"base_type": "F32"}, adapter_dir=merged_kinds["dora"][0],
               base_dir=tiny_model_dir)
    assert "format gguf" in str(info.value) and "train.lora.dora: false" in str(info.value)
    assert not out.exists() or not any(out.iterdir())


def test_gguf_lora_exporter_takes_lora_and_rslora(merged_kinds, tiny_model_dir, tmp_path):
    import math

    from exporters.gguf.lora import write_adapter

    for kind in ("lora", "rslora"):
        figures = write_adapter(tiny_model_dir, merged_kinds[kind][0], tmp_path / f"{kind}.gguf", "F32")
        assert figures["rank"] == 4
        # llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) needs alpha * sqrt(r) written
        assert figures["alpha"] == 8 * (math.sqrt(4) if kind == "rslora" else 1)  # exact in float
