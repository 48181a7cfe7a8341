"""The GLoSS prompt, verbatim (trailing spaces included: they change the tokens the model sees), and the pick
task's prompt beside it (a history, then a lettered candidate pool)."""

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


# `gloss train --task pick` (gloss_cli.pick): the same history, then the candidate pool labelled with letters in the
# pool's own order, and the answer is the next item's letter (LlamaRec's verbalizer; Yue et al. 2023)
LETTERS = "ABCDEFGHIJKLMNOPQRST"  # at most 20 candidates: one letter each
PICK_TEMPLATE = (
    "Below is a customer's purchase history on Amazon, listed in chronological order (earliest to latest). \n"
    "Each item is represented by the following format: Title: <item title> \n"
    "Based on this history, pick the candidate the customer is most likely to purchase next; "
    "answer with its letter only.\n"
    "\n"
    "### Purchase history:\n"
    "{history}\n"
    "\n"
    "### Candidates:\n"
    "{candidates}\n"
    "\n"
    "### Answer:\n"
)


def build_pick_prompt(history_titles: Sequence[str], candidate_titles: Sequence[str]) -> str:
    """The pick prompt for a history (oldest first) and a pool (at most len(LETTERS) titles, best first)."""
    lines = (f"{letter}. {item_text(t)}" for letter, t in zip(LETTERS, candidate_titles, strict=False))
    return PICK_TEMPLATE.format(history="\n".join(item_text(t) for t in history_titles), candidates="\n".join(lines))
