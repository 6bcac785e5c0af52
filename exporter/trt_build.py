"""Build the artifact's TensorRT engines with the TensorRT Python API, from the build plan.

The same plan as the trtexec recipe (:mod:`exporter.trt_cli`): the ONNX parser, a
strongly typed network (every precision comes from the ONNX file; TensorRT 11 networks are
always strongly typed, 10.x opts in with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``),
one optimization profile per plan profile, the workspace pool limit, and a timing cache
file that is loaded before and saved after every build (rebuilds and the second engine
reuse the tactic timings). Progress comes from ``IProgressMonitor``.

``tensorrt`` is imported only inside :func:`build_engines`; without it (or without a GPU)
the user gets one :class:`runtime.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.artifact import ArtifactConfig
from runtime.errors import MedusaError
from runtime.paths import atomic_file, atomic_path, check_output_file
from runtime.plan import PLAN_FILE, BuildPlan, Graph, PlanError
from runtime.trt_backend import require_gpu, require_tensorrt

log = logging.getLogger("medusa_trt.exporter")


class EngineBuildError(MedusaError):
    """TensorRT could not parse the ONNX file or build the engine; the message lists why."""


class ProgressPrinter:
    """Readable build progress from TensorRT's phase/step callbacks (no tensorrt needed).

    Phases nest (``parent`` names the enclosing phase); a line is printed when a phase
    starts and finishes, and for steps at most every ``every_s`` seconds.
    """

    def __init__(
        self, write: Callable[[str], None] = print, every_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ):
        self.write = write
        self.every_s = every_s
        self.clock = clock
        self.phases: dict[str, tuple[int, int, float]] = {}  # name -> (depth, steps, start time)
        self._last = -float("inf")

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        depth = self.phases[parent_phase][0] + 1 if parent_phase in self.phases else 0
        self.phases[phase_name] = (depth, num_steps, self.clock())
        self.write(f"{'  ' * depth}[trt] {phase_name} ({num_steps} steps)")

    def step_complete(self, phase_name: str, step: int) -> bool:
        now = self.clock()
        if phase_name in self.phases and now - self._last >= self.every_s:
            depth, steps, _ = self.phases[phase_name]
            self.write(f"{'  ' * depth}[trt] {phase_name}: {step + 1}/{steps}")
            self._last = now
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        depth, _, start = self.phases.pop(phase_name, (0, 0, self.clock()))
        self.write(f"{'  ' * depth}[trt] {phase_name} done in {self.clock() - start:.1f}s")


def _monitor(trt, printer: ProgressPrinter):
    """An ``IProgressMonitor`` forwarding to ``printer``; None where TensorRT has none."""
    base: Any = getattr(trt, "IProgressMonitor", None)  # a class only known at run time
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            printer.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return printer.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            printer.phase_finish(phase_name)

    return Monitor()


def network_flags(trt) -> int:
    """STRONGLY_TYPED where the enum still has it (10.x; deprecated no-op on 11)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def check_network_inputs(names: list[str], graph: Graph) -> None:
    """The parsed network must have exactly the plan's inputs (names and order)."""
    if names != list(graph.inputs):
        missing = [n for n in graph.inputs if n not in names]
        extra = [n for n in names if n not in graph.inputs]
        raise PlanError(
            f"{graph.onnx}: the network's inputs differ from {PLAN_FILE} "
            f"(missing {missing[:4]}, unexpected {extra[:4]}); re-export the artifact or remake the plan"
        )


def build_engines(
    folder: str | Path,
    plan: BuildPlan,
    config: ArtifactConfig | None = None,
    verbose: bool = False,
    write: Callable[[str], None] | None = None,
) -> list[Path]:
    """Build ``model.engine`` and ``heads.engine`` in ``folder``; write the plan first.

    Progress (the build phases, what was written) goes to ``write``, by default the
    ``medusa_trt.exporter`` logger at INFO; ``verbose``: TensorRT's own log at VERBOSE.

    ``config`` (the artifact's) gets ``provenance["engine"]`` recorded, so the runtime's
    ``auto`` backend knows an engine exists.
    """
    write = write or log.info
    trt = require_tensorrt()
    require_gpu()
    folder = Path(folder)
    plan.check()
    for graph in (plan.backbone, plan.heads):  # the folder takes new files: known before hours of building
        check_output_file("build-engine", folder / graph.engine)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineBuildError("TensorRT could not create a builder (is the GPU usable? see the log above)")
    cache_path = folder / plan.timing_cache
    # each engine goes to a temporary file beside its name (atomic_path), and the engines, then the plan
    # and the config, take their names only once both are built (the stack's exits): a failed or
    # interrupted build leaves the previous engines with their own plan, never a new engine beside an old one
    built = []
    with contextlib.ExitStack() as staged:
        for graph in (plan.backbone, plan.heads):
            target = folder / graph.engine
            write(f"building {target} from {graph.onnx} ({len(graph.profiles)} profile(s))")
            start = time.monotonic()
            data = _build_one(trt, builder, logger, folder, graph, plan, cache_path, write)
            staged.enter_context(atomic_path(target)).write_bytes(data)
            write(f"built {target} ({data.nbytes / 2**20:.1f} MiB) in {time.monotonic() - start:.0f}s")
            built.append(target)
    plan.write(folder)
    if config is not None:
        config.provenance["engine"] = {
            "backbone": plan.backbone.engine,
            "heads": plan.heads.engine,
            "plan": PLAN_FILE,
            "tensorrt": getattr(trt, "__version__", "?"),
        }
        config.write(folder)
    return built


def _build_one(
    trt, builder, logger, folder: Path, graph: Graph, plan: BuildPlan, cache_path: Path, write
) -> memoryview:
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    onnx_path = folder / graph.onnx
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path} does not exist (re-run medusa-export)")
    # parse_from_file resolves external weights (model.onnx.data) next to the file
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors[:10]))
    check_network_inputs([network.get_input(i).name for i in range(network.num_inputs)], graph)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mib << 20)
    if plan.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    for profile in graph.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in graph.shapes(profile).items():
            p.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(p) < 0:
            raise EngineBuildError(f"{graph.onnx}: TensorRT refused profile {profile.name!r}")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # TensorRT refuses a cache made on another GPU or TensorRT version (or a damaged file): this
        # build starts a new one, which replaces it when the build is done
        write(f"{cache_path} is from another GPU or TensorRT version, or damaged: starting a new timing cache")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    monitor = _monitor(trt, ProgressPrinter(write))
    if monitor is not None:
        config.progress_monitor = monitor

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (the log above says why)")
    timings = config.get_timing_cache()
    if timings is not None:
        with atomic_file(cache_path, binary=True) as f:  # read by the next build: never half-written
            f.write(memoryview(timings.serialize()))
    return memoryview(serialized)  # written from TensorRT's buffer, not a copy of a large engine
