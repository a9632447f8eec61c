/* ------------------------------------------------------------- system -- */
/*
 * System mode (oci-to-qcow2 --init system, or auto for an image whose command is an init): the
 * image's own init system becomes PID 1, as on a machine, instead of this init running the command
 * as a container's process. Before handing over, this init does what a container image lacks and
 * a VM boot needs, all at run time, nothing written into the image's files:
 *   - /run is a fresh tmpfs (systemd keeps a /run it finds mounted), holding, when the image's
 *     command is not the init itself, a generated unit that runs the command as a service with the
 *     image's Env, WorkingDir and User, its output on the console (imgconv-workload.service,
 *     wanted by multi-user.target);
 *   - /etc/hostname, /etc/hosts and /etc/resolv.conf are docker's generated ones, as in container
 *     mode, and eth0 is already configured by the initramfs (QEMU's user network);
 *   - --ssh-key: the keys from the firmware config file opt/imgconv/ssh (first line the user, the
 *     rest authorized_keys lines) are added to that user's ~/.ssh/authorized_keys;
 *   - kmod-static-nodes.service is masked (in /run) when the image has no kmod: the unit runs only
 *     because imgconv placed a kernel's modules in /lib/modules, and would fail (status 203) for
 *     want of a program a container image never needed; udev loads modules without it.
 * The root filesystem is already mounted read-write (rw on the kernel command line), so the image
 * needs no /etc/fstab entry for it; the serial console gets a getty from systemd's own generator
 * (console=ttyS0). It prints "<<imgconv:system>>" on the console, so that imgconv boot shows the
 * console from there on and stops the guest with the ACPI power button.
 */

#define FW_CFG_SSH "opt/imgconv/ssh"
#define MAX_SSH_BYTES (256u << 10)
#define WORKLOAD_UNIT "/run/systemd/system/imgconv-workload.service"

static const char *const INIT_SYSTEMS[] = {"/sbin/init", "/usr/sbin/init", "/lib/systemd/systemd",
					   "/usr/lib/systemd/systemd", NULL};

static int is_init_system(const char *path)
{
	for (size_t i = 0; INIT_SYSTEMS[i]; i++)
		if (strcmp(path, INIT_SYSTEMS[i]) == 0)
			return 1;
	return 0;
}

/* One word of a unit file's command line or Environment=: double-quoted, C escapes for the quote
 * and the backslash, and $ and % doubled so that systemd expands nothing. */
static void unit_word(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch == '$' || ch == '%')
			fprintf(f, "%c%c", ch, ch);
		else if (ch < 0x20 || ch == 0x7f)
			fprintf(f, "\\x%02x", ch);
		else
			fputc(ch, f);
	}
	fputc('"', f);
}

/* A plain setting's value: only specifiers (%) escaped; a line break would start another setting, so
 * control characters are dropped. */
static void unit_value(FILE *f, const char *s)
{
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '%')
			fputs("%%", f);
		else if (ch >= 0x20 && ch != 0x7f)
			fputc(ch, f);
	}
}

/* The image's command as a service: started when the system is up, its output on the console. */
static void write_workload_unit(const struct spec *s)
{
	mkdir_p("/run/systemd/system/multi-user.target.wants", "the unit directory");
	FILE *f = fopen(WORKLOAD_UNIT, "we");
	if (!f)
		fatal("cannot write %s: %s", WORKLOAD_UNIT, strerror(errno));
	fprintf(f, "# Written by imgconv's init at boot: the image's Entrypoint and Cmd as a service.\n"
		   "[Unit]\nDescription=The image's command (Entrypoint and Cmd)\n"
		   "After=network.target\n\n[Service]\nExecStart=");
	for (size_t i = 0; i < s->argc; i++) {
		if (i)
			fputc(' ', f);
		unit_word(f, s->argv[i]);
	}
	fputc('\n', f);
	for (size_t i = 0; i < s->envc; i++) {
		fputs("Environment=", f);
		unit_word(f, s->env[i]);
		fputc('\n', f);
	}
	if (*s->cwd) {
		fputs("WorkingDirectory=", f); /* a path as it is (quotes would be part of it); % doubled */
		unit_value(f, s->cwd);
		fputc('\n', f);
	}
	if (*s->user) {
		char user[256];
		snprintf(user, sizeof user, "%s", s->user);
		char *group = strchr(user, ':');
		if (group)
			*group++ = '\0';
		fputs("User=", f);
		unit_value(f, user);
		fputc('\n', f);
		if (group && *group) {
			fputs("Group=", f);
			unit_value(f, group);
			fputc('\n', f);
		}
	}
	/* Straight to the console, byte for byte as docker run shows it (journal+console would go through
	 * journald, which prefixes a timestamp and the process name). */
	fputs("StandardInput=null\nStandardOutput=tty\nStandardError=tty\nTTYPath=/dev/console\n", f);
	if (fclose(f) != 0)
		fatal("cannot write %s: %s", WORKLOAD_UNIT, strerror(errno));
	if (symlink("../imgconv-workload.service",
		    "/run/systemd/system/multi-user.target.wants/imgconv-workload.service") < 0)
		fatal("cannot enable the workload's unit: %s", strerror(errno));
}

/* --ssh-key: append the host's keys to the user's authorized_keys, owned by the user. */
static void add_ssh_keys(const struct userdb *passwd, const struct userdb *group)
{
	size_t len = 0;
	char *data = fw_cfg_file(FW_CFG_SSH, MAX_SSH_BYTES, &len);
	if (!data)
		return;
	char *keys = memchr(data, '\n', len);
	if (!keys)
		fatal("%s has no user line", FW_CFG_SSH);
	*keys++ = '\0';
	struct exec_user u;
	resolve_user(data, passwd, group, &u);
	char dir[4200], file[4300];
	snprintf(dir, sizeof dir, "%s/.ssh", strcmp(u.home, "/") == 0 ? "" : u.home);
	snprintf(file, sizeof file, "%s/authorized_keys", dir);
	mkdir_p(dir, "the ssh directory");
	if (chown(dir, (uid_t)u.uid, (gid_t)u.gid) < 0 || chmod(dir, 0700) < 0)
		fatal("cannot prepare %s: %s", dir, strerror(errno));
	int fd = open(file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		fatal("cannot open %s: %s", file, strerror(errno));
	put(fd, keys, len - (size_t)(keys - data));
	if (fchown(fd, (uid_t)u.uid, (gid_t)u.gid) < 0)
		fatal("cannot hand %s to %s: %s", file, data, strerror(errno));
	close(fd);
	debug("ssh keys for %s in %s", data, file);
	free(data);
}

/* Hand the machine to the image's init system. Never returns. */
__attribute__((noreturn)) static void boot_system(struct spec *s, const struct userdb *passwd,
						  const struct userdb *group)
{
	const char *init = s->argc > 0 && is_init_system(s->argv[0]) ? s->argv[0] : NULL;
	for (size_t i = 0; !init && INIT_SYSTEMS[i]; i++)
		if (access(INIT_SYSTEMS[i], X_OK) == 0)
			init = INIT_SYSTEMS[i];
	if (!init)
		fatal("no init system in the image (looked for /sbin/init and systemd)");
	umount2("/run", MNT_DETACH);
	if (mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
		fatal("cannot mount /run: %s", strerror(errno));
	if (s->argc > 0 && !is_init_system(s->argv[0]))
		write_workload_unit(s);
	if (access("/bin/kmod", X_OK) < 0 && access("/usr/bin/kmod", X_OK) < 0) {
		mkdir_p("/run/systemd/system", "the unit directory");
		if (symlink("/dev/null", "/run/systemd/system/kmod-static-nodes.service") < 0)
			debug("cannot mask kmod-static-nodes: %s", strerror(errno));
	}
	add_ssh_keys(passwd, group);

	put(1, "<<imgconv:system>>\n", 19);
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL); /* blocked signals would stay blocked for the init */
	char *argv[64] = {(char *)init, NULL};
	if (init == s->argv[0])
		for (size_t i = 1; i < s->argc && i < 63; i++)
			argv[i] = s->argv[i];
	char *envp[] = {NULL};
	execve(init, argv, envp);
	fatal("cannot run the init system %s: %s", init, strerror(errno));
}
