"""Qwen3 chat format: token ids and the assistant-only loss mask, from one function.

The text is Qwen3's: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, with the
``<think> ... </think>`` reasoning kept inside the assistant content as written, and
``<|im_start|>assistant\\n`` as the generation prompt. The loss mask is 1 exactly on the
tokens of assistant contents and their closing ``<|im_end|>``; it is computed from the
tokenizer's character offsets over the whole rendered string, so it is exact for any fast
tokenizer (ours or a real Qwen3 one) and the ids equal tokenising the whole text at once.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant tokens (content and closing <|im_end|>)
    text: str


def validate_messages(messages) -> None:
    """Raise ValueError naming what is wrong with an OpenAI-style message list."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} content must be a string")


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The chat text and the character spans ``[start, end)`` of assistant content + <|im_end|>."""
    validate_messages(messages)
    parts, spans, pos = [], [], 0
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        body = m["content"] + IM_END
        if m["role"] == "assistant":
            spans.append((pos + len(header), pos + len(header) + len(body)))
        chunk = header + body + "\n"
        parts.append(chunk)
        pos += len(chunk)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
    """Token ids and assistant-only loss mask of a conversation.

    With ``add_generation_prompt`` (RL prompts) the text ends with the assistant header,
    ready for generation.
    """
    text, spans = render_text(messages, add_generation_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for start, end in enc["offset_mapping"]:
        mask.append(int(any(s <= start < e for s, e in spans)))
    return Rendered(list(enc["input_ids"]), mask, text)


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt conversation, ending with the assistant header (ready to generate)."""
    return render_chat(tokenizer, messages, add_generation_prompt=True).input_ids


def decode_response(tokenizer, ids: list[int]) -> str:
    """Response text for the reward functions (special tokens kept, the final end token cut)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for end in (tokenizer.eos_token, tokenizer.pad_token):
        if end and text.endswith(end):
            text = text[: -len(end)]
    return text
