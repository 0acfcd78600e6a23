"""Qwen3 chat format: token ids and the assistant-only loss mask, from one function.

The text is Qwen3's: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, with the
``<think> ... </think>`` reasoning kept inside the assistant content as written, and
``<|im_start|>assistant\\n`` as the generation prompt. The loss mask is 1 exactly on the
tokens of assistant contents and their closing ``<|im_end|>``; it is computed from the
tokenizer's character offsets over the whole rendered string, so it is exact for any fast
tokenizer (ours or a real Qwen3 one) and the ids equal tokenising the whole text at once.
A response ends at any of ``stop_token_ids`` (eos, ``<|im_end|>``, generation_config.json's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_klear.errors import ConfigError, DataError

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
        raise DataError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i} is not an object")
        if m.get("role") not in ROLES:
            raise DataError(f"message {i} has role {m.get('role')!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"message {i} content must be a string")


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
    """Response text for the reward functions (special tokens kept, the final end token cut:
    the tokenizer's eos, ``<|im_end|>`` or the pad token)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for end in (tokenizer.eos_token, IM_END, tokenizer.pad_token):
        if end and text.endswith(end):
            return text[: -len(end)]
    return text


def stop_token_ids(tokenizer, model_dir: Optional[str | Path] = None) -> list[int]:
    """The token ids that end a response, sorted: the tokenizer's eos, ``<|im_end|>`` when the
    vocabulary has it, and ``eos_token_id`` (one id or a list) of ``model_dir``'s
    ``generation_config.json`` when there is one.

    A chat-SFT model ends its turn with ``<|im_end|>``, while a base model's tokenizer (e.g.
    Qwen3-8B-Base) names ``<|endoftext|>`` as eos: generation must stop at either.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.get_vocab().get(IM_END)
    if im_end is not None:
        ids.add(int(im_end))
    path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if path is not None and path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{path}: not a JSON object ({e})") from None
        for t in eos if isinstance(eos, list) else [eos]:
            if t is not None and (isinstance(t, bool) or not isinstance(t, int)):
                raise ConfigError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
            if t is not None:
                ids.add(t)
    if not ids:
        raise ConfigError("the tokenizer has no eos token and no <|im_end|>: nothing would end a response")
    return sorted(ids)
