/* stonelab kernel probe: exercises, on a running kernel, every kernel feature the reference package manager's
 * transaction and boot paths use (see lab/kernel/trace.py for how that list is traced), one directory at a time.
 *
 *   probe LABEL DIR [VFAT_DEVICE]
 *
 * prints one line per feature:  STONELAB-PROBE <label> <feature> ok | fail <ERRNO> <number> [note]
 * Static, no libc extensions beyond syscall(2): it must run on foreign kernels (Asterinas) from a busybox
 * initramfs.  Written for stonelab; no upstream code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
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

static const char *label;
static char base[3072];

static const char *errname(int e) {
    switch (e) {
    case EPERM: return "EPERM"; case ENOENT: return "ENOENT"; case EIO: return "EIO";
    case EBADF: return "EBADF"; case EACCES: return "EACCES"; case EEXIST: return "EEXIST";
    case EXDEV: return "EXDEV"; case ENODEV: return "ENODEV"; case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR"; case EINVAL: return "EINVAL"; case ENOTTY: return "ENOTTY";
    case ENOSPC: return "ENOSPC"; case EROFS: return "EROFS"; case EMLINK: return "EMLINK";
    case ENOSYS: return "ENOSYS"; case ENOTEMPTY: return "ENOTEMPTY"; case ELOOP: return "ELOOP";
    case EOPNOTSUPP: return "EOPNOTSUPP"; case ENOTBLK: return "ENOTBLK"; case EBUSY: return "EBUSY";
    default: return "E?";
    }
}

static void report(const char *feature, int rc, const char *note) {
    if (rc == 0)
        printf("STONELAB-PROBE %s %s ok%s%s\n", label, feature, note ? " " : "", note ? note : "");
    else
        printf("STONELAB-PROBE %s %s fail %s %d%s%s\n", label, feature, errname(rc), rc, note ? " " : "",
               note ? note : "");
    fflush(stdout);
}

static char *at(const char *name) {
    static char paths[8][4096];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, 4096, "%s/%s", base, name);
    return p;
}

static int make_file(const char *name, const char *content) {
    int fd = open(at(name), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return errno;
    if (content && write(fd, content, strlen(content)) < 0) { int e = errno; close(fd); return e; }
    close(fd);
    return 0;
}

static int rc(long r) { return r < 0 ? errno : 0; }

static void probe_renames(void) {
    mkdir(at("xa"), 0755); mkdir(at("xb"), 0755);
    make_file("xa/marker", "a");
    int r = rc(syscall(SYS_renameat2, AT_FDCWD, at("xa"), AT_FDCWD, at("xb"), RENAME_EXCHANGE));
    struct stat st;
    if (r == 0 && stat(at("xb/marker"), &st) != 0) r = EIO;  /* claimed success, did not exchange */
    report("renameat2_exchange", r, "swap strategy exchange: /usr <-> staging");
    make_file("na", "a"); make_file("nb", "b");
    int n = rc(syscall(SYS_renameat2, AT_FDCWD, at("na"), AT_FDCWD, at("nb"), RENAME_NOREPLACE));
    report("renameat2_noreplace_refuses", n == EEXIST ? 0 : (n ? n : EINVAL), "expected EEXIST");
    unlink(at("usr")); unlink(at("usr.next"));
    int s = rc(symlink(".moss/root/1/usr", at("usr")));
    if (s == 0) s = rc(symlink(".moss/root/2/usr", at("usr.next")));
    if (s == 0) s = rc(rename(at("usr.next"), at("usr")));
    char buf[64] = {0};
    if (s == 0 && (readlink(at("usr"), buf, sizeof buf - 1) < 0 || strcmp(buf, ".moss/root/2/usr") != 0)) s = EIO;
    report("rename_symlink_over_symlink", s, "swap strategy symlink: usr.next -> usr");
    make_file("da", "x"); mkdir(at("dd"), 0755); make_file("dd/inner", "y");
    report("rename_directory", rc(rename(at("dd"), at("dd2"))), "archive a tree: staging/usr -> root/<id>/usr");
}

static void probe_links(void) {
    make_file("asset", "content");
    mkdir(at("tree"), 0755);
    int dfd = open(at("tree"), O_RDONLY | O_DIRECTORY);
    report("open_directory_fd", dfd < 0 ? errno : 0, "blit works relative to directory fds");
    int r = rc(linkat(AT_FDCWD, at("asset"), dfd, "linked", 0));
    report("linkat", r, "blit: hard link from the store");
    report("symlinkat", rc(symlinkat("linked", dfd, "sym")), "blit: symlinks");
    report("mkdirat", rc(mkdirat(dfd, "sub", 0755)), "blit: directories");
    int fd = openat(dfd, "empty", O_WRONLY | O_CREAT | O_EXCL, 0600);
    report("openat_create_excl", fd < 0 ? errno : 0, "blit: fresh empty files");
    if (fd >= 0) {
        report("fchmod", rc(fchmod(fd, 0444)), "blit: mode & ~0222");
        report("fchown", rc(fchown(fd, 0, 0)), "blit: owners (root)");
        report("fsync", rc(fsync(fd)), "durability of a written file");
        report("fdatasync", rc(fdatasync(fd)), NULL);
        close(fd);
    }
    report("syncfs", rc(syncfs(dfd)), "reference: one syncfs before the intent record");
    report("fsync_directory", rc(fsync(dfd)), "reference: directory entries after rename");
    if (dfd >= 0) close(dfd);
}

static void probe_copies(void) {
    make_file("src", "copy me");
    int src = open(at("src"), O_RDONLY), dst = open(at("dst"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    report("ioctl_ficlone", rc(ioctl(dst, FICLONE, src)), "blit strategy reflink");
    lseek(src, 0, SEEK_SET);
    loff_t in = 0, out = 0;
    report("copy_file_range", rc(syscall(SYS_copy_file_range, src, &in, dst, &out, 7, 0)), "blit strategy copy");
    off_t off = 0;
    report("sendfile", rc(sendfile(dst, src, &off, 7)), "copy fallback");
    close(src); close(dst);
    int t = open(base, O_TMPFILE | O_WRONLY, 0600);
    report("open_tmpfile", t < 0 ? errno : 0, "not used by the reference; used by some tools");
    if (t >= 0) close(t);
}

static void probe_lock_and_limits(void) {
    int fd = open(at(".moss-lockfile"), O_RDWR | O_CREAT, 0644);
    report("flock_exclusive_nonblocking", rc(flock(fd, LOCK_EX | LOCK_NB)), "installation lock");
    close(fd);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    report("setrlimit_nofile", rc(setrlimit(RLIMIT_NOFILE, &rl)), "wide trees (#841)");
    struct statx sx;
    report("statx", rc(syscall(SYS_statx, AT_FDCWD, base, 0, 0x7ff, &sx)), NULL);
}

static void probe_namespace(void) {
    pid_t pid = fork();
    if (pid == 0) {
        int r = rc(unshare(CLONE_NEWNS));
        report("unshare_newns", r, "transaction triggers run in a private mount namespace");
        if (r) _exit(0);
        report("mount_make_rprivate", rc(mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)), NULL);
        mkdir(at("bind"), 0755);
        int b = rc(mount(base, at("bind"), NULL, MS_BIND, NULL));
        report("mount_bind", b, "triggers: staged /usr and /etc bound into the sandbox");
        if (b == 0) {
            int ro = rc(mount(NULL, at("bind"), NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL));
            report("mount_bind_readonly", ro, "triggers: /etc read-only");
            int fd = open(at("bind/rofile"), O_WRONLY | O_CREAT, 0644);
            report("readonly_bind_enforced", fd < 0 && errno == EROFS ? 0 : EINVAL, "expected EROFS");
            if (fd >= 0) close(fd);
            umount2(at("bind"), MNT_DETACH);
        }
        report("chroot", rc(chroot(base)), "triggers run chrooted into the isolation root");
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
}

static void probe_vfat(const char *device) {
    mkdir(at("esp"), 0755);
    int r = rc(mount(device, at("esp"), "vfat", 0, NULL));
    report("mount_vfat", r, "boot sync writes the ESP (vfat)");
    if (r == 0) {
        int fd = open(at("esp/stonelab.tmp"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int w = fd < 0 ? errno : 0;
        if (fd >= 0) { w = rc(write(fd, "entry", 5)); if (!w) w = rc(fsync(fd)); close(fd); }
        if (!w) w = rc(rename(at("esp/stonelab.tmp"), at("esp/stonelab.conf")));
        report("vfat_write_fsync_rename", w, "crash-safe ESP copies");
        umount2(at("esp"), 0);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: probe LABEL DIR [VFAT_DEVICE]\n"); return 2; }
    label = argv[1];
    snprintf(base, sizeof base, "%s/stonelab-probe.%d", argv[2], (int)getpid());
    if (mkdir(base, 0755) != 0) { report("mkdir_workdir", errno, argv[2]); return 1; }
    probe_renames();
    probe_links();
    probe_copies();
    probe_lock_and_limits();
    probe_namespace();
    if (argc > 3) probe_vfat(argv[3]);
    printf("STONELAB-PROBE %s done\n", label);
    fflush(stdout);
    return 0;
}
