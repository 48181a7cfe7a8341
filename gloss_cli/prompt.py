"""The GLoSS prompt, verbatim (trailing spaces included: they change the tokens the model sees)."""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_TEMPLATE = (
    "Below is a customer's purchase history on Amazon, listed in chronological order (earliest to latest). \n"
    "Each item is represented by the following format: Title: <item title> \n"
    "Based on this history, predict **only one** item the customer is most likely to purchase next "
    "in the same format.\n"
    "\n"
    "### Purchase history:\n"
    "{history}\n"
    "\n"
    "### Next item:\n"
)


def item_text(title: str) -> str:
    """How an item appears in prompts, targets and the retrieval catalog."""
    return f"Title: {title}"


def build_prompt(history_titles: Sequence[str]) -> str:
    """The prompt for a history given oldest first."""
    return PROMPT_TEMPLATE.format(history="\n".join(item_text(t) for t in history_titles))
