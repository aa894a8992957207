"""onnxruntime-genai folders (exporters.onnx.genai) and their runtime, on the tiny Llama fixture.

setup: ``tiny_model_dir`` (weights redrawn wider, see ``model_dir``) exported once per graph kind
(standard ops; fused, whose attention is com.microsoft GroupQueryAttention), then a separate genai
folder written from it;
execute: onnxruntime-genai loads the folder (``og.Model``) and runs it through its Generator;
assert: genai_config.json fields derived from the graph and configs, logits and greedy output
equal onnxruntime's on the same graph, genai's own greedy search agrees, the tokenizer agrees
with transformers, and bad requests are refused with the key, the value and the fix.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnxruntime")

from exporters.onnx import export  # noqa: E402
from exporters.onnx.genai import (  # noqa: E402
    GENAI_CONFIG,
    build_genai_config,
    check_genai_tokenizer,
    write_genai_folder,
)
from runtimes.onnxruntime_genai_runtime import OnnxGenaiRuntime  # noqa: E402
from runtimes.onnxruntime_runtime import OnnxRuntime  # noqa: E402
from tests.tolerances import GENAI_INCREMENTAL_LOGITS, SAME_GRAPH_SAME_KERNELS  # noqa: E402
from toolchain.core.errors import PreflightError  # noqa: E402

GRAPHS = {"standard": {"graph": "standard"}, "fused": {"graph": "fused"}}
THREADS = 1
# the fixture's std-0.02 random weights make greedy decoding repeat one token, which would make
# "greedy outputs agree" nearly vacuous; std 0.3 gives varied tokens with top-1 margins >= 0.02
WEIGHT_STD = 0.3
GREEDY_TOKENS = 24
CONVERSATION = [{"role": "user", "content": "What is the date one week after 2024-01-05?"}]
EXTRA_STRINGS = ["2024-01-05 is a Friday.", "<|im_start|>user\nhi<|im_end|>\n", "  \n\t mixed  whitespace"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny fixture (same config and tokenizer) with every matrix redrawn at WEIGHT_STD."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-wide")
    for path in tiny_model_dir.iterdir():
        if path.is_file() and not path.name.startswith("model"):
            shutil.copy2(path, out / path.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, WEIGHT_STD)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(GRAPHS))
def folders(request, model_dir, tmp_path_factory):
    """(graph kind, ONNX export dir, genai folder, write_genai_folder's manifest)."""
    root = tmp_path_factory.mktemp(f"genai-{request.param}")
    export(model_dir, root / "onnx", GRAPHS[request.param])
    manifest = write_genai_folder(root / "onnx", root / "genai")
    return request.param, root / "onnx", root / "genai", manifest


@pytest.fixture(scope="module")
def runtimes(folders):
    _, onnx_dir, genai_dir, _ = folders
    ort_rt, genai_rt = OnnxRuntime(onnx_dir, threads=THREADS), OnnxGenaiRuntime(genai_dir, threads=THREADS)
    ort_rt.load()
    genai_rt.load()
    return ort_rt, genai_rt


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    return list(tok(text)["input_ids"])


def test_folder_is_self_contained_and_published_whole(folders):
    _, onnx_dir, genai_dir, manifest = folders
    assert manifest["folder"] == str(genai_dir) and not manifest["in_place"]
    expected = {"model.onnx", "model.onnx_data", GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "config.json", "generation_config.json"}
    assert set(manifest["files"]) == expected == {p.name for p in genai_dir.iterdir()}
    assert not [p.name for p in genai_dir.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    for name in ("model.onnx", "model.onnx_data", "tokenizer.json"):
        assert (genai_dir / name).read_bytes() == (onnx_dir / name).read_bytes()
    assert manifest["tokenizer_check"]["ran"] and manifest["tokenizer_check"]["mismatches"] == []


def test_genai_config_is_derived_from_graph_and_configs(folders, model_dir):
    kind, _, genai_dir, manifest = folders
    config = json.loads((genai_dir / GENAI_CONFIG).read_text())
    model, search = config["model"], config["search"]
    hf = json.loads((model_dir / "config.json").read_text())
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in tok_json["added_tokens"] if t["content"] == "<|im_end|>")
    assert model["type"] == "llama"
    assert model["context_length"] == hf["max_position_embeddings"] == search["max_length"] == 512
    assert model["eos_token_id"] == [im_end] and hf["eos_token_id"] == im_end
    assert (model["bos_token_id"], model["pad_token_id"]) == (hf["bos_token_id"], hf["pad_token_id"])
    decoder = model["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (2, 4, 2, 16, 64)
    expected_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if kind == "standard":  # the fused graph derives positions from attention_mask inside GroupQueryAttention
        expected_inputs["position_ids"] = "position_ids"
    assert decoder["inputs"] == expected_inputs
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert decoder["session_options"]["provider_options"] == []
    # only a GroupQueryAttention graph may write the cache in place
    assert search["past_present_share_buffer"] is (kind == "fused")
    assert manifest["genai_config"]["uses_group_query_attention"] is (kind == "fused")
    assert (search["do_sample"], search["num_beams"]) == (False, 1)
    assert manifest["genai_config"]["kv_dtype"] == "float32"


def test_prefill_and_decode_logits_match_onnxruntime(runtimes, prompt_ids):
    ort_rt, genai_rt = runtimes
    want, ort_state = ort_rt.prefill(prompt_ids, all_logits=True)
    got, state = genai_rt.prefill(prompt_ids, all_logits=True)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(prompt_ids), want.shape[1])
    np.testing.assert_allclose(got, want, atol=SAME_GRAPH_SAME_KERNELS.atol, rtol=0)
    last, state = genai_rt.prefill(prompt_ids)
    assert last.shape == (1, want.shape[1])
    np.testing.assert_allclose(last, want[-1:], atol=SAME_GRAPH_SAME_KERNELS.atol, rtol=0)
    for step, token in enumerate([5, 17, 42, 99, 7]):
        want_step, ort_state = ort_rt.decode(ort_state, token)
        got_step, state = genai_rt.decode(state, token)
        assert got_step.shape == (1, want.shape[1])
        np.testing.assert_allclose(got_step, want_step, atol=SAME_GRAPH_SAME_KERNELS.atol, rtol=0,
                                   err_msg=f"decode step {step}")


def test_greedy_generation_matches_onnxruntime_and_genai_search(runtimes, folders, prompt_ids):
    ort_rt, genai_rt = runtimes
    eos = json.loads((folders[2] / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
    want = ort_rt.generate(prompt_ids, GREEDY_TOKENS, stop_ids=eos)
    assert len(set(want)) > len(want) // 2, f"greedy output too repetitive to compare: {want}"
    assert genai_rt.generate(prompt_ids, GREEDY_TOKENS, stop_ids=eos) == want
    # what an app does: genai's own search with the folder's greedy defaults
    params = og.GeneratorParams(genai_rt.model)
    params.set_search_options(max_length=len(prompt_ids) + GREEDY_TOKENS)
    generator = og.Generator(genai_rt.model, params)
    generator.append_tokens(prompt_ids)
    picked = []  # get_next_tokens, since get_sequence leaves out a final EOS
    while not generator.is_done():
        generator.generate_next_token()
        picked.append(int(generator.get_next_tokens()[0]))
    assert picked == want


def test_tokenizer_matches_transformers(folders):
    _, _, genai_dir, _ = folders
    assert check_genai_tokenizer(genai_dir) == []
    assert check_genai_tokenizer(genai_dir, EXTRA_STRINGS, conversations=[CONVERSATION]) == []


def test_all_logits_fallback_for_a_last_position_graph(runtimes, prompt_ids, monkeypatch):
    _, genai_rt = runtimes
    want, _ = genai_rt.prefill(prompt_ids, all_logits=True)
    full = OnnxGenaiRuntime._logits
    monkeypatch.setattr(OnnxGenaiRuntime, "_logits", lambda self, g: full(self, g)[-1:])  # as such a graph would
    got, state = genai_rt.prefill(prompt_ids, all_logits=True)
    assert got.shape == want.shape and state.length == len(prompt_ids)
    np.testing.assert_allclose(got, want, atol=GENAI_INCREMENTAL_LOGITS.atol, rtol=0)


def test_tokenizer_check_reports_drift(folders, tmp_path):
    # genai's tokenizer takes pre-tokenisation rules from config.json's model_type: called qwen2,
    # this GPT-2-style BPE splits digits one by one in genai but not in transformers
    _, _, genai_dir, _ = folders
    drifted = tmp_path / "drifted"
    shutil.copytree(genai_dir, drifted)
    config = json.loads((drifted / "config.json").read_text())
    (drifted / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    mismatches = check_genai_tokenizer(drifted)
    numbers = [m for m in mismatches if m["kind"] == "encode" and m["text"].startswith("Numbers")]
    assert numbers and numbers[0]["hf"] != numbers[0]["genai"] and numbers[0]["first_difference"] > 0


def test_multimodal_config_reads_its_text_config(folders, tmp_path):
    _, onnx_dir, _, _ = folders
    nested = tmp_path / "nested"
    shutil.copytree(onnx_dir, nested)
    flat = json.loads((onnx_dir / "config.json").read_text())
    top = {"model_type": "gemma3", "eos_token_id": flat["eos_token_id"], "text_config": flat}
    (nested / "config.json").write_text(json.dumps(top))
    assert build_genai_config(nested) == build_genai_config(onnx_dir)


def test_runtime_threads_and_state_rules(folders, runtimes, prompt_ids):
    _, genai_rt = runtimes
    session = genai_rt.overlay["model"]["decoder"]["session_options"]
    assert session["intra_op_num_threads"] == THREADS
    _, state = genai_rt.prefill(prompt_ids)
    genai_rt.decode(state, 5)
    with pytest.raises(RuntimeError, match="cannot branch"):
        genai_rt.decode(state, 6)  # the generator already moved on

    short = OnnxGenaiRuntime(folders[2], threads=THREADS, max_new_tokens=2)
    _, state = short.prefill(prompt_ids)
    for token in (5, 6):
        _, state = short.decode(state, token)
    with pytest.raises(ValueError, match=r"max_length .*fix: a larger `max_new_tokens`"):
        short.decode(state, 7)
    with pytest.raises(ValueError, match=r"`max_new_tokens` must be a positive integer, got 0"):
        OnnxGenaiRuntime(folders[2], max_new_tokens=0).load()


def test_context_length_override_and_refusals(folders):
    _, onnx_dir, _, _ = folders
    config, _ = build_genai_config(onnx_dir, context_length=128)
    assert config["model"]["context_length"] == config["search"]["max_length"] == 128
    with pytest.raises(PreflightError, match=r"context_length.*512.*got 1024.*fix:"):
        build_genai_config(onnx_dir, context_length=1024)
    with pytest.raises(PreflightError, match=r"provider.*got 'tpu'.*fix:"):
        build_genai_config(onnx_dir, provider="tpu")
    cuda, _ = build_genai_config(onnx_dir, provider="cuda")
    assert cuda["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


def test_in_place_write_and_what_it_refuses(folders, tmp_path):
    _, onnx_dir, _, _ = folders
    work = tmp_path / "export"
    shutil.copytree(onnx_dir, work)
    manifest = write_genai_folder(work, check_tokenizer=False)
    assert manifest["in_place"] and (work / GENAI_CONFIG).is_file()
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]
    og.Model(str(work))  # the export folder itself now loads in genai

    (work / "manifest.json").write_text("{}")  # a finished pipeline artifact
    with pytest.raises(PreflightError, match=r"manifest.json.*fix: pass out_dir"):
        write_genai_folder(work, check_tokenizer=False)

    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(PreflightError, match=r"photos.*previous genai folder.*fix:"):
        write_genai_folder(onnx_dir, unrelated, check_tokenizer=False)
    assert [p.name for p in unrelated.iterdir()] == ["cat.jpg"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    (work / "tokenizer.json").unlink()
    with pytest.raises(PreflightError, match=r"tokenizer.json.*fix:"):
        write_genai_folder(work, tmp_path / "genai", check_tokenizer=False)
    assert not (tmp_path / "genai").exists()


def test_rewriting_a_genai_folder_replaces_it(folders, tmp_path):
    _, onnx_dir, _, _ = folders
    out = tmp_path / "genai"
    write_genai_folder(onnx_dir, out, context_length=64, check_tokenizer=False)
    write_genai_folder(onnx_dir, out, context_length=96, check_tokenizer=False)
    assert json.loads((out / GENAI_CONFIG).read_text())["model"]["context_length"] == 96
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai"]


def test_export_writes_the_genai_folder_in_place_by_default(model_dir, tmp_path):
    manifest = export(model_dir, tmp_path / "onnx", {"precision": "int4"})
    genai = manifest["genai"]
    assert genai["written"] and genai["in_place"] and genai["tokenizer_check"]["ok"]
    assert "genai_config.json" in manifest["files"] and (tmp_path / "onnx" / "genai_config.json").is_file()
    assert genai["genai_config"]["past_present_share_buffer"] is True


def test_export_without_tokenizer_files_skips_genai_unless_asked(model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(model_dir / name, bare / name)
    assert export(bare, tmp_path / "a")["genai"] == {"written": False, "reason": "the model folder has no "
                                                     "tokenizer.json, tokenizer_config.json"}
    with pytest.raises(Exception, match="tokenizer"):
        export(bare, tmp_path / "b", {"genai": True})
