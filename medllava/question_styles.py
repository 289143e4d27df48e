"""Question prompt styles, shared by fine-tuning heads and evaluation so a head is asked at test
time exactly as it was taught.

- `plain`: the question as it is.
- `short`: LLaVA-1.5's VQA suffix, "Answer the question using a single word or phrase."
- `llava-med`: LLaVA-Med's closed-question form, the question followed by "Please choose from the
  following two options: [yes, no]" (or the task's own closed options); open questions unchanged.
"""

from __future__ import annotations

PROMPT_STYLES = ("plain", "short", "llava-med")
SHORT_SUFFIX = "Answer the question using a single word or phrase."
YES_NO = ("yes", "no")


def closed_options_suffix(options: tuple[str, ...] | list[str]) -> str:
    """LLaVA-Med's closed-question instruction for `options`."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    count = words[len(options)] if len(options) < len(words) else str(len(options))
    return f"Please choose from the following {count} options: [{', '.join(options)}]"


def format_question(question: str, style: str, answer_type: str = "open", options: tuple[str, ...] = YES_NO) -> str:
    """The human-turn text for `question` in `style` (without the `<image>` placeholder).

    `answer_type` is "open" or "closed"; `options` are the closed candidates (yes/no by default).
    """
    question = question.strip()
    if style == "plain":
        return question
    if style == "short":
        return f"{question}\n{SHORT_SUFFIX}"
    if style == "llava-med":
        return f"{question}\n{closed_options_suffix(options)}" if answer_type == "closed" else question
    raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")
