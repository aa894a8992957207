"""WebLLM's ``conv_template``, derived from a model's Hugging Face chat template.

mlc-llm ships hand-written conversation templates; @mlc-ai/web-llm 0.2.86 reads one from
``mlc-chat-config.json`` and builds the prompt itself, without Jinja:

    prefix ids   system_prefix_token_ids (token ids, e.g. a BOS token, prepended once)
    system       system_template with {system_message} replaced (left out when the message is ""
                 and render_empty_system_message is false)
    message i    roles[role] + role_content_sep + role_templates[role](content) + seps[i % len(seps)]
                 (no role prefix on message 0 after a system prompt when add_role_after_system_message
                 is false)
    reply header roles["assistant"] + role_empty_sep

A fine-tuned model only knows the chat format of its HF template, so edgesmith does not pick a
named mlc-llm template: it renders the HF template on probe conversations whose contents are
marker strings, cuts the text at the markers into prefixes, suffixes and separators, and then
checks the result by rendering ordinary conversations both ways. A template whose text cannot be
written in this form (content-dependent logic, a system message folded into the first user turn,
...) is refused with a PreflightError; the recipe can then give ``conv_template`` explicitly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from toolchain.core.errors import PreflightError

log = logging.getLogger(__name__)

# web-llm's placeholders (MessagePlaceholders in its config.ts; the same strings in mlc-llm)
PLACEHOLDER = {"system": "{system_message}", "user": "{user_message}", "assistant": "{assistant_message}",
               "tool": "{tool_message}", "function": "{function_string}"}
DEFAULT_ROLE_TEMPLATES = {role: PLACEHOLDER[role] for role in ("user", "assistant", "tool")}
TEMPLATE_NAME = "edgesmith_hf_chat_template"

# Probe message contents: letters only, so no template filter, tokenizer or trim changes them, and
# unlikely to occur in any template text. BOS_MARK stands in for the tokenizer's bos_token.
MARK = {"system": "qzsysmarkqz", "user1": "qzuseronemarkqz", "assistant1": "qzassistantonemarkqz",
        "user2": "qzusertwomarkqz", "tool1": "qztoolonemarkqz"}
BOS_MARK = "qzbosmarkqz"

# Ordinary conversations the derived template must reproduce exactly (roles "s", "u", "a", "t").
CHECK_TEXTS = {"s": "You are terse.", "u": ["What is 2+2?", "And 3+3?", "Thanks!"],
               "a": ["4", "6."], "t": '{"result": 4}'}
CHECK_SHAPES = ["u", "su", "uau", "suau", "uauau", "suauau"]
TOOL_SHAPES = ["uat", "suat"]
WHITESPACE_PROBE = "  padded text \n"  # a template that trims content differs from WebLLM here


def template_source(tokenizer_dir: Path) -> str:
    """The file a reader should look at for the chat template (for error messages)."""
    jinja = Path(tokenizer_dir) / "chat_template.jinja"
    return str(jinja if jinja.exists() else Path(tokenizer_dir) / "tokenizer_config.json")


def _refuse(where: str, what: str) -> PreflightError:
    return PreflightError(
        f"{where}: chat_template cannot be written as a WebLLM conv_template: {what} (fix: give conv_template "
        f"explicitly in the recipe's webllm target, in mlc-llm's schema: system_template, system_message, roles, "
        f"seps, role_content_sep, role_empty_sep, stop_str, stop_token_ids)")


# ---------------------------------------------------------------- WebLLM's prompt, mirrored for checks

def webllm_prompt(conv: dict, messages: list[dict]) -> tuple[list[int], str]:
    """(prefix token ids, prompt text) that web-llm 0.2.86 builds for ``messages`` (OpenAI-style dicts;
    an optional leading system message) followed by the assistant reply header. Used to check a derived
    template; the tests check this against web-llm's own Conversation code."""
    return list(conv.get("system_prefix_token_ids") or []), "".join(webllm_prompt_parts(conv, messages))


def webllm_prompt_parts(conv: dict, messages: list[dict]) -> list[str]:
    """The prompt array of web-llm's Conversation.getPromptArray (text messages only; the empty system
    prompt left out as web-llm does), without the prefix token ids."""
    system_message = conv["system_message"]
    rest = messages
    if messages and messages[0]["role"] == "system":
        system_message, rest = messages[0]["content"], messages[1:]
    if system_message == "" and conv.get("render_empty_system_message") is False:
        system_prompt = ""
    else:
        system_prompt = conv["system_template"].replace(PLACEHOLDER["system"], system_message)
    parts = [system_prompt] if system_prompt else []
    seps = conv["seps"]
    templates = conv.get("role_templates") or {}
    for i, msg in enumerate(rest):
        role = msg["role"]
        text = templates.get(role)
        text = msg["content"] if text is None else text.replace(PLACEHOLDER[role], msg["content"])
        text = text.replace(PLACEHOLDER["function"], "")
        omit_role = conv.get("add_role_after_system_message") is False and system_prompt != "" and i == 0
        prefix = "" if omit_role else conv["roles"][role] + conv.get("role_content_sep", "")
        parts.append(prefix + text + seps[i % len(seps)])
    parts.append(conv["roles"]["assistant"] + conv.get("role_empty_sep", ""))
    return parts


# ---------------------------------------------------------------- derivation

class _Renderer:
    """Renders the HF chat template, with the BOS token replaced by a marker so it can be told apart
    from template text that happens to equal it (SmolLM2's bos_token is "<|im_start|>")."""

    def __init__(self, tokenizer, where: str):
        self.tok, self.where = tokenizer, where
        self.has_bos = tokenizer.bos_token is not None

    def __call__(self, messages: list[dict], generation: bool, *, marked: bool = True) -> str:
        extra = {"bos_token": BOS_MARK} if marked and self.has_bos else {}
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **extra)
        except Exception as exc:  # noqa: BLE001 - a template may raise anything (raise_exception, TypeError, ...)
            roles = "/".join(m["role"] for m in messages)
            raise _refuse(self.where, f"rendering a {roles} conversation failed: {type(exc).__name__}: {exc}") from None
        return text


def _cut(text: str, marker: str, where: str, label: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise _refuse(where, f"the {label} text does not appear exactly once, verbatim, in the rendered prompt "
                             f"(content-dependent logic such as filters or conditions on the text); rendered: {text!r}")
    before, after = text.split(marker)
    return before, after


def _strip_prefix(text: str, prefix: str, where: str, what: str) -> str:
    if not text.startswith(prefix):
        raise _refuse(where, f"{what}: expected text starting with {prefix!r}, got {text!r}")
    return text[len(prefix):]


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:] if n else ""


def _msg(role: str, key: str) -> dict:
    return {"role": role, "content": MARK[key]}


def _split_roles(user_prefix: str, assistant_prefix: str, header: str, where: str) -> tuple[str, str, str, str]:
    """Split the two role prefixes into roles + role_content_sep, and the reply header into
    roles["assistant"] + role_empty_sep; the longest shared tail that allows it is the separator."""
    shared = _common_suffix(user_prefix, assistant_prefix)
    for n in range(len(shared), -1, -1):
        sep = shared[len(shared) - n:] if n else ""
        assistant = assistant_prefix[:len(assistant_prefix) - n]
        if header.startswith(assistant):
            return user_prefix[:len(user_prefix) - n], assistant, sep, header[len(assistant):]
    raise _refuse(where, f"the reply header {header!r} (add_generation_prompt) does not start with the assistant "
                         f"turn's role text {assistant_prefix!r}")


def _structure(render: _Renderer, where: str) -> dict:
    """Prefixes, suffixes and the system block, cut from marker renders (BOS still as BOS_MARK)."""
    u1, a1, u2 = _msg("user", "user1"), _msg("assistant", "assistant1"), _msg("user", "user2")
    s = _msg("system", "system")
    before_u, user_end = _cut(render([u1], False), MARK["user1"], where, "user message")
    before, rest = _cut(render([u1], True), MARK["user1"], where, "user message")
    if before != before_u:
        raise _refuse(where, "the text before the first user message changes with add_generation_prompt")
    header = _strip_prefix(rest, user_end, where, "text after a user message with add_generation_prompt")
    if header == "":
        raise _refuse(where, "add_generation_prompt adds no assistant header")

    before, rest = _cut(render([u1, a1], False), MARK["user1"], where, "user message")
    mid, assistant_end = _cut(rest, MARK["assistant1"], where, "assistant message")
    assistant_prefix = _strip_prefix(mid, user_end, where, "text between a user and an assistant message")

    text = render([u1, a1, u2], True)
    before3, rest = _cut(text, MARK["user1"], where, "first user message")
    mid, rest = _cut(rest, MARK["assistant1"], where, "assistant message")
    between, tail = _cut(rest, MARK["user2"], where, "second user message")
    if before3 != before_u or mid != user_end + assistant_prefix or tail != user_end + header:
        raise _refuse(where, f"a user/assistant/user conversation is not rendered turn by turn: {text!r}")
    user_prefix = _strip_prefix(between, assistant_end, where, "text between an assistant and a user message")
    if not before_u.endswith(user_prefix):
        raise _refuse(where, f"the first user turn starts differently ({before_u!r}) from later ones ({user_prefix!r})")
    default_block = before_u[:len(before_u) - len(user_prefix)]

    text = render([s, u1], True)
    sys_before, rest = _cut(text, MARK["system"], where, "system message")
    sys_mid, tail = _cut(rest, MARK["user1"], where, "user message after a system message")
    if tail != user_end + header:
        raise _refuse(where, f"a system message changes how the user turn ends: {text!r}")
    role_after_system = sys_mid.endswith(user_prefix)
    sys_after = sys_mid[:len(sys_mid) - len(user_prefix)] if role_after_system else sys_mid
    return {"user_prefix": user_prefix, "assistant_prefix": assistant_prefix, "user_end": user_end,
            "assistant_end": assistant_end, "header": header, "default_block": default_block,
            "sys_before": sys_before, "sys_after": sys_after, "role_after_system": role_after_system}


def _leading_bos(parts: dict, tokenizer, where: str) -> list[int] | None:
    """A BOS token the template writes at the very start becomes system_prefix_token_ids (as in mlc-llm's
    llama-3 template); anywhere else it stays text."""
    starts = (parts["sys_before"].startswith(BOS_MARK), parts["default_block"].startswith(BOS_MARK))
    prefix = None
    if any(starts):
        if not all(starts):
            raise _refuse(where, "the BOS token starts the prompt only with (or only without) a system message")
        prefix = [tokenizer.bos_token_id]
        for key in ("sys_before", "default_block"):
            parts[key] = parts[key][len(BOS_MARK):]
    for key, value in parts.items():
        if isinstance(value, str):
            parts[key] = value.replace(BOS_MARK, tokenizer.bos_token or "")
    return prefix


def _stop_tokens(tokenizer_dir: Path, tokenizer, turn_end: str) -> tuple[list[str], list[int]]:
    """Stop on the special tokens that end an assistant turn and on the model's EOS ids."""
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", True)}
    ids = [i for i in tokenizer(turn_end, add_special_tokens=False)["input_ids"] if i in added]
    for name in ("generation_config.json", "config.json"):
        path = Path(tokenizer_dir) / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    stop_ids = list(dict.fromkeys(int(i) for i in ids))
    stop_str = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids if i in added]
    if not stop_str and turn_end.strip():
        stop_str = [turn_end.strip()]
    return stop_str, stop_ids


def _tool_role(render: _Renderer, conv: dict, parts: dict, where: str) -> tuple[str, str] | None:
    """(roles["tool"], role_templates["tool"]) when the template renders a tool message as a plain turn."""
    u1, a1, t1 = _msg("user", "user1"), _msg("assistant", "assistant1"), _msg("tool", "tool1")
    try:
        text = render([u1, a1, t1], True).replace(BOS_MARK, render.tok.bos_token or "")
        _, rest = _cut(text, MARK["assistant1"], where, "assistant message")
        before, after = _cut(rest, MARK["tool1"], where, "tool message")
    except PreflightError:
        return None
    if not before.startswith(parts["assistant_end"]) or not after.endswith(parts["header"]):
        return None
    head = before[len(parts["assistant_end"]):]
    tail = after[:len(after) - len(parts["header"])]
    sep = conv["seps"][2 % len(conv["seps"])]  # the tool message sits at index 2 in the probe
    if not tail.endswith(sep):
        return None
    content_sep = conv["role_content_sep"]
    cut = head.find(content_sep) if content_sep else len(head)
    if cut < 0:
        return None
    role = head[:cut]
    template = head[cut + len(content_sep):] + PLACEHOLDER["tool"] + tail[:len(tail) - len(sep)]
    return role, template


def _conversation(shape: str) -> list[dict]:
    names = {"s": "system", "u": "user", "a": "assistant", "t": "tool"}
    count = {"u": 0, "a": 0}
    out = []
    for c in shape:
        if c in count:
            out.append({"role": names[c], "content": CHECK_TEXTS[c][count[c]]})
            count[c] += 1
        else:
            out.append({"role": names[c], "content": CHECK_TEXTS[c]})
    return out


def _matches(conv: dict, tokenizer, render: _Renderer, messages: list[dict]) -> tuple[bool, str, str]:
    ids, text = webllm_prompt(conv, messages)
    ours = "".join(tokenizer.convert_ids_to_tokens(ids)) + text
    theirs = render(messages, True, marked=False)
    return ours == theirs, ours, theirs


def _warn_on_token_seams(conv: dict, tokenizer, where: str) -> None:
    """web-llm encodes each part of the prompt (system block, each message, reply header) on its own; warn
    when that gives other ids than encoding the whole prompt, as transformers does."""
    for shape in CHECK_SHAPES:
        messages = _conversation(shape)
        ids, _ = webllm_prompt(conv, messages)
        parts = webllm_prompt_parts(conv, messages)
        joined = list(ids) + [i for part in parts for i in tokenizer(part, add_special_tokens=False)["input_ids"]]
        whole = list(ids) + tokenizer("".join(parts), add_special_tokens=False)["input_ids"]
        if joined != whole:
            log.warning("%s: WebLLM tokenizes the %r prompt differently from transformers (it encodes each message "
                        "on its own and a token spans a message boundary)", where, shape)
            return


def derive_conv_template(tokenizer_dir: Path) -> dict:
    """The ``conv_template`` object of mlc-chat-config.json (mlc-llm's schema, read by web-llm 0.2.86)
    for the chat template of the tokenizer saved in ``tokenizer_dir``; PreflightError when the template
    cannot be expressed in that schema."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    where = template_source(tokenizer_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # noqa: BLE001
        raise PreflightError(f"{tokenizer_dir}: the tokenizer cannot be loaded by transformers: {exc} "
                             f"(fix: save the tokenizer with save_pretrained)") from None
    if not getattr(tok, "chat_template", None):
        raise PreflightError(f"{where}: chat_template: missing; WebLLM needs a conversation template (fix: add a "
                             f"chat_template to the tokenizer, or give conv_template explicitly in the recipe)")
    if isinstance(tok.chat_template, dict):
        raise _refuse(where, f"several named templates {sorted(tok.chat_template)}; only one can be used")
    render = _Renderer(tok, where)
    parts = _structure(render, where)
    prefix_ids = _leading_bos(parts, tok, where)
    user_role, assistant_role, content_sep, empty_sep = _split_roles(
        parts["user_prefix"], parts["assistant_prefix"], parts["header"], where)
    system_template = parts["sys_before"] + PLACEHOLDER["system"] + parts["sys_after"]
    block = parts["default_block"]
    if block == "":
        system_message, render_empty = "", False
    elif (block.startswith(parts["sys_before"]) and block.endswith(parts["sys_after"])
          and len(block) >= len(parts["sys_before"]) + len(parts["sys_after"])):
        system_message = block[len(parts["sys_before"]):len(block) - len(parts["sys_after"])]
        render_empty = None
    else:
        raise _refuse(where, f"the text written when there is no system message ({block!r}) is not the system "
                             f"format {system_template!r}")
    seps = list(dict.fromkeys([parts["user_end"], parts["assistant_end"]]))  # one sep when both turns end alike
    stop_str, stop_ids = _stop_tokens(tokenizer_dir, tok, parts["assistant_end"])
    conv = {
        "name": TEMPLATE_NAME,
        "system_template": system_template,
        "system_message": system_message,
        "system_prefix_token_ids": prefix_ids,
        "add_role_after_system_message": parts["role_after_system"],
        "roles": {"user": user_role, "assistant": assistant_role},
        "role_templates": dict(DEFAULT_ROLE_TEMPLATES),
        "messages": [],
        "seps": seps,
        "role_content_sep": content_sep,
        "role_empty_sep": empty_sep,
        "stop_str": stop_str,
        "stop_token_ids": stop_ids,
        "function_string": "",
        "use_function_calling": False,
    }
    if render_empty is False:
        conv["render_empty_system_message"] = False  # web-llm: no system block when the message is ""
    for shape in CHECK_SHAPES:
        ok, ours, theirs = _matches(conv, tok, render, _conversation(shape))
        if not ok:
            raise _refuse(where, f"the derived template renders a {shape!r} conversation as {ours!r} but the chat "
                                 f"template gives {theirs!r}")
    tool = _tool_role(render, conv, parts, where)
    if tool is not None:
        trial = {**conv, "roles": {**conv["roles"], "tool": tool[0]},
                 "role_templates": {**conv["role_templates"], "tool": tool[1]}}
        if all(_matches(trial, tok, render, _conversation(shape))[0] for shape in TOOL_SHAPES):
            conv = trial
    _warn_on_token_seams(conv, tok, where)
    probe = [{"role": "user", "content": WHITESPACE_PROBE}]
    if not _matches(conv, tok, render, probe)[0]:
        log.warning("%s: the chat template changes whitespace around message text (e.g. | trim); WebLLM sends "
                    "message text unchanged, so prompts differ when a message starts or ends with whitespace", where)
    return conv
