#!/usr/bin/env python3
"""What an append + fdatasync costs on this disk, by how the file was prepared.

    python3 docs/bench/s10/fsync-probe.py [DIR]   (DIR on the disk under test; default .)

grow: the file grows with every append (the WAL before 587c1d4); falloc: preallocated with
fallocate (the WAL since); keepsize: fallocate with FALLOC_FL_KEEP_SIZE (blocks allocated,
size still grows); zero: zero-filled first. 2,000 appends of 600 bytes each, per mode.
"""
import ctypes, os, resource, sys, time

libc = ctypes.CDLL("libc.so.6", use_errno=True)


def run(path, mode, n=2000, sz=600):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    if mode == "zero":
        z = b"\0" * (1 << 20)
        for i in range(8):
            os.pwrite(fd, z, i << 20)
    elif mode == "falloc":
        os.posix_fallocate(fd, 0, 8 << 20)
    elif mode == "keepsize":
        assert libc.fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(8 << 20)) == 0
    os.fsync(fd)
    buf = b"x" * sz
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    lat = []
    for i in range(n):
        a = time.perf_counter()
        os.pwrite(fd, buf, i * sz)
        os.fdatasync(fd)
        lat.append(time.perf_counter() - a)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
    os.unlink(path)
    lat.sort()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"{mode:9} p50 {1e3 * lat[n // 2]:.3f} ms  p99 {1e3 * lat[int(n * .99)]:.3f} ms  "
          f"CPU {1e6 * cpu / n:.1f} us per append")


d = sys.argv[1] if len(sys.argv) > 1 else "."
for _ in range(3):
    for m in ["grow", "falloc", "keepsize", "zero"]:
        run(os.path.join(d, "fsync-probe.tmp"), m)
