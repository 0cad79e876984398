"""Packages a scenario declares: built as real `.stone` files, and the /usr tree each set of them must give."""
from __future__ import annotations

from pathlib import Path

import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lab.invariants import ExpectedTree
from reference_impl.stone import PackageSpec, build_package_from_files


class PackageDecl(BaseModel):
    """One package a scenario declares: ``files`` and ``symlinks`` map paths relative to /usr to content or a
    link target; ``depends``/``provides``/``conflicts`` are moss's ``kind(name)`` strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    key: str = ""
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    release: int = Field(default=1, ge=1)
    files: dict[str, str] = Field(default_factory=dict)
    symlinks: dict[str, str] = Field(default_factory=dict)
    depends: list[str] = Field(default_factory=list)
    provides: list[str] = Field(default_factory=list)
    conflicts: list[str] = Field(default_factory=list)
    #: the lab's guest kernel (``stonelab run --kernel``, default the newest /boot/vmlinuz-*) with an initramfs
    #: that honours moss.fstx= and reports the state it booted (lab.bootproof); ``files`` are then ignored
    kernel: bool = False
    #: rel path -> [uid, gid] and rel path -> octal mode ("0755") of files that are not root:root 0644
    owners: dict[str, tuple[int, int]] = Field(default_factory=dict)
    modes: dict[str, str] = Field(default_factory=dict)
    #: rel path -> XXH3-128 hex of files whose content is not declared (filled in when a kernel is built)
    digests: dict[str, str] = Field(default_factory=dict)

    @field_validator("modes")
    @classmethod
    def _octal(cls, value: dict[str, str]) -> dict[str, str]:
        for rel, mode in value.items():
            try:
                if not 0 <= int(mode, 8) <= 0o7777:
                    raise ValueError
            except ValueError:
                raise ValueError(f"mode {mode!r} of {rel!r} is not an octal mode (e.g. '0755')") from None
        return value

    @field_validator("files", "symlinks", "owners", "modes")
    @classmethod
    def _inside_usr(cls, value: dict[str, str]) -> dict[str, str]:
        for rel in value:
            if rel.startswith("/") or ".." in rel.split("/") or not rel:
                raise ValueError(f"path {rel!r} must be relative to /usr and stay inside it")
        return value


def build_packages(decls: dict[str, PackageDecl], out_dir: Path,
                   kernel_image: Path | None = None) -> tuple[dict[str, Path], dict[str, PackageDecl]]:
    """Build every declared package into ``out_dir``; returns (key -> .stone path, key -> declaration with the
    digests of files it did not declare, i.e. the kernel's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    built, final = {}, dict(decls)
    for key, decl in decls.items():
        if decl.kernel:
            built[key], final[key] = _kernel_package(decl, out_dir / key, kernel_image)
            continue
        spec = PackageSpec(name=decl.name, version=decl.version, release=decl.release, summary=f"{key} (lab)",
                           license=["MPL-2.0"], depends=decl.depends, provides=decl.provides,
                           conflicts=decl.conflicts, owners=dict(decl.owners),
                           modes={rel: int(mode, 8) for rel, mode in decl.modes.items()})
        out = out_dir / f"{decl.name}-{decl.version}-{decl.release}-1-x86_64.stone"
        built[key] = build_package_from_files(decl.files, spec, out, symlinks=decl.symlinks, level=3)
    return built, final


def _kernel_package(decl: PackageDecl, out: Path, image: Path | None) -> tuple[Path, PackageDecl]:
    from lab.bootproof import kernel_package, system_initrd
    from reference_impl.stone import read_stone
    from vm.host import default_kernel, kernel_from_path

    kernel = kernel_from_path(image) if image else default_kernel()
    path = kernel_package(out, kernel, system_initrd(kernel))
    digests = {e.target: f"{e.digest:032x}" for e in read_stone(path).layout if e.digest is not None}
    return path, decl.model_copy(update={"name": "linux", "files": {}, "digests": digests})


def expected_tree(decls: list[PackageDecl]) -> ExpectedTree:
    files: dict[str, list] = {}
    for decl in decls:
        for rel, content in decl.files.items():
            files[rel] = ["file", f"{xxhash.xxh3_128_intdigest(content.encode()):032x}"]
        for rel, dest in decl.symlinks.items():
            files[rel] = ["symlink", dest]
        for rel, digest in decl.digests.items():
            files[rel] = ["file", digest]
    label = "{" + ", ".join(sorted(d.key for d in decls)) + "}" if decls else "{} (empty)"
    return ExpectedTree(label, files)
