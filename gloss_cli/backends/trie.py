"""Beam search constrained to the catalog: a trie of every catalog title's tokens, held in tensors on the device.

GLoSS lets the model write any text and maps it onto the catalog by retrieval; with ``gloss generate --catalog-only``
every beam must instead spell a catalog title token for token, as the model was trained to write it
(``tokenizer("Title: <title>", add_special_tokens=False)`` then EOS), so the 5 beams are 5 distinct catalog items.
The log-probabilities of disallowed tokens become -1e9 before the beams' top-k, as transformers'
``prefix_allowed_tokens_fn`` masks them (no renormalisation over the allowed ones).

A step needs, for each of the B x k rows, the tokens its node allows (one gather over a CSR layout of the children)
and the node its chosen token leads to (one ``searchsorted`` over the edges' sorted ``node * width + token`` keys):
no Python per row, so the search state stays on the device."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

NEG = -1.0e9  # torch_beam's "impossible" score


class TokenTrie:
    """Token sequences as a trie: node ``n``'s children are ``token[ptr[n]:ptr[n + 1]]`` (sorted) leading to
    ``child[...]``. Node 0 is the root; node ``dead`` has no children, the place of a beam whose last token left the
    trie (only a beam already scored -1e9 gets there)."""

    def __init__(self, sequences: Iterable[Sequence[int]], device: torch.device | str = "cpu") -> None:
        children: list[dict[int, int]] = [{}]
        count = 0
        for seq in sequences:
            count += 1
            node = 0
            for token in seq:
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = children[node][token] = len(children)
                    children.append({})
                node = nxt
        ptr, tokens, child = [0], [], []
        for kids in children:
            for token in sorted(kids):
                tokens.append(token)
                child.append(kids[token])
            ptr.append(len(tokens))
        ptr.append(len(tokens))  # the dead node
        self.sequences, self.dead = count, len(children)
        self.width = max(tokens, default=0) + 1  # tokens at or past it are in no sequence
        self.ptr = torch.tensor(ptr, dtype=torch.long, device=device)
        self.token = torch.tensor(tokens, dtype=torch.long, device=device)
        self.child = torch.tensor(child, dtype=torch.long, device=device)
        parents = torch.repeat_interleave(torch.arange(self.dead + 1, device=device), self.ptr.diff())
        self.keys = parents * self.width + self.token  # sorted: by node, then by token

    def to(self, device: torch.device | str) -> TokenTrie:
        """Moved to ``device`` (in place; a no-op where it is already)."""
        for name in ("ptr", "token", "child", "keys"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def restrict(self, logprobs: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """``logprobs`` (rows, vocab) with NEG wherever row ``i``'s node ``nodes[i]`` has no child."""
        start = self.ptr[nodes]
        counts = self.ptr[nodes + 1] - start
        rows = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), counts)
        first = torch.repeat_interleave(start - (torch.cumsum(counts, 0) - counts), counts)
        allowed = self.token[first + torch.arange(rows.numel(), device=nodes.device)]
        out = torch.full_like(logprobs, NEG)
        out[rows, allowed] = logprobs[rows, allowed]
        return out

    def advance(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The node each row reaches by appending its token (``dead`` when that token is not a child)."""
        if not self.keys.numel():
            return torch.full_like(nodes, self.dead)
        key = nodes * self.width + tokens.clamp(max=self.width - 1)
        at = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
        found = (self.keys[at] == key) & (tokens < self.width) & (nodes != self.dead)
        return torch.where(found, self.child[at], self.dead)


def catalog_trie(tokenizer: object, texts: Iterable[str], device: torch.device | str = "cpu") -> TokenTrie:
    """The trie of ``texts`` tokenized as training tokenizes a target (no special tokens, then EOS)."""
    from gloss_cli.examples import target_ids

    return TokenTrie(target_ids(tokenizer, sorted(set(texts))), device=device)
