/* ------------------------------------------------------------ streams -- */
/*
 * The workload's stdin, stdout and stderr over one virtio-serial port, byte-exact and apart (the
 * serial console merges stdout with stderr and its line discipline rewrites bytes). `imgconv boot`
 * adds the port and names it in the firmware config file opt/imgconv/stream; without that file (a
 * plain qemu boot, or a host imgconv older than this init) the console carries the output as before.
 *
 * Frames both ways, docker's attach format (stdcopy): an 8-byte header (type, three zero bytes,
 * the payload's length in big-endian 32 bits), then the payload.
 *   guest to host: 1 stdout, 2 stderr, 3 exit (one byte: the status), 4 hello (protocol version);
 *   host to guest: 0 stdin bytes, 5 end of stdin, 6 window size (rows, cols: big-endian 16 bits),
 *                  7 ack of the exit frame.
 * The ack is how the init knows that everything it wrote reached the host before it powers off: a
 * frame still inside qemu when the VM stops would be lost. The exit marker on the console follows,
 * as for a console-only boot, so the host reads the status where it always has.
 */

#define FW_CFG_STREAM "opt/imgconv/stream"
#define STREAM_VERSION 1
#define STREAM_PORT_WAIT 5.0
#define STREAM_ACK_WAIT 10.0
#define FRAME_HEADER 8
#define FRAME_MAX 65536

enum { F_STDIN = 0, F_STDOUT = 1, F_STDERR = 2, F_EXIT = 3, F_HELLO = 4, F_STDIN_EOF = 5, F_WINSIZE = 6, F_ACK = 7 };

struct stream {
	int port;             /* the virtio-serial port, or -1: the console carries the output */
	int host_gone;        /* the port hung up: write nothing more */
	unsigned char in[FRAME_HEADER + FRAME_MAX]; /* the host frame being read */
	size_t inlen;
	int input;            /* where stdin frames go: the pipe's write end or the terminal; -1 once closed */
	int term;             /* the terminal's master (-t), for window sizes; -1 without one */
	int tty;              /* input is the terminal: the end of stdin is a ^D, not a close */
	char pending[FRAME_MAX]; /* stdin bytes the workload has not taken yet */
	size_t pendlen;
	int eof;              /* the host's stdin ended: close input once pending is written */
	int acked;
};

static uint32_t frame_len(const unsigned char *header)
{
	return (uint32_t)header[4] << 24 | (uint32_t)header[5] << 16 | (uint32_t)header[6] << 8 | header[7];
}

/* The /dev node of the virtio port named *want*: the name comes from the host a moment after the
 * driver binds, so wait for it. */
static int find_port(const char *want, char *dev, size_t cap)
{
	double deadline = now() + STREAM_PORT_WAIT;
	do {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;
		while (d && (e = readdir(d)) != NULL) {
			if (e->d_name[0] == '.')
				continue;
			char path[300];
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%.200s/name", e->d_name);
			size_t len = 0;
			char *name = read_file(path, 4096, &len);
			if (!name)
				continue;
			while (len > 0 && name[len - 1] == '\n')
				name[--len] = '\0';
			int match = strcmp(name, want) == 0;
			free(name);
			snprintf(dev, cap, "/dev/%.200s", e->d_name);
			if (match && access(dev, F_OK) == 0) {
				closedir(d);
				return 1;
			}
		}
		if (d)
			closedir(d);
		sleep_ms(10);
	} while (now() < deadline);
	return 0;
}

/* All of *buf* to the port, waiting while the host is slow; nothing once the host has hung up. */
static void port_write(struct stream *st, const void *buf, size_t len)
{
	const unsigned char *p = buf;
	while (len > 0 && !st->host_gone) {
		ssize_t n = write(st->port, p, len);
		if (n >= 0) {
			p += n;
			len -= (size_t)n;
			continue;
		}
		if (errno == EINTR)
			continue;
		struct pollfd pf = {st->port, POLLOUT, 0};
		if (errno != EAGAIN || poll(&pf, 1, -1) < 0 || (pf.revents & (POLLHUP | POLLERR) && !(pf.revents & POLLOUT)))
			st->host_gone = 1;
	}
}

static void send_frame(struct stream *st, int type, const void *payload, size_t len)
{
	unsigned char frame[FRAME_HEADER + FRAME_MAX];
	if (len > FRAME_MAX)
		len = FRAME_MAX;
	frame[0] = (unsigned char)type;
	frame[1] = frame[2] = frame[3] = 0;
	frame[4] = (unsigned char)(len >> 24);
	frame[5] = (unsigned char)(len >> 16);
	frame[6] = (unsigned char)(len >> 8);
	frame[7] = (unsigned char)len;
	memcpy(frame + FRAME_HEADER, payload, len);
	port_write(st, frame, FRAME_HEADER + len); /* one write: one buffer in the virtqueue */
}

/* Open the port the host named, if it named one, and say hello on it. */
static void stream_open(struct stream *st)
{
	memset(st, 0, sizeof *st);
	st->port = st->input = st->term = -1;
	size_t len = 0;
	char *name = fw_cfg_file(FW_CFG_STREAM, 255, &len);
	if (!name)
		return;
	char dev[256];
	if (!find_port(name, dev, sizeof dev))
		fatal("the host's stream port %s did not appear (is virtio_console in the initramfs?)", name);
	st->port = open(dev, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (st->port < 0)
		fatal("cannot open the stream port %s: %s", dev, strerror(errno));
	unsigned char version = STREAM_VERSION;
	send_frame(st, F_HELLO, &version, 1);
	debug("stdio on the port %s (%s)", name, dev);
	free(name);
}

static void close_input(struct stream *st)
{
	if (st->input >= 0 && !st->tty)
		close(st->input);
	st->input = -1;
	st->pendlen = 0;
}

static void set_winsize(int fd, const unsigned char *p)
{
	struct winsize ws;
	memset(&ws, 0, sizeof ws);
	ws.ws_row = (unsigned short)(p[0] << 8 | p[1]);
	ws.ws_col = (unsigned short)(p[2] << 8 | p[3]);
	if (fd >= 0 && ioctl(fd, TIOCSWINSZ, &ws) < 0)
		debug("window size: %s", strerror(errno));
}

/* One frame from the host. */
static void host_frame(struct stream *st, int type, const unsigned char *p, size_t len)
{
	if (type == F_STDIN && st->input >= 0 && !st->eof) {
		memcpy(st->pending, p, len); /* the port is read only when pending is empty */
		st->pendlen = len;
	} else if (type == F_STDIN_EOF) {
		st->eof = 1;
	} else if (type == F_WINSIZE && len == 4 && st->term >= 0) {
		set_winsize(st->term, p);
	} else if (type == F_ACK) {
		st->acked = 1;
	}
}

/* Read what the port has; hand on each complete frame. A malformed frame means the host is not an
 * imgconv that speaks this protocol: the port is dropped, the workload keeps running. */
static void stream_read(struct stream *st)
{
	while (st->port >= 0 && !st->host_gone && st->pendlen == 0) {
		size_t want = st->inlen < FRAME_HEADER ? FRAME_HEADER - st->inlen : 0;
		if (!want) {
			uint32_t len = frame_len(st->in);
			if (len > FRAME_MAX || st->in[1] || st->in[2] || st->in[3]) {
				debug("a malformed frame from the host: the port is ignored from now on");
				st->host_gone = 1;
				return;
			}
			want = FRAME_HEADER + len - st->inlen;
		}
		ssize_t n = want ? read(st->port, st->in + st->inlen, want) : 0;
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN)
			st->host_gone = 1;
		if (n == 0 && want)
			st->host_gone = 1; /* a port reads 0 only when the host is not connected */
		if (n <= 0 && want)
			return;
		st->inlen += (size_t)n;
		if (st->inlen >= FRAME_HEADER && st->inlen == FRAME_HEADER + frame_len(st->in)) {
			host_frame(st, st->in[0], st->in + FRAME_HEADER, st->inlen - FRAME_HEADER);
			st->inlen = 0;
		}
	}
}

/* Give the workload what it can take of the pending stdin bytes; close its stdin after the end. */
static void stream_feed(struct stream *st)
{
	while (st->input >= 0 && st->pendlen > 0) {
		ssize_t n = write(st->input, st->pending, st->pendlen);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				close_input(st); /* the workload closed its stdin (EPIPE): drop the rest */
			return;
		}
		memmove(st->pending, st->pending + n, st->pendlen - (size_t)n);
		st->pendlen -= (size_t)n;
	}
	if (st->eof && st->pendlen == 0 && st->input >= 0) {
		if (st->tty) {
			struct termios t;
			char veof = tcgetattr(st->input, &t) == 0 ? (char)t.c_cc[VEOF] : '\004';
			if (write(st->input, &veof, 1) < 0)
				debug("end of stdin on the terminal: %s", strerror(errno));
		}
		close_input(st);
	}
}

/* The workload's end: its status to the host, then wait until the host has read everything. */
static void stream_exit(struct stream *st, int status)
{
	if (st->port < 0)
		return;
	close_input(st);
	unsigned char code = (unsigned char)status;
	send_frame(st, F_EXIT, &code, 1);
	double deadline = now() + STREAM_ACK_WAIT;
	while (!st->acked && !st->host_gone) {
		double left = deadline - now();
		if (left <= 0) {
			debug("the host did not acknowledge the exit frame");
			return;
		}
		struct pollfd pf = {st->port, POLLIN, 0};
		if (poll(&pf, 1, (int)(left * 1000) + 1) < 0 && errno != EINTR)
			return;
		if (pf.revents & (POLLHUP | POLLERR) && !(pf.revents & POLLIN))
			return;
		stream_read(st);
	}
}

/* ----------------------------------------------------- workload stdio -- */

struct child_io {
	int in;  /* the workload's stdin: a pipe from the host (-i), or -1: /dev/null */
	int out, err;
	int tty; /* -t: the terminal's slave, the workload's fds 0-2 and controlling terminal; else -1 */
};

/* Set up the workload's stdio as docker does: pipes, or a terminal for -t (TERM=xterm unless the
 * environment has a TERM); stdin only with -i, from the host's frames. *out_r* and *err_r* are what
 * this init reads the output from (*err_r* is -1 under a terminal: both go to it). */
static void make_stdio(struct spec *s, struct stream *st, struct child_io *c, int *out_r, int *err_r)
{
	c->in = c->out = c->err = c->tty = -1;
	*err_r = -1;
	if (s->tty) {
		char slave[64];
		int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
		    ptsname_r(master, slave, sizeof slave) != 0)
			fatal("cannot make a terminal for -t: %s", strerror(errno));
		/* Opened here, before the fork, so that the master never sees a terminal nobody holds. */
		c->tty = open(slave, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (c->tty < 0)
			fatal("cannot open the terminal %s: %s", slave, strerror(errno));
		fcntl(master, F_SETFL, O_NONBLOCK);
		set_winsize(master, s->winsize);
		*out_r = st->term = master;
		if (s->interactive && st->port >= 0) {
			st->input = master;
			st->tty = 1;
		}
		int has_term = 0;
		for (size_t i = 0; i < s->envc; i++)
			has_term |= strncmp(s->env[i], "TERM=", 5) == 0;
		if (!has_term) {
			char **env = xmalloc((s->envc + 3) * sizeof *env); /* TERM, HOME later, NULL */
			memcpy(env, s->env, s->envc * sizeof *env);
			env[s->envc++] = "TERM=xterm";
			env[s->envc] = NULL;
			s->env = env;
		}
		return;
	}
	int out[2], err[2], in[2];
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0)
		fatal("pipe: %s", strerror(errno));
	c->out = out[1];
	c->err = err[1];
	*out_r = out[0];
	*err_r = err[0];
	if (s->interactive && st->port >= 0) {
		if (pipe2(in, O_CLOEXEC) < 0)
			fatal("pipe: %s", strerror(errno));
		fcntl(in[1], F_SETFL, O_NONBLOCK);
		c->in = in[0];
		st->input = in[1];
	}
}

/* The init's copies of the workload's ends, after the fork. */
static void close_child_io(const struct child_io *c)
{
	const int fds[] = {c->in, c->out, c->err, c->tty};
	for (size_t i = 0; i < sizeof fds / sizeof *fds; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

/* In the workload: its stdio from *c*, handed to the user (runc's fixStdioPermissions). */
static void child_stdio(const struct child_io *c, uid_t uid, gid_t gid)
{
	int ok;
	if (c->tty >= 0) {
		ok = ioctl(c->tty, TIOCSCTTY, 0) == 0 && dup2(c->tty, 0) == 0 && dup2(c->tty, 1) == 1 &&
		     dup2(c->tty, 2) == 2;
	} else {
		int in = c->in >= 0 ? c->in : open("/dev/null", O_RDONLY | O_CLOEXEC);
		ok = in >= 0 && dup2(in, 0) == 0 && dup2(c->out, 1) == 1 && dup2(c->err, 2) == 2;
	}
	if (!ok)
		child_fail(125, "cannot set up stdio: %s", strerror(errno));
	if ((c->in >= 0 || c->tty >= 0) && fchown(0, uid, gid) < 0)
		child_fail(125, "cannot hand stdin to the user: %s", strerror(errno));
	if (fchown(1, uid, gid) < 0 || fchown(2, uid, gid) < 0)
		child_fail(125, "cannot hand stdio to the user: %s", strerror(errno));
}

/* Output from *from* to the host: frames of *type* on the port, or the console's fd *type* (1, 2). */
static int relay_output(struct stream *st, int from, int type)
{
	char buf[FRAME_MAX];
	ssize_t n = read(from, buf, sizeof buf);
	if (n < 0)
		return errno == EINTR || errno == EAGAIN ? 1 : 0; /* EIO: the terminal's last user left */
	if (n == 0)
		return 0;
	if (st->port >= 0)
		send_frame(st, type, buf, (size_t)n);
	else
		put(type, buf, (size_t)n);
	return 1;
}
