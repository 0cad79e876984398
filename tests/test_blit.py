"""The blit against real files: hard links, fresh empty files, variants, EXDEV, copies, reflinks, limits."""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import xxhash

from reference_impl.blit import (BlitOptions, BlitReport, BlitStrategy, asset_path, asset_str, blit,
                                 raise_nofile_limit)
from reference_impl.stone import EMPTY_DIGEST, LayoutEntry, LayoutType, PackageSpec, build_package, read_stone
from reference_impl.store import Store
from stonelab.errors import StonelabError

REPO = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------------------------
def put(store: Path, data: bytes) -> int:
    """A canonical asset as the store keeps it: content-addressed, mode 0444."""
    digest = xxhash.xxh3_128_intdigest(data)
    path = asset_path(store, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o444)
    return digest


def reg(target: str, digest: int, mode: int = 0o644, uid: int = 0, gid: int = 0) -> LayoutEntry:
    return LayoutEntry(uid, gid, stat.S_IFREG | mode, 0, LayoutType.REGULAR, target, digest)


def sym(target: str, source: str, uid: int = 0, gid: int = 0) -> LayoutEntry:
    return LayoutEntry(uid, gid, stat.S_IFLNK | 0o777, 0, LayoutType.SYMLINK, target, None, source)


def dirent(target: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> LayoutEntry:
    return LayoutEntry(uid, gid, stat.S_IFDIR | mode, 0, LayoutType.DIRECTORY, target)


def fs_type(path: Path) -> str:
    """The filesystem type holding ``path`` (longest mount point prefix in /proc/self/mounts)."""
    path = path.resolve()
    best, kind = "", "?"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def listing(root: Path) -> dict[str, tuple]:
    """Every path below ``root`` with what the blit promises about it."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, path.read_bytes())
    return out


@contextlib.contextmanager
def mounted(where: Path, *mount_args: str):
    """``mount MOUNT_ARGS WHERE`` for the duration, or a clean skip when mounting is not permitted here."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *mount_args, str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount {' '.join(mount_args)} at {where} here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "assets" / "v2"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def usr(tmp_path: Path) -> Path:
    path = tmp_path / "staging" / "usr"
    path.mkdir(parents=True)
    return path


def small_tree(store: Path) -> list[LayoutEntry]:
    hello = put(store, b"hello\n")
    tool = put(store, b"#!/bin/sh\necho tool\n")
    return [
        dirent("share"),
        reg("share/doc/hello.txt", hello),
        reg("share/doc/copy-of-hello.txt", hello),
        reg("bin/tool", tool, 0o755),
        reg("share/defaults/empty", EMPTY_DIGEST),
        sym("lib64", "lib"),
        sym("bin/hello-link", "../share/doc/hello.txt"),
        dirent("share/private", 0o700),
        LayoutEntry(0, 0, stat.S_IFIFO | 0o644, 0, LayoutType.FIFO, "share/fifo"),
        LayoutEntry(0, 0, stat.S_IFCHR | 0o644, 0, LayoutType.CHARACTER_DEVICE, "share/null"),
    ]


# -- the tree --------------------------------------------------------------------------------------------------------
def test_hardlink_blit_builds_the_tree_from_links_to_the_store(store: Path, usr: Path):
    entries = small_tree(store)
    report = blit(entries, store, usr, BlitOptions(strategy=BlitStrategy.HARDLINK))

    assert (usr / "share/doc/hello.txt").read_bytes() == b"hello\n"
    assert (usr / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert os.readlink(usr / "lib64") == "lib" and os.readlink(usr / "bin/hello-link") == "../share/doc/hello.txt"
    assert (usr / "bin/hello-link").read_bytes() == b"hello\n"
    assert not (usr / "share/fifo").exists() and not (usr / "share/null").exists()
    # regular files: mode & ~0o222; the 0644 ones share the canonical asset's inode
    hello_asset = asset_path(store, xxhash.xxh3_128_intdigest(b"hello\n"))
    for name in ("share/doc/hello.txt", "share/doc/copy-of-hello.txt"):
        st = (usr / name).lstat()
        assert stat.S_IMODE(st.st_mode) == 0o444
        assert st.st_ino == hello_asset.stat().st_ino
    assert hello_asset.stat().st_nlink == 3
    assert stat.S_IMODE((usr / "bin/tool").stat().st_mode) == 0o555
    # directories: parents 0755, explicit ones their own mode
    assert stat.S_IMODE((usr / "share/doc").stat().st_mode) == 0o755
    assert stat.S_IMODE((usr / "share/private").stat().st_mode) == 0o700
    empty = (usr / "share/defaults/empty").lstat()
    assert empty.st_size == 0 and stat.S_IMODE(empty.st_mode) == 0o444 and empty.st_nlink == 1

    assert isinstance(report, BlitReport) and report.strategy is BlitStrategy.HARDLINK
    assert (report.files, report.empty, report.linked, report.copied, report.symlinks, report.skipped) == \
        (4, 1, 3, 0, 2, 2)
    assert report.variants == 1  # bin/tool: 0555
    assert report.directories == len({"share", "share/doc", "bin", "share/defaults", "share/private"})
    assert report.seconds > 0


def test_asset_str_matches_the_store_fanout(store: Path):
    for digest in (EMPTY_DIGEST, 0xABCDEF, 0x123456789, 0x1234567890, 1 << 127, 0x0AB):
        assert asset_str(str(store), digest) == str(asset_path(store, digest))
    assert asset_path(store, 0x99AA06D3014798D86001C324468D497F) == store / "99/aa/06/99aa06d3014798d86001c324468d497f"


def test_a_built_package_blits_back_to_its_tree(tmp_path: Path, store: Path, usr: Path):
    """End to end with the project's own writer, reader and store: the blitted tree is the packaged tree."""
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/prog").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    (tree / "bin/prog").chmod(0o755)
    (tree / "lib").mkdir()
    (tree / "lib/libx.so.1.2").write_bytes(b"library" * 1000)
    (tree / "lib/libx.so.1").symlink_to("libx.so.1.2")
    (tree / "share/pkg").mkdir(parents=True)
    (tree / "share/pkg/README").write_text("read me\n")
    (tree / "share/pkg/empty").write_bytes(b"")
    out = tmp_path / "pkg.stone"
    build_package(tree, PackageSpec(name="pkg", version="1", release=1, summary="s", license=["MIT"]), out)
    stone = read_stone(out)
    Store(store, fsync=False).add(stone)

    blit(stone.layout, store, usr)

    for path in tree.rglob("*"):
        rel = path.relative_to(tree)
        got = usr / rel
        if path.is_symlink():
            assert os.readlink(got) == os.readlink(path)
        elif path.is_dir():
            assert got.is_dir()
        else:
            assert got.read_bytes() == path.read_bytes(), rel
            assert stat.S_IMODE(got.stat().st_mode) == stat.S_IMODE(path.stat().st_mode) & ~0o222, rel


def test_entries_in_any_order_and_parallel_workers_give_the_same_tree(tmp_path: Path, store: Path):
    entries = []
    for i in range(6000):
        data = f"file {i % 4000}\n".encode()
        mode = 0o755 if i % 7 == 0 else 0o644
        entries.append(reg(f"d{i % 37}/s{i % 5}/f{i}", put(store, data) if i % 11 else EMPTY_DIGEST, mode))
        if i % 13 == 0:
            entries.append(sym(f"d{i % 37}/l{i}", f"s{i % 5}/f{i}"))
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    serial.mkdir()
    parallel.mkdir()
    one = blit(entries, store, serial, BlitOptions(strategy=BlitStrategy.HARDLINK, workers=1))
    many = blit(list(reversed(entries)), store, parallel, BlitOptions(strategy=BlitStrategy.HARDLINK, workers=4))
    assert listing(serial) == listing(parallel)
    assert (one.files, one.linked, one.empty, one.symlinks) == (many.files, many.linked, many.empty, many.symlinks)
    assert one.files == 6000 and one.linked + one.empty == 6000
    assert many.variants == 0 and one.variants > 0  # the second blit reused the first one's variants


# -- empty files (#372) and EMLINK ---------------------------------------------------------------------------------
def test_70000_empty_files_get_fresh_inodes(tmp_path: Path, store: Path, usr: Path):
    """Linking one shared empty inode would hit EMLINK (65,000 on ext4) — upstream #372."""
    entries = [reg(f"share/many/e{i:05d}", EMPTY_DIGEST) for i in range(70_000)]
    report = blit(entries, store, usr, BlitOptions(fsync=False))
    assert report.empty == 70_000 and report.linked == 0
    inodes = set()
    with os.scandir(usr / "share/many") as it:
        for item in it:
            st = item.stat(follow_symlinks=False)
            assert st.st_nlink == 1 and st.st_size == 0
            inodes.add(st.st_ino)
    assert len(inodes) == 70_000


def test_an_asset_linked_more_often_than_the_filesystem_allows_is_copied(tmp_path: Path, store: Path, usr: Path):
    kind = fs_type(tmp_path)
    if kind != "ext4":
        pytest.skip(f"{tmp_path} is on {kind}; the 65,000-link limit this test reaches is ext4's")
    digest = put(store, b"same content everywhere\n")
    entries = [reg(f"share/d{i // 10000}/f{i:05d}", digest) for i in range(70_000)]
    report = blit(entries, store, usr, BlitOptions(strategy=BlitStrategy.HARDLINK, fsync=False))
    assert report.linked + report.copied == 70_000
    assert report.linked == 64_999 and report.copied == 5001  # the asset itself holds one of the 65,000 links
    assert (usr / "share/d6/f69999").read_bytes() == b"same content everywhere\n"
    assert stat.S_IMODE((usr / "share/d6/f69999").stat().st_mode) == 0o444


# -- modes and owners (#785, #834) ----------------------------------------------------------------------------------
def test_shared_content_with_different_modes_gets_a_variant_each(store: Path, tmp_path: Path):
    digest = put(store, b"#!/bin/sh\nexit 0\n")
    asset = asset_path(store, digest)
    entries = [reg("bin/run", digest, 0o755), reg("share/examples/run", digest, 0o644),
               reg("libexec/suid-run", digest, 0o4755)]
    first = tmp_path / "one/usr"
    first.mkdir(parents=True)
    report = blit(entries, store, first)

    assert stat.S_IMODE((first / "bin/run").stat().st_mode) == 0o555
    assert stat.S_IMODE((first / "share/examples/run").stat().st_mode) == 0o444
    assert stat.S_IMODE((first / "libexec/suid-run").stat().st_mode) == 0o4555
    assert stat.S_IMODE(asset.stat().st_mode) == 0o444  # the canonical asset is untouched
    assert (first / "share/examples/run").stat().st_ino == asset.stat().st_ino
    variant = Path(f"{asset}.555.0.0")
    assert (first / "bin/run").stat().st_ino == variant.stat().st_ino
    assert variant.read_bytes() == asset.read_bytes()
    assert report.variants == 2
    assert not list(store.rglob("*.part"))

    second = tmp_path / "two/usr"  # a later state reuses the variants
    second.mkdir(parents=True)
    again = blit(entries, store, second)
    assert again.variants == 0
    assert (second / "bin/run").stat().st_ino == variant.stat().st_ino


def test_a_damaged_variant_is_replaced_not_reused(store: Path, tmp_path: Path):
    digest = put(store, b"payload\n")
    entries = [reg("bin/x", digest, 0o755)]
    (tmp_path / "a").mkdir()
    blit(entries, store, tmp_path / "a")
    variant = Path(f"{asset_path(store, digest)}.555.0.0")
    variant.chmod(0o777)
    (tmp_path / "b").mkdir()
    report = blit(entries, store, tmp_path / "b")
    assert report.variants == 1
    assert stat.S_IMODE((tmp_path / "b/bin/x").stat().st_mode) == 0o555


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files other owners needs root")
def test_owners_as_root(store: Path, usr: Path):
    digest = put(store, b"owned\n")
    entries = [reg("share/a", digest, 0o644, uid=1234, gid=5678), reg("share/b", digest, 0o644),
               reg("share/e", EMPTY_DIGEST, 0o640, uid=42, gid=43), sym("share/l", "a", uid=7, gid=8),
               dirent("share/owned", 0o750, uid=99, gid=98)]
    report = blit(entries, store, usr)
    a, b = (usr / "share/a").stat(), (usr / "share/b").stat()
    assert (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (1234, 5678, 0o444)
    assert (b.st_uid, b.st_gid) == (0, 0) and a.st_ino != b.st_ino
    assert Path(f"{asset_path(store, digest)}.444.1234.5678").stat().st_ino == a.st_ino
    e = (usr / "share/e").stat()
    assert (e.st_uid, e.st_gid, stat.S_IMODE(e.st_mode)) == (42, 43, 0o440)
    link = (usr / "share/l").lstat()
    assert (link.st_uid, link.st_gid) == (7, 8)
    owned = (usr / "share/owned").stat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (99, 98, 0o750)
    assert report.ownership_ignored == 0 and report.variants == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user in a subprocess")
def test_without_root_foreign_owners_are_counted_not_fatal():
    work = Path(tempfile.mkdtemp(prefix="stonelab-blit-nobody-"))  # pytest's tmp_path is private to root
    try:
        _blit_as_nobody(work)
    finally:
        shutil.rmtree(work)


def _blit_as_nobody(work: Path) -> None:
    store, usr = work / "store", work / "usr"
    store.mkdir()
    usr.mkdir()
    digest = put(store, b"data\n")
    for path in [work, store, usr, *store.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)
    script = textwrap.dedent(f"""
        import ctypes, os, stat
        from pathlib import Path
        from reference_impl.blit import blit
        from reference_impl.stone import LayoutEntry, LayoutType, EMPTY_DIGEST
        # imports first: this venv's Python lives below /root, which user nobody cannot read
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        e = [LayoutEntry(0, 0, 0o100755, 0, LayoutType.REGULAR, "bin/x", {digest}),
             LayoutEntry(0, 0, 0o100644, 0, LayoutType.REGULAR, "share/y", {digest}),
             LayoutEntry(0, 0, 0o100644, 0, LayoutType.REGULAR, "share/e", EMPTY_DIGEST),
             LayoutEntry(0, 0, 0o120777, 0, LayoutType.SYMLINK, "share/l", None, "y")]
        r = blit(e, Path({str(store)!r}), Path({str(usr)!r}))
        print(r.ownership_ignored, r.files, r.linked, r.variants)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "3", "2", "1"]
    assert (usr / "bin/x").stat().st_uid == 65534
    assert stat.S_IMODE((usr / "bin/x").stat().st_mode) == 0o555


# -- limits (#841) ----------------------------------------------------------------------------------------------------
def test_a_wide_tree_blits_with_a_low_open_files_limit(store: Path, usr: Path):
    digest = put(store, b"x\n")
    del digest
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        from reference_impl.blit import blit, BlitOptions
        from reference_impl.stone import LayoutEntry, LayoutType
        import xxhash
        d = xxhash.xxh3_128_intdigest(b"x\\n")
        e = [LayoutEntry(0, 0, 0o100644, 0, LayoutType.REGULAR, f"share/d{{i}}/sub/f", d) for i in range(5000)]
        r = blit(e, Path({str(store)!r}), Path({str(usr)!r}), BlitOptions(workers=4))
        print(r.files, r.directories, resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard or hard)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5000", "10001", "True"]
    assert (usr / "share/d4999/sub/f").read_bytes() == b"x\n"


def test_raise_nofile_limit_raises_the_soft_limit_to_the_hard_one():
    script = ("import resource\n"
              "from reference_impl.blit import raise_nofile_limit\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))\n"
              "print(raise_nofile_limit() == hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True"], done.stderr
    assert raise_nofile_limit() >= 64


# -- strategies ---------------------------------------------------------------------------------------------------
def test_forced_copy_gives_every_file_its_own_inode(store: Path, usr: Path):
    entries = small_tree(store)
    report = blit(entries, store, usr, BlitOptions(strategy=BlitStrategy.COPY))
    assert report.strategy is BlitStrategy.COPY and report.copied == 3 and report.linked == 0
    assert report.variants == 0
    hello_asset = asset_path(store, xxhash.xxh3_128_intdigest(b"hello\n"))
    assert (usr / "share/doc/hello.txt").stat().st_ino != hello_asset.stat().st_ino
    assert hello_asset.stat().st_nlink == 1
    assert stat.S_IMODE((usr / "bin/tool").stat().st_mode) == 0o555
    assert (usr / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert not list(store.rglob("*.*.*.*"))  # no variants needed when copying


def test_store_on_another_filesystem_switches_to_copy(tmp_path: Path, store: Path):
    """#659: the store on /tmp (ext4), the destination on a tmpfs."""
    entries = small_tree(store)
    with mounted(tmp_path / "tmpfs", "-t", "tmpfs", "tmpfs") as mnt:
        (mnt / "usr").mkdir()
        report = blit(entries, store, mnt / "usr", BlitOptions(strategy=BlitStrategy.AUTO))
        assert report.strategy is BlitStrategy.COPY and report.copied == 3 and report.linked == 0
        assert any("EXDEV" in note for note in report.notes)
        assert (mnt / "usr/share/doc/hello.txt").read_bytes() == b"hello\n"
        assert stat.S_IMODE((mnt / "usr/bin/tool").stat().st_mode) == 0o555
        assert (mnt / "usr/share/defaults/empty").stat().st_size == 0
        (mnt / "forced").mkdir()
        forced = blit(entries, store, mnt / "forced", BlitOptions(strategy=BlitStrategy.HARDLINK))
        assert forced.strategy is BlitStrategy.COPY and forced.copied == 3


def test_exdev_in_the_middle_of_linking_switches_to_copy(tmp_path: Path, store: Path):
    """A bind mount: same device number, but link(2) across mounts still fails with EXDEV."""
    digest = put(store, b"bound\n")
    entries = [reg(f"share/f{i}", digest) for i in range(50)]
    (tmp_path / "target").mkdir()
    with mounted(tmp_path / "bound", "--bind", str(tmp_path / "target")) as mnt:
        report = blit(entries, store, mnt)
        assert report.strategy is BlitStrategy.COPY and report.copied == 50 and report.linked == 0
        assert any("EXDEV" in note for note in report.notes)
        assert (mnt / "share/f49").read_bytes() == b"bound\n"


def test_forced_reflink_on_a_filesystem_without_it_is_a_one_line_error(tmp_path: Path, store: Path, usr: Path):
    kind = fs_type(tmp_path)
    if kind in ("btrfs", "xfs", "bcachefs"):
        pytest.skip(f"{tmp_path} is on {kind}, which can reflink")
    with pytest.raises(StonelabError) as caught:
        blit(small_tree(store), store, usr, BlitOptions(strategy=BlitStrategy.REFLINK))
    message = str(caught.value)
    assert "\n" not in message and "cannot reflink" in message and str(usr) in message
    assert list(usr.iterdir()) == []  # refused before anything was made


@contextlib.contextmanager
def btrfs_mount(tmp_path: Path):
    """A fresh loop-mounted btrfs (it reflinks), or a clean skip where that cannot be made here."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("mkfs.btrfs is not installed (btrfs-progs)")
    image = tmp_path / "btrfs.img"
    with open(image, "wb") as handle:
        handle.truncate(160 << 20)
    made = subprocess.run(["mkfs.btrfs", "-q", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.btrfs failed: {made.stderr.strip()}")
    with mounted(tmp_path / "mnt", "-t", "btrfs", "-o", "loop", str(image)) as mnt:
        yield mnt


def test_reflink_on_btrfs(tmp_path: Path):
    with btrfs_mount(tmp_path) as mnt:
        store = mnt / "assets"
        store.mkdir()
        entries = small_tree(store)
        (mnt / "forced").mkdir()
        report = blit(entries, store, mnt / "forced", BlitOptions(strategy=BlitStrategy.REFLINK))
        assert report.strategy is BlitStrategy.REFLINK and report.reflinked == 3 and report.linked == 0
        hello_asset = asset_path(store, xxhash.xxh3_128_intdigest(b"hello\n"))
        assert (mnt / "forced/share/doc/hello.txt").stat().st_ino != hello_asset.stat().st_ino
        assert (mnt / "forced/share/doc/hello.txt").read_bytes() == b"hello\n"
        assert stat.S_IMODE((mnt / "forced/bin/tool").stat().st_mode) == 0o555
        (mnt / "auto").mkdir()
        auto = blit(entries, store, mnt / "auto")
        assert auto.strategy is BlitStrategy.REFLINK and auto.reflinked == 3
        assert listing(mnt / "auto") == listing(mnt / "forced")
        assert not [p for p in mnt.joinpath("auto").rglob("*") if "reflink-probe" in p.name]


# -- the halfway hook, errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 3])
def test_on_halfway_is_called_exactly_once_about_halfway(store: Path, usr: Path, workers: int):
    digest = put(store, b"half\n")
    entries = [reg(f"share/d{i % 50}/f{i}", digest) for i in range(8000)]
    seen = []

    def halfway():
        seen.append(sum(len(files) for _d, _s, files in os.walk(usr)))

    blit(entries, store, usr, BlitOptions(workers=workers, on_halfway=halfway))
    assert len(seen) == 1 and seen[0] == 4000


def test_on_halfway_is_called_once_for_a_tree_without_files(store: Path, usr: Path):
    calls = []
    blit([dirent("share")], store, usr, BlitOptions(on_halfway=lambda: calls.append(1)))
    assert calls == [1]


def test_a_failing_halfway_hook_stops_the_blit(store: Path, usr: Path):
    digest = put(store, b"stop\n")
    entries = [reg(f"share/f{i}", digest) for i in range(10)]

    def crash():
        raise OSError(5, "injected")

    with pytest.raises(OSError, match="injected"):
        blit(entries, store, usr, BlitOptions(on_halfway=crash))
    assert len(list((usr / "share").iterdir())) == 5


@pytest.mark.parametrize("strategy,mode,workers", [(BlitStrategy.HARDLINK, 0o644, 1), (BlitStrategy.HARDLINK, 0o755, 1),
                                                    (BlitStrategy.COPY, 0o644, 1), (BlitStrategy.HARDLINK, 0o644, 4)])
def test_a_missing_asset_is_a_one_line_error(store: Path, usr: Path, strategy: BlitStrategy, mode: int, workers: int):
    present = put(store, b"present\n")
    missing = xxhash.xxh3_128_intdigest(b"not in the store\n")
    entries = [reg(f"share/ok{i}", present) for i in range(5000)] + [reg("bin/gone", missing, mode)]
    with pytest.raises(StonelabError) as caught:
        blit(entries, store, usr, BlitOptions(strategy=strategy, workers=workers))
    message = str(caught.value)
    assert message == f"{asset_path(store, missing)}: missing asset for /usr/bin/gone"


def test_colliding_layout_paths_are_refused(store: Path, usr: Path):
    digest = put(store, b"c\n")
    with pytest.raises(StonelabError, match=r"^/usr/lib64: is a symlink in the layout but also a directory$"):
        blit([sym("lib64", "lib"), reg("lib64/libc.so", digest)], store, usr)
    with pytest.raises(StonelabError, match="appears twice"):
        blit([reg("share/a", digest), reg("share/a", digest)], store, usr)


def test_a_symlink_already_in_the_destination_is_never_followed(tmp_path: Path, store: Path, usr: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (usr / "share").symlink_to(outside)
    with pytest.raises(StonelabError, match="exists and is not a directory"):
        blit([reg("share/evil", put(store, b"e\n"))], store, usr)
    assert list(outside.iterdir()) == []


def test_directory_modes_are_applied_after_their_children(store: Path, usr: Path):
    digest = put(store, b"inside\n")
    entries = [dirent("share/ro", 0o555), reg("share/ro/sub/file", digest), dirent("share/sticky", 0o1777)]
    blit(entries, store, usr)
    assert stat.S_IMODE((usr / "share/ro").stat().st_mode) == 0o555
    assert (usr / "share/ro/sub/file").read_bytes() == b"inside\n"
    assert stat.S_IMODE((usr / "share/sticky").stat().st_mode) == 0o1777
