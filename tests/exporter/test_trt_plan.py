"""The TensorRT build plan: profile shapes, their couplings, limits, the plan file, routing."""

from __future__ import annotations

import json

import pytest
from trt_fakes import fake_config, smollm2_config

from exporter.trt_plan import Limits, make_plan
from runtime.errors import MedusaError
from runtime.plan import (
    BATCH,
    DECODE,
    NEW,
    PAST,
    PLAN_FILE,
    PREFILL,
    VERIFY,
    BuildPlan,
    PlanError,
    max_new_tokens,
    profile_for,
    read_plan,
)

CONFIGS = {
    "tiny": dict(
        cfg=dict(layers=2, kv_heads=1, head_dim=8, hidden=16, vocab=64, max_context=64),
        limits=dict(max_prompt=16, max_tree_nodes=12),
    ),
    "gqa-batch4": dict(
        cfg=dict(layers=3, kv_heads=2, head_dim=16, hidden=64, vocab=100, max_context=512),
        limits=dict(max_batch=4, max_prompt=128),
    ),
    "smollm2": dict(cfg=None, limits=dict(max_context=2048)),
    "big-tree": dict(
        cfg=dict(max_context=1024, heads=5, tree="mc_sim_7b_63"), limits=dict(max_tree_nodes=80, opt_context=900)
    ),
}


def _plan(name):
    c = CONFIGS[name]
    cfg = smollm2_config() if c["cfg"] is None else fake_config(**c["cfg"])
    return cfg, make_plan(cfg, Limits(**c["limits"]))


def test_smollm2_profiles():
    cfg, plan = _plan("smollm2")
    ranges = {p.name: {a: tuple(r) for a, r in p.axes.items()} for p in plan.backbone.profiles}
    assert [p.name for p in plan.backbone.profiles] == [PREFILL, VERIFY, DECODE]
    assert ranges[PREFILL] == {BATCH: (1, 1, 1), NEW: (1, 128, 512), PAST: (0, 0, 2048 - 512)}
    # cpu_8 is the artifact's default tree: 8 candidates + the root
    assert ranges[VERIFY] == {BATCH: (1, 1, 1), NEW: (1, 9, 64), PAST: (1, 256, 2048 - 64)}
    assert ranges[DECODE] == {BATCH: (1, 1, 1), NEW: (1, 1, 1), PAST: (1, 256, 2047)}
    shapes = plan.backbone.shapes(plan.profile(VERIFY))
    assert shapes["past_key_values.29.value"] == ((1, 1, 3, 64), (1, 256, 3, 64), (1, 1984, 3, 64))
    assert plan.heads.shapes(plan.heads.profiles[0]) == {"hidden_states": ((1, 576), (1, 576), (1, 576))}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_profile_couplings(name):
    cfg, plan = _plan(name)
    m = cfg.model
    assert len(plan.backbone.profiles) == 3
    for p in plan.backbone.profiles:
        shapes = plan.backbone.shapes(p)
        assert list(shapes) == cfg.backbone.inputs  # every input, in graph order
        for which in range(3):
            batch, new = shapes["input_ids"][which]
            # position ids follow input ids; the mask is new x new
            assert shapes["position_ids"][which] == (batch, new)
            assert shapes["tree_mask"][which] == (batch, new, new)
            past = {shapes[n][which] for n in shapes if n.startswith("past_key_values.")}
            assert len(past) == 1, "all cache inputs share one past_sequence"
            (pb, plen, kvh, hd) = past.pop()
            assert (pb, kvh, hd) == (batch, m.num_kv_heads, m.head_dim)
        (_, n_min), (_, n_opt), (_, n_max) = shapes["input_ids"]
        p_min, p_opt, p_max = (shapes["past_key_values.0.key"][w][1] for w in range(3))
        assert n_min <= n_opt <= n_max and p_min <= p_opt <= p_max
        assert p_max + n_max <= plan.max_context, f"profile {p.name}: cache + new tokens exceed the context"
        assert shapes["input_ids"][2][0] == plan.max_batch
    assert plan.profile(PREFILL).axes[PAST].min == 0  # the first prefill's empty cache
    assert plan.profile(VERIFY).axes[NEW].opt == plan.tree_nodes
    assert plan.profile(VERIFY).axes[PAST].min == 1
    assert plan.profile(DECODE).contains(plan.max_context - 1, 1)
    heads = plan.heads.shapes(plan.heads.profiles[0])["hidden_states"]
    assert heads == ((1, m.hidden_size), (1, m.hidden_size), (plan.max_batch, m.hidden_size))


def test_default_opt_values_shrink_into_their_ranges_and_given_ones_are_kept():
    plan = make_plan(fake_config(max_context=512), Limits(max_prompt=100))  # default opt_prompt 128 > 100
    assert tuple(plan.profile(PREFILL).axes[NEW]) == (1, 100, 100)
    plan = make_plan(fake_config(max_context=200), Limits(max_prompt=50, max_tree_nodes=20))  # default opt 256
    assert tuple(plan.profile(VERIFY).axes[PAST]) == (1, 180, 180)
    assert tuple(plan.profile(DECODE).axes[PAST]) == (1, 199, 199)
    _, plan = _plan("big-tree")  # opt_context 900 given: kept where it fits, the decode range's too
    assert tuple(plan.profile(VERIFY).axes[PAST]) == (1, 900, 1024 - 80)
    assert tuple(plan.profile(DECODE).axes[PAST]) == (1, 900, 1023)
    assert plan.tree_nodes == 64 and plan.profile(VERIFY).axes[NEW].opt == 64
    plan = make_plan(fake_config(max_context=512), Limits(max_prompt=128, opt_prompt=128))
    assert tuple(plan.profile(PREFILL).axes[NEW]) == (1, 128, 128)


def test_default_max_tree_nodes_covers_the_tree():
    plan = make_plan(fake_config(max_context=512), Limits())
    assert plan.profile(VERIFY).axes[NEW].max == 64
    plan = make_plan(fake_config(max_context=32), Limits(max_prompt=8))  # 64 would not fit: context - 1
    assert plan.profile(VERIFY).axes[NEW].max == 31
    plan = make_plan(fake_config(max_context=64))  # default prompt chunk: min(512, context // 2)
    assert tuple(plan.profile(PREFILL).axes[NEW]) == (1, 32, 32)
    plan = make_plan(fake_config(max_context=512, heads=5), Limits(tree="mc_sim_7b_63", max_tree_nodes=None))
    assert plan.profile(VERIFY).axes[NEW].max == 64 and plan.tree == "mc_sim_7b_63"
    plan = make_plan(fake_config(max_context=512, tree_paths=[[0], [0, 0], [1]], tree="mine"), Limits(max_tree_nodes=4))
    assert (plan.tree, plan.tree_nodes) == ("mine", 4)


@pytest.mark.parametrize(
    "cfg, limits, match",
    [
        ({}, dict(max_context=65), r"max_context must lie in \[2, 64\].*got 65"),
        ({}, dict(max_context=1), r"max_context must lie in \[2, 64\]"),
        ({}, dict(max_prompt=64), r"max_prompt must lie in \[1, max_context - 1 = 63\], got 64"),
        ({}, dict(max_prompt=0), r"max_prompt must lie in"),
        ({}, dict(max_tree_nodes=8), r"max_tree_nodes 8 is smaller than tree 'cpu_8' \(9 nodes"),
        ({}, dict(max_tree_nodes=64), r"max_tree_nodes 64 leaves no room for the cache.*at most max_context - 1 = 63"),
        ({}, dict(max_batch=0), r"max_batch must be a positive integer, got 0"),
        ({}, dict(workspace_mib=0), r"workspace_mib must be a positive integer"),
        ({}, dict(opt_context=0), r"opt_context must be a positive integer"),
        # an opt value the user gives outside its range is an error, not silently moved
        ({}, dict(max_prompt=16, opt_prompt=17), r"opt_prompt must be at most max_prompt = 16, got 17"),
        ({}, dict(max_tree_nodes=12, opt_context=53), r"opt_context must be at most max_context - max_tree_nodes = 52"),
        (dict(dtype="bfloat16"), {}, r"artifact dtype 'bfloat16'"),
        (dict(heads=2), {}, r"depth 4 and needs 4 Medusa heads, but the model has 2"),
        ({}, dict(tree="no_such_tree"), r"unknown tree 'no_such_tree'"),
    ],
)
def test_invalid_limits(cfg, limits, match):
    with pytest.raises(MedusaError, match=match):
        make_plan(fake_config(**cfg), Limits(**limits))


def test_inputs_must_follow_the_graph_contract():
    cfg = fake_config()
    cfg.backbone.inputs = cfg.backbone.inputs[:-1]
    with pytest.raises(PlanError, match="do not follow the graph contract"):
        make_plan(cfg)
    cfg = fake_config()
    cfg.heads.inputs = ["hidden"]
    with pytest.raises(PlanError, match=r"inputs \['hidden'\], expected \['hidden_states'\]"):
        make_plan(cfg)


def test_dynamic_axes_that_tie_cache_and_new_tokens_are_refused():
    cfg = fake_config()
    for name in cfg.backbone.dynamic_axes:
        if name.startswith("past_key_values."):
            cfg.backbone.dynamic_axes[name] = ["batch", "new"]  # the exporter tied past to new
    with pytest.raises(
        PlanError, match=r"dynamic axis 'new' is past_sequence in input past_key_values.0.key but new_tokens"
    ):
        make_plan(cfg)


def test_dynamic_axes_naming_every_dim_or_more_general_are_accepted():
    cfg = fake_config()
    axes = cfg.backbone.dynamic_axes
    axes["tree_mask"] = ["batch", "new", "new_again"]  # more general than needed: fine
    for name in list(axes):
        if name.startswith("past_key_values."):
            axes[name] = ["batch", "past", "kv_heads", "head_dim"]  # a name for every dim
    plan = make_plan(cfg)  # no error: the plan's own axes are unchanged
    assert plan.backbone.inputs["tree_mask"] == [BATCH, NEW, NEW]
    cfg.backbone.dynamic_axes["input_ids"] = ["batch"]
    with pytest.raises(PlanError, match=r"input input_ids has dynamic axes \['batch'\].*expected 2"):
        make_plan(cfg)


def test_plan_file_round_trip(tmp_path):
    _, plan = _plan("gqa-batch4")
    plan.write(tmp_path)
    again = read_plan(tmp_path)
    assert again == plan
    assert json.loads((tmp_path / PLAN_FILE).read_text())["empty_cache"].startswith("past_sequence min 0")


def test_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match=rf"has no {PLAN_FILE}: build an engine first"):
        read_plan(tmp_path)
    (tmp_path / PLAN_FILE).write_text("{not json")
    with pytest.raises(PlanError, match="is not valid JSON"):
        read_plan(tmp_path)
    _, plan = _plan("tiny")
    raw = json.loads(plan.to_json())
    raw["format_version"] = 99
    (tmp_path / PLAN_FILE).write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="format_version 99, this version reads 1"):
        read_plan(tmp_path)
    raw = json.loads(plan.to_json())
    raw["backbone"]["profiles"][1]["axes"]["past_sequence"]["max"] = plan.max_context  # past + new > context
    (tmp_path / PLAN_FILE).write_text(json.dumps(raw))
    with pytest.raises(
        PlanError, match=r"profile 'verify': max past_sequence 64 \+ max new_tokens 12 = 76 exceeds max_context 64"
    ):
        read_plan(tmp_path)
    del raw["heads"]
    (tmp_path / PLAN_FILE).write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="malformed plan"):
        read_plan(tmp_path)
    # other JSON where objects belong: a PlanError (the auto backend reads it as "no engine"), never a traceback
    raw = json.loads(plan.to_json())
    raw["backbone"]["inputs"] = ["input_ids"]
    for text in ("[1]", json.dumps(raw), '{"format_version": 1, "backbone": 3}', b"\xff\xfe"):
        (tmp_path / PLAN_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(PlanError, match="malformed plan|not valid JSON|must hold a JSON object"):
            read_plan(tmp_path)


def test_check_refuses_a_plan_without_an_empty_cache_profile():
    _, plan = _plan("tiny")
    data = json.loads(plan.to_json())
    data["backbone"]["profiles"][0]["axes"]["past_sequence"].update(min=1, opt=1)
    with pytest.raises(PlanError, match="no backbone profile accepts an empty cache"):
        BuildPlan.from_dict(data)


# ---------------------------------------------------------------------------- which profile


def test_profile_for_prefers_the_profile_tuned_nearest():
    _, plan = _plan("tiny")  # context 64, prompt chunk 16, tree <= 12
    name = lambda past, n: plan.backbone.profiles[profile_for(plan, past, n)].name
    assert name(0, 10) == PREFILL
    assert name(20, 1) == DECODE
    assert name(20, 9) == VERIFY
    assert name(60, 1) == DECODE
    assert profile_for(plan, 60, 5) is None  # past the verify profile's reach
    assert profile_for(plan, 0, 17) is None  # longer than a prompt chunk


def test_max_new_tokens_is_what_some_profile_takes_and_no_more():
    """The backend declares max_new_tokens(past); the decode loop chunks by it. Every count up
    to it must fit a profile, the next one none, at every cache length."""
    for key in ("tiny", "gqa-batch4", "big-tree"):
        _, plan = _plan(key)
        for past in range(0, plan.max_context, max(1, plan.max_context // 97)):
            most = max_new_tokens(plan, past)
            assert most >= 1, (key, past)  # a plain step always fits: the context end is reachable
            assert past + most <= plan.max_context
            for n in {1, most // 2 or 1, most}:
                i = profile_for(plan, past, n)
                assert i is not None and plan.backbone.profiles[i].contains(past, n), (key, past, n)
            assert profile_for(plan, past, most + 1) is None, (key, past)
    _, plan = _plan("tiny")
    assert max_new_tokens(plan, 0) == 16  # prefill chunk
    assert max_new_tokens(plan, 48) == 16  # the prefill profile reaches a cache of 64 - 16
    assert max_new_tokens(plan, 49) == 12  # then the verify profile's largest tree, to 64 - 12
    assert max_new_tokens(plan, 53) == 1  # then the decode profile: plain steps only
    assert max_new_tokens(plan, 64) == 0


def test_a_profile_whose_new_tokens_do_not_start_at_one_is_refused():
    _, plan = _plan("tiny")
    data = json.loads(plan.to_json())
    data["backbone"]["profiles"][1]["axes"]["new_tokens"]["min"] = 2
    with pytest.raises(PlanError, match="new_tokens min must be 1, got 2"):
        BuildPlan.from_dict(data)
