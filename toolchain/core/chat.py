"""Turning normalised examples into token ids and labels, with the model's own chat template.

Chat examples are rendered as text by the tokenizer's chat template, and the whole text is
tokenised once (``add_special_tokens=False``: the template already writes BOS / turn markers).
The loss covers only the assistant replies. To find them without knowing the template, each
reply's character span is measured by rendering the conversation up to the reply with
``add_generation_prompt=True`` (where the reply starts) and including it (where it ends); the
span therefore holds the reply and the end-of-turn text the template writes after it (e.g.
``<|im_end|>``). Whitespace after the end-of-turn marker (ChatML's newline) is *not* labelled:
generation stops at the marker, so the model never produces it. Character spans become token
labels through the fast tokenizer's offset mapping.

A tokenizer without a chat template gets a plain format (``### User:`` / ``### Assistant:``)
with the EOS token after each assistant reply; ``render_prompt`` uses the same format, so
training and generation agree.
"""
from __future__ import annotations

IGNORE = -100  # label value the loss ignores (transformers' CrossEntropy ignore_index)
FALLBACK_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n",
                    "tool": "### Tool:\n"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The conversation as the model sees it: its chat template, or the plain fallback format."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    parts = [f"{FALLBACK_HEADERS[m['role']]}{m['content']}{eos if m['role'] == 'assistant' else ''}\n"
             for m in messages]
    if add_generation_prompt:
        parts.append(FALLBACK_HEADERS["assistant"])
    return "".join(parts)


def render_prompt(messages: list[dict], tokenizer) -> str:
    """The prompt that asks the model for the next assistant reply."""
    return render(messages, tokenizer, add_generation_prompt=True)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply + end-of-turn text."""
    full = render(messages, tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], tokenizer, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenizer).rstrip()
        if cursor <= len(before) and upto.startswith(before) and full.startswith(upto):
            spans.append((len(before), len(upto)))
        else:
            # The template renders earlier turns differently once later ones exist (some drop
            # reasoning, for instance): find the reply's own text in the full rendering instead.
            content = m["content"]
            start = full.find(content, cursor)
            if start < 0:
                raise ValueError(f"the chat template does not render assistant message {i} verbatim; "
                                 "cannot tell which tokens to learn")
            end = start + len(content)
            at = upto.rfind(content)
            tail = upto[at + len(content):] if at >= 0 else ""
            if tail and full.startswith(tail, end):
                end += len(tail)
            spans.append((start, end))
        cursor = spans[-1][1]
    return full, spans


def _label_spans(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of text, and labels that keep the tokens overlapping a span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [tid if any(s < b and e > a for a, b in spans) else IGNORE
                  for tid, (s, e) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    # slow tokenizers have no offsets: tokenise prompt and reply pieces separately
    ids, labels, pos = [], [], 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, learn in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if learn else [IGNORE] * len(piece_ids)
        pos = b
    return ids, labels


def tokenize_example(example: dict, tokenizer, max_length: int, train_on_prompt: bool = False) -> dict | None:
    """input_ids / labels / attention_mask for one normalised example.

    Chat examples learn the assistant replies (everything with ``train_on_prompt``); text
    examples learn every token and end with EOS. The result is cut to ``max_length`` tokens
    (keeping the start). Returns None when no labelled token is left after the cut; the
    caller counts those.
    """
    if "messages" in example:
        text, spans = assistant_spans(example["messages"], tokenizer)
        ids, labels = _label_spans(text, spans, tokenizer)
        if train_on_prompt:
            labels = list(ids)
    elif "text" in example:
        ids = list(tokenizer(example["text"])["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
    else:
        raise ValueError(f"an example must have `messages` or `text`, got keys {sorted(example)}")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def prompt_and_reference(example: dict) -> tuple[list[dict], str]:
    """For the task metric: the messages before the final assistant reply, and that reply."""
    messages = example.get("messages")
    if not messages:
        raise ValueError("only chat-like examples have a reference answer; text examples have none")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("the example has no assistant message to use as the reference")
    return messages[:last], messages[last]["content"]
