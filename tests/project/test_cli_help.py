"""``--help`` of the three command lines names every option's default, and the bench table its units."""

from __future__ import annotations

import argparse
import json

import pytest


def _parsers():
    from exporter.cli import build_parser as export_parser
    from runtime.cli import build_parser as run_parser
    from training.cli import build_parser as train_parser

    out = {"medusa-export": export_parser()}
    for prog, p in (("medusa-run", run_parser()), ("medusa-train", train_parser())):
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        out.update({f"{prog} {name}": sp for name, sp in sub.choices.items()})
    return out


@pytest.mark.parametrize("prog", sorted(_parsers()))
def test_every_default_is_in_the_help(prog):
    parser = _parsers()[prog]
    for action in parser._actions:
        d = action.default
        if not action.option_strings or d is None or d is argparse.SUPPRESS or isinstance(d, bool) or d == []:
            continue
        fmt = parser._get_formatter()
        fmt.add_argument(action)
        entry = " ".join(fmt.format_help().split())  # the option's own entry, unwrapped
        assert "default" in entry.lower(), (prog, entry)
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text


def test_defaults_are_shown_with_their_values():
    parsers = _parsers()
    help_of = {k: " ".join(p.format_help().split()) for k, p in parsers.items()}
    assert "--batch-tokens BATCH_TOKENS positions per step (default: 256)" in help_of["medusa-train medusa1"]
    assert "--max-new-tokens MAX_NEW_TOKENS (default: 256)" in help_of["medusa-run bench"]
    assert "(default: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 24 32 48 64)" in help_of["medusa-run profile"]
    assert "ONNX Runtime device (default: CUDA if available)" in help_of["medusa-run generate"]
    assert "(default: auto) ONNX Runtime device" not in help_of["medusa-run generate"]  # not said twice


def test_bench_table_writes_milliseconds(repo_root):
    from runtime.bench import format_report

    res = json.loads((repo_root / "docs" / "results" / "bench.json").read_text())
    lines = format_report(res, per_prompt=False).splitlines()
    row = next(line for line in lines if line.startswith("smollm2_ort_cpu lookup=3"))
    engine = res["trees"]["smollm2_ort_cpu lookup=3"]["step_ms"]["engine"]  # the results file's own number
    assert row.count("ms") == 6 and f" {engine:.1f}ms " in row, row
