"""Dependency resolution: real fixture packages, hand-made Metas and a property test over random universes."""
from __future__ import annotations

import hashlib
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_impl.resolve import Candidate, ResolveError, removal, resolve
from reference_impl.stone import Dependency, Meta, read_stone, write_repository_index
from tests.conftest import shared_file


def dep(text: str) -> Dependency:
    return Dependency.parse(text)


def pkg(name: str, release: int = 1, *, depends=(), provides=(), conflicts=(), build_release: int = 1,
        origin: str | None = None) -> Candidate:
    meta = Meta(name=name, version="1.0", release=release, build_release=build_release, architecture="x86_64",
                depends=[dep(d) for d in depends], provides=[dep(p) for p in provides],
                conflicts=[dep(c) for c in conflicts])
    return Candidate(meta, origin or f"/pkgs/{meta.file_name}", f"{meta.package_id}+{build_release}")


def names(selection: list[Candidate]) -> list[str]:
    return [c.meta.name for c in selection]


def fixture(name: str) -> Candidate:
    path = shared_file("fixtures", "aerynos", "stones", f"{name}-1-1-1-x86_64.stone")
    meta = read_stone(path).meta
    return Candidate(meta, str(path), meta.package_id)


# -- real packages --------------------------------------------------------------------------------------------

def test_fixture_conflict_pineapple_and_italian_pizza_requested_together() -> None:
    pizza, pineapple = fixture("italian-pizza"), fixture("pineapple")
    with pytest.raises(ResolveError) as err:
        resolve([pizza, pineapple], [pizza, pineapple], [])
    message = str(err.value)
    assert "\n" not in message
    assert message == f"{pizza.origin}: italian-pizza conflicts with pineapple (conflicts: name(pineapple))"


def test_fixture_conflict_with_an_installed_package() -> None:
    pizza, pineapple = fixture("italian-pizza"), fixture("pineapple")
    with pytest.raises(ResolveError, match="italian-pizza conflicts with pineapple"):
        resolve([pizza], [pizza], [pineapple])
    # the other way round too: the installed package's conflicts count as well
    with pytest.raises(ResolveError, match="italian-pizza conflicts with pineapple"):
        resolve([pineapple], [pineapple], [pizza])


def test_fixture_each_alone_resolves_to_itself() -> None:
    for name in ("italian-pizza", "pineapple"):
        candidate = fixture(name)
        assert [c.package_id for c in resolve([candidate], [candidate], [])] == [candidate.package_id]


def test_fixture_provider_by_cmake_name() -> None:
    path = shared_file("fixtures", "aerynos", "stones", "bash-completion-2.11-1-1-x86_64.stone")
    meta = read_stone(path).meta
    completion = Candidate(meta, str(path), meta.package_id)
    user = pkg("user", depends=["cmake(bash-completion)"])
    assert names(resolve([user], [completion], [])) == ["bash-completion", "user"]


def test_fixture_repository_index_candidates(tmp_path) -> None:
    stones = shared_file("fixtures", "aerynos", "stones")
    repo = tmp_path / "repo"
    repo.mkdir()
    for stone in stones.glob("*.stone"):
        shutil.copy2(stone, repo / stone.name)
    index = write_repository_index(repo)
    available = [Candidate(m, f"repo:{index}", m.hash) for m in read_stone(index).metas]
    by_name = {c.meta.name: c for c in available}
    assert set(by_name) == {"bash-completion", "italian-pizza", "pineapple"}
    user = pkg("user", depends=["cmake(bash-completion)", "name(italian-pizza)"])
    result = resolve([user], available, [])
    assert names(result) == ["bash-completion", "italian-pizza", "user"]
    assert result[0].package_id == hashlib.sha256((repo / by_name["bash-completion"].meta.uri).read_bytes()).hexdigest()
    greedy = pkg("greedy", depends=["name(italian-pizza)", "name(pineapple)"])
    with pytest.raises(ResolveError) as err:
        resolve([greedy], available, [])
    assert str(err.value) == (f"/pkgs/{greedy.meta.file_name}: greedy depends on name(pineapple), which no available "
                              f"package provides (only {by_name['pineapple'].package_id}, which conflicts with the "
                              f"selection)")


# -- hand-made metas ------------------------------------------------------------------------------------------

def test_transitive_dependencies_are_pulled_in_by_every_kind() -> None:
    app = pkg("app", depends=["soname(libfoo.so.1(x86_64))", "binary(sh)", "pkgconfig(zlib)"])
    libfoo = pkg("libfoo", provides=["soname(libfoo.so.1(x86_64))"], depends=["name(base)"])
    shell = pkg("dash", provides=["binary(sh)"])
    zlib = pkg("zlib-devel", provides=["pkgconfig(zlib)"], depends=["interpreter(/usr/bin/python3)"])
    python = pkg("python", provides=["interpreter(/usr/bin/python3)", "python(setuptools)"])
    base = pkg("base")
    unrelated = pkg("unrelated")
    result = resolve([app], [libfoo, shell, zlib, python, base, unrelated], [])
    assert names(result) == ["app", "base", "dash", "libfoo", "python", "zlib-devel"]


def test_missing_provider_is_one_line_naming_origin_package_and_dependency() -> None:
    app = pkg("app", depends=["name(base)"])
    base = pkg("base", depends=["soname(libfoo.so.1(x86_64))"], origin="repo:/r/stone.index")
    with pytest.raises(ResolveError) as err:
        resolve([app], [base], [])
    assert str(err.value) == ("repo:/r/stone.index: base depends on soname(libfoo.so.1(x86_64)), "
                              "which no available package provides")


def test_two_requested_with_one_name_is_refused() -> None:
    one, two = pkg("app", 1), pkg("app", 2)
    with pytest.raises(ResolveError, match="app requested twice"):
        resolve([one, two], [one, two], [])
    # the very same package twice is harmless
    assert names(resolve([one, one], [one], [])) == ["app"]


def test_requested_replaces_installed_of_the_same_name() -> None:
    old, new, other = pkg("app", 1), pkg("app", 2), pkg("other")
    result = resolve([new], [new], [old, other])
    assert [c.package_id for c in result] == [new.package_id, other.package_id]


def test_upgrade_that_drops_a_provide_breaks_an_installed_dependent() -> None:
    old = pkg("libfoo", 1, provides=["soname(libfoo.so.1(x86_64))"])
    new = pkg("libfoo", 2, provides=["soname(libfoo.so.2(x86_64))"])
    user = pkg("user", depends=["soname(libfoo.so.1(x86_64))"])
    with pytest.raises(ResolveError, match=r"user depends on soname\(libfoo\.so\.1\(x86_64\)\)"):
        resolve([new], [new, old], [old, user])
    compat = pkg("libfoo-compat", provides=["soname(libfoo.so.1(x86_64))"])
    assert names(resolve([new], [new, old, compat], [old, user])) == ["libfoo", "libfoo-compat", "user"]


def test_installed_provider_is_preferred_over_an_available_one() -> None:
    installed_sh = pkg("dash", provides=["binary(sh)"])
    other_sh = pkg("bash", 9, provides=["binary(sh)"])
    app = pkg("app", depends=["binary(sh)"])
    assert names(resolve([app], [other_sh, installed_sh], [installed_sh])) == ["app", "dash"]


def test_requested_provider_is_preferred_over_an_available_one() -> None:
    requested_sh = pkg("zsh", provides=["binary(sh)"])
    other_sh = pkg("bash", provides=["binary(sh)"])
    app = pkg("app", depends=["binary(sh)"])
    assert names(resolve([app, requested_sh], [other_sh, requested_sh], [])) == ["app", "zsh"]


def test_highest_release_then_build_release_of_a_name_wins() -> None:
    app = pkg("app", depends=["name(lib)"])
    versions = [pkg("lib", 2, build_release=1), pkg("lib", 3, build_release=1), pkg("lib", 3, build_release=4),
                pkg("lib", 1, build_release=9)]
    result = resolve([app], versions, [])
    chosen = next(c for c in result if c.meta.name == "lib")
    assert (chosen.meta.release, chosen.meta.build_release) == (3, 4)


def test_provider_that_would_conflict_is_passed_over() -> None:
    app = pkg("app", depends=["binary(sh)"], conflicts=["name(ash)"])
    ash = pkg("ash", provides=["binary(sh)"])
    bash = pkg("bash", provides=["binary(sh)"])
    assert names(resolve([app], [ash, bash], [])) == ["app", "bash"]


def test_result_does_not_depend_on_input_order() -> None:
    app = pkg("app", depends=["soname(libx.so(x86_64))", "name(tool)"])
    providers = [pkg(n, provides=["soname(libx.so(x86_64))"]) for n in ("libx-a", "libx-b", "libx-c")]
    tool = pkg("tool", depends=["soname(libx.so(x86_64))"])
    universe = [*providers, tool]
    expected = [c.package_id for c in resolve([app], universe, [])]
    rng = random.Random(7)
    for _ in range(10):
        rng.shuffle(universe)
        assert [c.package_id for c in resolve([app], universe, [])] == expected


def test_dependency_cycles_terminate() -> None:
    a = pkg("a", depends=["name(b)"])
    b = pkg("b", depends=["name(c)"])
    c = pkg("c", depends=["name(a)"])
    assert names(resolve([a], [a, b, c], [])) == ["a", "b", "c"]


def test_removal_keeps_the_rest_and_refuses_to_break_dependents() -> None:
    base = pkg("base", provides=["soname(libbase.so(x86_64))"])
    app = pkg("app", depends=["soname(libbase.so(x86_64))"])
    extra = pkg("extra")
    installed = [base, app, extra]
    assert names(removal(["extra"], installed)) == ["app", "base"]
    assert names(removal(["app", "base"], installed)) == ["extra"]
    with pytest.raises(ResolveError) as err:
        removal(["base"], installed)
    assert str(err.value) == "cannot remove base: app depends on soname(libbase.so(x86_64))"
    with pytest.raises(ResolveError, match="cannot remove ghost: not installed"):
        removal(["ghost"], installed)


def test_removal_allowed_when_another_package_still_provides() -> None:
    dash = pkg("dash", provides=["binary(sh)"])
    bash = pkg("bash", provides=["binary(sh)"])
    app = pkg("app", depends=["binary(sh)"])
    assert names(removal(["dash"], [dash, bash, app])) == ["app", "bash"]


def test_removal_ignores_a_dependency_that_was_already_unmet() -> None:
    broken = pkg("broken", depends=["name(nothing)"])
    extra = pkg("extra")
    assert names(removal(["extra"], [broken, extra])) == ["broken"]


# -- property: closed under depends and conflict-free, or an error ---------------------------------------------

PROVIDES = [dep(t) for t in ("soname(liba.so(x86_64))", "soname(libb.so(x86_64))", "binary(sh)",
                             "pkgconfig(z)", "python(six)", "cmake(Foo)", "name(p0)", "name(p3)")]
NAMES = [f"p{i}" for i in range(6)]


@st.composite
def universes(draw):
    available = []
    for name in NAMES:
        for release in sorted(draw(st.sets(st.integers(1, 3), min_size=0, max_size=2))):
            available.append(pkg(
                name, release,
                provides=[str(d) for d in draw(st.lists(st.sampled_from(PROVIDES), max_size=2))],
                depends=[str(d) for d in draw(st.lists(st.sampled_from(PROVIDES), max_size=2))],
                conflicts=[str(d) for d in draw(st.lists(st.sampled_from(PROVIDES), max_size=1))]))
    if not available:
        available.append(pkg("p0"))
    requested = draw(st.lists(st.sampled_from(available), min_size=1, max_size=3))
    installed_by_name = {c.meta.name: c for c in draw(st.lists(st.sampled_from(available), max_size=3))}
    return requested, available, list(installed_by_name.values())


def provided_by(selection: list[Candidate]) -> dict[Dependency, set[str]]:
    index: dict[Dependency, set[str]] = {}
    for c in selection:
        for p in c.meta.all_provides():
            index.setdefault(p, set()).add(c.meta.name)
    return index


@settings(max_examples=300, deadline=None)
@given(universes())
def test_resolution_is_closed_and_conflict_free_or_raises(universe) -> None:
    requested, available, installed = universe
    try:
        result = resolve(requested, available, installed)
    except ResolveError as err:
        assert "\n" not in str(err) and str(err)
        return
    index = provided_by(result)
    assert names(result) == sorted(set(names(result))), "names unique and sorted"
    for c in result:
        for d in c.meta.depends:
            assert d in index, f"{c.meta.name} needs {d}"
        for conflict in c.meta.conflicts:
            assert not (index.get(conflict, set()) - {c.meta.name}), f"{c.meta.name} conflicts on {conflict}"
    ids = {c.package_id for c in result}
    assert {c.package_id for c in requested} <= ids
    requested_names = {c.meta.name for c in requested}
    assert {c.package_id for c in installed if c.meta.name not in requested_names} <= ids
    known = {c.package_id for c in [*available, *installed, *requested]}
    assert ids <= known


@settings(max_examples=200, deadline=None)
@given(universes(), st.randoms(use_true_random=False))
def test_resolution_ignores_input_order(universe, rng) -> None:
    requested, available, installed = universe

    def outcome(req, avail, inst):
        try:
            return [c.package_id for c in resolve(req, avail, inst)]
        except ResolveError as err:
            return str(err)
    expected = outcome(requested, available, installed)
    shuffled = [list(x) for x in universe]
    for part in shuffled:
        rng.shuffle(part)
    assert outcome(*shuffled) == expected


@settings(max_examples=200, deadline=None)
@given(universes(), st.data())
def test_removal_leaves_a_closed_set_or_raises(universe, data) -> None:
    requested, available, _ = universe
    try:
        installed = resolve(requested, available, [])
    except ResolveError:
        return
    gone = data.draw(st.lists(st.sampled_from(names(installed)), min_size=1, unique=True))
    try:
        remaining = removal(gone, installed)
    except ResolveError as err:
        assert str(err).startswith("cannot remove ")
        return
    index = provided_by(remaining)
    assert not set(gone) & set(names(remaining))
    for c in remaining:
        for d in c.meta.depends:
            assert d in index
