"""llama.cpp generation backend: GLoSS's beam search over a GGUF model (± a GGUF LoRA adapter) on CPU.

llama-cpp-python has no beam search, so this module carries one that mirrors transformers' (5.x
``GenerationMixin._beam_search`` with ``do_sample=False``, ``length_penalty=1.0``, ``early_stopping=False``): the
same candidates, the same finished-hypothesis bookkeeping and the same termination rule, so that both backends
return the same beams on the same model and prompt (up to float noise between the two runtimes).

The beams of a prompt live as sequences of ONE llama.cpp KV cache (unified, so copies share cells): the prompt is
decoded once, ``seq_cp`` hands its cells to the beams, a beam that survives keeps its sequence id and a beam that
forks gets a copy of its parent's (metadata only, no tensor copy). Each step decodes the newest token of every live
beam of every prompt in flight in one ``llama_decode`` batch, so the weights are read once per step for all of them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError

CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
)
PIP_COMMAND = f'CMAKE_ARGS="{CMAKE_ARGS}" pip install llama-cpp-python'
# llama.cpp's bound on sequence ids in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256
DEFAULT_PARALLEL = 4  # prompts searched together (not exact): one decode per step serves all their beams


def import_llama_cpp() -> Any:
    """The llama_cpp module, or a GlossError saying how to install it.

    Its OpenMP threads wait passively (``OMP_WAIT_POLICY``, unless set), read when the runtime loads: ggml meets
    at a barrier after every operation, hundreds per token, and spinning threads on a machine shared with other
    jobs wait there for a peer that is not running. On a 2-core machine with one other busy process, 2 spinning
    threads took 78 s for what 1 thread, or 2 passive ones, did in 1.8 s (2026-12-06, benchmarks/README.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp
    except ImportError:
        raise GlossError(
            "llama-cpp-python is not installed; the llama.cpp backend needs it.",
            f"Run: {PIP_COMMAND}  (a 5-7 min source build; the portable flags keep the wheel usable on other CPUs)",
        ) from None
    return llama_cpp


def runtime_uses_amx(llama: Any) -> bool:
    """Whether the llama.cpp build runs quantized weights on Intel AMX tiles (``AMX_INT8 = 1`` in its system info).

    A source build with ``GGML_NATIVE=ON`` (pip's default) on an AMX CPU compiles ggml's AMX kernels. Built with
    GCC 12 (Debian 12's), whose ``_tile_loadconfig`` tells the optimiser it reads 8 bytes of the 64-byte tile
    config, the stores of the tiles' rows and widths are dropped and ``ldtilecfg`` faults on what is left: a
    segmentation fault in ``llama_decode`` on the first multi-token batch through a Q4_0/Q4_1/Q8_0/K-quant weight
    (llama-cpp-python 0.3.36; f32 weights never take that path). Such a runtime gets its weights in plain CPU
    buffers (``use_extra_bufts`` off), which also skips ggml's AVX2 weight repacking: slower, never wrong.
    """
    return b"AMX_INT8 = 1" in llama.llama_print_system_info()


# ---------------------------------------------------------------------------------------------------------------
# Beam search, one prompt at a time, independent of the runtime that produces the log-probabilities.


@dataclass
class Beam:
    tokens: list[int]  # generated tokens only
    score: float  # sum of the tokens' log-probabilities
    seq: int = -1  # llama.cpp sequence id that holds its KV cells


@dataclass
class BeamSearch:
    """transformers' beam search for one prompt, advanced one step at a time by :meth:`step`.

    Per step: log-probs of every running beam + its score; the top ``keep = max(2, 1 + n_eos) * beams`` candidates
    over all beams; the best ``beams`` candidates that did not stop become the running beams; stopped candidates
    among the first ``beams`` (EOS, or ``max_new_tokens`` reached) enter the finished list with
    ``score / generated_len ** length_penalty`` while improvement is still possible; the search ends once the best
    running beam, normalised by its current length, cannot beat the worst of ``beams`` finished hypotheses (HF's
    ``early_stopping=False`` heuristic), or when every candidate stopped.
    """

    beams: int
    max_new_tokens: int
    eos: frozenset[int]
    length_penalty: float = 1.0
    running: list[Beam] = field(default_factory=lambda: [Beam([], 0.0)])
    finished: list[tuple[float, list[int]]] = field(default_factory=list)
    can_improve: bool = True
    done: bool = False

    def step(self, logprobs: np.ndarray) -> list[int]:
        """Advance with the next-token log-probs of each running beam (rows); return each new beam's parent row."""
        keep = max(2, 1 + len(self.eos)) * self.beams
        total = logprobs.astype(np.float64) + np.array([b.score for b in self.running])[:, None]
        flat = total.ravel()
        top = np.argpartition(-flat, keep - 1)[:keep] if flat.size > keep else np.arange(flat.size)
        # Best first; equal scores keep the lower flat index first, as torch.topk does in practice.
        top = top[np.lexsort((top, -flat[top]))]
        vocab = logprobs.shape[1]
        new_len = len(self.running[0].tokens) + 1
        at_limit = new_len >= self.max_new_tokens
        survivors: list[tuple[int, Beam]] = []
        for rank, index in enumerate(top.tolist()):
            parent, token = divmod(index, vocab)
            beam = Beam([*self.running[parent].tokens, token], float(flat[index]))
            if at_limit or token in self.eos:
                if rank < self.beams and self.can_improve:
                    self._finish(beam)
            elif len(survivors) < self.beams:
                survivors.append((parent, beam))
        if len(survivors) < self.beams:  # every candidate stopped: nothing can continue
            self.done = True
            return []
        self.running = [beam for _, beam in survivors]
        self._check_improvement(new_len)
        return [parent for parent, _ in survivors]

    def _finish(self, beam: Beam) -> None:
        score = beam.score / len(beam.tokens) ** self.length_penalty
        self.finished.append((score, beam.tokens))
        self.finished.sort(key=lambda hyp: -hyp[0])
        del self.finished[self.beams :]

    def _check_improvement(self, length: int) -> None:
        if len(self.finished) == self.beams:
            best_possible = self.running[0].score / length**self.length_penalty
            self.can_improve = self.can_improve and best_possible > self.finished[-1][0]
        self.done = not self.can_improve

    def results(self, num_return: int) -> list[tuple[float, list[int]]]:
        return self.finished[:num_return]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp runtime.


@dataclass
class _Slot:
    """One prompt in flight: its search, its prompt length and the block of sequence ids it owns."""

    index: int
    search: BeamSearch
    n_prompt: int
    seqs: list[int]


class LlamaCppGenerator:
    """Beam-search generation with llama.cpp on a GGUF model, optionally with a GGUF LoRA adapter.

    ``n_ctx`` is the context of one prompt in flight (its tokens + beams x new tokens); ``parallel`` prompts are
    searched together in one KV cache of ``n_ctx * parallel`` cells, their beams decoded in one batch per step.
    ``exact`` keeps the KV cache in f32 without flash attention: logits then stay within ~1e-5 of transformers'
    (f16 KV or flash attention move them by ~1e-3, enough to reorder near-tied beams), for twice the KV memory.
    Without flash attention each token also attends over the cells of every prompt in flight (masked, but
    computed), so ``parallel`` defaults to 1 when exact and to 4 otherwise.
    ``add_bos`` overrides the GGUF's own flag (None: as the GGUF says; gloss's export writes the HF tokenizer's).
    ``eos_token_ids`` overrides the GGUF's EOS token (HF stops at generation_config.eos_token_id, which may be
    several).
    """

    def __init__(
        self,
        model_path: Path,
        *,
        lora_path: Path | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        parallel: int | None = None,
        exact: bool = True,
        add_bos: bool | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self._llama = import_llama_cpp()
        for path, what in ((model_path, "model"), (lora_path, "LoRA adapter")):
            if path is not None and not Path(path).is_file():
                raise GlossError(f"GGUF {what} not found: {path}", "Export one with gloss_cli.export.export_gguf.")
        self.n_ctx, self.parallel = n_ctx, max(1, parallel or (1 if exact else DEFAULT_PARALLEL))
        self.model_path, self.lora_path, self.exact = Path(model_path), lora_path, exact
        from gloss_cli.models import cpu_threads

        self.n_threads = n_threads or cpu_threads() or os.cpu_count() or 1
        self._model = self._load_model(self.model_path)
        self._ctx = self._new_context(self.n_threads, exact)
        if lora_path is not None:
            self._set_lora(Path(lora_path))
        self._vocab = self._model.vocab
        self.n_vocab = int(self._llama.llama_vocab_n_tokens(self._vocab))
        # HF stops at generation_config.eos_token_id, which for a GGUF is the one EOS token it records; llama.cpp's
        # wider end-of-generation set (EOT, <|im_end|>, ...) would change which hypotheses finish.
        self.eos = frozenset(eos_token_ids if eos_token_ids is not None else [self._model.token_eos()])
        self.add_bos = self._model.add_bos_token() if add_bos is None else add_bos
        self.n_batch = int(self._ctx.params.n_batch)
        self._batch = self._llama.llama_batch_init(max(self.n_batch, MAX_SEQUENCES), 0, 1)
        # For gloss_cli.generate's Generator protocol: prompts per call (slots refill within a call) and counters.
        self.default_batch_size = 4 * self.parallel
        self.new_tokens = 0  # tokens of the returned sequences (EOS included, as the hf backend counts them)
        self.decoded_tokens = 0  # beam tokens evaluated, prompts excluded: the work the model did

    def _load_model(self, path: Path) -> Any:
        import logging

        from llama_cpp import _internals

        # llama-cpp-python maps ggml's log levels one off (its warnings print as errors); failures reach us
        # through return codes, so its log stays quiet.
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
        self._llama.llama_backend_init()
        params = self._llama.llama_model_default_params()
        if runtime_uses_amx(self._llama) and "use_extra_bufts" in dict(type(params)._fields_):
            params.use_extra_bufts = False  # see runtime_uses_amx
        try:
            return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as exc:
            raise GlossError(f"llama.cpp could not load {path}: {exc}", "Is it a GGUF model file?") from None

    def _new_context(self, n_threads: int, exact: bool) -> Any:
        from llama_cpp import _internals

        params = self._llama.llama_context_default_params()
        params.n_ctx = self.n_ctx * self.parallel
        params.n_batch = params.n_ubatch = min(512, params.n_ctx)
        params.n_seq_max = MAX_SEQUENCES
        # Unified: one pool of cells for all sequences, so seq_cp shares the prompt's cells instead of copying them
        # into a per-sequence stream.
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads
        if exact:
            params.type_k = params.type_v = self._llama.GGML_TYPE_F32
            params.flash_attn_type = self._llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        return _internals.LlamaContext(model=self._model, params=params, verbose=False)

    def _set_lora(self, path: Path) -> None:
        adapter = self._llama.llama_adapter_lora_init(self._model.model, str(path).encode())
        if adapter is None:
            raise GlossError(f"llama.cpp could not load the LoRA adapter {path}", "Was it made for this base model?")
        self._adapter = adapter  # kept alive as long as the context uses it
        adapters = (self._llama.llama_adapter_lora_p_ctypes * 1)(adapter)
        if self._llama.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
            raise GlossError(f"llama.cpp could not apply the LoRA adapter {path}")

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
        if getattr(self, "_adapter", None) is not None:
            self._llama.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if getattr(self, "_model", None) is not None:
            self._model.close()

    def __del__(self) -> None:
        self.close()

    # -- tokens -------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Like the HF tokenizer of the same model: BOS only where the model asks for it, special tokens parsed."""
        tokens = list(self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        return [self._model.token_bos(), *tokens] if self.add_bos else tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Like HF ``decode(skip_special_tokens=True)``: control tokens dropped, SentencePiece's leading space too."""
        n = len(tokens)
        array = (self._llama.llama_token * max(n, 1))(*tokens)
        size = 8 * n + 16
        buffer = ctypes.create_string_buffer(size)
        written = self._llama.llama_detokenize(self._vocab, array, n, buffer, size, True, False)
        if written < 0:  # too small: llama.cpp says how much it needs
            size = -written
            buffer = ctypes.create_string_buffer(size)
            written = self._llama.llama_detokenize(self._vocab, array, n, buffer, size, True, False)
        return buffer.raw[:written].decode("utf-8", errors="replace")

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        return [len(self.tokenize(p)) for p in prompts]

    def stop_at_line_end(self) -> None:
        """Beams also finish at a token that ends their line (gloss_cli.generate.line_end_tokens); like EOS, it
        is left out of the returned text."""
        from gloss_cli.generate import line_end_tokens

        def encode(text: str) -> list[int]:
            return list(self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True))

        self.eos = self.eos | frozenset(line_end_tokens(encode, self.detokenize))

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            "backend": "llama-cpp",
            "model": self.model_path.name,
            "lora": self.lora_path.name if self.lora_path else None,
            "threads": self.n_threads,
            "parallel": self.parallel,
            "exact": self.exact,
            "llama_cpp_python": version("llama-cpp-python"),
        }

    # -- generation ---------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        *,
        beams: int = 5,
        num_return: int = 5,
        max_new_tokens: int = 50,
        length_penalty: float = 1.0,
    ) -> list[list[tuple[str, float]]]:
        """Per prompt, ``num_return`` (text, score) best first; text is the new text only, score HF's."""
        found = self.search([self.tokenize(p) for p in prompts], beams, num_return, max_new_tokens, length_penalty)
        self.new_tokens += sum(len(tokens) for hyps in found for _, tokens in hyps)
        return [[(self.detokenize(self._strip_eos(tokens)), score) for score, tokens in hyps] for hyps in found]

    def _strip_eos(self, tokens: list[int]) -> list[int]:
        return tokens[:-1] if tokens and tokens[-1] in self.eos else tokens

    def search(
        self,
        prompts: Sequence[list[int]],
        beams: int = 5,
        num_return: int = 5,
        max_new_tokens: int = 50,
        length_penalty: float = 1.0,
    ) -> list[list[tuple[float, list[int]]]]:
        """Beam search on tokenized prompts; per prompt ``num_return`` (score, generated tokens) best first."""
        if not 1 <= num_return <= beams:
            raise ValueError(f"num_return ({num_return}) must be between 1 and beams ({beams})")
        budget = beams * max_new_tokens
        for tokens in prompts:
            if not tokens:
                raise GlossError("An empty prompt cannot be searched (the model adds no BOS token to start from).")
            if len(tokens) + budget > self.n_ctx:
                raise GlossError(
                    f"A prompt of {len(tokens):,} tokens plus {beams} beams x {max_new_tokens} new tokens does not fit "
                    f"the llama.cpp context of {self.n_ctx:,} tokens.",
                    "Use a larger n_ctx, or shorter histories.",
                )
        results: list[list[tuple[float, list[int]]]] = [[] for _ in prompts]
        blocks = [list(range(b * beams, (b + 1) * beams)) for b in range(min(self.parallel, MAX_SEQUENCES // beams))]
        queue = list(range(len(prompts)))[::-1]
        active: list[_Slot] = []
        self._ctx.kv_cache_clear()
        while queue or active:
            while queue and blocks:
                index = queue.pop()
                search = BeamSearch(beams, max_new_tokens, self.eos, length_penalty)
                slot = _Slot(index, search, len(prompts[index]), blocks.pop())
                self._start(slot, prompts[index])
                active.append(slot)
            self._advance(active)
            for slot in [s for s in active if s.search.done]:
                results[slot.index] = slot.search.results(num_return)
                for seq in slot.seqs:
                    self._ctx.kv_cache_seq_rm(seq, -1, -1)
                blocks.append(slot.seqs)
                active.remove(slot)
        return results

    def _start(self, slot: _Slot, tokens: list[int]) -> None:
        """Decode the prompt into the slot's first sequence, then take the first beam-search step on its logits."""
        seq = slot.seqs[0]
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            self._fill([(t, start + i, seq, last and i == len(chunk) - 1) for i, t in enumerate(chunk)])
            self._decode()
        logits = np.ctypeslib.as_array(self._ctx.get_logits_ith(len(chunk) - 1), shape=(self.n_vocab,))
        slot.search.running[0].seq = seq
        self._step(slot, log_softmax(logits[None, :]))

    def _advance(self, active: list[_Slot]) -> None:
        """One decode for the newest token of every running beam of every prompt in flight, then one search step."""
        live = [s for s in active if not s.search.done]
        entries = [(b.tokens[-1], s.n_prompt + len(b.tokens) - 1, b.seq, True) for s in live for b in s.search.running]
        if not entries:
            return
        self._fill(entries)
        self._decode()
        self.decoded_tokens += len(entries)
        logits = np.ctypeslib.as_array(self._llama.llama_get_logits(self._ctx.ctx), shape=(len(entries), self.n_vocab))
        logprobs = log_softmax(logits)
        row = 0
        for slot in live:
            n = len(slot.search.running)
            self._step(slot, logprobs[row : row + n])
            row += n

    def _step(self, slot: _Slot, logprobs: np.ndarray) -> None:
        """Advance the search and give each new beam a sequence holding its parent's cells."""
        old = [b.seq for b in slot.search.running]
        parents = slot.search.step(logprobs)
        if slot.search.done:
            return
        spare = [s for s in slot.seqs if s not in {old[p] for p in parents}]
        for seq in spare:  # beams that left no child: free their cells (cells shared with survivors stay)
            self._ctx.kv_cache_seq_rm(seq, -1, -1)
        taken: set[int] = set()
        for beam, parent in zip(slot.search.running, parents, strict=True):
            if parent not in taken:  # the first child carries on in its parent's sequence
                taken.add(parent)
                beam.seq = old[parent]
            else:  # a fork: a new sequence that shares the parent's cells
                beam.seq = spare.pop()
                self._ctx.kv_cache_seq_cp(old[parent], beam.seq, -1, -1)

    def _fill(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """Put (token, position, sequence id, wants logits) entries into the reusable batch."""
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits

    def _decode(self) -> None:
        code = self._llama.llama_decode(self._ctx.ctx, self._batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} (1: no KV cache slot for the batch)")


def load_generator(train_dir: Path, meta: dict[str, Any], *, options: Any, reporter: Reporter) -> LlamaCppGenerator:
    """gloss_cli.generate's entry point: the ``train/`` model exported once to a merged q8_0 GGUF (full speed,
    unlike a GGUF LoRA on the base, which also disables mmap), searched ``options.batch_size`` prompts at a time.

    Not ``exact``: q8_0 weights already move the logits further from transformers' than an f16 KV cache does, so
    an f32 cache buys little fidelity there, and the f16 cache with flash attention was ~35 % faster on CPU
    (benchmarks/README.md; the same top-1 agreement with hf).
    """
    from gloss_cli.export import export_trained

    import_llama_cpp()  # a missing runtime is said before a long export
    gguf = export_trained(train_dir, meta, reporter=reporter)
    # generate fits prompts to max_seq_len - max_new_tokens; the beams need their new tokens on top.
    n_ctx = int(meta.get("max_seq_len", 1024)) + options.beams * options.max_new_tokens
    reporter.info(f"loading {gguf.name} with llama.cpp")
    return LlamaCppGenerator(gguf, n_ctx=n_ctx, parallel=options.batch_size or DEFAULT_PARALLEL, exact=False)
