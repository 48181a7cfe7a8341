"""A trained LoRA folded into its base once, cached as a plain safetensors model, so that inference skips peft.

Loading base + adapter imports peft, and with it bitsandbytes and torch's compiler where the qlora extra is
installed: 4-5 s of a 20 s ``gloss recommend`` on 2 CPU cores (benchmarks/README.md). The merged model is made on
first use in ``$GLOSS_HOME/models/merged/<key>/`` and loaded by transformers alone afterwards. The key hashes the
adapter's bytes (sha256; a LoRA is MBs) and the base's files (names, sizes, mtimes: hashing hundreds of MB on
every call would cost what the cache saves), so a retrained adapter or a changed base makes a new folder.

The merge runs in fp32 whatever the dtype asked for later: folding a LoRA into bf16 weights would round the
update away, and a model loaded from the fp32 merge is the adapter path's weights to fp32 rounding (the tests
check the beams are the same). ``gloss-merged.json`` is written last, inside the folder that is renamed into place
(atomic), and records every file's size: a folder without it, or with a file of another size, or one whose
safetensors header does not parse, is rebuilt with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError

if TYPE_CHECKING:
    import torch

MARKER = "gloss-merged.json"
SCHEMA = 1  # bump when the folder's layout or the merge changes: older folders are then not found
# Tokenizer files copied beside the merged weights, as llama.cpp's converters expect them (export reads this folder).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def merge_lora(
    base: str | Path, adapter_dir: Path, dest: Path, reporter: Reporter, *, trust_remote_code: bool = False
) -> None:
    """Fold the LoRA into the base weights in fp32 (PEFT ``merge_and_unload``) and save a plain HF folder in
    ``dest``, with the tokenizer files of the base folder and then of the adapter folder (the adapter's win)."""
    import torch
    from peft import PeftModel

    from gloss_cli.models import load_causal_lm

    reporter.info(f"merging {Path(adapter_dir).name} into {Path(base).name} (fp32, once)")
    model = load_causal_lm(str(base), dtype=torch.float32, device="cpu", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    # Under torch.distributed, save_pretrained writes on rank 0 only (should_save_on_this_rank), and the rank that
    # holds merged_dir's lock may be another: it left a folder without weights (tests/test_sharded.py). This merge is
    # one process's own file, whatever its rank: the instance's answer overrides the class's (no barrier follows
    # without a tensor-parallel config). save_pretrained keeps the tied-weight handling export's converter needs.
    merged.should_save_on_this_rank = lambda is_main_process: is_main_process
    merged.save_pretrained(dest)
    for folder in (Path(base), Path(adapter_dir)):
        copy_tokenizer(folder, dest)


def copy_tokenizer(folder: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            (dest / name).unlink(missing_ok=True)  # may be a link into the user's folder: replace, never write through
            shutil.copy2(folder / name, dest / name)


def _files_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"|{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def base_fingerprint(location: str) -> str:
    """A local folder: its files' names, sizes and mtimes. A hub id: the id and the revision in the local hub cache
    (none yet: the id alone; the folder made then is found again only until the model is downloaded)."""
    if Path(location).is_dir():
        return _files_fingerprint(Path(location))
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(location, "config.json")
    revision = Path(found).parent.name if isinstance(found, str) else "not-cached"
    return hashlib.sha256(f"hub|{location}|{revision}".encode()).hexdigest()


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 over the adapter folder's files (names and bytes), README excepted."""
    digest = hashlib.sha256()
    for path in sorted(adapter_dir.iterdir()):
        if path.is_file() and path.name != "README.md":
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as file:
                while block := file.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()


def merged_dir(train_dir: Path, meta: dict[str, Any], reporter: Reporter | None = None) -> Path:
    """The cached merged model of a LoRA ``train/`` folder, made once (a folder from_pretrained loads)."""
    from gloss_cli.models import base_location, gloss_home

    reporter = reporter or Reporter()
    adapter = Path(train_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise GlossError(f"{adapter} is not a PEFT adapter folder; the train stage is incomplete.", "Run gloss train.")
    base = base_location(meta, reporter)
    record = {"schema": SCHEMA, "adapter_sha256": adapter_sha256(adapter), "base": base}
    record["base_fingerprint"] = base_fingerprint(base)
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    folder = gloss_home() / "models" / "merged" / key
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GlossError(
            f"Cannot write the merged model cache in {folder.parent}: {exc.strerror or exc}.",
            "Set GLOSS_HOME to a writable folder.",
        ) from None
    # One process checks and builds at a time (torchrun's ranks, two commands): without the lock, a rank found
    # another's merge unloadable under load (tests/test_sharded.py), and two merges would cost twice the time.
    with FileLock(str(folder.parent / f".{key}.lock")):
        problem = check_merged(folder)
        if problem is None:
            return folder
        if folder.exists():
            reporter.warn(f"the merged model cache {folder} is {problem}; rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
        _build(folder, base, adapter, record, reporter, trust_remote_code=bool(meta.get("trust_remote_code", False)))
    return folder


def check_merged(folder: Path) -> str | None:
    """Why ``folder`` is no complete merged model (None: it is one). Sizes only: see the module's docstring."""
    marker = folder / MARKER
    if not marker.is_file():
        return "incomplete (no gloss-merged.json)" if folder.exists() else "missing"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        sizes = {str(name): int(size) for name, size in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return "corrupt (unreadable gloss-merged.json)"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"corrupt ({name} is missing or not {size:,} bytes)"
    return None


def _build(
    folder: Path, base: str, adapter: Path, record: dict[str, Any], reporter: Reporter, *, trust_remote_code: bool
) -> None:
    from importlib import metadata

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise GlossError(
            f"Cannot write the merged model cache in {folder.parent}: {exc.strerror or exc}.",
            "Set GLOSS_HOME to a writable folder.",
        ) from None
    try:
        merge_lora(base, adapter, tmp, reporter, trust_remote_code=trust_remote_code)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        record = record | {"peft": metadata.version("peft"), "files": files}
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:
            if check_merged(folder) is not None:  # not a concurrent merge that finished first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_merged(
    train_dir: Path,
    meta: dict[str, Any],
    *,
    dtype: torch.dtype,
    device: str,
    reporter: Reporter | None = None,
) -> Any:
    """The merged model of a LoRA ``train/`` folder as a plain transformers model (no peft import once cached).
    A cached folder whose weights do not load (a damaged safetensors header) is rebuilt once."""
    from safetensors import SafetensorError

    from gloss_cli.models import load_causal_lm

    reporter = reporter or Reporter()
    trust = bool(meta.get("trust_remote_code", False))
    folder = merged_dir(train_dir, meta, reporter)
    try:
        return load_causal_lm(str(folder), dtype=dtype, device=device, trust_remote_code=trust)
    except (GlossError, SafetensorError) as exc:
        reporter.warn(f"the merged model cache {folder} does not load ({_first_line(exc)}); rebuilding it")
    shutil.rmtree(folder, ignore_errors=True)
    folder = merged_dir(train_dir, meta, reporter)
    return load_causal_lm(str(folder), dtype=dtype, device=device, trust_remote_code=trust)


def _first_line(exc: BaseException) -> str:
    text = str(exc.message if isinstance(exc, GlossError) else exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]
