"""A small byte-level BPE tokenizer with Qwen3's special tokens, built offline.

Real runs use the Qwen3 tokenizer directory; tests and the demo use this one, because no
hub can be reached. It is trained deterministically on text generated here, splits digits
one by one (as Qwen does) and carries a Qwen-style chat template.
"""

from __future__ import annotations

import random
from pathlib import Path

from megatron_klear.errors import ConfigError

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

# Qwen3's chat template, reduced to what our data uses: role headers, <think> blocks kept as
# written inside assistant content, and the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their can has been if more when will would "
    "who so no what compute find solve evaluate simplify answer therefore so let first then next "
    "total sum product difference quotient equals remainder value number numbers result step "
    "think check multiply divide add subtract fraction fractions integer integers equation x y n "
    "def return print input int str list range len for while if else elif import sys map split "
    "read write line lines output test case cases python code function solution problem boxed frac "
    "sqrt cdot times left right begin end"
).split()
_SYMBOLS = list("0123456789+-*/=()[]{}<>.,:;!?'\"\\_^%#&|~`$@ \n\t")


def training_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic text resembling our math/code data, for BPE training."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(_WORDS))
            elif r < 0.85:
                parts.append(str(rng.randint(0, 999)))
            else:
                parts.append("".join(rng.choice(_SYMBOLS) for _ in range(rng.randint(1, 3))))
        lines.append(" ".join(parts))
    lines += ["\\boxed{" + str(i) + "}" for i in range(100)]
    return lines


def build_tokenizer(vocab_size: int, out_dir: str | Path | None = None, seed: int = 0):
    """Train the tokenizer and return a ``PreTrainedTokenizerFast``; save it if ``out_dir``.

    ``vocab_size`` is an upper bound on the number of tokens (the model's vocabulary).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_special = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    if vocab_size < 256 + n_special + 1:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for a byte-level tokenizer (need >= {256 + n_special + 1})"
        )
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),  # one token per digit
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(seed=seed), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
