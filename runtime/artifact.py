"""The artifact folder that ``medusa-export`` writes and every backend reads.

    artifact/
      medusa_config.json     this schema: the runtime never guesses from file names
      model.onnx (+ .data)   backbone step graph (docs/graph_contract.md)
      heads.onnx (+ .data)   Medusa heads on one hidden state
      tokenizer.json, tokenizer_config.json, chat_template.jinja

``FORMAT_VERSION`` changes whenever the graph contract or this schema changes in a way an
older runtime cannot read; :func:`read_artifact` refuses other versions with a clear error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.errors import ArtifactError

CONFIG_FILE = "medusa_config.json"
FORMAT = "medusa-trt-artifact"
FORMAT_VERSION = 2
# format_version 1 (before graph flavours) is read as a portable float artifact
READABLE_VERSIONS = (1, 2)
FLAVOURS = ("fused", "portable")
PRECISIONS = ("fp32", "fp16", "int8", "int4")


def fused_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the fused ``model.onnx`` (exporter/fused.py), in graph order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "tree_mask", "cache_lengths", *past], ["logits", "hidden_states", *present]


@dataclass
class ModelSpec:
    """What a backend needs to size its buffers."""

    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int  # max_position_embeddings, or a user cap at export
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    num_medusa_heads: int = 0
    medusa_num_layers: int = 0
    medusa_shared_lm_head: bool = True


@dataclass
class GraphSpec:
    file: str
    inputs: list[str]
    outputs: list[str]
    # named dynamic axes per tensor, e.g. {"input_ids": ["batch", "new_tokens"]}
    dynamic_axes: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ArtifactConfig:
    model: ModelSpec
    backbone: GraphSpec
    heads: GraphSpec
    # heads.onnx with int8 weights (ONNX Runtime dynamic quantization): the heads only
    # propose candidates, so lower precision never changes the output, and the heads'
    # vocabulary projection reads 4x fewer bytes. ONNX Runtime on the CPU uses it; TensorRT
    # builds from the float `heads` graph.
    heads_int8: GraphSpec | None = None
    dtype: str = "float32"  # dtype of logits, hidden states and the KV cache in the graphs
    # which graph model.onnx is (docs/graph_contract.md): "fused" (ONNX Runtime's fused kernels,
    # in-place cache; exporter/fused.py) or "portable" (standard ONNX ops only, what TensorRT
    # parses; exporter/step.py traced). The runtime chooses its code path from this alone.
    flavour: str = "portable"
    # the backbone's weights: fp32 / fp16, or int8 / int4 weight-only (MatMulNBits, fused only)
    precision: str = "fp32"
    opset: int = 18
    default_tree: str = "cpu_8"
    default_tree_paths: list[list[int]] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # source model, heads, versions, options, time
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(self.to_json())
        return path


def read_artifact(folder: str | Path) -> ArtifactConfig:
    """Read and check an artifact folder; every problem is an ArtifactError naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist (create one with medusa-export)")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise ArtifactError(f"{folder} is not a medusa-trt artifact: {CONFIG_FILE} is missing (re-run medusa-export)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{cfg_path} is not valid JSON: {e}") from None
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{cfg_path}: format {raw.get('format')!r} is not {FORMAT!r}")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{cfg_path}: written by an incompatible exporter (format_version {version}, this runtime reads "
            f"{FORMAT_VERSION}); re-export with this version of medusa-export"
        )
    try:
        cfg = ArtifactConfig(
            model=ModelSpec(**raw["model"]),
            backbone=GraphSpec(**raw["backbone"]),
            heads=GraphSpec(**raw["heads"]),
            heads_int8=GraphSpec(**raw["heads_int8"]) if raw.get("heads_int8") else None,
            **{k: v for k, v in raw.items() if k not in ("model", "backbone", "heads", "heads_int8")},
        )
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{cfg_path}: malformed config ({e})") from None
    if cfg.flavour not in FLAVOURS:
        raise ArtifactError(f"{cfg_path}: unknown graph flavour {cfg.flavour!r} (this runtime reads {', '.join(FLAVOURS)})")
    if cfg.precision not in PRECISIONS:
        raise ArtifactError(f"{cfg_path}: unknown precision {cfg.precision!r} (this runtime reads {', '.join(PRECISIONS)})")
    for graph in (cfg.backbone, cfg.heads, *([cfg.heads_int8] if cfg.heads_int8 else [])):
        if not (folder / graph.file).is_file():
            raise ArtifactError(f"{folder}: {graph.file} is missing (the artifact is incomplete; re-run medusa-export)")
    if not (folder / "tokenizer.json").is_file():
        raise ArtifactError(f"{folder}: tokenizer.json is missing (the artifact is incomplete; re-run medusa-export)")
    return cfg
