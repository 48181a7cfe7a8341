"""A recipe: the one description of how a user's recommendations are ranked, shared by eval, recommend, rerank, run
and experiments.

A recipe names

* ``lists``: the ranked lists a user gets, in the order they are fused (the first weighs most): ``sasrec`` (the
  item-ID model ``gloss sasrec`` trained on the train split, no retrieval), ``transitions`` (what followed the user's
  recent items in the training sequences, no retrieval), ``lis`` (the last item's title as a
  query), ``model`` (the first ``queries`` generated titles, best beam first; ``--queries FILE`` reads them from a
  file instead of ``gloss generate``'s stage);
* ``merge``: ``top1``, GLoSS's merge (each query keeps its top-1 item, duplicates keep their best retrieval score,
  sorted by score: the list may be shorter than K; ``lis`` alone keeps its top-K), or ``rrf``, reciprocal-rank
  fusion weighted by list order (list i's item at rank r adds 1 / (i + 1) / (c + r)), filled to K;
* ``seen``: history items ``kept`` (they may be recommended, as the paper's protocol has it) or ``excluded``;
* ``order``: ``retrieval`` (the merged order), or after ``gloss rerank`` the top ``candidates`` of that list
  reordered by the model's log-probability per title token (``lm``) or by the fusion of both orders (``fused``);
* ``users``: ``generated`` (the users ``gloss generate`` covered, or the queries file's: every row of a comparison
  scores the same users) or ``all`` (the split's every user; recipes without ``model`` only).

Named presets (:data:`PRESETS`) cover the rows docs/RESULTS.md reports; the explicit form is ``key=value`` words,
optionally after a preset name that they modify: ``--recipe "lists=lis,model queries=2"``, ``--recipe "paper
seen=excluded"``. An impossible combination is one line (:class:`GlossError`) before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gloss_cli.errors import GlossError
from gloss_cli.fusion import RRF_C

LISTS = ("sasrec", "transitions", "lis", "model")
RANKED = ("sasrec", "transitions")  # lists ranked by their own scores: no query, no retrieval
MERGES = ("top1", "rrf")
SEEN = ("kept", "excluded")
ORDERS = ("retrieval", "lm", "fused")
USERS = ("generated", "all")
DEFAULT = "gloss"  # eval, recommend and run's default: the pick docs/RESULTS.md reports
DEFAULT_RERANK = "rerank"  # gloss rerank's: the pools of the default recipe's list


@dataclass(frozen=True)
class Recipe:
    lists: tuple[str, ...] = ("transitions", "lis", "model")
    queries: int = 2  # the model's first N generated titles (0 when ``model`` is not in ``lists``)
    merge: str = "rrf"
    seen: str = "excluded"
    order: str = "retrieval"
    candidates: int = 20  # the pool's depth when ``order`` is lm or fused
    users: str = "generated"

    def __post_init__(self) -> None:
        check(self)
        if not self.reranked:  # the pool's depth means nothing in retrieval order: one recipe, one name
            object.__setattr__(self, "candidates", Recipe.candidates)

    @property
    def uses_model(self) -> bool:
        return "model" in self.lists

    @property
    def retrieves(self) -> bool:
        """Whether a list queries a retriever (lis, model); sasrec and transitions rank without one."""
        return any(part not in RANKED for part in self.lists)

    @property
    def exclude_seen(self) -> bool:
        return self.seen == "excluded"

    @property
    def reranked(self) -> bool:
        return self.order != "retrieval"

    def pool(self) -> Recipe:
        """The list ``gloss rerank`` scores: this recipe in retrieval order."""
        return dataclasses.replace(self, order="retrieval")

    def name(self) -> str:
        """A preset's name, else the explicit form's short path-safe name (run and stage names derive from it)."""
        for key, preset in PRESETS.items():
            if preset == self:
                return key
        lists = "+".join(f"model{self.queries}" if part == "model" else part for part in self.lists)
        name = f"{lists}-{self.merge}-{'xseen' if self.exclude_seen else 'kept'}"
        name += f"-{self.order}{self.candidates}" if self.reranked else ""
        return name + ("-allusers" if self.users == "all" else "")

    def explicit(self) -> str:
        """The explicit form, which :func:`parse` reads back to this recipe."""
        words = [f"lists={','.join(self.lists)}", f"queries={self.queries}", f"merge={self.merge}"]
        words += [f"seen={self.seen}", f"order={self.order}"]
        words += [f"candidates={self.candidates}"] if self.reranked else []
        return " ".join([*words, f"users={self.users}"])

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name(), **dataclasses.asdict(self), "lists": list(self.lists)}

    def describe(self, *, generated_label: str = "generated", users_label: str | None = None) -> str:
        """The ranking in words, for every printed metric (the caller adds split, users, ties)."""
        parts = []
        for part in self.lists:
            if part in RANKED:
                parts.append(f"the {part} list")
            elif part == "lis":
                parts.append("the last item's title")
            else:
                n = self.queries
                parts.append(f"the first {n} {generated_label} quer{'y' if n == 1 else 'ies'}")
        lists = ", then ".join(parts)
        if self.merge == "top1":
            how = (
                "top-K of the last item's title"
                if self.lists == ("lis",)
                else f"{lists}: top-1 per query, duplicates merged, sorted by score (lists may be shorter than K)"
            )
        else:
            how = f"{lists}: top-K each, fused by list-weighted reciprocal rank (c={RRF_C:g}), filled to K"
        seen = "history items excluded" if self.exclude_seen else "history items kept (may be recommended)"
        text = f"recipe {self.name()}: {how}; {seen}"
        if self.reranked:
            by = {
                "lm": "the model's log-probability per title token",
                "fused": f"reciprocal-rank fusion (c={RRF_C:g}) of that order and the model's",
            }[self.order]
            text += f"; its top {self.candidates} reordered by {by}"
        users = "the users gloss generate covered" if self.users == "generated" else "every user of the split"
        return f"{text}; {users_label or users}"


def check(recipe: Recipe) -> None:
    """One line for a combination that cannot be computed."""

    def bad(message: str, hint: str) -> GlossError:
        return GlossError(f"Recipe: {message}", hint)

    for key in ("queries", "candidates"):
        value = getattr(recipe, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{key}={value!r} is not a whole number.", f"E.g. {key}=2.")
    for key in ("merge", "seen", "order", "users"):
        if not isinstance(getattr(recipe, key), str):
            raise bad(f"{key}={getattr(recipe, key)!r} is not a word.", f"E.g. {key}={getattr(Recipe, key)}.")
    lists = recipe.lists
    if not isinstance(lists, tuple) or not all(isinstance(part, str) for part in lists):
        raise bad(f"lists={lists!r} is not a list of names.", "E.g. lists=lis,model.")
    if not lists or len(set(lists)) != len(lists) or any(part not in LISTS for part in lists):
        raise bad(f"lists={','.join(lists)} is not a list of distinct {', '.join(LISTS)}.", "E.g. lists=lis,model.")
    if list(lists) != [part for part in LISTS if part in lists]:
        raise bad(
            f"lists={','.join(lists)}: lists are fused in the order {', '.join(LISTS)}.",
            f"Write lists={','.join(part for part in LISTS if part in lists)}.",
        )
    for key, allowed in (("merge", MERGES), ("seen", SEEN), ("order", ORDERS), ("users", USERS)):
        if getattr(recipe, key) not in allowed:
            raise bad(f"{key}={getattr(recipe, key)} is unknown.", f"Use {key}= one of: {', '.join(allowed)}.")
    if recipe.uses_model and recipe.queries < 1:
        raise bad("lists has model but queries is below 1.", "Use queries=1 or more, or drop model from lists.")
    if not recipe.uses_model and recipe.queries:
        raise bad(f"queries={recipe.queries} but lists has no model.", "Add model to lists, or use queries=0.")
    for part in RANKED:
        if recipe.merge == "top1" and part in lists:
            raise bad(f"the {part} list is ranked, not a query: merge=top1 cannot take it.", "Use merge=rrf.")
    if recipe.candidates < 1:
        raise bad(f"candidates={recipe.candidates} is below 1.", "Use e.g. candidates=20.")
    if recipe.reranked and recipe.merge != "rrf":
        raise bad(f"order={recipe.order} reorders a pool filled to its depth: merge=top1 is not.", "Use merge=rrf.")
    if recipe.users == "all" and recipe.uses_model:
        raise bad(
            "users=all with the model's queries: only the users gloss generate covered have them.",
            "Use users=generated, or drop model from lists.",
        )


PRESETS: dict[str, Recipe] = {
    # GLoSS as published: the model's 5 queries, top-1 each, history kept
    "paper": Recipe(lists=("model",), queries=5, merge="top1", seen="kept"),
    # the Last-Item-Search baseline under the paper's protocol: the top-K of the last item's title, history kept
    "lis-paper": Recipe(lists=("lis",), queries=0, merge="top1", seen="kept"),
    "lis": Recipe(lists=("lis",), queries=0),
    "transitions": Recipe(lists=("transitions",), queries=0),
    # the item-ID anchor (gloss sasrec first) on every user of the split, history excluded
    "sasrec": Recipe(lists=("sasrec",), queries=0, users="all"),
    "model": Recipe(lists=("model",), queries=5),
    "no-model": Recipe(lists=("transitions", "lis"), queries=0),
    # the pick docs/RESULTS.md reports (chosen on validation in session 10)
    "gloss": Recipe(),
    # the default list's top 20, reordered by the model (gloss rerank first)
    "rerank": Recipe(order="fused"),
    "rerank-lm": Recipe(order="lm"),
}
_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}


def parse(text: str) -> Recipe:
    """A preset's name, or ``key=value`` words (after an optional preset name that they modify)."""
    words = text.split()
    if not words:
        raise GlossError("The recipe is empty.", f"Name a preset ({', '.join(PRESETS)}) or write key=value words.")
    base = PRESETS[DEFAULT]
    if "=" not in words[0]:
        if words[0] not in PRESETS:
            raise GlossError(
                f"Unknown recipe '{words[0]}'.",
                f"Use a preset ({', '.join(PRESETS)}) or key=value words (lists=..., queries=N, merge=top1|rrf, "
                "seen=kept|excluded, order=retrieval|lm|fused, candidates=N, users=generated|all).",
            )
        base, words = PRESETS[words[0]], words[1:]
    values: dict[str, Any] = {}
    for word in words:
        key, _, value = word.partition("=")
        if key not in _FIELDS or not value:
            raise GlossError(
                f"Recipe: cannot read '{word}'.", f"Write key=value with a key among: {', '.join(_FIELDS)}."
            )
        if key in values:
            raise GlossError(f"Recipe: {key} is given twice.", f"Keep one {key}=.")
        values[key] = value
    if "lists" in values:
        values["lists"] = tuple(p for p in values["lists"].split(",") if p)
        if "model" not in values["lists"] and "queries" not in values:
            values["queries"] = "0"
        elif "model" in values["lists"] and not base.uses_model and "queries" not in values:
            values["queries"] = str(PRESETS["model"].queries)
    for key in ("queries", "candidates"):
        if key in values:
            try:
                values[key] = int(values[key])
            except ValueError:
                raise GlossError(f"Recipe: {key}={values[key]} is not a whole number.", f"E.g. {key}=2.") from None
    return dataclasses.replace(base, **values)


def from_dict(values: dict[str, Any]) -> Recipe:
    """A recipe from its :meth:`Recipe.as_dict` (a manifest's record, an experiment's TOML table)."""
    unknown = set(values) - set(_FIELDS) - {"name"}
    if unknown:
        raise GlossError(f"Recipe: unknown keys {', '.join(sorted(unknown))}.", f"Use: {', '.join(_FIELDS)}.")
    fields = {k: v for k, v in values.items() if k in _FIELDS}
    if "lists" in fields:
        fields["lists"] = tuple(fields["lists"])
    base = PRESETS[values["name"]] if values.get("name") in PRESETS and len(fields) == 0 else Recipe()
    try:
        return dataclasses.replace(base, **fields)
    except TypeError as exc:
        raise GlossError(f"Recipe: {exc}.", "Write each key once with a value of its type.") from None
