"""gloss's batched beam search in plain torch over a transformers causal LM: transformers' beams, less work.

``model.generate(num_beams=k)`` copies every prompt k times *before* the prefill, so each prompt (~360 tokens in
GLoSS, against <= 50 new ones) is computed k times; it then grows a dynamic KV cache by concatenation, reorders it
whole every step, and spends much host time per step. Here each prompt is prefilled once (batch B) and its keys and
values stay once in memory: the k beams of a prompt share them. A decode step attends in two parts with one softmax
(:func:`shared_prompt_attention`): the k beams' queries of a prompt against its prompt keys, side by side in one
matmul, so the prompt's keys and values are read once per step and not once per beam and query head (the KV cache
of the prompts, the bulk of a step's memory traffic, was read 15 times by SmolLM2's 5 beams x 3 query heads per KV
head); and each beam's queries against its own generated keys, in a cache preallocated for ``max_new_tokens``
positions (B x k rows). A step reorders only those generated rows, and the whole search state lives on the device:
the host waits for it only every ``check_every`` steps, to see whether all is done, and (on a CPU) to let the
prompts whose hypotheses are final leave the batch once they are a quarter of it (``compact``).

The search mirrors transformers 5.x ``GenerationMixin._beam_search`` (``do_sample=False``, ``early_stopping=False``)
tensor for tensor: the top ``max(2, 1 + n_eos) * k`` candidates over all beams; the best k that did not stop run on;
those among the first k that stopped (EOS, or ``max_new_tokens`` reached) join the k finished hypotheses with score
``sum_logprobs / generated_len ** length_penalty`` while the early-stop heuristic says they can still improve; the
search ends when no prompt can improve or every candidate stopped. Same candidates, same -1e9 masking, same order of
concatenation before each top-k, so the returned beams and scores are ``out.sequences`` / ``out.sequences_scores``
up to float noise. One beam is greedy search, scored as gloss's hf backend scores greedy output: the mean
log-probability of the generated tokens.

The model is driven with a cache object of our own (``update`` is all a decoder layer asks of it) and, for the
decode steps, an attention function registered with transformers' ``AttentionInterface`` (the config's
``_attn_implementation`` names it while the search runs); so only causal models whose layers attend fully or in a
sliding window (Gemma 3; the window is applied in each decode step), without logit soft-capping, with ``sdpa`` or
``eager`` attention for the prefill, and with no logits processor switched on by their generation config are
supported: :func:`unsupported` says why not.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gloss_cli.backends.trie import TokenTrie

NEG = -1.0e9  # transformers' "impossible" score, kept so that ties break as they do there
ALIGN = 8  # generated-token cache length rounded up to a multiple of this (masked), for aligned rows
ATTENTION = "gloss_shared_prompt"  # the name the decode steps' attention is registered under

# Generation-config fields that add a logits processor or change the search, with their neutral value.
NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "guidance_scale": 1.0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "diversity_penalty": 0.0,
    "num_beam_groups": 1,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "sequence_bias": None,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
}

Hypotheses = list[list[tuple[list[int], float]]]


def _base(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model: Any) -> str | None:
    """The forward keyword that takes the KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    params = inspect.signature(_base(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def unsupported(model: Any) -> str | None:
    """Why the gloss search cannot reproduce ``model.generate`` on this model, or None when it can."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in ("sdpa", "eager"):
        return f"attn_implementation '{attention}' (sdpa or eager only)"
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:  # sliding layers get their window from the layer itself (``sliding_window``)
        if any(kind not in ("full_attention", "sliding_attention") for kind in layer_types):
            return "models with chunked or linear-attention layers"
    elif getattr(text, "sliding_window", None) is not None:
        return "models with sliding-window attention but no layer_types"
    if getattr(text, "use_bidirectional_attention", False):
        return "models with bidirectional attention"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "models with attention logit soft-capping"
    if _cache_kwarg(model) is None:
        return "models whose forward takes no KV cache"
    gen = getattr(model, "generation_config", None)
    for name, neutral in NEUTRAL.items():
        value = getattr(gen, name, None)
        if value is not None and value != neutral:
            return f"generation_config.{name} = {value!r}"
    return None


class _Cache:
    """What a decoder layer sees of the KV cache: ``update`` writes the new token's keys and values at the current
    generated position and returns the layer's generated rows (positions not yet written are masked); the prompt's
    keys and values reach the attention through the ``gloss_shared_prompt`` keyword."""

    def __init__(self, decoder: _Decoder) -> None:
        # A weak reference: decoder -> cache -> decoder would be a cycle, and a cycle's GPU buffers wait for Python's
        # garbage collector (which counts objects, not bytes): batch after batch of KV caches piled up to an OOM.
        self.decoder = weakref.proxy(decoder)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.decoder
        keys, values = d.keys[layer_idx], d.values[layer_idx]
        keys.index_copy_(2, d.position, key_states)
        values.index_copy_(2, d.position, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.decoder.prompt_len + self.decoder.written


class SharedPrompt:
    """The prompts' keys and values, once per prompt (layers x B x KV heads x P x head dim), and their padding as an
    additive mask (B x 1 x 1 x P): what every beam of a prompt attends to before its own generated tokens.
    ``position`` (a one-element tensor the decoder advances in place) is the current token's index among the
    generated ones, for sliding-window layers."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, position: torch.Tensor, generated: int
    ) -> None:
        self.keys, self.values, self.bias, self.position = keys, values, bias, position
        self.prompt_index = torch.arange(keys.shape[3], device=keys.device)
        self.generated_index = torch.arange(generated, device=keys.device)  # of the generated tokens' cache


def shared_prompt_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One decode step's attention (transformers' attention-function signature) for B prompts x k beams: ``query``
    (B*k, H, 1, D); ``key``/``value`` the generated tokens' (B*k, KV, G, D) rows, ``attention_mask`` their additive
    mask (B*k, 1, 1, G); the prompt's part comes from ``kwargs["gloss_shared_prompt"]``. Eager attention's maths
    (scores in the model's dtype, softmax in float32) over prompt and generated keys together, with each prompt's
    keys and values read once for all its beams and query heads; returns (B*k, 1, H, D)."""
    shared: SharedPrompt = kwargs["gloss_shared_prompt"]
    prompt_keys, prompt_values = shared.keys[module.layer_idx], shared.values[module.layer_idx]
    batch, kv_heads, length, dim = prompt_keys.shape
    rows, heads = query.shape[0], query.shape[1]
    beams, group = rows // batch, heads // kv_heads  # query head h reads KV head h // group (transformers' repeat_kv)
    scale = dim**-0.5 if scaling is None else scaling

    def per_prompt(x: torch.Tensor) -> torch.Tensor:  # (B*k, KV, g, n) -> (B, KV, k*g, n)
        return x.reshape(batch, beams, kv_heads, group, -1).transpose(1, 2).reshape(batch, kv_heads, beams * group, -1)

    def per_row(x: torch.Tensor) -> torch.Tensor:  # (B, KV, k*g, n) -> (B*k, KV, g, n)
        return x.reshape(batch, kv_heads, beams, group, -1).transpose(1, 2).reshape(rows, kv_heads, group, -1)

    q = query.reshape(rows, kv_heads, group, dim)
    prompt_scores = per_row(torch.matmul(per_prompt(q), prompt_keys.transpose(2, 3)) * scale + shared.bias)
    own_scores = torch.matmul(q, key.transpose(2, 3)) * scale + attention_mask
    window = kwargs.get("sliding_window")
    if window:  # transformers' sliding window over padded indices: key j is seen by query i when j > i - window
        oldest = shared.position - window  # the current token's index, minus the window, counted from the prompt's end
        floor = torch.finfo(prompt_scores.dtype).min
        prompt_scores = prompt_scores.masked_fill(shared.prompt_index <= length + oldest, floor)
        own_scores = own_scores.masked_fill(shared.generated_index <= oldest, floor)
    weights = torch.softmax(torch.cat((prompt_scores, own_scores), dim=-1), dim=-1, dtype=torch.float32)
    prompt_weights, own_weights = weights.to(query.dtype).split((length, key.shape[2]), dim=-1)
    out = per_row(torch.matmul(per_prompt(prompt_weights), prompt_values)) + torch.matmul(own_weights, value)
    return out.reshape(rows, 1, heads, dim), None


class _Decoder:
    """The B x k rows of the search after one prefill: the prompts' KV once per prompt, a static KV cache for the
    generated tokens, their mask, positions, and one decode step.

    ``cuda_graphs`` replays the decode forward from a CUDA graph captured at the first step (every buffer it reads is
    updated in place, so one capture serves the whole call)."""

    def __init__(
        self,
        model: Any,
        prefill_kv: list[tuple[torch.Tensor, torch.Tensor]],
        prompt_mask: torch.Tensor,
        beams: int,
        max_new_tokens: int,
        cuda_graphs: bool = False,
    ) -> None:
        self.model, self.beams, self.cuda_graphs = model, beams, cuda_graphs
        self.kwarg = _cache_kwarg(model) or "cache"
        batch, self.prompt_len = prompt_mask.shape
        rows = batch * beams
        length = -(-max_new_tokens // ALIGN) * ALIGN
        k0, v0 = prefill_kv[0]
        device, dtype = k0.device, k0.dtype
        n = len(prefill_kv)
        self.position = torch.tensor([0], device=device)  # where the next token's keys go among the generated
        # Contiguous per layer, so that the prompt matmuls read them in place (the prefill's are transposed views).
        self.shared = SharedPrompt(
            torch.stack([k for k, _ in prefill_kv]),
            torch.stack([v for _, v in prefill_kv]),
            torch.zeros((batch, 1, 1, self.prompt_len), dtype=dtype, device=device).masked_fill_(
                ~prompt_mask.bool()[:, None, None, :], torch.finfo(dtype).min
            ),
            self.position,
            length,
        )
        # One buffer for all layers, so a beam reorder is one gather, not one per layer.
        self.keys = torch.zeros((n, rows, k0.shape[1], length, k0.shape[3]), dtype=dtype, device=device)
        self.values = torch.zeros((n, rows, v0.shape[1], length, v0.shape[3]), dtype=dtype, device=device)
        self.mask = torch.full((rows, 1, 1, length), torch.finfo(dtype).min, dtype=dtype, device=device)
        # Positions as transformers counts them with left padding: real tokens only.
        self.position_ids = prompt_mask.long().sum(dim=1).repeat_interleave(beams)[:, None]
        self.written = 0
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.cache = _Cache(self)
        self.graph: Any = None
        self.graph_logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.tokens,
            attention_mask=self.mask,
            position_ids=self.position_ids,
            use_cache=True,
            gloss_shared_prompt=self.shared,
            **{self.kwarg: self.cache},
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _replay(self) -> torch.Tensor:
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: writes this step's keys, as the replay will again
                self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_logits = self._forward()
        self.graph.replay()
        assert self.graph_logits is not None
        return self.graph_logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32, one row per beam) after feeding each row its newest token."""
        self.tokens.copy_(tokens.view(-1, 1))
        self.mask.index_fill_(3, self.position, 0.0)
        logits = (self._replay() if self.cuda_graphs else self._forward()).float()
        self.position += 1
        self.position_ids += 1
        self.written += 1
        return logits

    def retain(self, prompts: torch.Tensor) -> None:
        """Only these prompts (indices into the current batch) and their beams go on: the others' rows are dropped."""
        rows = (prompts[:, None] * self.beams + torch.arange(self.beams, device=prompts.device)).reshape(-1)
        shared = self.shared
        shared.keys, shared.values = shared.keys.index_select(1, prompts), shared.values.index_select(1, prompts)
        shared.bias = shared.bias.index_select(0, prompts)
        self.keys, self.values = self.keys.index_select(1, rows), self.values.index_select(1, rows)
        self.mask, self.tokens = self.mask.index_select(0, rows), self.tokens.index_select(0, rows)
        self.position_ids = self.position_ids.index_select(0, rows)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i takes the generated keys and values of row ``rows[i]`` (always a beam of the same prompt)."""
        if not self.written:
            return
        for buffer in (self.keys, self.values):
            region = buffer[:, :, :, : self.written]
            region.copy_(region.index_select(1, rows))


class _Beams:
    """transformers' beam-search state for B prompts x k beams (``_beam_search``'s running/finished tensors, with
    the generated tokens only: the prompt never changes)."""

    def __init__(
        self, batch: int, beams: int, max_new_tokens: int, eos: torch.Tensor, pad: int, length_penalty: float
    ) -> None:
        device = eos.device
        self.beams, self.max_new, self.eos, self.length_penalty = beams, max_new_tokens, eos, length_penalty
        self.keep = max(2, 1 + eos.numel()) * beams
        shape = (batch, beams)
        self.running_tokens = torch.full((*shape, max_new_tokens), pad, dtype=torch.long, device=device)
        # Only the first beam is live at the start: the others would repeat its candidates.
        self.running_scores = torch.zeros(shape, dtype=torch.float, device=device)
        self.running_scores[:, 1:] = NEG
        self.tokens = self.running_tokens.clone()
        self.scores = torch.full(shape, NEG, dtype=torch.float, device=device)
        self.lengths = torch.zeros(shape, dtype=torch.long, device=device)
        self.finished = torch.zeros(shape, dtype=torch.bool, device=device)
        self.improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.all_stopped = torch.zeros((), dtype=torch.bool, device=device)
        self.top = torch.arange(self.keep, device=device) < beams
        self.offsets = torch.arange(batch, device=device)[:, None] * beams

    def step(self, logprobs: torch.Tensor, t: int) -> torch.Tensor:
        """Advance with each beam's next-token log-probs (rows, vocab); return each new beam's parent row."""
        batch, beams = self.running_scores.shape
        vocab = logprobs.shape[-1]
        total = (logprobs.view(batch, beams, vocab) + self.running_scores[:, :, None]).view(batch, -1)
        top_scores, top_index = torch.topk(total, self.keep)
        parent, token = top_index // vocab, top_index % vocab
        candidates = torch.take_along_dim(self.running_tokens, parent[:, :, None], dim=1)
        candidates[:, :, t] = token
        stopped = torch.isin(token, self.eos) | (t + 1 >= self.max_new)

        running = top_scores + stopped.to(torch.float32) * NEG
        best = torch.topk(running, beams)[1]
        self.running_tokens = torch.take_along_dim(candidates, best[:, :, None], dim=1)
        self.running_scores = torch.take_along_dim(running, best, dim=1)
        parents = torch.take_along_dim(parent, best, dim=1)

        just_finished = stopped & self.top
        scores = top_scores / ((t + 1) ** self.length_penalty)
        scores += (~self.improvable).to(torch.float32) * NEG
        scores += (~just_finished) * NEG
        merged = torch.cat((self.scores, scores), dim=1)
        keep = torch.topk(merged, beams)[1]
        self.tokens = torch.take_along_dim(torch.cat((self.tokens, candidates), dim=1), keep[:, :, None], dim=1)
        self.scores = torch.take_along_dim(merged, keep, dim=1)
        self.finished = torch.take_along_dim(torch.cat((self.finished, just_finished), dim=1), keep, dim=1)
        lengths = torch.cat((self.lengths, torch.full_like(parent, t + 1)), dim=1)
        self.lengths = torch.take_along_dim(lengths, keep, dim=1)

        best_possible = self.running_scores[:, :1] / ((t + 1) ** self.length_penalty)
        worst = torch.where(self.finished, self.scores.min(dim=1, keepdim=True)[0], NEG)
        self.improvable &= (best_possible > worst).any(dim=-1, keepdim=True)
        self.all_stopped = stopped.all()
        return (parents + self.offsets).view(-1)

    def done(self) -> bool:
        return not bool((self.improvable.any() & ~self.all_stopped).item())

    def retain(self, prompts: torch.Tensor) -> None:
        """Only these prompts (indices into the current batch) go on."""
        for name in ("running_tokens", "running_scores", "tokens", "scores", "lengths", "finished", "improvable"):
            setattr(self, name, getattr(self, name).index_select(0, prompts))
        self.offsets = self.offsets[: prompts.numel()]

    def results(self, num_return: int, prompts: torch.Tensor | None = None) -> Hypotheses:
        """Per prompt (all, or these indices) its ``num_return`` best finished hypotheses."""
        pick = slice(None) if prompts is None else prompts
        tokens, lengths = self.tokens[pick, :num_return].tolist(), self.lengths[pick, :num_return].tolist()
        scores = self.scores[pick, :num_return].tolist()
        return [
            [(seq[:n], score) for seq, n, score in zip(t, ln, s, strict=True)]
            for t, ln, s in zip(tokens, lengths, scores, strict=True)
        ]


class _Allowed:
    """Each row's node in the trie (when the search is constrained; otherwise every method lets all through)."""

    def __init__(self, trie: TokenTrie | None, rows: int, beams: int, device: torch.device) -> None:
        self.trie, self.beams = trie, beams
        self.nodes = torch.zeros(rows, dtype=torch.long, device=device)
        if trie is not None:
            trie.to(device)

    def restrict(self, logprobs: torch.Tensor) -> torch.Tensor:
        return logprobs if self.trie is None else self.trie.restrict(logprobs, self.nodes)

    def advance(self, parents: torch.Tensor | None, tokens: torch.Tensor) -> None:
        """Row i now continues row ``parents[i]`` (None: itself) with ``tokens[i]``."""
        if self.trie is not None:
            nodes = self.nodes if parents is None else self.nodes[parents]
            self.nodes = self.trie.advance(nodes, tokens)

    def retain(self, prompts: torch.Tensor) -> None:
        self.nodes = self.nodes.view(-1, self.beams).index_select(0, prompts).reshape(-1)


def _prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """One forward over the left-padded prompts, as ``generate`` runs it: positions count real tokens only, an
    all-ones mask is dropped, and only the last position's logits are computed."""
    from transformers import DynamicCache

    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    # A cache without the model's config keeps every prompt position of every layer, sliding-window ones included
    # (the decode steps apply the window), so that all layers' keys stack into one tensor.
    kwargs: dict[str, Any] = {_cache_kwarg(model) or "past_key_values": DynamicCache()}
    if "logits_to_keep" in inspect.signature(_base(model).forward).parameters:
        kwargs["logits_to_keep"] = 1
    out = model(
        input_ids=input_ids,
        attention_mask=None if bool(attention_mask.all()) else attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **kwargs,
    )
    cache = out.get("cache")  # a ModelOutput is a dict; its past_key_values property warns in transformers 5.x
    return out.logits[:, -1, :], out.get("past_key_values") if cache is None else cache


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of the cache ``forward`` returned."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v, *_ in cache]


def search(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    beams: int = 5,
    num_return: int = 5,
    max_new_tokens: int = 50,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    length_penalty: float = 1.0,
    check_every: int = 4,
    cuda_graphs: bool = False,
    compact: float | None = None,
    trie: TokenTrie | None = None,
) -> Hypotheses:
    """Beam search on left-padded prompts: per prompt ``num_return`` (generated token ids, score) best first, the
    ids ending at the EOS token that ended them (included). ``beams=1`` is greedy search.

    Every ``check_every`` steps, when at most ``compact`` of the batch's prompts can still improve, the others leave
    the batch (their hypotheses are final): the search computes only what can still change (0: never; not with
    ``cuda_graphs``, whose captured shapes are fixed). None: 0.75 on a CPU, where it gained 5 %, and 0 elsewhere:
    on an H200 the copies cost more than the rows saved (benchmarks/README.md).

    ``trie``: every beam must spell one of its sequences (gloss_cli.backends.trie; the search is then
    ``generate(prefix_allowed_tokens_fn=...)``'s)."""
    if compact is None:
        compact = 0.75 if input_ids.device.type == "cpu" else 0.0
    if not 1 <= num_return <= beams:
        raise ValueError(f"num_return ({num_return}) must be between 1 and beams ({beams})")
    reason = unsupported(model)
    if reason is not None:
        raise ValueError(f"the gloss search does not support {reason}")
    with torch.inference_mode():
        logits, cache = _prefill(model, input_ids, attention_mask)
        decoder = _Decoder(model, _layers(cache), attention_mask, beams, max_new_tokens, cuda_graphs)
        del cache
        eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=input_ids.device)
        with _decode_attention(model):
            batch = input_ids.shape[0]
            allowed = _Allowed(trie, batch * beams, beams, input_ids.device)
            if beams == 1:
                return _greedy(decoder, logits.float(), max_new_tokens, eos, pad_token_id, check_every, allowed)
            state = _Beams(batch, beams, max_new_tokens, eos, pad_token_id, length_penalty)
            found: Hypotheses = [[] for _ in range(batch)]
            index = torch.arange(batch)  # each current prompt's place in the batch given
            # Every beam of a prompt starts from its prompt's logits (only the first counts: the others score -1e9).
            logprobs = torch.log_softmax(logits.float(), dim=-1).repeat_interleave(beams, dim=0)
            for t in range(max_new_tokens):
                rows = state.step(allowed.restrict(logprobs), t)
                allowed.advance(rows, state.running_tokens[:, :, t].reshape(-1))
                checked = (t + 1) % check_every == 0
                if t + 1 == max_new_tokens or (checked and state.done()):
                    break
                decoder.reorder(rows)
                if checked and compact and not cuda_graphs:
                    index = _drop_finished(state, decoder, index, found, num_return, compact, allowed)
                logprobs = torch.log_softmax(decoder.step(state.running_tokens[:, :, t].reshape(-1)), dim=-1)
            for i, hyps in zip(index.tolist(), state.results(num_return), strict=True):
                found[i] = hyps
            return found


def _drop_finished(
    state: _Beams,
    decoder: _Decoder,
    index: torch.Tensor,
    found: Hypotheses,
    num_return: int,
    compact: float,
    allowed: _Allowed,
) -> torch.Tensor:
    """Prompts that can no longer improve (all their beams' hypotheses final) leave the batch once they are at least
    ``1 - compact`` of it: their results go to ``found``; returns the remaining prompts' places in it."""
    live = state.improvable[:, 0]
    remaining = int(live.sum())
    if remaining > compact * live.numel():
        return index
    done = (~live).nonzero()[:, 0]
    for i, hyps in zip(index[done.cpu()].tolist(), state.results(num_return, done), strict=True):
        found[i] = hyps
    keep = live.nonzero()[:, 0]
    state.retain(keep)
    decoder.retain(keep)
    allowed.retain(keep)
    return index[keep.cpu()]


@contextlib.contextmanager
def _decode_attention(model: Any) -> Iterator[None]:
    """Inside, the model's layers attend with :func:`shared_prompt_attention`; outside, as before."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, shared_prompt_attention)
    config = _base(model).config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def _greedy(
    decoder: _Decoder,
    logits: torch.Tensor,
    max_new_tokens: int,
    eos: torch.Tensor,
    pad: int,
    check_every: int,
    allowed: _Allowed,
) -> Hypotheses:
    """transformers' greedy search (argmax of the logits; finished rows get padding) with the hf backend's score:
    the sum of the chosen tokens' log-probabilities over the generated length, EOS included."""
    rows = logits.shape[0]
    device = logits.device
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    total = torch.zeros(rows, dtype=torch.float, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    live = torch.ones(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logprobs = allowed.restrict(torch.log_softmax(logits, dim=-1))
        token = torch.where(live, logprobs.argmax(dim=-1), pad)
        allowed.advance(None, token)
        tokens[:, t] = token
        chosen = logprobs.gather(1, token[:, None])[:, 0]
        total += torch.where(live, chosen, 0.0)
        lengths += live
        live &= ~torch.isin(token, eos)
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and not bool(live.any())):
            break
        logits = decoder.step(token)
    scores = (total / lengths.clamp(min=1)).tolist()
    return [[(seq[:n], score)] for seq, n, score in zip(tokens.tolist(), lengths.tolist(), scores, strict=True)]
