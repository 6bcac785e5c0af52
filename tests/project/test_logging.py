"""Logging habits (runtime/log.py): library code logs to the medusa_trt.* loggers and never
configures logging; the three command lines configure it (-v / -q) and leave it as they found it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.log import add_verbosity_args, cli_logging, level_for, quiet, verbosity

TESTS = Path(__file__).resolve().parents[1]  # tests/: conftest.py


def test_an_int8_export_leaves_the_root_logger_alone(tmp_path):
    """Importing the packages and exporting with both ONNX Runtime quantizers (int8 heads and an
    int8 backbone) changes neither the root logger's level nor its handlers: ONNX Runtime's
    matmul_nbits_quantizer calls logging.basicConfig(level=INFO) when imported, and quantize_dynamic
    calls logging.warning on the root logger. A fresh interpreter: those run once per process."""
    pytest.importorskip("torch")
    script = textwrap.dedent(f"""
        import json, logging, sys
        sys.path.insert(0, {str(TESTS)!r})
        root = logging.getLogger()
        before = [root.level, len(root.handlers), len(root.filters)]
        import exporter.cli, runtime.cli, training.cli  # noqa: F401
        from conftest import make_tiny_llama, make_wordlevel_tokenizer
        from exporter.export import ExportOptions, export_artifact
        from exporter.heads import fresh_heads

        export_artifact(make_tiny_llama(0), fresh_heads(2, 32, 128), {str(tmp_path / "art")!r},
                        ExportOptions(precision="int8", validation_threads=1), tokenizer=make_wordlevel_tokenizer(128))
        print(json.dumps({{"before": before, "after": [root.level, len(root.handlers), len(root.filters)],
                          "medusa_trt": logging.getLogger("medusa_trt").level}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["after"] == seen["before"] == [logging.WARNING, 0, 0], seen
    assert seen["medusa_trt"] == logging.NOTSET  # nothing configured our own logger either
    assert (tmp_path / "art" / "heads_int8.onnx").is_file()
    assert "Please consider" not in r.stderr and "INFO" not in r.stderr, r.stderr[-3000:]


def test_cli_logging_is_undone_on_exit(capsys):
    logger = logging.getLogger("medusa_trt")
    before = (logger.level, logger.propagate, list(logger.handlers))
    with cli_logging("medusa-test", 1):
        assert logger.level == logging.INFO and not logger.propagate
        logging.getLogger("medusa_trt.exporter").info("a step")
        logging.getLogger("medusa_trt.runtime").debug("not shown at -v")
        logging.getLogger("medusa_trt.training").warning("careful")
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["[medusa-test] a step", "medusa-test: warning: careful"]


@pytest.mark.parametrize(
    "v, level, bars",
    [
        (-1, logging.ERROR, False),
        (0, logging.WARNING, True),
        (1, logging.INFO, True),
        (2, logging.DEBUG, True),
        (3, logging.DEBUG, True),
    ],
)
def test_verbosity_levels(v, level, bars):
    assert level_for(v) == level
    with cli_logging("medusa-test", v):
        assert quiet() is not bars  # progress bars (tqdm) follow -q


def test_the_three_commands_take_v_and_q_alike():
    import argparse

    from exporter.cli import build_parser as export_parser
    from runtime.cli import build_parser as run_parser
    from training.cli import build_parser as train_parser

    cases = [
        (export_parser(), ["smollm2-135m", "-o", "x"]),
        (run_parser(), ["generate", "art", "hi"]),
        (run_parser(), ["bench", "art", "--prompts", "p.jsonl"]),
        (train_parser(), ["distill"]),
        (train_parser(), ["select-tree", "--data", "d.jsonl"]),
    ]
    for parser, argv in cases:
        assert verbosity(parser.parse_args(argv)) == 0, argv
        assert verbosity(parser.parse_args([*argv, "-v"])) == 1, argv
        assert verbosity(parser.parse_args([*argv, "-vv"])) == 2, argv
        assert verbosity(parser.parse_args([*argv, "--verbose", "--verbose"])) == 2, argv
        assert verbosity(parser.parse_args([*argv, "-q"])) == -1, argv
        assert verbosity(parser.parse_args([*argv, "--quiet"])) == -1, argv
    # before the subcommand too
    assert verbosity(run_parser().parse_args(["-v", "generate", "art", "hi"])) == 1
    assert verbosity(train_parser().parse_args(["-q", "distill"])) == -1
    p = argparse.ArgumentParser()
    add_verbosity_args(p)
    assert verbosity(p.parse_args([])) == 0
