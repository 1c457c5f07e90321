"""The one place a prompt becomes token ids: decoding, teacher data, traces and draft distillation
all call these, so a draft is trained on exactly the format it drafts in.

With a chat template (and ``use_chat_template``): the user turn rendered with the generation
prompt, tokenized without adding special tokens again (the template writes them). Without one:
the tokenizer's plain encoding of the prompt (its BOS when it adds one), as ``tokenizer(prompt)``
in Hugging Face ``generate`` examples; the answer then continues the prompt directly.
"""

from __future__ import annotations

__all__ = ["prompt_ids", "exchange_ids", "uses_chat_template"]


def uses_chat_template(tokenizer, use_chat_template: bool = True) -> bool:
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def _user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of ``prompt`` as the model sees it before answering."""
    if uses_chat_template(tokenizer, use_chat_template):
        text = tokenizer.apply_chat_template(_user(prompt), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt).input_ids)


def exchange_ids(tokenizer, prompt: str, answer: str, use_chat_template: bool = True) -> tuple[list[int], int]:
    """(ids of prompt + answer, index of the first answer token). The prompt part is exactly
    ``prompt_ids`` (tokenized apart, so the boundary is exact); the answer part is what the template
    writes after the generation prompt (its end-of-turn included), else the answer and EOS."""
    head = prompt_ids(tokenizer, prompt, use_chat_template)
    if uses_chat_template(tokenizer, use_chat_template):
        start = tokenizer.apply_chat_template(_user(prompt), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(_user(prompt) + [{"role": "assistant", "content": answer}], tokenize=False)
        tail = full[len(start):] if full.startswith(start) else answer
    else:
        tail = answer + (tokenizer.eos_token or "")
    return head + list(tokenizer(tail, add_special_tokens=False).input_ids), len(head)
