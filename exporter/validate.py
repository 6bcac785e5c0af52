"""Validate an exported artifact: ONNX Runtime against the PyTorch graph-contract modules.

Every output of ``model.onnx`` (logits, hidden_states, every ``present.{i}.key|value``)
and of ``heads.onnx`` (medusa_logits) is compared with what :class:`exporter.step.BackboneStep`
and :class:`exporter.step.HeadsStep` compute eagerly on the same inputs, for batch 1 and 2:

* ``prefill``   empty cache, 8 new tokens, causal mask;
* ``decode``    the prefill's cache, one new token (a plain autoregressive step);
* ``tree NAME`` the prefill's cache and the tree's nodes (``mc_sim_7b_63``: 64 nodes,
  ``chain_3``: 4 nodes), the tree's attention mask and position ids;
* ``tree NAME, empty cache``  the same tree with nothing cached;
* ``heads``     the Medusa heads on the prefill's and the decode step's last hidden state.

The cache handed to every step is PyTorch's, so each comparison measures one step's error.
float32: a tensor passes when ``max|onnx - torch| <= atol + rtol * max|torch|`` (see
:data:`TOLERANCES`). float16: both fp16 runs are compared with the truth they approximate,
the same fp16 weights and inputs computed in float32; ONNX Runtime passes when its
distance from that is within the float16 tolerance or at most :data:`FP16_FACTOR` times
PyTorch fp16's own distance (on 30-layer SmolLM2 fed random tokens, fp16 rounding alone
moves logits by ~1, which no fixed tolerance separates from a broken graph). The top-1 token of the backbone's logits must agree at every position;
a disagreement is tolerated only where PyTorch's own top two logits are within the
tolerance of each other (a tie that no backend can be expected to break the same way).
Each comparison is logged PASS (DEBUG) / FAIL (INFO) with its max abs difference to the
``medusa_trt.exporter`` logger; all failures are raised
together as one :class:`runtime.errors.ValidationError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import ValidationError

log = logging.getLogger("medusa_trt.exporter")

# (atol, rtol): a tensor passes when max|diff| <= atol + rtol * max|reference|.
TOLERANCES = {"float32": (1e-4, 1e-3), "float16": (2e-2, 2e-2)}
# float16: ONNX Runtime may be this many times as far from the float32 result as PyTorch fp16 is
FP16_FACTOR = 2.0
DEFAULT_TREES = ("mc_sim_7b_63", "chain_3")
_NP = {"float32": np.float32, "float16": np.float16}


@dataclass
class Check:
    case: str
    output: str
    max_abs: float
    tol: float
    passed: bool
    detail: str = ""

    def line(self) -> str:
        if self.output.startswith("top-1"):
            gap = (
                f" (PyTorch logit gap at a disagreement {self.max_abs:.3g}, tol {self.tol:.3g})" if self.max_abs else ""
            )
            return f"{'PASS' if self.passed else 'FAIL'}  {self.case:<34} {self.output:<28} {self.detail}{gap}"
        extra = f"  {self.detail}" if self.detail else ""
        return (
            f"{'PASS' if self.passed else 'FAIL'}  {self.case:<34} {self.output:<28} "
            f"max|diff| {self.max_abs:.3g} (tol {self.tol:.3g}){extra}"
        )

    def __str__(self) -> str:
        return f"{self.case}: {self.output} max|diff| {self.max_abs:.3g} > tol {self.tol:.3g}{'; ' + self.detail if self.detail else ''}"


@dataclass
class ValidationReport:
    dtype: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def max_abs(self) -> dict[str, float]:
        """Largest difference per output family (logits, hidden_states, present, medusa_logits)."""
        out: dict[str, float] = {}
        for c in self.checks:
            if c.output.startswith("top-1") or c.output.endswith("[other tokens]"):  # not a difference
                continue
            key = "present" if c.output.startswith("present") else c.output.removesuffix("[draft]")
            out[key] = max(out.get(key, 0.0), c.max_abs)
        return out

    def summary(self) -> dict:
        return {
            "passed": self.ok,
            "checks": len(self.checks),
            "failures": [str(c) for c in self.failures],
            "max_abs_diff": {k: float(f"{v:.3g}") for k, v in self.max_abs().items()},
            "tolerance": dict(zip(("atol", "rtol"), TOLERANCES[self.dtype])),
        }


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no busy-waiting worker threads: validation shares the machine with PyTorch
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _tol(ref: np.ndarray, dtype: str) -> float:
    atol, rtol = TOLERANCES[dtype]
    return atol + rtol * (float(np.abs(ref).max()) if ref.size else 0.0)


def fp16_tolerance(ref32: np.ndarray, d_torch: float, dtype: str) -> float:
    """What a float16 graph may differ from the float32 truth ``ref32``: the plain tolerance, or up to
    FP16_FACTOR times PyTorch fp16's own distance ``d_torch`` from it. A PyTorch fp16 run that overflowed
    (NaN or inf: ``d_torch`` infinite) widens nothing: an infinite tolerance would pass any output, NaN
    logits included."""
    plain = _tol(ref32, dtype)
    return max(plain, FP16_FACTOR * d_torch) if np.isfinite(d_torch) else plain


def _diff(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        return float("inf")
    if not ref.size:
        return 0.0
    d = np.abs(got.astype(np.float32) - ref.astype(np.float32))
    return float(np.nan_to_num(d, nan=np.inf).max())


def _top1_check(case: str, ref: np.ndarray, got: np.ndarray, tol: float) -> Check:
    """The top-1 token of ``got`` must be ``ref``'s at every position, except where the reference
    ranks the two within ``tol`` of each other (a near-tie no backend can be expected to break alike)."""
    ref, got = ref.astype(np.float32), got.astype(np.float32)
    rt, gt = ref.argmax(-1), got.argmax(-1)
    differ = rt != gt
    gap = np.take_along_axis(ref, rt[..., None], -1)[..., 0] - np.take_along_axis(ref, gt[..., None], -1)[..., 0]
    real = differ & (gap > tol)
    ties = int((differ & ~real).sum())
    detail = f"{rt.size - int(differ.sum())}/{rt.size} positions agree" + (f", {ties} near-ties" if ties else "")
    return Check(case, "top-1(logits)", float(gap.max()) if differ.any() else 0.0, tol, not real.any(), detail)


def validate_artifact(
    folder: str | Path,
    model,
    heads,
    *,
    trees: Sequence[str] = DEFAULT_TREES,
    batches: Sequence[int] = (1, 2),
    prompt_len: int = 8,
    seed: int = 0,
    verbose: bool = False,
    raise_on_failure: bool = True,
    threads: int | None = None,
) -> ValidationReport:
    """Compare the artifact in ``folder`` with ``model`` / ``heads`` run eagerly.

    ``model`` and ``heads`` are the exported modules (cast to the artifact's dtype when
    they are not). Logs one line per comparison (DEBUG; a failure at INFO) (present tensors: one line per case for
    all layers, naming the worst, unless ``verbose``). Raises ValidationError listing every
    failure unless ``raise_on_failure`` is False. ``threads`` caps PyTorch's and ONNX
    Runtime's threads for the duration (on a shared or oversubscribed machine 1 is much
    faster than OpenMP's spinning workers).
    """
    import torch

    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _validate(
            folder,
            model,
            heads,
            trees=trees,
            batches=batches,
            prompt_len=prompt_len,
            seed=seed,
            verbose=verbose,
            raise_on_failure=raise_on_failure,
            threads=threads,
        )
    finally:
        torch.set_num_threads(saved_threads)


def _validate(
    folder, model, heads, *, trees, batches, prompt_len, seed, verbose, raise_on_failure, threads
) -> ValidationReport:
    import copy

    import torch

    from exporter.step import BackboneStep, cast_module
    from exporter.step import heads_step as make_heads_step
    from runtime.artifact import read_artifact
    from runtime.onnxrt import run_fused_contract
    from runtime.tree import load_tree

    folder = Path(folder)
    config = read_artifact(folder)
    dtype = config.dtype
    tdtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    model = cast_module(model, tdtype).eval()
    heads = cast_module(heads, tdtype).eval()
    step = BackboneStep(model).eval()
    heads_step = make_heads_step(heads, model).eval()
    fp16 = dtype == "float16"
    if fp16:  # the same (fp16-rounded) weights computed in float32: the truth both fp16 runs approximate
        model32 = copy.deepcopy(model).float()
        step32 = BackboneStep(model32).eval()
        heads_step32 = make_heads_step(copy.deepcopy(heads).float(), model32).eval()
    backbone = _session(folder / config.backbone.file, threads)
    heads_sess = _session(folder / config.heads.file, threads)
    b_in, b_out = config.backbone.inputs, config.backbone.outputs
    spec = config.model
    npdt = _NP[dtype]
    report = ValidationReport(dtype)

    def add(check: Check, quiet: bool = False) -> None:
        report.checks.append(check)
        if not quiet or not check.passed:
            log.log(logging.DEBUG if check.passed else logging.INFO, "%s", check.line())

    def compare(case: str, name: str, got: np.ndarray, ref: np.ndarray, ref32: np.ndarray | None) -> Check:
        """float32: ONNX vs PyTorch. float16: ONNX fp16 vs the float32 truth, allowed up to
        FP16_FACTOR times PyTorch fp16's own distance from it (or the plain tolerance)."""
        if ref32 is None:
            d, tol = _diff(got, ref), _tol(ref, dtype)
            return Check(case, name, d, tol, d <= tol)
        d, d_torch = _diff(got, ref32), _diff(ref, ref32)
        tol = fp16_tolerance(ref32, d_torch, dtype)
        return Check(case, name, d, tol, d <= tol, f"vs float32; PyTorch fp16 {d_torch:.3g}")

    def torch_run(fn, args: list[np.ndarray], to32: bool = False) -> list[np.ndarray]:
        tensors = [torch.from_numpy(a.astype(np.float32) if to32 and a.dtype == np.float16 else a) for a in args]
        with torch.inference_mode():
            out = fn(*tensors)
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]

    def run_backbone(case: str, ids, pos, mask, past) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ref = torch_run(step, [ids, pos, mask, *past])
        ref32 = torch_run(step32, [ids, pos, mask, *past], to32=True) if fp16 else [None] * len(ref)
        if config.flavour == "fused":  # the same tensors, through the fused graph's cache layout
            got = run_fused_contract(backbone, ids, pos, mask, past)
        else:
            got = backbone.run(None, dict(zip(b_in, [ids, pos, mask, *past])))
        # logits and hidden states: one line each
        checks = [compare(case, name, g, r, r32) for name, g, r, r32 in zip(b_out[:2], got[:2], ref[:2], ref32[:2])]
        for c in checks:
            add(c)
        # presents: every tensor checked, one summary line per case (all lines when verbose)
        presents = []
        for name, g, r, r32 in zip(b_out[2:], got[2:], ref[2:], ref32[2:]):
            presents.append(compare(case, name, g, r, r32))
            add(presents[-1], quiet=not verbose)
        if presents and not verbose:
            worst = max(presents, key=lambda c: c.max_abs / max(c.tol, 1e-30))
            bad = sum(not c.passed for c in presents)
            label = f"present.* ({len(presents)} tensors)"
            log.log(
                logging.INFO if bad else logging.DEBUG,
                f"{'FAIL' if bad else 'PASS'}  {case:<34} {label:<28} "
                f"max|diff| {max(c.max_abs for c in presents):.3g} (closest to tol: {worst.output}, "
                f"{worst.max_abs:.3g} vs {worst.tol:.3g})",
            )
        # top-1 of the verified logits (float16: against the float32 truth, within the logits' tolerance)
        truth = ref32[0] if fp16 else ref[0]
        assert truth is not None  # fp16: ref32 holds the float32 run's outputs
        r = truth.astype(np.float32)
        g = got[0].astype(np.float32)
        if r.shape == g.shape and r.size:
            add(_top1_check(case, r, g, checks[0].tol))
        return got, ref

    draft = None if heads.draft_vocab is None else heads.draft_vocab.numpy()

    hydra = spec.medusa_head_type == "hydra"

    def run_heads(case: str, hidden: np.ndarray) -> None:
        args = [hidden]
        if hydra:  # every depth: row n runs head n % K on a random path of its length
            K = spec.num_medusa_heads
            rows = len(hidden) * K
            hidden = np.ascontiguousarray(np.repeat(hidden, K, axis=0))
            paths = rng.integers(0, spec.vocab_size, (rows, K), dtype=np.int64)
            args = [hidden, paths, (np.arange(rows, dtype=np.int64) % K) + 1]
        ref = torch_run(heads_step, args)[0]
        ref32 = torch_run(heads_step32, args, to32=True)[0] if fp16 else None
        (got,) = heads_sess.run(None, dict(zip(config.heads.inputs, args)))
        name = config.heads.outputs[0]
        if draft is None:
            add(compare(case, name, got, ref, ref32))
            return
        # a draft vocabulary: compare the real logits (the lowest-value filler elsewhere would
        # make max|reference| and so the tolerance astronomically large), then require the filler
        ref32_draft = None if ref32 is None else ref32[..., draft]
        add(compare(case, f"{name}[draft]", got[..., draft], ref[..., draft], ref32_draft))
        outside = np.ones(got.shape[-1], dtype=bool)
        outside[draft] = False
        wrong = int((got[..., outside] != np.finfo(got.dtype).min).sum()) if got.shape == ref.shape else -1
        add(
            Check(
                case,
                f"{name}[other tokens]",
                float(abs(wrong)),
                0.0,
                wrong == 0,
                "all at the lowest finite value" if wrong == 0 else f"{abs(wrong)} logits are not the filler value",
            )
        )

    rng = np.random.default_rng(seed)
    kv_shape = (spec.num_kv_heads, spec.head_dim)
    # the fused graph holds cos/sin rows (and a sliding window) for max_context cache entries: a call
    # past that is one the runtime never makes, and GroupQueryAttention refuses it (INVALID_ARGUMENT)
    limit = spec.max_context if config.flavour == "fused" else None
    if limit is not None:
        prompt_len = max(1, min(prompt_len, limit - 1))
    for b in batches:
        empty = [np.zeros((b, 0, *kv_shape), dtype=npdt) for _ in range(2 * spec.num_layers)]
        n = prompt_len
        ids = rng.integers(0, spec.vocab_size, (b, n), dtype=np.int64)
        pos = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()
        mask = np.broadcast_to(np.tril(np.ones((n, n), dtype=bool)), (b, n, n)).copy()
        _, ref = run_backbone(f"prefill b={b} new={n}", ids, pos, mask, empty)
        cache = [np.ascontiguousarray(p) for p in ref[2:]]
        run_heads(f"heads b={b} (after prefill)", np.ascontiguousarray(ref[1][:, -1]))

        nxt = ref[0][:, -1].astype(np.float32).argmax(-1).astype(np.int64)[:, None]
        _, ref = run_backbone(
            f"decode b={b} past={n} new=1",
            nxt,
            np.full((b, 1), n, dtype=np.int64),
            np.ones((b, 1, 1), dtype=bool),
            cache,
        )
        run_heads(f"heads b={b} (after decode)", np.ascontiguousarray(ref[1][:, -1]))

        for name in trees:
            tree = load_tree(name)
            m = tree.num_nodes
            t_ids = rng.integers(0, spec.vocab_size, (b, m), dtype=np.int64)
            t_mask = np.broadcast_to(tree.attn_mask, (b, m, m)).copy()
            cases = [(cache, n, f"past={n}"), (empty, 0, "empty cache")]
            if config.flavour == "fused" and tree.depth + 1 < m:
                # GroupQueryAttention's first-prompt path (empty cache) rotates by 0..n-1 and ignores
                # position_ids: the fused runtime always prefills first and refuses a tree on an empty cache
                cases = cases[:1]
            for past, past_len, label in cases:
                if limit is not None and past_len + m > limit:
                    log.debug(
                        "SKIP  tree %s b=%d %s: %d tokens exceed max_context %d", name, b, label, past_len + m, limit
                    )
                    continue
                t_pos = np.broadcast_to(past_len + tree.position_ids.astype(np.int64), (b, m)).copy()
                run_backbone(f"tree {name} b={b} {label}", t_ids, t_pos, t_mask, past)

    if report.ok:
        mx = ", ".join(f"{k} {v:.3g}" for k, v in report.max_abs().items())
        log.info("validation passed: %d comparisons; max|diff| %s", len(report.checks), mx)
    elif raise_on_failure:
        raise ValidationError(report.failures)
    return report


def validate_batch_graph(
    folder: str | Path,
    backbone_file: str,
    batch_file: str,
    dtype: str,
    max_context: int,
    trees: Sequence[str] = DEFAULT_TREES,
    seed: int = 0,
    threads: int | None = None,
    raise_on_failure: bool = True,
    folded: bool = False,
) -> ValidationReport:
    """Compare ``batch.onnx`` with the (already validated) fused ``model.onnx``, sequence by sequence.

    ``folded``: ``batch_file`` is the folded batch graph (``fold.onnx``): the same inputs, the
    slots' cache bound as one ``[1, B x kv_heads, capacity, head_dim]`` tensor, and each
    sequence's new entries in the ``present.*`` it returns at ``max(cache_lengths)``.

    One batched call holds four sequences with different cache lengths and different new-token
    counts, padded to the longest (as the batch engine pads them): a prefill on an empty cache,
    one plain token, and each of ``trees`` (default: 64 and 4 nodes). Every cache buffer is
    longer than its sequence and filled past its length with large values, so a mask that let a
    token see past its own cache would show (trees that do not fit ``max_context`` are left out). Each sequence's logits, hidden states and new K/V
    are compared with ``model.onnx`` run on that sequence alone (``run_fused_contract``), with
    :data:`TOLERANCES` and the top-1 rule of :func:`validate_artifact`.
    """
    from runtime.onnxrt import run_fused_contract
    from runtime.tree import load_tree

    folder = Path(folder)
    single = _session(folder / backbone_file, threads)
    batch = _session(folder / batch_file, threads)
    names = [i.name for i in batch.get_inputs()][5:]
    shape = {i.name: i.shape for i in single.get_inputs()}[names[0]]
    kv, head_dim = int(shape[1]), int(shape[3])
    vocab = int(batch.get_outputs()[0].shape[2])
    npdt = _NP[dtype]
    rng = np.random.default_rng(seed)
    # (case, cache length, ids, positions relative to the cache, mask)
    # (every position below max_context: the rotary tables hold that many)
    p = min(8, max_context)
    seqs = [("prefill (empty cache)", 0, p, np.arange(p), np.tril(np.ones((p, p), dtype=bool)))]
    seqs.append(("plain token", min(7, max_context - 1), 1, np.zeros(1, np.int64), np.ones((1, 1), dtype=bool)))
    for k, name in enumerate(trees):
        t = load_tree(name)
        if 5 + 4 * k + t.num_nodes <= max_context:  # the rotary tables hold max_context positions
            seqs.append((f"tree {name}", 5 + 4 * k, t.num_nodes, t.position_ids, t.attn_mask))
    n_max = max(s[2] for s in seqs)
    cap = max(s[1] for s in seqs) + 16 + (n_max if folded else 0)  # folded: the new entries go in the buffer
    B = len(seqs)
    ids = np.zeros((B, n_max), np.int64)
    pos = np.zeros((B, n_max), np.int64)
    mask = np.broadcast_to(np.eye(n_max, dtype=bool), (B, n_max, n_max)).copy()
    lens = np.array([s[1] for s in seqs], np.int64)
    caches = [rng.standard_normal((B, kv, cap, head_dim)).astype(npdt) for _ in names]
    for cache in caches:  # entries past each sequence's length: loud, so that seeing them shows
        for b, (_, length, *_rest) in enumerate(seqs):
            cache[b, :, length:] = 100.0
    for b, (_, length, n, rel, m) in enumerate(seqs):
        ids[b, :n] = rng.integers(0, vocab, n)
        ids[b, n:] = ids[b, n - 1]
        pos[b, :n] = length + np.asarray(rel)
        pos[b, n:] = pos[b, n - 1]
        mask[b, :n, :n] = m
    bound = [c.reshape(1, B * kv, cap, head_dim) for c in caches] if folded else caches
    feed = {"input_ids": ids, "position_ids": pos, "tree_mask": mask, "cache_lengths": lens,
            "num_logits": np.array([n_max], np.int64), **dict(zip(names, bound))}  # fmt: skip
    logits, hidden, *presents = batch.run(None, feed)
    if folded:  # [1, B x kv, T, D] -> each sequence's new entries [B, kv, n_max, D], as batch.onnx returns them
        at = int(lens.max())
        presents = [p.reshape(B, kv, -1, head_dim)[:, :, at : at + n_max] for p in presents]
    report = ValidationReport(dtype)
    for b, (case, length, n, _rel, _m) in enumerate(seqs):
        past = [np.ascontiguousarray(c[b : b + 1, :, :length].transpose(0, 2, 1, 3)) for c in caches]
        ref_logits, ref_hidden, *ref_new = run_fused_contract(single, ids[b : b + 1, :n], pos[b : b + 1, :n],
                                                              mask[b : b + 1, :n, :n], past)  # fmt: skip
        case = f"{'folded ' if folded else ''}batch graph, {case}"
        got = {"logits": logits[b : b + 1, :n], "hidden_states": hidden[b : b + 1, :n]}
        for name, ref in (("logits", ref_logits), ("hidden_states", ref_hidden)):
            d, tol = _diff(got[name], ref), _tol(ref, dtype)
            report.checks.append(Check(case, name, d, tol, d <= tol))
        worst = max(
            (
                (_diff(p[b : b + 1, :, :n].transpose(0, 2, 1, 3), r), _tol(r, dtype), nm)
                for p, r, nm in zip(presents, ref_new, names)
            ),  # fmt: skip
            key=lambda x: x[0] / x[1] if x[1] else x[0],
        )
        report.checks.append(Check(case, "present (all layers)", worst[0], worst[1], worst[0] <= worst[1],
                                   f"worst {worst[2].replace('past_key_values', 'present')}"))  # fmt: skip
        report.checks.append(_top1_check(case, ref_logits[0], got["logits"][0], _tol(ref_logits, dtype)))
    for c in report.checks:
        (log.debug if c.passed else log.info)(c.line())
    if raise_on_failure and not report.ok:
        raise ValidationError([str(c) for c in report.failures], f"{batch_file} differs from {backbone_file}")
    return report
