"""mlc-chat-config.json and the conv_template derived from a HF chat template.

The derived template is checked against @mlc-ai/web-llm's own Conversation code (run in node by
web/test/webllm-conv/render.mjs): the prompt web-llm builds must equal, as text and as tokens
encoded the way web-llm encodes them (one prompt-array element at a time), the prompt that
transformers' apply_chat_template builds from the HF template.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from exporters.webllm.chat_config import (
    CHAT_CONFIG_FILE,
    check_conv_template,
    tokenizer_info,
    write_chat_config,
)
from exporters.webllm.conv_template import (
    derive_conv_template,
    webllm_prompt,
    webllm_prompt_parts,
)
from tests.conftest import REPO, build_tokenizer
from toolchain.core.errors import PreflightError

RENDER_SCRIPT = REPO / "web" / "test" / "webllm-conv" / "render.mjs"
WEBLLM_PACKAGE = REPO / "web" / "node_modules" / "@mlc-ai" / "web-llm" / "package.json"
NODE_TIMEOUT_S = 120

# SmolLM2-135M-Instruct's chat template (tokenizer_config.json of the embedded model): ChatML that
# writes a default system message when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Qwen2-style: ChatML with a default system message, tool results folded into a user turn.
QWEN2_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}{%- set turns = messages[1:] -%}"
    "{%- else -%}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}{%- if m['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\n<tool_response>\n' + m['content'] + '\n</tool_response><|im_end|>\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")

# Llama-3-style: BOS, role headers, <|eot_id|> after each turn, content trimmed, no default system.
LLAMA3_STYLE_TEMPLATE = (
    "{%- for m in messages -%}{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    "{%- endif -%}")
# Gemma-style: no system turn; a system message is written at the start of the first user turn.
FOLDED_SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set head = messages[0]['content'] + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set head = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}{{- '<|im_start|>' + m['role'] + '\n' -}}{%- if loop.first -%}{{- head -}}{%- endif -%}"
    "{{- m['content'] + '<|im_end|>\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Templates that the conv_template schema cannot express, with a word the refusal must contain.
UNREPRESENTABLE = {
    "content filter": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | upper + "
                       "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                       "{% endif %}", "verbatim"),
    "turn numbering": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + loop.index|string + '\n' + "
                       "m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                       "{{ '<|im_start|>assistant\n' }}{% endif %}", "user"),
    "no system role": ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                       "supported') }}{% endif %}"
                       "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
                       "System role not supported"),
}

TEXTS = ["Mitä kuuluu? ünïcode", "line one\nline two", "Thanks, and 3+3?", "ok", "Last one."]
REPLIES = ["Hyvää, kiitos.", "6", "Sure:\n- a\n- b"]


def conversations(with_tool: bool) -> list[list[dict]]:
    """System / no system, one to three user turns, each ending with a user (or tool) message."""
    out = []
    for turns in (1, 2, 3):
        msgs = []
        for i in range(turns):
            msgs.append({"role": "user", "content": TEXTS[i]})
            if i < turns - 1:
                msgs.append({"role": "assistant", "content": REPLIES[i]})
        out.append(msgs)
        out.append([{"role": "system", "content": "Answer in one word."}] + msgs)
    if with_tool:
        out.append([{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": REPLIES[0]},
                    {"role": "tool", "content": '{"temperature": 21}'}])
    return out


def _save_tokenizer(out: Path, template: str, *, specials: list[str], bos: str | None, eos: str,
                    eos_ids_in_generation_config: list[str] | None = None) -> Path:
    """A small byte-level BPE tokenizer with ``specials`` and ``template``, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS + REPLIES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    fast.chat_template = template
    fast.save_pretrained(out)
    if eos_ids_in_generation_config:
        ids = [fast.convert_tokens_to_ids(t) for t in eos_ids_in_generation_config]
        GenerationConfig(eos_token_id=ids).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("templates")
    dirs = {"chatml": base / "chatml", "smollm2": base / "smollm2"}
    build_tokenizer(dirs["chatml"], TEXTS + REPLIES)
    tok = build_tokenizer(dirs["smollm2"], TEXTS + REPLIES)
    tok.chat_template = SMOLLM2_TEMPLATE
    tok.save_pretrained(dirs["smollm2"])
    dirs["folded"] = _save_tokenizer(base / "folded", FOLDED_SYSTEM_TEMPLATE, specials=QWEN_SPECIALS, bos=None,
                                     eos="<|im_end|>")
    dirs["qwen2"] = _save_tokenizer(base / "qwen2", QWEN2_STYLE_TEMPLATE, specials=QWEN_SPECIALS, bos=None,
                                    eos="<|im_end|>", eos_ids_in_generation_config=["<|im_end|>", "<|endoftext|>"])
    dirs["llama3"] = _save_tokenizer(base / "llama3", LLAMA3_STYLE_TEMPLATE, specials=LLAMA3_SPECIALS,
                                     bos="<|begin_of_text|>", eos="<|eot_id|>",
                                     eos_ids_in_generation_config=["<|end_of_text|>", "<|eot_id|>"])
    return dirs


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def node_or_skip() -> None:
    missing = [what for what, ok in (("node", shutil.which("node")), ("web/node_modules/@mlc-ai/web-llm",
                                                                     WEBLLM_PACKAGE.exists())) if not ok]
    if missing and os.environ.get("EDGESMITH_REQUIRE_BROWSER"):
        pytest.fail(f"EDGESMITH_REQUIRE_BROWSER is set but these are missing: {', '.join(missing)}")
    if missing:
        pytest.skip(f"web-llm's Conversation cannot run: missing {', '.join(missing)}")


def webllm_render(conv: dict, convs: list[list[dict]]) -> list[dict]:
    request = json.dumps({"conv_template": conv, "conversations": convs})
    proc = subprocess.run(["node", str(RENDER_SCRIPT)], input=request, capture_output=True, text=True,
                          cwd=REPO / "web", timeout=NODE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["version"] == "0.2.86"
    return out["results"]


# ---------------------------------------------------------------- (a) web-llm's prompt == HF's prompt

@pytest.mark.parametrize("name", ["chatml", "smollm2", "qwen2", "llama3", "folded"])
def test_webllm_builds_the_hf_prompt(template_dirs, name):
    node_or_skip()
    conv = derive_conv_template(template_dirs[name])
    tok = _tokenizer(template_dirs[name])
    convs = conversations(with_tool="tool" in conv["roles"])
    results = webllm_render(conv, convs)
    assert len(results) == len(convs)
    for messages, res in zip(convs, results):
        hf_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix = "".join(tok.convert_ids_to_tokens(res["prefix_token_ids"]))
        assert prefix + "".join(res["prompts"]) == hf_text, messages
        # web-llm encodes each element of the prompt array on its own and concatenates the ids
        ids = list(res["prefix_token_ids"])
        for part in res["prompts"]:
            ids += tok(part, add_special_tokens=False)["input_ids"]
        assert ids == tok(hf_text, add_special_tokens=False)["input_ids"], messages
        # the Python mirror used inside derive_conv_template agrees with web-llm
        assert webllm_prompt_parts(conv, messages) == res["prompts"]
        assert webllm_prompt(conv, messages) == (res["prefix_token_ids"], "".join(res["prompts"]))
        assert res["stop_token_ids"] == conv["stop_token_ids"]


def test_comparison_detects_a_wrong_template(template_dirs):
    """The check above can fail: a template with the reply header's separator dropped gives another prompt."""
    node_or_skip()
    conv = derive_conv_template(template_dirs["chatml"])
    tok = _tokenizer(template_dirs["chatml"])
    messages = conversations(with_tool=False)[0]
    (res,) = webllm_render({**conv, "role_empty_sep": ""}, [messages])
    assert "".join(res["prompts"]) != tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_trimming_template_is_reported(template_dirs, caplog):
    with caplog.at_level("WARNING", logger="exporters.webllm.conv_template"):
        derive_conv_template(template_dirs["llama3"])
    assert "whitespace" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="exporters.webllm.conv_template"):
        derive_conv_template(template_dirs["smollm2"])
    assert caplog.text == ""


def test_smollm2_template_fields(template_dirs):
    conv = derive_conv_template(template_dirs["smollm2"])
    tok = _tokenizer(template_dirs["smollm2"])
    assert conv["system_message"] == SMOLLM2_DEFAULT_SYSTEM
    assert conv["system_template"] == "<|im_start|>system\n{system_message}<|im_end|>\n"
    assert conv["roles"] == {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant",
                             "tool": "<|im_start|>tool"}
    assert (conv["seps"], conv["role_content_sep"], conv["role_empty_sep"]) == (["<|im_end|>\n"], "\n", "\n")
    # SmolLM2's bos_token is "<|im_start|>" but the template does not write bos_token: no prefix ids
    assert conv["system_prefix_token_ids"] is None
    assert conv["stop_str"] == ["<|im_end|>"]
    assert conv["stop_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert "render_empty_system_message" not in conv  # an empty system message renders as in HF


def test_llama3_template_fields(template_dirs):
    conv = derive_conv_template(template_dirs["llama3"])
    tok = _tokenizer(template_dirs["llama3"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAMA3_SPECIALS}
    assert conv["system_prefix_token_ids"] == [ids["<|begin_of_text|>"]]
    assert conv["roles"]["user"] == "<|start_header_id|>user"
    assert conv["role_content_sep"] == conv["role_empty_sep"] == "<|end_header_id|>\n\n"
    assert conv["seps"] == ["<|eot_id|>"]
    assert conv["system_message"] == "" and conv["render_empty_system_message"] is False
    assert set(conv["stop_token_ids"]) == {ids["<|eot_id|>"], ids["<|end_of_text|>"]}
    assert set(conv["stop_str"]) == {"<|eot_id|>", "<|end_of_text|>"}


def test_qwen2_style_default_system_and_tool(template_dirs):
    conv = derive_conv_template(template_dirs["qwen2"])
    assert conv["system_message"] == "You are a helpful assistant."
    assert conv["roles"]["tool"] == "<|im_start|>user"
    assert conv["role_templates"]["tool"] == "<tool_response>\n{tool_message}\n</tool_response>"


def test_folded_system_message_uses_no_role_after_system(template_dirs):
    conv = derive_conv_template(template_dirs["folded"])
    assert conv["add_role_after_system_message"] is False
    assert conv["system_template"] == "<|im_start|>user\n{system_message}\n\n"


# ---------------------------------------------------------------- (c) refusals

@pytest.mark.parametrize("case", sorted(UNREPRESENTABLE))
def test_unrepresentable_template_is_refused(tmp_path, case):
    template, word = UNREPRESENTABLE[case]
    tok = build_tokenizer(tmp_path, TEXTS)
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    with pytest.raises(PreflightError) as err:
        derive_conv_template(tmp_path)
    text = str(err.value)
    assert str(tmp_path) in text and "conv_template" in text and "fix:" in text and word in text


def test_missing_template_is_refused(tmp_path):
    tok = build_tokenizer(tmp_path, TEXTS)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    for leftover in tmp_path.glob("chat_template.*"):
        leftover.unlink()
    with pytest.raises(PreflightError, match="chat_template"):
        derive_conv_template(tmp_path)


# ---------------------------------------------------------------- (b) mlc-chat-config.json

def _model_config(model_dir: Path) -> dict:
    hf = json.loads((model_dir / "config.json").read_text())
    try:
        from exporters.webllm.families import family_for
    except ImportError:  # the family tables are another module's; the chat config takes any dict
        return {"hidden_size": hf["hidden_size"], "vocab_size": hf["vocab_size"],
                "context_window_size": hf["max_position_embeddings"], "prefill_chunk_size": 0,
                "tensor_parallel_shards": 1, "pipeline_parallel_stages": 1}
    return family_for(hf).model_config(hf)


def test_chat_config_fields(tiny_model_dir, tmp_path):
    mc = _model_config(tiny_model_dir)
    cfg = write_chat_config(tiny_model_dir, tmp_path, model_type="llama", quant="q4f32_1", model_config=mc,
                            context_window_size=256, prefill_chunk_size=128)
    on_disk = json.loads((tmp_path / CHAT_CONFIG_FILE).read_text())
    assert on_disk == cfg
    assert list(cfg) == ["version", "model_type", "quantization", "model_config", "vocab_size", "context_window_size",
                         "sliding_window_size", "prefill_chunk_size", "attention_sink_size", "tensor_parallel_shards",
                         "pipeline_parallel_stages", "active_vocab_size", "temperature", "presence_penalty",
                         "frequency_penalty", "repetition_penalty", "top_p", "tokenizer_files", "tokenizer_info",
                         "conv_template", "pad_token_id", "bos_token_id", "eos_token_id"]
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    assert (cfg["model_type"], cfg["quantization"], cfg["version"]) == ("llama", "q4f32_1", "0.1.0")
    assert cfg["vocab_size"] == hf["vocab_size"] and isinstance(cfg["active_vocab_size"], int)
    assert (cfg["context_window_size"], cfg["prefill_chunk_size"]) == (256, 128)
    assert cfg["model_config"]["context_window_size"] == 256 and cfg["model_config"]["prefill_chunk_size"] == 128
    assert (cfg["sliding_window_size"], cfg["attention_sink_size"]) == (-1, -1)
    assert (cfg["tensor_parallel_shards"], cfg["pipeline_parallel_stages"]) == (1, 1)
    # sampling: the tiny model's generation_config.json sets none, so mlc-llm's system defaults
    assert (cfg["temperature"], cfg["top_p"], cfg["repetition_penalty"]) == (1.0, 1.0, 1.0)
    assert (cfg["presence_penalty"], cfg["frequency_penalty"]) == (0.0, 0.0)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"])
    assert cfg["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    for name in cfg["tokenizer_files"]:
        assert (tmp_path / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert cfg["tokenizer_info"] == {"token_postproc_method": "byte_level", "prepend_space_in_encode": False,
                                     "strip_space_in_decode": False}
    assert cfg["conv_template"]["stop_token_ids"] == [hf["eos_token_id"]]
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_chat_config_sampling_from_generation_config(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen.update({"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1})
    (model / "generation_config.json").write_text(json.dumps(gen))
    cfg = write_chat_config(model, tmp_path / "out", model_type="llama", quant="q0f32",
                            model_config=_model_config(model))
    assert (cfg["temperature"], cfg["top_p"], cfg["repetition_penalty"]) == (0.6, 0.9, 1.1)
    # without overrides the window is the model's and the chunk mlc-llm's default, min(window, 8192)
    hf = json.loads((model / "config.json").read_text())
    assert cfg["context_window_size"] == hf["max_position_embeddings"]
    assert cfg["prefill_chunk_size"] == min(hf["max_position_embeddings"], 8192)


def test_explicit_conv_template_is_checked_and_completed(tiny_model_dir, tmp_path):
    given = {"system_template": "{system_message}", "system_message": "", "roles": {"user": "Q:", "assistant": "A:"},
             "seps": ["\n"], "stop_str": ["Q:"], "stop_token_ids": [2]}
    cfg = write_chat_config(tiny_model_dir, tmp_path, model_type="llama", quant="q0f32",
                            model_config=_model_config(tiny_model_dir), conv_template=given)
    conv = cfg["conv_template"]
    assert conv["roles"] == given["roles"] and conv["role_templates"]["user"] == "{user_message}"
    assert conv["messages"] == [] and conv["add_role_after_system_message"] is True
    with pytest.raises(PreflightError, match="seps"):
        check_conv_template({**given, "seps": []})
    with pytest.raises(PreflightError, match="roles"):
        check_conv_template({**given, "roles": {"user": "Q:"}})


def test_chat_config_refuses_chunk_larger_than_window(tiny_model_dir, tmp_path):
    with pytest.raises(PreflightError, match="prefill_chunk_size"):
        write_chat_config(tiny_model_dir, tmp_path, model_type="llama", quant="q0f32",
                          model_config=_model_config(tiny_model_dir), context_window_size=64, prefill_chunk_size=128)
    assert not (tmp_path / CHAT_CONFIG_FILE).exists()


@pytest.mark.parametrize("decoder,normalizer,expected", [
    ({"type": "ByteLevel"}, None, ("byte_level", False, False)),
    ({"type": "Sequence", "decoders": [{"type": "Replace"}, {"type": "ByteFallback"}, {"type": "Fuse"},
                                       {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
     {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace"}]},
     ("byte_fallback", True, True)),
    ({"type": "WordPiece"}, None, ("byte_fallback", False, False)),
])
def test_tokenizer_info_detection(tmp_path, decoder, normalizer, expected):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"decoder": decoder, "normalizer": normalizer}))
    info = tokenizer_info(path)
    assert (info["token_postproc_method"], info["prepend_space_in_encode"], info["strip_space_in_decode"]) == expected
