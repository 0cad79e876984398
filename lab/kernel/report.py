"""`stonelab compat report|verify`: the porter's report — operations × kernel profiles, every gap with its
consequence, workaround, evidence and whether the lab verified the workaround — in Markdown, HTML and JSON.

A workaround is *verified* when ``stonelab compat verify --profile P`` ran the scenarios that exercise it on the
Linux guest under ``--personality P`` (the profile's seccomp filter and root filesystem) with the VM target's
power-loss model (QEMU SIGKILLed at the fault point, no periodic writeback, only what was flushed survives) and
they passed; the record is ``compat/verified/<profile>.json`` with the scenarios' verdicts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader

from lab.kernel.gaps import Gap, analyse
from lab.kernel.profile import PROJECT, KernelProfile, load_profile
from lab.kernel.trace import Trace, default_requirements, load_requirements
from stonelab.errors import StonelabError

VERIFIED_DIR = PROJECT / "compat" / "verified"
TEMPLATES = Path(__file__).resolve().parent / "templates"
POWER_LOSS_MODEL = ("Linux guest under the profile's seccomp filter and root filesystem; power cut = QEMU SIGKILLed "
                    "at the fault point, no periodic writeback, only what was flushed survives")
# workaround id → the scenarios whose passing under --personality shows it works
VERIFIED_BY: dict[str, tuple[str, ...]] = {
    "swap-symlink": ("install-upgrade-rollback", "symlink-swap-rollback"),
    "tmpfile-fallback": ("install-upgrade-rollback",),
    "syncfs": ("reference-survives-power-cut", "power-loss-during-upgrade"),
}
DEFAULT_VERIFY_SCENARIOS = ("install-upgrade-rollback", "reference-survives-power-cut")


@dataclass
class Verification:
    """What ``compat verify`` saw: scenario name → (verdict, reason)."""

    profile: str
    model: str
    scenarios: dict[str, tuple[str, str]]

    def verified(self, workaround_id: str) -> list[str]:
        return [name for name in VERIFIED_BY.get(workaround_id, ())
                if self.scenarios.get(name, ("", ""))[0] == "pass"]


def load_verification(profile: str, directory: Path = VERIFIED_DIR) -> Verification | None:
    path = directory / f"{profile}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Verification(data["profile"], data["model"],
                            {s["name"]: (s["verdict"], s.get("reason", "")) for s in data["scenarios"]})
    except (ValueError, KeyError, TypeError) as err:
        raise StonelabError(f"{path}: not a stonelab verification record ({err})") from None


def verified_text(gap: Gap, verification: Verification | None) -> str:
    if not gap.workaround_id:
        return "nothing to verify"
    if verification is None:
        return "not verified (no `stonelab compat verify` record for this profile)"
    names = verification.verified(gap.workaround_id)
    if names:
        return f"verified: {', '.join(names)} passed under the personality ({verification.model})"
    wanted = VERIFIED_BY.get(gap.workaround_id, ())
    if not wanted:
        return "not verified: no lab scenario exercises it yet"
    seen = [f"{n}: {verdict}" + (f" — {reason[:240]}" if verdict != "pass" and reason else "")
            for n in wanted if n in verification.scenarios for verdict, reason in [verification.scenarios[n]]]
    return "not verified" + (f" ({', '.join(seen)})" if seen else f": run {', '.join(wanted)}")


SYSTEM_NAMES = {"nix": "Nix", "ostree": "OSTree"}  # phase prefix → system; any other phase is the reference's


def systems_hit(phases: list[str]) -> list[str]:
    """The systems whose traced operations (``phases``) use a feature: ``reference``, ``Nix``, ``OSTree``; a need
    no trace shows (no phases) is the reference's."""
    hit = {SYSTEM_NAMES.get(phase.split(":", 1)[0], "reference") for phase in phases} or {"reference"}
    return sorted(hit, key=["reference", *SYSTEM_NAMES.values()].index)


def operation_matrix(trace: Trace, sections: list[dict]) -> list[dict]:
    """One row per traced operation (phase) plus the needs no trace shows; a cell is the worst gap there."""
    rows = []
    extra = sorted({g["origin"] for s in sections for g in s["gaps"] if not g["phases"]})
    for operation in [*trace.phases, *extra]:
        cells, classes = [], []
        for section in sections:
            hits = [g for g in section["gaps"] if operation in g["phases"] or g["origin"] == operation]
            worst = next((sev for sev in ("blocker", "degraded", "benign") if any(g["severity"] == sev for g in hits)),
                         "ok")
            names = ", ".join(sorted({g["feature"] for g in hits if g["severity"] == worst}))
            cells.append("ok" if worst == "ok" else f"{worst}: {names}")
            classes.append(worst)
        rows.append({"operation": operation, "cells": cells, "classes": classes})
    return rows


def build(trace: Trace, requirements_source: str, profiles: list[tuple[KernelProfile, str]],
          verified_dir: Path = VERIFIED_DIR) -> dict:
    """The report as plain data (what the JSON holds and the templates render)."""
    from lab.kernel.emulate import plan
    sections = []
    for profile, filesystem in profiles:
        verification = load_verification(profile.name, verified_dir)
        gaps = [dict(asdict(g), verified=verified_text(g, verification), systems=systems_hit(g.phases))
                for g in analyse(trace, profile, filesystem)]
        try:
            not_emulated = list(plan(profile, filesystem).not_emulated)
        except StonelabError:
            not_emulated = []
        sections.append({"name": profile.name, "kernel": profile.kernel, "evidence": profile.evidence,
                         "facts": profile.facts, "filesystem": filesystem, "gaps": gaps,
                         "blockers": [g for g in gaps if g["severity"] == "blocker"],
                         "degraded": sum(g["severity"] == "degraded" for g in gaps),
                         "benign": sum(g["severity"] == "benign" for g in gaps),
                         "verification": asdict(verification) if verification else None,
                         "systems_hit": {name: [g["feature"] for g in gaps if name in g["systems"]]
                                         for name in SYSTEM_NAMES.values()},
                         "not_emulated": not_emulated})
    return {"requirements_source": requirements_source, "traced_on": trace.traced_on,
            "n_features": len(trace.features), "n_phases": len(trace.phases),
            "n_transaction": sum(f.category == "transaction" for f in trace.features),
            "sections": sections, "matrix": operation_matrix(trace, sections)}


def write_report(data: dict, directory: Path) -> list[Path]:
    """``compat-report.md``, ``compat-report.html``, ``compat-report.json`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, autoescape in (("report.md.j2", False), ("report.html.j2", True)):
        env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=autoescape, trim_blocks=True,
                          lstrip_blocks=True, keep_trailing_newline=True)
        env.filters["md"] = lambda text: str(text).replace("|", "\\|")  # a pipe would end a table cell
        out = directory / f"compat-report.{name.split('.')[1]}"
        out.write_text(env.get_template(name).render(**data))
        written.append(out)
    out = directory / "compat-report.json"
    out.write_text(json.dumps(data, indent=1) + "\n")
    written.append(out)
    return written


def register(sub: argparse._SubParsersAction) -> None:
    compat = sub.add_parser("compat", help="kernel compatibility report for porters")
    verbs = compat.add_subparsers(dest="compat_command", metavar="VERB")
    verbs.required = True
    p = verbs.add_parser("report", help="operations × kernel profiles: gaps, consequences, verified workarounds")
    p.add_argument("--profile", action="append", required=True, metavar="PROFILE[:FS]",
                   help="a kernel profile (name or path), optionally with the root filesystem to judge (repeatable)")
    p.add_argument("--requirements", type=Path, action="append",
                   help="requirements file (repeatable; default compat/requirements.json and, when present, "
                        "compat/requirements-systems.json: Nix and OSTree)")
    p.add_argument("-o", "--output", type=Path, default=Path("reports"), metavar="DIR")
    p.set_defaults(func=cmd_report)
    p = verbs.add_parser("verify", help="run the workarounds' scenarios under --personality PROFILE and record them")
    p.add_argument("--profile", required=True)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO.yaml")
    p.set_defaults(func=cmd_verify)


def _profile_arg(spec: str) -> tuple[KernelProfile, str]:
    name, _, filesystem = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    profile = load_profile(name)
    return profile, profile.judged_filesystem(filesystem, spec)


def cmd_report(args: argparse.Namespace) -> int:
    profiles = [_profile_arg(spec) for spec in args.profile]
    paths = args.requirements or default_requirements()
    data = build(load_requirements(paths), ", ".join(p.name for p in paths), profiles)
    for path in write_report(data, args.output):
        print(f"wrote {path}")
    for section in data["sections"]:
        print(f"{section['name']} on {section['filesystem']}: {len(section['blockers'])} blockers: "
              + ", ".join(g["feature"] for g in section["blockers"]))
        for system, features in section["systems_hit"].items():
            if features:
                print(f"  gaps that hit {system}: {', '.join(features)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    scenarios = args.scenarios or [str(PROJECT / "scenarios" / f"{n}.yaml") for n in DEFAULT_VERIFY_SCENARIOS]
    with tempfile.TemporaryDirectory(prefix="stonelab-verify-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "stonelab.cli", "run", "--personality", args.profile,
                               "--report-dir", tmp, *scenarios], cwd=PROJECT, text=True, capture_output=True)
        report = Path(tmp) / "latest" / "report.json"  # stonelab run writes DIR/<timestamp>/ and DIR/latest
        if not report.is_file():
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise StonelabError(f"compat verify: the scenarios did not run ({tail})")
        results = json.loads(report.read_text())["cases"]
    record = {"profile": profile.name, "model": POWER_LOSS_MODEL,
              "scenarios": [{"name": r["name"], "verdict": r["verdict"], "reason": r.get("reason", "")}
                            for r in results]}
    VERIFIED_DIR.mkdir(parents=True, exist_ok=True)
    out = VERIFIED_DIR / f"{profile.name}.json"
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    for r in record["scenarios"]:
        print(f"{r['verdict']:5} {r['name']} {r['reason']}")
    print(f"wrote {out}")
    return 0
