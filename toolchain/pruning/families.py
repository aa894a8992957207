"""The architectures pruning knows: where each one keeps its decoder layers, projections and norms,
and which config keys describe their shapes.

Structured pruning rewrites tensors *and* the config that says how big they are; a checkpoint whose
config disagrees with one tensor fails to load (or, worse, loads with a silently recomputed size:
transformers derives ``head_dim`` as ``hidden_size // num_attention_heads`` when the key is absent,
which is wrong as soon as heads are removed). So every architecture the library touches is a row
here, naming its modules and config keys, and anything else is refused before work starts: guessing
a layout from module names could prune one matrix of a fused projection and leave a model that no
exporter (GGUF, MLC, transformers.js all read the same config keys) can convert.

One row per family of ``*ForCausalLM`` classes sharing a layout: pre-norm decoder blocks
``x + attn(norm(x))`` then ``x + mlp(norm(x))``, SwiGLU MLP (gate, up, down), separate q/k/v/o
projections with grouped-query attention. SmolLM2 is ``LlamaForCausalLM``. Qwen2 carries a bias on
q/k/v (never on o); Llama and Mistral have biases only when ``attention_bias`` / ``mlp_bias`` say so
(the slicing code slices any bias it finds, so both cases are covered). Qwen3 adds ``q_norm`` /
``k_norm`` over one head's ``head_dim`` (shared by all heads, so removing heads leaves them whole).
"""
from __future__ import annotations

from dataclasses import dataclass

from toolchain.core.errors import Problem, RecipeError

TITLE = "cannot prune this model"
FIX_FILE = "toolchain/pruning/families.py"


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps what pruning touches (dotted paths relative to the model or to one
    decoder layer) and the config keys that must follow the tensors."""

    name: str
    architectures: tuple[str, ...]  # config.json `architectures` / the model's class name
    qkv_bias: bool  # q/k/v always carry a bias (Qwen2); otherwise only where the config asks
    heads_divide_hidden: bool = False  # the config class refuses hidden_size % num_attention_heads != 0
    layers: str = "model.layers"  # the ModuleList of decoder blocks, from the model
    final_norm: str = "model.norm"
    attention: str = "self_attn"  # from one decoder layer
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_norms: tuple[str, ...] = ()  # per-head norms over head_dim (Qwen3), left whole by head removal
    # config keys that must follow the tensors
    n_layers: str = "num_hidden_layers"
    intermediate: str = "intermediate_size"
    n_heads: str = "num_attention_heads"
    n_kv_heads: str = "num_key_value_heads"
    head_dim: str = "head_dim"  # always written explicitly once heads are removed
    per_layer: tuple[str, ...] = ("layer_types",)  # lists with one entry per decoder layer, when present

    def attn(self, name: str) -> str:
        """A projection's path inside one decoder layer: ``attn("q_proj")`` -> ``self_attn.q_proj``."""
        return f"{self.attention}.{getattr(self, name)}"

    def ffn(self, name: str) -> str:
        return f"{self.mlp}.{getattr(self, name)}"

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear projection of one decoder layer, by its path inside the layer."""
        return (*(self.attn(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                *(self.ffn(n) for n in ("gate_proj", "up_proj", "down_proj")))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # SmolLM2, Llama 2/3, TinyLlama. transformers 5's LlamaConfig.validate_architecture refuses a head count
    # that does not divide hidden_size even when head_dim is explicit, so such a checkpoint would not load.
    Family("llama", ("LlamaForCausalLM",), qkv_bias=False, heads_divide_hidden=True),
    Family("mistral", ("MistralForCausalLM",), qkv_bias=False),
    Family("qwen2", ("Qwen2ForCausalLM",), qkv_bias=True),
    Family("qwen3", ("Qwen3ForCausalLM",), qkv_bias=False, head_norms=("q_norm", "k_norm")),
)}
BY_ARCHITECTURE: dict[str, Family] = {a: f for f in FAMILIES.values() for a in f.architectures}


def known_architectures() -> list[str]:
    return sorted(BY_ARCHITECTURE)


def architecture_of(model_or_config) -> str | None:
    """The architecture name of an in-memory model (its class), a PretrainedConfig or a config.json dict."""
    if isinstance(model_or_config, dict):
        archs = model_or_config.get("architectures") or []
        return archs[0] if archs else None
    if hasattr(model_or_config, "named_modules"):  # an nn.Module: its class says what it computes
        return type(model_or_config).__name__
    archs = getattr(model_or_config, "architectures", None) or []
    return archs[0] if archs else None


def family_of(model_or_config, where: str = "prune") -> Family:
    """The family row for a model or config; RecipeError naming ``where`` and the known architectures."""
    arch = architecture_of(model_or_config)
    family = BY_ARCHITECTURE.get(arch)
    if family is None:
        raise RecipeError(TITLE, [Problem(
            where, f"can prune only these architectures: {', '.join(known_architectures())}", arch,
            f"remove the `{where.split('.')[0]}` section for this model, or add a row for {arch} to {FIX_FILE}")])
    return family


def config_value(config, key: str, default=None):
    """``key`` of a PretrainedConfig (its text config for multimodal wrappers), of a model's config or of a
    config.json dict."""
    if hasattr(config, "named_modules"):
        config = config.config
    if isinstance(config, dict):
        return config.get(key, default)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, key, default)


def geometry(config, family: Family) -> dict[str, int]:
    """The sizes pruning changes, read from a config (dict or object, or a model's): layers, intermediate, heads,
    kv_heads, head_dim (explicit, or hidden_size // heads as transformers derives it), group (query
    heads per KV head)."""
    heads = int(config_value(config, family.n_heads))
    kv = int(config_value(config, family.n_kv_heads) or heads)
    head_dim = config_value(config, family.head_dim) or int(config_value(config, "hidden_size")) // heads
    return {"layers": int(config_value(config, family.n_layers)),
            "intermediate": int(config_value(config, family.intermediate)),
            "heads": heads, "kv_heads": kv, "head_dim": int(head_dim),
            "group": heads // kv if kv and heads % kv == 0 else 0}


def get_module(root, dotted: str):
    """``root.a.b.c`` for ``dotted`` = ``a.b.c`` (a ModuleList index is a plain attribute name too)."""
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model, family: Family):
    """The model's ModuleList of decoder blocks."""
    return get_module(model, family.layers)
