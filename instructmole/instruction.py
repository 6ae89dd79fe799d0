"""Which tokens of an encoded prompt are the instruction: the text router's mask.

FLUX.2 and Qwen-Image encode a prompt with a chat LLM inside a template (a system prompt, role
markers, an empty "thinking" block, padding). The router of those families reads the instruction's
own tokens only (``routing.py``): the template is the same for every instruction, so it carries no
routing information, and padding lengths differ between hosts. Two hosts must therefore agree on
two things, and this module is where they are decided:

* the tokens: ``template.format(instruction)`` tokenized as prefix, instruction and suffix, each on
  its own (``templated_ids``). The trainer encodes exactly those ids; ComfyUI tokenizes the whole
  templated text, which gives the same ids whenever the template's edges are special tokens or
  line breaks (the templates of all three families are) -- a host checks that it does
  (``instruction_span``) and says "approximate" when not;
* the mask: true on the instruction's tokens, false on the template's and on padding.

Because the instruction's tokens come after the prefix in a causal LLM, their features do not
depend on the suffix or the padding, so the masked signal is the same however a host pads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["instruction_span", "split_template", "templated_ids"]


def split_template(template: str) -> tuple[str, str]:
    """``(prefix, suffix)`` around the one ``{}`` of a prompt template."""
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template holds exactly one '{{}}' where the instruction goes: {template!r}")
    prefix, suffix = template.split("{}")
    return prefix, suffix


def templated_ids(
    tokenize: Callable[[str], list[int]], template: str, instruction: str
) -> tuple[list[int], list[bool]]:
    """The ids of ``template.format(instruction)`` and the instruction mask (see the module's docstring).

    ``tokenize``: text -> ids without any special tokens added (BOS, EOS) and without padding."""
    prefix, suffix = split_template(template)
    head, body, tail = tokenize(prefix), tokenize(instruction), tokenize(suffix)
    return head + body + tail, [False] * len(head) + [True] * len(body) + [False] * len(tail)


def instruction_span(ids: Sequence[int], instruction: Sequence[int], prefix: Sequence[int]) -> tuple[int, int] | None:
    """Where the instruction's ids sit in a whole-text tokenization ``ids``: ``(start, length)``,
    or None when ``ids`` does not begin with ``prefix`` followed by ``instruction`` (the tokenizer
    merged across the template's edge, or the text was truncated).

    An empty instruction has the span ``(len(prefix), 0)``."""
    start, end = len(prefix), len(prefix) + len(instruction)
    if list(ids[:start]) != list(prefix) or list(ids[start:end]) != list(instruction):
        return None
    return start, len(instruction)
