"""The judge prompt of the paper's Table 2 and the parsing of a judge's answer into "A", "B" or None."""
from __future__ import annotations

import re

#: The judge prompt of the paper's Table 2 (appendix C), placeholders as
#: ``str.format`` fields (docs/method.md quotes the table). The paper wraps the
#: prose at its page's columns, so the wraps are typesetting and each instruction
#: paragraph is one line here (as in DPO's original prompt); "Response B:
#: <Response B>" sits on one line in the table, so it does here too.
JUDGE_PROMPT = (
    "For the following dialogue history to a chatbot, which response is more helpful?\n"
    "Dialogue history:\n"
    "{history}\n"
    "Response A:\n"
    "{response_a}\n"
    "Response B: {response_b}\n"
    'FIRST provide a one-sentence comparison of the two responses and explain which you '
    'feel is more helpful. SECOND, on a new line, state only "A" or "B" to indicate which '
    "response is more helpful. Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    'More helpful: <"A" or "B">'
)


def format_judge_prompt(history: str, response_a: str, response_b: str) -> str:
    """Fill ``JUDGE_PROMPT`` (paper Table 2) with a dialogue history and two responses.

    Surrounding whitespace of each field is stripped (HH prompts start with
    "\\n\\nHuman:"; sampled responses often start with a space). Braces inside the
    fields are safe: only the template is parsed by ``str.format``.
    """
    return JUDGE_PROMPT.format(
        history=history.strip(), response_a=response_a.strip(), response_b=response_b.strip()
    )


# Markdown emphasis/heading/quote characters removed before matching a line, so
# "**More helpful:** A", "### More helpful: A" and "> More helpful: `A`" all match.
_MARKDOWN_CHARS = re.compile(r"[*_`#>~]")
_LABEL_LINE = re.compile(r"^\s*(?:[-\u2022]\s*)?more\s+helpful(?:\s+response)?\s*[:\uff1a=\-\u2013\u2014]?\s*(.*)$", re.I)
# Characters that may wrap the letter: quotes (straight and curly), brackets, final punctuation.
_WRAPPERS = " \t\"'\u201c\u201d\u2018\u2019()[]{}<>.,;:!"
_LETTER = re.compile(r"^(?:response\s+)?([ab])$", re.I)
_INLINE_LABEL = re.compile(
    r"\bmore\s+helpful\s*:\s*[\"'\u201c\u2018(\[]?\s*(?:response\s+)?([ab])\s*[\"'\u201d\u2019)\]]?\s*\.?\s*$", re.I
)
_ANY_LABEL = re.compile(r"\bmore\s+helpful\s*:\s*[\"'\u201c\u2018(\[]?\s*(?:response\s+)?([ab])\b", re.I)


def _letter(value: str) -> str | None:
    """The verdict letter if ``value`` is exactly one (optionally "Response X", wrapped)."""
    m = _LETTER.match(value.strip(_WRAPPERS))
    return m.group(1).upper() if m else None


def parse_verdict(text: str | None) -> str | None:
    """Parse a judge answer in the Table 2 format into "A", "B" or None.

    Accepted: a line ``More helpful: A`` (case-insensitive label; optional markdown
    such as ``**More helpful:** A``; the letter optionally quoted, bracketed, followed
    by a full stop, or written "Response A"). If no line starts with the label, a
    label that ends a line ("Comparison: ... clearer. More helpful: B") is accepted;
    failing that, an answer whose last non-empty line is only the letter: the
    prompt's "on a new line, state only A or B" without the label (and what
    ``HFJudge`` returns).

    Returns None (never a guess) when: nothing matches; the labelled value is not a
    single letter ("A or B", "Both", "C", "A, because ..."); or several labelled lines
    disagree.
    """
    if not text:
        return None
    lines = [_MARKDOWN_CHARS.sub("", line) for line in text.splitlines()]
    labelled = set()
    n_labels = 0
    for line in lines:
        m = _LABEL_LINE.match(line)
        if m:
            n_labels += 1
            labelled.add(_letter(m.group(1)))
    if n_labels:
        # A labelled line that does not parse, or two that disagree, makes the
        # answer ambiguous: do not fall back to other heuristics.
        return labelled.pop() if len(labelled) == 1 else None
    # The label run into the comparison line ("... clearer. More helpful: B"): only
    # when it ends the line, so "Response A is more helpful: it ..." is not read.
    final = {m.group(1).upper() for line in lines for m in [_INLINE_LABEL.search(line)] if m}
    if final:
        # Any other "more helpful: X" in the text must agree.
        anywhere = {m.group(1).upper() for line in lines for m in _ANY_LABEL.finditer(line)}
        letters = final | anywhere
        return letters.pop() if len(letters) == 1 else None
    non_empty = [line for line in lines if line.strip()]
    return _letter(non_empty[-1]) if non_empty else None

