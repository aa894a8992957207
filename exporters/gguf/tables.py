"""Format facts for the GGUF writer, as tables.

Everything here is a fact about GGUF or about llama.cpp (version vendored by llama-cpp-python
0.3.36), not a choice of this exporter. GGUF key names come from ``gguf.Keys`` wherever the
package defines them; tensor names come from ``gguf.TENSOR_NAMES``.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf

GGMLType = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class OutType:
    """One ``out_type`` of ``write_gguf``: the type of the big matrices, and the file type tag."""

    tensor_type: GGMLType
    file_type: gguf.LlamaFileType


OUT_TYPES: dict[str, OutType] = {
    "F32": OutType(GGMLType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": OutType(GGMLType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": OutType(GGMLType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}

# llama.cpp keeps these in F32 whatever the file type: 1-D tensors (norms, biases, rope
# factors) and any norm weight. convert_hf_to_gguf.py and llama_model_quantize use the same rule.
F32_NAME_SUFFIXES = ("_norm.weight",)
F32_MAX_DIMS = 1

# model_type (config.json) -> family module under exporters.gguf.families
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",        # includes SmolLM2
    "mistral": "llama",      # same tensors and rope layout as Llama in llama.cpp
    "qwen2": "qwen2",
    "gemma3_text": "gemma3",  # Gemma3ForCausalLM
    "gemma3": "gemma3",       # Gemma3ForConditionalGeneration: text tower only, vision tower skipped
    "phi3": "phi3",
}

# --- tokenizer -------------------------------------------------------------------------------

# tokenizer.ggml.model values
TOKENIZER_MODEL_BPE = "gpt2"    # byte-level BPE with merges and a pre-tokenizer type
TOKENIZER_MODEL_SPM = "llama"   # SentencePiece-style: scores, byte-fallback tokens <0xXX>

# The string llama.cpp's convert_hf_to_gguf.py encodes to fingerprint a BPE pre-tokenizer
# (sha256 of str(token ids)). Known fingerprints map to a pre-tokenizer name below.
PRE_TOKENIZER_CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
    '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
    '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)

# sha256 of the check text's token ids -> tokenizer.ggml.pre, for the real tokenizers of the
# supported families (from llama.cpp's get_vocab_base_pre; its reference model in the comment).
PRE_TOKENIZER_HASHES: dict[str, str] = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3-Embedding-0.6B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # gpt2
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",      # microsoft/phi-2
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",     # Xenova/gpt-4o
}

# The split regexes of the tokenizer.json pre-tokenizers that llama.cpp implements, as they
# appear in tokenizer.json (llama.cpp rewrites "(?i:...)" into an equivalent case class).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
               r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# A tokenizer.json pre-tokenizer, reduced to a signature (see vocab.pre_tokenizer_signature),
# -> the llama.cpp pre-tokenizer that splits text the same way. Steps are ("bytelevel", uses
# the GPT-2 regex), ("digits", individual), ("split", regex).
PRE_TOKENIZER_SIGNATURES: dict[tuple, str] = {
    (("bytelevel", True),): "gpt-2",
    (("digits", True), ("bytelevel", True)): "smollm",
    (("split", LLAMA3_REGEX), ("bytelevel", False)): "llama-bpe",
    (("split", QWEN2_REGEX), ("bytelevel", False)): "qwen2",
    (("split", GPT4O_REGEX), ("bytelevel", False)): "gpt-4o",
}

# llama.cpp pre-tokenizers that ignore merges when a whole pre-token is in the vocabulary;
# the Hugging Face tokenizer must say the same (model.ignore_merges) or the two disagree.
PRE_TOKENIZERS_IGNORING_MERGES = frozenset({"llama-bpe"})
# normalizers llama.cpp does not apply but that leave ordinary (already NFC) text unchanged
TOLERATED_BPE_NORMALIZERS = frozenset({"NFC"})

# End-of-turn tokens by text, in the order llama.cpp auto-detects them; written explicitly as
# tokenizer.ggml.eot_token_id so that llama.cpp does not pick one by hash-map order.
EOT_TOKEN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "<EOT>")

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space
SPM_BYTE_TOKEN = r"<0x[0-9A-Fa-f]{2}>"

# special token role -> (tokenizer attribute in transformers, GGUF key)
SPECIAL_TOKEN_KEYS: dict[str, tuple[str, str]] = {
    "bos": ("bos_token_id", gguf.Keys.Tokenizer.BOS_ID),
    "eos": ("eos_token_id", gguf.Keys.Tokenizer.EOS_ID),
    "unk": ("unk_token_id", gguf.Keys.Tokenizer.UNK_ID),
    "pad": ("pad_token_id", gguf.Keys.Tokenizer.PAD_ID),
}
EOT_KEY = gguf.Keys.Tokenizer.EOT_ID

# generation_config.json field -> GGUF sampling key (llama.cpp reads these as defaults)
GENERATION_DEFAULT_KEYS: dict[str, tuple[str, type]] = {
    "temperature": (gguf.Keys.General.SAMPLING_TEMP, float),
    "top_k": (gguf.Keys.General.SAMPLING_TOP_K, int),
    "top_p": (gguf.Keys.General.SAMPLING_TOP_P, float),
    "min_p": (gguf.Keys.General.SAMPLING_MIN_P, float),
    "repetition_penalty": (gguf.Keys.General.SAMPLING_PENALTY_REPEAT, float),
}

# --- rope ------------------------------------------------------------------------------------

# rope_type values of config.json that each family can express in GGUF
ROPE_DEFAULT = "default"
ROPE_LINEAR = "linear"
ROPE_LLAMA3 = "llama3"
