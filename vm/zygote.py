"""A warm fork server ("zygote") for the guest's Python commands.

Every guest command of the lab — a ``stonelab`` verb, the probe, the crash job's helpers — is ``python -m
MODULE ARGS`` or ``python -c CODE ARGS``, and under TCG a fresh interpreter spends ~3.5 s starting and importing
before it does anything.  The zygote imports the lab's modules once (``WARM_MODULES``) and forks one process per
command, which starts with the request's argv, environment, working directory and standard streams exactly as a
fresh ``python`` would, and whose exit status (code, or -N for signal N) comes back like a child's.  The agent
starts it on the first ``run`` request marked ``warm`` (``vm.snapshot`` does that before it saves a guest, so
every restored guest has it warm) and falls back to a fresh process for what it cannot serve
(``serves_fresh_equivalent``).

Why a forked child behaves like a fresh interpreter (audited):

* every module of the lab reads the environment when a function runs, not at import (``STONELAB_FAULT``,
  ``STONELAB_CUT`` — whose audit hook ``reference_impl.cli`` installs in ``main`` —, ``STONELAB_MUTANT``,
  the ``--personality`` seccomp filter, which ``lab.kernel.emulate`` installs in ``main`` before it execs);
  the child's ``os.environ`` is replaced by the request's (``putenv``/``unsetenv`` included, so programs it
  starts inherit it);
* what the interpreter reads from the environment at start (``PYTHON*``, the locale: ``LANG``, ``LC_*``) must be
  the zygote's own, or the request goes to a fresh process; so must the interpreter itself (``argv[0]``), and
  only ``-m`` and ``-c`` are served;
* ``random`` reseeds itself in a forked child (``os.register_at_fork``); string hashes keep the zygote's seed
  (PYTHONHASHSEED is random per process anyway, so nothing may depend on it);
* no module configures logging, opens an SQLite connection or starts a thread at import (the zygote checks for
  threads and logging handlers before it serves), and the zygote writes nothing to its standard streams;
* signal dispositions are reset to a fresh interpreter's (SIGINT → KeyboardInterrupt, SIGPIPE and SIGXFSZ
  ignored, everything else default), ``sys.argv``/``sys.path[0]`` are set as ``-m``/``-c`` set them, and at the end
  atexit handlers run and the streams are flushed, then ``os._exit`` with the status a fresh interpreter would
  return (SystemExit's code, 1 and the traceback on stderr for an uncaught exception).

Protocol (AF_UNIX stream socket): the client sends one JSON line ``{"argv", "env", "cwd"}`` with the command's
stdin, stdout and stderr as SCM_RIGHTS file descriptors; the zygote answers ``{"pid": N}`` (the command's
process, which the client may SIGKILL on a timeout), then ``{"status": S}`` when it ended.  A waiter process per
command (forked from the zygote, the command's parent) reports the status, so the zygote itself never blocks.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

SOCKET = "/run/stonelab-zygote.sock"
WARM_MODULES = ("argparse", "stonelab.cli", "reference_impl.cli", "reference_impl.client", "reference_impl.verify",
                "reference_impl.boot.cli", "lab.probe", "lab.faults", "lab.crash.materialize",
                "lab.systems.crashcheck", "lab.kernel.emulate")
START_ENV_PREFIXES = ("PYTHON", "LC_")
START_ENV_NAMES = ("LANG", "LANGUAGE", "PATH")  # PATH: where the interpreter found its prefix at start


def start_environment(env: dict[str, str]) -> dict[str, str]:
    """The part of ``env`` an interpreter reads when it starts (and a forked child therefore cannot change)."""
    return {k: v for k, v in env.items() if k.startswith(START_ENV_PREFIXES) or k in START_ENV_NAMES}


def serves_fresh_equivalent(argv: list[str], env: dict[str, str], executable: str,
                            zygote_env: dict[str, str]) -> bool:
    """True when a child forked from a zygote started as ``executable`` with ``zygote_env`` runs ``argv`` exactly
    as a fresh process would: ``argv`` is ``[executable, -m MODULE | -c CODE, ARGS…]`` and the start-up
    environment is the same."""
    return (len(argv) >= 3 and argv[1] in ("-m", "-c") and os.path.realpath(argv[0]) == os.path.realpath(executable)
            and start_environment(env) == start_environment(zygote_env))


# -- the client (the agent) ----------------------------------------------------------------------------------------

class Zygote:
    """The agent's handle on its zygote: started on the first ``run`` (``start_timeout`` seconds to import the
    lab's modules), started again once if it died; when it cannot be started, every command runs fresh."""

    def __init__(self, executable: str, path: str = SOCKET, start_timeout: float = 600.0):
        self.executable = executable
        self.path = path
        self.start_timeout = start_timeout
        self.env = dict(os.environ)  # the zygote's start-up environment (it inherits the agent's)
        self.process = None
        self.broken: str | None = None  # why the zygote cannot serve (then every command runs fresh)

    def _start(self) -> bool:
        import select
        import subprocess

        if self.process is not None and self.process.poll() is None:
            return True
        try:
            log = open(self.path + ".log", "ab")
        except OSError as err:
            self.broken = f"cannot start: {err}"
            return False
        try:
            # its stdin is a pipe the agent never writes: end of file there means the agent is gone
            self.process = subprocess.Popen([self.executable, "-m", "vm.zygote", self.path], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, env=self.env,
                                            start_new_session=True)
        except OSError as err:
            self.broken = f"cannot start: {err}"
            return False
        finally:
            log.close()
        ready, _, _ = select.select([self.process.stdout], [], [], self.start_timeout)
        line = self.process.stdout.readline() if ready else b""
        self.process.stdout.close()
        if line != b"ready\n":
            self.process.kill()
            self.process.wait()
            self.broken = f"did not start (see {self.path}.log)"
            return False
        return True

    def run(self, argv: list[str], env: dict[str, str], cwd: str | None,
            timeout: float | None) -> dict[str, object] | None:
        """Run ``argv`` forked from the zygote: the agent's ``run`` answer (exit_code, stdout, stderr, seconds,
        timed_out: SIGKILLed after ``timeout`` seconds, exit code -9), or None when the zygote cannot serve it
        exactly as a fresh process would (the caller then starts one)."""
        if self.broken or not serves_fresh_equivalent(argv, env, self.executable, self.env):
            return None
        for _attempt in range(2):
            if not self._start():
                return None
            try:
                return self._request(argv, env, cwd, timeout)
            except ConnectionError:
                self.process.kill()  # the zygote died or hangs: start it again once
                self.process.wait()
        return None

    def _request(self, argv: list[str], env: dict[str, str], cwd: str | None,
                 timeout: float | None) -> dict[str, object]:
        import select
        import time

        started = time.monotonic()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
        except OSError as err:
            conn.close()
            raise ConnectionError(str(err)) from None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            socket.send_fds(conn, [json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n"],
                            [null, out_w, err_w])
        finally:
            for fd in (null, out_w, err_w):
                os.close(fd)
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        control = b""
        open_fds = [out_r, err_r, conn.fileno()]
        deadline = None if timeout is None else started + timeout
        timed_out = False
        try:
            while open_fds:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select(open_fds, [], [], wait)
                if not ready:
                    pid = _answer(control).get("pid")
                    if pid is None:
                        raise ConnectionError("the zygote did not start the command")
                    os.kill(pid, signal.SIGKILL)
                    timed_out, deadline = True, None
                    continue
                for fd in ready:
                    data = os.read(fd, 1 << 16)
                    if not data:
                        open_fds.remove(fd)
                    elif fd == conn.fileno():
                        control += data
                    else:
                        chunks[fd].append(data)
        finally:
            os.close(out_r)
            os.close(err_r)
            conn.close()
        answer = _answer(control)
        if "pid" not in answer:
            raise ConnectionError("the zygote closed the connection before starting the command")
        stdout, stderr = (b"".join(chunks[fd]).decode("utf-8", "replace") for fd in (out_r, err_r))
        if timed_out:
            return {"exit_code": -9, "stdout": stdout, "stderr": stderr, "timed_out": True,
                    "seconds": time.monotonic() - started, "forked": True}
        if "status" not in answer:
            stderr += "\nstonelab zygote: the command's waiter ended without its exit status"
        return {"exit_code": answer.get("status", 255), "stdout": stdout, "stderr": stderr,
                "seconds": time.monotonic() - started, "forked": True}


def _answer(control: bytes) -> dict:
    answer: dict = {}
    for line in control.splitlines():
        answer.update(json.loads(line))
    return answer


# -- the server (guest) ---------------------------------------------------------------------------------------------

def _fresh_signals() -> None:
    for number in range(1, signal.NSIG):
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            continue  # SIGKILL, SIGSTOP and the real-time signals Python does not manage
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _exit_code(err: SystemExit) -> int:
    code = err.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_command(request: dict, fds: list[int]) -> int:
    """In the forked child: become the requested interpreter and run it; the exit status."""
    import runpy
    import traceback
    import types

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"] or "/")
    os.environ.clear()
    os.environ.update(request["env"])
    option, payload, *args = request["argv"][1:]
    try:
        try:
            if option == "-m":
                sys.argv = ["-m", *args]  # runpy puts the module's file in argv[0], as `python -m` does
                sys.path[0] = os.getcwd()
                # a fresh `python -m M` has not imported M under its own name: neither may the child (runpy
                # would warn, and M's code must run as __main__ only)
                sys.modules.pop(payload, None)
                runpy.run_module(payload, run_name="__main__", alter_sys=True)
            else:
                sys.argv = ["-c", *args]
                sys.path[0] = ""
                main = types.ModuleType("__main__")
                sys.modules["__main__"] = main
                exec(compile(payload, "<string>", "exec"), main.__dict__)
            code = 0
        except SystemExit as err:
            code = _exit_code(err)
        except BaseException as err:  # noqa: BLE001 - what a fresh interpreter does with an uncaught exception
            traceback.print_exception(type(err), err, _command_frames(err.__traceback__))
            code = 1
        import atexit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                code = 120  # as Python when it cannot flush stdout at exit
    return code


def _command_frames(tb):
    """The traceback from the command's first frame on (the zygote's and runpy's own frames dropped)."""
    while tb is not None and (tb.tb_frame.f_code.co_filename == __file__
                              or "runpy" in tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def _waiter(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked waiter: fork the command, report its pid, wait for it, report its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _fresh_signals()
        status = 1
        try:
            status = _run_command(request, fds)
        finally:
            os._exit(status)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        data += more
    return json.loads(data), fds


def _check_forkable() -> None:
    import logging
    import threading

    if threading.active_count() != 1:
        raise RuntimeError(f"zygote: {threading.active_count()} threads after the imports; forking is unsafe")
    if logging.getLogger().handlers:
        raise RuntimeError("zygote: logging was configured at import time")


def serve(path: str = SOCKET, modules: tuple[str, ...] = WARM_MODULES) -> None:
    """Import ``modules``, listen on ``path``, print ``ready`` on stdout, then fork a waiter per connection, until
    its stdin ends (the agent that started it is gone)."""
    import importlib
    import select

    for name in modules:
        importlib.import_module(name)
    _check_forkable()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped by the kernel
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # nothing the zygote holds may keep the agent's pipe open
    os.close(devnull)
    while True:
        ready, _, _ = select.select([listener, 0], [], [])
        if 0 in ready and not os.read(0, 1 << 10):
            break
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            try:
                _waiter(conn, request, fds)
            finally:
                os._exit(0)
        conn.close()
        for fd in fds:
            os.close(fd)
    listener.close()
    os.unlink(path)


if __name__ == "__main__":
    serve(*sys.argv[1:2])
