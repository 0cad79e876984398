"""OSTree 2022.7 (Debian ``ostree``) as a system under test: a sysroot on the SUT disk, deployments, boot entries.

Layout on the root (``ostree admin init-fs ROOT``; ``os-init`` of the OS ``lab``): the repository
``ROOT/ostree/repo`` (bare mode), deployments ``ROOT/ostree/deploy/lab/deploy/<checksum>.<serial>`` (their
``usr/`` is the generation's tree), boot entries in ``ROOT/boot/loader.{0,1}/entries/ostree-*.conf`` chosen by the
``ROOT/boot/loader`` symlink, which OSTree replaces by ``rename(2)`` to switch the whole entry set at once (the
"bootloader swap"; ostree docs, "Atomic upgrades"). ``sysroot.bootloader none``: no bootloader configuration is
written, the entries are the promise.

Commits are built offline on the lab's side into a source repository (``archive`` mode, like a remote) from the
packages' tree plus what ``admin deploy`` needs: a kernel at ``usr/lib/modules/<kver>/vmlinuz`` and
``usr/lib/os-release``. The operation proper is ``ostree pull-local SOURCE BRANCH`` into the sysroot's repository
and ``ostree admin deploy`` (what ``ostree admin upgrade`` does after a pull).

OSTree 2022.7's CLI has no way to reorder deployments (``set-default`` came later; rpm-ostree does it through
the library), so ``switch`` is not offered and ``rollback`` is ``admin undeploy 0``: the previous deployment
becomes the default, with a new entry set and a loader swap. Deployment directories are immutable
(``chattr +i``); :func:`remove_root` clears that before deleting a root.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from lab.faults import corrupt_largest_file
from lab.invariants import Violation
from lab.packages import PackageDecl
from lab.probe import walk
from lab.systems.base import (CommandRunner, Generation, Operation, RootedSystem, SetupError, SystemState, require,
                              run_local, run_sequence, write_tree)
from lab.target import CommandResult

OS_NAME = "lab"
BRANCH = "lab/x86_64/system"
KERNEL_VERSION = "6.1.0-stonelab"
# files the lab adds to every commit so that `admin deploy` accepts it; not part of any package
SCAFFOLDING = {f"lib/modules/{KERNEL_VERSION}/vmlinuz": f"stonelab test kernel {KERNEL_VERSION}\n",
               "lib/os-release": "ID=lab\nNAME=stonelab\nVERSION_ID=1\n"}
_OSTREE_ARG = re.compile(r"(?:^|\s)ostree=(\S+)")

INVARIANTS = ("ostree_fsck", "ostree_status", "ostree_loader_complete")
# what each invariant checked when it held (the report's evidence)
EVIDENCE = {"ostree_fsck": "ostree fsck: every object of every commit matches its checksum",
            "ostree_status": "ostree admin status exit 0",
            "ostree_loader_complete": "boot/loader names loader.0|1 with one entry per deployment; every entry's "
                                      "linux/initrd exists and its ostree= leads to a deployment"}


class OstreeSystem(RootedSystem):
    """OSTree on ``root`` (the sysroot); ``workdir`` (on this machine; read-only is enough where the operations
    run) holds the source repository and the trees; ``scratch`` is unused (OSTree keeps no per-user state)."""

    name = "ostree"
    operations = frozenset(Operation) - {Operation.SWITCH}
    invariant_names = INVARIANTS
    evidence = EVIDENCE

    def __init__(self, root: Path, workdir: Path, run: CommandRunner = run_local, *, scratch: Path | None = None):
        super().__init__(root, workdir, run)
        self.source = workdir / "source-repo"
        self.repo = root / "ostree" / "repo"

    # --- set-up ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check(run_sequence(self.run, [
            ["ostree", "admin", "init-fs", str(self.root)],
            ["ostree", "admin", f"--sysroot={self.root}", "os-init", OS_NAME],
            ["ostree", f"--repo={self.repo}", "config", "set", "sysroot.bootloader", "none"],
        ]), "prepare")
        self._check(run_local(["ostree", "init", f"--repo={self.source}", "--mode=archive"]), "init")

    def stage(self, result: Sequence[PackageDecl]) -> str:
        """Commit the tree holding ``result`` (plus the kernel scaffolding) to the source repository's branch;
        returns the commit checksum."""
        base = self.new_tree_dir()
        usr = write_tree(base / "usr", result)
        (usr / "etc").mkdir(exist_ok=True)  # the default /etc a deployment's /etc merge starts from
        for rel, content in SCAFFOLDING.items():
            (usr / rel).parent.mkdir(parents=True, exist_ok=True)
            (usr / rel).write_text(content)
        committed = run_local(["ostree", f"--repo={self.source}", "commit", "-b", BRANCH, f"--tree=dir={base}",
                               "--subject", f"lab generation {base.name}"])
        self._check(committed, "commit")
        return committed.stdout.strip().splitlines()[-1]

    # --- operations -----------------------------------------------------------------------------------------
    def install(self, added: Sequence[PackageDecl], result: Sequence[PackageDecl]) -> CommandResult:
        return self.deploy(self.stage(result))

    def remove(self, names: Sequence[str], result: Sequence[PackageDecl]) -> CommandResult:
        return self.deploy(self.stage(result))

    def deploy(self, commit: str) -> CommandResult:
        """The upgrade proper: pull ``commit`` into the sysroot's repository, deploy it as the new default.
        By checksum, not by branch: a guest reading the source repository over a caching 9p mount could see a
        stale branch ref, never a stale new object."""
        return run_sequence(self.run, [
            ["ostree", f"--repo={self.repo}", "pull-local", str(self.source), commit],
            ["ostree", "admin", f"--sysroot={self.root}", "deploy", f"--os={OS_NAME}", commit],
        ])

    def switch(self, number: int) -> CommandResult:
        require(self, Operation.SWITCH)
        raise AssertionError("unreachable")  # pragma: no cover

    def rollback(self, state: SystemState | None = None) -> CommandResult:
        return self.run(["ostree", "admin", f"--sysroot={self.root}", "undeploy", "0"])

    def gc(self, keep: int, state: SystemState | None = None) -> CommandResult:
        count = len((state or self.state()).generations)
        steps = [["ostree", "admin", f"--sysroot={self.root}", "undeploy", str(index)]
                 for index in range(count - 1, max(keep, 1) - 1, -1)]
        steps += [["ostree", "admin", f"--sysroot={self.root}", "cleanup"],
                  ["ostree", f"--repo={self.repo}", "prune", "--refs-only"]]
        return run_sequence(self.run, steps)

    def verify(self) -> CommandResult:
        return self.run(["ostree", "fsck", f"--repo={self.repo}"])

    def recover(self) -> CommandResult:
        """``ostree admin cleanup``: OSTree's own recovery from an interrupted deploy — it deletes deployment
        directories no entry of the current boot loader set names and the other entry set (a deploy checks out
        the new deployment before it writes the entries and swaps ``boot/loader``); every ``admin deploy`` runs
        it first (ostree-sysroot-cleanup.c: ``ostree_sysroot_cleanup``)."""
        return self.run(["ostree", "admin", f"--sysroot={self.root}", "cleanup"])

    def corrupt_store(self) -> str:
        """Flip the first byte of the largest content object of the repository (hard-linked into the
        deployments); returns its path relative to the root."""
        return corrupt_largest_file(self.repo / "objects", self.root, "*.file")

    def cleanup(self) -> None:
        """Delete the sysroot (see :func:`remove_root`): its deployments are immutable."""
        remove_root(self.root, self.run)

    def status(self) -> CommandResult:
        return self.run(["ostree", "admin", f"--sysroot={self.root}", "status"])

    # --- reading the state ----------------------------------------------------------------------------------
    def entries(self) -> tuple[Path | None, list[tuple[int, Path, dict[str, str]]], list[str]]:
        """The entry set ``boot/loader`` names: (its directory, [(version, file, keys)] newest first — the
        default first —, problems)."""
        loader = self.root / "boot" / "loader"
        if not loader.is_symlink():
            return None, [], ([] if not self._deployed() else ["boot/loader is not a symlink"])
        target = os.readlink(loader)
        if target not in ("loader.0", "loader.1"):
            return None, [], [f"boot/loader -> {target}, not loader.0 or loader.1"]
        entries_dir = loader.parent / target / "entries"
        if not entries_dir.is_dir():
            return None, [], [f"boot/{target}/entries is missing"]
        entries, problems = [], []
        for conf in sorted(entries_dir.glob("*.conf")):
            keys = _parse_entry(conf.read_text(errors="replace"))
            version = keys.get("version", "")
            if not version.isdigit():
                problems.append(f"boot/{target}/entries/{conf.name}: version {version!r} is not a number")
                continue
            entries.append((int(version), conf, keys))
        entries.sort(key=lambda e: -e[0])
        if not entries and self._deployed():
            problems.append(f"boot/{target}/entries holds no entry, but deployments exist")
        return entries_dir, entries, problems

    def state(self) -> SystemState:
        state = SystemState()
        _dir, entries, problems = self.entries()
        state.problems += problems
        for index, (_version, conf, keys) in enumerate(entries):
            deployment, problem = self._deployment_of(keys)
            if problem:
                state.problems.append(f"{conf.name}: {problem}")
                continue
            state.generations.append(Generation(index, deployment.name))
        if state.generations and state.generations[0].number == 0:
            state.current = 0
            usr = self.deploy_dir() / state.generations[0].ref / "usr"
            state.tree = {rel: value for rel, value in walk(usr).items() if rel not in SCAFFOLDING}
        return state

    def deploy_dir(self) -> Path:
        return self.root / "ostree" / "deploy" / OS_NAME / "deploy"

    def _deployed(self) -> bool:
        return self.deploy_dir().is_dir() and any(self.deploy_dir().iterdir())

    def _deployment_of(self, keys: dict[str, str]) -> tuple[Path, str]:
        match = _OSTREE_ARG.search(keys.get("options", ""))
        if not match:
            return Path(), "no ostree= argument in options"
        link = self.root / match[1].lstrip("/")
        resolved = Path(os.path.realpath(link))
        if not resolved.is_relative_to(self.deploy_dir()) or not (resolved / "usr").is_dir():
            return Path(), f"ostree={match[1]} does not lead to a deployment"
        return resolved, ""

    # --- invariants -----------------------------------------------------------------------------------------
    def invariants(self, state: SystemState) -> list[Violation]:
        if not self.repo.is_dir():
            return [Violation("ostree_status", "ostree/repo is missing")]
        violations = []
        fsck = self.verify()
        if not fsck.ok:
            violations.append(Violation("ostree_fsck", f"ostree fsck: {fsck.summary()}"))
        status = self.status()
        if not status.ok:
            violations.append(Violation("ostree_status", f"ostree admin status: {status.summary()}"))
        violations += [Violation("ostree_loader_complete", p) for p in self._loader_problems(state)]
        return violations

    def _loader_problems(self, state: SystemState) -> list[str]:
        problems = list(state.problems)
        _dir, entries, _ = self.entries()
        for _version, conf, keys in entries:
            for key in ("linux", "initrd"):
                if key in keys and not (self.root / "boot" / keys[key].lstrip("/")).is_file():
                    problems.append(f"{conf.name}: {key} {keys[key]} is missing")
        deployments = sorted(p.name for p in self.deploy_dir().iterdir() if p.is_dir()) \
            if self.deploy_dir().is_dir() else []
        if entries and len(entries) != len(deployments):
            problems.append(f"{len(entries)} boot entries but {len(deployments)} deployments "
                            f"({', '.join(d[:12] for d in deployments)})")
        return problems

    @staticmethod
    def _check(result: CommandResult, what: str) -> None:
        if not result.ok:
            raise SetupError(f"ostree {what}: {result.summary()}")


def _parse_entry(text: str) -> dict[str, str]:
    keys = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            keys[key] = value.strip()
    return keys


def remove_root(root: Path, run: CommandRunner = run_local) -> None:
    """Delete an OSTree sysroot: deployment directories carry the immutable flag, which is cleared first."""
    deploy = root / "ostree" / "deploy"
    if deploy.is_dir():
        immutable = [str(p) for p in deploy.glob("*/deploy/*") if p.is_dir() and not p.is_symlink()]
        if immutable:
            run(["chattr", "-i", *immutable])
    shutil.rmtree(root, ignore_errors=True)
