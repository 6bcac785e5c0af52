"""``medusa-run``: generate text, benchmark Medusa against plain decoding, profile step cost."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from runtime import checks
from runtime.clihelp import HelpFormatter, field_default, json_object
from runtime.decode import ACCEPTANCES, DEFAULT_BATCH_PREFILL_CHUNK, DRAFTS, LOOKUP_SIZINGS, DecodeConfig
from runtime.errors import ConfigError, run_cli, sigterm_as_interrupt
from runtime.log import add_verbosity_args, cli_logging, verbosity
from runtime.paths import PLOT_SUFFIXES, write_text_atomic
from runtime.profile import DEFAULT_SIZES
from runtime.reasoning import PARSERS as REASONING_PARSERS
from runtime.toolcalls import PARSERS as TOOL_CALL_PARSERS

log = logging.getLogger("medusa_trt.runtime")
MAX_SERVE_BATCH = 256  # serve --max-batch at most: each slot holds a whole context's KV cache


def _decode_default(name: str):
    """A flag whose value goes into DecodeConfig takes its default from there."""
    return field_default(DecodeConfig, name)


EPILOG = """examples:
  medusa-run generate artifacts/smollm2-135m-medusa "Name three rivers in Europe." --stats
  medusa-run bench artifacts/smollm2-135m-medusa --prompts ../shared/data/mt_bench_question.jsonl \\
      --limit 10 --tree smollm2_selected cpu_8 --peer hf --json bench.json --plot bench.png
  medusa-run profile artifacts/smollm2-135m-medusa      # writes latency_profile.json into the artifact
  medusa-run calibrate artifacts/smollm2-135m-medusa --prompts my_prompts.jsonl   # for --tree dynamic
"""


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact folder written by medusa-export")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="ONNX Runtime device (default: CUDA if available)",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's choice)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache capacity in tokens (default: the model's)")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help=f"prompt tokens per prefill call (0: the whole prompt in one call; default {_decode_default('prefill_chunk')}, "
        f"serve {DEFAULT_BATCH_PREFILL_CHUNK}: the other requests wait for one chunk at a time)",
    )
    add_verbosity_args(p, sub=True)  # also after the subcommand: medusa-run generate ... -v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medusa-run", description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    add_verbosity_args(ap)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="prompt in, text out", formatter_class=HelpFormatter)
    _engine_args(g)
    g.add_argument("prompt", help="the user message (chat template applied), or raw text with --raw")
    g.add_argument("--raw", action="store_true", help="encode the prompt as is, without the chat template")
    g.add_argument(
        "--chat-template-kwargs",
        type=json_object,
        metavar="JSON",
        help="more variables for the chat template, a JSON object, e.g. '{\"enable_thinking\": false}' (Qwen3)",
    )
    fmt = g.add_mutually_exclusive_group()
    fmt.add_argument("--response-format", type=json_object, metavar="JSON",
                     help="constrain the answer, OpenAI's response_format: '{\"type\": \"json_object\"}', a json_schema "
                          "one, or '{\"type\": \"grammar\", \"grammar\": LARK}' (the structured extra)")  # fmt: skip
    fmt.add_argument("--json-schema", metavar="FILE",
                     help="constrain the answer to the JSON schema in FILE (--response-format's json_schema)")  # fmt: skip
    g.add_argument("--max-new-tokens", type=int, default=_decode_default("max_new_tokens"))
    g.add_argument(
        "--temperature",
        type=float,
        default=_decode_default("temperature"),
        help="0 = greedy (lossless); > 0 = sampling (see --acceptance)",
    )
    g.add_argument(
        "--acceptance",
        choices=ACCEPTANCES,
        default=_decode_default("acceptance"),
        help="sampling: exact = the backbone's own distribution (see --drafts); "
        "typical = Medusa's typical acceptance (accepts more, lossy)",
    )
    g.add_argument(
        "--drafts",
        choices=DRAFTS,
        default=_decode_default("drafts"),
        help="exact sampling: coupled = each position's token drawn by the Gumbel-max trick with noise the heads "
        "rank their drafts under too (a seed gives plain sampling's tokens); top = the heads' "
        "top-k as fixed candidates; sampled = each candidate drawn from its head's distribution, accepted with "
        "min(1, p/q). All three keep the backbone's distribution",
    )
    g.add_argument(
        "--top-k", type=int, default=_decode_default("top_k"), help="sampling: keep the k likeliest tokens (0 = all)"
    )
    g.add_argument(
        "--top-p", type=float, default=_decode_default("top_p"), help="sampling: nucleus mass to keep (1 = all)"
    )
    g.add_argument(
        "--lookup",
        type=int,
        default=_decode_default("lookup"),
        help="context-lookup draft tokens per Medusa step (0 = off); with a fixed tree and --lookup-sizing cost "
        "only on / off: the step cost decides, up to --lookup-max",
    )
    g.add_argument(
        "--lookup-max",
        type=int,
        default=_decode_default("lookup_max"),
        help="fixed trees: the most tokens the lookup draft holds (<= --lookup: fixed)",
    )
    g.add_argument(
        "--lookup-sizing",
        choices=LOOKUP_SIZINGS,
        default=_decode_default("lookup_sizing"),
        help="fixed trees: cost = verify as many draft tokens as pay for their rows (latency profile, hit rates); "
        "grow = +2 after a draft accepted whole, -1 otherwise",
    )
    g.add_argument(
        "--no-datastore",
        action="store_true",
        help="never draft from the artifact's datastore.npz (where the context repeats nothing)",
    )
    g.add_argument(
        "--epsilon", type=float, default=_decode_default("epsilon"), help="typical acceptance hard threshold"
    )
    g.add_argument(
        "--delta", type=float, default=_decode_default("delta"), help="typical acceptance entropy-scaled threshold"
    )
    g.add_argument(
        "--tree",
        default=None,
        help="tree name from tree_configs, a JSON file, or dynamic[:N] (a tree per step, "
        "at most N drafted nodes; runtime/dynamic.py) (default: the artifact's)",
    )
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=_decode_default("seed"))
    g.add_argument("--no-medusa", action="store_true", help="plain autoregressive decoding (the baseline)")
    g.add_argument("--stream", action="store_true", help="print text as it is accepted")
    g.add_argument("--stats", action="store_true", help="print decoding statistics to stderr")
    for name in ("presence", "frequency"):
        g.add_argument(
            f"--{name}-penalty",
            type=float,
            default=_decode_default(f"{name}_penalty"),
            metavar="P",
            help=f"OpenAI's {name} penalty on the generated tokens, -2..2 (greedy Medusa stays plain decoding's)",
        )
    g.add_argument(
        "--logprobs",
        type=int,
        default=_decode_default("logprobs"),
        metavar="K",
        help="print each token's log-probability under the backbone and its K likeliest alternatives (0-20) to stderr",
    )
    g.add_argument(
        "--verify",
        action="store_true",
        help="also check every artifact file's sha256 against the export's record (sizes are always "
        "checked; ~0.5 s for SmolLM2-135M)",
    )

    b = sub.add_parser("bench", help="plain vs Medusa on the same engine and prompts", formatter_class=HelpFormatter)
    _engine_args(b)
    b.add_argument(
        "--prompts",
        required=True,
        help="MT-Bench-style JSONL (first turns are used), JSONL with 'prompt', or an Alpaca JSON list",
    )
    b.add_argument("--limit", type=int, default=None, help="first N prompts only")
    b.add_argument("--skip", type=int, default=0, metavar="N", help="drop the first N prompts")
    b.add_argument(
        "--per-category",
        type=int,
        default=None,
        metavar="N",
        help="the first N prompts of each category (MT-Bench: 8 categories), before --limit",
    )
    b.add_argument("--max-new-tokens", type=int, default=_decode_default("max_new_tokens"))
    b.add_argument("--tree", nargs="+", default=[],
                   help="one or several trees to compare, dynamic[:N] among them (default: the artifact's)")  # fmt: skip
    b.add_argument(
        "--lookup",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="context-lookup draft tokens per step, one or several settings to compare (0 = off; "
        f"default {_decode_default('lookup')})",
    )
    b.add_argument(
        "--lookup-max",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="fixed trees: the most tokens the lookup draft holds, one or several settings to "
        f"compare (<= --lookup: fixed; default {_decode_default('lookup_max')})",
    )
    b.add_argument(
        "--lookup-sizing",
        choices=LOOKUP_SIZINGS,
        nargs="+",
        default=None,
        help="fixed trees: how many of the lookup draft's tokens a step verifies, one or both to compare "
        f"(default {_decode_default('lookup_sizing')})",
    )
    b.add_argument(
        "--datastore",
        choices=("on", "off"),
        nargs="+",
        default=["on"],
        help="where the context repeats nothing, the lookup drafts from the artifact's datastore.npz (its "
        "model's own answers to other prompts): on, off, or both to compare (default: on)",
    )
    b.add_argument(
        "--sampling",
        type=float,
        nargs="+",
        default=None,
        metavar="T",
        help="also compare plain sampling, exact (coupled, top-k and sampled drafts) and typical Medusa sampling "
        "at these temperatures",
    )
    b.add_argument(
        "--peer",
        choices=["hf", "ortgenai"],
        default=None,
        help="also run a peer on the same prompts, interleaved: hf = Hugging Face generate; ortgenai = "
        "onnxruntime-genai plain and with its n-gram speculation (pip install -e .[peers])",
    )
    b.add_argument("--peer-model", default=None, help="HF model folder for --peer (default: the artifact's source)")
    b.add_argument(
        "--peer-huge-pages",
        action="store_true",
        help="back onnxruntime-genai's weights with huge pages as ours are (runtime.hugepages; default: the "
        "peer as its users run it)",
    )
    b.add_argument("--json", default=None, help="write all results to this JSON file")
    b.add_argument("--plot", default=None, help="write the histogram and per-step time split to this PNG")

    pr = sub.add_parser("profile", help="cost of verifying N tokens vs one plain step", formatter_class=HelpFormatter)
    _engine_args(pr)
    pr.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    pr.add_argument("--cached", type=int, default=256, help="tokens in the cache while measuring")
    pr.add_argument("--repeats", type=int, default=7)
    pr.add_argument(
        "--peer",
        choices=["ortgenai"],
        default=None,
        help="also profile onnxruntime-genai's graph of the artifact's source model (pip install -e .[peers])",
    )
    pr.add_argument("--peer-model", default=None, help="HF model folder for --peer (default: the artifact's source)")
    pr.add_argument("-o", "--output", default=None, help="output JSON (default: ARTIFACT/latency_profile.json)")

    c = sub.add_parser(
        "calibrate",
        help="measure how often the drafts are accepted (what dynamic trees start from)",
        formatter_class=HelpFormatter,
        description="Decode prompts greedily with an exploring dynamic tree (the --max-nodes likeliest nodes "
        "every step) and count, per head depth and probability bin and per lookup position, how often a draft "
        "was accepted. Writes ARTIFACT/draft_calibration.json, which --tree dynamic reads. Calibrate on prompts "
        "like your traffic, and never on the prompts you evaluate on.",
    )
    _engine_args(c)
    c.add_argument("--prompts", required=True, help="MT-Bench-style JSONL, JSONL with 'prompt', or an Alpaca JSON list")
    c.add_argument("--skip", type=int, default=0, help="drop the first N prompts")
    c.add_argument("--limit", type=int, default=16, help="prompts to decode")
    c.add_argument("--max-new-tokens", type=int, default=192)
    c.add_argument("--max-nodes", type=int, default=16, help="drafted nodes per exploring step")
    c.add_argument("--lookup", type=int, default=_decode_default("lookup"), help="context-lookup draft tokens per step")
    c.add_argument("-o", "--output", default=None, help="output JSON (default: ARTIFACT/draft_calibration.json)")

    s = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /metrics)", formatter_class=HelpFormatter
    )
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (the banner names it)")
    s.add_argument(
        "--max-batch",
        type=int,
        default=1,
        help="requests decoded at once (their steps share one engine call where the artifact has batch.onnx)",
    )
    s.add_argument("--batching", default="auto", choices=["auto", "batch", "interleave"],
                   help="batch: the running requests' steps in one engine call (batch.onnx); interleave: one request "
                        "per call, steps taking turns; auto: batch where the artifact has batch.onnx")  # fmt: skip
    s.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests waiting beyond the --max-batch running (0: none wait); more get 429 at once",
    )
    s.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every prompt whole (default: a prompt that begins with what a finished request's "
                        "prompt and answer were, the next turn of a chat, keeps that request's cache entries)")  # fmt: skip
    s.add_argument("--model-name", default=None, help="the model id clients send (default: the artifact folder's name)")
    s.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="think: a chat answer's <think>...</think> block goes to the message's reasoning field "
                        "(and reasoning_content), the rest to content, as vLLM's reasoning parsers (Qwen3, QwQ, "
                        "DeepSeek-R1)")  # fmt: skip
    s.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="hermes: function calling (OpenAI's tools / tool_calls) for models that answer with "
                        "<tool_call>{...}</tool_call> blocks (Qwen2.5, Qwen3, Hermes), as vLLM's parser of that name; "
                        "without it a request with tools gets 400")  # fmt: skip
    s.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="every request but /health and /metrics must send Authorization: Bearer KEY (OpenAI's "
                        "clients: api_key=KEY), else 401; repeat for more keys; default: $MEDUSA_API_KEY, which "
                        "keeps the key out of the process list")  # fmt: skip
    s.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                   help="web origins whose pages may call the API from a browser (CORS), as "
                        "https://app.example.com, or *; repeat or separate with commas; default: none")  # fmt: skip
    s.add_argument("--plain", action="store_true", help="serve plain decoding (no Medusa): the baseline server")
    s.add_argument(
        "--tree", default=None, help="Medusa tree for every request, or dynamic[:N] (default: the artifact's)"
    )
    s.add_argument("--lookup", type=int, default=_decode_default("lookup"), help="context-lookup draft tokens per step")
    s.add_argument("--lookup-max", type=int, default=_decode_default("lookup_max"),
                   help="fixed trees: the most tokens the lookup draft holds")  # fmt: skip
    s.add_argument("--lookup-sizing", choices=LOOKUP_SIZINGS, default=_decode_default("lookup_sizing"),
                   help="fixed trees: how many of the lookup draft's tokens a step verifies")  # fmt: skip
    s.add_argument(
        "--graceful-timeout",
        type=int,
        default=30,
        help="seconds running requests get at shutdown (SIGTERM); queued ones get 503 at once, those "
        "still running after it a 503 error",
    )
    s.add_argument("--ray-replicas", type=int, default=0,
                   help="serve through Ray Serve with this many replicas, each its own process and engine "
                        "(pip install 'medusa-trt[ray]'; 0: one process, no Ray)")  # fmt: skip
    s.add_argument("--ray-gpus-per-replica", type=float, default=0.0, help="GPUs Ray reserves per replica")
    return ap


def _load_args(args) -> dict:
    """runtime.load's keyword arguments from the engine flags."""
    return dict(backend=args.backend, device=args.device, threads=args.threads, max_context=args.max_context,
                prefill_chunk=args.prefill_chunk, verify=getattr(args, "verify", False),
                reuse_prefix=not getattr(args, "no_prefix_reuse", False))  # fmt: skip


def _load(args, **overrides):
    import runtime

    return runtime.load(args.artifact, **{**_load_args(args), **overrides})


def generate_kwargs(args) -> dict:
    """The keyword arguments of MedusaGenerator.generate / stream for ``medusa-run generate``."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        epsilon=args.epsilon,
        delta=args.delta,
        tree=args.tree,
        stop=args.stop,
        seed=args.seed,
        medusa=not args.no_medusa,
        acceptance=args.acceptance,
        top_k=args.top_k,
        top_p=args.top_p,
        lookup=args.lookup,
        lookup_max=args.lookup_max,
        lookup_sizing=args.lookup_sizing,
        drafts=args.drafts,
        datastore=not args.no_datastore,
        logprobs=args.logprobs,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )


def cmd_generate(args) -> None:
    if not args.prompt.strip():
        raise ConfigError("the prompt is empty")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the terminal sent that are not UTF-8 (Python keeps them as lone surrogates)
        raise ConfigError("the prompt is not UTF-8 text: set the terminal's encoding to UTF-8") from None
    if args.no_medusa and args.tree:
        raise ConfigError("--tree has no effect with --no-medusa (plain decoding verifies no tree): give one of them")
    if args.json_schema is not None:
        from runtime.paths import read_text

        try:
            schema = json.loads(read_text(args.json_schema, error=ConfigError))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--json-schema {args.json_schema}: not valid JSON ({e.msg}, line {e.lineno})") from None
        args.response_format = {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem,
                                                                       "schema": schema}}  # fmt: skip
    gen = _load(args)
    if args.raw and args.chat_template_kwargs is not None:
        raise ConfigError("--chat-template-kwargs has no effect with --raw (no chat template is applied): give one")
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    kw = generate_kwargs(args)
    if args.chat_template_kwargs is not None:
        kw["chat_template_kwargs"] = args.chat_template_kwargs
    if args.response_format is not None:
        kw["response_format"] = args.response_format
    logprobs: list = []
    if args.stream:
        stats = None
        for chunk in gen.stream(prompt, **kw):
            print(chunk.text, end="", flush=True)
            stats = chunk.stats
            logprobs.extend(chunk.logprobs or [])
        print()
    else:
        out = gen.generate(prompt, **kw)
        print(out.text)
        stats = out.stats
        logprobs = out.logprobs or []
    if stats is not None and stats.finish_reason == "context" and not args.stats:
        log.warning("the answer stopped at the end of the context (%d tokens), before --max-new-tokens",
                    gen.backend.max_context)  # fmt: skip
    if logprobs:
        text = lambda t: repr(gen.tokenizer.token_bytes(t).decode("utf-8", errors="replace"))
        for lp in logprobs:
            alts = "  ".join(f"{text(t)} {v:.3f}" for t, v in lp.top)
            print(f"{text(lp.token):>16} {lp.logprob:8.3f}" + (f"   | {alts}" if alts else ""), file=sys.stderr)
    if args.stats and stats is not None:
        s = stats
        tree = "plain" if args.no_medusa else (args.tree or gen.default_tree.name)
        print(
            f"[{tree}] {s.new_tokens} tokens in {s.steps} steps, mean accepted {s.mean_accepted:.2f}, "
            f"{s.tokens_per_s:.1f} tok/s (decode), finish: {s.finish_reason}",
            file=sys.stderr,
        )
        print(
            "accepted-length histogram: " + ", ".join(f"{k}: {v}" for k, v in sorted(s.accept_hist.items())),
            file=sys.stderr,
        )
        print("time (ms): " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in s.times.items()), file=sys.stderr)
        if s.lookup_steps:
            print(
                f"lookup: drafts in {s.lookup_steps} steps, {s.lookup_accepted} tokens accepted that only it drafted "
                f"(of them from the datastore: {s.datastore_steps} steps, {s.datastore_accepted} tokens)",
                file=sys.stderr,
            )


def cmd_bench(args) -> None:
    from runtime.bench import format_report, load_prompts, plot_bench, run_bench
    from runtime.paths import check_output_file

    if args.peer_model and not args.peer:
        raise ConfigError("--peer-model names the model of a --peer: give --peer too")
    if args.peer_huge_pages and args.peer != "ortgenai":
        raise ConfigError("--peer-huge-pages applies to --peer ortgenai")
    if args.json:
        check_output_file("--json", args.json)
    if args.plot:
        from runtime.errors import require_extra

        check_output_file("--plot", args.plot, PLOT_SUFFIXES)
        require_extra("--plot", "train", ("matplotlib",))  # before the bench, not after it
    prompts = load_prompts(args.prompts, args.limit, args.per_category, args.skip)
    # every decoder prefills every prompt whole: the same prompt runs once per decoder, and a kept prefix
    # would spare the later ones their prefill (the peer's too: it reuses nothing)
    gen = _load(args, reuse_prefix=False)
    res = run_bench(
        gen,
        prompts,
        args.tree,
        args.max_new_tokens,
        peer=args.peer,
        peer_model=args.peer_model,
        threads=args.threads,
        progress=verbosity(args) >= 0,
        lookups=args.lookup,
        lookup_maxes=args.lookup_max,
        lookup_sizings=args.lookup_sizing,
        sampling=args.sampling,
        datastores=[d == "on" for d in args.datastore],
        peer_huge_pages=args.peer_huge_pages,
    )
    res["command"] = "medusa-run " + " ".join(sys.argv[1:]) if sys.argv and "medusa-run" in sys.argv[0] else None
    print(format_report(res, per_prompt=verbosity(args) >= 0))  # -q: the summary table only
    if args.json:
        write_text_atomic(args.json, json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_bench(res, args.plot)
        print(f"wrote {args.plot}")


def cmd_profile(args) -> None:
    from runtime.paths import check_output_file
    from runtime.profile import (
        PROFILE_FILE,
        fitting_cache,
        format_peer_table,
        profile_tree_sizes,
        screen_summary,
        write_profile,
    )

    checks.integer("--repeats", args.repeats, 1)
    checks.integer("--cached", args.cached, 0)
    for n in args.sizes:
        checks.integer("--sizes", n, 1)
    if 1 not in args.sizes:
        raise ConfigError("--sizes must include 1: every cost is relative to a one-token step")
    if args.peer_model and not args.peer:
        raise ConfigError("--peer-model names the model of a --peer: give --peer too")
    # the default output is the artifact's own file: checked as -o is
    output = check_output_file("-o", args.output or Path(args.artifact) / PROFILE_FILE)
    gen = _load(args)
    if max(args.sizes) > gen.backend.max_context:  # (--cached is cut to what fits beside the largest size)
        raise ConfigError(
            f"--sizes up to {max(args.sizes)} exceed the artifact's context of {gen.backend.max_context} tokens"
        )
    peer_dir = None
    if args.peer:  # built (or found) before our profile, so that a user error stops the run at once
        from runtime.peers import peer_model_dir, profile_peer_sizes

        peer_dir = peer_model_dir(gen, args.peer_model)

    def show(n, ms):
        label = f"N={n:>3}" if isinstance(n, int) else n
        print(f"  {label}: {ms:8.2f} ms", flush=True)

    cached = fitting_cache(gen.backend.max_context, args.sizes, args.cached)  # what profile_tree_sizes measures at
    if cached < args.cached:
        log.warning("--cached %d does not fit the context with N = %d: %d cached tokens", args.cached,
                    max(args.sizes), cached)  # fmt: skip
    print(f"verifying N new tokens over {cached} cached tokens ({type(gen.backend).__name__}, threads {args.threads}):")
    prof = profile_tree_sizes(gen.backend, args.sizes, cached=args.cached, repeats=args.repeats, progress=show)
    prof["backend"] = type(gen.backend).__name__
    prof["threads"] = args.threads
    print(
        "relative to N=1: "
        + ", ".join(f"{n}: {c:.2f}x" for n, c in prof["relative_cost"].items())
        + f"; heads call {prof['heads_relative_cost']:.2f}x"
        + (f" (head 1 alone {prof['first_head_relative_cost']:.2f}x)" if "first_head_ms" in prof else "")
    )
    if "screen_max_rows" in prof:  # timed both ways: where the screen runs from now on, and what it saves
        print(screen_summary(prof))
    if peer_dir is not None:
        print(f"{args.peer}: the same over {prof['cached_tokens']} cached tokens ({peer_dir}):", flush=True)
        prof["peer"] = profile_peer_sizes(
            peer_dir, args.sizes, cached=prof["cached_tokens"], repeats=args.repeats, threads=args.threads
        )
        print(format_peer_table(prof))
    out = write_profile(prof, output)
    print(f"wrote {out}")


def cmd_calibrate(args) -> None:
    import dataclasses

    from tqdm import tqdm

    from runtime.bench import load_prompts
    from runtime.dynamic import CALIBRATION_FILE, DYNAMIC, calibration_from, write_calibration
    from runtime.paths import check_output_file

    # the default output is the artifact's own file: checked as -o is
    output = check_output_file("-o", args.output or Path(args.artifact) / CALIBRATION_FILE)
    prompts = load_prompts(args.prompts, args.limit, None, args.skip)
    gen = _load(args)
    policy = dataclasses.replace(gen._tree(DYNAMIC), max_nodes=args.max_nodes, explore=True, calibration=None)
    states, tokens, steps = [], 0, 0
    for p in tqdm(prompts, desc="calibrating", unit="prompt", disable=None):
        out = gen.generate(
            [{"role": "user", "content": p.text}], max_new_tokens=args.max_new_tokens, tree=policy, lookup=args.lookup
        )
        states.append(out.stats.dynamic)
        tokens, steps = tokens + out.stats.new_tokens, steps + out.stats.steps
    cal = calibration_from(states, source=f"medusa-run calibrate --prompts {args.prompts} --skip {args.skip} "
                                          f"--limit {len(prompts)} --max-nodes {args.max_nodes}")  # fmt: skip
    print(f"{len(prompts)} prompts, {tokens} tokens in {steps} steps ({tokens / max(1, steps):.2f} a step, "
          f"{args.max_nodes} drafted nodes a step)")  # fmt: skip
    print(cal.summary())
    out = write_calibration(cal, output)
    print(f"wrote {out}")


def cmd_serve(args) -> None:
    from runtime.serve import bind, check_batching, check_decode, require_serve, serve, serve_access

    require_serve()  # before loading the artifact
    # every flag checked before the artifact loads and before the banner: a mistake is one line, exit 1
    checks.integer("--port", args.port, 0, 65535, rule="in [0, 65535] (0: any free port)")
    checks.integer("--max-batch", args.max_batch, 1, MAX_SERVE_BATCH,
                   rule=f"in [1, {MAX_SERVE_BATCH}] (each slot holds a whole context's cache)")  # fmt: skip
    if args.plain and args.tree:
        raise ConfigError("--tree has no effect with --plain (plain decoding verifies no tree): give one of them")
    checks.integer("--max-queue", args.max_queue, 0)
    checks.integer("--graceful-timeout", args.graceful_timeout, 0)
    checks.integer("--ray-replicas", args.ray_replicas, 0)
    checks.real("--ray-gpus-per-replica", args.ray_gpus_per_replica, 0)
    if args.ray_replicas and args.port == 0:
        raise ConfigError("--port 0 (any free port) does not work with --ray-replicas: give the port to serve on")
    check_batching(args.batching, args.backend, args.device)
    access = serve_access(args.api_key, args.allowed_origins, os.environ.get("MEDUSA_API_KEY"))
    name = args.model_name or Path(args.artifact).resolve().name
    decode = {"medusa": not args.plain, "tree": args.tree, "lookup": args.lookup, "lookup_max": args.lookup_max,
              "lookup_sizing": args.lookup_sizing}  # fmt: skip
    check_decode(decode)  # the values; the tree once the model is loaded
    sockets = bind(args.host, args.port)  # a host that does not resolve or a port in use: refused now
    if args.ray_replicas:
        from runtime.serve import serve_ray

        for sock in sockets:  # Ray's proxy binds the port itself
            sock.close()
        if args.tree and not args.tree.startswith("dynamic"):  # each replica checks it again, against its model
            from runtime.artifact import read_artifact

            spec = read_artifact(args.artifact).model
            checks.tree(args.tree, spec.num_medusa_heads, spec.vocab_size)
        serve_ray(str(Path(args.artifact).resolve()), name, args.ray_replicas, _load_args(args), host=args.host,
                  port=args.port, max_batch=args.max_batch, max_queue=args.max_queue, decode=decode,
                  gpus_per_replica=args.ray_gpus_per_replica, batching=args.batching,
                  reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
                  access=access)  # fmt: skip
        return
    from runtime.serve import available_memory, check_cache_memory_early, load_for_serving

    # a cache that cannot fit, refused before the batch engine's load times its graph (minutes at --max-batch 256)
    check_cache_memory_early(args.artifact, args.max_batch, args.batching, _load_args(args), available_memory())
    gen = load_for_serving(args.artifact, args.max_batch, args.batching, **_load_args(args))
    check_decode(decode, gen)  # --tree against the model: before the banner, not a 400 on every request
    port = sockets[0].getsockname()[1]  # --port 0: the one the system chose
    mode = "batched engine calls" if getattr(gen, "engine", None) is not None else "interleaved steps"
    from runtime.serve import check_cache_memory

    try:
        note = check_cache_memory(gen, args.max_batch, available_memory())
    except ConfigError:
        gen.close()
        raise
    mode += f"; {note}" if note else ""
    for sock in sockets:  # connections from the banner on wait in the backlog for uvicorn, not refused
        sock.listen(2048)
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    print(f"serving {name} on http://{host}:{port}/v1 (max_batch {args.max_batch}, max_queue "
          f"{args.max_queue}, {'plain decoding' if args.plain else 'Medusa'}, {mode}); Ctrl-C or SIGTERM stops it",
          flush=True)  # fmt: skip
    serve(gen, name, host=args.host, port=port, max_batch=args.max_batch, max_queue=args.max_queue,
          graceful_timeout=args.graceful_timeout, decode=decode, sockets=sockets,
          reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser, access=access)  # fmt: skip


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = {"generate": cmd_generate, "bench": cmd_bench, "profile": cmd_profile, "calibrate": cmd_calibrate,
               "serve": cmd_serve}[args.command]  # fmt: skip
    # SIGTERM stops like Ctrl-C (every finally runs: a peer's temporary build folder goes), exit 143;
    # not serve's: uvicorn and Ray Serve take SIGTERM for a graceful shutdown (and uvicorn re-raises it)
    graceful = args.command == "serve"
    with cli_logging("medusa-run", verbosity(args)), contextlib.nullcontext() if graceful else sigterm_as_interrupt():
        return run_cli("medusa-run", lambda: command(args), interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
