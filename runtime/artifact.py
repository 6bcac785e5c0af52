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

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from runtime import checks
from runtime.errors import ArtifactError, ConfigError, MedusaWarning
from runtime.paths import read_json_object

CONFIG_FILE = "medusa_config.json"
FORMAT = "medusa-trt-artifact"
FORMAT_VERSION = 2
# format_version 1 (before graph flavours) is read as a portable float artifact
READABLE_VERSIONS = (1, 2)
FLAVOURS = ("fused", "portable")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
DTYPES = ("float32", "float16")


# ---------------------------------------------------------------------------- the graph contract
# docs/graph_contract.md. The one place its names, dtypes and axes are written: the exporter
# writes graphs by these, the backends, the TensorRT plan and the recipes read them.

PORTABLE_INPUTS = ("input_ids", "position_ids", "tree_mask")  # then the cache (past_key_values.*)
FUSED_INPUTS = (*PORTABLE_INPUTS, "cache_lengths", "num_logits")
FUSED_CACHE_START = len(FUSED_INPUTS)  # the cache inputs follow these
BACKBONE_OUTPUTS = ("logits", "hidden_states")  # then the cache (present.*)
# the fused one-sequence float32 graph's lm_head screen for greedy decoding and coupled sampling
# (exporter.fused._screen): optional inputs after the cache (defaults: no row screened, no noise)
# and three outputs after it
SCREEN_INPUT = "num_screened"
SCREEN_NOISE = "screen_noise"  # float [screened rows, vocab]: temperature x Gumbel noise, added before the ranking
SCREEN_OUTPUTS = ("screen_ids", "screen_logits", "screen_bound")
SCREEN_CANDIDATES = 32  # tokens a screened row scores exactly
HEADS_INPUTS, HEADS_OUTPUTS = ("hidden_states",), ("medusa_logits",)
# heads.onnx of Hydra heads (model.medusa_head_type "hydra"): row n runs head path_len[n] - 1 on the
# first path_len[n] tokens of path_ids[n] ([rows, num_medusa_heads]; the root first) -> [rows, vocab]
HYDRA_INPUTS, HYDRA_OUTPUTS = ("hidden_states", "path_ids", "path_len"), ("draft_logits",)
HEAD_TYPES = ("medusa", "hydra")
# inputs that are not activations; everything else is in the artifact's dtype
INPUT_DTYPES = {
    "input_ids": "int64",
    "position_ids": "int64",
    "tree_mask": "bool",
    "cache_lengths": "int64",
    "num_logits": "int64",
    SCREEN_INPUT: "int64",
    "path_ids": "int64",
    "path_len": "int64",
}


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The cache's input and output names, in graph order (k0, v0, k1, v1, ...)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, present


def portable_io(num_layers: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Input names, output names and named dynamic axes of the portable ``model.onnx``.

    ``axes[name]`` names the *leading* dimensions of the tensor, which are exactly its dynamic
    ones; the trailing dimensions are fixed by the model (``ModelSpec``).
    """
    past, present = cache_names(num_layers)
    axes = {
        "input_ids": ["batch", "new_tokens"],
        "position_ids": ["batch", "new_tokens"],
        "tree_mask": ["batch", "new_tokens", "new_tokens"],
        **{name: ["batch", "past_sequence"] for name in past},
        "logits": ["batch", "new_tokens"],
        "hidden_states": ["batch", "new_tokens"],
        **{name: ["batch", "new_tokens"] for name in present},
    }
    return [*PORTABLE_INPUTS, *past], [*BACKBONE_OUTPUTS, *present], axes


def fused_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the fused ``model.onnx`` (exporter/fused.py), in graph order."""
    past, present = cache_names(num_layers)
    return [*FUSED_INPUTS, *past], [*BACKBONE_OUTPUTS, *present]


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
    # "medusa": heads.onnx maps a hidden state to every head's logits at once; "hydra": each head
    # also reads its path's tokens, so trees are drafted level by level (HYDRA_INPUTS)
    medusa_head_type: str = "medusa"


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
    # Medusa heads with K > 1: the first head alone, int8 as ``heads_int8``. A tree that reads head 1
    # only (the CPU's default and sampling trees) drafts from it in about half the int8 graph's
    # time: its call projects one row, not K, and returns [rows, 1, V]. Same inputs and outputs as
    # ``heads``; ONNX Runtime on the CPU uses it where present. None: older artifacts, Hydra heads.
    heads_int8_first: GraphSpec | None = None
    # batch.onnx (fused float artifacts): the backbone for several sequences per call, each with its
    # own cache length and tree (docs/graph_contract.md, "The batch graph"); shares model.onnx's
    # weights file. None: the artifact serves one sequence per engine call.
    batch: GraphSpec | None = None
    # fold.onnx (fused float artifacts since 2026-12-01): steps of 2 .. fold_max_batch sequences with
    # trees, on GroupQueryAttention in place over the slots' cache (docs/graph_contract.md, "The
    # folded batch graph"); shares model.onnx's weights file. None: batch.onnx takes those calls.
    fold: GraphSpec | None = None
    fold_max_batch: int = 0
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
    # the tree exact sampling uses when the caller names none (None: the default tree): a
    # deterministic draft is accepted with the backbone's probability of its token, so at
    # temperature > 0 siblings pay less than under greedy acceptance and a smaller tree wins
    sampling_tree: str | None = None
    sampling_tree_paths: list[list[int]] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # source model, heads, versions, options, time
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def write(self, folder: str | Path) -> Path:
        from runtime.paths import write_text_atomic

        return write_text_atomic(Path(folder) / CONFIG_FILE, self.to_json())  # never half-written


def read_artifact(folder: str | Path, verify: bool = False) -> ArtifactConfig:
    """Read and check an artifact folder; every problem is an ArtifactError naming the file.

    Always: the config's types and sizes, every file it names exists, and every file whose
    size the export recorded still has that size (a truncated or swapped file is named).
    ``verify``: also the sha256 of every file the export recorded (SmolLM2-135M: ~0.5 s for
    its 623 MB model.onnx, a third of a load, so not on every load).
    """
    folder = Path(folder)
    # os.path's tests: False for a path the system refuses (a name too long, a folder without
    # permission) where pathlib's raise OSError
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ArtifactError(f"{folder} is a file, not an artifact folder: give the folder medusa-export wrote")
        raise ArtifactError(f"artifact folder {folder} does not exist (create one with medusa-export)")
    cfg_path = folder / CONFIG_FILE
    if not os.path.isfile(cfg_path):
        raise ArtifactError(f"{folder} is not a medusa-trt artifact: {CONFIG_FILE} is missing (re-run medusa-export)")
    raw = read_json_object(cfg_path, ArtifactError, hint=" (re-run medusa-export)")
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{cfg_path}: format {raw.get('format')!r} is not {FORMAT!r}")
    version = raw.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # not True, not 2.0
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ArtifactError(
            f"{cfg_path}: written by an incompatible exporter (format_version {version}, this runtime reads "
            f"{FORMAT_VERSION}); "
            + ("upgrade medusa-trt to load it" if newer else "re-export with this version of medusa-export")
        )
    known = {f.name for f in fields(ArtifactConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:  # fields a later medusa-trt writes (the version only changes where old readers would misread)
        raise ArtifactError(
            f"{cfg_path}: fields this runtime does not know ({', '.join(unknown)}): written by a newer "
            "medusa-trt (upgrade it) or edited by hand"
        )
    for key in ("model", "backbone", "heads"):
        if not isinstance(raw.get(key), dict):
            raise ArtifactError(
                f"{cfg_path}: malformed config ({key!r} must be a JSON object, got {checks.show(raw.get(key))})"
            )
    for key in ("heads_int8", "heads_int8_first", "batch", "fold"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ArtifactError(f"{cfg_path}: malformed config ({key!r} must be a JSON object or null)")
    try:
        cfg = ArtifactConfig(
            model=ModelSpec(**raw["model"]),
            backbone=GraphSpec(**raw["backbone"]),
            heads=GraphSpec(**raw["heads"]),
            heads_int8=GraphSpec(**raw["heads_int8"]) if raw.get("heads_int8") else None,
            heads_int8_first=GraphSpec(**raw["heads_int8_first"]) if raw.get("heads_int8_first") else None,
            batch=GraphSpec(**raw["batch"]) if raw.get("batch") else None,
            fold=GraphSpec(**raw["fold"]) if raw.get("fold") else None,
            **{
                k: v
                for k, v in raw.items()
                if k not in ("model", "backbone", "heads", "heads_int8", "heads_int8_first", "batch", "fold")
            },
        )
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{cfg_path}: malformed config ({e})") from None
    if cfg.flavour not in FLAVOURS:
        raise ArtifactError(
            f"{cfg_path}: unknown graph flavour {cfg.flavour!r} (this runtime reads {', '.join(FLAVOURS)})"
        )
    if cfg.precision not in PRECISIONS:
        raise ArtifactError(
            f"{cfg_path}: unknown precision {cfg.precision!r} (this runtime reads {', '.join(PRECISIONS)})"
        )
    _check_types(cfg, cfg_path)
    sealed = cfg.provenance.get("config_sha256")
    if sealed is not None and sealed != config_digest(cfg):
        raise ArtifactError(
            f"{cfg_path}: the sizes and graph entries (model, backbone, heads, dtype, flavour, precision, opset) were "
            "edited after export; they must describe the graphs as exported: restore the file or re-export"
        )
    for graph in (
        cfg.backbone, cfg.heads, *[g for g in (cfg.heads_int8, cfg.heads_int8_first, cfg.batch, cfg.fold) if g]
    ):  # fmt: skip
        if not (folder / graph.file).is_file():
            raise ArtifactError(f"{folder}: {graph.file} is missing (the artifact is incomplete; re-run medusa-export)")
    if not (folder / "tokenizer.json").is_file():
        raise ArtifactError(f"{folder}: tokenizer.json is missing (the artifact is incomplete; re-run medusa-export)")
    check_files(folder, cfg, verify=verify)
    return cfg


def _check_types(cfg: ArtifactConfig, cfg_path: Path) -> None:
    """Every field the runtime sizes buffers from, with the type and range it must have."""
    m = cfg.model
    try:
        for name in ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
            checks.integer(f"model.{name}", getattr(m, name), 1)
        checks.integer("model.max_context", m.max_context, 2)
        checks.integer("model.num_medusa_heads", m.num_medusa_heads, 0)
        checks.integer("model.medusa_num_layers", m.medusa_num_layers, 0)
        if not isinstance(m.eos_token_ids, list):
            raise ConfigError(f"model.eos_token_ids must be a list of token ids, got {checks.show(m.eos_token_ids)}")
        for t in m.eos_token_ids:
            checks.integer("model.eos_token_ids", t, 0, m.vocab_size - 1)
        checks.integer("model.bos_token_id", m.bos_token_id, 0, m.vocab_size - 1, optional=True)
        checks.text("model.architecture", m.architecture)
        checks.flag("model.medusa_shared_lm_head", m.medusa_shared_lm_head)
        checks.choice("model.medusa_head_type", m.medusa_head_type, HEAD_TYPES)
        graphs = (
            ("backbone", cfg.backbone),
            ("heads", cfg.heads),
            ("heads_int8", cfg.heads_int8),
            ("heads_int8_first", cfg.heads_int8_first),
            ("batch", cfg.batch),
            ("fold", cfg.fold),
        )
        for key, graph in graphs:
            if graph is None:
                continue
            file = checks.text(f"{key}.file", graph.file)
            if not file or os.sep in file or "/" in file or file in (".", ".."):
                raise ConfigError(f"{key}.file must be a file name inside the artifact folder, got {file!r}")
            for io in ("inputs", "outputs"):
                names = getattr(graph, io)
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ConfigError(f"{key}.{io} must be a list of tensor names, got {checks.show(names)}")
            if not isinstance(graph.dynamic_axes, dict):
                raise ConfigError(f"{key}.dynamic_axes must be an object, got {checks.show(graph.dynamic_axes)}")
        checks.integer("fold_max_batch", cfg.fold_max_batch, 2 if cfg.fold is not None else 0)
        checks.choice("dtype", cfg.dtype, DTYPES)
        checks.integer("opset", cfg.opset, 1)
        checks.text("default_tree", cfg.default_tree)
        if not isinstance(cfg.default_tree_paths, list):
            raise ConfigError(f"default_tree_paths must be a list of paths, got {checks.show(cfg.default_tree_paths)}")
        if cfg.sampling_tree is not None:
            checks.text("sampling_tree", cfg.sampling_tree)
        if not isinstance(cfg.sampling_tree_paths, list):
            raise ConfigError(
                f"sampling_tree_paths must be a list of paths, got {checks.show(cfg.sampling_tree_paths)}"
            )
        if not isinstance(cfg.provenance, dict):
            raise ConfigError(f"provenance must be an object, got {checks.show(cfg.provenance)}")
    except ConfigError as e:
        raise ArtifactError(f"{cfg_path}: malformed config: {e} (re-run medusa-export)") from None


# the config fields that describe the graphs as exported: sealed by a sha256 at export
SEALED_FIELDS = ("model", "backbone", "heads", "heads_int8", "dtype", "flavour", "precision", "opset")


def config_digest(cfg: ArtifactConfig) -> str:
    """sha256 of the fields that must keep describing the exported graphs (not provenance, not the
    default tree): the exporter records it, :func:`read_artifact` refuses a config edited since."""
    d = asdict(cfg)
    sealed = {k: d[k] for k in SEALED_FIELDS}
    if sealed["model"].get("medusa_head_type") == "medusa":  # the default: artifacts from before it keep their digest
        del sealed["model"]["medusa_head_type"]
    if cfg.batch is not None:  # sealed where present (artifacts from before the batch graph keep their digest)
        sealed["batch"] = d["batch"]
    if cfg.heads_int8_first is not None:  # likewise
        sealed["heads_int8_first"] = d["heads_int8_first"]
    if cfg.fold is not None:  # likewise
        sealed["fold"] = d["fold"]
        sealed["fold_max_batch"] = d["fold_max_batch"]
    return hashlib.sha256(json.dumps(sealed, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def record_checksums(folder: Path, skip: tuple[str, ...] = (CONFIG_FILE,)) -> dict:
    """{file: {"bytes", "sha256"}} for every file of an artifact folder (the exporter's record)."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name not in skip
    }


def check_files(folder: Path, cfg: ArtifactConfig, verify: bool = False) -> None:
    """Files against what the export recorded: ``provenance["checksums"]`` (size and sha256 of
    every file), or for older artifacts ``provenance["files"]`` (graph sizes). Sizes always;
    checksums with ``verify``. A file that is missing, truncated or swapped is named."""
    prov = cfg.provenance
    recorded = prov.get("checksums")
    if not isinstance(recorded, dict):
        recorded = (
            {name: {"bytes": size} for name, size in (prov.get("files") or {}).items()}
            if isinstance(prov.get("files"), dict)
            else {}
        )
        if verify:
            warnings.warn(
                f"{folder}: this artifact records no checksums (exported by an older medusa-export): "
                "only file sizes were checked; re-export to record them",
                MedusaWarning,
                stacklevel=3,
            )
    for name, entry in recorded.items():
        if (
            not isinstance(name, str)
            or "/" in name
            or os.sep in name
            or name in (".", "..")
            or not isinstance(entry, dict)
            or ("bytes" in entry and type(entry["bytes"]) is not int)
        ):
            raise ArtifactError(
                f"{folder / CONFIG_FILE}: malformed provenance record for {name!r} (re-run medusa-export)"
            )
        path = folder / name
        if not path.is_file():
            raise ArtifactError(
                f"{folder}: {name} is missing (the export wrote it; copy the artifact again or re-export)"
            )
        size = path.stat().st_size
        if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
            raise ArtifactError(
                f"{folder}: {name} is {size} bytes but the export wrote {entry['bytes']}: the file is "
                f"{'truncated or replaced' if size < entry['bytes'] else 'not the one exported (replaced or appended to)'}; "
                "copy the artifact again or re-export"
            )
    if verify:
        for name, entry in recorded.items():
            if isinstance(entry.get("sha256"), str) and file_digest(folder / name) != entry["sha256"]:
                raise ArtifactError(
                    f"{folder}: {name} does not match the sha256 the export recorded: the file was changed or swapped "
                    "after export; copy the artifact again or re-export"
                )
