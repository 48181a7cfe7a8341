"""`gloss generate`: beam search over each user's prompt; the generated titles are the retrieval queries.

Output ``generate/<split>/queries.jsonl``, one line per user, exactly::

    {"user_id": str, "target": item_id, "history": [item ids, oldest first],
     "queries": [num_return strings, best beam first], "scores": [num_return floats]}

The file is append-only and resumable: each line is written and flushed as it is made, the file is fsynced after
every batch, and a restarted run reads the user_ids already there (cutting off a partial last line left by a kill)
and generates only the others. ``settings.json`` beside it holds the settings that shape the output; a restart
with different ones is refused rather than mixing two kinds of queries in one file.

Generation backends are chosen by name and meet the small :class:`Generator` protocol: ``hf`` (transformers,
batched with left padding) lives here, and searches with gloss's batched beam search
(``gloss_cli.backends.torch_beam``, each prompt prefilled once) or with transformers ``generate`` (``--search``; the
same beams either way); ``llama-cpp`` is imported from ``gloss_cli.backends.llama_cpp`` only when
chosen, and must offer ``load_generator(train_dir, meta, *, options, reporter) -> Generator``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.examples import fit_history
from gloss_cli.models import Trained, read_meta
from gloss_cli.project import Project
from gloss_cli.prompt import build_prompt, item_text

SPLITS = ("validation", "test")
BACKENDS = ("hf", "llama-cpp")
SEARCHES = ("gloss", "hf")
QUERIES = "queries.jsonl"
SETTINGS = "settings.json"
LIBRARIES = ("torch", "transformers", "peft", "llama_cpp_python")


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


@dataclass(frozen=True)
class GenerateOptions:
    backend: str = "hf"
    beams: int = 5  # the paper's
    num_return: int = 5
    max_new_tokens: int = 50
    batch_size: int = 0  # 0: the backend's default (hf: up to 256 on CUDA with search gloss, 64 with hf; 8 on CPU)
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    search: str = "gloss"  # hf backend: gloss's batched beam search, or hf (transformers generate); same beams
    catalog_only: bool = False  # beams may only spell catalog titles (gloss search only; backends/trie.py)

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
                "--catalog-only needs the gloss search.", "Drop --backend llama-cpp and --search hf, or --catalog-only."
            )


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
        if self.trie is not None:
            described |= {"catalog_trie": {"titles": self.trie.sequences, "nodes": self.trie.dead}}
        return described | ({"cuda_graphs": True} if self.cuda_graphs else {})

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
            eos_token_ids=[self.tokenizer.eos_token_id],
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

        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_beams=beams,
            num_return_sequences=num_return,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=config)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        is_eos = new == eos
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
    """On a CPU, llama.cpp (the trained model is exported to a merged GGUF once, then cached) when
    llama-cpp-python is installed; transformers on a GPU or without llama-cpp-python."""
    import importlib.util

    from gloss_cli.models import pick_device

    if pick_device() == "cpu" and importlib.util.find_spec("llama_cpp") is not None:
        return "llama-cpp"
    return "hf"


def open_generator(train_dir: Path, meta: dict[str, Any], options: GenerateOptions, reporter: Reporter) -> Generator:
    """The backend named by ``options.backend``, loaded with the trained model."""
    if options.backend == "llama-cpp":
        try:
            module = importlib.import_module("gloss_cli.backends.llama_cpp")
        except ModuleNotFoundError as exc:
            if exc.name != "gloss_cli.backends.llama_cpp":
                raise
            raise GlossError("The llama-cpp backend is not part of this gloss version.", "Use --backend hf.") from None
        generator: Generator = module.load_generator(train_dir, meta, options=options, reporter=reporter)
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
    return HFGenerator(trained, device, dtype, search)


def read_done(path: Path) -> set[str]:
    """user_ids already in ``path``. A partial last line (a run killed mid-write) is cut off the file."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        os.truncate(path, end)
    done: set[str] = set()
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["user_id"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise GlossError(
                f"{path}, line {n} is not a queries record.", "Delete the file, or pass --overwrite."
            ) from None
    return done


def _check_settings(folder: Path, settings: dict[str, Any], overwrite: bool) -> None:
    path, queries = folder / SETTINGS, folder / QUERIES
    if overwrite:
        queries.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed and queries.is_file() and queries.stat().st_size:
            raise GlossError(
                f"{queries} was generated with other settings ({', '.join(changed)} differ).",
                "Pass --overwrite to start it again, or repeat the earlier settings to resume.",
            )
    elif queries.is_file() and queries.stat().st_size:
        raise GlossError(f"{queries} has no {SETTINGS} beside it.", "Pass --overwrite to start it again.")
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

    def metrics(self) -> dict[str, Any]:
        per_s = self.users_new / self.seconds if self.seconds else None
        return {
            "users": self.users_in_file,
            "users_new": self.users_new,
            "users_skipped": self.users_skipped,
            "seconds": round(self.seconds, 3),
            "users_per_s": round(per_s, 4) if per_s else None,
            "s_per_user": round(1 / per_s, 4) if per_s else None,
            "new_tokens": self.new_tokens,
            "tokens_per_s": round(self.new_tokens / self.seconds, 1) if self.seconds else None,
        } | ({"gpu_peak_mib": self.gpu_peak_mib} if self.gpu_peak_mib is not None else {})


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
    path: Path,
    options: GenerateOptions,
    tick: Any,
) -> None:
    batch_size = options.batch_size or generator.default_batch_size
    # longest prompts first: the largest batch comes first, so a too-large --batch-size fails at once
    order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
    done, t0 = 0, time.perf_counter()
    with path.open("a", encoding="utf-8") as fh:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            results = generator.generate(
                [prompts[i] for i in batch],
                beams=options.beams,
                num_return=options.num_return,
                max_new_tokens=options.max_new_tokens,
            )
            for i, beams in zip(batch, results, strict=True):
                record = rows[i] | {
                    "queries": [clean_query(text) for text, _ in beams],
                    "scores": [round(float(score), 6) for _, score in beams],
                }
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                fh.flush()
            os.fsync(fh.fileno())
            done += len(batch)
            tick.advance(len(batch))
            rate = done / max(time.perf_counter() - t0, 1e-9)
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
    """The ``generate/<split>`` stage: queries for every selected user not yet in the file."""
    reporter = reporter or Reporter()
    if split not in SPLITS:
        raise GlossError(f"Unknown split '{split}'.", f"Use one of: {', '.join(SPLITS)}.")
    options.check()
    data_record = project.require("data")
    train_record = project.require("train")
    meta = read_meta(project.path("train"))
    if meta.get("data", {}).get("fingerprint") != data_record["fingerprint"]:
        reporter.warn("the model was trained on an earlier 'gloss data' run; run 'gloss train' again")
    frame = _select(project, split, users, limit)
    budget = int(meta["max_seq_len"]) - options.max_new_tokens  # prompts as long as training saw, with room to answer
    settings = asdict(options) | {"max_prompt_tokens": budget, "train": train_record["fingerprint"]}
    settings.pop("batch_size")  # batching does not change what is generated
    settings.pop("search")  # both searches give the same beams
    if not options.catalog_only:
        settings.pop("catalog_only")  # as files written before the option have it
    params = {"split": split, **asdict(options), "users": list(users) if users else None, "limit": limit}
    with project.run_stage(
        f"generate/{split}", params, command=command, libraries=LIBRARIES, upstream=("data", "train"), in_place=True
    ) as stage:
        path = stage.dir / QUERIES
        _check_settings(stage.dir, settings, overwrite)
        done = read_done(path)
        todo = frame.filter(~frame["user_id"].is_in(list(done)))
        skipped = frame.height - todo.height
        if skipped:
            reporter.info(f"resuming: {skipped:,} of {frame.height:,} users are already in {path.name}")
        t0, new_tokens = time.perf_counter(), 0
        if todo.height:
            generator = open_generator(project.path("train"), meta, options, reporter)
            titles = _titles(project)
            if options.catalog_only:
                assert isinstance(generator, HFGenerator)  # options.check() saw to it
                generator.restrict_to([item_text(t) for t in titles.values()])
            stage.params["generator"] = generator.describe()
            stage.params["batch_size"] = options.batch_size or generator.default_batch_size
            rows = list(todo.select("user_id", "target", "history").iter_rows(named=True))
            prompts = fit_prompts(generator.count_tokens, [[titles[i] for i in r["history"]] for r in rows], budget)
            with reporter.progress("generating", total=len(rows)) as tick:
                t0 = time.perf_counter()
                _write_queries(generator, rows, prompts, path, options, tick)
            new_tokens = generator.new_tokens
        seconds = time.perf_counter() - t0
        found = len(read_done(path))
        result = GenerateResult(split, path, found, todo.height, skipped, seconds, new_tokens, settings, gpu_peak_mib())
        stage.metrics = result.metrics()
    return result


def _titles(project: Project) -> dict[str, str]:
    from gloss_cli.data import load_items

    return dict(load_items(project.path("data")).iter_rows())
