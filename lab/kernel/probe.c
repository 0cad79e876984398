/* stonelab kernel probe: tests what each kernel feature the reference package manager relies on *means*
 * (lab/kernel/trace.py traces which ones it uses), on one filesystem at a time, on whatever kernel runs it.
 *
 *   probe LABEL DIR                      probe the filesystem DIR is on
 *   probe LABEL DIR DEVICE FSTYPE        mount DEVICE (FSTYPE) on DIR first (reported as mount:FSTYPE)
 *
 * One line per feature, keyed like the trace's features:
 *   STONELAB-PROBE <label> <feature> supported -- <evidence>
 *   STONELAB-PROBE <label> <feature> errno <ENAME> <number> -- <evidence>
 *   STONELAB-PROBE <label> <feature> wrong-semantics -- <evidence>
 * and "STONELAB-PROBE <label> done" at the end.  A call that returns 0 but does not do what it promises (a flag
 * the kernel ignores, a link that is a copy, a read-only mount that writes) is wrong-semantics, never supported.
 *
 * Calls whose flags decide support go through syscall(2), so a test build can wrap syscall() with a shim that
 * drops a flag (lab/kernel/shim.c) — a kernel that ignores the flag.  Static, plain libc: it runs on foreign
 * kernels (Asterinas) from a busybox initramfs.  Written for stonelab; no upstream code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE 1
#endif
#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE 2
#endif
#ifndef FICLONE
#define FICLONE 0x40049409
#endif
#ifndef O_TMPFILE
#define O_TMPFILE (020000000 | O_DIRECTORY)
#endif
#define TMPFS_MAGIC_ 0x01021994
#define RAMFS_MAGIC_ 0x858458f6

static const char *label;
static char base[2048];

static const char *errname(int e) {
    switch (e) {
    case EPERM: return "EPERM"; case ENOENT: return "ENOENT"; case EIO: return "EIO"; case EBADF: return "EBADF";
    case EACCES: return "EACCES"; case EEXIST: return "EEXIST"; case EXDEV: return "EXDEV";
    case ENODEV: return "ENODEV"; case ENOTDIR: return "ENOTDIR"; case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL"; case ENOTTY: return "ENOTTY"; case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS"; case EMLINK: return "EMLINK"; case ENOSYS: return "ENOSYS";
    case ENOTEMPTY: return "ENOTEMPTY"; case ELOOP: return "ELOOP"; case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOTBLK: return "ENOTBLK"; case EBUSY: return "EBUSY"; case EAGAIN: return "EAGAIN";
    case ENODATA: return "ENODATA"; case E2BIG: return "E2BIG"; case EFAULT: return "EFAULT";
    case ENXIO: return "ENXIO"; case ESRCH: return "ESRCH"; case ERANGE: return "ERANGE";
    default: return "E?";
    }
}

/* status: 0 supported, >0 errno, -1 wrong semantics */
#define WRONG (-1)

static void report(const char *feature, int status, const char *fmt, ...) {
    char evidence[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(evidence, sizeof evidence, fmt, ap);
    va_end(ap);
    if (status == 0)
        printf("STONELAB-PROBE %s %s supported -- %s\n", label, feature, evidence);
    else if (status == WRONG)
        printf("STONELAB-PROBE %s %s wrong-semantics -- %s\n", label, feature, evidence);
    else
        printf("STONELAB-PROBE %s %s errno %s %d -- %s\n", label, feature, errname(status), status, evidence);
    fflush(stdout);
}

static char *at(const char *name) {
    static char paths[8][4096];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, 4096, "%s/%s", base, name);
    return p;
}

static int put(const char *name, const char *content) {
    int fd = open(at(name), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return errno;
    int r = write(fd, content, strlen(content)) < 0 ? errno : 0;
    close(fd);
    return r;
}

/* the content of a file ("" and errno set if missing) */
static const char *get(const char *name) {
    static char buf[4][128];
    static int next;
    char *b = buf[next++ % 4];
    b[0] = 0;
    int fd = open(at(name), O_RDONLY);
    if (fd < 0) return strcpy(b, "<missing>");
    ssize_t n = read(fd, b, 127);
    b[n > 0 ? n : 0] = 0;
    close(fd);
    return b;
}

static int err(long r) { return r < 0 ? errno : 0; }

static long sys_renameat2(const char *from, const char *to, unsigned flags) {
    return syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, flags);
}

static void probe_renames(void) {
    put("ea", "A"); put("eb", "B");
    int r = err(sys_renameat2(at("ea"), at("eb"), RENAME_EXCHANGE));
    if (r) report("renameat2:RENAME_EXCHANGE", r, "exchange of two files refused");
    else if (strcmp(get("ea"), "B") || strcmp(get("eb"), "A"))
        report("renameat2:RENAME_EXCHANGE", WRONG, "returned 0 but ea holds '%s', eb holds '%s' (expected B, A): "
               "the flag was ignored", get("ea"), get("eb"));
    else {
        mkdir(at("da"), 0755); mkdir(at("db"), 0755); put("da/one", "1"); put("db/two", "2");
        r = err(sys_renameat2(at("da"), at("db"), RENAME_EXCHANGE));
        if (r) report("renameat2:RENAME_EXCHANGE", r, "files exchange, non-empty directories (/usr <-> staging) do not");
        else if (strcmp(get("da/two"), "2") || strcmp(get("db/one"), "1"))
            report("renameat2:RENAME_EXCHANGE", WRONG, "directories: da/two='%s' db/one='%s' after the exchange",
                   get("da/two"), get("db/one"));
        else report("renameat2:RENAME_EXCHANGE", 0, "two files and two non-empty directories swapped, contents checked");
    }
    put("na", "A"); put("nb", "B");
    r = err(sys_renameat2(at("na"), at("nb"), RENAME_NOREPLACE));
    if (r == 0)
        report("renameat2:RENAME_NOREPLACE", WRONG, "replaced an existing name (nb now '%s'): the flag was ignored",
               get("nb"));
    else if (r != EEXIST) report("renameat2:RENAME_NOREPLACE", r, "expected EEXIST on an existing target");
    else if (strcmp(get("na"), "A") || strcmp(get("nb"), "B"))
        report("renameat2:RENAME_NOREPLACE", WRONG, "EEXIST but the names changed");
    else {
        r = err(sys_renameat2(at("na"), at("nc"), RENAME_NOREPLACE));
        report("renameat2:RENAME_NOREPLACE", r, r ? "refused a free target" :
               "EEXIST on an existing name, renames to a free one");
    }
    r = err(symlink(".moss/root/1/usr", at("usr")));
    if (!r) r = err(symlink(".moss/root/2/usr", at("usr.next")));
    if (!r) r = err(rename(at("usr.next"), at("usr")));
    char link[64] = {0};
    if (r) report("rename", r, "symlink over symlink (swap strategy symlink)");
    else if (readlink(at("usr"), link, sizeof link - 1) < 0 || strcmp(link, ".moss/root/2/usr"))
        report("rename", WRONG, "usr -> '%s' after replacing it (expected .moss/root/2/usr)", link);
    else {
        put("ra", "new"); put("rb", "old"); mkdir(at("rd"), 0755); put("rd/in", "x");
        r = err(rename(at("ra"), at("rb")));
        if (!r) r = err(rename(at("rd"), at("rd2")));
        if (r) report("rename", r, "file over file or a directory rename refused");
        else if (strcmp(get("rb"), "new") || strcmp(get("rd2/in"), "x") || access(at("ra"), F_OK) == 0)
            report("rename", WRONG, "rb='%s' rd2/in='%s' after renaming", get("rb"), get("rd2/in"));
        else report("rename", 0, "symlink over symlink, file over file and a directory renamed, contents checked");
    }
}

static void probe_links(void) {
    put("asset", "content");
    mkdir(at("tree"), 0755);
    int dfd = open(at("tree"), O_RDONLY | O_DIRECTORY);
    int r = err(syscall(SYS_linkat, AT_FDCWD, at("asset"), dfd, "linked", 0));
    struct stat a, l;
    if (r) report("linkat", r, "hard link from the store refused");
    else if (stat(at("asset"), &a) || stat(at("tree/linked"), &l) || a.st_ino != l.st_ino || a.st_dev != l.st_dev)
        report("linkat", WRONG, "the link is another inode (%lu vs %lu): a copy, not a link",
               (unsigned long)a.st_ino, (unsigned long)l.st_ino);
    else if (a.st_nlink != 2 || l.st_nlink != 2)
        report("linkat", WRONG, "link count %lu/%lu after one link (expected 2)", (unsigned long)a.st_nlink,
               (unsigned long)l.st_nlink);
    else report("linkat", 0, "same inode %lu, link count 2 on both names", (unsigned long)a.st_ino);

    int src = open(at("asset"), O_RDONLY);
    r = err(syscall(SYS_linkat, src, "", dfd, "by-fd", AT_EMPTY_PATH));
    if (!r && (stat(at("tree/by-fd"), &l) || l.st_ino != a.st_ino))
        report("linkat:AT_EMPTY_PATH", WRONG, "returned 0, but tree/by-fd is not the source inode");
    else report("linkat:AT_EMPTY_PATH", r, "link an open fd by name (moss's blit)");
    close(src);

    r = err(symlinkat("linked", dfd, "sym"));
    char target[32] = {0};
    if (!r && (readlinkat(dfd, "sym", target, sizeof target - 1) < 0 || strcmp(target, "linked")))
        report("symlinkat", WRONG, "readlink gives '%s'", target);
    else report("symlinkat", r, r ? "symlinks refused" : "created, readlink round-trips");

    r = err(mkdirat(dfd, "sub", 0755));
    struct stat d;
    if (!r && (fstatat(dfd, "sub", &d, 0) || !S_ISDIR(d.st_mode)))
        report("mkdirat", WRONG, "mkdirat returned 0 but no directory exists");
    else report("mkdirat", r, "directory created relative to a directory fd");

    int fd = syscall(SYS_openat, dfd, "fresh", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
    if (fd < 0) report("openat:O_CREAT|O_EXCL", errno, "exclusive create refused");
    else {
        int again = syscall(SYS_openat, dfd, "fresh", O_WRONLY | O_CREAT | O_EXCL, 0600);
        int e = again < 0 ? errno : 0;
        int have_link = symlinkat("fresh", dfd, "to-fresh") == 0;
        int via = have_link ? syscall(SYS_openat, dfd, "to-fresh", O_WRONLY | O_CREAT | O_EXCL, 0600) : -1;
        int ev = have_link ? (via < 0 ? errno : 0) : EPERM;
        if (again >= 0) { close(again); report("openat:O_CREAT|O_EXCL", WRONG, "a second exclusive create of an existing name succeeded"); }
        else if (via >= 0) { close(via); report("openat:O_CREAT|O_EXCL", WRONG, "exclusive create followed a final symlink"); }
        else report("openat:O_CREAT|O_EXCL", 0, "creates; existing name -> %s, final symlink -> %s", errname(e),
                    have_link ? errname(ev) : "not tested (no symlinks here)");
        r = err(fchmod(fd, 0444));
        struct stat s;
        if (!r && (fstat(fd, &s) || (s.st_mode & 07777) != 0444))
            report("fchmod", WRONG, "mode is %o after fchmod 0444", s.st_mode & 07777);
        else report("fchmod", r, "mode 0444 applied and read back");
        r = err(fchown(fd, 1, 1));
        if (!r && (fstat(fd, &s) || s.st_uid != 1 || s.st_gid != 1))
            report("fchown", WRONG, "owner %u:%u after fchown 1:1", s.st_uid, s.st_gid);
        else report("fchown", r, "owner 1:1 applied and read back");
        close(fd);
    }
    struct stat ls;
    int nf = syscall(SYS_openat, dfd, "sym", O_RDONLY | O_NOFOLLOW);
    int nfe = nf < 0 ? errno : 0;
    if (fstatat(dfd, "sym", &ls, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISLNK(ls.st_mode))
        report("openat:O_NOFOLLOW", EPERM, "not tested: no symlink could be made here");
    else if (nf >= 0) { close(nf); report("openat:O_NOFOLLOW", WRONG, "opened through a final symlink"); }
    else report("openat:O_NOFOLLOW", nfe == ELOOP ? 0 : nfe, "final symlink -> %s (expected ELOOP)", errname(nfe));
    close(dfd);
}

static void probe_tmpfile(void) {
    int fd = syscall(SYS_openat, AT_FDCWD, base, O_TMPFILE | O_WRONLY, 0644);
    if (fd < 0) { report("openat:O_TMPFILE", errno, "unnamed file refused (extraction falls back to .part + rename)"); return; }
    struct stat s;
    fstat(fd, &s);
    int w = write(fd, "tmp", 3) == 3 ? 0 : errno;
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    int r = err(linkat(AT_FDCWD, proc, AT_FDCWD, at("named"), AT_SYMLINK_FOLLOW));
    if (r) r = err(syscall(SYS_linkat, fd, "", AT_FDCWD, at("named"), AT_EMPTY_PATH));
    struct stat n;
    if (w || r) report("openat:O_TMPFILE", w ? w : r, "unnamed file made, but linking it in by name failed");
    else if (s.st_nlink != 0) report("openat:O_TMPFILE", WRONG, "the unnamed file has link count %lu", (unsigned long)s.st_nlink);
    else if (stat(at("named"), &n) || n.st_ino != s.st_ino || strcmp(get("named"), "tmp"))
        report("openat:O_TMPFILE", WRONG, "linkat gave '%s' (another inode or content)", get("named"));
    else report("openat:O_TMPFILE", 0, "unnamed inode (nlink 0) linked in by name with its content");
    close(fd);
}

static void probe_copies(void) {
    put("src", "copy me");
    int src = open(at("src"), O_RDONLY), dst = open(at("clone"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int r = err(ioctl(dst, FICLONE, src));
    if (!r && strcmp(get("clone"), "copy me")) report("ioctl:FICLONE", WRONG, "clone holds '%s'", get("clone"));
    else report("ioctl:FICLONE", r, r ? "no reflinks (the blit uses hard links)" : "reflink content checked");
    close(dst);
    dst = open(at("cfr"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    loff_t in = 0, out = 0;
    long n = syscall(SYS_copy_file_range, src, &in, dst, &out, 7, 0);
    if (n < 0) report("copy_file_range", errno, "the blit falls back to sendfile");
    else if (n != 7 || strcmp(get("cfr"), "copy me")) report("copy_file_range", WRONG, "copied %ld bytes: '%s'", n, get("cfr"));
    else report("copy_file_range", 0, "7 bytes copied, content checked");
    close(dst);
    dst = open(at("sf"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    off_t off = 0;
    n = sendfile(dst, src, &off, 7);
    if (n < 0) report("sendfile", errno, "copy fallback refused");
    else if (n != 7 || strcmp(get("sf"), "copy me")) report("sendfile", WRONG, "copied %ld bytes: '%s'", n, get("sf"));
    else report("sendfile", 0, "7 bytes copied, content checked");
    close(src); close(dst);
}

static void probe_durability(void) {
    struct statfs sf;
    statfs(base, &sf);
    int volatile_fs = sf.f_type == TMPFS_MAGIC_ || sf.f_type == RAMFS_MAGIC_;
    int fd = open(at("durable"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    write(fd, "d", 1);
    int r = err(fsync(fd));
    report("fsync", r, r ? "fsync refused" : volatile_fs ? "returns 0 (volatile filesystem: nothing to persist)" : "returns 0");
    r = err(fdatasync(fd));
    report("fdatasync", r, r ? "fdatasync refused" : "returns 0");
    r = err(syncfs(fd));
    report("syncfs", r, r ? "syncfs refused" : "returns 0");
    close(fd);
    int dfd = open(base, O_RDONLY | O_DIRECTORY);
    r = err(fsync(dfd));
    report("fsync:directory", r, r ? "directory fsync refused (renames not durable)" : "returns 0");
    close(dfd);
    fd = open(at("osync"), O_WRONLY | O_CREAT | O_SYNC, 0644);
    report("openat:O_SYNC", fd < 0 ? errno : 0, fd < 0 ? "refused" : "accepted (whether writes are synchronous is not observable without a power cut)");
    if (fd >= 0) close(fd);
    sync();
    report("sync", 0, "returns (void)");
    if (volatile_fs)
        report("durability", WRONG, "statfs f_type 0x%lx: a memory filesystem, fsync/syncfs return 0 and nothing survives a power cut",
               (unsigned long)sf.f_type);
    else report("durability", 0, "statfs f_type 0x%lx: backed by a block device", (unsigned long)sf.f_type);
}

static void probe_lock_and_limits(void) {
    int fd = open(at(".moss-lockfile"), O_RDWR | O_CREAT, 0644);
    int r = err(flock(fd, LOCK_EX | LOCK_NB));
    if (r) report("flock:LOCK_EX|LOCK_NB", r, "installation lock refused");
    else {
        int other = open(at(".moss-lockfile"), O_RDWR);
        int second = err(flock(other, LOCK_EX | LOCK_NB));
        if (second == 0) report("flock:LOCK_EX|LOCK_NB", WRONG, "a second open file description took the same exclusive lock");
        else report("flock:LOCK_EX|LOCK_NB", second == EWOULDBLOCK ? 0 : second, "held lock refuses a second holder with %s", errname(second));
        close(other);
    }
    close(fd);
    struct rlimit rl, back;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    r = err(setrlimit(RLIMIT_NOFILE, &rl));
    if (!r && (getrlimit(RLIMIT_NOFILE, &back) || back.rlim_cur != rl.rlim_max))
        report("prlimit64:RLIMIT_NOFILE", WRONG, "soft limit %lu after raising it to %lu", (unsigned long)back.rlim_cur, (unsigned long)rl.rlim_max);
    else report("prlimit64:RLIMIT_NOFILE", r, "soft limit raised to the hard limit");
    struct statx sx;
    report("statx", err(syscall(SYS_statx, AT_FDCWD, base, 0, 0x7ff, &sx)), "basic stats");
}

static void probe_xattrs(void) {
    put("xattr", "x");
    int r = err(setxattr(at("xattr"), "user.stonelab", "value", 5, 0));
    if (r) { report("setxattr", r, "user.* xattr refused"); return; }
    char value[16] = {0}, names[256] = {0};
    long n = getxattr(at("xattr"), "user.stonelab", value, sizeof value);
    long l = listxattr(at("xattr"), names, sizeof names);
    int listed = 0;
    for (long i = 0; l > 0 && i < l; i += strlen(names + i) + 1) listed |= !strcmp(names + i, "user.stonelab");
    if (n != 5 || strcmp(value, "value")) report("setxattr", WRONG, "getxattr gives '%s' (%ld bytes)", value, n);
    else if (!listed) report("setxattr", WRONG, "listxattr does not list user.stonelab");
    else report("setxattr", 0, "user.stonelab set, read back and listed");
}

static int ns_changed(const char *kind, const char *before) {
    char path[64], now[64] = {0};
    snprintf(path, sizeof path, "/proc/self/ns/%s", kind);
    if (readlink(path, now, sizeof now - 1) < 0) return -1;
    return strcmp(before, now) != 0;
}

/* unshare(flag) in a child; the namespace link must change (and for PID, a grandchild is pid 1) */
static void probe_unshare(const char *key, int flag, const char *kind) {
    char path[64], before[64] = {0};
    snprintf(path, sizeof path, "/proc/self/ns/%s", kind);
    if (readlink(path, before, sizeof before - 1) < 0) { report(key, errno, "no /proc/self/ns/%s to compare", kind); return; }
    int pipefd[2];
    pipe(pipefd);
    pid_t pid = fork();
    if (pid == 0) {
        int out[2] = {0, 0};
        if (syscall(SYS_unshare, flag) < 0) out[0] = errno;
        else if (flag == CLONE_NEWPID) {
            pid_t inner = fork();
            if (inner == 0) _exit(getpid() == 1 ? 0 : 1);
            int st = 0;
            waitpid(inner, &st, 0);
            out[1] = WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 1 : 0;
        } else out[1] = ns_changed(kind, before);
        write(pipefd[1], out, sizeof out);
        _exit(0);
    }
    close(pipefd[1]);
    int res[2] = {EIO, 0};
    read(pipefd[0], res, sizeof res);
    close(pipefd[0]);
    waitpid(pid, NULL, 0);
    if (res[0]) report(key, res[0], "new %s namespace refused", kind);
    else if (res[1] != 1) report(key, WRONG, flag == CLONE_NEWPID ? "returned 0 but the first child is not pid 1" :
                                 "returned 0 but /proc/self/ns/%s is unchanged (%s)", kind, before);
    else report(key, 0, flag == CLONE_NEWPID ? "first child is pid 1" : "/proc/self/ns/%s changed", kind);
}

/* is / the initial ramfs (rootfs), which pivot_root refuses on every kernel? */
static int is_rootfs(void) {
    FILE *f = fopen("/proc/self/mountinfo", "r");
    char line[1024];
    int found = 0;
    while (f && fgets(line, sizeof line, f)) {
        char mnt[512];
        if (sscanf(line, "%*s %*s %*s %*s %511s", mnt) == 1 && !strcmp(mnt, "/") && strstr(line, " - rootfs "))
            found = 1;
    }
    if (f) fclose(f);
    return found;
}

/* in a child with a private mount namespace: propagation, bind, read-only bind, pivot_root, chroot */
static void probe_mounts(void) {
    mkdir(at("src-tree"), 0755); put("src-tree/marker", "m");
    mkdir(at("bind"), 0755); mkdir(at("bind/old"), 0755);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        if (syscall(SYS_unshare, CLONE_NEWNS) < 0) { report("mount:MS_BIND", errno, "no mount namespace to test in"); _exit(0); }
        int r = err(syscall(SYS_mount, NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL));
        report("mount:MS_PRIVATE|MS_REC", r, r ? "propagation change refused" : "/ made private (recursive)");
        r = err(syscall(SYS_mount, at("src-tree"), at("bind"), NULL, MS_BIND, NULL));
        if (!r && strcmp(get("bind/marker"), "m")) report("mount:MS_BIND", WRONG, "bind mount does not show the source (marker '%s')", get("bind/marker"));
        else report("mount:MS_BIND", r, "source tree visible at the bind mount");
        if (r) _exit(0);
        r = err(syscall(SYS_mount, NULL, at("bind"), NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL));
        if (!r) {
            int fd = open(at("bind/written"), O_WRONLY | O_CREAT, 0644);
            int e = fd < 0 ? errno : 0;
            if (fd >= 0) { close(fd); report("mount:MS_BIND|MS_RDONLY|MS_REMOUNT", WRONG, "a file was created on the read-only bind mount"); }
            else report("mount:MS_BIND|MS_RDONLY|MS_REMOUNT", e == EROFS ? 0 : WRONG, "create on the read-only bind -> %s (expected EROFS)", errname(e));
        } else report("mount:MS_BIND|MS_RDONLY|MS_REMOUNT", r, "read-only remount of a bind refused");
        umount2(at("bind"), MNT_DETACH);
        /* pivot_root needs a mount point as the new root */
        mkdir(at("outer"), 0755); mkdir(at("outer/newroot"), 0755); mkdir(at("outer/newroot/old"), 0755);
        put("outer/newroot/ROOT", "new");
        r = err(syscall(SYS_mount, at("outer/newroot"), at("outer/newroot"), NULL, MS_BIND, NULL));
        if (!r) r = err(chdir(at("outer/newroot")));
        if (!r) r = err(syscall(SYS_pivot_root, ".", "old"));
        const char *how = "";
        if (r == EINVAL && is_rootfs()) {
            /* the initramfs's rootfs can never be pivoted (Linux too): move a bind mount over / first, as
             * switch_root does, then try again from that root */
            how = " (from a bind mount moved over the initramfs root)";
            r = err(syscall(SYS_mount, at("outer"), at("outer"), NULL, MS_BIND | MS_REC, NULL));
            if (!r) r = err(chdir(at("outer")));
            if (!r) r = err(syscall(SYS_mount, ".", "/", NULL, MS_MOVE, NULL));
            if (!r) r = err(chroot("."));
            if (!r) r = err(chdir("/newroot"));
            if (!r) r = err(syscall(SYS_pivot_root, ".", "old"));
        }
        if (r) report("pivot_root", r, "the trigger sandbox's root switch refused%s", how);
        else {
            char buf[8] = {0};
            int fd = open("/ROOT", O_RDONLY);
            if (fd >= 0) { read(fd, buf, 3); close(fd); }
            int d = err(umount2("/old", MNT_DETACH));
            report("pivot_root", strcmp(buf, "new") ? WRONG : d, "%s%s", strcmp(buf, "new") ?
                   "/ROOT missing after pivot_root" : "new root in place, old root detached", how);
        }
        r = err(chroot("/"));
        report("chroot", r, "chroot into the (new) root");
        fflush(stdout);
        _exit(0);
    }
    waitpid(pid, NULL, 0);
    struct stat s;
    report("mount:namespace-isolation", stat(at("bind/marker"), &s) == 0 ? WRONG : 0,
           "the child's bind mount %s visible in the parent", stat(at("bind/marker"), &s) == 0 ? "is" : "is not");
}

static int mount_target(const char *device, const char *fstype, const char *dir) {
    char key[64];
    snprintf(key, sizeof key, "mount:%s", fstype);
    int r = err(syscall(SYS_mount, device, dir, fstype, 0, NULL));
    report(key, r, r ? "mounting %s on %s refused" : "%s mounted on %s", device, dir);
    return r;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 5) { fprintf(stderr, "usage: probe LABEL DIR [DEVICE FSTYPE]\n"); return 2; }
    label = argv[1];
    if (argc == 5) {
        mkdir(argv[2], 0755);
        if (mount_target(argv[3], argv[4], argv[2])) { printf("STONELAB-PROBE %s done\n", label); return 0; }
    }
    snprintf(base, sizeof base, "%s/stonelab-probe.%d", argv[2], (int)getpid());
    if (mkdir(base, 0755) != 0) { report("mkdir", errno, "cannot make the work directory in %s", argv[2]); return 1; }
    probe_renames();
    probe_links();
    probe_tmpfile();
    probe_copies();
    probe_durability();
    probe_lock_and_limits();
    probe_xattrs();
    probe_unshare("unshare:CLONE_NEWNS", CLONE_NEWNS, "mnt");
    probe_unshare("unshare:CLONE_NEWUTS", CLONE_NEWUTS, "uts");
    probe_unshare("unshare:CLONE_NEWIPC", CLONE_NEWIPC, "ipc");
    probe_unshare("unshare:CLONE_NEWNET", CLONE_NEWNET, "net");
    probe_unshare("unshare:CLONE_NEWPID", CLONE_NEWPID, "pid");
    probe_unshare("unshare:CLONE_NEWUSER", CLONE_NEWUSER, "user");
    probe_mounts();
    if (argc == 5) umount2(argv[2], 0);
    printf("STONELAB-PROBE %s done\n", label);
    fflush(stdout);
    return 0;
}
