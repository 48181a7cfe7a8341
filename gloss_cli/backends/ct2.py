"""CTranslate2 generation backend: the trained model converted once to CTranslate2's format (int8 weights by
default) and searched on the CPU with CTranslate2's own beam search.

ctranslate2 installs as a prebuilt wheel (llama-cpp-python builds from source for 5-7 min), imports in ~0.04 s and
loads SmolLM2-135M's int8 weights in ~0.25 s; the prompts are tokenized by the ``tokenizers`` library from a
``tokenizer.json`` saved beside the converted weights, so ``gloss recommend`` imports neither torch nor transformers
once the conversion is cached. Converting needs them (the ``train`` extra, which trained the model).

The conversion is cached in ``$GLOSS_HOME/models/ct2/<key>/`` (``gloss_cli.cache``: built aside, renamed into
place, sizes checked on each use, rebuilt with a warning when damaged). The key hashes what was converted (a LoRA:
its merge's key, i.e. the adapter's sha256 and the base's files; a full fine-tune: the model folder's files), the
tokenizer folder's bytes, the compute type and ctranslate2's version.

The beam search is CTranslate2's, not transformers' (which the hf and llama-cpp backends reproduce). Read from
CTranslate2 4.8's ``src/decoding.cc``:

* Scores are on transformers' scale: the sum of the tokens' log-softmax over the vocabulary, divided by the
  hypothesis length ** length_penalty (1 here), the length counting the end token (the decoder keeps it while
  scoring; ``return_end_token=True`` only stops the generator from stripping it afterwards).
* Each step keeps the 2 x beams best candidates (transformers: max(2, 1 + end tokens) x beams); an ending candidate
  among the first ``beams`` finishes a hypothesis and the next candidate that does not end takes its place.
* The search stops as soon as ``beams`` hypotheses have finished (patience 1). transformers (``early_stopping=False``)
  goes on while a live beam, scored per token at its current length, beats the worst finished one, and may then
  swap in a longer hypothesis that scores better per token. So both agree up to the step where ``beams``
  hypotheses first exist; after it transformers' lower beams, and less often its top one, can differ.
* Where more than ``beams`` of the candidates end (EOS and the line-end tokens are several end tokens), no
  replacement is left and CTranslate2 extends the finished beam as if it had not ended: its later hypothesis holds
  an end token inside. The text is cut at the first end token, as every backend ends a query there; it then repeats
  an earlier hypothesis's text (with a lower score).
* Each prompt is searched on its own (``max_batch_size=1``): a batch's prompts run together only up to the shortest
  one's length, the rest being fed token by token as a forced prefix (slower on 16 test users, 0.75 against 0.86
  users/s on 2 cores), and at a prefix's end CTranslate2 bars end tokens from every beam but the first. Alone, a
  prompt's beams do not depend on which prompts share its call.

The threads (``GLOSS_THREADS``, else every core this process may use) search prompts side by side, one thread each
(``inter_threads``; the weights are shared): on an idle 2-core Xeon, 16 test users of a trained SmolLM2 with 2
beams ran at 2.1 users/s that way, at 1.15 on one thread, and at 0.50 with both threads on each prompt in turn
(``intra_threads=2``: its many small parallel regions per token cost more than they share). A single prompt (``gloss
recommend``) thus runs on one thread: 1.2 s a call against 2.0-2.8 s on two.

int8 (the default) quantizes the weights per row and, at run time, each row of activations too. That moves the
beams further from transformers' than llama.cpp's q8_0 (activations in blocks of 32): on 100 test users of a trained
SmolLM2 with 2 beams, the first query was the hf backend's (float32) for 41 with ct2 int8 and 71 with llama-cpp;
on another 30, for 10 with ct2 int8, 19 with llama-cpp and 28 with ct2 float32 (whose other 2 differ by the stopping
rule). Recall@5 of the 2 queries was the same on those 100 users (benchmarks/README.md). ``--dtype fp32`` gives
transformers' beams (up to the stopping rule) in 2.7 times int8's time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError

PIP_COMMAND = "pip install ctranslate2"
MARKER = "gloss-ct2.json"
WHAT = "CTranslate2 model"  # as errors and warnings name the cache
SCHEMA = 1  # bump when the folder's layout or the conversion changes: older folders are then not found
TOKENIZER = "tokenizer.json"
# --dtype -> CTranslate2's compute type, which the weights are also stored in (no quantization at load time).
# auto: int8, CTranslate2's fast CPU path (llama-cpp's q8_0 is its counterpart).
COMPUTE_TYPES = {"auto": "int8", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROMPTS_PER_THREAD = 4  # prompts per generate call and thread: enough to keep every thread busy between progress ticks


def import_ctranslate2() -> Any:
    """The ctranslate2 module, or a GlossError saying how to install it. Any OpenMP thread of its runtime (MKL's)
    waits passively unless ``OMP_WAIT_POLICY`` says otherwise (read when the runtime loads), as llama.cpp's do: on a
    machine shared with other jobs, a spinning thread waits for a peer that is not running."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import ctranslate2
    except ImportError:
        raise GlossError(
            "ctranslate2 is not installed; the ct2 backend needs it.",
            f"Run: {PIP_COMMAND}  (a prebuilt wheel; or pip install 'gloss[ct2]')",
        ) from None
    return ctranslate2


def compute_type(dtype: str, ctranslate2: Any) -> str:
    """The CTranslate2 compute type for ``--dtype``, refused where this CPU's CTranslate2 cannot run it."""
    if dtype not in COMPUTE_TYPES:
        raise GlossError(f"Unknown dtype '{dtype}'.", f"Use one of: {', '.join(COMPUTE_TYPES)}.")
    wanted = COMPUTE_TYPES[dtype]
    supported = ctranslate2.get_supported_compute_types("cpu")
    if wanted not in supported:
        raise GlossError(
            f"--dtype {dtype}: CTranslate2 cannot compute in {wanted} on this CPU "
            f"(it can in {', '.join(sorted(supported))}).",
            "Use --dtype auto (int8) or fp32 with --backend ct2.",
        )
    return wanted


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container or taskset may allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class CT2Generator:
    """Beam search with CTranslate2 on a converted model folder (``converted_dir``), on the CPU: ``threads`` prompts
    searched side by side, one thread each (see the module's docstring)."""

    def __init__(self, folder: Path, *, compute_type: str, threads: int) -> None:
        ctranslate2 = import_ctranslate2()
        from tokenizers import Tokenizer

        from gloss_cli.cache import read_marker

        self.folder, self.compute_type, self.threads = Path(folder), compute_type, threads
        self.record = read_marker(self.folder, MARKER)
        self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.model = ctranslate2.Generator(
            str(folder), device="cpu", compute_type=compute_type, inter_threads=threads, intra_threads=1
        )
        # HF stops at the tokenizer's EOS (HFGenerator.stop_ids); stop_at_line_end adds the line-end tokens.
        self.stop_ids: list[int] = [int(self.record["eos_token_id"])]
        self.default_batch_size = PROMPTS_PER_THREAD * threads
        self.new_tokens = 0  # tokens of the returned sequences, up to and including their end token (as hf counts)

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        return [len(encoding.ids) for encoding in self.tokenizer.encode_batch(list(prompts))]

    def stop_at_line_end(self) -> None:
        from gloss_cli.generate import line_end_tokens

        def encode(text: str) -> list[int]:
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

        ends = line_end_tokens(encode, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
        self.stop_ids += [t for t in ends if t not in self.stop_ids]

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        source = "merged" if "merged" in self.record else "full"
        return {
            "backend": "ct2",
            "model": self.folder.name,
            "weights": source,
            "compute_type": self.compute_type,
            "threads": self.threads,  # prompts searched side by side, one thread each
            "ctranslate2": version("ctranslate2"),
        }

    def generate(
        self, prompts: Sequence[str], *, beams: int, num_return: int, max_new_tokens: int
    ) -> list[list[tuple[str, float]]]:
        """Per prompt, ``num_return`` (text, score) best first: the new text only, cut at its first end token."""
        results = self.model.generate_batch(
            [encoding.tokens for encoding in self.tokenizer.encode_batch(list(prompts))],
            max_batch_size=1,  # each prompt alone, on one of the threads: see the module's docstring
            beam_size=beams,
            num_hypotheses=num_return,
            length_penalty=1.0,
            max_length=max_new_tokens,  # new tokens: the prompt is not counted when it is not in the result
            end_token=self.stop_ids,
            return_end_token=True,
            return_scores=True,
            include_prompt_in_result=False,
        )
        ends, found = set(self.stop_ids), []
        for result in results:
            texts = []
            for ids in result.sequences_ids:
                end = next((i for i, token in enumerate(ids) if token in ends), len(ids))
                self.new_tokens += min(end + 1, len(ids))
                texts.append(ids[:end])
            found.append(list(zip(self.tokenizer.decode_batch(texts), map(float, result.scores), strict=True)))
        return found


# ---------------------------------------------------------------------------------------------------------------
# Conversion, cached.


def converted_dir(train_dir: Path, meta: dict[str, Any], compute: str, reporter: Reporter) -> Path:
    """The ``train/`` folder's model converted to CTranslate2 with weights in ``compute``, made once."""
    from importlib.metadata import version

    from gloss_cli.cache import cache_dir, cached_folder
    from gloss_cli.merged import folder_sha256

    train_dir = Path(train_dir)
    tokenizer = train_dir / "tokenizer"
    if not tokenizer.is_dir():
        raise GlossError(f"{tokenizer} is missing; the train stage is incomplete.", "Run 'gloss train' again.")
    source, model_dir = _source(train_dir, meta, reporter)
    record = {"schema": SCHEMA, **source, "tokenizer_sha256": folder_sha256(tokenizer), "compute_type": compute}
    record["ctranslate2"] = version("ctranslate2")
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    trust = bool(meta.get("trust_remote_code", False))

    def build(tmp: Path) -> dict[str, Any]:
        return _convert(model_dir(), tokenizer, tmp, compute, reporter, trust_remote_code=trust)

    return cached_folder(cache_dir("ct2", WHAT) / key, MARKER, record, build, what=WHAT, reporter=reporter)


def _source(train_dir: Path, meta: dict[str, Any], reporter: Reporter) -> tuple[dict[str, str], Callable[[], Path]]:
    """What identifies the trained model, and how to get its transformers folder (a LoRA's merge is made only when
    the conversion needs it)."""
    from gloss_cli import merged

    if meta.get("format") == "full":
        model = train_dir / "model"
        if not (model / "config.json").is_file():
            raise GlossError(f"{model} is missing; the train stage is incomplete.", "Run 'gloss train' again.")
        return {"full": merged.base_fingerprint(str(model))}, lambda: model
    key = merged.merged_key(train_dir, meta, reporter)
    return {"merged": key}, lambda: merged.merged_dir(train_dir, meta, reporter)


def _convert(
    model_dir: Path, tokenizer_dir: Path, dest: Path, compute: str, reporter: Reporter, *, trust_remote_code: bool
) -> dict[str, Any]:
    """Convert ``model_dir`` with ``tokenizer_dir``'s tokenizer into ``dest``; save that tokenizer's tokenizer.json
    beside it, after checking that ``tokenizers`` encodes and decodes as transformers does. Returns what the marker
    records: the EOS token."""
    from importlib.metadata import version

    from gloss_cli.export import link_model
    from gloss_cli.merged import copy_tokenizer
    from gloss_cli.models import load_tokenizer, quiet_transformers

    reporter.info(f"converting the trained model to CTranslate2 ({compute}, once)")
    quiet_transformers()
    from ctranslate2.converters import TransformersConverter

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".staged-") as staged:
        link_model(model_dir, Path(staged))  # the tokenizer generate uses (train/tokenizer), beside the weights
        copy_tokenizer(tokenizer_dir, Path(staged))
        converter = TransformersConverter(staged, trust_remote_code=trust_remote_code)
        try:
            converter.convert(str(dest), quantization=compute, force=True)
        except (ValueError, NotImplementedError) as exc:  # the converters' "not supported" (e.g. an architecture)
            reason = str(exc).split(" (supported configurations", 1)[0]
            raise GlossError(
                f"CTranslate2 {version('ctranslate2')} cannot convert this model: {_first_line(reason)}",
                "Use --backend llama-cpp or --backend hf.",
            ) from None
    tokenizer = load_tokenizer(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    _check_tokenizer(tokenizer, dest)
    tokenizer.backend_tokenizer.save(str(dest / TOKENIZER))
    return {"eos_token_id": int(tokenizer.eos_token_id)}


def _check_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Refuse a tokenizer the ``tokenizers`` library alone would not reproduce: token strings the converted
    vocabulary numbers otherwise, or probes that encode or decode differently than through transformers (a BOS
    flag, a decoding clean-up), which would change the prompts' tokens or the returned text."""
    from gloss_cli.prompt import build_prompt

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GlossError(
            "The ct2 backend needs a fast tokenizer (tokenizers); this model has none.", "Use --backend hf."
        )
    vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    size = backend.get_vocab_size(with_added_tokens=True)
    if len(vocabulary) < size or any(backend.id_to_token(i) != vocabulary[i] for i in range(size)):
        raise GlossError(
            "CTranslate2 numbered this model's vocabulary otherwise than its tokenizer.", "Use --backend hf."
        )
    probes = (
        build_prompt(["Maybelline New York Great Lash Mascara, Blackest Black", "L'Oreal Paris Voluminous (2 pack)"]),
        "Title: Neutrogena Makeup Remover Cleansing Towelettes - 25 ct.\n",
        " it's a . b , c ! d ? e",
    )
    for text in probes:
        ids = tokenizer(text)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if backend.encode(text).ids != ids or backend.decode(ids, skip_special_tokens=True) != decoded:
            raise GlossError(
                "This model's tokenizer encodes or decodes otherwise through the tokenizers library alone.",
                "Use --backend hf.",
            )


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["no reason given"])[0][:200]


def load_generator(train_dir: Path, meta: dict[str, Any], *, options: Any, reporter: Reporter) -> CT2Generator:
    """gloss_cli.generate's entry point: the ``train/`` model converted once (``options.dtype``: auto = int8,
    fp32, or bf16/fp16 where this CPU's CTranslate2 computes in them), searching ``GLOSS_THREADS`` prompts at a time,
    else as many as this process has cores. A cached model.bin that CTranslate2 cannot load is converted again
    once."""
    from gloss_cli.models import cpu_threads

    ctranslate2 = import_ctranslate2()  # a missing runtime or an impossible dtype is said before a long conversion
    compute = compute_type(options.dtype, ctranslate2)
    threads = cpu_threads() or usable_cores()
    folder = converted_dir(train_dir, meta, compute, reporter)
    reporter.info(f"loading the trained model with CTranslate2 ({compute}, {threads} threads)")
    try:
        return CT2Generator(folder, compute_type=compute, threads=threads)
    except RuntimeError as exc:  # CTranslate2's "cannot load": a damaged model.bin of the recorded size
        reporter.warn(f"the {WHAT} cache {folder} does not load ({_first_line(str(exc))}); rebuilding it")
    shutil.rmtree(folder, ignore_errors=True)
    folder = converted_dir(train_dir, meta, compute, reporter)
    return CT2Generator(folder, compute_type=compute, threads=threads)
