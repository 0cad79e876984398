"""The crash engine without a guest: the write-log reader, the power-loss model, the enumeration, the job the
guest gets, the scenario step, the recorded disk's QEMU arguments."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import struct
from pathlib import Path

import pytest

from lab.crash.enumerate import Window, cut_points, enumerate_states
from lab.crash.explore import build_job
from lab.crash.logwrites import LogFlag, RecordingError, read_log
from lab.crash.model import CrashState, Granularity, Model, PowerLoss, Unit
from lab.crash.explore import ExploreOptions
from lab.crash.step import step_options
from lab.scenario import ScenarioError, load_scenarios
from stonelab.errors import StonelabError

SECTOR = 512
MAGIC = 0x6A736677736872


def write_log(path: Path, requests: list[tuple[int, int, int, bytes]], *, counted: int | None = None,
              magic: int = MAGIC) -> Path:
    """A dm-log-writes file as QEMU writes it: requests are (flags, sector, nr_sectors, fill byte)."""
    body = b""
    for flags, sector, nr, fill in requests:
        body += struct.pack("<QQQQ", sector, nr, flags, 0).ljust(SECTOR, b"\0")
        if not flags & LogFlag.DISCARD:
            body += fill * (nr * SECTOR)
    count = len(requests) if counted is None else counted
    path.write_bytes(struct.pack("<QQQI", magic, 1, count, SECTOR).ljust(SECTOR, b"\0") + body)
    return path


W, F, FUA = 0, int(LogFlag.FLUSH), int(LogFlag.FUA)


def sample(tmp_path: Path, **kw) -> Path:
    return write_log(tmp_path / "log", [(W, 8, 2, b"a"), (F, 0, 0, b""), (W, 16, 1, b"b"), (W, 24, 1, b"c"),
                                        (F, 0, 0, b""), (W, 32, 1, b"d"), (FUA, 40, 1, b"e"), (W, 48, 1, b"f")],
                     **kw)


def test_reader_entries_data_and_positions(tmp_path):
    rec = read_log(sample(tmp_path))
    assert [e.describe() for e in rec.entries[:3]] == ["#0 WRITE sector 8 +2", "#1 FLUSH", "#2 WRITE sector 16 +1"]
    assert rec.read(rec.entries[0]) == b"a" * 1024 and rec.read(rec.entries[0], 1, 1) == b"a" * 512
    assert rec.position(SECTOR) == 0
    assert rec.position(rec.entries[2].offset) == 2  # a mark taken before entry 2 was logged
    assert rec.position(10 ** 9) == 8


def test_reader_keeps_the_uncounted_tail(tmp_path):
    """QEMU updates nr_entries on flushes: entries after the last flush are in the file but not counted."""
    rec = read_log(sample(tmp_path, counted=5))
    assert rec.counted == 5 and len(rec.entries) == 8


def test_reader_takes_a_log_whose_super_block_was_never_written(tmp_path):
    """A guest that never flushes (barrier=0) leaves QEMU's super block unwritten: zeros, entries after it."""
    path = sample(tmp_path)
    path.write_bytes(bytes(SECTOR) + path.read_bytes()[SECTOR:])
    rec = read_log(path)
    assert rec.counted == 0 and len(rec.entries) == 8 and rec.sector_size == SECTOR


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x00" * 8 + b[8:], "offset 0: bad magic"),
    (lambda b: b[:SECTOR * 4], "offset 2048: entry 1 of 8 is missing"),
    (lambda b: b[:SECTOR + 16] + struct.pack("<Q", 0x80) + b[SECTOR + 24:], "offset 512: entry 0 has unknown flags"),
    (lambda b: b[:SECTOR * 2 + 100], "offset 512: entry 0 needs 1024 data bytes past the end"),
])
def test_bad_recording_is_one_line_naming_file_and_offset(tmp_path, damage, message):
    path = sample(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(RecordingError) as caught:
        read_log(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_volatile_cache_boundary_and_in_flight(tmp_path):
    rec = read_log(sample(tmp_path))
    power = PowerLoss()
    assert power.boundary(rec, 1) == 0 and power.boundary(rec, 2) == 2 and power.boundary(rec, 8) == 5
    units, forced = power.in_flight(rec, 8)
    assert units == [Unit(5), Unit(6), Unit(7)] and forced == {Unit(6)}
    sectors = PowerLoss(granularity=Granularity.SECTOR).in_flight(rec, 1)[0]
    assert sectors == [Unit(0, 0, 1), Unit(0, 1, 1)]
    state = CrashState(8, 5, (Unit(7),), True, "subset")
    assert [(e.index, f, n) for e, f, n in power.writes(rec, state)] == [(0, 0, 2), (2, 0, 1), (3, 0, 1), (7, 0, 1)]
    assert PowerLoss(Model.OPTIMISTIC).boundary(rec, 7) == 7


def test_enumeration_covers_boundaries_prefixes_and_subsets(tmp_path):
    rec = read_log(sample(tmp_path))
    window = Window(0, 8, 0)
    assert cut_points(rec, window) == [1, 4, 8]
    states = enumerate_states(rec, window, PowerLoss())
    sets = {(s.boundary, tuple(u.entry for u in s.persisted)) for s in states if s.cut == 8}
    # in flight at the end: 5, 6 (FUA), 7; the FUA write is in every state that has a later write
    assert sets == {(5, ()), (5, (5,)), (5, (5, 6)), (5, (6,)), (5, (5, 6, 7)), (5, (6, 7))}
    assert all(s.after_return for s in states if s.cut == 8) and not any(s.after_return for s in states if s.cut < 8)
    assert {s.kind for s in states} >= {"boundary", "prefix", "subset"}
    assert enumerate_states(rec, window, PowerLoss()) == states  # deterministic


def test_enumeration_bound_and_seed(tmp_path):
    many = [(W, 8 * i, 1, b"x") for i in range(12)] + [(F, 0, 0, b"")]
    rec = read_log(write_log(tmp_path / "log", many))
    window = Window(0, 13, 0)
    a = enumerate_states(rec, window, PowerLoss(), max_states=20, seed=1)
    assert len(a) == 20 and a == enumerate_states(rec, window, PowerLoss(), max_states=20, seed=1)
    assert a != enumerate_states(rec, window, PowerLoss(), max_states=20, seed=2)
    assert sum(s.kind == "boundary" for s in a) == 2
    assert any(s.kind in ("subset", "sample") for s in a)  # a small budget still holds reordering states
    unbounded = enumerate_states(rec, window, PowerLoss(), max_states=10 ** 6)
    assert any(s.kind == "sample" for s in unbounded)  # 12 in flight: sampled, not 4096 subsets
    # however small the budget, the two states right after the return are in it: all in flight lost, all kept
    for budget, seed in ((2, 1), (3, 7), (5, 2)):
        returned_before_the_flush = Window(0, 12, 0)
        at_return = {len(s.persisted) for s in enumerate_states(rec, returned_before_the_flush, PowerLoss(),
                                                               max_states=budget, seed=seed) if s.after_return}
        assert {0, 12} <= at_return


def test_a_tight_budget_still_judges_the_state_after_the_return(tmp_path):
    """Many flush boundaries during the operation and a budget smaller than their number: the states after the
    command returned (where ALICE's durable_success is decided) are kept (a Nix first install has 11 boundaries;
    a budget of 24 once dropped the last ones)."""
    many = [entry for i in range(12) for entry in ((W, 8 * i, 1, b"x"), (F, 0, 0, b""))] + [(W, 200, 1, b"y")]
    rec = read_log(write_log(tmp_path / "log", many))
    window = Window(0, len(many), 0)
    assert sum(s.after_return for s in enumerate_states(rec, window, PowerLoss(), max_states=10 ** 6)) == 2
    for budget in (3, 6):
        kept = enumerate_states(rec, window, PowerLoss(), max_states=budget)
        assert sum(s.after_return for s in kept) == 2, budget


def test_optimistic_is_in_order_prefixes(tmp_path):
    rec = read_log(sample(tmp_path))
    states = enumerate_states(rec, Window(0, 8, 0), PowerLoss(Model.OPTIMISTIC))
    assert all(not s.persisted and s.boundary == s.cut for s in states)
    assert sorted({s.boundary for s in states}) == [1, 3, 4, 6, 7, 8]


def test_job_clips_to_the_partition_and_shares_the_common_prefix(tmp_path):
    rec = read_log(sample(tmp_path))
    states = [CrashState(8, 5, (), True, "boundary"), CrashState(8, 5, (Unit(7),), True, "subset")]
    job, data = build_job(rec, states, PowerLoss(), device="/dev/vdb2", partition=(16 * SECTOR, 64 * SECTOR),
                          recovery=["state", "list", "-D", "{root}"])
    # entry 0 (sectors 8-9) lies before the partition: dropped; entries 2 and 3 are common to both states
    assert [job.chunks[c][0] for c in job.common] == [0, 8 * SECTOR]
    assert job.states[0] == [] and [job.chunks[c][0] for c in job.states[1]] == [32 * SECTOR]
    offset, start, length = job.chunks[job.states[1][0]]
    assert data[start:start + length] == b"f" * SECTOR
    assert (job.system, job.fstype) == ("reference", "ext4")
    nix, _ = build_job(rec, states, PowerLoss(), device="/dev/vdb2", partition=(16 * SECTOR, 64 * SECTOR),
                       recovery=[], system="nix", system_root="nix", fstype="ext2")
    assert (nix.system, nix.system_root, nix.fstype) == ("nix", "nix", "ext2")
    assert nix.states == job.states and nix.common == job.common


def scenario_file(tmp_path: Path, step: str, top: str = "") -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: x\n{top}packages:\n  a: {{name: a, version: '1'}}\nsteps:\n  - {step}\n")
    return path


def test_power_loss_explore_step_parses_and_refuses_bad_input(tmp_path):
    (parsed,) = load_scenarios(scenario_file(tmp_path, "power_loss: {during: {install: [a]}, explore: true, "
                                                       "model: optimistic, max_states: 5, seed: 3}"))
    arg = parsed.steps[0].arg
    assert arg.during.kind == "install" and arg.model is Model.OPTIMISTIC and arg.max_states == 5 and arg.seed == 3
    options = step_options(arg, ExploreOptions(), {"seed": 9})
    assert (options.model, options.max_states, options.seed) == (Model.OPTIMISTIC, 5, 9)  # the CLI wins
    bad = [("power_loss: {during: {install: [a]}, explore: true, model: cache}", "model"),
           ("power_loss: {during: {install: [a]}, explore: true, max_states: 0}", "max_states"),
           ("power_loss: {during: {install: [a]}, at: random, seed: 1, max_states: 4}", "belong to the explore form"),
           ("power_loss: {during: verify, explore: true}", "can only interrupt a transaction"),
           ("power_loss: {during: {install: [a]}, explore: true, when: 1}", "when")]
    for step, message in bad:
        with pytest.raises(ScenarioError, match=re.escape(message)) as caught:
            load_scenarios(scenario_file(tmp_path, step))
        assert str(caught.value).startswith(str(tmp_path / "s.yaml")) and "\n" not in str(caught.value)
    host = scenario_file(tmp_path, "power_loss: {during: {install: [a]}, explore: true}", top="target: host\n")
    with pytest.raises(ScenarioError, match=r"s\.yaml:2:\d+: target: .*needs target vm"):
        load_scenarios(host)


def test_crash_invariants_are_known_to_scenarios(tmp_path):
    (parsed,) = load_scenarios(scenario_file(tmp_path, "power_loss: {during: {install: [a]}, explore: true}",
                                             "expect_violations: [durable_success, recovers, atomic_usr]\n"))
    assert parsed.expected_for("vm") == ("durable_success", "recovers", "atomic_usr")


def test_recorded_disk_is_a_blklogwrites_chain_that_keeps_flushes(tmp_path):
    from vm.errors import VmError
    from vm.qemu import DiskSpec
    args, node, write_cache = DiskSpec(tmp_path / "d.qcow2", format="qcow2", log=tmp_path / "d.log").blockdev_args(0)
    top = args[-1]
    assert node == "disk0-rec" and write_cache == "on"
    assert top.startswith("driver=blklogwrites,") and "file=disk0-fmt" in top and "log=disk0-logfile" in top
    assert "cache.no-flush=off" in top  # a no-flush filter node would drop every FLUSH entry
    with pytest.raises(VmError, match="sends no flushes"):
        DiskSpec(tmp_path / "d", cache="writethrough", log=tmp_path / "l")


REPO_SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stonelab.cli", *argv], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: x\ntarget: vm\nsteps: [recover]\n")
    not_repro = tmp_path / "r.json"
    not_repro.write_text('{"format": "something else"}')
    broken = tmp_path / "b.json"
    broken.write_text("{")
    for argv, message in [(("crash", "explore", str(plain)), "no power_loss step to explore"),
                          (("crash", "explore", str(REPO_SCENARIOS / "crash-reference.yaml"), "--max-states", "0"),
                           "--max-states must be at least 1"),
                          (("crash", "replay", str(not_repro)), "not a stonelab crash reproducer"),
                          (("crash", "replay", str(broken)), "not JSON"),
                          (("crash", "replay", str(tmp_path / "missing.json")), "cannot read the reproducer")]:
        proc = run_cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_replay_names_a_missing_recording_and_a_corrupt_log(tmp_path):
    from lab.crash.replay import Reproducer, replay, write_reproducer
    repro = write_reproducer(tmp_path / "repro.json", Reproducer(
        base="recording/base.raw", log="recording/gen1.log", partition=[0, 1 << 20], model="volatile-cache",
        granularity="request", cut=1, boundary=0, persisted=[], after_return=True, oracle={}, recovery=[]))
    with pytest.raises(Exception, match="base.raw is missing"):
        replay(repro)
    (tmp_path / "recording").mkdir()
    (tmp_path / "recording" / "base.raw").write_bytes(b"")
    (tmp_path / "recording" / "gen1.log").write_bytes(b"\x01" * 600)
    with pytest.raises(RecordingError, match=r"gen1.log: offset 0: bad magic"):
        replay(repro)


def test_judge_alice_contract_recovery_and_lab_invariants(tmp_path):
    import xxhash
    from dataclasses import asdict

    from lab.crash.check import Oracle, judge
    from lab.invariants import ExpectedTree
    from lab.probe import observe
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "hello").write_text("one\n")
    obs = asdict(observe(tmp_path))
    one = f"{xxhash.xxh3_128_intdigest(b'one' + bytes([10])):032x}"
    oracle = Oracle(ExpectedTree("{hello-1}", {"bin/hello": ["file", one]}),
                    ExpectedTree("new {hello-2}", {"bin/hello": ["file", "0" * 32]}), True, {})
    ok = {"recovery": {"exit": 0, "output": ""}, "observation": obs}
    assert judge(ok, oracle, after_return=False) == []  # before the return: the old tree is fine
    (lost,) = judge(ok, oracle, after_return=True)  # after a reported success: it must survive
    assert lost.invariant == "durable_success" and "old tree {hello-1}" in lost.detail
    failed = judge({"recovery": {"exit": 2, "output": "stonelab: error: bad"}, "observation": obs}, oracle, False)
    assert [v.invariant for v in failed] == ["recovers"]
    (torn,) = judge(dict(ok, observation=dict(obs, usr={})), oracle, False)
    assert torn.invariant == "atomic_usr"
    assert judge({"mount_error": "Structure needs cleaning"}, oracle, False)[0].invariant == "recovers"
    unreadable = judge({"recovery": {"exit": 0, "output": ""}, "read_error": "Bad message (/.moss/db/state)"},
                       oracle, True)
    assert [(v.invariant, "Bad message" in v.detail) for v in unreadable] == [("recovers", True)]


def test_a_power_cut_loses_the_volatile_cache_of_a_disk_image(tmp_path):
    """What the runner's crash steps do on a recording vm target (VmTarget.lose_volatile_cache): the disk keeps
    every write up to the last completed flush and the FUA writes after it; the optimistic model keeps all."""
    rec = read_log(sample(tmp_path))
    image = tmp_path / "disk.raw"
    for model, kept in ((Model.VOLATILE_CACHE, "abce"), (Model.OPTIMISTIC, "abcdef")):
        image.write_bytes(b"\0" * 64 * SECTOR)
        power = PowerLoss(model)
        state = power.worst_cut(rec)
        power.write_state(rec, state, image)
        disk = image.read_bytes()
        on_disk = "".join(chr(disk[s * SECTOR]) for s in (8, 16, 24, 32, 40, 48) if disk[s * SECTOR])
        assert on_disk == kept, model
    assert PowerLoss().worst_cut(rec).write_set() == "#6"  # the FUA write after the last flush


def test_crash_and_random_cut_steps_name_their_power_loss_model(tmp_path):
    (crash,) = load_scenarios(scenario_file(tmp_path, "crash: {at: swap.after, during: {install: [a]}, "
                                                      "model: optimistic}"))
    assert crash.steps[0].arg.model is Model.OPTIMISTIC
    (default,) = load_scenarios(scenario_file(tmp_path, "crash: {at: swap.after, during: {install: [a]}}"))
    assert default.steps[0].arg.model is None  # the target's model: volatile-cache on a recording vm target
    (cut,) = load_scenarios(scenario_file(tmp_path, "power_loss: {during: {install: [a]}, at: random, seed: 1, "
                                                    "model: volatile-cache}"))
    assert cut.steps[0].arg.model is Model.VOLATILE_CACHE
    with pytest.raises(ScenarioError, match="model"):
        load_scenarios(scenario_file(tmp_path, "crash: {at: swap.after, during: {install: [a]}, model: cache}"))


DISCARD = int(LogFlag.DISCARD)


@pytest.mark.parametrize("request_, disk_bytes", [((DISCARD, 0, 2 ** 60, b""), None),
                                                  ((W, 2 ** 62, 1, b"x"), None),
                                                  ((W, 128, 1, b"x"), 64 * SECTOR),
                                                  ((DISCARD, 60, 8, b""), 64 * SECTOR)])
def test_an_entry_past_the_end_of_the_disk_is_a_recording_error(tmp_path, request_, disk_bytes):
    """A hostile or damaged log: a discard of 2^60 sectors (its zeros would not fit in memory), a write at a
    sector no file offset reaches, or past the recorded disk's end (it would grow the image)."""
    path = write_log(tmp_path / "log", [(W, 8, 1, b"a"), request_])
    with pytest.raises(RecordingError, match="entry 1 covers sectors .* past the end of the"):
        read_log(path, disk_bytes=disk_bytes)
    assert len(read_log(write_log(tmp_path / "ok", [(W, 8, 1, b"a"), (DISCARD, 56, 8, b"")]),
                        disk_bytes=64 * SECTOR).entries) == 2
    uncounted = read_log(write_log(tmp_path / "tail", [(W, 8, 1, b"a"), request_], counted=1),
                         disk_bytes=disk_bytes)
    assert len(uncounted.entries) == 1     # an uncounted tail ends at the first entry that is not whole


GOOD_REPRO = dict(base="recording/base.raw", log="recording/gen1.log", partition=[0, 64 * SECTOR],
                  model="volatile-cache", granularity="sector", cut=2, boundary=0, persisted=[], after_return=True,
                  oracle={}, recovery=[])


@pytest.mark.parametrize("change, message", [
    (dict(cut="two"), "malformed reproducer: cut: Input should be a valid integer"),
    (dict(persisted=[[0, "x", 1]]), "malformed reproducer: persisted.0.1"),
    (dict(persisted=[[0, 0]]), "each persisted unit [entry, first, count]"),
    (dict(partition=[-1, 5]), "partition is [start, length]"),
    (dict(oracle=[]), "malformed reproducer: oracle"),
    (dict(persisted=[[1, 0, 1]]), "persisted unit [1, 0, 1] is not part of a request before the cut"),
    (dict(persisted=[[0, 2 ** 62, 1]]), "persisted unit [0, 4611686018427387904, 1] is not part of a request"),
])
def test_a_malformed_reproducer_is_one_line(tmp_path, change, message):
    """Fields of the wrong type or out of the recording's range: one line, not a TypeError or IndexError."""
    from lab.crash.replay import replay
    (tmp_path / "recording").mkdir()
    (tmp_path / "recording" / "base.raw").write_bytes(bytes(64 * SECTOR))
    write_log(tmp_path / "recording" / "gen1.log", [(W, 8, 1, b"a"), (F, 0, 0, b"")])
    path = tmp_path / "repro.json"
    path.write_text(json.dumps(dict(GOOD_REPRO, format="stonelab-crash-reproducer/1", **change)))
    with pytest.raises(StonelabError) as err:
        replay(path)
    assert message in str(err.value) and "\n" not in str(err.value)
