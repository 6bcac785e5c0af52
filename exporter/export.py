"""Export a backbone and its Medusa heads into a self-describing artifact folder.

    artifact/
      model.onnx (+ model.onnx.data)   exporter.step.BackboneStep (docs/graph_contract.md)
      heads.onnx (+ heads.onnx.data)   exporter.step.HeadsStep
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      medusa_config.json               runtime.artifact.ArtifactConfig
      datastore.npz (optional)         runtime.datastore.Datastore (ExportOptions.datastore)

:func:`export_artifact` writes everything into a hidden temporary folder next to
``out_dir``, validates it there (ONNX Runtime against PyTorch, :mod:`exporter.validate`)
and moves it into place with one ``os.replace`` at the very end: a failed or interrupted
export leaves nothing half-written, and an existing artifact is replaced only with
``force=True``.

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``).
Both exporters give a graph that is correct for every shape on torch 2.13 /
transformers 5.24 when traced with more than one new token and a non-empty cache, but

* the dynamo exporter took 247 s for SmolLM2-135M on the 2-core CPU machine against
  28-40 s for TorchScript (the slow test and every user pay that on each export);
* the dynamo graph carries the additive-mask constant ``finfo(float32).min`` (-3.4e38,
  which does not exist in fp16), while the TorchScript graph (with :func:`tracing_patches`)
  keeps the boolean mask up to one ``Where(mask, scores, -inf)`` per layer inside
  attention (-inf is exact in fp16);
* transformers' SDPA glue computes ``is_causal = q_length > 1 and ...`` in Python, a
  symbolic bool under dynamo (its own TODO says the exporter must cope); the tracer
  evaluates it once for the example shape, which is what we want with a mask given.

The TorchScript exporter supports opsets up to 20; TensorRT 10's ONNX parser takes 17-21,
so the accepted range here is 17-20 (default 18).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from exporter.fused import FUSED_OPSET, MAX_EXTERNAL_DATA_THRESHOLD_MB
from runtime.artifact import (
    CONFIG_FILE,
    HEADS_INPUTS,
    HEADS_OUTPUTS,
    HYDRA_INPUTS,
    HYDRA_OUTPUTS,
    ArtifactConfig,
    GraphSpec,
    config_digest,
    portable_io,
    record_checksums,
)
from runtime.errors import ArtifactError, CheckpointError, MedusaError, sigterm_as_interrupt

BACKBONE_FILE = "model.onnx"
HEADS_FILE = "heads.onnx"
MIN_OPSET, MAX_OPSET = 17, 20  # TensorRT 10 parser: 17-21; TorchScript exporter: <= 20
DEFAULT_OPSET = 18
DEFAULT_EXTERNAL_DATA_THRESHOLD_MB = 1024.0
DEFAULT_TREE = "cpu_8"
EXPORTER = "torchscript"
# Example shapes the graphs are traced with. new_tokens > 1 and past_sequence > 0: with one
# new token transformers' SDPA glue takes a decode-only GQA shortcut (pack_gqa) that would
# be baked into the graph, and an empty past traces a different cache-concatenation path.
TRACE_BATCH, TRACE_PAST, TRACE_NEW = 2, 5, 3

log = logging.getLogger("medusa_trt.exporter")


GRAPHS = ("fused", "portable")
DEFAULT_GRAPH = "fused"
# --precision -> the graphs' float dtype (weights of int8 / int4 are MatMulNBits blocks;
# activations, logits and the cache stay float32)
PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}


@dataclass
class ExportOptions:
    # float32 | float16: logits, hidden states and the KV cache in the graphs; None: the one
    # ``precision`` implies (float32 when neither is given); set by check_options
    dtype: str | None = None
    # "fused": ONNX Runtime's fused kernels with an in-place cache (exporter/fused.py);
    # "portable": the traced standard-ONNX graph TensorRT's parser takes (exporter/step.py)
    graph: str = DEFAULT_GRAPH
    # fp32 | fp16 | int8 | int4 (weight-only MatMulNBits, fused graph only); None: from dtype
    precision: str | None = None
    opset: int = DEFAULT_OPSET
    # a graph whose weights exceed this many MB is saved with its tensors in ``<file>.data``
    external_data_threshold_mb: float = DEFAULT_EXTERNAL_DATA_THRESHOLD_MB
    tree: str | None = None  # default tree recorded in the artifact; None: cpu_8, or chain_K for K < 4 heads
    sampling_tree: str | None = None  # the tree exact sampling uses when none is given (None: the default tree)
    max_context: int | None = None  # cap on the context the runtime sizes its cache for
    force: bool = False  # replace an existing out_dir
    validate: bool = True  # ONNX Runtime vs PyTorch before the artifact is moved into place
    source_model: str | None = None  # provenance: what the user named (folder or smollm2-135m)
    source_model_path: str | None = None  # provenance: the local Hugging Face folder it resolved to
    validation_trees: tuple[str, ...] = ("mc_sim_7b_63", "chain_3")
    # also write heads_int8.onnx (ONNX Runtime dynamic quantization) for CPU runs: the heads
    # only propose candidates, so this cannot change the output (exporter/quantize.py)
    heads_int8: bool = True
    # also write batch.onnx (fused float graphs): several sequences per engine call, for
    # `medusa-run serve` and load(..., max_batch=N); shares model.onnx's weights file
    batch_graph: bool = True
    # the fused float32 graph screens its lm_head in int8 for greedy steps (exporter.fused._screen):
    # the same tokens as the float lm_head, about a tenth faster a plain step on SmolLM2 (2 CPU cores)
    lm_head_screen: bool = True
    validation_threads: int | None = None  # cap torch/ORT threads while validating (None: as they are)
    # a datastore.npz (runtime/datastore.py: drafts from the model's own answers, `medusa-train
    # datastore`) copied into the artifact, checked against the model's vocabulary; None: none
    datastore: str | None = None


# ---------------------------------------------------------------------------- I/O names


backbone_io = portable_io  # the contract's names and axes: runtime/artifact.py


def heads_io(kind: str = "medusa") -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Input names, output names and named dynamic axes of ``heads.onnx`` (Medusa or Hydra heads)."""
    if kind == "hydra":
        return list(HYDRA_INPUTS), list(HYDRA_OUTPUTS), {name: ["batch"] for name in (*HYDRA_INPUTS, *HYDRA_OUTPUTS)}
    return list(HEADS_INPUTS), list(HEADS_OUTPUTS), {name: ["batch"] for name in (*HEADS_INPUTS, *HEADS_OUTPUTS)}


def _torch_axes(axes: dict[str, list[str]]) -> dict[str, dict[int, str]]:
    return {name: dict(enumerate(names)) for name, names in axes.items()}


# ---------------------------------------------------------------------------- patches


@contextlib.contextmanager
def tracing_patches(model) -> Iterator[None]:
    """What tracing needs, restored on exit (the eager behaviour of step.py is untouched).

    * the model runs in eval mode with SDPA attention (the implementation BackboneStep's
      4-D boolean mask is written for);
    * transformers' ``use_gqa_in_sdpa`` answers False, so grouped-query attention is
      traced as an explicit ``repeat_kv`` (Expand + Reshape, which every ONNX consumer
      runs) instead of ``scaled_dot_product_attention(enable_gqa=True)``;
      ``TRANSFORMERS_SDPA_FORCE_GQA`` is ignored for the same reason;
    * ``torch.nn.functional.scaled_dot_product_attention`` is replaced by
      :func:`_traceable_sdpa`, the same math written with ops whose dtype follows the
      model: the TorchScript symbolic for SDPA builds its boolean-mask constants (0 and
      -inf) in float32 whatever the model's dtype, so an fp16 export came out with every
      attention in float32 and every ``o_proj`` weight promoted to float32;
    * gradients are off and the TorchScript tracer's warnings (shape-to-int conversions
      that are expected here) are silenced.
    """
    import torch
    from transformers.integrations import sdpa_attention

    config = getattr(model, "config", None)
    configs = (
        []
        if config is None
        else [config, *[getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {}]]
    )
    saved_impl = [(c, getattr(c, "_attn_implementation", None)) for c in configs if c is not None]
    saved_training = model.training
    saved_gqa = sdpa_attention.use_gqa_in_sdpa
    saved_sdpa = torch.nn.functional.scaled_dot_product_attention
    saved_env = os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
    try:
        for c, _ in saved_impl:
            c._attn_implementation = "sdpa"
        model.eval()
        sdpa_attention.use_gqa_in_sdpa = lambda *a, **k: False
        torch.nn.functional.scaled_dot_product_attention = _traceable_sdpa(saved_sdpa)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = saved_gqa
        torch.nn.functional.scaled_dot_product_attention = saved_sdpa
        for c, impl in saved_impl:
            c._attn_implementation = impl
        model.train(saved_training)
        if saved_env is not None:
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = saved_env


def _traceable_sdpa(original):
    """SDPA with a boolean mask as ``MatMul -> Where(mask, scores, -inf) -> Softmax -> MatMul``.

    q and k are each scaled by sqrt(scale) before the product (as torch's math kernel
    does, to keep fp16 scores in range); masking and softmax run in float32 and the
    probabilities are cast back to the model's dtype, so an fp16 graph keeps its matmuls
    and weights in fp16 and its only special constant is -inf (exact in fp16; no
    ``finfo.min``). Every row sees at least itself, so no row is all -inf. Calls this does
    not cover (no mask, a float mask, causal, dropout, enable_gqa) go to ``original``.
    """
    import math

    import torch

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is None or attn_mask.dtype != torch.bool or is_causal or dropout_p or enable_gqa:
            return original(
                query,
                key,
                value,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        s = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
        scores = torch.matmul(query * s, key.transpose(-2, -1) * s)
        if scores.dtype != torch.float32:
            scores = scores.to(torch.float32)
        scores = torch.where(attn_mask, scores, torch.tensor(float("-inf"), dtype=torch.float32))
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        return torch.matmul(probs, value)

    return sdpa


# ---------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress(what: str) -> Iterator[None]:
    """Log ``what ...`` (DEBUG) then ``what: done (12.3 s)`` (INFO), or ``failed after``."""
    log.debug("%s ...", what)
    t = time.perf_counter()
    try:
        yield
    except BaseException:
        log.info("%s: failed after %.1f s", what, time.perf_counter() - t)
        raise
    log.info("%s: done (%.1f s)", what, time.perf_counter() - t)


# ---------------------------------------------------------------------------- tracing


def example_inputs(model, batch: int = TRACE_BATCH, past: int = TRACE_PAST, new: int = TRACE_NEW, seed: int = 0):
    """Inputs of BackboneStep with ``past`` cached and ``new`` new tokens (causal mask)."""
    import torch

    c = model.config
    dtype = next(model.parameters()).dtype
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (batch, new), generator=g)
    pos = (past + torch.arange(new)).expand(batch, new).contiguous()
    mask = torch.tril(torch.ones(new, new, dtype=torch.bool)).expand(batch, new, new).contiguous()
    cache = [
        torch.randn(batch, past, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2 * c.num_hidden_layers)
    ]
    return (ids, pos, mask, *cache)


def _trace(module, args, path: Path, inputs, outputs, axes, opset: int) -> None:
    import torch

    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=_torch_axes(axes),
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def _weights_bytes(module) -> int:
    """Bytes of the distinct tensors (tied weights once) a module's graph will hold."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _finalize(scratch: Path, final: Path, weights_bytes: int, threshold_bytes: float) -> dict:
    """Move a traced graph into place; with its tensors in ``<final>.data`` when the weights
    exceed the threshold (or when the tracer already had to split them, past 2 GiB)."""
    import onnx

    split_by_tracer = any(p.name != scratch.name for p in scratch.parent.iterdir())
    threshold_bytes = min(threshold_bytes, MAX_EXTERNAL_DATA_THRESHOLD_MB * 2**20)
    external = split_by_tracer or weights_bytes > threshold_bytes
    if not external:
        os.replace(scratch, final)
    else:
        model = onnx.load(str(scratch), load_external_data=True)
        onnx.save_model(
            model,
            str(final),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=final.name + ".data",
            size_threshold=1024,
        )
        del model
    onnx.checker.check_model(str(final))
    files = {final.name: final.stat().st_size}
    data = final.with_name(final.name + ".data")
    if data.exists():
        files[data.name] = data.stat().st_size
    sizes = ", ".join(f"{n} {s / 2**20:.1f} MiB" for n, s in files.items())
    log.info("wrote %s%s", sizes, " (external data)" if external else "")
    return files


def export_backbone(
    model,
    path: Path,
    opset: int = DEFAULT_OPSET,
    external_data_threshold_mb: float = DEFAULT_EXTERNAL_DATA_THRESHOLD_MB,
) -> dict:
    """Trace BackboneStep(model) into ``path`` (+ ``path.data``); returns {file: bytes}."""
    from exporter.step import BackboneStep

    path = Path(path)
    inputs, outputs, axes = backbone_io(model.config.num_hidden_layers)
    scratch = Path(tempfile.mkdtemp(prefix=".trace-", dir=path.parent))
    try:
        with tracing_patches(model):
            step = BackboneStep(model).eval()
            with progress(f"tracing the backbone ({model.config.num_hidden_layers} layers, opset {opset})"):
                _trace(step, example_inputs(model), scratch / path.name, inputs, outputs, axes, opset)
        with progress(f"saving {path.name}"):
            return _finalize(scratch / path.name, path, _weights_bytes(model), external_data_threshold_mb * 2**20)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export_fused_backbone(
    model,
    path: Path,
    dtype: str,
    max_positions: int,
    external_data_threshold_mb: float = DEFAULT_EXTERNAL_DATA_THRESHOLD_MB,
    screen: bool = True,
) -> dict:
    """Write the fused graph (exporter/fused.py) of ``model`` at ``path`` (``screen``: with the lm_head
    screen where it applies); returns {file: bytes}."""
    from exporter.fused import build_fused_backbone, save_model

    path = Path(path)
    with progress(f"writing the fused backbone ({model.config.num_hidden_layers} layers, {dtype})"):
        proto = build_fused_backbone(model, dtype=dtype, max_positions=max_positions, screen=screen)
    with progress(f"saving {path.name}"):
        files = save_model(proto, path, external_data_threshold_mb)
        del proto
        # not onnx.checker: it rejects ONNX Runtime's SimplifiedLayerNormalization (registered by ORT in the
        # default domain); loading the graph in ONNX Runtime is the check that matters, and validation does it
    log.info("wrote %s", ", ".join(f"{n} {s / 2**20:.1f} MiB" for n, s in files.items()))
    return files


def export_heads(
    heads,
    lm_head,
    path: Path,
    opset: int = DEFAULT_OPSET,
    external_data_threshold_mb: float = DEFAULT_EXTERNAL_DATA_THRESHOLD_MB,
    embed=None,
) -> dict:
    """Trace HeadsStep(heads, lm_head) into ``path`` (+ ``path.data``), or HydraStep(heads, lm_head,
    embed) for Hydra heads; returns {file: bytes}."""
    import torch

    from exporter.step import HeadsStep, HydraStep

    path = Path(path)
    kind = getattr(heads.config, "kind", "medusa")
    inputs, outputs, axes = heads_io(kind)
    dtype = lm_head.weight.dtype
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TRACE_BATCH, heads.config.hidden_size, generator=g).to(dtype)
    scratch = Path(tempfile.mkdtemp(prefix=".trace-", dir=path.parent))
    try:
        if kind == "hydra":
            if embed is None:
                raise MedusaError("Hydra heads read the backbone's input embeddings: pass embed")
            K = heads.config.num_heads
            step: torch.nn.Module = HydraStep(heads, lm_head, embed).eval()
            args: tuple = (
                hidden,
                torch.randint(0, heads.config.vocab_size, (TRACE_BATCH, K), generator=g),
                (torch.arange(TRACE_BATCH) % K + 1).to(torch.long),
            )
        else:
            step, args = HeadsStep(heads, lm_head).eval(), (hidden,)
        with tracing_patches(step):
            with progress(f"tracing the {kind.capitalize()} heads ({heads.config.num_heads} heads)"):
                _trace(step, args, scratch / path.name, inputs, outputs, axes, opset)
        with progress(f"saving {path.name}"):
            return _finalize(scratch / path.name, path, _weights_bytes(step), external_data_threshold_mb * 2**20)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------- artifact


def _versions() -> dict:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in (
        "medusa-trt",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "safetensors",
        "tokenizers",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def resolve_precision(options: ExportOptions) -> str:
    """The precision the options ask for (``precision``, else the one ``dtype`` implies)."""
    if options.precision is None:
        dtype = options.dtype or "float32"
        return {"float32": "fp32", "float16": "fp16"}.get(dtype, dtype)
    return options.precision


def check_options(options: ExportOptions) -> None:
    from runtime import checks

    # types and finiteness first (runtime/checks.py): the comparisons below then hold
    checks.integer("--opset", options.opset)
    threshold_mb = checks.real("--external-data-threshold-mb", options.external_data_threshold_mb, 0)
    assert threshold_mb is not None  # not optional: checks.real returns a float or raises
    options.external_data_threshold_mb = threshold_mb
    checks.integer("--max-context", options.max_context, 2, optional=True, rule=">= 2 (a prompt token and one more)")
    checks.flag("force", options.force)
    checks.flag("validate", options.validate)
    checks.flag("heads_int8", options.heads_int8)
    checks.integer("validation_threads", options.validation_threads, 1, checks.MAX_THREADS, optional=True)
    if options.dtype not in (None, "float32", "float16"):
        raise MedusaError(f"unsupported dtype {options.dtype!r}: use float32 or float16")
    if options.graph not in GRAPHS:
        raise MedusaError(f"unknown graph flavour {options.graph!r}: use {' or '.join(GRAPHS)}")
    precision = resolve_precision(options)
    if precision not in PRECISION_DTYPE:
        raise MedusaError(f"unsupported precision {precision!r}: use {', '.join(PRECISION_DTYPE)}")
    if options.precision is not None and options.dtype is not None and PRECISION_DTYPE[precision] != options.dtype:
        raise MedusaError(f"--dtype {options.dtype} contradicts --precision {precision}: give one of them")
    if precision in ("int8", "int4") and options.graph != "fused":
        raise MedusaError(
            f"--precision {precision} quantizes the fused graph's MatMuls (ONNX Runtime MatMulNBits); the portable "
            "graph is for TensorRT, which quantizes at engine build: use --graph fused, or fp32/fp16"
        )
    options.precision = precision
    options.dtype = PRECISION_DTYPE[precision]
    if not (MIN_OPSET <= options.opset <= MAX_OPSET):
        raise MedusaError(
            f"opset {options.opset} is not supported: use {MIN_OPSET}-{MAX_OPSET} (TensorRT 10's ONNX parser reads "
            f"17-21; the TorchScript exporter writes up to {MAX_OPSET})"
        )
    if options.external_data_threshold_mb < 0:
        raise MedusaError("--external-data-threshold-mb must be >= 0")


def check_out_dir(out_dir: Path, force: bool) -> None:
    """``out_dir`` may become the artifact: absent, or (with ``force``) an earlier artifact or an
    empty folder. A folder holding anything else is never replaced, even with ``force``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir} exists and is not a folder; remove it or choose another output folder")
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir} already exists; pass --force (force=True) to replace it")
    if out_dir.is_dir() and not (out_dir / CONFIG_FILE).is_file() and any(out_dir.iterdir()):
        raise ArtifactError(
            f"{out_dir} is not a medusa-trt artifact (no {CONFIG_FILE}) and is not empty: --force replaces only an "
            "earlier artifact; remove the folder yourself or choose another output folder"
        )
    if out_dir.parent.exists() and not out_dir.parent.is_dir():
        raise ArtifactError(f"cannot write {out_dir}: {out_dir.parent} is not a folder")
    if out_dir.is_dir() and force:
        foreign = _foreign_files(out_dir)
        if foreign:
            shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
            raise ArtifactError(
                f"{out_dir} holds files medusa-export did not write ({shown}): --force replaces only what an export "
                "wrote, never files you or other tools added (engines, profiles, plans): move them away first"
            )
    _check_writable(out_dir)


# what an export writes besides the graph files its config names: a --force export replaces these alone
EXPORT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                "datastore.npz")  # fmt: skip


def _foreign_files(out_dir: Path) -> list[str]:
    """The entries of an earlier artifact folder that no export writes (sorted names)."""
    import json

    try:
        cfg = json.loads((out_dir / CONFIG_FILE).read_text())
        named = {v["file"] for v in cfg.values() if isinstance(v, dict) and isinstance(v.get("file"), str)}
    except (OSError, ValueError, AttributeError):
        named = set()
    ours = {CONFIG_FILE, *EXPORT_FILES, *named, *(f"{n}.data" for n in named)}
    return sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in out_dir.iterdir()
        if p.name not in ours and not p.name.endswith((".onnx", ".onnx.data"))
    )


def _check_writable(out_dir: Path) -> None:
    """The nearest existing folder at or above ``out_dir``'s parent takes a new folder (the export
    writes into a hidden one beside ``out_dir``): else one ArtifactError now, before minutes of work."""
    at = out_dir.parent
    while not at.exists() and at != at.parent:
        at = at.parent
    try:
        probe = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=at))
    except OSError as e:
        raise ArtifactError(f"cannot write {out_dir}: {e.strerror or e} ({at})") from None
    probe.rmdir()


def resolve_tree(options: ExportOptions, num_heads: int, vocab_size: int | None = None):
    """The artifact's default tree: ``options.tree``, else cpu_8 (chain_K when K < 4 heads);
    chains only for int8 / int4 graphs (their int8 activations keep greedy Medusa exact with
    chains only: runtime.onnxrt.row_invariant_rows); chain_1 by default there. Checked as the
    runtime checks a tree argument (ranks within ``vocab_size``)."""
    from runtime.tree import load_tree

    quantized = resolve_precision(options) in ("int8", "int4")
    name = options.tree
    if name is None and quantized:
        name = "chain_1"
    if name is None:
        name = DEFAULT_TREE if num_heads >= load_tree(DEFAULT_TREE).depth else f"chain_{max(1, min(num_heads, 5))}"
    return check_tree(options, name, num_heads, vocab_size, "--tree")


def check_tree(options: ExportOptions, name, num_heads: int, vocab_size: int | None, flag: str):
    """A tree to record in the artifact, checked as the runtime checks a tree argument; chains
    only for int8 / int4 graphs (their int8 activations keep greedy Medusa and exact sampling
    exact with chains only: runtime.onnxrt.row_invariant_rows)."""
    from runtime import checks

    tree = checks.tree(name, num_heads if num_heads > 0 else None, vocab_size)
    precision = resolve_precision(options)
    if precision in ("int8", "int4") and not tree.is_chain:
        raise MedusaError(
            f"tree {tree.name!r} branches; {precision} graphs compute with int8 activations, where greedy Medusa "
            f"and exact sampling follow plain decoding exactly with chain trees only: pass {flag} chain_1 .. chain_5"
        )
    return tree


def sliding_window(config) -> int | None:
    """The sliding window transformers' DynamicCache applies to this config, or None.

    BackboneStep builds ``DynamicCache(config=...)``; a sliding-window layer keeps only the
    last ``window - 1`` positions, so ``present`` (and with it the graph) is right only while
    ``past_sequence + new_tokens <= window - 1``. The exporter caps ``max_context`` there.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    windows = [
        layer.sliding_window
        for layer in DynamicCache(config=config).layers
        if isinstance(layer, DynamicSlidingWindowLayer)
    ]
    return min(windows) if windows else None


def check_heads_backbone(heads, here: str) -> None:
    """A warning where the heads' meta records another backbone than the one exported, whose
    fingerprint is ``here`` (exporter.heads.backbone_fingerprint): the export is right, and slow
    (the drafts seldom accepted)."""
    trained_on = heads.config.meta.get("backbone_fingerprint")
    if trained_on is None:  # fresh heads, or heads trained before the fingerprint was recorded
        return
    if trained_on != here:
        log.warning(
            "the Medusa heads were trained on another backbone (%s, fingerprint %s; this one's is %s): the output "
            "stays exact, but their drafts will seldom be accepted; train heads for this model (medusa-train)",
            heads.config.meta.get("backbone", "unnamed"),
            trained_on,
            here,
        )


def fitting_context(asked: int | None, config) -> int:
    """The context the artifact is sized for: ``--max-context`` (``asked``) where the model holds it,
    else the model's ``max_position_embeddings``; a sliding-window model's at most ``window - 1``
    (see sliding_window). Checked against the config alone, so the CLI names a bad value before
    the weights load."""
    most = int(config.max_position_embeddings)
    if asked is not None and asked > most:
        raise MedusaError(f"--max-context {asked} exceeds the model's max_position_embeddings {most}")
    context = most if asked is None else asked
    window = sliding_window(config)
    if window is not None and context > window - 1:
        if asked is not None:
            raise MedusaError(
                f"--max-context {asked} exceeds what this model's sliding-window cache holds "
                f"({window - 1} tokens: sliding_window {window}); use --max-context {window - 1} or less"
            )
        log.warning(
            "sliding_window %d: max_context capped at %d tokens (the graph contract has no sliding-window mask)",
            window,
            window - 1,
        )
        context = window - 1
    return context


def _source_path(options: ExportOptions) -> str | None:
    """The absolute local folder of the source model, for the peers (``--peer``): recorded by the
    CLI, else the folder ``source_model`` names when it is one."""
    if options.source_model_path:
        return str(Path(options.source_model_path).resolve())
    if options.source_model and Path(options.source_model).is_dir():
        return str(Path(options.source_model).resolve())
    return None


def export_artifact(
    model,
    heads,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    tokenizer=None,
    recipe: dict | None = None,
) -> Path:
    """Export ``model`` (a Llama-family *ForCausalLM) and ``heads`` (MedusaHeads) into ``out_dir``.

    ``tokenizer`` is saved into the artifact (loaded from ``options.source_model`` when
    not given). Returns ``out_dir``. Nothing exists at ``out_dir`` unless everything,
    validation included, succeeded. ``recipe`` (exporter.recipe.export_recipe): what the artifact
    is made from, recorded as ``provenance["recipe"]`` for ``medusa-export --if-changed``.
    """
    import torch

    from exporter.models import SUPPORTED_ARCHITECTURES
    from exporter.torch_backend import spec_from_hf
    from exporter.validate import validate_artifact
    from runtime.artifact import read_artifact

    options = options or ExportOptions()
    check_options(options)
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        raise MedusaError(
            f"{type(model).__name__} is not supported; medusa-trt exports {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(the Llama family)"
        )
    from exporter.fused import longrope_short_context

    short = longrope_short_context(model.config)
    if options.graph == "portable" and short is not None:
        raise MedusaError(
            "LongRoPE does not trace to ONNX (transformers switches its rotary factors in place); export the fused "
            f"graph (the default), which holds the short factors, with --max-context {short} or less"
        )
    out_dir = Path(out_dir).expanduser().absolute()
    check_out_dir(out_dir, options.force)
    check_finite(heads, "the Medusa heads", CheckpointError)  # before minutes of tracing (and the quantizer's assert)
    check_finite(model, "the backbone", MedusaError)
    if heads.config.hidden_size != model.config.hidden_size or heads.config.vocab_size != model.config.vocab_size:
        raise MedusaError(
            f"Medusa heads (hidden {heads.config.hidden_size}, vocabulary {heads.config.vocab_size}) do not fit the "
            f"backbone (hidden {model.config.hidden_size}, vocabulary {model.config.vocab_size})"
        )
    from exporter.heads import backbone_fingerprint

    fingerprint = backbone_fingerprint(model)  # recorded: states computed on this engine name their weights
    check_heads_backbone(heads, fingerprint)
    tree = resolve_tree(options, heads.config.num_heads, model.config.vocab_size)
    sampling_tree = (
        None
        if options.sampling_tree is None
        else check_tree(
            options, options.sampling_tree, heads.config.num_heads, model.config.vocab_size, "--sampling-tree"
        )
    )
    spec = spec_from_hf(model, heads)
    store = None
    if options.datastore is not None:  # a foreign or broken file stops here, before any graph is written
        from runtime.datastore import Datastore

        store = Datastore.load(options.datastore, spec.vocab_size)
    spec.max_context = fitting_context(options.max_context, model.config)
    if tokenizer is None:
        if options.source_model is None:
            raise MedusaError("export_artifact needs the tokenizer (or options.source_model to load it from)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(options.source_model))

    dtype_name = options.dtype
    assert dtype_name is not None  # set by check_options
    dtype = {"float32": torch.float32, "float16": torch.float16}[dtype_name]
    from exporter.step import cast_module

    model = cast_module(model, dtype)
    heads = cast_module(heads, dtype)

    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    # SIGTERM (a scheduler's kill, `timeout`) raises like Ctrl-C from here on, so the finally below
    # removes the partial folder; every temporary file (the quantizer's too) lives inside it
    scope = contextlib.ExitStack()
    scope.enter_context(sigterm_as_interrupt())
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except BaseException:  # no folder to clean up, but the SIGTERM handler must not stay installed
        scope.close()
        raise
    try:
        _claim_partial(tmp)
        scope.enter_context(_temporaries_in(tmp / TEMPORARIES))
        files = {}
        if options.graph == "fused":
            files.update(
                export_fused_backbone(
                    model,
                    tmp / BACKBONE_FILE,
                    dtype_name,
                    spec.max_context,
                    options.external_data_threshold_mb,
                    screen=options.lm_head_screen,
                )
            )
        else:
            files.update(export_backbone(model, tmp / BACKBONE_FILE, options.opset, options.external_data_threshold_mb))
        files.update(
            export_heads(
                heads,
                model.lm_head,
                tmp / HEADS_FILE,
                options.opset,
                options.external_data_threshold_mb,
                embed=model.get_input_embeddings(),
            )
        )
        with progress("saving the tokenizer and medusa_config.json"):
            tokenizer.save_pretrained(str(tmp))
            if not (tmp / "tokenizer.json").is_file():
                raise ArtifactError(
                    "the tokenizer has no fast (tokenizer.json) form; the torch-free runtime needs tokenizer.json"
                )
            if options.graph == "fused":
                from exporter.fused import fused_io

                b_in, b_out, b_axes = fused_io(spec.num_layers)
            else:
                b_in, b_out, b_axes = backbone_io(spec.num_layers)
            h_in, h_out, h_axes = heads_io(spec.medusa_head_type)
            opts = {k: v for k, v in asdict(options).items() if k not in ("force",)}
            opts["validation_trees"] = list(options.validation_trees)
            config = ArtifactConfig(
                model=spec,
                backbone=GraphSpec(BACKBONE_FILE, b_in, b_out, b_axes),
                heads=GraphSpec(HEADS_FILE, h_in, h_out, h_axes),
                dtype=dtype_name,
                opset=options.opset if options.graph == "portable" else FUSED_OPSET,
                flavour=options.graph,
                precision="fp16" if options.dtype == "float16" else "fp32",  # quantized below, after validation
                default_tree=tree.name,
                default_tree_paths=[list(p) for p in tree.paths],
                sampling_tree=sampling_tree.name if sampling_tree is not None else None,
                sampling_tree_paths=[list(p) for p in sampling_tree.paths] if sampling_tree is not None else [],
                provenance={
                    "source_model": str(options.source_model)
                    if options.source_model
                    else getattr(model.config, "_name_or_path", None),
                    "source_model_path": _source_path(options),
                    "backbone_fingerprint": fingerprint,
                    "heads": {
                        "num_heads": heads.config.num_heads,
                        "num_layers": heads.config.num_layers,
                        "kind": getattr(heads.config, "kind", "medusa"),
                        "shared_lm_head": heads.config.shared_lm_head,
                        "layout": heads.config.meta.get("layout"),
                        "source": heads.config.meta.get("source"),
                        "meta": heads.config.meta,
                    },
                    "exporter": (
                        f"torch.onnx.export(dynamo=False) [{EXPORTER}]"
                        if options.graph == "portable"
                        else "exporter.fused (onnx.helper from the Hugging Face weights)"
                    ),
                    "export_options": opts,
                    "versions": _versions(),
                    "files": files,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **({"recipe": recipe} if recipe is not None else {}),
                },
            )
            if store is not None and options.datastore is not None:
                from runtime.datastore import FILE as DATASTORE_FILE

                shutil.copyfile(options.datastore, tmp / DATASTORE_FILE)
                digest = hashlib.sha256((tmp / DATASTORE_FILE).read_bytes()).hexdigest()
                config.provenance["datastore"] = {"file": str(options.datastore), "sha256": digest, **store.meta}
            if options.heads_int8 and options.dtype == "float32":
                from exporter.quantize import quantize_heads

                quantize_heads(tmp, config)
                if spec.medusa_head_type == "medusa" and heads.config.num_heads > 1:
                    from exporter.quantize import quantize_first_head

                    with progress("the first head alone, int8 (for trees that read head 1 only)"):
                        quantize_first_head(tmp, config, heads, model.lm_head, options.opset)
            config.write(tmp)
            read_artifact(tmp)  # the runtime must accept what was written
        if options.validate:
            with progress("validating ONNX Runtime against PyTorch"):
                report = validate_artifact(
                    tmp, model, heads, trees=options.validation_trees, threads=options.validation_threads
                )
            config.provenance["validation"] = report.summary()
        else:
            config.provenance["validation"] = {"skipped": True}
        if options.precision in ("int8", "int4"):
            from exporter.quantize import CHECK_TEXT, quantize_backbone

            bits = 8 if options.precision == "int8" else 4
            with progress(f"quantizing {BACKBONE_FILE} to {options.precision} (MatMulNBits, weight-only)"):
                check_ids = tokenizer.encode(CHECK_TEXT) if hasattr(tokenizer, "encode") else None
                config.provenance["quantization"] = quantize_backbone(
                    tmp, config, bits, options.external_data_threshold_mb, check=options.validate, check_ids=check_ids
                )
            config.precision = options.precision
            config.provenance["files"].update(config.provenance["quantization"].pop("files"))
        if options.graph == "fused" and options.batch_graph:
            _export_batch_graph(model, tmp, config, options)
        config.provenance["export_seconds"] = round(time.perf_counter() - started, 1)
        _release_partial(tmp)
        # size and sha256 of every file: runtime.load checks sizes, load(verify=True) the checksums
        config.provenance["checksums"] = record_checksums(tmp)
        config.provenance["config_sha256"] = config_digest(config)
        config.write(tmp)
        _public(tmp)
        with progress(f"moving the artifact into place at {out_dir}"):
            _move_into_place(tmp, out_dir, options.force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        scope.close()
    return out_dir


def _export_batch_graph(model, folder: Path, config, options: ExportOptions) -> None:
    """batch.onnx and fold.onnx next to the fused model.onnx (exporter/fused.py), each validated
    against it; recorded in ``config.batch`` and ``config.fold``. Float graphs only: with int8
    activations (int8/int4 artifacts) a batched row would not compute exactly as the one-sequence
    graph does, so those serve one sequence a call. fold.onnx (trees of 2 .. FOLD_MAX_BATCH
    sequences on GroupQueryAttention in place) is written only beside a batch.onnx, which takes the
    calls it cannot (more sequences, or a model it does not support)."""
    from exporter.fused import BATCH_FILE, FOLD_FILE, FOLD_MAX_BATCH, batch_io, fold_io

    if config.precision in ("int8", "int4"):
        log.info("no batch graph for %s weights (int8 activations): the server decodes one sequence a call",
                 config.precision)  # fmt: skip
        return
    if not _write_batched(model, folder, config, options, BATCH_FILE, "several sequences per call", 0):
        return
    config.batch = GraphSpec(BATCH_FILE, *batch_io(config.model.num_layers))
    what = f"trees of 2-{FOLD_MAX_BATCH} sequences per call, in place"
    if _write_batched(model, folder, config, options, FOLD_FILE, what, FOLD_MAX_BATCH):
        config.fold = GraphSpec(FOLD_FILE, *fold_io(config.model.num_layers))
        config.fold_max_batch = FOLD_MAX_BATCH


def _write_batched(model, folder: Path, config, options: ExportOptions, file: str, what: str, folded: int) -> bool:
    """Write one batched graph (``folded`` 0: batch.onnx, else fold.onnx) sharing model.onnx's
    weights file and validate it against model.onnx (``provenance["batch_validation"]`` /
    ``["fold_validation"]``); False (and a warning) where the model has none."""
    from exporter.fused import FusedGraphError, write_batch_graph
    from exporter.validate import validate_batch_graph

    dtype = options.dtype
    assert dtype is not None  # set by check_options (export_artifact called it)
    try:
        with progress(f"writing {file} ({what}; weights shared with {BACKBONE_FILE})"):
            files = write_batch_graph(model, folder, BACKBONE_FILE, dtype, config.model.max_context,
                                      folded=folded)  # fmt: skip
    except FusedGraphError as e:
        log.warning("no %s: %s", file, e)
        return False
    config.provenance["files"].update(files)
    if options.validate:
        with progress(f"validating {file} against {BACKBONE_FILE}"):
            report = validate_batch_graph(folder, BACKBONE_FILE, file, dtype, config.model.max_context,
                                          threads=options.validation_threads, folded=bool(folded))  # fmt: skip
        config.provenance["fold_validation" if folded else "batch_validation"] = report.summary()
    return True


def check_finite(module, what: str, error=MedusaError) -> None:
    """Every weight of ``module`` finite: NaN or infinity would export a graph that proposes or
    decodes garbage (and trips ONNX Runtime's int8 quantizer with a bare assert)."""
    import torch

    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise error(
                f"{what}: tensor {name} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}: the "
                "checkpoint is damaged or its training diverged; use another checkpoint"
            )


# ---------------------------------------------------------------------------- interrupted exports

OWNER_FILE = ".owner"  # inside a .NAME.partial-* folder: "<pid> <host>" of the export writing it
TEMPORARIES = ".tmp"  # inside it: tempfile's folder while exporting (ONNX Runtime's quantizer writes there)
STALE_UNOWNED_S = 60.0  # a partial folder without an owner file this old is no export's


def _claim_partial(tmp: Path) -> None:
    (tmp / OWNER_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    (tmp / TEMPORARIES).mkdir()


def _release_partial(tmp: Path) -> None:
    """The partial folder's bookkeeping out, before it becomes the artifact."""
    shutil.rmtree(tmp / TEMPORARIES, ignore_errors=True)
    (tmp / OWNER_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _temporaries_in(folder: Path) -> Iterator[None]:
    """tempfile's default folder is ``folder`` within the block (restored after): temporary
    files of the libraries the export calls are removed with the partial folder, even after a
    SIGKILL (by the next export's :func:`remove_stale_partials`). Process-wide while it lasts."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _owner_alive(folder: Path) -> bool:
    """Whether the export that made ``folder`` may still be running."""
    try:
        pid_text, host = (folder / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):  # no owner file (yet, or an older exporter's): alive while fresh
        try:
            return time.time() - folder.stat().st_mtime < STALE_UNOWNED_S
        except OSError:
            return False
    if host != socket.gethostname():
        return True  # another machine's export on a shared folder: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Remove the ``.NAME.partial-*`` folders next to ``out_dir`` that a killed export (SIGKILL,
    a crash, a power cut) left: those whose export process is gone. Says so for each."""
    removed = []
    prefix = f".{out_dir.name}.partial-"
    for p in sorted(out_dir.parent.iterdir()) if out_dir.parent.is_dir() else []:
        if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink() or _owner_alive(p):
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed %s, left by an interrupted export (%.1f MiB)", p, size / 2**20)
        removed.append(p)
    return removed


def _public(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and onnx 0600 data files): give the artifact the
    permissions of anything else the user creates (umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if not force:  # appeared while exporting
        raise ArtifactError(f"{out_dir} appeared while exporting; pass --force to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        os.replace(out_dir, old / "artifact")
        os.replace(tmp, out_dir)
    except BaseException:
        # whatever failed or interrupted (the first rename done or not): the previous artifact goes back
        # before anything is deleted; if even that fails, it stays in `old` for the user, named in the log
        if (old / "artifact").exists() and not out_dir.exists():
            try:
                os.replace(old / "artifact", out_dir)
            except OSError:
                log.error("the previous artifact could not be put back: it is in %s", old / "artifact")
                raise
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
