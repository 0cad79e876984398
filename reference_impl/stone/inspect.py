"""What `stonelab inspect` shows of a `.stone` file: a JSON-ready dict and moss-style text."""
from __future__ import annotations

import stat

from reference_impl.stone.model import Compression, LayoutType, Meta, digest_hex
from reference_impl.stone.reader import StoneFile


def meta_dict(meta: Meta) -> dict:
    return {
        "name": meta.name,
        "version": meta.version,
        "release": meta.release,
        "build_release": meta.build_release,
        "architecture": meta.architecture,
        "summary": meta.summary,
        "description": meta.description,
        "homepage": meta.homepage,
        "source_id": meta.source_id,
        "licenses": list(meta.licenses),
        "depends": [str(d) for d in meta.depends],
        "provides": [str(p) for p in meta.provides],
        "conflicts": [str(c) for c in meta.conflicts],
        "build_depends": [str(b) for b in meta.build_depends],
        **({"uri": meta.uri, "hash": meta.hash, "size": meta.size} if meta.uri is not None else {}),
    }


def layout_dict(stone: StoneFile) -> list[dict]:
    rows = []
    for entry in stone.layout:
        row = {
            "path": entry.usr_path.rstrip("/"),
            "type": entry.file_type.label,
            "mode": f"{stat.S_IMODE(entry.mode):04o}",
            "uid": entry.uid,
            "gid": entry.gid,
        }
        if entry.file_type is LayoutType.REGULAR:
            row["digest"] = digest_hex(entry.digest or 0)
        elif entry.file_type is LayoutType.SYMLINK:
            row["target"] = entry.source
        rows.append(row)
    return rows


def payload_dicts(stone: StoneFile) -> list[dict]:
    return [
        {
            "kind": p.kind_name,
            "records": p.num_records,
            "stored_size": p.stored_size,
            "plain_size": p.plain_size,
            "compression": _compression(p.compression),
            "checksum": p.checksum.hex(),
        }
        for p in stone.payloads
    ]


def _compression(code: int) -> str:
    try:
        return Compression(code).name.capitalize()
    except ValueError:
        return f"Unknown({code})"


def inspect_dict(stone: StoneFile) -> dict:
    result = {
        "file": str(stone.path),
        "type": stone.file_type.label,
        "version": 1,
        "size": stone.size,
        "payloads": payload_dicts(stone),
        "packages": [meta_dict(m) for m in stone.metas],
    }
    if stone.layout or stone.index:
        result["layout"] = layout_dict(stone)
    return result


def inspect_text(stone: StoneFile) -> str:
    lines = [f'"{stone.path.name}" = stone container version V1 ({stone.file_type.label})']
    for meta in stone.metas:
        lines.append("")
        fields = [
            ("Name", meta.name), ("Version", meta.version), ("Release", meta.release),
            ("Build Release", meta.build_release), ("Architecture", meta.architecture),
            ("Summary", meta.summary), ("Description", meta.description), ("Homepage", meta.homepage),
            ("Source ID", meta.source_id), ("Licenses", ", ".join(meta.licenses)),
        ]
        if meta.uri is not None:
            fields += [("URI", meta.uri), ("Hash", meta.hash), ("Size", meta.size)]
        lines += [f"{label:<14}: {value}" for label, value in fields]
        for label, deps in (("Dependencies", meta.depends), ("Providers", meta.provides),
                            ("Conflicts", meta.conflicts), ("Build Deps", meta.build_depends)):
            if deps:
                lines.append(f"{label}:")
                lines += [f"    - {d}" for d in deps]
    for p in stone.payloads:
        savings = 100.0 * (1 - p.stored_size / p.plain_size) if p.plain_size else 0.0
        lines.append("")
        lines.append(f"Payload: {p.kind_name} [Records: {p.num_records} Compression: {_compression(p.compression)}, "
                     f"Savings: {savings:.2f}%, Size: {p.plain_size}]")
        if p.kind_name == "Layout":
            for row in layout_dict(stone):
                detail = row.get("digest") or (f"-> {row['target']}" if "target" in row else "")
                lines.append(f"    - {row['path']} - [{row['type'].capitalize()}] {detail}".rstrip())
    return "\n".join(lines)
