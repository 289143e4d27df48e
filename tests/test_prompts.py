"""Prompt styles shared by heads and evaluation."""

import pytest

from medllava.question_styles import SHORT_SUFFIX, closed_options_suffix, format_question


def test_styles():
    assert format_question(" Is it normal? ", "plain") == "Is it normal?"
    assert format_question("Is it normal?", "short") == "Is it normal?\n" + SHORT_SUFFIX
    assert format_question("Is it normal?", "llava-med", "closed") == (
        "Is it normal?\nPlease choose from the following two options: [yes, no]")
    assert format_question("Where is the lesion?", "llava-med", "open") == "Where is the lesion?"
    assert closed_options_suffix(["left", "right", "both"]) == "Please choose from the following three options: [left, right, both]"
    with pytest.raises(ValueError, match="unknown prompt style"):
        format_question("q", "cot")
