/* A reference for bench_access.py: the fastest a FUSE daemon can serve a sequential
 * direct-I/O read of a file that is already in the page cache, on this machine.
 *
 * It speaks the kernel's FUSE protocol itself (no libfuse, one thread) and answers each
 * READ by splicing the file's page-cache pages into /dev/fuse, so the only copy is the
 * kernel's, into the reader's buffer: no FUSE daemon, in any language, does less.
 * It serves one file, named "f", and nothing else. Root only (mount(2) directly).
 *
 *   fuse_floor MOUNTPOINT FILE      (runs until unmounted)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_READ (1u << 20) /* the kernel's default request cap: 256 pages */

static int dev, src, pipefd[2], splicing;
static off_t file_size;
static char *data;

static void reply(uint64_t unique, int err, const void *arg, size_t len)
{
    struct fuse_out_header h = {sizeof h + len, err, unique};
    struct iovec iov[2] = {{&h, sizeof h}, {(void *)arg, len}};
    if (writev(dev, iov, arg ? 2 : 1) < 0 && errno != ENOENT)
        perror("fuse_floor: reply");
}

static void fill_attr(struct fuse_attr *a, uint64_t ino)
{
    memset(a, 0, sizeof *a);
    a->ino = ino;
    a->nlink = 1;
    a->blksize = MAX_READ; /* as vmarc mount: cat reads a request's worth at a time */
    if (ino == FUSE_ROOT_ID) {
        a->mode = S_IFDIR | 0555;
    } else {
        a->mode = S_IFREG | 0444;
        a->size = file_size;
        a->blocks = file_size / 512;
    }
}

static int serve_read(uint64_t unique, const struct fuse_read_in *r)
{
    size_t len = 0;
    if ((off_t)r->offset < file_size)
        len = file_size - r->offset < r->size ? file_size - r->offset : r->size;
    if (!splicing) {
        ssize_t got = pread(src, data, len, r->offset);
        reply(unique, got < 0 ? -errno : 0, data, got < 0 ? 0 : got);
        return 0;
    }
    /* header, then the file's pages, into the pipe; then the whole message out */
    struct fuse_out_header h = {sizeof h + len, 0, unique};
    if (write(pipefd[1], &h, sizeof h) != sizeof h)
        return -1;
    loff_t off = r->offset;
    for (size_t left = len; left;) {
        ssize_t n = splice(src, &off, pipefd[1], NULL, left, SPLICE_F_MOVE);
        if (n <= 0)
            return -1;
        left -= n;
    }
    for (size_t left = sizeof h + len; left;) {
        ssize_t n = splice(pipefd[0], NULL, dev, NULL, left, SPLICE_F_MOVE);
        if (n <= 0)
            return -1;
        left -= n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: fuse_floor MOUNTPOINT FILE\n");
        return 2;
    }
    src = open(argv[2], O_RDONLY);
    dev = open("/dev/fuse", O_RDWR);
    if (src < 0 || dev < 0) {
        perror("fuse_floor: open");
        return 1;
    }
    file_size = lseek(src, 0, SEEK_END);
    /* a whole reply must fit the pipe: past fs.pipe-max-size, fall back to one copy */
    splicing = pipe(pipefd) == 0 && fcntl(pipefd[1], F_SETPIPE_SZ, 2 * MAX_READ) > 0;
    fprintf(stderr, "fuse_floor: %s\n", splicing ? "splice" : "pread + writev");
    char opts[128];
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,max_read=%u",
             dev, MAX_READ);
    if (mount("fuse_floor", argv[1], "fuse.fuse_floor", MS_RDONLY | MS_NOSUID | MS_NODEV,
              opts)) {
        perror("fuse_floor: mount");
        return 1;
    }
    size_t bufsize = MAX_READ + 65536;
    char *buf = malloc(bufsize);
    data = malloc(MAX_READ);
    for (;;) {
        ssize_t n = read(dev, buf, bufsize);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT)
                continue;
            if (errno == ENODEV) /* unmounted */
                return 0;
            perror("fuse_floor: read");
            return 1;
        }
        struct fuse_in_header *in = (void *)buf;
        void *arg = in + 1;
        switch (in->opcode) {
        case FUSE_INIT: {
            const struct fuse_init_in *ii = arg;
            struct fuse_init_out o = {.major = FUSE_KERNEL_VERSION, .minor = 38};
            o.max_readahead = ii->max_readahead;
            o.flags = ii->flags & (FUSE_MAX_PAGES | FUSE_SPLICE_WRITE | FUSE_SPLICE_MOVE |
                                   FUSE_BIG_WRITES | FUSE_ASYNC_READ);
            o.max_background = 12;
            o.congestion_threshold = 9;
            o.max_write = MAX_READ;
            o.max_pages = MAX_READ / 4096;
            o.time_gran = 1;
            reply(in->unique, 0, &o, sizeof o);
            break;
        }
        case FUSE_LOOKUP: {
            struct fuse_entry_out e = {.nodeid = 2, .attr_valid = 1000, .entry_valid = 1000};
            if (in->nodeid != FUSE_ROOT_ID || strcmp(arg, "f")) {
                reply(in->unique, -ENOENT, NULL, 0);
                break;
            }
            fill_attr(&e.attr, 2);
            reply(in->unique, 0, &e, sizeof e);
            break;
        }
        case FUSE_GETATTR: {
            struct fuse_attr_out a = {.attr_valid = 1000};
            fill_attr(&a.attr, in->nodeid);
            reply(in->unique, 0, &a, sizeof a);
            break;
        }
        case FUSE_OPEN:
        case FUSE_OPENDIR: {
            struct fuse_open_out o = {.open_flags = in->opcode == FUSE_OPEN ? FOPEN_DIRECT_IO : 0};
            reply(in->unique, 0, &o, sizeof o);
            break;
        }
        case FUSE_READ:
            if (serve_read(in->unique, arg)) {
                perror("fuse_floor: splice");
                return 1;
            }
            break;
        case FUSE_FORGET:
        case FUSE_BATCH_FORGET:
        case FUSE_INTERRUPT:
            break; /* no reply */
        case FUSE_RELEASE:
        case FUSE_RELEASEDIR:
        case FUSE_FLUSH:
            reply(in->unique, 0, NULL, 0);
            break;
        case FUSE_DESTROY:
            reply(in->unique, 0, NULL, 0);
            return 0;
        default:
            reply(in->unique, -ENOSYS, NULL, 0);
        }
    }
}
