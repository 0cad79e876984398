"""Steps on the machine around the package manager: the ESP and boot entries, the disk, reboots, commands,
upgrades from a repository, and power cuts at a seeded moment."""
from __future__ import annotations

import random
import shutil
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lab.crash.model import Granularity, Model
from lab.steps import StepArgError, StepFailure, StepKind, check_package_keys, register
from lab.steps.faults import InterruptingStep, cut_note
from lab.steps.transactions import Command, TransactionStep
from reference_impl.faults import CUT_ENV_VAR
from reference_impl.stone.repository import write_repository_index
from stonelab.errors import StonelabError


class InjectStep(StepKind):
    """A fault done to the machine through ``target.inject(action)``; /usr is unchanged by it."""

    action: str

    @classmethod
    def run(cls, runner, step, result) -> list:
        action = cls.action_for(step.arg)
        result.command = f"lab.faults {action}"
        result.note = runner.target.inject(action, cls.inject_arg(runner, step.arg))
        return [runner.model.tree()]

    @classmethod
    def action_for(cls, arg) -> str:
        return cls.action

    @classmethod
    def inject_arg(cls, runner, arg) -> str:
        return ""


@register
class BootSync(TransactionStep):
    name = "boot_sync"
    uses_esp = True
    summary = ("`stonelab boot sync` on the target's system disk: systemd-boot, kernels and one Type 1 entry per "
               "state on the ESP, root= from the root partition")
    example = "boot_sync"
    transaction = False  # not interruptible by crash/power_loss; expect_fail takes it

    @classmethod
    def command(cls, runner, arg) -> Command:
        return Command(["boot", "sync"], ["-D", str(runner.target.root), *runner.target.boot_args()],
                       dict(runner.model.installed), plain=True)


@register
class DeleteEsp(InjectStep):
    name = "delete_esp"
    uses_esp = True
    summary = "remove the ESP's entry from the GPT (the partition is gone; its bytes stay)"
    example = "delete_esp"
    action = "delete-esp"


@register
class WipeEsp(InjectStep):
    name = "wipe_esp"
    uses_esp = True
    summary = "zero the first MiB of the ESP: the partition is still there, its FAT filesystem is not"
    example = "wipe_esp"
    action = "wipe-esp"


@register
class Fill(InjectStep):
    name = "fill"
    uses_esp = True
    summary = "fill a filesystem to the last cluster (`esp`, or `root` on the vm target); the next step meets ENOSPC"
    example = "fill: esp"
    arg_type = Literal["esp", "root"]

    @classmethod
    def action_for(cls, arg) -> str:
        return f"fill-{arg}"


@register
class DeleteStateTree(InjectStep):
    name = "delete_state_tree"
    summary = "remove an archived state's tree (`/.moss/root/ID`), leaving its row: a state id or `previous`"
    example = "delete_state_tree: previous"
    arg_type = Annotated[int | Literal["previous"], Field(union_mode="left_to_right")]
    action = "delete-state-tree"

    @classmethod
    def inject_arg(cls, runner, arg) -> str:
        return str(runner.resolve_state(arg))


class RunArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(min_length=1)
    status: int = 0


@register
class Run(StepKind):
    name = "run"
    summary = ("run a shell command in the system under test (working directory and $STONELAB_ROOT: its root); "
               "its exit status must be `status` (default 0)")
    example = "run: {command: 'test -x usr/bin/hello', status: 0}"
    arg_type = RunArgs

    @classmethod
    def describe(cls, arg: RunArgs) -> str:
        return f"run {arg.command!r} (expect exit {arg.status})"

    @classmethod
    def run(cls, runner, step, result) -> list:
        outcome = runner.target.shell(step.arg.command)
        runner.record(result, step.arg.command, outcome)
        if outcome.returncode != step.arg.status:
            raise StepFailure(f"{step.arg.command!r} exited {outcome.returncode}, expected {step.arg.status}")
        return [runner.model.tree()]


@register
class LimitOpenFiles(StepKind):
    name = "limit_open_files"
    summary = ("from now on the package manager runs with at most N open files (RLIMIT_NOFILE, soft and hard: a "
               "container's or a service's low limit); a blit that holds a file descriptor per entry meets EMFILE "
               "(upstream #841)")
    example = "limit_open_files: 16"
    arg_type = Annotated[int, Field(ge=8, le=1 << 20)]

    @classmethod
    def run(cls, runner, step, result) -> list:
        if not hasattr(runner.target, "nofile"):
            raise StepFailure(f"limit_open_files: the {runner.target.kind} target cannot limit open files")
        runner.target.nofile = step.arg
        result.note = f"the package manager runs with RLIMIT_NOFILE {step.arg}:{step.arg}"
        return [runner.model.tree()]


@register
class Reboot(StepKind):
    name = "reboot"
    summary = "a clean restart of the system under test (vm: shutdown, power on; host: nothing to restart)"
    example = "reboot"

    @classmethod
    def run(cls, runner, step, result) -> list:
        result.note = runner.target.reboot()
        return [runner.model.tree()]


@register
class Sync(TransactionStep):
    name = "sync"
    summary = "publish the listed packages (keys) as a repository (`stone.index`) and run `stonelab sync --repo`"
    example = "sync: [hello-2]"
    arg_type = Annotated[list[str], Field(min_length=1)]

    @classmethod
    def check(cls, value, ctx, loc):
        check_package_keys(value, ctx, loc)
        return value

    @classmethod
    def command(cls, runner, arg) -> Command:
        repo = runner.workdir / f"repo-{'-'.join(arg)}"
        repo.mkdir(parents=True, exist_ok=True)
        after = dict(runner.model.installed)
        for key in arg:
            shutil.copy2(runner.packages[key], repo / runner.packages[key].name)
            decl = runner.scenario.packages[key]
            if decl.name in after:
                after[decl.name] = decl
        write_repository_index(repo)
        return Command(["sync"], ["--repo", runner.target.path_for_package(repo)], after)


class PowerLossArgs(BaseModel):
    """Either a cut at a seeded moment (``at: random, seed: S``) during a transaction, or — the crash engine's
    form — ``explore: true``: every crash state of the transaction (lab/crash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    during: Any
    at: Literal["random"] | None = None
    seed: int | None = None  # explore: the seed of the sample when there are more states than max_states
    explore: bool = False
    model: Model | None = None  # what a cut loses: volatile-cache (default) | optimistic
    granularity: Granularity | None = None  # explore only: request (default) | sector
    max_states: Annotated[int, Field(ge=1)] | None = None  # explore only

    @model_validator(mode="after")
    def _one_form(self) -> PowerLossArgs:
        if self.explore and self.at is not None:
            raise ValueError("give either `at: random, seed: S` or `explore: true`, not both")
        if not self.explore and (self.granularity or self.max_states):
            raise ValueError("granularity and max_states belong to the explore form (`explore: true`)")
        if not self.explore and (self.at is None or self.seed is None):
            raise ValueError("needs `at: random` and `seed: S` (or `explore: true`)")
        return self


@register
class PowerLoss(InterruptingStep):
    name = "power_loss"
    summary = ("cut the power during a transaction at a seeded moment that is not a fault point: after the N-th "
               "system call that changes the disk, N drawn from the seed over a calibration run on a copy")
    example = "power_loss: {at: random, seed: 7, during: {install: [hello-2]}}"
    arg_type = PowerLossArgs

    @classmethod
    def describe(cls, arg: PowerLossArgs) -> str:
        how = "every crash state" if arg.explore else f"a random moment (seed {arg.seed})"
        return f"power loss at {how} during {arg.during.describe()}"

    @classmethod
    def run(cls, runner, step, result) -> list:
        arg: PowerLossArgs = step.arg
        if arg.explore:
            from lab.crash.step import run_power_loss
            return run_power_loss(runner, step, result)
        cmd = arg.during.spec.command(runner, arg.during.arg)
        total = runner.target.count_mutations(runner.pm_args(cmd.verb, *cmd.rest))
        moment = random.Random(arg.seed).randint(1, max(total, 1))
        outcome = runner.pm(cmd.verb, *cmd.rest, env={CUT_ENV_VAR: str(moment)}, cut_model=arg.model)
        runner.record(result, f"{CUT_ENV_VAR}={moment} {cmd.text()}", outcome)
        result.note = f"cut after system call {moment} of {total} that change the disk; {cut_note(runner, arg.model, outcome)}"
        if outcome.crashed:
            result.status = "crashed"
            runner.interrupt(cmd.after)
            return runner.interrupted.trees()
        if not outcome.ok:
            raise StepFailure(f"{cmd.text()}: {outcome.summary()}")
        runner.model.installed = cmd.after if cmd.after is not None else runner.model.installed
        return [runner.model.tree()]


@register
class Boot(StepKind):
    name = "boot"
    summary = ("a real boot of the system disk (vm target): OVMF → systemd-boot → the Type 1 entry of `default` "
               "(loader.conf's) or of a state id; the initramfs honours moss.fstx= and reports the state it came up "
               "in, which `boots_into` compares with the one expected")
    example = "boot: {entry: default}"
    uses_esp = True

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        entry: Annotated[int | Literal["default"], Field(union_mode="left_to_right")] = "default"

    arg_type = Args

    @classmethod
    def describe(cls, arg) -> str:
        return f"boot entry {arg.entry}"

    @classmethod
    def run(cls, runner, step, result) -> list:
        from lab.boot_invariants import entry_state, parse_entry
        obs = runner.target.observe(boot=True)
        # entry ids as systemd-boot sees them: the file names, .conf included
        entries = {p.rsplit("/", 1)[-1]: entry_state(parse_entry(t))
                   for p, t in (obs.boot or {}).get("entries", {}).items()}
        default = next((ln.split(None, 1)[1].strip() for ln in ((obs.boot or {}).get("loader_conf") or "").splitlines()
                        if ln.startswith("default ")), None)
        if step.arg.entry == "default":
            name, expected = default, obs.state_id
            if name is not None and name not in entries and f"{name}.conf" in entries:
                name = f"{name}.conf"
        else:
            name = next((n for n, s in entries.items() if s == str(step.arg.entry)), None)
            expected = str(step.arg.entry)
        # a glob default (blsforme's) is systemd-boot's to resolve: the firmware decides which entry it names
        if name not in entries and not (name and any(c in name for c in "*?[")):
            raise StepFailure(f"no boot entry for {step.arg.entry} on the ESP (entries: {sorted(entries) or 'none'})")
        state, fstx, tail = runner.target.boot_entry(name)
        result.command = f"OVMF → systemd-boot → {name}"
        result.output = tail
        result.note = f"the guest came up in state {state or '(none)'} (entry's moss.fstx={fstx})"
        runner.booted = (expected, state, name)
        if state and state.isdigit() and int(state) in runner.model.states:  # the initramfs activated it
            runner.model.installed = dict(runner.model.states[int(state)])
        return [runner.model.tree()]
