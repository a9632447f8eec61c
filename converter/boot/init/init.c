/*
 * imgconv-init: PID 1 of a VM made from a container image ("container mode").
 *
 * One static binary, two stages:
 *
 *   stage 1 (PID 1 on the kernel's rootfs, a ramfs or tmpfs, holding /imgconv-initramfs): the
 *     initramfs. Mount /dev /proc /sys, load the block drivers listed in /load.list, find the
 *     root filesystem named by root= on the kernel command line (UUID=, LABEL= or /dev/NAME) by
 *     reading ext2/3/4 superblocks, mount it on /newroot, switch_root into it and exec the
 *     stage-2 binary (imgconv.init=, default /.imgconv/init), which is this same program copied
 *     into the image. The root's type, not the marker, is what an image cannot forge.
 *
 *   stage 2 (PID 1 anywhere else): the container runtime. Mount what docker/runc would mount,
 *     read the run spec written by imgconv (imgconv.spec=, default /.imgconv/init.spec),
 *     resolve the user exactly as runc's libcontainer/user does, provide docker's generated
 *     /etc/hostname, /etc/hosts and /etc/resolv.conf, start the workload with its stdout and
 *     stderr on pipes (or a terminal, -t), relay them to the host (the stream port of stream.h,
 *     or the console), stdin from the host with -i, forward signals, and power the VM off when
 *     the workload exits.
 *
 * The workload runs as in a container: PID 1 of its own PID namespace, with a private mount
 * namespace and a /proc of that PID namespace. So `echo $$` prints 1, orphans are reparented
 * to the workload (which reaps them or not, as under docker), a signal it has no handler for is
 * ignored (SIGTERM from a stop, or `kill $$`), and when it exits the kernel kills everything
 * left in its namespace. This program stays the VM's PID 1 outside that namespace: it relays
 * the output, forwards signals to the workload, waits for it and powers off.
 *
 * It must work in images that have no shell and no libc, so it depends on nothing but the
 * kernel. It prints nothing of its own except the console markers read by the host
 * (converter/boot/console.py) and one "imgconv-init: error: ..." line on failure, unless
 * imgconv.debug is on the kernel command line.
 *
 * Spec format: NUL-terminated strings in key/value pairs; the first pair is "version" "1";
 * keys: arg (repeated, the whole argv), env (repeated, KEY=VALUE), cwd, user, hostname;
 * unknown keys are ignored.
 *
 * Generated files: like docker, /etc/hostname (the spec's hostname), /etc/hosts (docker's for a
 * container without network) and /etc/resolv.conf are files of a small tmpfs bind-mounted over
 * the image's (which are never changed; a missing one gets an empty mount point, as docker makes
 * them). resolv.conf is what `imgconv boot` computed from the host's the way docker does, passed
 * as the QEMU firmware config file opt/imgconv/resolv.conf; without it (a plain qemu boot) it is
 * what docker writes on a host without one.
 *
 * Console protocol: "<<imgconv:start>>\n" right before the workload starts, then the workload's
 * bytes, unchanged; at the end "<<imgconv:exit status=N>>\n" right after the workload's last
 * byte, mid-line if that is where the output stopped (no newline is added, so the host never has
 * to hold one back). Nothing follows it: the kernel is silenced first.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <sys/io.h>
#define HAVE_FW_CFG_PORTS 1
#endif

#define PROG "imgconv-init"
#define DEFAULT_STAGE2 "/.imgconv/init"
#define DEFAULT_SPEC "/.imgconv/init.spec"
#define INITRAMFS_MARKER "/imgconv-initramfs"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Not in musl's headers (it ships no linux/ headers). */
#define RAMFS_MAGIC 0x858458f6u
#define TMPFS_MAGIC 0x01021994u
#define SYSLOG_ACTION_CONSOLE_LEVEL 8

#define ROOT_WAIT_SECONDS 30
#define DRAIN_SECONDS 5
#define MAX_SPEC_BYTES (64u << 20)
#define MAX_USERDB_BYTES (16u << 20)

/* ---------------------------------------------------------------- output -- */

static int debug_on;
static int stage;               /* 1 or 2, for fatal() */

static void put(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return; /* nowhere left to complain */
		}
		p += n;
		len -= (size_t)n;
	}
}

static void vsay(const char *prefix, const char *fmt, va_list ap)
{
	char line[1024];
	int n = snprintf(line, sizeof line, PROG ": %s", prefix);
	if (n < 0)
		return;
	int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
	size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
	if (len > sizeof line - 2)
		len = sizeof line - 2;
	line[len++] = '\n';
	put(2, line, len); /* one write: the line cannot be split by other output */
}

__attribute__((format(printf, 1, 2))) static void debug(const char *fmt, ...)
{
	if (!debug_on)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsay("", fmt, ap);
	va_end(ap);
}

static void emit_exit(int status);

__attribute__((noreturn)) static void power_off(void)
{
	if (getpid() != 1)
		_exit(125); /* the --resolve-user test mode: never power off the host */
	tcdrain(1); /* the serial line is asynchronous: let the last bytes out first */
	sync();
	reboot(RB_POWER_OFF);
	for (;;) /* PID 1 must never exit: that is a kernel panic */
		pause();
}

__attribute__((noreturn, format(printf, 1, 2))) static void fatal(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsay("error: ", fmt, ap);
	va_end(ap);
	if (stage == 2)
		emit_exit(125);
	power_off();
}

/* Console loglevel 0 (the sysctl accepts 0 where klogctl stops at 1): not even "reboot: Power
 * down" is printed after this. */
static void silence_kernel(void)
{
	int fd = open("/proc/sys/kernel/printk", O_WRONLY | O_CLOEXEC);
#ifdef SYS_fsmount
	if (fd < 0) {
		/* /proc is not mounted (a failure came first, maybe on a read-only root without a
		 * /proc directory): a detached proc mount (Linux 5.2+) needs no mount point. */
		int fs = (int)syscall(SYS_fsopen, "proc", 1 /* FSOPEN_CLOEXEC */);
		if (fs >= 0) {
			int mnt = -1;
			if (syscall(SYS_fsconfig, fs, 6 /* FSCONFIG_CMD_CREATE */, NULL, NULL, 0) == 0)
				mnt = (int)syscall(SYS_fsmount, fs, 1 /* FSMOUNT_CLOEXEC */, 0);
			if (mnt >= 0) {
				fd = openat(mnt, "sys/kernel/printk", O_WRONLY | O_CLOEXEC);
				close(mnt);
			}
			close(fs);
		}
	}
#endif
	if (fd >= 0) {
		put(fd, "0\n", 2);
		close(fd);
	}
}

/* The exit marker is the last thing on the console: the host takes only a marker that nothing
 * follows as the exit (a workload may print marker-like text), so the kernel is silenced first.
 * It follows the workload's last byte directly, even mid-line. */
static void emit_exit(int status)
{
	silence_kernel();
	char marker[64];
	int n = snprintf(marker, sizeof marker, "<<imgconv:exit status=%d>>\n", status);
	put(1, marker, (size_t)n);
}

/* ------------------------------------------------------------ utilities -- */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		fatal("out of memory");
	return p;
}

/* Read a whole file; NUL-terminated for convenience (binary content is fine, *len is exact).
 * Returns NULL with errno set on failure. */
static char *read_file(const char *path, size_t limit, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	size_t cap = 4096, used = 0;
	char *buf = xmalloc(cap + 1);
	for (;;) {
		if (used == cap) {
			if (cap >= limit) {
				free(buf);
				close(fd);
				errno = EFBIG;
				return NULL;
			}
			cap *= 2;
			char *bigger = realloc(buf, cap + 1);
			if (!bigger)
				fatal("out of memory");
			buf = bigger;
		}
		ssize_t n = read(fd, buf + used, cap - used);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			int e = errno;
			free(buf);
			close(fd);
			errno = e;
			return NULL;
		}
		if (n == 0)
			break;
		used += (size_t)n;
	}
	close(fd);
	buf[used] = '\0';
	*len = used;
	return buf;
}

static int is_dir(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Go's strconv.Atoi: optional sign, decimal digits, nothing else. On a syntax error the value
 * is 0, on overflow it is clamped; both are errors (returns -1). */
static int go_atoi(const char *s, long long *out)
{
	*out = 0;
	const char *p = s;
	int neg = 0;
	if (*p == '+' || *p == '-')
		neg = *p++ == '-';
	if (*p == '\0')
		return -1;
	unsigned long long v = 0, lim = neg ? (unsigned long long)INT64_MAX + 1 : (unsigned long long)INT64_MAX;
	int range = 0;
	for (; *p; p++) {
		if (*p < '0' || *p > '9')
			return -1;
		if (!range) {
			unsigned d = (unsigned)(*p - '0');
			if (v > (lim - d) / 10)
				range = 1;
			else
				v = v * 10 + d;
		}
	}
	if (range)
		v = lim;
	*out = neg ? (long long)(0 - v) : (long long)v;
	return range ? -1 : 0;
}

/* Lower-case first letter, as Go prints errno texts ("no such file or directory"). */
static const char *errtext(int err)
{
	static char buf[128];
	snprintf(buf, sizeof buf, "%s", strerror(err));
	if (buf[0] >= 'A' && buf[0] <= 'Z')
		buf[0] = (char)(buf[0] - 'A' + 'a');
	return buf;
}

/* --------------------------------------------------------- command line -- */

struct cmdline {
	const char *root;
	int ro;
	const char *stage2;
	const char *spec;
};

/* Split /proc/cmdline like the kernel does: spaces separate parameters, double quotes group
 * (and are dropped). Only the parameters imgconv cares about are kept. */
static void parse_cmdline(struct cmdline *c)
{
	static char buf[4096];
	memset(c, 0, sizeof *c);
	c->stage2 = DEFAULT_STAGE2;
	c->spec = DEFAULT_SPEC;
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return;
	buf[n] = '\0';

	char *r = buf, *w = buf;
	while (*r) {
		while (*r == ' ' || *r == '\t' || *r == '\n')
			r++;
		if (!*r)
			break;
		char *tok = w;
		int quoted = 0;
		for (; *r && (quoted || (*r != ' ' && *r != '\t' && *r != '\n')); r++) {
			if (*r == '"')
				quoted = !quoted;
			else
				*w++ = *r;
		}
		if (*r)
			r++;
		*w++ = '\0';

		if (strcmp(tok, "--") == 0)
			break; /* the rest belongs to init's argv */
		char *eq = strchr(tok, '=');
		const char *val = eq ? eq + 1 : NULL;
		if (eq)
			*eq = '\0';
		if (strcmp(tok, "root") == 0 && val)
			c->root = val;
		else if (strcmp(tok, "ro") == 0 && !val)
			c->ro = 1;
		else if (strcmp(tok, "rw") == 0 && !val)
			c->ro = 0;
		else if (strcmp(tok, "imgconv.init") == 0 && val && *val)
			c->stage2 = val;
		else if (strcmp(tok, "imgconv.spec") == 0 && val && *val)
			c->spec = val;
		else if (strcmp(tok, "imgconv.debug") == 0)
			debug_on = !val || strcmp(val, "0") != 0;
	}
}

/* ==================================================================== stage 1 == */

static void load_modules(void)
{
	size_t len;
	char *list = read_file("/load.list", 1 << 20, &len);
	if (!list) {
		debug("no /load.list: %s", strerror(errno));
		return;
	}
	for (char *line = strtok(list, "\n"); line; line = strtok(NULL, "\n")) {
		if (!*line)
			continue;
		int fd = open(line, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			debug("module %s: %s", line, strerror(errno));
			continue;
		}
		if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
			debug("module %s: %s", line, strerror(errno));
		else
			debug("module %s loaded", line);
		close(fd);
	}
	free(list);
}

static int ascii_lower(int ch)
{
	return ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch;
}

/* Does the ext2/3/4 superblock of this device carry the wanted UUID or label? */
static int superblock_matches(const char *dev, const char *uuid, const char *label)
{
	int fd = open(dev, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return 0;
	unsigned char sb[256];
	ssize_t n = pread(fd, sb, sizeof sb, 1024);
	close(fd);
	if (n != (ssize_t)sizeof sb || sb[0x38] != 0x53 || sb[0x39] != 0xEF)
		return 0;
	if (uuid) {
		char text[37];
		const unsigned char *u = sb + 0x68;
		snprintf(text, sizeof text,
			 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
			 u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
			 u[15]);
		for (size_t i = 0;; i++) {
			if (ascii_lower((unsigned char)uuid[i]) != text[i])
				return 0;
			if (!text[i])
				return 1;
		}
	}
	char name[17];
	memcpy(name, sb + 0x78, 16);
	name[16] = '\0';
	return strcmp(name, label) == 0;
}

/* Look once through /sys/class/block for the root device; make missing /dev nodes. */
static int scan_for_root(const char *root, char *found, size_t foundlen)
{
	const char *uuid = NULL, *label = NULL, *devname = NULL;
	if (strncmp(root, "UUID=", 5) == 0)
		uuid = root + 5;
	else if (strncmp(root, "LABEL=", 6) == 0)
		label = root + 6;
	else
		devname = root + 5; /* "/dev/" checked by the caller */

	DIR *d = opendir("/sys/class/block");
	if (!d)
		return 0;
	int ok = 0;
	struct dirent *e;
	while (!ok && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char path[300], text[32];
		snprintf(path, sizeof path, "/sys/class/block/%s/dev", e->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, text, sizeof text - 1);
		close(fd);
		unsigned maj, min;
		if (n <= 0)
			continue;
		text[n] = '\0';
		if (sscanf(text, "%u:%u", &maj, &min) != 2)
			continue;
		snprintf(path, sizeof path, "/dev/%s", e->d_name);
		struct stat st;
		if (stat(path, &st) < 0 && mknod(path, S_IFBLK | 0600, makedev(maj, min)) < 0)
			continue;
		if (devname)
			ok = strcmp(e->d_name, devname) == 0;
		else
			ok = superblock_matches(path, uuid, label);
		if (ok)
			snprintf(found, foundlen, "%s", path);
	}
	closedir(d);
	return ok;
}

/* Empty the initramfs (it stays in RAM otherwise), staying on its own filesystem. */
static void delete_tree(int dirfd, dev_t rootdev)
{
	DIR *d = fdopendir(dirfd);
	if (!d) {
		close(dirfd);
		return;
	}
	struct dirent *e;
	while ((e = readdir(d))) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		struct stat st;
		if (fstatat(dirfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || st.st_dev != rootdev)
			continue; /* a mount point such as /newroot */
		if (S_ISDIR(st.st_mode)) {
			int sub = openat(dirfd, e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			if (sub >= 0)
				delete_tree(sub, rootdev);
			unlinkat(dirfd, e->d_name, AT_REMOVEDIR);
		} else {
			unlinkat(dirfd, e->d_name, 0);
		}
	}
	closedir(d);
}

/* Is / the kernel's rootfs (ramfs, or tmpfs), where it unpacked an initramfs? Never true of a disk. */
static int root_is_rootfs(void)
{
	struct statfs sfs;
	if (statfs("/", &sfs) < 0)
		return 0;
	return (unsigned)sfs.f_type == RAMFS_MAGIC || (unsigned)sfs.f_type == TMPFS_MAGIC;
}

static void free_initramfs(void)
{
	struct stat st;
	if (!root_is_rootfs() || stat("/", &st) < 0)
		return; /* never wipe a real disk */
	int fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0)
		delete_tree(fd, st.st_dev);
}

/* fds 0-2 must be the console; the kernel opens it only if /dev/console existed. */
static void ensure_console(void)
{
	if (fcntl(1, F_GETFD) >= 0 && fcntl(2, F_GETFD) >= 0)
		return;
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	for (int i = 0; i <= 2; i++)
		if (fcntl(i, F_GETFD) < 0)
			dup2(fd, i);
	if (fd > 2)
		close(fd);
}

static void network_up(void);

__attribute__((noreturn)) static void stage1(void)
{
	stage = 1;
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	ensure_console();
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		fatal("cannot mount /proc: %s", strerror(errno));
	if (mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		fatal("cannot mount /sys: %s", strerror(errno));

	struct cmdline c;
	parse_cmdline(&c);
	debug("stage 1: root=%s %s init=%s", c.root ? c.root : "(none)", c.ro ? "ro" : "rw", c.stage2);
	if (!c.root)
		fatal("no root= on the kernel command line");
	if (strncmp(c.root, "UUID=", 5) != 0 && strncmp(c.root, "LABEL=", 6) != 0 &&
	    strncmp(c.root, "/dev/", 5) != 0)
		fatal("root=%s is not supported (use UUID=, LABEL= or /dev/NAME)", c.root);

	load_modules();
	network_up();

	char dev[300];
	double deadline = now() + ROOT_WAIT_SECONDS;
	while (!scan_for_root(c.root, dev, sizeof dev)) {
		if (now() > deadline)
			fatal("root device %s not found after %d s", c.root, ROOT_WAIT_SECONDS);
		sleep_ms(20);
	}
	debug("root %s is %s", c.root, dev);

	if (mount(dev, "/newroot", "ext4", c.ro ? MS_RDONLY : 0, "") < 0)
		fatal("cannot mount %s (root=%s) as ext4: %s", dev, c.root, strerror(errno));
	umount2("/proc", MNT_DETACH);
	umount2("/sys", MNT_DETACH);
	/* Keep /dev (and the console on it) if the image has a place for it; stage 2 sees a
	 * mount point there and leaves it. */
	if (!is_dir("/newroot/dev") || mount("/dev", "/newroot/dev", NULL, MS_MOVE, NULL) < 0)
		umount2("/dev", MNT_DETACH);
	free_initramfs();

	if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0)
		fatal("cannot switch to the root filesystem: %s", strerror(errno));
	char *argv[] = {(char *)c.stage2, NULL};
	execv(c.stage2, argv);
	fatal("cannot run %s from the root filesystem: %s", c.stage2, strerror(errno));
}

/* ==================================================================== stage 2 == */

/* ------------------------------------------------------------- mounts -- */

static int mkdir_mode(const char *path, mode_t mode)
{
	if (mkdir(path, mode) < 0)
		return errno == EEXIST ? 0 : -1;
	return chmod(path, mode); /* mkdir is subject to the umask */
}

static int is_mount_point(const char *path)
{
	struct stat a, b;
	return stat(path, &a) == 0 && stat("/", &b) == 0 && a.st_dev != b.st_dev;
}

static int dir_is_empty(const char *path)
{
	DIR *d = opendir(path);
	if (!d)
		return 0;
	struct dirent *e;
	int empty = 1;
	while (empty && (e = readdir(d)))
		empty = strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
	closedir(d);
	return empty;
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags,
		       const char *opts)
{
	if (mount(src, dst, type, flags, opts) < 0)
		fatal("cannot mount %s on %s: %s", type, dst, strerror(errno));
}

static void soft_mount(const char *src, const char *dst, const char *type, unsigned long flags,
		       const char *opts)
{
	if (mount(src, dst, type, flags, opts) < 0)
		debug("cannot mount %s on %s: %s", type, dst, strerror(errno));
}

static void symlink_if_absent(const char *target, const char *path)
{
	struct stat st;
	if (lstat(path, &st) < 0 && symlink(target, path) < 0)
		debug("cannot create %s: %s", path, strerror(errno));
}

/* What a container runtime gives a container, minus what a VM does not need. */
static void setup_mounts(void)
{
	const unsigned long nse = MS_NOSUID | MS_NODEV | MS_NOEXEC;
	static const struct {
		const char *path;
		mode_t mode;
	} points[] = {{"/proc", 0555}, {"/sys", 0555}, {"/dev", 0755}, {"/run", 0755}, {"/tmp", 01777}};
	int fresh[5];
	for (size_t i = 0; i < 5; i++) {
		fresh[i] = !is_dir(points[i].path);
		if (fresh[i] && mkdir_mode(points[i].path, points[i].mode) < 0 && i < 3)
			fatal("cannot create %s: %s", points[i].path, strerror(errno));
	}
	must_mount("proc", "/proc", "proc", nse, NULL);
	soft_mount("sysfs", "/sys", "sysfs", nse, NULL);
	if (!is_mount_point("/dev"))
		must_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	ensure_console();

	if (mkdir_mode("/dev/pts", 0755) == 0)
		soft_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
			   "newinstance,ptmxmode=0666,mode=0620,gid=5");
	if (access("/dev/pts/ptmx", F_OK) == 0) { /* this instance's ptmx, as runc links it */
		unlink("/dev/ptmx");
		symlink_if_absent("pts/ptmx", "/dev/ptmx");
	}
	if (mkdir_mode("/dev/shm", 01777) == 0)
		soft_mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	symlink_if_absent("/proc/self/fd", "/dev/fd");
	symlink_if_absent("/proc/self/fd/0", "/dev/stdin");
	symlink_if_absent("/proc/self/fd/1", "/dev/stdout");
	symlink_if_absent("/proc/self/fd/2", "/dev/stderr");

	/* Never hide what the image put in /run or /tmp. */
	if (fresh[3] || dir_is_empty("/run"))
		soft_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	if (fresh[4] || dir_is_empty("/tmp"))
		soft_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	if (is_dir("/sys/fs/cgroup"))
		soft_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nse, NULL);
}

static void loopback_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		debug("no socket for lo: %s", strerror(errno));
		return;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
		debug("lo: %s", strerror(errno));
	} else {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
			debug("lo up: %s", strerror(errno));
	}
	close(s);
}

/* ----------------------------------------------------- generated /etc -- */

#define FW_CFG_RESOLV_CONF "opt/imgconv/resolv.conf"
#define MAX_RESOLV_CONF_BYTES (64u << 10)
#define ETC_FILES_TMPFS "/dev/.imgconv-etc"

/* libnetwork's /etc/hosts for a container without a network (no line for the container's IP). */
static const char DOCKER_HOSTS[] = "127.0.0.1\tlocalhost\n"
				   "::1\tlocalhost ip6-localhost ip6-loopback\n"
				   "fe00::0\tip6-localnet\n"
				   "ff00::0\tip6-mcastprefix\n"
				   "ff02::1\tip6-allnodes\n"
				   "ff02::2\tip6-allrouters\n";

/* What libnetwork writes for --network none on a host without a resolv.conf (or without a usable
 * nameserver in it): Google's public DNS, the IPv6 ones dropped since that network has no IPv6. */
static const char DOCKER_DEFAULT_RESOLV_CONF[] = "\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n";

#ifdef HAVE_FW_CFG_PORTS
#define FW_CFG_PORT_SEL 0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_SIGNATURE 0x0000
#define FW_CFG_FILE_DIR 0x0019

static void fw_cfg_read(void *buf, size_t len)
{
	unsigned char *p = buf;
	for (size_t i = 0; i < len; i++)
		p[i] = inb(FW_CFG_PORT_DATA);
}

static uint32_t be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Only QEMU has a firmware config device: the I/O ports of other hardware are left alone. */
static int on_qemu(void)
{
	if (access("/sys/bus/acpi/devices/QEMU0002:00", F_OK) == 0)
		return 1;
	char vendor[8] = "";
	int fd = open("/sys/class/dmi/id/sys_vendor", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, vendor, sizeof vendor - 1);
	close(fd);
	return n >= 4 && memcmp(vendor, "QEMU", 4) == 0;
}

/* A file given to qemu as -fw_cfg name=NAME,...; NULL when there is none. Read through the I/O
 * ports, as the firmware does: the kernel's qemu_fw_cfg driver is a module, often absent. */
static char *fw_cfg_file(const char *name, size_t limit, size_t *len)
{
	if (!on_qemu() || ioperm(FW_CFG_PORT_SEL, 2, 1) < 0)
		return NULL;
	char *data = NULL;
	unsigned char word[4], entry[64]; /* be32 size, be16 select, u16 reserved, char name[56] */
	outw(FW_CFG_SIGNATURE, FW_CFG_PORT_SEL);
	fw_cfg_read(word, sizeof word);
	if (memcmp(word, "QEMU", 4) == 0) {
		outw(FW_CFG_FILE_DIR, FW_CFG_PORT_SEL);
		fw_cfg_read(word, sizeof word);
		uint32_t count = be32(word);
		for (uint32_t i = 0; i < count && i < 4096; i++) {
			fw_cfg_read(entry, sizeof entry);
			entry[sizeof entry - 1] = '\0';
			if (strcmp((const char *)entry + 8, name) != 0)
				continue;
			uint32_t size = be32(entry);
			if (size <= limit) {
				data = xmalloc(size + 1);
				outw((unsigned short)(entry[4] << 8 | entry[5]), FW_CFG_PORT_SEL);
				fw_cfg_read(data, size);
				data[size] = '\0';
				*len = size;
			}
			break;
		}
	}
	ioperm(FW_CFG_PORT_SEL, 2, 0);
	return data;
}
#else
static char *fw_cfg_file(const char *name, size_t limit, size_t *len)
{
	(void)name, (void)limit, (void)len;
	return NULL;
}
#endif

/* ------------------------------------------------------------ network -- */

#define FW_CFG_NETWORK "opt/imgconv/network"
#define NIC_WAIT_MS 2000
#define GUEST_IFNAME "eth0"

/* The first network interface other than lo; waits a little, since the NIC's driver may still be probing. */
static int find_nic(char *name, size_t cap)
{
	for (long waited = 0; waited <= NIC_WAIT_MS; waited += 20) {
		DIR *dir = opendir("/sys/class/net");
		struct dirent *e;
		int found = 0;
		while (dir && (e = readdir(dir))) {
			size_t n = strlen(e->d_name);
			if (e->d_name[0] != '.' && strcmp(e->d_name, "lo") != 0 && n < cap) {
				memcpy(name, e->d_name, n + 1);
				found = 1;
				break;
			}
		}
		if (dir)
			closedir(dir);
		if (found)
			return 0;
		sleep_ms(20);
	}
	return -1;
}

/* A container's eth0 is up when its process starts; a NIC's operstate follows its carrier a moment
 * after it is brought up (the kernel's link watch), so a workload checking it at once could see "down". */
static void wait_link_up(const char *nic)
{
	char path[64], state[16];
	snprintf(path, sizeof path, "/sys/class/net/%s/operstate", nic);
	for (long waited = 0; waited <= NIC_WAIT_MS; waited += 10) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		ssize_t n = fd < 0 ? -1 : read(fd, state, sizeof state - 1);
		if (fd >= 0)
			close(fd);
		if (n >= 2 && memcmp(state, "up", 2) == 0) {
			debug("%s up after %ld ms", nic, waited);
			return;
		}
		sleep_ms(10);
	}
	debug("%s: no carrier", nic);
}

static int set_ipv4(int s, const char *ifname, unsigned long req, in_addr_t addr)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = addr;
	return ioctl(s, req, &ifr);
}

/* The NIC as in a container: named eth0, up, with the address and default route the host chose
 * (QEMU's user network: 10.0.2.15/24 via 10.0.2.2), given as the firmware config file
 * opt/imgconv/network ("address=A/P" and "gateway=G" lines). Without that file (--network none,
 * or a plain qemu boot) nothing is done; a failure leaves the workload without network, not dead. */
static void network_up(void)
{
	size_t len;
	char *conf = fw_cfg_file(FW_CFG_NETWORK, 4096, &len);
	if (!conf)
		return;
	char addr[32] = "", gw[32] = "", nic[IFNAMSIZ];
	int prefix = -1;
	for (char *line = strtok(conf, "\n"); line; line = strtok(NULL, "\n")) {
		if (sscanf(line, "address=%31[0-9.]/%d", addr, &prefix) != 2)
			sscanf(line, "gateway=%31[0-9.]", gw);
	}
	free(conf);
	struct in_addr a, g;
	if (!inet_aton(addr, &a) || prefix < 0 || prefix > 32) {
		debug("%s: no usable address", FW_CFG_NETWORK);
		return;
	}
	if (find_nic(nic, sizeof nic) < 0) {
		debug("no network interface appeared (is virtio_net in the initramfs?)");
		return;
	}
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		debug("no socket for %s: %s", nic, strerror(errno));
		return;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", nic);
	snprintf(ifr.ifr_newname, sizeof ifr.ifr_newname, GUEST_IFNAME);
	if (strcmp(nic, GUEST_IFNAME) != 0 && ioctl(s, SIOCSIFNAME, &ifr) == 0)
		snprintf(nic, sizeof nic, GUEST_IFNAME);
	in_addr_t mask = prefix ? htonl(~0u << (32 - prefix)) : 0;
	if (set_ipv4(s, nic, SIOCSIFADDR, a.s_addr) < 0 || set_ipv4(s, nic, SIOCSIFNETMASK, mask) < 0)
		debug("%s: address %s/%d: %s", nic, addr, prefix, strerror(errno));
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", nic);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0 ||
	    (ifr.ifr_flags |= IFF_UP | IFF_RUNNING, ioctl(s, SIOCSIFFLAGS, &ifr) < 0))
		debug("%s up: %s", nic, strerror(errno));
	if (inet_aton(gw, &g)) {
		struct rtentry rt;
		memset(&rt, 0, sizeof rt);
		((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
		((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
		struct sockaddr_in *via = (struct sockaddr_in *)&rt.rt_gateway;
		via->sin_family = AF_INET;
		via->sin_addr = g;
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = nic;
		if (ioctl(s, SIOCADDRT, &rt) < 0)
			debug("default route via %s: %s", gw, strerror(errno));
	}
	close(s);
	debug("%s: %s/%d via %s", nic, addr, prefix, gw);
}

static int interface_up(const char *name)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
	int up = s >= 0 && ioctl(s, SIOCGIFFLAGS, &ifr) == 0 && (ifr.ifr_flags & IFF_UP);
	if (s >= 0)
		close(s);
	return up;
}

/* Stage 2: the NIC is configured by stage 1 (network_up right after the drivers load, so the kernel's
 * link watch runs while the root is found and mounted); with an initramfs that is not imgconv's, here.
 * Then wait until eth0's operstate is up, as a container's is when its process starts. */
static void network_ready(void)
{
	if (!interface_up(GUEST_IFNAME))
		network_up();
	if (interface_up(GUEST_IFNAME))
		wait_link_up(GUEST_IFNAME);
}

/* Every directory leading to path (not path itself); errors are left to the caller's open. */
static void make_parents(const char *path)
{
	char buf[4096];
	if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
		return;
	for (char *p = buf + 1; (p = strchr(p, '/')); p++) {
		*p = '\0';
		mkdir(buf, 0755);
		*p = '/';
	}
}

/* What docker's init layer puts where a generated file is missing: an empty 0755 file, made
 * where the path leads when it is a dangling symlink (such as /etc/resolv.conf pointing into
 * systemd's /run, a fresh tmpfs here). */
static int make_mount_point(const char *path)
{
	struct stat st;
	if (stat(path, &st) == 0) {
		if (!S_ISDIR(st.st_mode))
			return 0;
		errno = EISDIR;
		return -1;
	}
	int fd = open(path, O_WRONLY | O_CREAT | O_NOCTTY | O_CLOEXEC, 0755);
	if (fd < 0 && errno == ENOENT) {
		char target[4096], full[8192];
		ssize_t n = readlink(path, target, sizeof target - 1);
		if (n > 0) {
			target[n] = '\0';
			const char *slash = strrchr(path, '/');
			if (target[0] == '/')
				snprintf(full, sizeof full, "%s", target);
			else
				snprintf(full, sizeof full, "%.*s/%s", (int)(slash - path), path, target);
			make_parents(full);
			fd = open(path, O_WRONLY | O_CREAT | O_NOCTTY | O_CLOEXEC, 0755);
		}
	}
	if (fd < 0)
		return -1;
	close(fd);
	return 0;
}

/* Docker's /etc/hostname, /etc/hosts and /etc/resolv.conf, bind-mounted over the image's. Their
 * tmpfs is mounted only while they are made: the bind mounts keep it alive, and nothing of it is
 * left anywhere else. A file that cannot be provided (a read-only root without the mount point, a
 * directory in its place) is skipped: the workload still runs. */
static void etc_files(const char *hostname)
{
	struct utsname uts;
	if (!*hostname && uname(&uts) == 0)
		hostname = uts.nodename;
	size_t hlen = strlen(hostname);
	char *hostname_file = xmalloc(hlen + 1);
	memcpy(hostname_file, hostname, hlen);
	hostname_file[hlen] = '\n';
	size_t rlen = 0;
	char *resolv = fw_cfg_file(FW_CFG_RESOLV_CONF, MAX_RESOLV_CONF_BYTES, &rlen);
	if (!resolv)
		debug("no %s from the host: docker's default resolv.conf", FW_CFG_RESOLV_CONF);
	const struct {
		const char *name, *data;
		size_t len;
	} files[] = {
		{"hostname", hostname_file, hlen + 1},
		{"hosts", DOCKER_HOSTS, sizeof DOCKER_HOSTS - 1},
		{"resolv.conf", resolv ? resolv : DOCKER_DEFAULT_RESOLV_CONF,
		 resolv ? rlen : sizeof DOCKER_DEFAULT_RESOLV_CONF - 1},
	};

	if ((mkdir(ETC_FILES_TMPFS, 0700) < 0 && errno != EEXIST) ||
	    mount("tmpfs", ETC_FILES_TMPFS, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m") < 0) {
		debug("no tmpfs for the generated /etc files: %s", strerror(errno));
		rmdir(ETC_FILES_TMPFS);
		free(hostname_file);
		free(resolv);
		return;
	}
	if (mkdir_mode("/etc", 0755) < 0)
		debug("cannot create /etc: %s", strerror(errno));
	for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
		char src[64], dst[64];
		snprintf(src, sizeof src, ETC_FILES_TMPFS "/%s", files[i].name);
		snprintf(dst, sizeof dst, "/etc/%s", files[i].name);
		int fd = open(src, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd < 0 || fchmod(fd, 0644) < 0) {
			debug("cannot write %s: %s", src, strerror(errno));
			if (fd >= 0)
				close(fd);
			continue;
		}
		put(fd, files[i].data, files[i].len);
		close(fd);
		if (make_mount_point(dst) < 0 || mount(src, dst, NULL, MS_BIND, NULL) < 0)
			debug("cannot provide %s: %s", dst, strerror(errno));
	}
	umount2(ETC_FILES_TMPFS, MNT_DETACH);
	rmdir(ETC_FILES_TMPFS);
	free(hostname_file);
	free(resolv);
}

/* --------------------------------------------------------------- spec -- */

struct spec {
	char **argv;
	size_t argc;
	char **env; /* room for HOME and the NULL */
	size_t envc;
	const char *cwd;
	const char *user;
	const char *hostname;
	/* The image's own Entrypoint, Cmd and Env (key "image" = 1: an imgconv that writes them), so that
	 * the host's docker-run overrides can be applied as docker applies them. */
	int has_image;
	char **img_ep, **img_cmd, **img_env;
	size_t img_epc, img_cmdc, img_envc;
	/* docker run's -i and -t, from the host's run spec: stdin from the stream port; a terminal
	 * (its first size: rows, cols, big-endian 16 bits each). */
	int interactive, tty;
	unsigned char winsize[4];
	int system; /* key "mode" = "system": hand over to the image's init system (system.h) */
};

/* Checks a key\0value\0 spec (version 1) and says how many strings it holds. */
static size_t spec_fields(const char *buf, size_t len, const char *path)
{
	if (len == 0 || buf[len - 1] != '\0')
		fatal("run spec %s is truncated", path);
	size_t count = 0;
	for (size_t i = 0; i < len; i++)
		count += buf[i] == '\0';
	if (count % 2)
		fatal("run spec %s is truncated", path);
	if (count < 2 || strcmp(buf, "version") != 0 || strcmp(buf + 8, "1") != 0)
		fatal("run spec %s is not a version 1 spec", path);
	return count;
}

static char **str_array(size_t count)
{
	return xmalloc((count / 2 + 2) * sizeof(char *));
}

static void read_spec(const char *path, struct spec *s)
{
	size_t len;
	char *buf = read_file(path, MAX_SPEC_BYTES, &len);
	if (!buf)
		fatal("cannot read the run spec %s: %s", path, strerror(errno));
	size_t count = spec_fields(buf, len, path);

	memset(s, 0, sizeof *s);
	s->argv = str_array(count);
	s->env = str_array(count);
	s->img_ep = str_array(count);
	s->img_cmd = str_array(count);
	s->img_env = str_array(count);
	s->cwd = s->user = s->hostname = "";
	for (char *p = buf; p < buf + len;) {
		char *key = p;
		char *val = key + strlen(key) + 1;
		p = val + strlen(val) + 1;
		if (strcmp(key, "arg") == 0)
			s->argv[s->argc++] = val;
		else if (strcmp(key, "env") == 0)
			s->env[s->envc++] = val;
		else if (strcmp(key, "cwd") == 0)
			s->cwd = val;
		else if (strcmp(key, "user") == 0)
			s->user = val;
		else if (strcmp(key, "hostname") == 0)
			s->hostname = val;
		else if (strcmp(key, "image") == 0)
			s->has_image = strcmp(val, "1") == 0;
		else if (strcmp(key, "image-entrypoint") == 0)
			s->img_ep[s->img_epc++] = val;
		else if (strcmp(key, "image-cmd") == 0)
			s->img_cmd[s->img_cmdc++] = val;
		else if (strcmp(key, "image-env") == 0)
			s->img_env[s->img_envc++] = val;
		else if (strcmp(key, "mode") == 0)
			s->system = strcmp(val, "system") == 0;
		/* anything else: a newer imgconv wrote it; ignore */
	}
	s->argv[s->argc] = NULL;
	s->env[s->envc] = NULL;
}

/* ---------------------------------------------------------- overrides -- */
/*
 * imgconv boot's docker-run flags, from the firmware config file opt/imgconv/run.spec (same format;
 * a key present is an override): entrypoint, cmd (repeated), env (repeated), cwd, user, hostname.
 */

#define FW_CFG_RUN_SPEC "opt/imgconv/run.spec"
#define MAX_RUN_SPEC_BYTES (2u << 20)

struct overrides {
	const char *entrypoint, *cwd, *user, *hostname, *tty;
	int interactive;
	char **cmd, **env;
	size_t cmdc, envc;
};

static size_t env_key_len(const char *e)
{
	const char *eq = strchr(e, '=');
	return eq ? (size_t)(eq - e) : strlen(e);
}

static int same_key(const char *a, const char *b)
{
	size_t n = env_key_len(a);
	return n == env_key_len(b) && memcmp(a, b, n) == 0;
}

/* docker's merge: --entrypoint replaces Entrypoint and drops the image's Cmd; arguments replace Cmd. */
static void override_argv(struct spec *s, const struct overrides *o)
{
	if (!o->entrypoint && !s->has_image)
		fatal("this disk was made by an older imgconv, which did not record the image's Entrypoint: "
		      "convert it again to pass a command, or give --entrypoint");
	char **argv = xmalloc((s->img_epc + s->img_cmdc + o->cmdc + 2) * sizeof *argv);
	size_t n = 0;
	if (o->entrypoint) {
		if (*o->entrypoint)
			argv[n++] = (char *)o->entrypoint;
	} else {
		for (size_t i = 0; i < s->img_epc; i++)
			argv[n++] = s->img_ep[i];
	}
	if (o->cmdc) {
		for (size_t i = 0; i < o->cmdc; i++)
			argv[n++] = o->cmd[i];
	} else if (!o->entrypoint) {
		for (size_t i = 0; i < s->img_cmdc; i++)
			argv[n++] = s->img_cmd[i];
	}
	argv[n] = NULL;
	s->argv = argv;
	s->argc = n;
}

/* The environment docker gives: the user's entries, then the image's whose key they lack (merge in
 * daemon/commit.go); PATH and HOSTNAME first, replaced in place, KEY alone unsetting them, anything
 * else appended (ReplaceOrAppendEnvValues); runc keeps the last of duplicate keys, at its place. A
 * disk without the image's Env gives its final one, less the HOSTNAME it was made with. */
static void override_env(struct spec *s, const struct overrides *o)
{
	char **image = s->has_image ? s->img_env : s->env;
	size_t imagec = s->has_image ? s->img_envc : s->envc;
	char **config = xmalloc((o->envc + imagec + 1) * sizeof *config);
	size_t n = 0;
	for (size_t i = 0; i < o->envc; i++)
		config[n++] = o->env[i];
	for (size_t i = 0; i < imagec; i++) {
		int found = !s->has_image && strncmp(image[i], "HOSTNAME=", 9) == 0;
		for (size_t j = 0; j < o->envc && !found; j++)
			found = same_key(image[i], o->env[j]);
		if (!found)
			config[n++] = image[i];
	}
	struct utsname uts;
	const char *hostname = *s->hostname || uname(&uts) < 0 ? s->hostname : uts.nodename;
	char **env = xmalloc((n + 4) * sizeof *env);
	env[0] = (char *)"PATH=" DEFAULT_PATH;
	env[1] = xmalloc(strlen(hostname) + 10);
	sprintf(env[1], "HOSTNAME=%s", hostname);
	size_t m = 2;
	for (size_t i = 0; i < n; i++) {
		char *e = config[i];
		int def = same_key(e, "PATH") ? 0 : same_key(e, "HOSTNAME") ? 1 : -1;
		if (!strchr(e, '=')) {
			if (def >= 0)
				env[def] = NULL;
			continue;
		}
		if (def >= 0)
			env[def] = e;
		else
			env[m++] = e;
	}
	size_t k = 0, out = 0;
	for (size_t i = 0; i < m; i++)
		if (env[i])
			env[k++] = env[i];
	for (size_t i = 0; i < k; i++) {
		int later = 0;
		for (size_t j = i + 1; j < k && !later; j++)
			later = same_key(env[i], env[j]);
		if (!later)
			env[out++] = env[i];
	}
	env[out] = NULL;
	s->env = env;
	s->envc = out;
	free(config);
}

static void apply_overrides(struct spec *s)
{
	size_t len = 0;
	char *buf = fw_cfg_file(FW_CFG_RUN_SPEC, MAX_RUN_SPEC_BYTES, &len);
	if (!buf)
		return;
	size_t count = spec_fields(buf, len, FW_CFG_RUN_SPEC);
	struct overrides o;
	memset(&o, 0, sizeof o);
	o.cmd = str_array(count);
	o.env = str_array(count);
	for (char *p = buf; p < buf + len;) {
		char *key = p;
		char *val = key + strlen(key) + 1;
		p = val + strlen(val) + 1;
		if (strcmp(key, "cmd") == 0)
			o.cmd[o.cmdc++] = val;
		else if (strcmp(key, "env") == 0)
			o.env[o.envc++] = val;
		else if (strcmp(key, "entrypoint") == 0)
			o.entrypoint = val;
		else if (strcmp(key, "cwd") == 0)
			o.cwd = val;
		else if (strcmp(key, "user") == 0)
			o.user = val;
		else if (strcmp(key, "hostname") == 0)
			o.hostname = val;
		else if (strcmp(key, "interactive") == 0)
			o.interactive = strcmp(val, "1") == 0;
		else if (strcmp(key, "tty") == 0)
			o.tty = val;
	}
	debug("overrides from %s: %zu arguments, %zu env entries", FW_CFG_RUN_SPEC, o.cmdc, o.envc);
	if (o.hostname)
		s->hostname = o.hostname;
	s->interactive = o.interactive;
	unsigned rows = 0, cols = 0;
	if (o.tty && sscanf(o.tty, "%u %u", &rows, &cols) == 2 && rows < 65536 && cols < 65536) {
		s->tty = 1;
		unsigned char ws[4] = {(unsigned char)(rows >> 8), (unsigned char)rows, (unsigned char)(cols >> 8),
				       (unsigned char)cols};
		memcpy(s->winsize, ws, sizeof ws);
	}
	if (o.cwd)
		s->cwd = o.cwd;
	if (o.user)
		s->user = o.user;
	if (o.entrypoint || o.cmdc)
		override_argv(s, &o);
	if (o.envc || o.hostname)
		override_env(s, &o);
}

/* -------------------------------------------------------------- users -- */
/*
 * A faithful copy of runc's libcontainer/user GetExecUser (as docker calls it with no
 * defaults) over the image's /etc/passwd and /etc/group, including its quirks: lines split on
 * ':' with missing fields left empty/zero, numbers parsed with errors ignored (0), passwd lines
 * trimmed but group lines not, first match wins, supplementary groups only for the implicit
 * form.
 */

#define MIN_ID 0LL
#define MAX_ID 2147483647LL

struct userdb {
	char *data; /* NULL: the file does not exist */
	size_t len;
};

/* Next line of a file (bufio.ScanLines: split on \n, drop one trailing \r); copies it. */
static char *next_line(const struct userdb *db, size_t *pos, char *line, size_t cap)
{
	if (!db->data || *pos >= db->len)
		return NULL;
	const char *start = db->data + *pos;
	const char *nl = memchr(start, '\n', db->len - *pos);
	size_t n = nl ? (size_t)(nl - start) : db->len - *pos;
	*pos += n + (nl ? 1 : 0);
	if (n > 0 && start[n - 1] == '\r')
		n--;
	if (n >= cap)
		n = cap - 1; /* absurd lines are cut; they could not match anything sensible anyway */
	memcpy(line, start, n);
	line[n] = '\0';
	return line;
}

static int is_space(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\v' || ch == '\f' || ch == '\r';
}

static char *trim(char *s)
{
	while (is_space(*s))
		s++;
	size_t n = strlen(s);
	while (n > 0 && is_space(s[n - 1]))
		s[--n] = '\0';
	return s;
}

/* Split in place on ':' into at most n fields; missing ones become "". */
static void split_fields(char *line, char **fields, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		fields[i] = line;
		char *colon = line ? strchr(line, ':') : NULL;
		if (line && colon) {
			*colon = '\0';
			line = colon + 1;
		} else {
			line = NULL;
		}
		if (!fields[i])
			fields[i] = "";
	}
}

static long long atoi_lenient(const char *s)
{
	long long v;
	go_atoi(s, &v);
	return v;
}

struct passwd_entry {
	char *name, *home;
	long long uid, gid;
};

static char *passwd_line(const struct userdb *db, size_t *pos, struct passwd_entry *pw, char *buf,
			 size_t cap)
{
	char *line;
	while ((line = next_line(db, pos, buf, cap))) {
		line = trim(line);
		if (!*line)
			continue;
		char *f[6];
		split_fields(line, f, 6);
		pw->name = f[0];
		pw->uid = atoi_lenient(f[2]);
		pw->gid = atoi_lenient(f[3]);
		pw->home = f[5];
		return line;
	}
	return NULL;
}

struct group_entry {
	char *name, *list; /* list: the raw comma-separated member field */
	long long gid;
};

static char *group_line(const struct userdb *db, size_t *pos, struct group_entry *gr, char *buf,
			size_t cap)
{
	char *line;
	while ((line = next_line(db, pos, buf, cap))) {
		if (!*line)
			continue;
		char *f[4];
		split_fields(line, f, 4);
		gr->name = f[0];
		gr->gid = atoi_lenient(f[2]);
		gr->list = f[3];
		return line;
	}
	return NULL;
}

static int list_has(const char *list, const char *name)
{
	size_t n = strlen(name);
	if (!*list)
		return 0;
	for (const char *p = list;;) {
		const char *comma = strchr(p, ',');
		size_t len = comma ? (size_t)(comma - p) : strlen(p);
		if (len == n && memcmp(p, name, n) == 0)
			return 1;
		if (!comma)
			return 0;
		p = comma + 1;
	}
}

struct exec_user {
	long long uid, gid;
	long long *sgids;
	size_t nsgids;
	char home[4096];
};

#define LINE_MAX_BYTES 65536

static void resolve_user(const char *spec, const struct userdb *passwd, const struct userdb *group,
			 struct exec_user *u)
{
	static char line[LINE_MAX_BYTES];
	char *specbuf = strdup(spec);
	if (!specbuf)
		fatal("out of memory");
	char *parts[2];
	split_fields(specbuf, parts, 2);
	const char *user_arg = parts[0], *group_arg = parts[1];
	long long uid_arg, gid_arg;
	int uid_err = go_atoi(user_arg, &uid_arg);
	int gid_err = go_atoi(group_arg, &gid_arg);

	memset(u, 0, sizeof *u);
	u->sgids = xmalloc(sizeof *u->sgids);

	char matched[LINE_MAX_BYTES] = "";
	int found = 0;
	size_t pos = 0;
	struct passwd_entry pw;
	while (!found && passwd_line(passwd, &pos, &pw, line, sizeof line)) {
		if (!*user_arg)
			found = pw.uid == u->uid;
		else if (uid_err == 0)
			found = pw.uid == uid_arg;
		else
			found = strcmp(pw.name, user_arg) == 0;
		if (found) {
			snprintf(matched, sizeof matched, "%s", pw.name);
			u->uid = pw.uid;
			u->gid = pw.gid;
		}
	}
	if (!found && *user_arg) {
		if (uid_err)
			fatal("unable to find user %s: no matching entries in passwd file", user_arg);
		u->uid = uid_arg;
		if (u->uid < MIN_ID || u->uid > MAX_ID)
			fatal("uids and gids must be in range %lld-%lld", MIN_ID, MAX_ID);
	}

	if (*group_arg || *matched) {
		int got = 0;
		size_t cap = 1;
		struct group_entry gr;
		pos = 0;
		while (group_line(group, &pos, &gr, line, sizeof line)) {
			int match;
			if (!*group_arg)
				match = list_has(gr.list, matched);
			else if (gid_err == 0)
				match = gr.gid == gid_arg;
			else
				match = strcmp(gr.name, group_arg) == 0;
			if (!match)
				continue;
			if (*group_arg) {
				if (!got)
					u->gid = gr.gid;
				got = 1;
				continue;
			}
			if (u->nsgids == cap) {
				cap *= 2;
				u->sgids = realloc(u->sgids, cap * sizeof *u->sgids);
				if (!u->sgids)
					fatal("out of memory");
			}
			u->sgids[u->nsgids++] = gr.gid;
		}
		if (*group_arg && !got) {
			if (gid_err)
				fatal("unable to find group %s: no matching entries in group file", group_arg);
			u->gid = gid_arg;
			if (u->gid < MIN_ID || u->gid > MAX_ID)
				fatal("uids and gids must be in range %lld-%lld", MIN_ID, MAX_ID);
		}
	}

	/* HOME comes from runc's second lookup, by the numeric uid docker hands it, with "/" as
	 * the default: the first passwd entry with that uid. */
	snprintf(u->home, sizeof u->home, "/");
	pos = 0;
	while (passwd_line(passwd, &pos, &pw, line, sizeof line)) {
		if (pw.uid == u->uid) {
			snprintf(u->home, sizeof u->home, "%s", pw.home);
			break;
		}
	}
	free(specbuf);
}

/* ---------------------------------------------------------- workload -- */

/* *path* and its missing parents, 0755; *what* names it in the one-line error that stops the boot. */
static void mkdir_p(const char *path, const char *what)
{
	char buf[4096];
	int n = snprintf(buf, sizeof buf, "%s", path);
	if (n < 0 || (size_t)n >= sizeof buf)
		fatal("%s %s: name too long", what, path);
	for (char *p = buf + 1;; p++) {
		if (*p == '/' || *p == '\0') {
			char saved = *p;
			*p = '\0';
			if (buf[0] && mkdir(buf, 0755) < 0 && errno != EEXIST)
				fatal("cannot create %s %s: %s", what, buf, strerror(errno));
			*p = saved;
			if (!saved)
				break;
		}
	}
}

/* Go's strconv.Quote, near enough for error messages. */
static void quote(const char *s, char *out, size_t cap)
{
	size_t o = 0;
	out[o++] = '"';
	for (; *s && o + 6 < cap; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\') {
			out[o++] = '\\';
			out[o++] = (char)ch;
		} else if (ch == '\n') {
			out[o++] = '\\';
			out[o++] = 'n';
		} else if (ch == '\t') {
			out[o++] = '\\';
			out[o++] = 't';
		} else if (ch < 0x20 || ch == 0x7f) {
			o += (size_t)snprintf(out + o, cap - o, "\\x%02x", ch);
		} else {
			out[o++] = (char)ch;
		}
	}
	out[o++] = '"';
	out[o] = '\0';
}

/* Go's os/exec findExecutable. 0 or an errno; *stat_failed says the error came from stat. */
static int find_executable(const char *path, int *stat_failed)
{
	struct stat st;
	*stat_failed = 0;
	if (stat(path, &st) < 0) {
		*stat_failed = 1;
		return errno;
	}
	if (S_ISDIR(st.st_mode))
		return EISDIR;
	if (faccessat(AT_FDCWD, path, X_OK, AT_EACCESS) == 0)
		return 0;
	if (errno != ENOSYS && errno != EPERM)
		return errno;
	return st.st_mode & 0111 ? 0 : EACCES;
}

__attribute__((noreturn)) static void child_fail(int code, const char *fmt, ...)
{
	char line[8192];
	va_list ap;
	va_start(ap, fmt);
	int n = snprintf(line, sizeof line, PROG ": ");
	int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
	va_end(ap);
	size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
	if (len > sizeof line - 2)
		len = sizeof line - 2;
	line[len++] = '\n';
	put(2, line, len);
	_exit(code);
}

/* exec.LookPath with the workload's own PATH, then execve. 127 when there is nothing to run,
 * 126 when there is something that cannot be run (what docker reports in both cases). */
__attribute__((noreturn)) static void exec_workload(char **argv, char **env)
{
	const char *file = argv[0];
	char q[4200], candidate[8192];
	int stat_failed, err;
	quote(file, q, sizeof q);
	const char *path = file;
	if (strchr(file, '/')) {
		err = find_executable(file, &stat_failed);
		if (err && stat_failed)
			child_fail(err == ENOENT || err == ENOTDIR ? 127 : 126, "exec: %s: stat %s: %s", q, file,
				   errtext(err));
		if (err)
			child_fail(126, "exec: %s: %s", q, errtext(err));
	} else {
		const char *dirs = NULL;
		for (char **e = env; *e; e++)
			if (strncmp(*e, "PATH=", 5) == 0) {
				dirs = *e + 5;
				break;
			}
		path = NULL;
		while (dirs && *file) {
			const char *colon = strchr(dirs, ':');
			size_t n = colon ? (size_t)(colon - dirs) : strlen(dirs);
			if (n == 0)
				snprintf(candidate, sizeof candidate, "%s", file); /* "" means "." */
			else
				snprintf(candidate, sizeof candidate, "%.*s/%s", (int)n, dirs, file);
			if (find_executable(candidate, &stat_failed) == 0) {
				path = candidate;
				break;
			}
			dirs = colon ? colon + 1 : NULL;
		}
		if (!path)
			child_fail(127, "exec: %s: executable file not found in $PATH", q);
	}
	execve(path, argv, env);
	err = errno;
	child_fail(err == ENOENT ? 127 : 126, "exec %s: %s", path, errtext(err));
}

/* In the workload, PID 1 of its new PID namespace: a mount namespace of its own with a /proc of
 * that PID namespace (runc mounts a fresh one), so that /proc/self, ps and $$ agree. The mounts
 * made so far (the generated /etc files included) are copied into it. */
static void own_proc(void)
{
	if (unshare(CLONE_NEWNS) < 0) {
		debug("no mount namespace for the workload: %s", strerror(errno));
		return;
	}
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		debug("cannot make the workload's mounts private: %s", strerror(errno));
	umount2("/proc", MNT_DETACH); /* not over the old one: /proc/mounts shows one proc, as runc's */
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		child_fail(125, "cannot mount /proc: %s", strerror(errno));
}

#include "stream.h"

__attribute__((noreturn)) static void run_child(struct spec *s, const struct exec_user *u,
						const struct child_io *io, const gid_t *groups, size_t ngroups,
						int pidns)
{
	if (pidns)
		own_proc();
	setsid();
	/* Like runc's fixStdioPermissions: /dev/stdout opened by a non-root user must work. */
	child_stdio(io, (uid_t)u->uid, (gid_t)u->gid);

	struct sigaction dfl;
	memset(&dfl, 0, sizeof dfl);
	dfl.sa_handler = SIG_DFL;
	for (int sig = 1; sig < NSIG; sig++)
		sigaction(sig, &dfl, NULL); /* fails harmlessly for KILL, STOP, libc-internal ones */
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);

	if (setgroups(ngroups, groups) < 0)
		child_fail(125, "setgroups: %s", strerror(errno));
	if (setgid((gid_t)u->gid) < 0)
		child_fail(125, "setgid %lld: %s", u->gid, strerror(errno));
	if (setuid((uid_t)u->uid) < 0)
		child_fail(125, "setuid %lld: %s", u->uid, strerror(errno));
	umask(022);
	exec_workload(s->argv, s->env);
}

static int wait_status(int st)
{
	if (WIFEXITED(st))
		return WEXITSTATUS(st);
	if (WIFSIGNALED(st))
		return 128 + WTERMSIG(st);
	return 125;
}

/* Relay the workload's output (and the host's stdin, with -i) until it has exited and its output is
 * drained; forward the signals this init gets to it. Returns its status as docker reports it. */
static int relay_until_exit(struct stream *st, int sfd, pid_t main_pid, int out_r, int err_r)
{
	enum { SIG, OUT, ERR, PORT, INPUT, NFDS };
	struct pollfd fds[NFDS] = {{sfd, POLLIN, 0}, {out_r, POLLIN, 0}, {err_r, POLLIN, 0}, {-1, POLLIN, 0},
				   {-1, POLLOUT, 0}};
	int status = 125, main_done = 0, killed = 0;
	double drain_deadline = 0;
	while (!main_done || fds[OUT].fd >= 0 || fds[ERR].fd >= 0) {
		int timeout = -1;
		if (main_done && !killed) {
			/* Like docker when a container's main process exits: everyone else goes. The
			 * kernel did that already when the workload was PID 1 of its namespace. */
			kill(-1, SIGKILL);
			killed = 1;
			close_input(st);
			drain_deadline = now() + DRAIN_SECONDS;
		}
		if (killed) {
			double left = drain_deadline - now();
			if (left <= 0)
				break; /* something unkillable holds a pipe; do not wait forever */
			timeout = (int)(left * 1000) + 1;
		}
		/* The port is read only when the last stdin bytes are taken, so a workload that does not
		 * read its stdin holds the host's back, as a full pipe does. */
		fds[PORT].fd = st->port >= 0 && !st->host_gone && st->pendlen == 0 ? st->port : -1;
		fds[INPUT].fd = st->pendlen > 0 ? st->input : -1;
		if (poll(fds, NFDS, timeout) < 0) {
			if (errno == EINTR)
				continue;
			fatal("poll: %s", strerror(errno));
		}
		if (fds[SIG].revents & POLLIN) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
				int sig = (int)si.ssi_signo;
				if (sig == SIGCHLD) {
					int ws;
					pid_t p;
					while ((p = waitpid(-1, &ws, WNOHANG)) > 0)
						if (p == main_pid) {
							status = wait_status(ws);
							main_done = 1;
						}
				} else if (!main_done) {
					debug("forwarding signal %d", sig == SIGINT ? SIGTERM : sig);
					kill(main_pid, sig == SIGINT ? SIGTERM : sig);
				}
			}
		}
		if (fds[PORT].fd >= 0 && fds[PORT].revents & (POLLHUP | POLLERR) && !(fds[PORT].revents & POLLIN))
			st->host_gone = 1;
		else if (fds[PORT].fd >= 0 && fds[PORT].revents)
			stream_read(st);
		stream_feed(st);
		for (int i = OUT; i <= ERR; i++)
			if (fds[i].fd >= 0 && fds[i].revents && !relay_output(st, fds[i].fd, i)) {
				close(fds[i].fd);
				fds[i].fd = -1; /* poll ignores negative fds */
			}
	}
	return status;
}

#include "volumes.h"
#include "system.h"

__attribute__((noreturn)) static void stage2(void)
{
	stage = 2;
	reboot(RB_DISABLE_CAD); /* ctrl-alt-del now sends SIGINT to us: the host's "please stop" */

	sigset_t handled;
	sigemptyset(&handled);
	int sigs[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGQUIT};
	for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++)
		sigaddset(&handled, sigs[i]);
	/* Blocked signals reach PID 1 even without a handler (sig_ignored() checks the mask). */
	sigprocmask(SIG_BLOCK, &handled, NULL);
	int sfd = signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		fatal("signalfd: %s", strerror(errno));

	setup_mounts();
	struct cmdline c;
	parse_cmdline(&c);
	debug("stage 2: spec %s", c.spec);
	if (!debug_on)
		klogctl(SYSLOG_ACTION_CONSOLE_LEVEL, NULL, 1); /* keep kernel chatter out of the output */
	loopback_up();
	network_ready();

	struct spec s;
	read_spec(c.spec, &s);
	apply_overrides(&s);
	if (*s.hostname && sethostname(s.hostname, strlen(s.hostname)) < 0)
		debug("sethostname %s: %s", s.hostname, strerror(errno));
	etc_files(s.hostname);
	mount_volumes(); /* before the workdir is entered: -w may be inside a volume */

	struct userdb passwd = {0}, group = {0};
	passwd.data = read_file("/etc/passwd", MAX_USERDB_BYTES, &passwd.len);
	group.data = read_file("/etc/group", MAX_USERDB_BYTES, &group.len);
	if (s.system)
		boot_system(&s, &passwd, &group);
	if (fw_cfg_file(FW_CFG_SSH, MAX_SSH_BYTES, &(size_t){0}))
		fatal("--ssh-key needs a disk converted with --init system (this one runs the image's command "
		      "as a container's process, with no sshd)");
	struct exec_user u;
	resolve_user(s.user, &passwd, &group, &u);
	/* Docker puts the primary group first in the supplementary list. */
	size_t ngroups = u.nsgids + 1;
	gid_t *groups = xmalloc(ngroups * sizeof *groups);
	groups[0] = (gid_t)u.gid;
	for (size_t i = 0; i < u.nsgids; i++)
		groups[i + 1] = (gid_t)u.sgids[i];
	debug("user %s: uid %lld gid %lld, %zu more groups, home %s", s.user, u.uid, u.gid, u.nsgids,
	      u.home);

	int has_home = 0;
	for (size_t i = 0; i < s.envc; i++)
		has_home |= strncmp(s.env[i], "HOME=", 5) == 0;
	if (!has_home) {
		char *home = xmalloc(strlen(u.home) + 6);
		sprintf(home, "HOME=%s", u.home);
		s.env[s.envc++] = home;
		s.env[s.envc] = NULL;
	}

	const char *cwd = *s.cwd ? s.cwd : "/";
	if (!is_dir(cwd))
		mkdir_p(cwd, "working directory");
	if (chdir(cwd) < 0)
		fatal("cannot change to working directory %s: %s", cwd, strerror(errno));
	if (s.argc == 0)
		fatal("no command specified");

	struct stream st;
	stream_open(&st);
	struct child_io io;
	int out_r, err_r;
	make_stdio(&s, &st, &io, &out_r, &err_r);
	/* The next child, the workload, is PID 1 of a new PID namespace. Without PID namespaces
	 * (a kernel built without them) it runs beside this init, as before. */
	int pidns = unshare(CLONE_NEWPID) == 0;
	if (!pidns)
		debug("no PID namespace for the workload: %s", strerror(errno));
	put(1, "<<imgconv:start>>\n", 18);
	pid_t main_pid = fork();
	if (main_pid < 0)
		fatal("fork: %s", strerror(errno));
	if (main_pid == 0)
		run_child(&s, &u, &io, groups, ngroups, pidns);
	close_child_io(&io);
	int status = relay_until_exit(&st, sfd, main_pid, out_r, err_r);
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	debug("workload exited with status %d", status);
	stream_exit(&st, status);
	emit_exit(status);
	power_off();
}

/* Test mode, for the host's unit tests: print what resolve_user makes of a user spec. */
static int resolve_user_main(const char *user, const char *passwd_path, const char *group_path)
{
	struct userdb passwd = {0}, group = {0};
	passwd.data = read_file(passwd_path, MAX_USERDB_BYTES, &passwd.len);
	group.data = read_file(group_path, MAX_USERDB_BYTES, &group.len);
	struct exec_user u;
	resolve_user(user, &passwd, &group, &u);
	printf("uid=%lld gid=%lld groups=%lld", u.uid, u.gid, u.gid);
	for (size_t i = 0; i < u.nsgids; i++)
		printf(",%lld", u.sgids[i]);
	printf(" home=%s\n", u.home);
	return 0;
}

int main(int argc, char **argv)
{
	if (getpid() != 1 && argc == 5 && strcmp(argv[1], "--resolve-user") == 0)
		return resolve_user_main(argv[2], argv[3], argv[4]);
	if (getpid() != 1) {
		static const char msg[] = PROG ": must run as PID 1 (the first process of the VM)\n";
		put(2, msg, sizeof msg - 1);
		return 2;
	}
	/* The marker alone is a file name any image can hold (and did: stage 1 then ran again from the
	 * disk). The root filesystem's type is not: after the switch it is the image's ext4. */
	if (root_is_rootfs() && access(INITRAMFS_MARKER, F_OK) == 0)
		stage1();
	stage2();
}
