/* The calling thread's user-space instructions from the CPU's hardware counter (perf_event_open), for ctypes:
   where the machine exposes the counter, this counts natively what callgrind counts under emulation. */
#include <errno.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* A stopped counter of this thread's user-space instructions (as callgrind's, no kernel): its fd, or -errno. */
int quill_pc_open(void) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.type = PERF_TYPE_HARDWARE;
    attr.size = sizeof attr;
    attr.config = PERF_COUNT_HW_INSTRUCTIONS;
    attr.disabled = 1;
    attr.exclude_kernel = 1;
    attr.exclude_hv = 1;
    attr.read_format = PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING;
    int fd = (int)syscall(SYS_perf_event_open, &attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

/* Zero the counter and start it: 0, or -errno. */
int quill_pc_start(int fd) {
    if (ioctl(fd, PERF_EVENT_IOC_RESET, 0) < 0 || ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) < 0) return -errno;
    return 0;
}

/* Stop the counter: the instructions since quill_pc_start, or -errno. A count the kernel scaled because the
   counter shared the hardware with other events for part of the time is an estimate, not a count: -EBUSY. */
long long quill_pc_stop(int fd) {
    uint64_t v[3]; /* value, time enabled, time running */
    if (ioctl(fd, PERF_EVENT_IOC_DISABLE, 0) < 0) return -errno;
    if (read(fd, v, sizeof v) != (ssize_t)sizeof v) return -EIO;
    if (v[2] < v[1]) return -EBUSY;
    return (long long)v[0];
}
