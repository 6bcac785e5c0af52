"""``medusa-train``: distill, medusa1, medusa2, select-tree, datastore.

Every subcommand takes ``--model`` (``smollm2-135m`` or a local Hugging Face folder).
A :class:`runtime.errors.MedusaError` prints its message and exits 1 with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from runtime.checks import MAX_TREE_NODES
from runtime.clihelp import HelpFormatter, field_default, json_object
from runtime.errors import require_extra, run_cli, sigterm_as_interrupt
from runtime.log import add_verbosity_args, cli_logging, verbosity
from training.data import MAX_CACHED_HEADS

# What each subcommand's arguments ask for, as its config dataclass; every flag's default is
# that dataclass field's default (build_parser; tests/project/test_cli_defaults.py checks they agree).


def distill_config(a):
    from training.distill import DistillConfig

    return DistillConfig(
        model=a.model,
        prompts=Path(a.prompts),
        out=Path(a.out),
        num_prompts=a.num_prompts,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        batch_size=a.batch_size,
        seed=a.seed,
        threads=a.threads,
        samples=a.samples,
        device=a.device,
        engine=Path(a.engine) if a.engine else None,
        chat_template_kwargs=a.chat_template_kwargs,
    )


def medusa1_config(a):
    from training.medusa1 import Medusa1Config

    return Medusa1Config(
        model=a.model,
        data=Path(a.data),
        out=Path(a.out),
        cache=Path(a.cache) if a.cache else None,
        num_heads=a.num_heads,
        num_layers=a.num_layers,
        head_type=a.head_type,
        shared_lm_head=not a.own_lm_head,
        lr=a.lr,
        epochs=a.epochs,
        batch_tokens=a.batch_tokens,
        max_steps=a.max_steps,
        max_train_tokens=a.max_train_tokens,
        train_vocab=a.train_vocab,
        seed=a.seed,
        threads=a.threads,
        soft_targets=a.soft_targets,
        draft_vocab=not a.no_draft_vocab,
        device=a.device,
        init_heads=Path(a.init_heads) if a.init_heads else None,
    )


def medusa2_config(a):
    from training.medusa2 import Medusa2Config

    return Medusa2Config(
        model=a.model,
        data=Path(a.data),
        out=Path(a.out),
        heads=a.heads,
        num_heads=a.num_heads,
        num_layers=a.num_layers,
        backbone_loss=a.backbone_loss,
        head_weight=a.head_weight,
        lr_backbone=a.lr_backbone,
        lr_heads=a.lr_heads,
        warmup_steps=a.warmup_steps,
        steps=a.steps,
        batch_size=a.batch_size,
        max_len=a.max_len,
        seed=a.seed,
        threads=a.threads,
    )


def select_config(a):
    from training.select_tree import SelectConfig

    return SelectConfig(
        model=a.model,
        heads=a.heads,
        data=Path(a.data) if a.data else None,
        cache=Path(a.cache) if a.cache else None,
        name=a.name,
        out_dir=Path(a.out_dir),
        force=a.force,
        profile=Path(a.profile) if a.profile else None,
        max_nodes=a.max_nodes,
        max_rank=a.max_rank,
        heads_cost=a.heads_cost,
        threads=a.threads,
        accuracy_from=Path(a.accuracy_from) if a.accuracy_from else None,
    )


def datastore_config(a):
    from training.datastore import DatastoreConfig

    return DatastoreConfig(model=a.model, data=Path(a.data), out=Path(a.out), split=a.split, max_ngram=a.max_ngram,
                           min_count=a.min_count, threads=a.threads)  # fmt: skip


def _datastore(a) -> None:
    from training.datastore import build_datastore

    build_datastore(datastore_config(a))


def _distill(a) -> None:
    from training.distill import distill

    cfg = distill_config(a)
    with sigterm_as_interrupt():  # SIGTERM stops like Ctrl-C: finished batches stay in OUT.partial
        records = distill(cfg)
    eos = sum(r["finish"] == "eos" for r in records)
    tokens = sum(len(r["response_ids"]) for r in records)
    print(f"wrote {len(records)} records ({tokens} response tokens, {eos} ended with EOS) to {cfg.out}")


def _medusa1(a) -> None:
    from training.medusa1 import train_medusa1

    train_medusa1(medusa1_config(a))


def _medusa2(a) -> None:
    from training.medusa2 import train_medusa2

    train_medusa2(medusa2_config(a))


def _select_tree(a) -> None:
    from training.select_tree import select_tree

    select_tree(select_config(a))


def add_device_arg(sp, default: str) -> None:
    sp.add_argument(
        "--device",
        default=default,
        help="where torch runs: cpu, cuda, cuda:N or mps (default: %(default)s; --threads counts CPU threads only)",
    )


def build_parser() -> argparse.ArgumentParser:
    from runtime.artifact import HEAD_TYPES
    from training.datastore import DatastoreConfig
    from training.distill import DistillConfig
    from training.medusa1 import Medusa1Config
    from training.medusa2 import Medusa2Config
    from training.select_tree import SelectConfig

    p = argparse.ArgumentParser(
        prog="medusa-train", description="Train Medusa heads by self-distillation.", formatter_class=HelpFormatter
    )
    add_verbosity_args(p)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, cls):
        sp.add_argument(
            "--model", default=field_default(cls, "model"), help="smollm2-135m or a local Hugging Face folder"
        )
        sp.add_argument(
            "--threads",
            type=int,
            default=field_default(cls, "threads"),
            help="torch CPU threads (default: torch's choice)",
        )
        seeded = "seed" in {f.name for f in dataclasses.fields(cls)}
        sp.add_argument(
            "--seed",
            type=int,
            default=field_default(cls, "seed") if seeded else 0,
            help=None if seeded else "unused by this subcommand",
        )
        add_verbosity_args(sp, sub=True)

    d = DistillConfig()
    sp = sub.add_parser(
        "distill", help="the backbone answers Alpaca prompts (self-distillation data)", formatter_class=HelpFormatter
    )
    common(sp, DistillConfig)
    sp.add_argument("--prompts", default=str(d.prompts), help="Alpaca-style JSON list (never MT-Bench)")
    sp.add_argument("--out", default=str(d.out), help="output .jsonl (resumes from OUT.partial)")
    sp.add_argument("--num-prompts", type=int, default=d.num_prompts)
    sp.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    sp.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    sp.add_argument("--batch-size", type=int, default=d.batch_size, help="answers generated together")
    sp.add_argument(
        "--samples",
        type=int,
        default=d.samples,
        help="sampled answers per prompt (--temperature > 0); with N > 1 the records are ID@1 .. ID@N, each its own "
        "seed, all in the prompt's split",
    )
    add_device_arg(sp, d.device)
    sp.add_argument(
        "--chat-template-kwargs",
        type=json_object,
        metavar="JSON",
        help="more variables for the chat template, a JSON object: '{\"enable_thinking\": false}' distills Qwen3's "
        "answers without a reasoning block",
    )
    sp.add_argument(
        "--engine",
        default=None,
        metavar="ARTIFACT",
        help="generate on this exported artifact's ONNX Runtime engine (--batch-size sequences batched "
        "per call; ~3x torch's speed on a CPU; the hidden states then by one causal pass per answer on the same "
        "engine), not torch",
    )
    sp.set_defaults(func=_distill)

    m = Medusa1Config()
    sp = sub.add_parser(
        "medusa1", help="train heads on a frozen backbone (cached hidden states)", formatter_class=HelpFormatter
    )
    common(sp, Medusa1Config)
    sp.add_argument("--data", required=True, help="distilled .jsonl from `medusa-train distill`")
    sp.add_argument("--out", required=True, help="output folder (medusa_heads.safetensors + .json)")
    sp.add_argument("--cache", default=m.cache, help="hidden-state cache folder (default: <data>.hidden/)")
    sp.add_argument("--num-heads", type=int, default=m.num_heads)
    sp.add_argument("--num-layers", type=int, default=m.num_layers, help="residual blocks per head")
    sp.add_argument(
        "--head-type",
        choices=HEAD_TYPES,
        default=m.head_type,
        help="medusa: head k reads the last hidden state; hydra: also the tokens on its path (Hydra's "
        "sequentially dependent heads; trees are then drafted level by level)",
    )
    sp.add_argument("--own-lm-head", action="store_true", help="each head gets its own vocabulary projection")
    sp.add_argument("--lr", type=float, default=m.lr)
    sp.add_argument("--epochs", type=int, default=m.epochs)
    sp.add_argument("--batch-tokens", type=int, default=m.batch_tokens, help="positions per step")
    sp.add_argument("--max-steps", type=int, default=m.max_steps, help="stop after this many steps (0: no limit)")
    add_device_arg(sp, m.device)
    sp.add_argument(
        "--init-heads",
        default=m.init_heads,
        metavar="HEADS",
        help="go on training these heads (a medusa-trt heads folder: same --num-heads, --num-layers, --head-type) "
        "instead of fresh ones, e.g. on new answers; their draft vocabulary joins the training softmax",
    )
    sp.add_argument(
        "--max-train-tokens", type=int, default=m.max_train_tokens, help="cap on cached train positions (0: all)"
    )
    sp.add_argument(
        "--train-vocab",
        choices=("data", "full"),
        default=m.train_vocab,
        help="softmax over the training targets' tokens (data, ~3x cheaper on SmolLM2) or the full "
        "vocabulary; accuracy is always ranked over the full vocabulary",
    )
    sp.add_argument(
        "--no-draft-vocab",
        action="store_true",
        help="with --train-vocab data, let the heads propose any token (default: only the tokens "
        "the training softmax covered, which the loss has ranked)",
    )
    sp.add_argument(
        "--soft-targets",
        action="store_true",
        help="head k learns the backbone's own distribution for its token (self-distillation KL, "
        "from the cached hidden states) instead of the one-hot token",
    )
    sp.set_defaults(func=_medusa1)

    m2 = Medusa2Config()
    sp = sub.add_parser("medusa2", help="train backbone and heads jointly", formatter_class=HelpFormatter)
    common(sp, Medusa2Config)
    sp.add_argument("--data", required=True)
    sp.add_argument("--out", required=True, help="output folder: backbone/ (HF) + heads/ (medusa-trt)")
    sp.add_argument(
        "--heads", default=m2.heads, help="start from these heads (e.g. Medusa-1 heads; default: fresh heads)"
    )
    sp.add_argument("--num-heads", type=int, default=m2.num_heads)
    sp.add_argument("--num-layers", type=int, default=m2.num_layers)
    sp.add_argument(
        "--backbone-loss",
        choices=("kl", "ce", "auto"),
        default=m2.backbone_loss,
        help="kl to the original model, ce on the data; auto: kl for self-distilled data",
    )
    sp.add_argument("--head-weight", type=float, default=m2.head_weight, help="lambda on the head losses")
    sp.add_argument("--lr-backbone", type=float, default=m2.lr_backbone)
    sp.add_argument("--lr-heads", type=float, default=m2.lr_heads)
    sp.add_argument("--warmup-steps", type=int, default=m2.warmup_steps, help="steps where only the heads train")
    sp.add_argument("--steps", type=int, default=m2.steps)
    sp.add_argument("--batch-size", type=int, default=m2.batch_size)
    sp.add_argument("--max-len", type=int, default=m2.max_len)
    sp.set_defaults(func=_medusa2)

    ds = DatastoreConfig()
    sp = sub.add_parser(
        "datastore",
        help="the runtime's datastore (drafts where the context repeats nothing) from distilled answers",
        formatter_class=HelpFormatter,
    )
    common(sp, DatastoreConfig)
    sp.add_argument("--data", default=str(ds.data), help="distilled .jsonl (medusa-train distill)")
    sp.add_argument("--out", default=str(ds.out), help="output file, or an artifact folder (its datastore.npz)")
    sp.add_argument("--split", default=ds.split, help="the records' split to use (default: %(default)s, as the heads)")
    sp.add_argument("--max-ngram", type=int, default=ds.max_ngram, help="longest n-gram indexed")
    sp.add_argument("--min-count", type=int, default=ds.min_count, help="keep n-grams seen at least this often")
    sp.set_defaults(func=_datastore)

    s = SelectConfig()
    sp = sub.add_parser(
        "select-tree", help="choose the tree for measured head accuracies and step costs", formatter_class=HelpFormatter
    )
    common(sp, SelectConfig)
    sp.add_argument("--heads", default=s.heads, help="trained heads folder (default: %(default)s)")
    source = sp.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="distilled .jsonl (its calibration split is used)")
    source.add_argument(
        "--accuracy-from",
        metavar="TREE_JSON",
        help="reuse the calibration rank accuracies a tree file recorded when it was selected "
        "(for the same heads): reselect for a new engine's --profile without the distillation data",
    )
    sp.add_argument("--cache", default=s.cache, help="hidden-state cache folder (default: <data>.hidden/)")
    sp.add_argument("--name", default=s.name)
    sp.add_argument(
        "--out-dir",
        default=str(s.out_dir),
        help="the tree is written to OUT_DIR/NAME.json (the repository's own trees are in tree_configs/)",
    )
    sp.add_argument("--force", action="store_true", help="replace OUT_DIR/NAME.json if it exists")
    sp.add_argument(
        "--profile", default=s.profile, help="cost profile JSON (medusa-run profile); default: measure with PyTorch"
    )
    sp.add_argument("--max-nodes", type=int, default=s.max_nodes)
    sp.add_argument("--max-rank", type=int, default=s.max_rank)
    sp.add_argument(
        "--heads-cost",
        type=float,
        default=s.heads_cost,
        help="the heads call per step relative to a plain step (default: the profile's heads_relative_cost)",
    )
    sp.set_defaults(func=_select_tree)
    return p


def check_numbers(args: argparse.Namespace) -> None:
    """Every number on the command line finite, and the ones every subcommand shares in range
    (runtime/checks.py): a NaN learning rate or temperature is refused before any work."""
    from runtime import checks

    for name, value in vars(args).items():
        if isinstance(value, float):
            checks.real(f"--{name.replace('_', '-')}", value)
    checks.threads(args.threads)
    checks.integer("--seed", args.seed, 0)
    for name, minimum, maximum, rule in RANGES.get(args.command, ()):
        value = getattr(args, name)
        flag = f"--{name.replace('_', '-')}"
        if isinstance(minimum, float):  # a float flag (None where it is optional)
            checks.real(flag, value, minimum, maximum, min_open=rule == "> 0", rule=rule, optional=True)
        else:
            checks.integer(flag, value, minimum, maximum, rule=rule)


# Each subcommand's numeric flags: (name, minimum, maximum, rule); checked by check_numbers before
# any model loads (a negative --max-steps would otherwise save untrained heads as a success).
_LR = (0.0, None, "> 0")
RANGES: dict[str, tuple[tuple[str, Any, Any, str | None], ...]] = {
    "distill": (
        ("num_prompts", 1, None, None),
        ("max_new_tokens", 1, None, None),
        ("temperature", 0.0, None, ">= 0 (0: greedy)"),
        ("batch_size", 1, None, None),
    ),
    "medusa1": (
        ("num_heads", 1, MAX_CACHED_HEADS, f"in [1, {MAX_CACHED_HEADS}] (the hidden-state cache serves that many)"),
        ("num_layers", 1, None, None),
        ("lr", *_LR),
        ("epochs", 1, None, None),
        ("batch_tokens", 1, None, None),
        ("max_steps", 0, None, ">= 0 (0: no limit)"),
        ("max_train_tokens", 0, None, ">= 0 (0: every cached train position)"),
    ),
    "medusa2": (
        ("num_heads", 1, None, None),
        ("num_layers", 1, None, None),
        ("head_weight", 0.0, None, None),
        ("lr_backbone", *_LR),
        ("lr_heads", *_LR),
        ("warmup_steps", 0, None, None),
        ("steps", 1, None, None),
        ("batch_size", 1, None, None),
        ("max_len", 2, None, None),
    ),
    "datastore": (("max_ngram", 1, None, None), ("min_count", 1, None, None)),
    "select-tree": (
        ("max_nodes", 1, MAX_TREE_NODES - 1, None),
        ("max_rank", 1, None, None),
        ("heads_cost", 0.0, None, ">= 0 (or omit it: the profile's heads_relative_cost)"),
    ),
}


def main(argv: list[str] | None = None) -> int:
    code = run_cli("medusa-train", lambda: require_extra("medusa-train", "train", ("torch", "transformers", "onnx")))
    if code:
        return code
    args = build_parser().parse_args(argv)
    from exporter.models import transformers_bars

    def command() -> int | None:
        check_numbers(args)
        return args.func(args)

    with cli_logging("medusa-train", verbosity(args)), transformers_bars(verbosity(args) >= 0):
        return run_cli(
            "medusa-train",
            command,
            interrupted="interrupted"
            + (
                "; finished batches are kept in OUT.partial: rerun the same command to resume"
                if args.command == "distill"
                else ""
            ),
        )


if __name__ == "__main__":
    sys.exit(main())
