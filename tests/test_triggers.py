"""Transaction triggers: the upstream YAML format, pattern captures, ordering, and the namespace sandbox (run for
real as root with busybox as the handler)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference_impl.triggers import (Command, TriggerError, compile_pattern, load_triggers, order_triggers, plan,
                                     run_transaction_triggers)

BUSYBOX = Path("/bin/busybox")
PROBE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "sys.exit(1 if libc.unshare(0x00020000) else (1 if libc.mount(None, b'/', None, 0x4000 | 0x40000, None) else 0))\n"
)


def _sandbox_permitted() -> bool:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True).returncode == 0


needs_sandbox = pytest.mark.skipif(not _sandbox_permitted(),
                                   reason="unshare(CLONE_NEWNS)/mount not permitted here (needs root/CAP_SYS_ADMIN)")
needs_busybox = pytest.mark.skipif(not BUSYBOX.is_file(), reason=f"{BUSYBOX} (busybox-static) is not installed")


class Tree:
    """A target root with a staged usr tree, as a transaction leaves it before the triggers run."""

    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.usr = self.root / ".moss" / "root" / "staging" / "usr"
        self.etc = self.root / "etc"
        (self.usr / "bin").mkdir(parents=True)
        self.etc.mkdir()
        (self.etc / "hostname").write_text("target\n")
        self.tx = self.usr / "share" / "moss" / "triggers" / "tx.d"
        self.tx.mkdir(parents=True)
        if BUSYBOX.is_file():
            shutil.copy2(BUSYBOX, self.usr / "bin" / "busybox")

    @property
    def isolation(self) -> Path:
        return self.root / ".moss" / "root" / "isolation"

    def trigger(self, file: str, text: str) -> Path:
        path = self.tx / file
        path.write_text(textwrap.dedent(text))
        return path

    def file(self, rel: str, content: str = "") -> Path:
        path = self.usr / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        return path

    def shell_trigger(self, name: str, script: str, pattern: str = "/usr/share/marker", *, extra: str = "") -> Path:
        self.file("share/marker")
        body = (f"name: {name}\ndescription: test trigger {name}\n{extra}"
                f"handlers:\n  sh:\n    run: /usr/bin/busybox\n    args: [\"sh\", \"-c\", {json.dumps(script)}]\n"
                f"paths:\n  \"{pattern}\":\n    handlers: [sh]\n")
        return self.trigger(f"{name}.yaml", body)

    def run(self, **kwargs):
        return run_transaction_triggers(self.root, self.usr, **kwargs)


def processes_running(*argv_tails: tuple[str, ...]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = tuple((entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1])
            except OSError:
                continue
            if any(argv[-len(tail):] == tail for tail in argv_tails):
                found.append(int(entry.name))
    return found


def mountpoints() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


# -- format and matching (no sandbox needed) ------------------------------------------------------------------

def test_pattern_dialect() -> None:
    star = compile_pattern("/usr/lib/modules/(version:*)/*")
    match = star.match("/usr/lib/modules/6.6.7-267.current/modules.dep")
    assert match and match["version"] == "6.6.7-267.current"
    assert not star.match("/usr/lib/modules/6.6.7/kernel/net/x.ko"), "* must not cross /"
    assert compile_pattern("/usr/share/fonts/**").match("/usr/share/fonts/a/b/c.ttf")
    assert compile_pattern("/usr/lib*/lib*.so*").match("/usr/lib64/libz.so.1")
    assert not compile_pattern("/usr/lib/libc++.so").match("/usr/lib/libcccc.so"), "literals are escaped"
    assert compile_pattern("/usr/lib/libc++.so").match("/usr/lib/libc++.so")
    assert compile_pattern("/usr/share/info/(item:*.info*)").match("/usr/share/info/grep.info.gz")["item"] == \
        "grep.info.gz"
    for bad in ("/usr/(version*)", "/usr/(v:*", "/usr/a)", "/usr/(1x:*)"):
        with pytest.raises(ValueError):
            compile_pattern(bad)


@given(st.lists(st.sampled_from(list("abz09._-+/[]{}^$|\\ ")), min_size=1, max_size=30).map("".join))
def test_pattern_literals_match_only_themselves(literal: str) -> None:
    regex = compile_pattern(literal)
    assert regex.match(literal)
    assert not regex.match(literal + "x") and not regex.match("x" + literal)


def test_upstream_shaped_file_loads(tree: Tree) -> None:
    # the shape of upstream's test/trigger.yml: before/after, inhibitors, unknown keys (needs) ignored
    tree.trigger("depmod.yaml", """\
        name: depmod
        description: |
            Update kernel module dependencies
        before: some.trigger
        after: other.trigger
        needs: some.trigger
        inhibitors:
            paths: [/etc/ssh/ssh_host_rsa_key]
            environment: [chroot, live]
        handlers:
            depmod:
                run: /sbin/depmod
                args: ["-a", "$(version)"]
        paths:
            "/usr/lib/modules/(version:*)/kernel" :
                handlers:
                    - depmod
                type: directory
        """)
    (trigger,) = load_triggers(tree.usr)
    assert trigger.name == "depmod" and trigger.before == ("some.trigger",) and trigger.after == ("other.trigger",)
    assert trigger.inhibit_paths == ("/etc/ssh/ssh_host_rsa_key",) and trigger.inhibit_environment == ("chroot", "live")
    assert trigger.handlers["depmod"].args == ("-a", "$(version)")
    assert trigger.paths[0].kind == "directory"


def test_captures_type_filter_and_deduplication(tree: Tree) -> None:
    tree.trigger("depmod.yaml", """\
        name: depmod
        description: x
        handlers:
            depmod: {run: /usr/sbin/depmod, args: ["-a", "$(version)"]}
        paths:
            "/usr/lib/modules/(version:*)/*": {handlers: [depmod], type: directory}
        """)
    for version in ("6.1.0", "6.2.0"):
        tree.file(f"lib/modules/{version}/kernel/a.ko")
        tree.file(f"lib/modules/{version}/modules.dep")  # a file: filtered out by type: directory
    tree.file("lib/modules/6.3.0/only-a-file")
    ((trigger, commands),) = plan(tree.root, tree.usr)
    assert commands == [Command("/usr/sbin/depmod", ("-a", "6.1.0")), Command("/usr/sbin/depmod", ("-a", "6.2.0"))]


def test_inhibitor_path_skips_the_trigger(tree: Tree) -> None:
    tree.shell_trigger("inhibited", "true", extra="inhibitors:\n  paths: [/etc/inhibit-me]\n")
    assert len(plan(tree.root, tree.usr)) == 1
    (tree.etc / "inhibit-me").write_text("")
    assert plan(tree.root, tree.usr) == []


@pytest.mark.parametrize("text, needle", [
    ("name: x\ndescription: y\nhandlers: {h: {run: /bin/true}}\npaths:\n  \"/usr/*\": [h\n", "malformed trigger YAML"),
    ("name: x\ndescription: y\nhandlers: {h: {run: /bin/true}}\npaths: {\"/usr/*\": {handlers: [nope]}}\n",
     "undefined handler 'nope'"),
    ("name: x\nhandlers: {h: {run: /bin/true}}\npaths: {\"/usr/*\": {handlers: [h]}}\n", "description"),
    ("name: x\ndescription: y\nhandlers: {h: {run: true}}\npaths: {\"/usr/*\": {handlers: [h]}}\n", "absolute"),
    ("name: x\ndescription: y\nhandlers: {h: {run: /bin/true}}\npaths: {\"/usr/(v*\": {handlers: [h]}}\n", "group"),
    ("name: x\ndescription: y\nhandlers: {h: {run: /bin/true}}\npaths: {\"/usr/*\": {handlers: [h], type: file}}\n",
     "type must be"),
    ("- just\n- a list\n", "mapping"),
])
def test_malformed_trigger_is_one_line_naming_the_file(tree: Tree, text: str, needle: str) -> None:
    tree.file("share/marker")
    path = tree.trigger("broken.yaml", text)
    with pytest.raises(TriggerError) as err:
        tree.run(sandbox=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and needle in message


def test_duplicate_trigger_names_are_refused(tree: Tree) -> None:
    tree.shell_trigger("same", "true")
    tree.trigger("other-file.yaml", (tree.tx / "same.yaml").read_text())
    with pytest.raises(TriggerError, match="trigger name 'same' is already defined"):
        load_triggers(tree.usr)


def test_ordering_by_before_and_after(tree: Tree) -> None:
    tree.trigger("a.yaml", "name: alpha\ndescription: d\nafter: mid\nhandlers: {h: {run: /x}}\n"
                           "paths: {\"/usr/*\": {handlers: [h]}}\n")
    tree.trigger("b.yaml", "name: mid\ndescription: d\nhandlers: {h: {run: /x}}\n"
                           "paths: {\"/usr/*\": {handlers: [h]}}\n")
    tree.trigger("c.yaml", "name: zulu\ndescription: d\nbefore: mid\nafter: ghost\nhandlers: {h: {run: /x}}\n"
                           "paths: {\"/usr/*\": {handlers: [h]}}\n")
    assert [t.name for t in order_triggers(load_triggers(tree.usr))] == ["zulu", "mid", "alpha"]
    tree.trigger("d.yaml", "name: loop\ndescription: d\nbefore: zulu\nafter: alpha\nhandlers: {h: {run: /x}}\n"
                           "paths: {\"/usr/*\": {handlers: [h]}}\n")
    with pytest.raises(TriggerError, match="ordering cycle between alpha, loop, mid, zulu"):
        order_triggers(load_triggers(tree.usr))


def test_no_trigger_directory_runs_nothing(tmp_path: Path) -> None:
    usr = tmp_path / "root" / "usr"
    usr.mkdir(parents=True)
    assert run_transaction_triggers(tmp_path / "root", usr) == []
    assert not (tmp_path / "root" / ".moss").exists()


# -- running in the sandbox -----------------------------------------------------------------------------------

@needs_sandbox
@needs_busybox
def test_trigger_writes_into_staged_usr_and_sandbox_is_cleaned_up(tree: Tree) -> None:
    before = mountpoints()
    tree.shell_trigger("writer", "echo written > /usr/share/from-trigger; ls / > /usr/share/root-listing")
    (run,) = tree.run()
    assert run.exit_status == 0 and run.sandboxed
    assert (tree.usr / "share" / "from-trigger").read_text() == "written\n"
    listing = (tree.usr / "share" / "root-listing").read_text().split()
    assert {"usr", "etc", "bin", "lib", "proc", "dev", "tmp"} <= set(listing)
    assert not tree.isolation.exists()
    assert mountpoints() == before


@needs_sandbox
@needs_busybox
def test_trigger_cannot_write_etc_or_outside_usr(tree: Tree) -> None:
    probe = "stonelab-trigger-probe"
    assert not Path("/etc", probe).exists()
    tree.shell_trigger("etc-writer", f"echo evil > /etc/{probe}")
    with pytest.raises(TriggerError) as err:
        tree.run()
    assert "Read-only file system" in str(err.value)
    assert not Path("/etc", probe).exists() and not (tree.etc / probe).exists()
    assert (tree.etc / "hostname").read_text() == "target\n"
    # the sandbox root itself is read-only too, and /etc shows the target's, not the host's
    tree.shell_trigger("etc-writer", "cat /etc/hostname > /usr/share/seen; echo x > /stray || exit 0; exit 9")
    tree.run()
    assert (tree.usr / "share" / "seen").read_text() == "target\n"
    assert not tree.isolation.exists()


@needs_sandbox
@needs_busybox
def test_handler_cannot_reach_the_host(tree: Tree) -> None:
    script = ("cd /usr/share; busybox ls -A /old_root > old_root; busybox ls /dev > dev; "
              "busybox mkdir -p m; busybox mount -t tmpfs none m 2> mount || echo refused >> mount; "
              "busybox mknod /tmp/disk b 8 0 2> mknod || echo refused >> mknod; "
              "busybox grep -E '^(CapBnd|CapEff)' /proc/self/status > caps; busybox ps -o pid,comm > ps")
    tree.shell_trigger("prisoner", script)
    tree.run()
    out = tree.usr / "share"
    assert (out / "old_root").read_text() == ""
    assert sorted((out / "dev").read_text().split()) == ["full", "null", "random", "tty", "urandom", "zero"]
    assert (out / "mount").read_text().strip().endswith("refused")
    assert (out / "mknod").read_text().strip().endswith("refused")
    caps = dict(line.split(":") for line in (out / "caps").read_text().splitlines())
    for cap in (21, 16, 27, 18):  # SYS_ADMIN, SYS_MODULE, MKNOD, SYS_CHROOT
        assert not int(caps["CapBnd"].strip(), 16) & (1 << cap)
        assert not int(caps["CapEff"].strip(), 16) & (1 << cap)
    pids = [line.split()[0] for line in (out / "ps").read_text().splitlines()[1:]]
    assert "1" in pids and len(pids) <= 4, "a PID namespace of its own: the host's processes are not visible"


@needs_sandbox
@needs_busybox
def test_failing_trigger_raises_with_name_command_status_and_stderr(tree: Tree) -> None:
    before = mountpoints()
    path = tree.shell_trigger("broken", "echo first >&2; echo the-last-words >&2; exit 3")
    with pytest.raises(TriggerError) as err:
        tree.run()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"trigger broken ({path}): /usr/bin/busybox sh -c ")
    assert message.endswith("exited 3: the-last-words")
    assert not tree.isolation.exists() and mountpoints() == before


@needs_sandbox
@needs_busybox
def test_captures_are_substituted_into_args_when_run(tree: Tree) -> None:
    tree.trigger("depmod.yaml", """\
        name: depmod
        description: records each kernel version once
        handlers:
            record:
                run: /usr/bin/busybox
                args: ["sh", "-c", "echo $(version) >> /usr/lib/modules/seen"]
        paths:
            "/usr/lib/modules/(version:*)/kernel/*":
                handlers: [record]
        """)
    for version in ("6.1.0-1.lts", "6.9.2-7.desktop"):
        for module in ("a.ko", "b.ko", "c.ko"):
            tree.file(f"lib/modules/{version}/kernel/{module}")
    runs = tree.run()
    assert [r.command.args[-1] for r in runs] == ["echo 6.1.0-1.lts >> /usr/lib/modules/seen",
                                                   "echo 6.9.2-7.desktop >> /usr/lib/modules/seen"]
    assert (tree.usr / "lib/modules/seen").read_text().split() == ["6.1.0-1.lts", "6.9.2-7.desktop"]


@needs_sandbox
@needs_busybox
def test_triggers_run_in_before_after_order(tree: Tree) -> None:
    tree.shell_trigger("alpha", "echo alpha >> /usr/share/order", extra="after: mid\n")
    tree.shell_trigger("mid", "echo mid >> /usr/share/order")
    tree.shell_trigger("zulu", "echo zulu >> /usr/share/order", extra="before: mid\n")
    assert [r.trigger for r in tree.run()] == ["zulu", "mid", "alpha"]
    assert (tree.usr / "share" / "order").read_text().split() == ["zulu", "mid", "alpha"]


@needs_sandbox
def test_delete_handler_removes_inside_usr_only(tree: Tree) -> None:
    tree.file("lib/cache/stale/a")
    tree.file("lib/cache/keep")
    outside = tree.root / "outside"
    outside.write_text("keep me")
    os.symlink("../../../../../outside", tree.usr / "lib" / "escape")
    tree.trigger("clean.yaml", """\
        name: clean
        description: removes stale caches
        handlers:
            wipe: {delete: ["/usr/lib/cache/$(what)"]}
        paths:
            "/usr/lib/cache/(what:stale)": {handlers: [wipe], type: directory}
        """)
    (run,) = tree.run()
    assert run.exit_status == 0
    assert not (tree.usr / "lib/cache/stale").exists() and (tree.usr / "lib/cache/keep").exists()
    # a symlink cannot lead a delete out of /usr, and paths outside /usr are refused
    for target, complaint in (("/usr/lib/escape/x", "leads outside /usr through a symlink"),
                              ("/etc/hostname", "not a path inside /usr")):
        tree.trigger("clean.yaml", f"""\
            name: clean
            description: tries to leave /usr
            handlers:
                wipe: {{delete: ["{target}"]}}
            paths:
                "/usr/lib/cache/keep": {{handlers: [wipe]}}
            """)
        with pytest.raises(TriggerError, match=complaint):
            tree.run()
    assert outside.read_text() == "keep me" and (tree.etc / "hostname").exists()


@needs_sandbox
@needs_busybox
def test_timeout_kills_the_whole_sandbox(tree: Tree) -> None:
    tree.shell_trigger("sleeper", "busybox sleep 3017 & busybox sleep 3018")
    started = time.monotonic()
    with pytest.raises(TriggerError, match="timed out after 1s"):
        tree.run(timeout=1)
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leftovers = processes_running(("sleep", "3017"), ("sleep", "3018"))
        if not leftovers:
            break
        time.sleep(0.1)
    assert not leftovers, "the handler's processes outlived the timeout"
    assert not tree.isolation.exists()


@needs_busybox
def test_without_mount_permission_it_is_a_one_line_error(tree: Tree) -> None:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop CAP_SYS_ADMIN for the check")
    tree.shell_trigger("writer", "echo written > /usr/share/from-trigger")
    script = ("import sys\nfrom pathlib import Path\nfrom reference_impl.triggers import *\n"
              "try:\n    run_transaction_triggers(Path(sys.argv[1]), Path(sys.argv[2]))\n"
              "except TriggerError as err:\n    print(err); sys.exit(2)\n")
    proc = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", sys.executable, "-c",
                           script, str(tree.root), str(tree.usr)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    message = proc.stdout.strip()
    assert "\n" not in message and message.startswith("trigger writer (")
    assert "cannot build the sandbox" in message and "needs root or CAP_SYS_ADMIN" in message
    assert not (tree.usr / "share" / "from-trigger").exists()
    assert not tree.isolation.exists()


@needs_busybox
def test_unsandboxed_mode_runs_from_the_staged_tree(tree: Tree) -> None:
    tree.shell_trigger("direct", "pwd > usr/share/cwd")
    (run,) = tree.run(sandbox=False)
    assert not run.sandboxed and run.exit_status == 0
    assert Path((tree.usr / "share" / "cwd").read_text().strip()) == tree.usr.parent
    assert not tree.isolation.exists()
