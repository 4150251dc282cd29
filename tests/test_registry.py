"""The registry model from config, its checks, and the resolution of a name in a group."""

from __future__ import annotations

import dataclasses
import fnmatch
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.utils import canonicalize_name

from proxy.config import Config, ConfigError, Guard, Token, build_config, load_config
from proxy.patterns import witness
from proxy.registry import (
    GroupSpec,
    IndexSpec,
    Member,
    ProjectAlias,
    Registry,
    UpstreamSpec,
)
from proxy.resolve import (
    ForwardOff,
    Missing,
    Private,
    Reserved,
    Resolution,
    Upstreams,
    may_admin,
    may_read_group,
    may_read_index,
    may_write,
    names_held_twice,
    next_step,
    owner_of,
    resolve,
    upload_refusal,
)

ROOT = Path(__file__).resolve().parents[1]
PYPI = "http://127.0.0.1:9/simple/"
TORCH = "http://127.0.0.1:9/whl/"

# Two indexes, a PyTorch-like upstream asked only about its names, a PyPI-like one.
TWO_INDEXES: dict[str, Any] = {
    "indexes": [{"name": "platform", "owns": ["Acme_*"]}, {"name": "ml"}],
    "upstreams": [
        {"name": "pypi", "url": PYPI},
        {"name": "pytorch", "url": TORCH, "not_found": [403, 404], "index_ttl": "1h"},
    ],
    "groups": [
        {"name": "default", "members": [
            {"index": "platform"}, {"index": "ml"},
            {"upstream": "pytorch", "names": ["torch", "torchvision", "nvidia-*"]},
            {"upstream": "pypi"},
        ], "reserved": ["acme-*"]},
        {"name": "ml-only", "members": [{"index": "ml"}], "forward": False},
        {"name": "closed", "members": [{"index": "platform"}, {"upstream": "pypi"}],
         "forward": False},
    ],
    "gitlab": {
        "projects": {42: "platform", "Acme/Platform": "platform",
                     "43": {"index": "ml", "group": "default"}},
        "groups": {"7": "default", "acme": "default"},
    },
}


def _with(**changes: Any) -> dict[str, Any]:
    return {**TWO_INDEXES, **changes}


def _registry(raw: Mapping[str, Any] = TWO_INDEXES) -> Registry:
    return build_config(dict(raw)).registry


def _problems(raw: Mapping[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(dict(raw))
    return info.value.problems


def _held(*names: str) -> Callable[[str], bool]:
    return lambda index: index in names


# --- a config without the new keys behaves exactly as today ---------------------------

def test_old_config_derives_one_index_one_upstream_one_group() -> None:
    config = build_config({
        "upstream": {"url": "https://user:secret@mirror.example/simple", "forward": False,
                     "index_ttl": 30, "negative_ttl": 7, "timeout": 3, "backoff": 9,
                     "file_hosts": ["files.example"]},
        "guard": {"private_only": ["Acme_*"], "min_age": "3d"},
    })
    registry = config.registry
    assert registry.indexes == (IndexSpec("default"),)
    assert registry.upstreams == (UpstreamSpec(
        name="pypi", url="https://mirror.example/simple/", credentials=("user", "secret"),
        file_hosts=("files.example",), not_found=frozenset({404, 410}), index_ttl=30.0,
        negative_ttl=7.0, timeout=3.0, backoff=9.0, min_age=3 * 86400.0,
    ),)
    pypi = registry.upstreams[0]
    for field in ("url", "credentials", "file_hosts", "index_ttl", "negative_ttl", "timeout",
                  "backoff"):
        assert getattr(pypi, field) == getattr(config.upstream, field)
    assert "secret" not in repr(registry)
    assert registry.groups == (GroupSpec(
        "default", (Member("index", "default"), Member("upstream", "pypi")),
        reserved=("acme-*",), forward=False,
    ),)
    assert registry.default_group is registry.groups[0]
    assert registry.first_index.name == "default"
    assert not registry.gitlab.projects and not registry.gitlab.groups
    # The single-upstream code still reads these, unchanged.
    assert config.upstream.url == "https://mirror.example/simple/"
    assert config.guard.private_only == ("acme-*",)


def test_embedded_default_and_replace_keep_the_registry_derived() -> None:
    config = Config()
    assert config.registry.upstreams[0].url == "https://pypi.org/simple/"
    assert config.registry.upstreams[0].file_hosts == ("files.pythonhosted.org",)
    changed = dataclasses.replace(config, guard=Guard(private_only=("corp-*",)))
    assert changed.registry.default_group.reserved == ("corp-*",)
    configured = build_config(TWO_INDEXES)
    kept = dataclasses.replace(configured, guard=Guard(private_only=("corp-*",)))
    assert [g.name for g in kept.registry.groups] == ["default", "ml-only", "closed"]
    assert kept.registry.default_group.reserved == ("corp-*", "acme-*")


_LEGACY_RULE = {"private": "private", "reserved": "reserved", "forward_off": "forward_off",
                "upstream": "upstream"}


def _rule_before_groups(name: str, private: bool, config: Config) -> str:
    """The guard's rules before the registry model (guard.decide, as it was):
    the oracle a config without the new keys must still agree with."""
    if private:
        return "private"
    if any(fnmatch.fnmatchcase(name, p) for p in config.guard.private_only):
        return "reserved"
    if not config.upstream.forward:
        return "forward_off"
    return "upstream"


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(["acme-x", "acme", "numpy", "corp-y", "torch", "a"]),
    private=st.booleans(),
    forward=st.booleans(),
    reserved=st.lists(st.sampled_from(["acme-*", "corp-?", "numpy", "*"]), max_size=3),
)
def test_old_config_resolves_as_guard_decide_does(
    name: str, private: bool, forward: bool, reserved: list[str],
) -> None:
    config = build_config({"upstream": {"forward": forward},
                           "guard": {"private_only": reserved}})
    registry = config.registry
    got = resolve(name, registry.default_group, registry, _held("default") if private
                  else _held(), config.upstream.forward)
    today = _rule_before_groups(name, private, config)
    assert got.rule == _LEGACY_RULE[today]
    if isinstance(got, Upstreams):
        assert [u.name for u in got.candidates] == ["pypi"]


def test_indexes_and_upstreams_without_groups_get_a_default_group() -> None:
    registry = _registry({
        "indexes": [{"name": "platform"}, {"name": "ml"}],
        "upstreams": [{"name": "pytorch", "url": TORCH}, {"name": "pypi", "url": PYPI}],
        "guard": {"private_only": ["acme-*"]},
        "upstream": {"forward": False, "timeout": 2},
    })
    assert registry.groups == (GroupSpec("default", (
        Member("index", "platform"), Member("index", "ml"),
        Member("upstream", "pytorch"), Member("upstream", "pypi"),
    ), reserved=("acme-*",), forward=False),)
    # Per-upstream keys default to upstream.*; file_hosts as for upstream.url.
    assert {u.timeout for u in registry.upstreams} == {2.0}
    assert registry.upstreams[0].file_hosts == ()
    only_indexes = _registry({"indexes": [{"name": "one"}]})
    assert [m.name for m in only_indexes.default_group.members] == ["one", "pypi"]
    only_upstreams = _registry({"upstreams": [{"name": "pytorch", "url": TORCH}]})
    assert [m.name for m in only_upstreams.default_group.members] == ["default", "pytorch"]


def test_two_indexes_config() -> None:
    registry = _registry()
    assert registry.first_index.name == "platform"
    assert registry.index("platform") == IndexSpec("platform", owns=("acme-*",))
    assert registry.index("nope") is None and registry.group("nope") is None
    pytorch = registry.upstream("pytorch")
    assert pytorch is not None and pytorch.not_found == frozenset({403, 404})
    assert (pytorch.index_ttl, pytorch.negative_ttl) == (3600.0, 60.0)
    assert registry.default_group.reserved == ("acme-*",)
    assert registry.group("ml-only") == GroupSpec("ml-only", (Member("index", "ml"),), (), False)
    gitlab = registry.gitlab
    assert gitlab.project("42") == ProjectAlias("platform", "default")
    assert gitlab.project("acme/platform") == gitlab.project("ACME/PLATFORM") == \
        ProjectAlias("platform", "default")
    assert gitlab.project("43") == ProjectAlias("ml", "default")
    assert gitlab.project("44") is None
    assert gitlab.group("7") == gitlab.group("Acme") == "default"


def test_default_group_is_the_one_named_default_else_the_first() -> None:
    raw = _with(groups=[{"name": "first", "members": [{"index": "ml"}]},
                        {"name": "default", "members": [{"index": "platform"}]}],
                gitlab=None)
    assert _registry(raw).default_group.name == "default"
    raw["groups"] = raw["groups"][:1]
    assert _registry(raw).default_group.name == "first"


def _uncommented_example() -> str:
    """config.example.yaml with its commented registry example switched on."""
    out: list[str] = []
    active = False
    for line in (ROOT / "config.example.yaml").read_text().splitlines():
        if line in ("indexes: null", "upstreams: null", "groups: null", "gitlab: null"):
            out.append(line.removesuffix(" null"))
            active = True
        elif active and line.startswith("#"):
            out.append(line[1:])
        elif line.startswith(("  url: ", "  file_hosts: ")):
            active = False  # upstream.url and file_hosts move into upstreams:
        else:
            active = False
            out.append(line)
    return "\n".join(out) + "\n"


def test_example_config_documents_a_valid_registry(tmp_path: Path) -> None:
    assert load_config(ROOT / "config.example.yaml").registry == Config().registry
    example = tmp_path / "example.yaml"
    example.write_text(_uncommented_example())
    registry = load_config(example).registry
    assert [i.name for i in registry.indexes] == ["platform", "ml"]
    assert [u.name for u in registry.upstreams] == ["pypi", "pytorch"]
    assert registry.upstreams[1].not_found == frozenset({403, 404})
    assert [m.name for m in registry.default_group.members] == ["platform", "ml", "pytorch",
                                                                "pypi"]
    assert registry.gitlab.project("acme/platform") == ProjectAlias("platform", "default")
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(example)],
                             cwd=ROOT, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


# --- every problem, with its key path ------------------------------------------------

def _group(*members: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return _with(groups=[{"name": "g", "members": list(members), **extra}], gitlab=None)


_INDEX_A = {"index": "platform"}
_PYPI = {"upstream": "pypi"}

PROBLEMS: list[tuple[str, dict[str, Any], str]] = [
    ("bad name", _with(indexes=[{"name": "Platform"}, {"name": "platform"}, {"name": "ml"}]),
     "indexes[0].name: expected a name"),
    ("name too long", _with(indexes=[{"name": "x" * 65}], groups=None, gitlab=None),
     "indexes[0].name: expected a name"),
    ("missing name", _with(indexes=[{"owns": ["x"]}, {"name": "platform"}, {"name": "ml"}]),
     "indexes[0].name: required"),
    ("not a mapping", _with(indexes=["platform", {"name": "platform"}, {"name": "ml"}]),
     "indexes[0]: expected a mapping, got str"),
    ("not a list", _with(indexes={"name": "platform"}, groups=None, gitlab=None),
     "indexes: expected a list"),
    ("no index", _with(indexes=[], groups=None, gitlab=None), "indexes: list at least one"),
    ("unknown key", _with(indexes=[{"name": "platform", "colour": 1}, {"name": "ml"}]),
     "indexes[0].colour: unknown key"),
    ("duplicate index", _with(indexes=[{"name": "platform"}, {"name": "ml"},
                                       {"name": "platform"}]),
     "indexes[2].name: 'platform' is already the name of indexes[0]"),
    ("upstream named as an index", _with(upstreams=[{"name": "pypi", "url": PYPI},
                                                    {"name": "pytorch", "url": TORCH},
                                                    {"name": "ml", "url": TORCH}]),
     "upstreams[2].name: 'ml' is already the name of indexes[1]"),
    ("index named as the derived upstream", {"indexes": [{"name": "pypi"}]},
     "indexes[0].name: 'pypi' is already the name of the upstream built from upstream.*"),
    ("duplicate upstream", _with(upstreams=[{"name": "pypi", "url": PYPI},
                                            {"name": "pytorch", "url": TORCH},
                                            {"name": "pypi", "url": TORCH}]),
     "upstreams[2].name: 'pypi' is already the name of upstreams[0]"),
    ("upstream without url", _with(upstreams=[{"name": "pypi", "url": PYPI},
                                              {"name": "pytorch"}]),
     "upstreams[1].url: required"),
    ("upstream bad url", _with(upstreams=[{"name": "pypi", "url": "ftp://x"},
                                          {"name": "pytorch", "url": TORCH}]),
     "upstreams[0].url: expected an http(s) URL"),
    ("not_found 5xx", _with(upstreams=[{"name": "pypi", "url": PYPI, "not_found": [404, 503]},
                                       {"name": "pytorch", "url": TORCH}]),
     "upstreams[0].not_found: expected a list of 4xx statuses"),
    ("not_found empty", _with(upstreams=[{"name": "pypi", "url": PYPI, "not_found": []},
                                         {"name": "pytorch", "url": TORCH}]),
     "upstreams[0].not_found: expected a list of 4xx statuses"),
    ("not_found text", _with(upstreams=[{"name": "pypi", "url": PYPI, "not_found": ["404"]},
                                        {"name": "pytorch", "url": TORCH}]),
     "upstreams[0].not_found: expected a list of 4xx statuses"),
    ("upstream timeout", _with(upstreams=[{"name": "pypi", "url": PYPI, "timeout": 0},
                                          {"name": "pytorch", "url": TORCH}]),
     "upstreams[0].timeout: must be greater than zero"),
    ("upstream.url beside upstreams", _with(upstream={"url": PYPI}),
     "upstream.url: give it per upstream under upstreams:"),
    ("upstream.file_hosts beside upstreams", _with(upstream={"file_hosts": []}),
     "upstream.file_hosts: give it per upstream under upstreams:"),
    ("owns overlap", _with(indexes=[{"name": "platform", "owns": ["acme-corp-*"]},
                                    {"name": "ml", "owns": ["numpy", "ACME.*"]}]),
     "indexes[1].owns[1]: 'acme-*' overlaps 'acme-corp-*' of index 'platform' "
     "(indexes[0].owns[0]): both match 'acme-corp-a'"),
    ("owns overlap in the middle", _with(indexes=[{"name": "platform", "owns": ["acme-*"]},
                                                  {"name": "ml", "owns": ["*-tools"]}]),
     "indexes[1].owns[0]: '*-tools' overlaps 'acme-*' of index 'platform' "
     "(indexes[0].owns[0]): both match 'acme-tools'"),
    ("owns never matches", _with(indexes=[{"name": "platform", "owns": ["[-]"]},
                                          {"name": "ml"}]),
     "indexes[0].owns[0]: '[-]' can never match a project name"),
    ("owns bad character", _with(indexes=[{"name": "platform", "owns": ["acme/x"]},
                                          {"name": "ml"}]),
     "indexes[0].owns[0]: 'acme/x' can never match a project name"),
    ("reserved never matches", _group(_INDEX_A, reserved=["x", "a[!a-z0-9-]"]),
     "groups[0].reserved[1]: 'a[!a-z0-9-]' can never match a project name"),
    ("names never matches", _group(_INDEX_A, {"upstream": "pypi", "names": ["torch", "-x"]}),
     "groups[0].members[1].names[1]: '-x' can never match a project name"),
    ("names empty", _group(_INDEX_A, {"upstream": "pypi", "names": []}),
     "groups[0].members[1].names: list at least one pattern"),
    ("names on an index", _group({"index": "platform", "names": ["x"]}),
     "groups[0].members[0].names: only upstream members take names"),
    ("unknown member index", _group({"index": "nope"}, _PYPI),
     "groups[0].members[0].index: no index is named 'nope'"),
    ("unknown member upstream", _group(_INDEX_A, {"upstream": "pypl"}),
     "groups[0].members[1].upstream: no upstream is named 'pypl'"),
    ("member listed twice", _group(_INDEX_A, _PYPI, _PYPI),
     "groups[0].members[2].upstream: 'pypi' is listed twice"),
    ("private first", _group(_INDEX_A, _PYPI, {"index": "ml"}),
     "groups[0].members[2].index: index 'ml' comes after an upstream; list every index "
     "before the upstreams (private first)"),
    ("member both kinds", _group({"index": "platform", "upstream": "pypi"}),
     "groups[0].members[0]: expected {index: NAME} or {upstream: NAME, names: [...]}"),
    ("member neither", _group({"source": "platform"}),
     "groups[0].members[0]: expected {index: NAME} or {upstream: NAME, names: [...]}"),
    ("member unknown key", _group({"upstream": "pypi", "weight": 2}),
     "groups[0].members[0].weight: unknown key"),
    ("no members", _group(), "groups[0].members: a group needs at least one member"),
    ("no groups", _with(groups=[], gitlab=None), "groups: list at least one group"),
    ("duplicate group", _with(groups=[{"name": "g", "members": [_INDEX_A]},
                                      {"name": "g", "members": [_PYPI]}], gitlab=None),
     "groups[1].name: 'g' is already the name of groups[0]"),
    ("group forward", _group(_INDEX_A, forward="yes"),
     "groups[0].forward: expected true or false"),
    ("gitlab project id", _with(gitlab={"projects": {"platform": "platform"}}),
     "gitlab.projects.platform: expected a numeric id or a full path such as acme/platform"),
    ("gitlab group id", _with(gitlab={"groups": {"a b": "default"}}),
     "gitlab.groups.a b: expected a numeric id or a full path"),
    ("gitlab unknown index", _with(gitlab={"projects": {"42": "nope"}}),
     "gitlab.projects.42: no index is named 'nope'"),
    ("gitlab unknown group", _with(gitlab={"groups": {"7": "nope"}}),
     "gitlab.groups.7: no group is named 'nope'"),
    ("gitlab group without the index",
     _with(gitlab={"projects": {"42": {"index": "platform", "group": "ml-only"}}}),
     "gitlab.projects.42.group: group 'ml-only' does not list index 'platform'"),
    ("gitlab unknown alias group",
     _with(gitlab={"projects": {"42": {"index": "platform", "group": "nope"}}}),
     "gitlab.projects.42.group: no group is named 'nope'"),
    ("gitlab alias without index", _with(gitlab={"projects": {"42": {"group": "default"}}}),
     "gitlab.projects.42.index: required"),
    ("gitlab index in no group", _with(
        indexes=[{"name": "platform"}, {"name": "ml"}, {"name": "lonely"}],
        gitlab={"projects": {"42": "lonely"}}),
     "gitlab.projects.42: index 'lonely' is in no group"),
    ("gitlab path twice", _with(gitlab={"projects": {"acme/x": "platform",
                                                     "Acme/X": "platform"}}),
     "gitlab.projects.Acme/X: 'Acme/X' is given twice"),
    ("gitlab id read as a boolean", _with(gitlab={"groups": {True: "default"}}),
     "gitlab.groups.True: expected a numeric id or a path; quote it"),
    ("gitlab unknown key", _with(gitlab={"users": {}}), "gitlab.users: unknown key"),
    ("gitlab projects not a mapping", _with(gitlab={"projects": ["42"]}),
     "gitlab.projects: expected a mapping"),
    ("token index typo", _with(auth={"tokens": [{
        "name": "ci", "sha256": "a" * 64, "scopes": ["write"], "indexes": ["platfrom"]}]}),
     "auth.tokens[0].indexes[0]: 'platfrom' matches no index (there are: platform, ml)"),
    ("token group typo", _with(auth={"tokens": [{
        "name": "ci", "sha256": "a" * 64, "scopes": ["read"], "groups": ["ml-*", "dflt"]}]}),
     "auth.tokens[0].groups[1]: 'dflt' matches no group"),
    ("token patterns not a list", _with(auth={"tokens": [{
        "name": "ci", "sha256": "a" * 64, "scopes": ["read"], "groups": "default"}]}),
     "auth.tokens[0].groups: expected a list of strings"),
]


@pytest.mark.parametrize(("raw", "expected"), [(raw, expected) for _, raw, expected in PROBLEMS],
                         ids=[case for case, _, _ in PROBLEMS])
def test_each_problem_is_reported_once_with_its_path(raw: dict[str, Any], expected: str) -> None:
    problems = _problems(raw)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_check_config_cli_prints_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "indexes: [{name: platform}, {name: ml}]\n"
        "groups:\n"
        "  - name: default\n"
        "    members: [{upstream: pypi}, {index: platform}]\n"
    )
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bad)],
                             cwd=ROOT, capture_output=True, text=True)
    assert checked.returncode == 2
    assert "groups[0].members[1].index: index 'platform' comes after an upstream" \
        in checked.stderr
    good = subprocess.run([sys.executable, "-m", "proxy", "check-config",
                           str(ROOT / "config.example.yaml")], cwd=ROOT, capture_output=True)
    assert good.returncode == 0


def test_token_patterns_are_read() -> None:
    config = build_config(_with(auth={"tokens": [
        {"name": "ci", "sha256": "a" * 64, "scopes": ["write"], "indexes": ["plat*"]},
        {"name": "all", "sha256": "b" * 64, "scopes": ["read"]},
        {"name": "none", "sha256": "c" * 64, "scopes": ["read"], "groups": []},
    ]}))
    ci, everything, none = config.auth.tokens
    assert (ci.indexes, ci.groups) == (("plat*",), ("*",))
    assert (everything.indexes, everything.groups) == (("*",), ("*",))
    assert none.groups == ()


# --- resolution ------------------------------------------------------------------------

REGISTRY = _registry()
DEFAULT = REGISTRY.default_group


def _resolve(name: str, *held: str, group: GroupSpec = DEFAULT,
             forward: bool = True) -> Resolution:
    return resolve(name, group, REGISTRY, _held(*held), forward)


def _candidates(resolution: Resolution) -> list[str]:
    assert isinstance(resolution, Upstreams), resolution
    return [u.name for u in resolution.candidates]


def test_a_private_name_in_either_index_wins_over_every_upstream() -> None:
    assert _resolve("acme-lib", "platform") == Private(IndexSpec("platform", ("acme-*",)))
    assert _resolve("torch", "ml") == Private(IndexSpec("ml"))
    assert _resolve("numpy", "ml") == Private(IndexSpec("ml"))
    # Both hold it: the first member index answers alone.
    both = _resolve("numpy", "ml", "platform")
    assert isinstance(both, Private) and both.index.name == "platform"
    # An index that is not a member of the group never answers in it.
    assert _candidates(_resolve("numpy", "elsewhere")) == ["pypi"]


def test_a_reserved_name_is_refused_with_the_pattern() -> None:
    reserved = _resolve("acme-new")
    assert isinstance(reserved, Reserved) and reserved.pattern == "acme-*"
    assert reserved.reason == ('acme-new is reserved for private packages ("acme-*" in group '
                              'default)')
    assert isinstance(_resolve("acme-new", "ml"), Private)


def test_names_filter_routes_to_the_routed_upstream_first() -> None:
    assert _candidates(_resolve("torch")) == ["pytorch", "pypi"]
    assert _candidates(_resolve("nvidia-cudnn-cu12")) == ["pytorch", "pypi"]
    assert _candidates(_resolve("numpy")) == ["pypi"]
    only_routed = GroupSpec("g", (Member("index", "ml"),
                                  Member("upstream", "pytorch", ("torch",))))
    assert _candidates(_resolve("torch", group=only_routed)) == ["pytorch"]
    assert _resolve("numpy", group=only_routed) == Missing("numpy", "g")


def test_forwarding_off_in_the_group_or_everywhere() -> None:
    off_here = _resolve("numpy", group=REGISTRY.group("closed") or DEFAULT)
    assert off_here == ForwardOff("numpy", "closed", everywhere=False)
    assert off_here.reason.endswith("forwarding upstream is off for group closed")
    off_everywhere = _resolve("numpy", forward=False)
    assert off_everywhere == ForwardOff("numpy", "default", everywhere=True)
    assert off_everywhere.reason == "No private project named numpy; forwarding upstream is off"
    # Private and reserved still come first; a group without upstreams has nothing to forward.
    assert isinstance(_resolve("numpy", "platform", forward=False), Private)
    assert isinstance(_resolve("acme-x", forward=False), Reserved)
    ml_only = REGISTRY.group("ml-only") or DEFAULT
    assert _resolve("numpy", group=ml_only) == Missing("numpy", "ml-only")
    assert Missing("numpy", "ml-only").reason == "No project named numpy in group ml-only"


def test_rules_apply_in_the_order_the_issue_lists() -> None:
    # A name that every rule could take: held, reserved, admitted by both upstreams.
    group = GroupSpec("g", (Member("index", "platform"), Member("upstream", "pytorch"),
                            Member("upstream", "pypi")), reserved=("torch",))
    assert isinstance(resolve("torch", group, REGISTRY, _held("platform"), True), Private)
    assert isinstance(resolve("torch", group, REGISTRY, _held(), True), Reserved)
    assert isinstance(resolve("torch", group, REGISTRY, _held(), False), Reserved)
    open_group = dataclasses.replace(group, reserved=())
    assert isinstance(resolve("torch", open_group, REGISTRY, _held(), False), ForwardOff)
    assert _candidates(resolve("torch", open_group, REGISTRY, _held(), True)) == [
        "pytorch", "pypi"]


_NAMES = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True).filter(
    lambda n: "--" not in n)


@settings(max_examples=300, deadline=None)
@given(name=_NAMES, held=st.sets(st.sampled_from(["platform", "ml"])),
       forward=st.booleans(), group=st.sampled_from(REGISTRY.groups))
def test_a_name_held_by_any_member_index_never_reaches_an_upstream(
    name: str, held: set[str], forward: bool, group: GroupSpec,
) -> None:
    got = resolve(name, group, REGISTRY, lambda index: index in held, forward)
    holders = [i for i in group.index_names if i in held]
    if holders:
        assert isinstance(got, Private) and got.index.name == holders[0]
    else:
        assert not isinstance(got, Private)
    if isinstance(got, Upstreams):
        assert not holders and forward and group.forward
        assert all(fnmatch.fnmatchcase(name, p) is False for p in group.reserved)


def test_resolution_ignores_tokens() -> None:
    # Hiding a group or index from a token happens before resolve(), never inside it.
    assert "token" not in resolve.__code__.co_varnames


# --- the walk over upstreams -------------------------------------------------------------

def test_next_step_per_answer() -> None:
    pypi, pytorch = REGISTRY.upstream("pypi"), REGISTRY.upstream("pytorch")
    assert pypi is not None and pytorch is not None
    assert next_step(404, pypi) == "next"
    assert next_step(403, pytorch) == "next"
    assert next_step(403, pypi) == "fail"  # PyPI does not say 403 for a missing name
    for status in (200, 304):
        assert next_step(status, pypi) == "answer"
    for status in (None, 401, 429, 500, 502, 503, 504):
        assert next_step(status, pytorch) == "fail"


def _walk(candidates: tuple[UpstreamSpec, ...], answers: Mapping[str, int | None]) -> list[str]:
    """The lead's loop, minus the I/O: which upstreams get asked, and the outcome."""
    asked = []
    for upstream in candidates:
        asked.append(upstream.name)
        step = next_step(answers[upstream.name], upstream)
        if step != "next":
            return [*asked, step]
    return [*asked, "404"]


def test_an_error_on_the_routed_upstream_stops_the_walk() -> None:
    torch = _resolve("torch")
    assert isinstance(torch, Upstreams)
    assert _walk(torch.candidates, {"pytorch": 200, "pypi": 200}) == ["pytorch", "answer"]
    assert _walk(torch.candidates, {"pytorch": 403, "pypi": 200}) == ["pytorch", "pypi",
                                                                      "answer"]
    assert _walk(torch.candidates, {"pytorch": None, "pypi": 200}) == ["pytorch", "fail"]
    assert _walk(torch.candidates, {"pytorch": 503, "pypi": 200}) == ["pytorch", "fail"]
    assert _walk(torch.candidates, {"pytorch": 404, "pypi": 404}) == ["pytorch", "pypi", "404"]


# --- /-/guard, owns, token patterns ----------------------------------------------------------

def test_names_held_twice_in_a_group() -> None:
    held_by = {"platform": {"a", "b", "z"}, "ml": {"z", "b", "c"}, "elsewhere": {"a"}}
    assert names_held_twice(DEFAULT, held_by) == {"b": ("platform", "ml"),
                                                  "z": ("platform", "ml")}
    assert names_held_twice(REGISTRY.group("ml-only") or DEFAULT, held_by) == {}


def test_owner_of_a_name() -> None:
    owner = owner_of("acme-lib", REGISTRY)
    assert owner is not None and owner.name == "platform"
    assert owner_of("numpy", REGISTRY) is None


def _token(scopes: str, **patterns: tuple[str, ...]) -> Token:
    return Token(name="ci", sha256="a" * 64, scopes=frozenset(scopes.split(",")), **patterns)


def test_token_patterns_limit_indexes_and_groups() -> None:
    everywhere = _token("read,write,admin")
    assert may_write(everywhere, "ml") and may_admin(everywhere, "ml")
    assert may_read_index(everywhere, "ml") and may_read_group(everywhere, "closed")
    narrow = _token("read,write", indexes=("plat*",), groups=("default",))
    assert may_write(narrow, "platform") and not may_write(narrow, "ml")
    assert may_read_index(narrow, "platform") and not may_read_index(narrow, "ml")
    assert may_read_group(narrow, "default") and not may_read_group(narrow, "ml-only")
    assert not may_admin(narrow, "platform")
    reader = _token("read")
    assert not may_write(reader, "platform")


def test_upload_refusals() -> None:
    writer = _token("write", indexes=("platform", "ml"))
    assert upload_refusal(writer, "platform", "acme-lib", REGISTRY) is None
    assert upload_refusal(writer, "ml", "numpy", REGISTRY) is None
    assert upload_refusal(writer, "ml", "acme-lib", REGISTRY) == \
        "acme-lib belongs to index platform (its owns); upload it there"
    assert upload_refusal(_token("write", indexes=("ml",)), "platform", "numpy", REGISTRY) == \
        "Token ci may not upload to index platform"
    assert upload_refusal(_token("read"), "ml", "numpy", REGISTRY) == \
        "Token ci may not upload to index ml"


# --- patterns: which names can they match? -------------------------------------------------

@pytest.mark.parametrize(("patterns", "expected"), [
    (("acme-*", "*-tools"), "acme-tools"),
    (("acme-*", "acme"), None),
    (("[-]",), None),
    (("a*-",), None),
    (("x[!a-z]",), "x0"),
    (("torch",), "torch"),
    (("a", "b"), None),
    (("a?b", "*-*"), "a-b"),
    (("a[",), None),
    (("A*",), None),
])
def test_witness(patterns: tuple[str, ...], expected: str | None) -> None:
    assert witness(*patterns) == expected


_PATTERN = st.lists(st.sampled_from(["*", "?", "a", "b", "-", "0", "[ab]", "[!a]", "[-]"]),
                    min_size=1, max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(patterns=st.lists(_PATTERN, min_size=1, max_size=3), names=st.lists(_NAMES, max_size=20))
def test_witness_is_exact(patterns: list[str], names: list[str]) -> None:
    found = witness(*patterns)
    if found is not None:
        assert canonicalize_name(found) == found
        assert all(fnmatch.fnmatchcase(found, p) for p in patterns)
    for name in names:
        if all(fnmatch.fnmatchcase(name, p) for p in patterns):
            assert found is not None
