/*
 * imgconv boot's volumes (-v/--volume HOSTDIR:GUESTDIR[:ro|:rw]): host directories shared through virtiofs,
 * one vhost-user-fs device per volume, each served on the host by its own virtiofsd (converter/boot/volumes.py).
 *
 * Included by init.c (it uses fw_cfg_file, fatal, debug, sleep_ms and is_dir from there). Stage 2 calls
 * mount_volumes() before it enters the working directory, so that -w may be inside a volume, and before the
 * workload's mount namespace is made (own_proc copies these mounts into it).
 *
 * The list comes from the QEMU firmware config file opt/imgconv/volumes, never the kernel command line:
 * NUL-terminated strings, first "version" "1", then one triple per volume, TAG MODE GUESTDIR, where TAG is the
 * device's virtiofs tag, MODE "ro" or "rw" and GUESTDIR an absolute path; parents come before what they hold.
 * Without that file (a boot without -v, or a plain qemu boot) nothing is done.
 *
 * A read-only volume is mounted MS_RDONLY here, but that is only a convenience (the guest's root could
 * remount it rw): the host serves it from a read-only bind mount, so writes fail with EROFS either way.
 */
#include <errno.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>

#define FW_CFG_VOLUMES "opt/imgconv/volumes"
#define MAX_VOLUMES_BYTES (1u << 20)
#define VIRTIOFS_WAIT_MS 3000

/* Whether the kernel knows the filesystem *name* now (its module loaded, or built in). */
static int have_filesystem(const char *name)
{
	size_t len;
	char *list = read_file("/proc/filesystems", 1 << 16, &len);
	if (!list)
		return 0;
	int found = 0;
	size_t n = strlen(name);
	for (char *line = strtok(list, "\n"); line && !found; line = strtok(NULL, "\n")) {
		char *tab = strrchr(line, '\t');
		const char *fs = tab ? tab + 1 : line;
		found = strlen(fs) == n && memcmp(fs, name, n) == 0;
	}
	free(list);
	return found;
}

/* GUESTDIR and its missing parents, 0755 and root's, as docker creates a bind mount's destination. A file in
 * the way, or a read-only place, is an error: the workload must not run without its volume. */
static void volume_dir(const char *path)
{
	mkdir_p(path, "the volume directory");
	if (!is_dir(path))
		fatal("cannot mount a volume on %s: not a directory", path);
}

/* The device of TAG may still be probing when stage 2 starts: the kernel answers EINVAL for an unknown tag
 * (ENOENT on some versions) until it is registered, so those are retried for a moment. */
static void mount_volume(const char *tag, const char *mode, const char *target)
{
	unsigned long flags = strcmp(mode, "ro") == 0 ? MS_RDONLY : 0;
	volume_dir(target);
	for (long waited = 0;; waited += 20) {
		if (mount(tag, target, "virtiofs", flags, NULL) == 0)
			break;
		if ((errno != EINVAL && errno != ENOENT) || waited >= VIRTIOFS_WAIT_MS)
			fatal("cannot mount volume %s (virtiofs tag %s) on %s: %s", target, tag, target,
			      strerror(errno));
		sleep_ms(20);
	}
	debug("volume %s: virtiofs %s, %s", target, tag, mode);
}

static void mount_volumes(void)
{
	size_t len = 0;
	char *buf = fw_cfg_file(FW_CFG_VOLUMES, MAX_VOLUMES_BYTES, &len);
	if (!buf)
		return;
	size_t count = 0;
	for (size_t i = 0; i < len; i++)
		count += buf[i] == '\0';
	if (len == 0 || buf[len - 1] != '\0' || count < 2 || (count - 2) % 3 != 0 ||
	    strcmp(buf, "version") != 0 || strcmp(buf + 8, "1") != 0)
		fatal("%s is not a version 1 volume list", FW_CFG_VOLUMES);
	if (count > 2 && !have_filesystem("virtiofs"))
		fatal("--volume needs the kernel's virtiofs filesystem, which this disk's initramfs did not load "
		      "(convert the disk again with a kernel that has the virtiofs module)");
	char *p = buf + 10; /* past "version\0" "1\0" */
	for (size_t i = 0; i < (count - 2) / 3; i++) {
		char *tag = p, *mode = tag + strlen(tag) + 1, *target = mode + strlen(mode) + 1;
		p = target + strlen(target) + 1;
		if (target[0] != '/' || (strcmp(mode, "ro") != 0 && strcmp(mode, "rw") != 0))
			fatal("%s: bad volume %s (%s)", FW_CFG_VOLUMES, target, mode);
		mount_volume(tag, mode, target);
	}
	free(buf);
}
