"""One place per default: a command-line flag whose value fills a config dataclass takes its
default from that dataclass's field (runtime.clihelp.field_default). Parsing the fewest
arguments each command accepts must give the dataclass's defaults, field for field."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from runtime.clihelp import field_default


def test_field_default():
    @dataclasses.dataclass
    class Config:
        a: int = 3
        b: list = dataclasses.field(default_factory=lambda: [1])
        c: int | None = None

    assert field_default(Config, "a") == 3 and field_default(Config, "b") == [1] and field_default(Config, "c") is None
    with pytest.raises(AttributeError, match="no field 'd'"):
        field_default(Config, "d")


def test_medusa_export_defaults_are_export_options():
    from exporter.cli import build_parser, export_options
    from exporter.export import ExportOptions

    args = build_parser().parse_args(["some-model", "-o", "out"])
    assert export_options(args) == ExportOptions(source_model="some-model")


def test_medusa_export_trt_defaults_are_limits():
    from exporter.trt_cli import _limits, _limits_parser
    from exporter.trt_plan import Limits

    for prog in ("trtexec", "build-engine"):
        assert _limits(_limits_parser(prog, "").parse_args(["art"])) == Limits()


def test_medusa_run_defaults_are_decode_config():
    from runtime.cli import build_parser, generate_kwargs
    from runtime.decode import DecodeConfig

    assert generate_kwargs(build_parser().parse_args(["generate", "art", "hi", "--no-datastore"]))["datastore"] is False
    args = build_parser().parse_args(["generate", "art", "hello"])
    kw = generate_kwargs(args)
    assert kw.pop("tree") is None  # the artifact's default tree
    kw["stop_strings"] = kw.pop("stop")
    assert DecodeConfig(**kw) == DecodeConfig()
    # --prefill-chunk's default is runtime.load's: DecodeConfig's for one sequence (a test in
    # tests/runtime/test_hardening.py loads it), the batch default for serve
    from runtime.decode import DEFAULT_PREFILL_CHUNK

    assert DEFAULT_PREFILL_CHUNK == DecodeConfig().prefill_chunk
    for command in (
        ["generate", "art", "hi"],
        ["bench", "art", "--prompts", "p.jsonl"],
        ["profile", "art"],
        ["serve", "art"],
    ):
        assert build_parser().parse_args(command).prefill_chunk is None
    assert (
        build_parser().parse_args(["bench", "art", "--prompts", "p.jsonl"]).max_new_tokens
        == DecodeConfig().max_new_tokens
    )


def test_the_python_api_defaults_are_decode_config():
    """MedusaGenerator.generate / stream take DecodeConfig's defaults in their signatures: they must agree."""
    from runtime.api import MedusaGenerator
    from runtime.decode import DecodeConfig

    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    for method in (MedusaGenerator.generate, MedusaGenerator.stream):
        params = inspect.signature(method).parameters
        shared = [n for n in params if n in fields]
        assert len(shared) >= 10, shared
        for name in shared:
            assert params[name].default == field_default(DecodeConfig, name), (method.__name__, name)


def test_medusa_train_defaults_are_the_configs():
    pytest.importorskip("torch")
    from training.cli import build_parser, distill_config, medusa1_config, medusa2_config, select_config
    from training.distill import DistillConfig
    from training.medusa1 import Medusa1Config
    from training.medusa2 import Medusa2Config
    from training.select_tree import SelectConfig

    p = build_parser()
    data, out = ["--data", "d.jsonl"], ["--out", "o"]
    assert distill_config(p.parse_args(["distill"])) == DistillConfig()
    assert medusa1_config(p.parse_args(["medusa1", *data, *out])) == Medusa1Config(data=Path("d.jsonl"), out=Path("o"))
    assert medusa2_config(p.parse_args(["medusa2", *data, *out])) == Medusa2Config(data=Path("d.jsonl"), out=Path("o"))
    assert select_config(p.parse_args(["select-tree", *data])) == SelectConfig(data=Path("d.jsonl"))
    from training.cli import datastore_config
    from training.datastore import DatastoreConfig

    assert datastore_config(p.parse_args(["datastore"])) == DatastoreConfig()
