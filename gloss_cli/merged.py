"""A trained LoRA folded into its base once, cached as a plain safetensors model, so that inference skips peft.

Loading base + adapter imports peft, and with it bitsandbytes and torch's compiler where the qlora extra is
installed: 4-5 s of a 20 s ``gloss recommend`` on 2 CPU cores (benchmarks/README.md). The merged model is made on
first use in ``$GLOSS_HOME/models/merged/<key>/`` and loaded by transformers alone afterwards. The key hashes the
adapter's bytes (sha256; a LoRA is MBs) and the base's files (names, sizes, mtimes: hashing hundreds of MB on
every call would cost what the cache saves), so a retrained adapter or a changed base makes a new folder.

The merge runs in fp32 whatever the dtype asked for later: folding a LoRA into bf16 weights would round the
update away, and a model loaded from the fp32 merge is the adapter path's weights to fp32 rounding (the tests
check the beams are the same). ``gloss-merged.json`` is written last, inside the folder that is renamed into place
(atomic; ``gloss_cli.cache``), and records every file's size: a folder without it, or with a file of another size,
or one whose safetensors header does not parse, is rebuilt with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gloss_cli.cache import cache_dir, cached_folder
from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError

if TYPE_CHECKING:
    import torch

MARKER = "gloss-merged.json"
WHAT = "merged model"  # as errors and warnings name the cache
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


def folder_sha256(folder: Path) -> str:
    """sha256 over a folder's files (names and bytes), README excepted."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != "README.md":
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as file:
                while block := file.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()


def merged_key(train_dir: Path, meta: dict[str, Any], reporter: Reporter | None = None) -> str:
    """The cache key of a LoRA ``train/`` folder's merge (what ``merged_dir`` is named), computed without merging."""
    return _source(train_dir, meta, reporter or Reporter())[0]


def _source(train_dir: Path, meta: dict[str, Any], reporter: Reporter) -> tuple[str, dict[str, Any], str, Path]:
    """The key, the record it hashes, the base model's location and the adapter folder."""
    from gloss_cli.models import base_location

    adapter = Path(train_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise GlossError(f"{adapter} is not a PEFT adapter folder; the train stage is incomplete.", "Run gloss train.")
    base = base_location(meta, reporter)
    record = {"schema": SCHEMA, "adapter_sha256": folder_sha256(adapter), "base": base}
    record["base_fingerprint"] = base_fingerprint(base)
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return key, record, base, adapter


def merged_dir(train_dir: Path, meta: dict[str, Any], reporter: Reporter | None = None) -> Path:
    """The cached merged model of a LoRA ``train/`` folder, made once (a folder from_pretrained loads)."""
    from importlib import metadata

    reporter = reporter or Reporter()
    key, record, base, adapter = _source(train_dir, meta, reporter)
    trust = bool(meta.get("trust_remote_code", False))

    def build(tmp: Path) -> dict[str, Any]:
        merge_lora(base, adapter, tmp, reporter, trust_remote_code=trust)
        return {"peft": metadata.version("peft")}

    # cached_folder locks the key: without it, a torchrun rank found another's merge unloadable (tests/test_sharded.py)
    folder = cache_dir("merged", WHAT) / key
    return cached_folder(folder, MARKER, record, build, what=WHAT, reporter=reporter)


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
        reporter.warn(f"the {WHAT} cache {folder} does not load ({_first_line(exc)}); rebuilding it")
    shutil.rmtree(folder, ignore_errors=True)
    folder = merged_dir(train_dir, meta, reporter)
    return load_causal_lm(str(folder), dtype=dtype, device=device, trust_remote_code=trust)


def _first_line(exc: BaseException) -> str:
    text = str(exc.message if isinstance(exc, GlossError) else exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]
