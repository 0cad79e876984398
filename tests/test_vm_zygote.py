"""The guest's warm fork server (vm.zygote): a command forked from it gives exactly what a fresh interpreter gives,
the lab's fault injection and seeded bugs work through it, and what it cannot serve runs fresh."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vm.zygote import Zygote, serves_fresh_equivalent, start_environment

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def zygote(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(PROJECT))  # the zygote's start-up environment is the commands'
    # a short directory: an AF_UNIX socket path has at most 107 bytes
    directory = tempfile.mkdtemp(prefix="zy", dir="/tmp")
    server = Zygote(sys.executable, path=f"{directory}/z.sock")
    yield server
    if server.process is not None:
        server.process.kill()
        server.process.wait()
    shutil.rmtree(directory)


def fresh(argv: list[str], env: dict[str, str], cwd: str, timeout: float = 60) -> dict:
    proc = subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    return {"exit_code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def forked(zygote: Zygote, argv: list[str], env: dict[str, str], cwd: str, timeout: float = 60) -> dict:
    result = zygote.run([sys.executable, *argv], env, cwd, timeout)
    assert result is not None and result["forked"], "the zygote did not serve the command"
    return {k: result[k] for k in ("exit_code", "stdout", "stderr")}


def environment(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(PROJECT), **extra)


SAME_AS_FRESH = {
    "no-op verb": ["-m", "stonelab.cli", "faults"],
    "verb on bad input (exit 2)": ["-m", "stonelab.cli", "inspect", "/nonexistent.stone"],
    "argv and exit status": ["-c", "import sys; print(sys.argv); sys.exit(3)", "a b", "--x"],
    "SystemExit with a message": ["-c", "raise SystemExit('bye')"],
    "uncaught exception": ["-c", "def f():\n    raise ValueError('x')\nf()"],
    "syntax error": ["-c", "print(("],
    "environment, cwd, sys.path, __main__": [
        "-c", "import os, sys, __main__; print(os.environ.get('ZY_VAR'), repr(sys.path[0]), __name__, os.getcwd(),"
              " __main__.__dict__.get('serve'), sorted(k for k in os.environ if k.startswith('ZY')))"],
    "module argv[0] and __name__": ["-m", "lab.probe", "--help"],
    "killed by a signal": ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
    "signal dispositions": ["-c", "import signal; print([signal.getsignal(s) for s in (signal.SIGINT, "
                                  "signal.SIGPIPE, signal.SIGCHLD, signal.SIGTERM, signal.SIGXFSZ)])"],
    "stdin is empty, large output": ["-c", "import sys; print(repr(sys.stdin.read())); "
                                           "sys.stdout.write('x' * 300000); sys.stderr.write('y' * 200000)"],
    "a child process inherits the environment": ["-c", "import subprocess; subprocess.run(['sh', '-c', "
                                                       "'echo $ZY_VAR; pwd'])"],
    "atexit handlers run": ["-c", "import atexit; atexit.register(print, 'at exit')"],
    "seeded bug (STONELAB_MUTANT)": ["-c", "from reference_impl import mutants; print(mutants.active('skip-syncfs'))"],
}


@pytest.mark.parametrize("argv", SAME_AS_FRESH.values(), ids=SAME_AS_FRESH.keys())
def test_a_forked_command_gives_what_a_fresh_interpreter_gives(zygote, argv, tmp_path):
    env = environment(ZY_VAR="value with spaces", STONELAB_MUTANT="skip-syncfs")
    assert forked(zygote, argv, env, str(tmp_path)) == fresh(argv, env, str(tmp_path))


def test_fault_injection_works_through_the_zygote(zygote, tmp_path):
    """A fault point's crash, a seeded cut (STONELAB_CUT: an audit hook installed in the child only) and the cut's
    calibration count (written at exit) behave as in a fresh process."""
    point = ["-c", "from reference_impl.faults import fault_point; fault_point('blit.mid'); print('passed')"]
    cut = ["-c", "import os\nfrom reference_impl.faults import install_cut\ninstall_cut()\n"
                 "for n in range(5): os.mkdir(f'd{n}')\nprint('all made')"]
    for argv, env in ((point, environment(STONELAB_FAULT="blit.mid:crash")), (point, environment()),
                      (cut, environment(STONELAB_CUT="2"))):
        for where in ("fresh", "forked"):
            (tmp_path / where).mkdir(exist_ok=True)
            for old in (tmp_path / where).iterdir():
                old.rmdir()
        assert forked(zygote, argv, env, str(tmp_path / "forked")) == fresh(argv, env, str(tmp_path / "fresh"))
        assert sorted(p.name for p in (tmp_path / "forked").iterdir()) == \
            sorted(p.name for p in (tmp_path / "fresh").iterdir())
    assert forked(zygote, point, environment(STONELAB_FAULT="blit.mid:crash"), str(tmp_path))["exit_code"] == -9
    # the hook of one child is gone in the next: the zygote never installs it
    (tmp_path / "again").mkdir()
    assert forked(zygote, cut, environment(), str(tmp_path / "again"))["stdout"] == "all made\n"
    counts = []
    for run, where in ((forked, "count-forked"), (fresh, "count-fresh")):
        (tmp_path / where).mkdir()
        counted = tmp_path / where / "count"
        run(*([zygote] if run is forked else []), cut, environment(STONELAB_CUT=f"count:{counted}"),
            str(tmp_path / where))
        counts.append(counted.read_text())
    assert counts[0] == counts[1] and int(counts[0]) >= 5


def test_children_do_not_share_random_state(zygote, tmp_path):
    argv = ["-c", "import random; print(random.random())"]
    outputs = {forked(zygote, argv, environment(), str(tmp_path))["stdout"] for _ in range(3)}
    assert len(outputs) == 3


def test_a_hanging_command_is_killed_at_its_timeout_and_the_zygote_serves_on(zygote, tmp_path):
    result = zygote.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                        environment(), str(tmp_path), 1.0)
    assert result["timed_out"] and result["exit_code"] == -9 and result["stdout"] == "started\n"
    assert result["seconds"] < 10
    assert forked(zygote, ["-c", "print(1)"], environment(), str(tmp_path))["stdout"] == "1\n"


def test_a_dead_zygote_is_started_again(zygote, tmp_path):
    assert forked(zygote, ["-c", "print(1)"], environment(), str(tmp_path))["stdout"] == "1\n"
    first = zygote.process.pid
    zygote.process.kill()
    zygote.process.wait()
    assert forked(zygote, ["-c", "print(2)"], environment(), str(tmp_path))["stdout"] == "2\n"
    assert zygote.process.pid != first


def test_what_the_zygote_cannot_serve_runs_fresh(zygote, tmp_path):
    env = environment()
    assert zygote.run([sys.executable, "-u", "-c", "print(1)"], env, str(tmp_path), 10) is None
    assert zygote.run(["/bin/echo", "-c", "x"], env, str(tmp_path), 10) is None
    # the interpreter reads these at start: a forked child could not honour a different value
    assert zygote.run([sys.executable, "-c", "print(1)"], dict(env, PYTHONHASHSEED="1"), str(tmp_path), 10) is None
    assert zygote.run([sys.executable, "-c", "print(1)"], dict(env, LC_ALL="C"), str(tmp_path), 10) is None
    assert zygote.process is None  # none of these started it


def test_a_zygote_that_cannot_start_means_fresh_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(PROJECT))
    broken = Zygote(sys.executable, path=str(tmp_path / "missing-dir" / "z.sock"), start_timeout=60)
    assert broken.run([sys.executable, "-c", "print(1)"], environment(), str(tmp_path), 10) is None
    assert broken.broken


def test_start_environment_and_eligibility():
    env = {"PATH": "/bin", "PYTHONPATH": "/p", "LANG": "C.UTF-8", "LC_ALL": "C", "STONELAB_FAULT": "x:pause"}
    assert start_environment(env) == {"PATH": "/bin", "PYTHONPATH": "/p", "LANG": "C.UTF-8", "LC_ALL": "C"}
    assert serves_fresh_equivalent([sys.executable, "-m", "x"], env, sys.executable, dict(env, STONELAB_CUT="1"))
    assert not serves_fresh_equivalent([sys.executable, "-m"], env, sys.executable, env)
    assert not serves_fresh_equivalent([sys.executable, "-X", "dev", "-m", "x"], env, sys.executable, env)


def test_the_agent_forks_warm_requests_and_starts_the_rest_fresh(tmp_path):
    """Through ``python -m vm.agent --stdio``: a ``warm`` run is forked, a plain one is not, both give the same."""
    directory = tempfile.mkdtemp(prefix="zy", dir="/tmp")
    # the agent's Zygote listens on the default socket: point the default at a private one for this test
    code = ("import sys, vm.zygote as z; z.Zygote.__init__.__defaults__ = (sys.argv[1], 600.0); "
            "import vm.agent as a; sys.exit(a.main(['--stdio']))")
    proc = subprocess.Popen([sys.executable, "-c", code, f"{directory}/z.sock"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=PROJECT, env=environment())
    try:
        assert json.loads(proc.stdout.readline())["event"] == "ready"
        answers = []
        for ident, warm in ((1, True), (2, False), (3, True)):
            request = {"id": ident, "op": "run", "command": [sys.executable, "-m", "stonelab.cli", "faults"],
                       "cwd": str(PROJECT), "env": {"ZY": "1"}, "warm": warm}
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            answers.append(json.loads(proc.stdout.readline())["result"])
        assert [a.get("forked", False) for a in answers] == [True, False, True]
        assert len({(a["exit_code"], a["stdout"], a["stderr"]) for a in answers}) == 1
        assert answers[0]["exit_code"] == 0 and answers[0]["stdout"]
    finally:
        proc.stdin.close()
        proc.wait(30)
        shutil.rmtree(directory)  # the zygote ends with the agent (end of its stdin)


@pytest.mark.vm
def test_a_restored_guest_forks_verbs_from_its_warm_zygote(kernel, accel, tmp_path):
    """The saved guest carries its zygote: after a restore the no-op verb, a failing verb and a fault-point crash
    are forked from it and give what a fresh interpreter in the same guest gives."""
    from vm.disk import DiskLayout, build_disk
    from vm.machine import Machine, agent_config
    from vm.qemu import DiskSpec
    from vm.snapshot import resume, saved_state

    disk = build_disk(tmp_path / "sut.img", DiskLayout(esp_mib=64, root_mib=64))
    config = agent_config(kernel, accel, [DiskSpec(disk.path)])
    commands = [
        ["-m", "stonelab.cli", "faults"],
        ["-m", "stonelab.cli", "inspect", "/nonexistent.stone"],
        ["-c", "import os, sys; print(sys.argv, os.environ['ZY'], os.getcwd())", "x y"],
        ["-c", "from reference_impl.faults import fault_point; fault_point('blit.mid')"],
    ]
    with Machine(config, name="zygote", restore_from=saved_state(config)) as guest:
        resume(guest)
        for argv in commands:
            env = {"ZY": "1", "STONELAB_FAULT": "blit.mid:crash"}
            warm = guest.execute([sys.executable, *argv], 300, env=env, cwd=str(PROJECT), warm=True)
            cold = guest.execute([sys.executable, *argv], 300, env=env, cwd=str(PROJECT))
            assert warm.forked and not cold.forked
            assert (warm.exit_code, warm.stdout, warm.stderr) == (cold.exit_code, cold.stdout, cold.stderr), argv
        assert warm.exit_code == -9  # the fault point's crash kills the forked command, not the zygote
        hung = guest.execute([sys.executable, "-c", "import time; time.sleep(600)"], 3, cwd=str(PROJECT), warm=True)
        assert hung.timed_out and hung.forked
        assert guest.execute([sys.executable, *commands[0]], 300, cwd=str(PROJECT), warm=True).forked


EXCHANGE = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
open('a', 'w').close(); open('b', 'w').close()
AT_FDCWD, RENAME_EXCHANGE = -100, 2
rc = libc.syscall(316, AT_FDCWD, b'a', AT_FDCWD, b'b', RENAME_EXCHANGE)  # renameat2 on x86-64
print(0 if rc == 0 else errno.errorcode[ctypes.get_errno()])
"""


def test_a_kernel_personality_applies_through_the_zygote(zygote, tmp_path):
    """``--personality``: lab.kernel.emulate, forked from the zygote, installs the profile's seccomp filter and
    execs the verb exactly as a fresh process does (Asterinas has no RENAME_EXCHANGE: EINVAL)."""
    import platform
    if platform.machine() != "x86_64":
        pytest.skip("the renameat2 syscall number used here is x86-64's")
    argv = ["-m", "lab.kernel.emulate", "--profile", "asterinas-0.18.1", "--", sys.executable, "-c", EXCHANGE]
    (tmp_path / "forked").mkdir()
    (tmp_path / "fresh").mkdir()
    warm = forked(zygote, argv, environment(), str(tmp_path / "forked"))
    assert warm == fresh(argv, environment(), str(tmp_path / "fresh"))
    assert warm["stdout"] == "EINVAL\n", warm["stderr"]
    # the filter stays in the child: the next command of the zygote is unrestricted
    plain = forked(zygote, ["-c", EXCHANGE], environment(), str(tmp_path / "forked"))
    assert plain["stdout"] == "0\n", plain["stderr"]


@pytest.mark.parametrize("state, message", [
    ("import threading, time; threading.Thread(target=time.sleep, args=(30,), daemon=True).start()", "threads"),
    ("import logging; logging.basicConfig()", "logging"),
])
def test_a_zygote_whose_imports_left_unforkable_state_refuses_to_serve(tmp_path, state, message):
    """A thread (lost in every fork) or logging configured at import time would make forked children differ from
    fresh interpreters: the zygote stops before listening, so the agent falls back to fresh processes."""
    code = f"{state}\nimport sys\nfrom vm.zygote import serve\nserve(sys.argv[1], ())"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "z.sock")], capture_output=True, text=True,
                          cwd=PROJECT, env=environment(), stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr and "ready" not in proc.stdout
    assert not (tmp_path / "z.sock").exists()
