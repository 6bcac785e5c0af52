"""The TensorRT engine plan file (``trt_plan.json``): its format, and which profile takes a call.

The plan is what the runtime and the engine builders share: optimization profiles for the
artifact's two graphs, engine file names, the sizes the device buffers are laid out from.
The exporter writes it (:func:`exporter.trt_plan.make_plan`, with the graph contract's
axis names below); :mod:`runtime.trt_backend` reads it. Pure Python, no ``tensorrt``.

Axes (docs/graph_contract.md; every backbone input's shape is written in these)::

    input_ids, position_ids          [batch, new_tokens]
    tree_mask                        [batch, new_tokens, new_tokens]   follows new_tokens
    past_key_values.{i}.key|value    [batch, past_sequence, kv_heads, head_dim]

Profiles (one execution context each at run time)::

    0 prefill  new_tokens 1..max_prompt       past_sequence 0..max_context-max_prompt
    1 verify   new_tokens 1..max_tree_nodes   past_sequence 1..max_context-max_tree_nodes
    2 decode   new_tokens 1                   past_sequence 1..max_context-1

The backend declares what one call can take (:func:`max_new_tokens`) and the decode loop
chunks prompts and falls back to plain steps by it; a call no profile takes is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import MedusaError
from runtime.paths import read_json_object

PLAN_FILE = "trt_plan.json"
PLAN_FORMAT_VERSION = 1
BACKBONE_ENGINE = "model.engine"
HEADS_ENGINE = "heads.engine"
TIMING_CACHE = "timing.cache"
SUPPORTED_DTYPES = ("float32", "float16")
DEFAULT_WORKSPACE_MIB = 4096

BATCH, NEW, PAST = "batch", "new_tokens", "past_sequence"
PREFILL, VERIFY, DECODE = "prefill", "verify", "decode"
PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class PlanError(MedusaError):
    """The limits asked for do not fit the artifact, or a plan/engine file is inconsistent."""


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __iter__(self):
        yield from (self.min, self.opt, self.max)

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass
class Profile:
    """One optimization profile: a min/opt/max range per named axis."""

    name: str
    axes: dict[str, Range]

    def contains(self, past: int, new: int, batch: int = 1) -> bool:
        return self.axes[PAST].contains(past) and self.axes[NEW].contains(new) and self.axes[BATCH].contains(batch)


@dataclass
class Graph:
    """One ONNX file, its engine, its inputs (as axis names or fixed ints) and its profiles."""

    onnx: str
    engine: str
    inputs: dict[str, list]  # name -> dims, each an axis name or an int
    profiles: list[Profile]

    def shapes(self, profile: Profile) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``{input: (min_shape, opt_shape, max_shape)}`` for ``profile``, in graph input order."""

        def shape(dims: list, which: str) -> tuple[int, ...]:
            return tuple(getattr(profile.axes[d], which) if isinstance(d, str) else d for d in dims)

        return {
            name: (shape(dims, "min"), shape(dims, "opt"), shape(dims, "max")) for name, dims in self.inputs.items()
        }

    def profile_index(self, name: str) -> int:
        for i, p in enumerate(self.profiles):
            if p.name == name:
                return i
        raise PlanError(f"{self.onnx}: no profile named {name!r} (profiles: {[p.name for p in self.profiles]})")


@dataclass
class BuildPlan:
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    num_medusa_heads: int
    max_batch: int
    max_context: int
    tree: str
    tree_nodes: int
    backbone: Graph
    heads: Graph
    timing_cache: str = TIMING_CACHE
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    tf32: bool = False
    empty_cache: str = "past_sequence min 0 in the prefill profile (the cache is always visible: no dummy entry)"
    format_version: int = PLAN_FORMAT_VERSION

    # -- derived sizes -------------------------------------------------------------

    @property
    def max_new_tokens(self) -> int:
        """The largest new-token count any backbone profile takes (output buffer rows)."""
        return max(p.axes[NEW].max for p in self.backbone.profiles)

    @property
    def past_names(self) -> list[str]:
        return [n for n in self.backbone.inputs if PAST_INPUT.match(n)]

    def profile(self, name: str) -> Profile:
        return self.backbone.profiles[self.backbone.profile_index(name)]

    # -- checks --------------------------------------------------------------------

    def check(self) -> None:
        """Every invariant the engine and the runtime rely on; PlanError naming the first broken one."""
        if self.dtype not in SUPPORTED_DTYPES:
            raise PlanError(f"plan dtype {self.dtype!r} is not one of {SUPPORTED_DTYPES}")
        for graph in (self.backbone, self.heads):
            if not graph.profiles:
                raise PlanError(f"{graph.onnx}: the plan has no optimization profile")
            for p in graph.profiles:
                for axis, r in p.axes.items():
                    if not (0 <= r.min <= r.opt <= r.max):
                        raise PlanError(
                            f"{graph.onnx} profile {p.name!r}: axis {axis} needs 0 <= min <= opt <= max, got {tuple(r)}"
                        )
                for name, dims in graph.inputs.items():
                    for d in dims:
                        if isinstance(d, str) and d not in p.axes:
                            raise PlanError(
                                f"{graph.onnx} profile {p.name!r}: input {name} uses axis {d!r}, which has no range"
                            )
        for p in self.backbone.profiles:
            past, new, batch = p.axes[PAST], p.axes[NEW], p.axes[BATCH]
            if new.min != 1:  # the loop chunks by the largest count a call takes: every smaller one must fit too
                raise PlanError(f"profile {p.name!r}: new_tokens min must be 1, got {new.min}")
            if past.max + new.max > self.max_context:
                raise PlanError(
                    f"profile {p.name!r}: max past_sequence {past.max} + max new_tokens {new.max} = "
                    f"{past.max + new.max} exceeds max_context {self.max_context}"
                )
            if batch.max > self.max_batch:
                raise PlanError(f"profile {p.name!r}: batch max {batch.max} exceeds max_batch {self.max_batch}")
        # every call the decode loop makes must fit some profile: the first prefill (past 0),
        # a tree step, and a one-token step with the cache one short of full
        if not any(p.axes[PAST].min == 0 for p in self.backbone.profiles):
            raise PlanError(
                "no backbone profile accepts an empty cache (past_sequence 0): the first prefill cannot run"
            )
        if not any(p.contains(self.max_context - 1, 1) for p in self.backbone.profiles):
            raise PlanError(
                f"no backbone profile takes 1 new token on a cache of {self.max_context - 1}: the context end is unreachable"
            )
        if not any(p.axes[NEW].max >= self.tree_nodes for p in self.backbone.profiles):
            raise PlanError(f"no backbone profile takes the tree's {self.tree_nodes} nodes")

    # -- files ---------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def write(self, folder: str | Path) -> Path:
        from runtime.paths import write_text_atomic

        return write_text_atomic(Path(folder) / PLAN_FILE, self.to_json())  # never half-written

    @classmethod
    def from_dict(cls, raw: dict) -> BuildPlan:
        def graph(g: dict) -> Graph:
            profiles = [Profile(p["name"], {a: Range(**r) for a, r in p["axes"].items()}) for p in g["profiles"]]
            return Graph(
                onnx=g["onnx"],
                engine=g["engine"],
                inputs={k: list(v) for k, v in g["inputs"].items()},
                profiles=profiles,
            )

        fields = {k: v for k, v in raw.items() if k not in ("backbone", "heads")}
        plan = cls(backbone=graph(raw["backbone"]), heads=graph(raw["heads"]), **fields)
        plan.check()
        return plan


def read_plan(folder: str | Path) -> BuildPlan:
    """The plan an engine in ``folder`` was built with; PlanError naming the file when unusable."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        raise PlanError(
            f"{folder} has no {PLAN_FILE}: build an engine first (medusa-export build-engine {folder}, "
            f"or medusa-export trtexec {folder} and run the script it writes)"
        )
    raw = read_json_object(path, PlanError)
    if raw.get("format_version") != PLAN_FORMAT_VERSION:
        raise PlanError(
            f"{path}: plan format_version {raw.get('format_version')!r}, this version reads {PLAN_FORMAT_VERSION}; "
            "rebuild the engine with this version of medusa-export"
        )
    try:
        return BuildPlan.from_dict(raw)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a field missing, or of another JSON type
        raise PlanError(f"{path}: malformed plan ({e})") from None


# ---------------------------------------------------------------------------- which profile


def profile_for(plan: BuildPlan, past: int, n: int) -> int | None:
    """The backbone profile that takes ``n`` new tokens on a cache of ``past`` (None: none does):
    of those that hold (past, n), the one tuned nearest to ``n`` (smallest ``|opt - n|``, then
    the smallest maximum)."""
    fitting = [i for i, p in enumerate(plan.backbone.profiles) if p.contains(past, n)]
    if not fitting:
        return None
    axes = [plan.backbone.profiles[i].axes[NEW] for i in fitting]
    return min(zip(fitting, axes), key=lambda f: (abs(f[1].opt - n), f[1].max, f[0]))[0]


def max_new_tokens(plan: BuildPlan, past: int) -> int:
    """The most new tokens one engine call takes on a cache of ``past`` (0: none). Every
    profile's new-token range starts at 1 (:meth:`BuildPlan.check`), so any count up to this
    one fits some profile too."""
    return max(
        (p.axes[NEW].max for p in plan.backbone.profiles if p.axes[PAST].contains(past) and p.axes[BATCH].contains(1)),
        default=0,
    )
