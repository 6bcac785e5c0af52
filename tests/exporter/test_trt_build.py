"""The engine builder, driven through a recording stand-in for the ``tensorrt`` module.

The stand-in implements only the calls :mod:`exporter.trt_build` makes (TensorRT 10/11
Python API names) and records them, so the test checks that the plan reaches TensorRT:
profiles, strongly typed flag, workspace limit, TF32, the timing cache round trip and the
progress monitor. It says nothing about TensorRT itself (none is installed here).
"""

from __future__ import annotations

import json
import sys
import types

import pytest
from trt_fakes import fake_config, write_fake_artifact

from exporter import trt_build
from exporter.trt_build import EngineBuildError, ProgressPrinter, build_engines, check_network_inputs, network_flags
from exporter.trt_plan import Limits, make_plan
from runtime import trt_backend
from runtime.artifact import read_artifact
from runtime.errors import BackendUnavailableError
from runtime.plan import PlanError


def fake_tensorrt(log: dict):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.8.0.43"

    class Logger:
        WARNING, VERBOSE = "warning", "verbose"

        def __init__(self, level):
            log["logger"] = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        TF32 = "tf32"

    class IProgressMonitor:
        def __init__(self):
            pass

    class Input:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, flags):
            log.setdefault("network_flags", []).append(flags)
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return Input(self.inputs[i])

    class Error:
        def __init__(self, text):
            self.text = text

        def desc(self):
            return self.text

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = []

        def parse_from_file(self, path):
            # the stand-in's "ONNX file" is JSON: {"inputs": [...]} or {"errors": [...]}
            data = json.loads(open(path).read())
            self.errors = data.get("errors", [])
            self.network.inputs = data.get("inputs", [])
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return Error(self.errors[i])

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        def __init__(self):
            self.profiles, self.flags, self.progress_monitor = [], {}, None
            log.setdefault("configs", []).append(self)

        def set_memory_pool_limit(self, pool, size):
            self.pool = (pool, size)

        def set_flag(self, flag):
            self.flags[flag] = True

        def clear_flag(self, flag):
            self.flags[flag] = False

        def add_optimization_profile(self, p):
            self.profiles.append(p.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            log.setdefault("cache_loaded", []).append(bytes(data))
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if log.get("foreign_cache") and cache.data:  # TensorRT: False for another device's cache
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            m = config.progress_monitor
            m.phase_start("Building engine", None, 2)
            m.phase_start("Tactics", "Building engine", 3)
            assert m.step_complete("Tactics", 0) is True
            m.phase_finish("Tactics")
            m.phase_finish("Building engine")
            if log.get("fail_build") or network.inputs == log.get("fail_on_inputs"):
                return None
            return b"ENGINE:" + ",".join(network.inputs).encode()

    for cls in (
        Logger,
        NetworkDefinitionCreationFlag,
        MemoryPoolType,
        BuilderFlag,
        IProgressMonitor,
        OnnxParser,
        Builder,
    ):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture
def artifact(tmp_path, monkeypatch):
    """A fake artifact whose graph files the stand-in parser reads, with tensorrt and a GPU faked."""
    cfg = fake_config(max_context=128)
    folder = write_fake_artifact(tmp_path / "art", cfg)
    (folder / "model.onnx").write_text(json.dumps({"inputs": cfg.backbone.inputs}))
    (folder / "heads.onnx").write_text(json.dumps({"inputs": ["hidden_states"]}))
    log: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: 1)
    return folder, read_artifact(folder), log


def test_the_plan_reaches_the_builder(artifact):
    folder, cfg, log = artifact
    plan = make_plan(cfg, Limits(max_prompt=32, workspace_mib=256))
    lines = []
    paths = build_engines(folder, plan, cfg, write=lines.append)
    assert [p.name for p in paths] == ["model.engine", "heads.engine"]
    assert (folder / "model.engine").read_bytes() == b"ENGINE:" + ",".join(cfg.backbone.inputs).encode()
    backbone, heads = log["configs"]
    assert backbone.profiles == [plan.backbone.shapes(p) for p in plan.backbone.profiles]
    assert heads.profiles == [plan.heads.shapes(plan.heads.profiles[0])]
    assert backbone.pool == ("workspace", 256 << 20) and backbone.flags == {"tf32": False}
    assert log["network_flags"] == [1 << 1, 1 << 1]  # STRONGLY_TYPED on both networks
    # the timing cache: empty for the first build, then what the first build saved, then saved again
    assert log["cache_loaded"] == [b"", b"+timings"]
    assert (folder / "timing.cache").read_bytes() == b"+timings+timings"
    assert any("[trt] Building engine (2 steps)" in x for x in lines) and any(
        "  [trt] Tactics done in" in x for x in lines
    )
    assert read_artifact(folder).provenance["engine"] == {
        "backbone": "model.engine",
        "heads": "heads.engine",
        "plan": "trt_plan.json",
        "tensorrt": "10.8.0.43",
    }
    assert (folder / "trt_plan.json").is_file()


def test_a_build_that_fails_midway_leaves_the_previous_engines_with_their_plan(artifact):
    """The backbone's engine built, the heads' failing: nothing takes a name (the engines, then the
    plan and the config, are renamed into place once both are built), and no temporary file stays."""
    folder, cfg, log = artifact
    old = make_plan(cfg, Limits(max_prompt=32))
    build_engines(folder, old, cfg, write=lambda s: None)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    log["fail_on_inputs"] = ["hidden_states"]  # the heads graph's network
    with pytest.raises(EngineBuildError, match="failed to build an engine from .*heads.onnx"):
        build_engines(folder, make_plan(cfg, Limits(max_prompt=16)), read_artifact(folder), write=lambda s: None)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "timing.cache"} == {
        k: v for k, v in before.items() if k != "timing.cache"
    }  # the timing cache may hold the backbone's new timings: it is read, never trusted as a result


def test_a_timing_cache_from_another_gpu_is_replaced_not_fatal(artifact):
    """TensorRT refuses a cache made on another device (set_timing_cache returns False): the build
    goes on with a new cache, which then replaces the foreign one."""
    folder, cfg, log = artifact
    (folder / "timing.cache").write_bytes(b"other-gpu")
    log["foreign_cache"] = True
    lines = []
    build_engines(folder, make_plan(cfg), cfg, write=lines.append)
    assert sum("starting a new timing cache" in x for x in lines) == 2  # the stand-in refuses every non-empty one
    assert (folder / "timing.cache").read_bytes() == b"+timings"
    assert (folder / "model.engine").read_bytes().startswith(b"ENGINE:")


def test_an_unwritable_engine_path_is_named_before_the_build(artifact):
    from runtime.errors import ConfigError

    folder, cfg, log = artifact
    (folder / "heads.engine").mkdir()
    with pytest.raises(ConfigError, match=r"heads.engine is a folder"):
        build_engines(folder, make_plan(cfg), cfg, write=lambda s: None)
    assert "configs" not in log  # nothing was built


def test_parser_and_build_failures_are_user_errors(artifact):
    folder, cfg, log = artifact
    plan = make_plan(cfg)
    (folder / "model.onnx").write_text(json.dumps({"errors": ["node 12 (Attention): unsupported", "second"]}))
    with pytest.raises(
        EngineBuildError, match=r"ONNX parser rejected .*model.onnx:\n  node 12 \(Attention\): unsupported\n  second"
    ):
        build_engines(folder, plan, write=lambda s: None)
    (folder / "model.onnx").write_text(json.dumps({"inputs": cfg.backbone.inputs[:3]}))
    with pytest.raises(
        PlanError, match=r"network's inputs differ from trt_plan.json \(missing \['past_key_values.0.key'"
    ):
        build_engines(folder, plan, write=lambda s: None)
    (folder / "model.onnx").write_text(json.dumps({"inputs": cfg.backbone.inputs}))
    log["fail_build"] = True
    with pytest.raises(EngineBuildError, match="failed to build an engine from"):
        build_engines(folder, plan, write=lambda s: None)
    (folder / "model.onnx").unlink()
    with pytest.raises(EngineBuildError, match="model.onnx does not exist"):
        build_engines(folder, plan, write=lambda s: None)


def test_without_tensorrt_or_gpu(tmp_path, monkeypatch):
    cfg = fake_config()
    plan = make_plan(cfg)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="^TensorRT is not installed"):
        build_engines(tmp_path, plan)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}))
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: 0)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU is visible"):
        build_engines(tmp_path, plan)
    assert not (tmp_path / "trt_plan.json").exists()  # nothing written before the checks pass


def test_network_flags_and_input_check():
    assert (
        network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))) == 2
    )
    assert network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())) == 0
    plan = make_plan(fake_config())
    check_network_inputs(list(plan.heads.inputs), plan.heads)
    with pytest.raises(PlanError, match=r"unexpected \['x'\]"):
        check_network_inputs(["hidden_states", "x"], plan.heads)


def test_progress_printer_nests_and_throttles():
    t = [0.0]
    lines = []
    p = ProgressPrinter(lines.append, every_s=1.0, clock=lambda: t[0])
    p.phase_start("Build", None, 2)
    p.phase_start("Tactics", "Build", 100)
    for step in range(5):
        t[0] += 0.4
        assert p.step_complete("Tactics", step)
    p.phase_finish("Tactics")
    t[0] += 1.0
    p.phase_finish("Build")
    assert lines == [
        "[trt] Build (2 steps)",
        "  [trt] Tactics (100 steps)",
        "  [trt] Tactics: 1/100",  # the first step prints, then at most once a second
        "  [trt] Tactics: 4/100",
        "  [trt] Tactics done in 2.0s",
        "[trt] Build done in 3.0s",
    ]
    assert trt_build._monitor(types.SimpleNamespace(), p) is None  # no IProgressMonitor: no monitor
