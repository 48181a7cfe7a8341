"""Export a trained model for llama.cpp: a merged GGUF (LoRA folded into the weights) or a GGUF LoRA adapter.

The converters are llama.cpp's own (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``), taken from the
llama-cpp-python sdist of the installed version so that the GGUF they write is one the installed runtime reads.
They are fetched once into ``$GLOSS_HOME/llama.cpp-src/<version>/`` and run with this interpreter in a subprocess
(they need sentencepiece, gguf, torch and transformers, which the ``train`` extra installs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.merged import copy_tokenizer, merge_lora
from gloss_cli.sources import gloss_home

PACKAGE = "llama-cpp-python"
# What the converters need from the sdist's vendor/llama.cpp (3 MB of its 176 MB): scripts, their package, the
# gguf-py they pin, and the two vocabularies some architectures borrow.
_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "requirements/", "LICENSE")
_KEEP_VOCABS = ("models/ggml-vocab-gpt-neox.gguf", "models/ggml-vocab-llama-spm.gguf")


def converter_dir(reporter: Reporter | None = None) -> Path:
    """The ``vendor/llama.cpp`` folder holding ``convert_hf_to_gguf.py``, fetched on first use.

    ``GLOSS_LLAMA_CPP_SRC`` points at a llama.cpp checkout to use instead (offline machines, pinned converters).
    """
    reporter = reporter or Reporter()
    override = os.environ.get("GLOSS_LLAMA_CPP_SRC")
    if override:
        folder = Path(override).expanduser()
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise GlossError(f"GLOSS_LLAMA_CPP_SRC={override} has no convert_hf_to_gguf.py", "Point it at llama.cpp.")
        return folder
    version = _installed_version()
    root = gloss_home() / "llama.cpp-src" / (version or "latest")
    if not (root / "convert_hf_to_gguf.py").is_file():
        _fetch(root, version, reporter)
    return root


def _installed_version() -> str | None:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None  # converting needs no runtime; the newest converters then


def _fetch(root: Path, version: str | None, reporter: Reporter) -> None:
    """Download the sdist with pip, extract the converters to a temp folder beside ``root``, rename it in place."""
    root.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    reporter.info(f"Fetching the llama.cpp converters ({spec} sdist, once)")
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        # Only this package as source: its build tools may come as wheels (pip prepares the sdist's metadata).
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, spec, "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise GlossError(
                f"Could not download the {spec} sdist for its converters: {_last_error(done.stderr)}",
                f"Set GLOSS_LLAMA_CPP_SRC to a llama.cpp checkout, or check that pip can reach the index ({spec}).",
            )
        staged = Path(tmp) / "llama.cpp"
        _extract_converters(sdists[0], staged)
        try:
            os.replace(staged, root)
        except OSError:
            if not (root / "convert_hf_to_gguf.py").is_file():  # not a concurrent fetch that won: a real failure
                raise


def _extract_converters(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            _, _, rest = member.name.partition("/vendor/llama.cpp/")
            wanted = rest.startswith(_KEEP) or rest in _KEEP_VOCABS
            if wanted and ".." not in Path(rest).parts and (member.isfile() or member.isdir()):
                member.name = rest
                members.append(member)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise GlossError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py", "Set GLOSS_LLAMA_CPP_SRC.")
        # The "data" filter refuses links out of dest and absolute paths (Python >= 3.10.12 has it).
        safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safe)


def _last_error(text: str) -> str:
    """The line that says what went wrong: the last one naming an error, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    return (errors or lines or ["no output"])[-1]


def export_gguf(
    base_model_dir: Path,
    adapter_dir: Path | None,
    out_path: Path,
    *,
    mode: Literal["merged", "lora"] = "merged",
    outtype: str = "q8_0",
    tokenizer_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> Path:
    """Write ``out_path``: the model with the adapter merged (``mode="merged"``), or the adapter alone as a GGUF
    LoRA (``mode="lora"``, loaded with ``LlamaCppGenerator(base.gguf, lora_path=...)``).

    ``adapter_dir`` is a PEFT LoRA folder, or None when ``base_model_dir`` is already the fine-tuned model.
    ``outtype``: f32, f16, bf16 or q8_0 (q8_0 keeps llama.cpp's full speed at a negligible loss).
    ``tokenizer_dir``: where the tokenizer files are when not beside the weights (gloss's ``train/tokenizer``).
    """
    reporter = reporter or Reporter()
    base_model_dir, out_path = Path(base_model_dir), Path(out_path)
    _check_inputs(base_model_dir, adapter_dir, mode)
    tools = converter_dir(reporter)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    try:
        if mode == "lora":
            assert adapter_dir is not None
            script = tools / "convert_lora_to_gguf.py"
            _convert(script, ["--base", str(base_model_dir), str(adapter_dir)], partial, outtype, reporter)
        else:
            with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".staged-") as staged:
                if adapter_dir is None:
                    link_model(base_model_dir, Path(staged))
                else:
                    merge_lora(base_model_dir, Path(adapter_dir), Path(staged), reporter)
                if tokenizer_dir is not None:
                    copy_tokenizer(Path(tokenizer_dir), Path(staged))
                write_special_token_flags(Path(staged))
                _convert(tools / "convert_hf_to_gguf.py", [staged], partial, outtype, reporter)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path


def _check_inputs(base_model_dir: Path, adapter_dir: Path | None, mode: str) -> None:
    if not (base_model_dir / "config.json").is_file():
        raise GlossError(f"{base_model_dir} is not a Hugging Face model folder (no config.json).")
    if mode not in ("merged", "lora"):
        raise GlossError(f"Unknown export mode {mode!r}", "Use 'merged' or 'lora'.")
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise GlossError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json).")
    if mode == "lora" and adapter_dir is None:
        raise GlossError("A GGUF LoRA export needs the adapter folder.", "Pass the PEFT adapter, or mode='merged'.")


def link_model(model_dir: Path, dest: Path) -> None:
    """A view of the model folder (links, not copies) whose tokenizer_config.json may be rewritten."""
    for path in model_dir.iterdir():
        if path.is_file():
            try:
                (dest / path.name).symlink_to(path.resolve())
            except OSError:  # no symlinks here (Windows without the privilege)
                shutil.copy2(path, dest / path.name)


def write_special_token_flags(model_dir: Path) -> None:
    """Record in tokenizer_config.json whether the HF tokenizer really adds BOS/EOS, for the converter to copy.

    llama.cpp's converter reads these flags (or guesses from the post-processor); when they are absent a
    SentencePiece GGUF defaults to adding BOS, and the prompt would then start with a token HF never saw.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("a").input_ids
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["add_bos_token"] = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    config["add_eos_token"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    config_path.unlink(missing_ok=True)  # may be a link into the user's model folder: never write through it
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _convert(script: Path, args: list[str], out: Path, outtype: str, reporter: Reporter) -> None:
    reporter.info(f"Converting with {script.name} ({outtype})")
    command = [sys.executable, str(script), *args, "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise GlossError(
            f"{script.name} failed: {_last_error(done.stderr or done.stdout)}",
            "It needs sentencepiece, gguf, torch and transformers: pip install 'gloss[train]'.",
        )


EXPORTS = {"gguf": "model-q8_0.gguf", "gguf-lora": "adapter-f16.gguf"}  # gloss train --export NAME: file in train/


def export_trained(
    train_dir: Path,
    meta: dict[str, Any],
    *,
    outtype: str = "q8_0",
    out: Path | None = None,
    mode: Literal["merged", "lora"] = "merged",
    reporter: Reporter | None = None,
) -> Path:
    """A ``train/`` folder (``adapter/`` or ``model/``, ``tokenizer/``, ``meta.json``) as one GGUF: the merged model
    (default), or with ``mode="lora"`` the LoRA adapter alone (for llama.cpp's ``--lora`` over the base GGUF).

    Without ``out``, made once and cached in ``$GLOSS_HOME/gguf/<key>/`` where the key hashes meta.json and the
    weight files' names, sizes and mtimes, so that retraining makes a new export. ``gloss train --export`` writes
    it into the train folder instead (``EXPORTS``), where generate and recommend find it first.
    """
    reporter = reporter or Reporter()
    train_dir = Path(train_dir)
    full = meta.get("format") == "full"
    weights = train_dir / ("model" if full else "adapter")
    if not weights.is_dir():
        raise GlossError(f"{weights} is missing; the train stage is incomplete.", "Run 'gloss train' again.")
    if mode == "lora" and full:
        raise GlossError("A full fine-tune has no LoRA adapter to export.", "Use --export gguf (the merged model).")
    if out is None:
        exported = train_dir / EXPORTS["gguf"]
        if mode == "merged" and outtype == "q8_0" and exported.is_file():
            return exported
        digest = hashlib.sha256((train_dir / "meta.json").read_bytes() if (train_dir / "meta.json").is_file() else b"")
        for path in sorted(weights.iterdir()):
            stat = path.stat()
            digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        name = f"model-{outtype}.gguf" if mode == "merged" else f"adapter-{outtype}.gguf"
        out = gloss_home() / "gguf" / digest.hexdigest()[:16] / name
        if out.is_file():
            return out
    reporter.info(f"Exporting the trained model to GGUF ({mode}, {outtype}) -> {out}")
    tokenizer = train_dir / "tokenizer" if (train_dir / "tokenizer").is_dir() else None
    if full:
        return export_gguf(weights, None, out, outtype=outtype, tokenizer_dir=tokenizer, reporter=reporter)
    from gloss_cli.models import base_location

    base = _local_model_dir(base_location(meta, reporter))
    return export_gguf(base, weights, out, mode=mode, outtype=outtype, tokenizer_dir=tokenizer, reporter=reporter)


def _local_model_dir(location: str) -> Path:
    """A local folder for a base model given as a folder or a hub id (the converters read files, not ids)."""
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(location, allow_patterns=patterns))
