"""The pruning library (toolchain/pruning) on tiny random models built here: each structured cut of a
structure that contributes exactly nothing leaves the logits unchanged and is the one the scores pick;
every pruned model is a standard checkpoint (reloads with equal logits, config consistent with the
tensors, tied embeddings tied, KV cache indexed right); Wanda and the calibration statistics match a
hand computation; N:M and unstructured masks hold exactly what was asked and come back after a merge;
bad input names its key."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.tolerances import (
    PRUNE_ANGLE_BY_HAND,
    PRUNE_CACHED_DECODE,
    PRUNE_CUT_EFFECT,
    PRUNE_IDENTITY_ANGLE,
    PRUNE_INVARIANT_LOGITS,
    PRUNE_RELOAD_LOGITS,
    PRUNE_SUMSQ_BY_HAND,
    PRUNE_WANDA_BY_HAND,
)
from toolchain.core.errors import RecipeError, StageError
from toolchain.pruning.calibration import calibrate
from toolchain.pruning.families import family_of, known_architectures
from toolchain.pruning.prune import prune_structured
from toolchain.pruning.scores import (
    head_group_scores,
    layer_importance,
    mlp_channel_scores,
    module_scores,
    rank_lowest_first,
    weight_scores,
)
from toolchain.pruning.sparse import (
    apply_masks,
    load_masks,
    nm_masks,
    reapply_masks,
    save_masks,
    sparse_masks,
    sparsity,
    unstructured_masks,
)
from toolchain.pruning.structured import (
    drop_layers,
    groups_to_keep,
    layers_to_drop,
    mlp_target,
    remove_head_groups,
    remove_layers,
    shape_problems,
    shrink_mlp,
    validate,
)

VOCAB, HIDDEN = 96, 64
FAMILIES = ["llama", "qwen2", "mistral", "qwen3"]


def tiny(family: str, *, layers: int = 4, heads: int = 4, kv_heads: int = 2, head_dim: int = 24,
         intermediate: int = 128, tie: bool = True, seed: int = 0, **extra):
    """A tiny random model of ``family`` with unit-scale weights (variance preserving linears, random
    biases), so that every structure visibly moves the logits; head_dim differs from hidden / heads."""
    import transformers

    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
             "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    cfg_cls, model_cls = (getattr(transformers, n) for n in names[family])
    torch.manual_seed(seed)
    explicit = {} if head_dim is None else {"head_dim": head_dim}  # None: the config derives it (Qwen2 has no key)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  tie_word_embeddings=tie, **explicit, **extra)
    model = model_cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else p.shape[1] ** -0.5))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def sample(n: int = 3, length: int = 24, seed: int = 7) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _ in range(n)]


def logits(model, ids=None):
    ids = torch.tensor(ids or sample(1, 16, seed=11))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def assert_cached_decoding_matches(model):
    """Greedy generation over the KV cache (indexed by each block's layer_idx) gives the logits of full
    forwards over the same tokens."""
    prompt = torch.tensor(sample(1, 8, seed=3))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full = logits(model, out.sequences.tolist())
    assert len(out.logits) == 4
    for step, step_logits in enumerate(out.logits):
        assert max_diff(step_logits[0].double(), full[0, prompt.shape[1] - 1 + step]) < PRUNE_CACHED_DECODE.atol


def block(model, i):
    return model.model.layers[i]


# --- families ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_in_the_table_is_found(family):
    model = tiny(family, layers=1)
    assert family_of(model).name == family
    assert family_of(model.config.to_dict() | {"architectures": [type(model).__name__]}).name == family


def test_an_unknown_architecture_is_refused_naming_the_key_and_the_known_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    for thing in (model, {"architectures": ["GPT2LMHeadModel"]}):
        with pytest.raises(RecipeError) as info:
            family_of(thing, "prune.layers")
        text = str(info.value)
        assert "prune.layers:" in text and "'GPT2LMHeadModel'" in text
        assert all(a in text for a in known_architectures()) and "toolchain/pruning/families.py" in text
    assert validate({"architectures": ["GPT2LMHeadModel"]}, layers={"drop": 1})[0].value == "GPT2LMHeadModel"


# --- calibration and scores -------------------------------------------------------------------------
def test_column_sums_and_angular_distances_match_a_hand_computation():
    model = tiny("llama", layers=2)
    seqs = sample(2, 12)
    calib = calibrate(model, seqs)
    want = torch.zeros(HIDDEN, dtype=torch.float64)
    angles = [[], []]
    with torch.no_grad():
        for ids in seqs:
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
            x = block(model, 0).input_layernorm(out.hidden_states[0])[0].double()
            want += (x * x).sum(0)
            for i in range(2):  # hidden_states[i] is block i's input; the last entry is after the final norm
                h_in = out.hidden_states[i][0].double()
                h_out = out.hidden_states[i + 1][0].double() if i == 0 else None
                if h_out is None:  # block 1 is the last: recompute its output before the final norm
                    pos = torch.arange(len(ids))[None]
                    emb = model.model.rotary_emb(out.hidden_states[i], pos)
                    h_out = block(model, 1)(out.hidden_states[i], position_embeddings=emb, position_ids=pos)[0].double()
                cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
                angles[i] += (torch.arccos(cos.clamp(-1, 1)) / math.pi).tolist()
    got = calib.sum_sq["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(got, want, rtol=PRUNE_SUMSQ_BY_HAND.rtol, atol=0)
    assert calib.rows["model.layers.0.self_attn.q_proj"] == calib.tokens == 24
    for i in range(2):
        assert abs(calib.angular[i] - sum(angles[i]) / len(angles[i])) < PRUNE_ANGLE_BY_HAND.atol
    assert len(calib.sum_sq) == 2 * 7 and calib.figures()["angular_distance"] == [round(a, 6) for a in calib.angular]


def test_wanda_is_magnitude_times_the_input_column_norm():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-3.0, 0.25, 1.0, 2.0], [0.5, 0.5, -0.5, 4.0]])
    sum_sq = torch.tensor([4.0, 1.0, 9.0, 0.25], dtype=torch.float64)  # column norms 2, 1, 3, 0.5
    by_hand = torch.tensor([[2.0, 2.0, 1.5, 0.0], [6.0, 0.25, 3.0, 1.0], [1.0, 0.5, 1.5, 2.0]], dtype=torch.float64)
    got = weight_scores(w, "wanda", sum_sq.sqrt())
    assert torch.allclose(got, by_hand, rtol=PRUNE_WANDA_BY_HAND.rtol, atol=0)
    assert torch.equal(weight_scores(w, "magnitude"), w.abs().double())
    # through a model: the calibration's norms for that module
    model = tiny("llama", layers=1)
    calib = calibrate(model, sample(2))
    name = "model.layers.0.mlp.down_proj"
    weight = block(model, 0).mlp.down_proj.weight.detach().double()
    want = weight.abs() * calib.sum_sq[name].sqrt()[None, :]
    assert torch.allclose(module_scores(model, name, "wanda", calib), want, rtol=PRUNE_WANDA_BY_HAND.rtol, atol=0)


def zero_channels(model, channels):
    with torch.no_grad():
        for b in model.model.layers:
            b.mlp.down_proj.weight[:, channels] = 0


def zero_group(model, group: int):
    geo_heads = model.config.num_attention_heads // model.config.num_key_value_heads
    width = geo_heads * model.config.head_dim
    with torch.no_grad():
        for b in model.model.layers:
            b.self_attn.o_proj.weight[:, group * width:(group + 1) * width] = 0


def make_identity(model, i: int):
    with torch.no_grad():
        block(model, i).self_attn.o_proj.weight.zero_()
        block(model, i).mlp.down_proj.weight.zero_()
        for lin in (block(model, i).self_attn.o_proj, block(model, i).mlp.down_proj):
            if lin.bias is not None:
                lin.bias.zero_()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_dead_channels_and_groups_score_zero_and_rank_first(method):
    model = tiny("qwen2")
    dead = [3, 40, 77, 100]
    zero_channels(model, dead)
    zero_group(model, 1)
    calib = calibrate(model, sample()) if method == "wanda" else None
    for s in mlp_channel_scores(model, method, calib):
        assert sorted(rank_lowest_first(s)[:len(dead)]) == dead and s[dead].abs().max() == 0 and s.min() >= 0
        assert s[[c for c in range(128) if c not in dead]].min() > 0
    for s in head_group_scores(model, method, calib):
        assert s.shape == (2,) and s[1] == 0 and s[0] > 0


def test_wanda_needs_the_calibration_sample():
    model = tiny("llama", layers=1)
    with pytest.raises(RecipeError, match=r"prune.method: `wanda` needs activations"):
        mlp_channel_scores(model, "wanda", None, "prune.method")
    with pytest.raises(RecipeError, match=r"prune.method: must be one of magnitude, wanda, got 'taylor'"):
        head_group_scores(model, "taylor", None, "prune.method")


# --- structured cuts --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_an_identity_block_leaves_the_logits_and_it_ranks_lowest(family):
    model = tiny(family)
    make_identity(model, 2)
    before = logits(model)
    calib = calibrate(model, sample())
    importance = layer_importance(calib)
    assert rank_lowest_first(importance)[0] == 2
    assert importance[2] < PRUNE_IDENTITY_ANGLE.hi < min(a for i, a in enumerate(importance) if i != 2)
    assert drop_layers(model, importance, drop=1) == [2]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 3
    assert max_diff(logits(model), before) < PRUNE_INVARIANT_LOGITS.atol
    assert_cached_decoding_matches(model)  # the block after the dropped one now reads cache slot 2
    remove_layers(model, [0])  # control: a live block moves the logits
    assert max_diff(logits(model), before) > PRUNE_CUT_EFFECT.lo


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_dead_mlp_channels_leaves_the_logits(family):
    model = tiny(family)
    dead = list(range(5, 128, 2))[:32]  # 32 dead channels: 128 -> 96, a multiple of 32
    zero_channels(model, dead)
    before = logits(model)
    control = tiny(family)
    scores = mlp_channel_scores(model, "wanda", calibrate(model, sample()))
    assert shrink_mlp(model, scores, keep=96) == 96
    assert model.config.intermediate_size == 96 and shape_problems(model) == []
    for b in model.model.layers:
        assert b.mlp.gate_proj.weight.shape == (96, HIDDEN) and b.mlp.down_proj.weight.shape == (HIDDEN, 96)
        assert b.mlp.down_proj.weight.abs().sum(0).min() > 0  # every dead column went, every live one stayed
    assert max_diff(logits(model), before) < PRUNE_INVARIANT_LOGITS.atol
    control_before = logits(control)  # control: the same cut of live channels moves the logits
    shrink_mlp(control, mlp_channel_scores(control, "magnitude"), fraction=0.25)
    assert control.config.intermediate_size == 96 and max_diff(logits(control), control_before) > PRUNE_CUT_EFFECT.lo


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_a_dead_gqa_group_leaves_the_logits(family):
    model = tiny(family)
    zero_group(model, 0)
    before = logits(model)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = head_group_scores(model, "wanda", calibrate(model, sample()))
    assert remove_head_groups(model, scores, keep=2) == 2
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 24)
    for i, b in enumerate(model.model.layers):
        a = b.self_attn
        p = f"model.layers.{i}.self_attn."
        assert torch.equal(a.q_proj.weight, old[p + "q_proj.weight"][48:96])  # group 1's two query heads
        assert torch.equal(a.k_proj.weight, old[p + "k_proj.weight"][24:48])
        assert torch.equal(a.v_proj.weight, old[p + "v_proj.weight"][24:48])
        assert torch.equal(a.o_proj.weight, old[p + "o_proj.weight"][:, 48:96])
        if family == "qwen2":  # q/k/v biases follow their rows
            assert torch.equal(a.q_proj.bias, old[p + "q_proj.bias"][48:96])
            assert torch.equal(a.k_proj.bias, old[p + "k_proj.bias"][24:48])
            assert torch.equal(a.v_proj.bias, old[p + "v_proj.bias"][24:48])
        if family == "qwen3":  # per-head norms over head_dim stay whole
            assert a.q_norm.weight.shape == (24,)
    assert max_diff(logits(model), before) < PRUNE_INVARIANT_LOGITS.atol
    control = tiny(family)
    control_before = logits(control)
    remove_head_groups(control, head_group_scores(control, "magnitude"), fraction=0.5)
    assert max_diff(logits(control), control_before) > PRUNE_CUT_EFFECT.lo


def config_against_tensors(folder: Path) -> list[str]:
    """Every config.json size that disagrees with the saved tensors (read with safetensors, not the library)."""
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    heads, kv, d, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]
    hidden, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    bad = []
    layer_ids = {int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.")}
    if layer_ids != set(range(n)):
        bad.append(f"layers {sorted(layer_ids)} for num_hidden_layers {n}")
    if cfg.get("layer_types") is not None and len(cfg["layer_types"]) != n:
        bad.append("layer_types")
    if shapes["model.embed_tokens.weight"] != (cfg["vocab_size"], hidden):
        bad.append("embed_tokens")
    want = {"self_attn.q_proj.weight": (heads * d, hidden), "self_attn.k_proj.weight": (kv * d, hidden),
            "self_attn.v_proj.weight": (kv * d, hidden), "self_attn.o_proj.weight": (hidden, heads * d),
            "self_attn.q_proj.bias": (heads * d,), "self_attn.k_proj.bias": (kv * d,), "self_attn.v_proj.bias": (kv * d,),
            "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter)}
    for i in range(n):
        for key, shape in want.items():
            name = f"model.layers.{i}.{key}"
            if name in shapes and shapes[name] != shape:
                bad.append(f"{name} {shapes[name]} != {shape}")
            elif name not in shapes and key.endswith("weight"):
                bad.append(f"{name} missing")
    return bad


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pruned_model_is_a_standard_checkpoint(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(family, layers=4, heads=8, kv_heads=4, intermediate=192)
    figures = prune_structured(model, sample(), layers={"drop": 1}, mlp={"keep": 96}, heads={"keep": 4})
    assert figures["after"] == {"layers": 3, "intermediate": 96, "heads": 4, "kv_heads": 2, "head_dim": 24, "group": 2}
    assert len(figures["dropped_layers"]) == 1 and figures["parameters"]["after"] < figures["parameters"]["before"]
    model.save_pretrained(tmp_path)
    assert config_against_tensors(tmp_path) == []
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 24
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(logits(again), logits(model)) < PRUNE_RELOAD_LOGITS.atol
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    assert_cached_decoding_matches(model)
    assert_cached_decoding_matches(again)


def test_biases_on_every_projection_follow_their_rows(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny("llama", attention_bias=True, mlp_bias=True, tie=False)
    outputs = [(b.self_attn.o_proj.bias.clone(), b.mlp.down_proj.bias.clone()) for b in model.model.layers]
    figures = prune_structured(model, sample(), layers={"drop": 1}, mlp={"keep": 64}, heads={"keep": 2},
                               method="magnitude")
    survivors = [i for i in range(4) if i not in figures["dropped_layers"]]
    for b, i in zip(model.model.layers, survivors):
        assert b.mlp.gate_proj.bias.shape == b.mlp.up_proj.bias.shape == (64,)
        assert b.self_attn.q_proj.bias.shape == (48,) and b.self_attn.k_proj.bias.shape == (24,)
        assert torch.equal(b.self_attn.o_proj.bias, outputs[i][0]) and torch.equal(b.mlp.down_proj.bias, outputs[i][1])
    model.save_pretrained(tmp_path)
    assert config_against_tensors(tmp_path) == []
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(logits(again), logits(model)) < PRUNE_RELOAD_LOGITS.atol


def test_head_dim_is_written_where_the_config_derived_it(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny("qwen2", head_dim=None)  # Qwen2Config has no head_dim: 64 / 4 heads = 16
    assert "head_dim" not in model.config.to_dict()
    remove_head_groups(model, head_group_scores(model, "magnitude"), keep=2)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 16  # not 64 / 2 = 32
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.model.layers[0].self_attn.q_proj.weight.shape == (32, HIDDEN)
    assert max_diff(logits(again), logits(model)) < PRUNE_RELOAD_LOGITS.atol


def test_the_fixture_model_pruned_and_reloaded_stays_tied(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    prune_structured(model, sample(), layers={"fraction": 0.5}, mlp={"keep": 64}, heads={"fraction": 0.5},
                     method="magnitude")
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # one tensor on disk
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (again.config.num_hidden_layers, again.config.intermediate_size, again.config.num_attention_heads) == (1, 64, 2)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert max_diff(logits(again), logits(model)) < PRUNE_RELOAD_LOGITS.atol


# --- bad input names its key ------------------------------------------------------------------------
@pytest.mark.parametrize("section, args, key, words", [
    ("layers", {"fraction": 1.0}, "prune.layers.fraction", "above 0 and below 1"),
    ("layers", {"fraction": 0.2}, "prune.layers.fraction", "removes no layer of 4"),
    ("layers", {"drop": 4}, "prune.layers.drop", "must leave at least one of the model's 4 layers"),
    ("layers", {"drop": 1, "fraction": 0.5}, "prune.layers", "needs exactly one of"),
    ("mlp", {"keep": 16}, "prune.mlp.keep", "multiple of 32"),
    ("mlp", {"keep": 160, "multiple": 32}, "prune.mlp.keep", "must not exceed the model's intermediate_size 128"),
    ("mlp", {"fraction": 0.9}, "prune.mlp.fraction", "leaves fewer than 32 of 128 channels"),
    ("mlp", {"keep": 128, "multiple": 256}, "prune.mlp.keep", "multiple of 256"),
    ("heads", {"keep": 3}, "prune.heads.keep", "must be a multiple of 2: heads go in whole GQA groups"),
    ("heads", {"keep": 0}, "prune.heads.keep", "positive integer"),
    ("heads", {"fraction": 0.4}, "prune.heads.fraction", "removes no GQA group of 2"),
    ("heads", {"keep": 2, "size": 1}, "prune.heads.size", "is not a key of this section"),
])
def test_bad_input_names_the_key(section, args, key, words):
    model = tiny("llama")
    problems = validate(model, "prune", **{section: args})
    assert len(problems) == 1 and problems[0].where == key and words in problems[0].rule, problems
    if set(args) <= {"keep", "fraction", "drop", "multiple"}:
        op = {"layers": lambda: drop_layers(model, [0.0] * 4, where="prune.layers", **args),
              "mlp": lambda: shrink_mlp(model, [torch.ones(128)] * 4, where="prune.mlp", **args),
              "heads": lambda: remove_head_groups(model, [torch.ones(2)] * 4, where="prune.heads", **args)}[section]
        with pytest.raises(RecipeError) as info:
            op()
        assert f"{key}: " in str(info.value) and words in str(info.value)
        assert model.config.num_hidden_layers == 4 and shape_problems(model) == []  # nothing was touched


def test_a_llama_head_count_must_divide_hidden_size_and_a_qwen2_one_need_not(tmp_path):
    from transformers import AutoModelForCausalLM

    llama, qwen2 = tiny("llama", heads=8, kv_heads=4), tiny("qwen2", heads=8, kv_heads=4)
    problems = validate(llama, heads={"keep": 6})
    assert [p.where for p in problems] == ["prune.heads.keep"] and "do not divide hidden_size 64" in problems[0].rule
    assert "[2, 4]" in problems[0].fix
    assert validate(llama, heads={"fraction": 0.25})[0].where == "prune.heads.fraction"
    remove_head_groups(qwen2, head_group_scores(qwen2, "magnitude"), keep=6)
    qwen2.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_attention_heads == 6 and config_against_tensors(tmp_path) == []
    assert max_diff(logits(again), logits(qwen2)) < PRUNE_RELOAD_LOGITS.atol


SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576,
           "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}


@pytest.mark.parametrize("section, bad, words", [
    ("layers", {"fraction": 0.02}, "removes no layer of 30"),
    ("mlp", {"fraction": 0.9, "multiple": 256}, "leaves fewer than 256 of 1536 channels"),
    ("heads", {"fraction": 0.3}, "removes no GQA group of 3"),
])
def test_the_fraction_a_fix_quotes_works_on_config_json_alone(section, bad, words):
    problem, = validate(SMOLLM2, **{section: bad})
    assert words in problem.rule and problem.where == f"prune.{section}.fraction"
    quoted = float(problem.fix.split()[3])
    assert validate(SMOLLM2, **{section: {**bad, "fraction": quoted}}) == []
    figures = {"layers": layers_to_drop, "mlp": mlp_target, "heads": groups_to_keep}[section](
        SMOLLM2, **{**bad, "fraction": quoted})
    assert figures == {"layers": 1, "mlp": 256, "heads": 2}[section]  # the edge: one layer, one multiple, one group


def test_smollm2_head_counts_follow_its_groups_of_three():
    assert groups_to_keep(SMOLLM2, keep=6) == 2 and groups_to_keep(SMOLLM2, fraction=0.34) == 2
    assert "multiple of 3" in validate(SMOLLM2, heads={"keep": 4})[0].rule
    assert mlp_target(SMOLLM2, keep=1024, multiple=256) == 1024 and layers_to_drop(SMOLLM2, fraction=0.25) == 7


def test_every_problem_is_reported_at_once_and_one_kv_head_is_refused():
    model = tiny("llama", kv_heads=1)
    with pytest.raises(RecipeError) as info:
        prune_structured(model, sample(), layers={"drop": 9}, mlp={"keep": 100}, heads={"fraction": 0.5},
                         method="taylor")
    wheres = [p.where for p in info.value.problems]
    assert wheres == ["prune.layers.drop", "prune.mlp.keep", "prune.heads.fraction", "prune.method"]
    assert "one KV head" in str(info.value)


def test_a_score_list_that_does_not_fit_is_a_stage_error():
    model = tiny("llama")
    with pytest.raises(StageError, match="4 layers"):
        drop_layers(model, [0.1, 0.2], drop=1)
    with pytest.raises(StageError, match="channel scores"):
        shrink_mlp(model, [torch.ones(64)] * 4, keep=32)


# --- sparsity masks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_masks_keep_exactly_n_in_every_group_of_m(pattern, method):
    n, m = map(int, pattern.split(":"))
    model = tiny("qwen2", layers=2)
    calib = calibrate(model, sample()) if method == "wanda" else None
    masks = nm_masks(model, pattern, method=method, calib=calib)
    assert len(masks) == 2 * 7
    apply_masks(model, masks)
    for name in masks:
        w = model.get_submodule(name).weight
        per_group = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        assert (per_group == n).all(), name
    report = sparsity(model)
    assert report["overall"] == 1 - n / m and all(layer["sparsity"] == 1 - n / m for layer in report["layers"])
    assert (model.model.embed_tokens.weight != 0).all()  # embeddings / LM head never masked


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_unstructured_masks_zero_the_fraction_asked_in_every_row(fraction):
    model = tiny("llama", layers=2)
    calib = calibrate(model, sample())
    masks = unstructured_masks(model, fraction, method="wanda", calib=calib)
    apply_masks(model, masks)
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        zeros = (w == 0).sum(1)
        assert (zeros == math.floor(fraction * w.shape[1])).all()
        assert (zeros - fraction * w.shape[1]).abs().max() < 1  # within one element of each row
    # the kept weights of a row are its highest wanda scores, by hand for one row
    name = "model.layers.1.mlp.down_proj"
    w = tiny("llama", layers=2).get_submodule(name).weight.detach().double()[5]
    score = w.abs() * calib.sum_sq[name].sqrt()
    k = math.floor(fraction * len(w))
    assert set(torch.nonzero(~masks[name][5]).flatten().tolist()) == set(torch.argsort(score)[:k].tolist())
    assert abs(sparsity(model)["overall"] - fraction) * 64 < 1  # within one element of the narrowest row (64 inputs)


def test_wanda_and_magnitude_masks_differ_when_activations_do():
    model = tiny("llama", layers=1)
    calib = calibrate(model, sample())
    a = unstructured_masks(model, 0.5, method="magnitude")
    b = unstructured_masks(model, 0.5, method="wanda", calib=calib)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_saved_mask_is_restored_after_a_dense_delta(tmp_path):
    model = tiny("qwen2", layers=2)
    masks = sparse_masks(model, pattern="2:4")
    apply_masks(model, masks)
    path = save_masks(masks, tmp_path / "mask.safetensors", {"pattern": "2:4", "method": "magnitude"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.safetensors"]  # no temporary file left
    sparse = {k: model.get_submodule(k).weight.detach().clone() for k in masks}
    deltas = {}
    with torch.no_grad():  # a merged adapter: W + B @ A, dense
        for k in masks:
            w = model.get_submodule(k).weight
            deltas[k] = torch.randn(w.shape[0], 4) @ torch.randn(4, w.shape[1]) * 0.01
            w += deltas[k]
    assert sparsity(model)["overall"] == 0
    restored = reapply_masks(model, path)
    assert restored == sum(int((~m).sum()) for m in masks.values())
    for k, m in load_masks(path).items():
        w = model.get_submodule(k).weight
        assert torch.equal(m, masks[k]) and (w[~m] == 0).all()
        assert torch.equal(w[m], (sparse[k] + deltas[k])[m])
    assert sparsity(model)["overall"] == 0.5


def test_masks_refuse_what_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    model = tiny("llama", layers=2)
    with pytest.raises(RecipeError, match=r"prune.sparse.pattern: must be N:M"):
        nm_masks(model, "4:2")
    with pytest.raises(RecipeError, match=r"prune.sparse.pattern: needs every input width divisible by 5"):
        nm_masks(model, "2:5")
    with pytest.raises(RecipeError, match=r"prune.sparse.fraction: must be a number above 0 and below 1"):
        unstructured_masks(model, 1.5)
    with pytest.raises(RecipeError, match=r"prune.sparse: needs exactly one of"):
        sparse_masks(model, fraction=0.5, pattern="2:4")
    masks = unstructured_masks(model, 0.5)
    with pytest.raises(StageError, match="does not fit this model"):
        apply_masks(tiny("llama", layers=1), masks)
    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(StageError, match="not an edgesmith sparsity mask"):
        load_masks(tmp_path / "other.safetensors")
