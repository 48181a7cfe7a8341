"""`gloss generate`: beam search over each user's prompt; the generated titles are the retrieval queries.

Output ``generate/<split>/queries.jsonl``, one line per user, exactly::

    {"user_id": str, "target": item_id, "history": [item ids, oldest first],
     "queries": [num_return strings, best beam first], "scores": [num_return floats]}

The file is append-only and resumable: each line is written and flushed as it is made, the file is fsynced after
every batch, and a restarted run reads the user_ids already there (cutting off a partial last line left by a kill)
and generates only the others. ``settings.json`` beside it holds the settings that shape the output; a restart
with different ones is refused rather than mixing two kinds of queries in one file. Under torchrun each process
appends its share of the users to a part file and rank 0 merges the parts into the file one process writes
(``gloss_cli.shards``).

Generation backends are chosen by name and meet the small :class:`Generator` protocol: ``hf`` (transformers,
batched with left padding) lives here, and searches with gloss's batched beam search
(``gloss_cli.backends.torch_beam``, each prompt prefilled once) or with transformers ``generate`` (``--search``; the
same beams either way); ``llama-cpp`` (gloss's beam search on llama.cpp) and ``ct2`` (CTranslate2's own beam search)
are imported from ``gloss_cli.backends`` only when chosen, and offer
``load_generator(train_dir, meta, *, options, reporter) -> Generator``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from gloss_cli import distributed, shards
from gloss_cli.console import Reporter
from gloss_cli.distributed import world
from gloss_cli.errors import GlossError
from gloss_cli.examples import fit_history
from gloss_cli.models import Trained, read_meta
from gloss_cli.project import Project
from gloss_cli.prompt import build_prompt, item_text

SPLITS = ("validation", "test")
BACKENDS = ("hf", "llama-cpp", "ct2")
MODULES = {"llama-cpp": "gloss_cli.backends.llama_cpp", "ct2": "gloss_cli.backends.ct2"}  # the backends besides hf
CPU_BACKENDS = (("llama-cpp", "llama_cpp"), ("ct2", "ctranslate2"))  # default_backend's order on a CPU: (name, module)
SEARCHES = ("gloss", "hf")
QUERIES = "queries.jsonl"
SETTINGS = "settings.json"
LIBRARIES = ("torch", "transformers", "peft", "llama_cpp_python", "ctranslate2")


class Generator(Protocol):
    """A generation backend. ``new_tokens`` counts the tokens of the returned sequences generated so far."""

    default_batch_size: int
    new_tokens: int

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Prompt lengths in tokens (to drop the oldest history items of a prompt that is too long)."""
        ...

    def generate(
        self, prompts: Sequence[str], *, beams: int, num_return: int, max_new_tokens: int
    ) -> list[list[tuple[str, float]]]:
        """Per prompt, ``num_return`` (text, beam score) pairs, best first."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings worth recording in the manifest (device, dtype, ...)."""
        ...

    def stop_at_line_end(self) -> None:
        """From now on a beam also finishes at a token that ends its line (see :func:`line_end_tokens`)."""
        ...


@dataclass(frozen=True)
class GenerateOptions:
    backend: str = "hf"
    beams: int = 5  # the paper's
    num_return: int = 5
    max_new_tokens: int = 50
    batch_size: int = 0  # 0: the backend's default (hf: up to 256 on CUDA with search gloss, 64 with hf; 8 on CPU)
    dtype: str = "auto"  # hf: bf16 on CUDA, fp32 on CPU; ct2: int8; llama-cpp: unused (its q8_0 export)
    search: str = "gloss"  # hf backend: gloss's batched beam search, or hf (transformers generate); same beams
    catalog_only: bool = False  # beams may only spell catalog titles (gloss search only; backends/trie.py)
    stop_at_newline: bool = False  # a beam also finishes at the end of its line (recommend: the query is that line)

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise GlossError(f"Unknown backend '{self.backend}'.", f"Use one of: {', '.join(BACKENDS)}.")
        if self.search not in SEARCHES:
            raise GlossError(f"Unknown search '{self.search}'.", f"Use one of: {', '.join(SEARCHES)}.")
        if self.beams < 1 or self.max_new_tokens < 1 or self.batch_size < 0:
            raise GlossError("--beams and --max-new-tokens must be >= 1, --batch-size >= 0.", "Fix the flags.")
        if not 1 <= self.num_return <= self.beams:
            raise GlossError(f"--num-return {self.num_return} must be between 1 and --beams {self.beams}.", "Fix it.")
        if self.catalog_only and (self.backend, self.search) != ("hf", "gloss"):
            raise GlossError(
                "--catalog-only needs the gloss search.", "Use --backend hf --search gloss, or drop --catalog-only."
            )


def line_end_tokens(encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]) -> list[int]:
    """The tokens that end a generated title's line: whitespace-only tokens holding a newline, found as the last
    token of a title line followed by one to three newlines or a space and one (BPE vocabularies merge them).

    A query is the first line of what the model writes (:func:`clean_query`): a weakly trained model that has not
    learnt to write EOS after the title goes on with another ``Title:`` line up to ``max_new_tokens``, all of it
    thrown away. Finishing the beam at the line's end keeps the first line's tokens and their scores."""
    found: list[int] = []
    for end in ("\n", "\n\n", "\n\n\n", " \n"):
        ids = encode("Title: x" + end)
        if ids and "\n" in (text := decode(ids[-1:])) and not text.strip() and ids[-1] not in found:
            found.append(ids[-1])
    return found


def clean_query(text: str) -> str:
    """A generated title: its first line, without the ``Title:`` prefix the model was trained to write."""
    line = text.split("\n", 1)[0].strip()
    return line[len("Title:") :].strip() if line.startswith("Title:") else line


class HFGenerator:
    """A transformers model: beam search on batches padded on the left (so every prompt ends where generation
    starts). ``search="gloss"``: gloss's batched beam search (each prompt prefilled once, not once per beam; a static
    KV cache; see gloss_cli.backends.torch_beam), which returns transformers' beams; ``"hf"``: ``model.generate``.
    ``cuda_graphs`` (gloss search on CUDA only) replays each decode step from a CUDA graph."""

    def __init__(
        self, trained: Trained, device: str, dtype: str, search: str = "gloss", *, cuda_graphs: bool = False
    ) -> None:
        self.model, self.tokenizer, self.device, self.dtype = trained.model, trained.tokenizer, device, dtype
        self.search, self.cuda_graphs = search, cuda_graphs and device == "cuda"
        self.weights = trained.weights
        self.stop_ids: list[int] = [self.tokenizer.eos_token_id]
        self.trie: Any = None  # set by restrict_to: beams may then only spell those texts
        self.tokenizer.padding_side = "left"
        self.default_batch_size = 8
        if device == "cuda":  # the gloss search does not copy prompts per beam, so it takes far larger batches
            self.default_batch_size = _gloss_cuda_batch(trained) if search == "gloss" else 64
        self.new_tokens = 0

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"backend": "hf", "search": self.search, "device": self.device, "dtype": self.dtype}
        described["weights"] = self.weights
        if self.trie is not None:
            described |= {"catalog_trie": {"titles": self.trie.sequences, "nodes": self.trie.dead}}
        return described | ({"cuda_graphs": True} if self.cuda_graphs else {})

    def stop_at_line_end(self) -> None:
        tokenizer = self.tokenizer
        ends = line_end_tokens(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.decode)
        self.stop_ids += [t for t in ends if t not in self.stop_ids]

    def restrict_to(self, texts: Sequence[str]) -> None:
        """From now on every beam spells one of ``texts`` as training tokenized targets (then EOS)."""
        from gloss_cli.backends.trie import catalog_trie

        self.trie = catalog_trie(self.tokenizer, texts, device=self.device)

    def generate(
        self, prompts: Sequence[str], *, beams: int, num_return: int, max_new_tokens: int
    ) -> list[list[tuple[str, float]]]:
        if self.search == "gloss":
            return self._gloss_search(prompts, beams=beams, num_return=num_return, max_new_tokens=max_new_tokens)
        return self._hf_generate(prompts, beams=beams, num_return=num_return, max_new_tokens=max_new_tokens)

    def _gloss_search(
        self, prompts: Sequence[str], *, beams: int, num_return: int, max_new_tokens: int
    ) -> list[list[tuple[str, float]]]:
        from gloss_cli.backends.torch_beam import search

        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        found = search(
            self.model,
            enc["input_ids"],
            enc["attention_mask"],
            beams=beams,
            num_return=num_return,
            max_new_tokens=max_new_tokens,
            eos_token_ids=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            cuda_graphs=self.cuda_graphs,
            trie=self.trie,
        )
        ids = [tokens for hyps in found for tokens, _ in hyps]
        self.new_tokens += sum(len(tokens) for tokens in ids)  # EOS included, as _hf_generate counts
        texts = iter(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        return [[(next(texts), score) for _, score in hyps] for hyps in found]

    def _hf_generate(
        self, prompts: Sequence[str], *, beams: int, num_return: int, max_new_tokens: int
    ) -> list[list[tuple[str, float]]]:
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_beams=beams,
            num_return_sequences=num_return,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids if len(self.stop_ids) > 1 else self.stop_ids[0],
        )
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=config)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        is_eos = torch.isin(new, torch.tensor(self.stop_ids, device=new.device))
        # tokens up to and including the first EOS; what follows is padding
        lengths = (torch.cumsum(is_eos, dim=1) == 0).sum(dim=1) + is_eos.any(dim=1)
        self.new_tokens += int(lengths.sum())
        if beams > 1:
            scores = out.sequences_scores
        else:  # greedy: the same length-normalised log-probability a beam score is
            steps = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            keep = torch.arange(steps.shape[1], device=steps.device)[None, :] < lengths[:, None]
            scores = (steps * keep).sum(dim=1) / lengths.clamp(min=1)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        values = scores.float().tolist()
        return [
            [(texts[j], values[j]) for j in range(i * num_return, (i + 1) * num_return)] for i in range(len(prompts))
        ]


def _gloss_cuda_batch(trained: Trained, beams: int = 5, max_new_tokens: int = 64, largest: int = 256) -> int:
    """Prompts per batch for the gloss search on CUDA: as many as fit within half the GPU memory that is free now
    (other processes may share the GPU), up to ``largest`` (on an H200, 1,024 untuned prompts ran at 118 users/s in
    batches of 256, 109 in 512 and 69 in 1,024: a larger batch pads more and waits for its slowest prompt). A prompt
    of ``max_seq_len`` tokens holds its KV rows twice while the search starts (the prefill's and the search's copy),
    its beams' generated KV rows, and a few float32 copies of its beams' next-token logits."""
    import torch

    config = trained.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * heads * head_dim * trained.model.dtype.itemsize
    tokens = 2 * int(trained.meta.get("max_seq_len", 1024)) + beams * max_new_tokens
    per_prompt = per_token * tokens + 6 * beams * text.vocab_size * 4
    free, _ = torch.cuda.mem_get_info()
    return max(8, min(largest, free // 2 // per_prompt))


def default_backend() -> str:
    """On a CPU, llama.cpp when llama-cpp-python is installed (the trained model exported to a merged GGUF once,
    then cached), else CTranslate2 when ctranslate2 is installed (converted once, then cached), else transformers;
    transformers on a GPU (ct2 runs on the CPU only)."""
    import importlib.util

    from gloss_cli.models import cuda_possible

    # the packages first: without either the answer is hf, and torch's CUDA check (an import of torch) is not needed
    found = [name for name, module in CPU_BACKENDS if importlib.util.find_spec(module) is not None]
    return found[0] if found and not cuda_possible() else "hf"


def refuse_pick_model(meta: dict[str, Any]) -> None:
    """A model trained with --task pick answers a candidate's letter: its generations would be letters, not titles."""
    if meta.get("task") == "pick":
        raise GlossError(
            "The trained model picks among candidates (gloss train --task pick): it does not generate titles.",
            "Score its pools: gloss rerank, then gloss eval --recipe '<its pool> order=lm'.",
        )


def open_generator(train_dir: Path, meta: dict[str, Any], options: GenerateOptions, reporter: Reporter) -> Generator:
    """The backend named by ``options.backend``, loaded with the trained model."""
    refuse_pick_model(meta)
    if options.backend in MODULES:
        name = MODULES[options.backend]
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            raise GlossError(
                f"The {options.backend} backend is not part of this gloss version.", "Use --backend hf."
            ) from None
        generator: Generator = module.load_generator(train_dir, meta, options=options, reporter=reporter)
        if options.stop_at_newline:
            generator.stop_at_line_end()
        return generator
    from gloss_cli.models import load_trained, pick_device, torch_dtype

    device = pick_device()
    dtype = str(torch_dtype(options.dtype, device)).removeprefix("torch.")
    reporter.info(f"loading the trained model ({meta['format']}, base {meta['base_model']['name']}) on {device}")
    trained = load_trained(train_dir, device=device, dtype=options.dtype, reporter=reporter)
    search = options.search
    if search == "gloss":
        from gloss_cli.backends.torch_beam import unsupported

        reason = unsupported(trained.model)
        if reason is not None:
            reporter.warn(f"the gloss search does not support {reason}; searching with transformers generate")
            search = "hf"
    hf = HFGenerator(trained, device, dtype, search)
    if options.stop_at_newline:
        hf.stop_at_line_end()
    return hf


def read_done(path: Path) -> set[str]:
    """user_ids already in ``path``. A partial last line (a run killed mid-write) is cut off the file."""
    return set(shards.read_lines(path))


def _check_settings(folder: Path, settings: dict[str, Any], overwrite: bool) -> None:
    path, queries, parts = folder / SETTINGS, folder / QUERIES, folder / shards.PARTS
    if overwrite:
        queries.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    written = [p for p in (queries, *shards.part_files(folder)) if p.is_file() and p.stat().st_size]
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed and written:
            raise GlossError(
                f"{written[0]} was generated with other settings ({', '.join(changed)} differ).",
                "Pass --overwrite to start it again, or repeat the earlier settings to resume.",
            )
    elif written:
        raise GlossError(f"{written[0]} has no {SETTINGS} beside it.", "Pass --overwrite to start it again.")
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _select(project: Project, split: str, users: Sequence[str] | None, limit: int) -> Any:
    from gloss_cli.data import load_split

    frame = load_split(project.path("data"), split)
    if users:
        wanted = [u.strip() for value in users for u in value.split(",") if u.strip()]
        known = set(frame.get_column("user_id").to_list())
        unknown = [u for u in wanted if u not in known]
        if unknown:
            raise GlossError(
                f"{len(unknown)} user(s) not in the {split} split: {', '.join(unknown[:5])}.",
                "Check the user ids and --split.",
            )
        frame = frame.filter(frame["user_id"].is_in(wanted))
    return frame.head(limit) if limit else frame


@dataclass
class GenerateResult:
    split: str
    path: Path
    users_in_file: int
    users_new: int
    users_skipped: int
    seconds: float
    new_tokens: int
    settings: dict[str, Any]
    gpu_peak_mib: float | None = None  # the most CUDA memory torch held at once while generating (None: no GPU)
    ranks: list[dict[str, Any]] | None = None  # under torchrun: what each process generated, and how fast

    def metrics(self) -> dict[str, Any]:
        per_s = self.users_new / self.seconds if self.seconds else None
        return (
            {
                "users": self.users_in_file,
                "users_new": self.users_new,
                "users_skipped": self.users_skipped,
                "seconds": round(self.seconds, 3),
                "users_per_s": round(per_s, 4) if per_s else None,
                "s_per_user": round(1 / per_s, 4) if per_s else None,
                "new_tokens": self.new_tokens,
                "tokens_per_s": round(self.new_tokens / self.seconds, 1) if self.seconds else None,
            }
            | ({"gpu_peak_mib": self.gpu_peak_mib} if self.gpu_peak_mib is not None else {})
            | ({"world_size": len(self.ranks), "ranks": self.ranks} if self.ranks else {})
        )


def gpu_peak_mib() -> float | None:
    """The peak of CUDA memory torch allocated in this process (MiB), when it used a GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _write_queries(
    generator: Generator,
    rows: list[dict[str, Any]],
    prompts: list[str],
    batches: list[list[int]],
    path: Path,
    options: GenerateOptions,
    tick: Any,
    done: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Generate ``batches`` (indices of ``rows``), appending each user's line to ``path`` as it is made. A user in
    ``done`` is generated with its batch but not written: a batch is always made whole, so that its beams are those
    one process finds."""
    count, t0 = 0, time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for batch in batches:
            results = generator.generate(
                [prompts[i] for i in batch],
                beams=options.beams,
                num_return=options.num_return,
                max_new_tokens=options.max_new_tokens,
            )
            for i, beams in zip(batch, results, strict=True):
                if rows[i]["user_id"] in done:
                    continue
                record = rows[i] | {
                    "queries": [clean_query(text) for text, _ in beams],
                    "scores": [round(float(score), 6) for _, score in beams],
                }
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                fh.flush()
            os.fsync(fh.fileno())
            count += len(batch)
            tick.advance(len(batch))
            rate = count / max(time.perf_counter() - t0, 1e-9)
            tick.update(description=f"generating · {rate:.2f} users/s · {generator.new_tokens:,} tokens")


def fit_prompts(
    count_tokens: Callable[[Sequence[str]], list[int]], histories: list[list[str]], budget: int
) -> list[str]:
    """The prompts of ``histories``, each cut (oldest items first) to at most ``budget`` tokens as ``count_tokens``
    (a generator's, or a tokenizer's) counts them."""
    prompts = [build_prompt(h) for h in histories]
    for i, n in enumerate(count_tokens(prompts)):
        if n > budget:
            h = histories[i]
            keep = fit_history(h, lambda t: count_tokens([build_prompt(t)])[0], budget)
            prompts[i] = build_prompt(h[len(h) - keep :])
    return prompts


def run(
    project: Project,
    split: str,
    options: GenerateOptions,
    *,
    users: Sequence[str] | None = None,
    limit: int = 0,
    overwrite: bool = False,
    command: str = "gloss generate",
    reporter: Reporter | None = None,
) -> GenerateResult:
    """The ``generate/<split>`` stage: queries for every selected user not yet in the file. Under torchrun each
    process generates its share of the users (``gloss_cli.shards``) and rank 0, which alone holds the project lock,
    merges them and records the stage."""
    reporter = reporter or Reporter()
    if split not in SPLITS:
        raise GlossError(f"Unknown split '{split}'.", f"Use one of: {', '.join(SPLITS)}.")
    options.check()
    here = world()
    if here.several:
        if options.backend != "hf":
            raise GlossError(
                f"--backend {options.backend} runs as one process (it uses every core itself).",
                "Run it without torchrun, or pass --backend hf.",
            )
        from gloss_cli.models import pick_device

        distributed.init_process_group(pick_device())
    data_record = project.require("data")
    train_record = project.require("train")
    meta = read_meta(project.path("train"))
    refuse_pick_model(meta)
    if meta.get("data", {}).get("fingerprint") != data_record["fingerprint"]:
        reporter.warn("the model was trained on an earlier 'gloss data' run; run 'gloss train' again")
    frame = _select(project, split, users, limit)
    budget = int(meta["max_seq_len"]) - options.max_new_tokens  # prompts as long as training saw, with room to answer
    settings = asdict(options) | {"max_prompt_tokens": budget, "train": train_record["fingerprint"]}
    settings.pop("batch_size")  # batching does not change what is generated
    settings.pop("search")  # both searches give the same beams
    for flag in ("catalog_only", "stop_at_newline"):
        if not settings[flag]:
            settings.pop(flag)  # as files written before the option have it
    params = {"split": split, **asdict(options), "users": list(users) if users else None, "limit": limit}
    rows = list(frame.select("user_id", "target", "history").iter_rows(named=True))
    if not here.main:  # ranks > 0 never take the lock nor write the manifest: their share of the users only
        return _sharded(project, split, rows, meta, options, budget, settings, reporter)
    with project.run_stage(
        f"generate/{split}", params, command=command, libraries=LIBRARIES, upstream=("data", "train"), in_place=True
    ) as stage:
        path = stage.dir / QUERIES
        _check_settings(stage.dir, settings, overwrite)
        stage.params["world_size"] = here.size
        if here.several or (stage.dir / shards.PARTS).is_dir():  # one process resuming N's parts: N = 1 now
            result = _sharded(project, split, rows, meta, options, budget, settings, reporter, stage.params)
            stage.metrics = result.metrics()
            return result
        done = read_done(path)
        todo = [r for r in rows if r["user_id"] not in done]
        skipped = len(rows) - len(todo)
        if skipped:
            reporter.info(f"resuming: {skipped:,} of {len(rows):,} users are already in {path.name}")
        t0, new_tokens = time.perf_counter(), 0
        if todo:
            generator, prompts = _prepare(project, todo, meta, options, budget, reporter)
            size = options.batch_size or generator.default_batch_size
            stage.params |= {"generator": generator.describe(), "batch_size": size}
            with reporter.progress("generating", total=len(todo)) as tick:
                t0 = time.perf_counter()
                _write_queries(generator, todo, prompts, shards.length_batches(prompts, size), path, options, tick)
            new_tokens = generator.new_tokens
        seconds = time.perf_counter() - t0
        found = len(read_done(path))
        result = GenerateResult(split, path, found, len(todo), skipped, seconds, new_tokens, settings, gpu_peak_mib())
        stage.metrics = result.metrics()
    return result


def _prepare(
    project: Project,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    options: GenerateOptions,
    budget: int,
    reporter: Reporter,
) -> tuple[Generator, list[str]]:
    """The generator, and the prompts of ``rows``."""
    generator = open_generator(project.path("train"), meta, options, reporter)
    titles = _titles(project)
    if options.catalog_only:
        assert isinstance(generator, HFGenerator)  # options.check() saw to it
        generator.restrict_to([item_text(t) for t in titles.values()])
    return generator, fit_prompts(generator.count_tokens, [[titles[i] for i in r["history"]] for r in rows], budget)


def _sharded(
    project: Project,
    split: str,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    options: GenerateOptions,
    budget: int,
    settings: dict[str, Any],
    reporter: Reporter,
    params: dict[str, Any] | None = None,
) -> GenerateResult:
    """This process's share of ``rows`` into its part file; on rank 0 (which gets the stage's ``params``), first the
    users the parts and queries.jsonl already hold, at the end the merge into queries.jsonl."""
    here, folder = world(), project.path(f"generate/{split}")
    path, users = folder / QUERIES, [r["user_id"] for r in rows]
    known: tuple[set[str], int] = (set(), 0)
    if here.main:  # read (and a partial last line cut) before any process appends to a part
        known = set(shards.read_all([path, *shards.part_files(folder)])).intersection(users), shards.batch_size(folder)
    done, recorded = distributed.broadcast(known)
    if done:
        reporter.info(f"resuming: {len(done):,} of {len(rows):,} users are already generated")
    t0 = time.perf_counter()
    mine: dict[str, Any] = {"rank": here.rank, "users_new": 0, "new_tokens": 0, "seconds": 0.0}
    if len(done) < len(rows):
        mine |= _share(project, folder, rows, meta, options, budget, done, recorded, reporter, params)
    reports = distributed.gather(mine)  # every process is done with its share
    distributed.leave()
    if not here.main:
        part = shards.part_path(folder, here)
        return GenerateResult(split, part, 0, mine["users_new"], len(done), mine["seconds"], mine["new_tokens"], {})
    lines = shards.merge(folder, path, users) if (folder / shards.PARTS).is_dir() else len(read_done(path))
    peaks = [r["gpu_peak_mib"] for r in reports if "gpu_peak_mib" in r]
    new, tokens = sum(r["users_new"] for r in reports), sum(r["new_tokens"] for r in reports)
    seconds, peak = time.perf_counter() - t0, max(peaks) if peaks else None
    return GenerateResult(split, path, lines, new, len(done), seconds, tokens, settings, peak, reports)


def _share(
    project: Project,
    folder: Path,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    options: GenerateOptions,
    budget: int,
    done: set[str],
    recorded: int,
    reporter: Reporter,
    params: dict[str, Any] | None,
) -> dict[str, Any]:
    """Generate this process's batches that are not all in ``done``; what it did, for rank 0's metrics."""
    here, users = world(), [r["user_id"] for r in rows]
    generator, prompts = _prepare(project, rows, meta, options, budget, reporter)
    # every process cuts the same batches; an automatic size (the run's first, if it recorded one) leaves each
    # process at least one batch
    size = distributed.all_min(
        options.batch_size or recorded or min(generator.default_batch_size, -(-len(rows) // here.size))
    )
    batches = shards.length_batches(prompts, size)
    if here.main:
        shards.write_plan(folder, [users[i] for batch in batches for i in batch], size, here.size)
        if params is not None:
            params |= {"generator": generator.describe(), "batch_size": size}
    distributed.wait_all()  # the plan is on disk before any part has a line
    share = [b for b in shards.share(batches, here) if any(users[i] not in done for i in b)]
    with reporter.progress(f"generating ({here.rank + 1} of {here.size})", total=sum(map(len, share))) as tick:
        t0 = time.perf_counter()
        _write_queries(generator, rows, prompts, share, shards.part_path(folder, here), options, tick, done)
    new = sum(users[i] not in done for b in share for i in b)
    mine = {"users_new": new, "new_tokens": generator.new_tokens, "seconds": round(time.perf_counter() - t0, 3)}
    peak = gpu_peak_mib()
    return mine | ({"gpu_peak_mib": peak} if peak is not None else {})


def _titles(project: Project) -> dict[str, str]:
    from gloss_cli.data import load_items

    return dict(load_items(project.path("data")).iter_rows())
