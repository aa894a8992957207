"""Tokenizer -> GGUF metadata: tokens, types, scores or merges, pre-tokenizer, special tokens,
chat template and generation defaults.

Two kinds of Hugging Face tokenizer are written, both read from ``tokenizer.json`` (what the
fast tokenizer runs, so what the parity tests compare against):

- byte-level BPE (GPT-2 style: Llama 3, SmolLM2, Qwen2, Phi-4) -> ``tokenizer.ggml.model``
  "gpt2" with merges and a ``tokenizer.ggml.pre`` naming the llama.cpp pre-tokenizer that splits
  text the same way. The pre-tokenizer is identified like llama.cpp's converter does (a
  fingerprint of how the tokenizer encodes a check text) or, for tokenizers llama.cpp has never
  fingerprinted (a retrained vocabulary), by the tokenizer.json pre-tokenizer itself; anything
  else is refused, because a wrong guess silently changes every tokenisation.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma) -> "llama" with scores
  and token types. llama.cpp merges the adjacent pair whose joined token scores highest, so a
  token's score is minus the rank of the merge that creates it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from toolchain.core.errors import PreflightError

from . import tables as tb

TT = gguf.TokenType
PROBE = "Hello world"  # encoded with and without special tokens to see what the tokenizer adds


def _refuse(what: str, fix: str) -> PreflightError:
    return PreflightError(f"tokenizer: {what} (fix: {fix})")


@dataclass
class Vocab:
    model: str
    pre: str | None
    pre_source: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special_ids: dict[str, int | None]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | list | None
    generation_defaults: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre or "default")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for role, (_, key) in tb.SPECIAL_TOKEN_KEYS.items():
            if self.special_ids.get(role) is not None:
                writer.add_uint32(key, self.special_ids[role])
        if self.special_ids.get("eot") is not None:
            writer.add_uint32(tb.EOT_KEY, self.special_ids["eot"])
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)
        for name, value in self.generation_defaults.items():
            key, kind = tb.GENERATION_DEFAULT_KEYS[name]
            (writer.add_int32 if kind is int else writer.add_float32)(key, value)

    def summary(self) -> dict:
        template = self.chat_template if isinstance(self.chat_template, str) else json.dumps(self.chat_template)
        return {"model": self.model, "pre": self.pre, "pre_source": self.pre_source, "size": len(self.tokens),
                "special_ids": dict(self.special_ids), "add_bos": self.add_bos, "add_eos": self.add_eos,
                "add_space_prefix": self.add_space_prefix,
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if self.chat_template else None,
                "generation_defaults": dict(self.generation_defaults), "warnings": list(self.warnings)}


def read_vocab(model_dir: str | Path, vocab_size: int) -> Vocab:
    """The GGUF tokenizer metadata for ``model_dir``, padded to the embedding's ``vocab_size`` rows."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        spm = (model_dir / "tokenizer.model").is_file()
        raise _refuse(f"{path} not found" + (" (only a SentencePiece tokenizer.model is present)" if spm else ""),
                      "load the tokenizer with transformers' AutoTokenizer and save_pretrained it next to the "
                      "model, which writes tokenizer.json")
    tj = json.loads(path.read_text(encoding="utf-8"))
    hf = _load_hf_tokenizer(model_dir)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(f"tokenizer.json model type {model.get('type')!r} is not supported by the GGUF writer; it "
                      f"writes byte-level BPE and SentencePiece-style BPE (byte fallback)",
                      "choose another export target for this model, or file an issue for this tokenizer type")
    if model.get("byte_fallback"):
        vocab = _spm_vocab(tj, vocab_size)
    elif _has_bytelevel(tj.get("pre_tokenizer")):
        vocab = _bpe_vocab(tj, hf, vocab_size)
    else:
        raise _refuse("a BPE tokenizer must be byte-level (ByteLevel pre-tokenizer) or fall back to bytes "
                      "(SentencePiece style) for llama.cpp", "file an issue for this tokenizer")
    _special_tokens(vocab, hf, model_dir)
    vocab.chat_template = _chat_template(hf, model_dir)
    vocab.generation_defaults = _generation_defaults(model_dir)
    return vocab


def _load_hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
        raise _refuse(f"transformers cannot load the tokenizer in {model_dir}: {exc}",
                      "save the tokenizer with save_pretrained next to the model") from exc


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    return list(node.get("pretokenizers") or node.get("normalizers") or []) if node.get("type") == "Sequence" \
        else [node]


def _has_bytelevel(pre_tokenizer: dict | None) -> bool:
    return any(s.get("type") == "ByteLevel" for s in _steps(pre_tokenizer))


def _table(tj: dict, vocab_size: int) -> tuple[dict[int, str], dict[int, dict]]:
    """(id -> token text, id -> added-token record), checked against the embedding size."""
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    top = max(by_id) + 1 if by_id else 0
    if top > vocab_size:
        raise _refuse(f"the tokenizer has token ids up to {top - 1} but the model's embedding has {vocab_size} rows",
                      "resize the model's embeddings to the tokenizer (model.resize_token_embeddings) before export")
    return by_id, added


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def _added_type(record: dict) -> int:
    return TT.CONTROL if record.get("special") or _looks_special(record["content"]) else TT.USER_DEFINED


def _merges(model: dict) -> list[tuple[str, str]]:
    out = []
    for m in model.get("merges") or []:
        left, right = m if isinstance(m, (list, tuple)) else m.split(" ", 1)
        out.append((left, right))
    return out


# --- byte-level BPE ------------------------------------------------------------------------------

def _bpe_vocab(tj: dict, hf, vocab_size: int) -> Vocab:
    by_id, added = _table(tj, vocab_size)
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [int(TT.UNUSED)] * vocab_size
    for i, text in by_id.items():
        tokens[i] = text
        types[i] = int(_added_type(added[i]) if i in added else TT.NORMAL)
    warnings: list[str] = []
    normalizers = [s.get("type") for s in _steps(tj.get("normalizer"))]
    if set(normalizers) - tb.TOLERATED_BPE_NORMALIZERS:
        raise _refuse(f"normalizer {normalizers} is not applied by llama.cpp's BPE tokenizer",
                      "export a tokenizer without a normalizer, or file an issue")
    if normalizers:
        warnings.append(f"normalizer {normalizers} is not applied by llama.cpp: text that is not already in that "
                        f"form may tokenise differently")
    pre, source = _detect_pre(tj, hf, warnings)
    ignores = bool(tj["model"].get("ignore_merges"))
    if ignores != (pre in tb.PRE_TOKENIZERS_IGNORING_MERGES):
        warnings.append(f"tokenizer.json has ignore_merges={ignores} but llama.cpp's {pre!r} pre-tokenizer "
                        f"{'ignores' if not ignores else 'applies'} merges for whole-word tokens")
    merges = [f"{a} {b}" for a, b in _merges(tj["model"])]
    return Vocab(tb.TOKENIZER_MODEL_BPE, pre, source, tokens, types, None, merges, {}, False, False, False, None,
                 warnings=warnings)


def pre_tokenizer_signature(pre_tokenizer: dict | None) -> tuple | None:
    """A tokenizer.json pre-tokenizer reduced to the steps that decide where text splits."""
    sig = []
    for step in _steps(pre_tokenizer):
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                return None  # llama.cpp never prefixes a space for BPE
            sig.append(("bytelevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            sig.append(("digits", bool(step.get("individual_digits"))))
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            if step.get("behavior") != "Isolated" or step.get("invert") or "Regex" not in pattern:
                return None
            sig.append(("split", pattern["Regex"]))
        else:
            return None
    return tuple(sig)


def _detect_pre(tj: dict, hf, warnings: list[str]) -> tuple[str, str]:
    ids = hf.encode(tb.PRE_TOKENIZER_CHECK_TEXT)
    fingerprint = hashlib.sha256(str(ids).encode()).hexdigest()
    by_hash = tb.PRE_TOKENIZER_HASHES.get(fingerprint)
    by_structure = tb.PRE_TOKENIZER_SIGNATURES.get(pre_tokenizer_signature(tj.get("pre_tokenizer")))
    if by_hash and by_structure and by_hash != by_structure:
        warnings.append(f"pre-tokenizer fingerprint says {by_hash!r}, tokenizer.json's pre_tokenizer looks like "
                        f"{by_structure!r}; using the fingerprint, as llama.cpp's converter does")
    if by_hash:
        return by_hash, "fingerprint"
    if by_structure:
        return by_structure, "tokenizer.json pre_tokenizer"
    known = sorted(set(tb.PRE_TOKENIZER_SIGNATURES.values()) | set(tb.PRE_TOKENIZER_HASHES.values()))
    raise _refuse(f"the BPE pre-tokenizer is not one llama.cpp implements that this writer can identify "
                  f"(fingerprint {fingerprint[:16]}..., pre_tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}); "
                  f"known: {', '.join(known)}",
                  "use a tokenizer with one of these pre-tokenizers, or file an issue with the tokenizer.json")


# --- SentencePiece-style BPE ---------------------------------------------------------------------

def _spm_vocab(tj: dict, vocab_size: int) -> Vocab:
    by_id, added = _table(tj, vocab_size)
    model = tj["model"]
    merges = _merges(model)
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [int(TT.UNUSED)] * vocab_size
    scores = [0.0] * vocab_size
    byte_token = re.compile(tb.SPM_BYTE_TOKEN)
    for i, text in by_id.items():
        if i in added:
            kind = _added_type(added[i])
            if kind == TT.USER_DEFINED and added[i].get("normalized"):
                text = text.replace(tb.SPM_SPACE, " ")  # matched against raw text in llama.cpp
        elif byte_token.fullmatch(text):
            kind = TT.BYTE
        else:
            kind = TT.NORMAL
            scores[i] = -float(rank[text]) if text in rank else -float(len(merges) + i)
        if text == model.get("unk_token"):
            kind = TT.UNKNOWN
        tokens[i], types[i] = text, int(kind)
    add_prefix, warnings = _spm_space_prefix(tj)
    return Vocab(tb.TOKENIZER_MODEL_SPM, None, None, tokens, types, scores, None, {}, False, False, add_prefix, None,
                 warnings=warnings)


def _spm_space_prefix(tj: dict) -> tuple[bool, list[str]]:
    """Whether llama.cpp must prefix a space (SentencePiece add_dummy_prefix); refuses other setups."""
    warnings: list[str] = []
    replaces_spaces = prepends = False
    for step in _steps(tj.get("normalizer")):
        kind = step.get("type")
        if kind == "Replace" and (step.get("pattern") or {}).get("String") == " " and step.get("content") == tb.SPM_SPACE:
            replaces_spaces = True
        elif kind == "Prepend" and step.get("prepend") == tb.SPM_SPACE:
            prepends = True
        else:
            raise _refuse(f"SentencePiece-style normalizer step {kind!r} is not reproduced by llama.cpp",
                          "file an issue with the tokenizer.json")
    for step in _steps(tj.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement", tb.SPM_SPACE) == tb.SPM_SPACE:
            replaces_spaces = True
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            prepends = prepends or scheme in ("always", "first")
            if scheme == "first":
                warnings.append("Metaspace prepend_scheme 'first' prefixes a space only at the start of the text; "
                                "llama.cpp also prefixes one after every special token")
            if step.get("split"):
                warnings.append("Metaspace split=true splits words before BPE; llama.cpp does not, which only "
                                "matters for tokens that join words")
        elif kind == "Split" and (step.get("pattern") or {}).get("String") == " " and replaces_spaces:
            continue  # splits on a space that the normalizer has already replaced: a no-op
        else:
            raise _refuse(f"SentencePiece-style pre-tokenizer step {kind!r} is not reproduced by llama.cpp",
                          "file an issue with the tokenizer.json")
    if not replaces_spaces:
        raise _refuse("a SentencePiece-style tokenizer must turn spaces into '\u2581' (Replace normalizer or "
                      "Metaspace pre-tokenizer)", "file an issue with the tokenizer.json")
    return prepends, warnings


# --- special tokens, template, generation defaults -----------------------------------------------

def _special_tokens(vocab: Vocab, hf, model_dir: Path) -> None:
    ids = {role: getattr(hf, attr, None) for role, (attr, _) in tb.SPECIAL_TOKEN_KEYS.items()}
    gen = _read_json(model_dir / "generation_config.json")
    config = _read_json(model_dir / "config.json")
    for role in ("bos", "eos"):
        # llama.cpp falls back to GPT-2's ids (11) or Llama's (1, 2) for a missing BOS/EOS key:
        # take the model's own from its configs, as llama.cpp's converter does
        if ids[role] is None:
            candidates = [c.get(f"{role}_token_id") for c in (gen, config, config.get("text_config") or {})]
            found = next((c for c in candidates if c is not None), None)
            ids[role] = found[0] if isinstance(found, list) and found else found
            if ids[role] is not None:
                vocab.warnings.append(f"the tokenizer names no {role.upper()} token; using id {ids[role]} "
                                      f"from the model config")
    if ids["eos"] is None:
        raise _refuse("neither the tokenizer nor the model config names an EOS token, so llama.cpp would not "
                      "know when generation ends", "set eos_token on the tokenizer and save it again")
    if ids["bos"] is None:
        ids["bos"] = ids["eos"]  # never added (add_bos is false); keeps llama.cpp off its default id
        vocab.warnings.append("no BOS token: recorded the EOS id so that llama.cpp does not assume a default one")
    index = {text: i for i, text in enumerate(vocab.tokens)}
    eot = next((index[t] for t in tb.EOT_TOKEN_TEXTS if t in index), None)
    gen_eos = gen.get("eos_token_id")
    if eot is None and isinstance(gen_eos, list):
        eot = next((i for i in gen_eos if i != ids["eos"]), None)
    ids["eot"] = eot
    for role, i in ids.items():
        if i is not None and not 0 <= i < len(vocab.tokens):
            raise _refuse(f"{role} token id {i} is outside the vocabulary of {len(vocab.tokens)}",
                          "fix the tokenizer's special tokens")
    vocab.special_ids = ids
    plain = hf.encode(PROBE, add_special_tokens=False)
    full = hf.encode(PROBE)
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    vocab.add_bos = ids["bos"] is not None and start == 1 and full[0] == ids["bos"]
    tail = full[start + len(plain):]
    vocab.add_eos = ids["eos"] is not None and tail == [ids["eos"]]
    if full != ([ids["bos"]] if vocab.add_bos else []) + plain + ([ids["eos"]] if vocab.add_eos else []):
        vocab.warnings.append(f"the tokenizer adds special tokens other than BOS/EOS ({full} for {plain}); "
                              f"llama.cpp adds only BOS/EOS")


def _chat_template(hf, model_dir: Path):
    template = getattr(hf, "chat_template", None)
    if template is None:
        template = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, dict):  # several named templates
        template = [{"name": k, "template": v} for k, v in template.items()]
    return template


def _generation_defaults(model_dir: Path) -> dict:
    gen = _read_json(model_dir / "generation_config.json")
    if gen.get("do_sample") is False:
        return {}  # greedy: sampling settings in the file are not defaults the model ships with
    return {name: kind(gen[name]) for name, (_, kind) in tb.GENERATION_DEFAULT_KEYS.items()
            if gen.get(name) is not None}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
