"""``boot_entries_valid`` and what the firmware would boot, judged on the ESP as read from the system disk."""
from __future__ import annotations

from lab.invariants import CheckContext, Invariant, Outcome, register

ROOT_PARTITION = 2  # vm.disk puts the root filesystem in GPT partition 2 on every lab disk


def parse_entry(text: str) -> dict[str, list[str]]:
    """A Type 1 entry's keys (Boot Loader Specification: ``key value`` lines, ``#`` comments)."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _sep, value = line.partition(" ")
            fields.setdefault(key, []).append(value.strip())
    return fields


def entry_state(fields: dict[str, list[str]]) -> str | None:
    options = " ".join(fields.get("options", []))
    return next((w.removeprefix("moss.fstx=") for w in options.split() if w.startswith("moss.fstx=")), None)


@register
class BootEntriesValid(Invariant):
    name = "boot_entries_valid"
    summary = ("every Type 1 entry's files exist on the ESP, its root= names the root partition's PARTUUID, its "
               "moss.fstx= a state with a tree; loader.conf's default is an exact entry booting the active state "
               "(right after a crash: a state that still has a tree)")

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        boot, obs = ctx.obs.boot, ctx.obs
        if boot is None:
            return Outcome((), "the scenario manages no ESP")
        if boot["problem"]:
            return Outcome((), f"nothing to boot from: {boot['problem']}")
        files = {f.casefold() for f in boot["files"]}
        root_uuids = {u for u, n in boot["partuuids"].items() if n == ROOT_PARTITION}
        with_tree = {str(s) for s in obs.db_states if str(s) == obs.state_id or str(s) in obs.archived}
        problems, booting = [], {}
        for path, text in sorted(boot["entries"].items()):
            fields = parse_entry(text)
            name = path.rsplit("/", 1)[-1].removesuffix(".conf")
            for key in ("linux", "initrd"):
                for ref in fields.get(key, []):
                    if ref.lstrip("/").casefold() not in files:
                        problems.append(f"{path}: {key} {ref} is not on the ESP")
            roots = [w.removeprefix("root=PARTUUID=").lower() for o in fields.get("options", [])
                     for w in o.split() if w.startswith("root=")]
            if len(roots) != 1 or roots[0] not in root_uuids:
                problems.append(f"{path}: root= {roots or 'missing'} is not the root partition's PARTUUID "
                                f"{sorted(root_uuids)}")
            state = entry_state(fields)
            if state not in with_tree:
                problems.append(f"{path}: moss.fstx={state} names no state with a tree (upstream #585)")
            booting[name] = state
        default = None
        for line in (boot["loader_conf"] or "").splitlines():
            key, _sep, value = line.strip().partition(" ")
            if key == "default":
                default = value.strip().strip('"').removesuffix(".conf")
        if obs.state_id and obs.db_states and (ctx.strict_boot or booting):
            if default is None:
                problems.append("loader.conf names no default entry")
            elif any(c in default for c in "*?["):
                problems.append(f"loader.conf default {default!r} is a glob: the boot loader picks the highest "
                                "version, not the active state (upstream #586)")
            elif default not in booting:
                problems.append(f"loader.conf default {default!r} is not an entry on the ESP")
            elif ctx.strict_boot and booting[default] != obs.state_id:
                problems.append(f"the default entry {default} boots state {booting[default]}, not the active "
                                f"state {obs.state_id} (booting reverts silently)")
        evidence = (f"{len(booting)} entries on {boot['esp']}, default {default} → state "
                    f"{booting.get(default or '')}, every kernel/initrd present, root= PARTUUID of partition "
                    f"{ROOT_PARTITION}")
        return Outcome(tuple(problems), evidence)


@register
class BootsInto(Invariant):
    name = "boots_into"
    summary = "after a real boot (`boot` step) the guest reports the state expected: the active one for the default entry, the entry's state otherwise"

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        if ctx.booted is None:
            return Outcome((), "no boot in this step")
        expected, reported, entry = ctx.booted
        if reported != expected:
            return Outcome((f"booting {entry} brought up state {reported or '(none)'}, expected {expected}",), "")
        return Outcome((), f"booting {entry} brought up state {reported}, as expected")
