#!/usr/bin/env python3
"""Source-line profile of loaded BPF programs (used by bench/bpf-lines.sh).

    bpf_lines.py jit PROG_ID          print the program's JIT image start and,
                                      per line-info record, its offset in
                                      the image and its instruction offset
    bpf_lines.py report PERF_DATA DIR [TOP]
                                      attribute perf samples to source lines

perf cannot annotate a JIT image without libopcodes, but the kernel keeps,
for every line-info record of a program loaded with BTF, the address its
first instruction was JITed to (`jited_line_info`). A sample's address
then names its source line: the last record at or before it. Samples in
kernel functions the program called (helpers, map code) are charged to
the program's calling line, from the call chain. `DIR` holds, per
program, `jit-<id>.txt` (from `jit`) and `xlated-<id>.txt` (`bpftool
prog dump xlated id <id> linum`).
"""

import bisect
import collections
import ctypes
import ctypes.util
import glob
import os
import re
import struct
import subprocess
import sys

SYS_BPF = 321  # x86_64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
# struct bpf_prog_info (include/uapi/linux/bpf.h): offsets of the fields used.
INFO_SIZE = 232
NR_JITED_KSYMS, JITED_KSYMS = 104, 112
NR_LINE_INFO, LINE_INFO, JITED_LINE_INFO = 148, 152, 160
NR_JITED_LINE_INFO, LINE_INFO_REC_SIZE, JITED_LINE_INFO_REC_SIZE = 168, 172, 176
LINE_REC = 16  # struct bpf_line_info
JITED_LINE_REC = 8  # __u64


def bpf(cmd, attr):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(attr, 128)
    ret = libc.syscall(SYS_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return ret


def jit(prog_id):
    fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<III", prog_id, 0, 0))

    def info(req):
        buf = ctypes.create_string_buffer(bytes(req), len(req))
        bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, len(req), ctypes.addressof(buf)))
        return buf

    first = info(bytearray(INFO_SIZE))
    (nr_lines,) = struct.unpack_from("<I", first, NR_LINE_INFO)
    (nr_jited,) = struct.unpack_from("<I", first, NR_JITED_LINE_INFO)
    (nr_ksyms,) = struct.unpack_from("<I", first, NR_JITED_KSYMS)
    if not nr_lines or nr_lines != nr_jited or not nr_ksyms:
        sys.exit(f"program {prog_id}: no JITed line info (loaded without BTF?)")
    lines = ctypes.create_string_buffer(nr_lines * LINE_REC)
    jited = ctypes.create_string_buffer(nr_jited * JITED_LINE_REC)
    ksyms = ctypes.create_string_buffer(nr_ksyms * 8)
    req = bytearray(INFO_SIZE)
    struct.pack_into("<I", req, NR_JITED_KSYMS, nr_ksyms)
    struct.pack_into("<Q", req, JITED_KSYMS, ctypes.addressof(ksyms))
    struct.pack_into("<I", req, NR_LINE_INFO, nr_lines)
    struct.pack_into("<Q", req, LINE_INFO, ctypes.addressof(lines))
    struct.pack_into("<Q", req, JITED_LINE_INFO, ctypes.addressof(jited))
    struct.pack_into("<I", req, NR_JITED_LINE_INFO, nr_jited)
    struct.pack_into("<I", req, LINE_INFO_REC_SIZE, LINE_REC)
    struct.pack_into("<I", req, JITED_LINE_INFO_REC_SIZE, JITED_LINE_REC)
    info(req)
    (start,) = struct.unpack_from("<Q", ksyms, 0)
    print(f"start {start:x}")
    for i in range(nr_lines):
        (insn,) = struct.unpack_from("<I", lines, i * LINE_REC)
        (addr,) = struct.unpack_from("<Q", jited, i * JITED_LINE_REC)
        print(addr - start, insn)


class Program:
    """One program's JIT image: address ranges to source lines."""

    def __init__(self, jit_file, xlated_file):
        rows = open(jit_file).read().split("\n")
        self.start = int(rows[0].split()[1], 16)
        recs = sorted(tuple(map(int, r.split())) for r in rows[1:] if r.strip())
        self.offsets = [r[0] for r in recs]
        self.insns = [r[1] for r in recs]
        self.end = self.start + self.offsets[-1] + 4096
        self.source = {}
        line = None
        for text in open(xlated_file):
            if text.startswith(";"):
                line = re.sub(
                    r"\s*\[file:.*/([\w.]+) line_num:(\d+).*\]", r"  [\1:\2]", text.strip()[2:]
                )
            else:
                m = re.match(r"\s*(\d+):", text)
                if m and line:
                    self.source.setdefault(int(m.group(1)), line)

    def contains(self, addr):
        return self.start <= addr < self.end

    def line(self, addr):
        i = bisect.bisect_right(self.offsets, addr - self.start) - 1
        return self.source.get(self.insns[max(i, 0)], "?")


def report(perf_data, directory, top):
    programs = {}
    for jit_file in glob.glob(os.path.join(directory, "jit-*.txt")):
        prog_id = jit_file.rsplit("-", 1)[1][:-4]
        programs[prog_id] = Program(jit_file, os.path.join(directory, f"xlated-{prog_id}.txt"))
    script = subprocess.run(
        ["perf", "script", "-i", perf_data, "-F", "ip,sym"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = {p: collections.Counter() for p in programs}
    calls = {p: collections.Counter() for p in programs}
    total = collections.Counter()
    for sample in script.split("\n\n"):
        frames = [f.split(None, 1) for f in sample.strip().splitlines()]
        for depth, frame in enumerate(frames):
            addr = int(frame[0], 16) if frame and re.fullmatch(r"[0-9a-f]+", frame[0]) else None
            owner = next((p for p, prog in programs.items() if addr and prog.contains(addr)), None)
            if owner is None:
                continue
            total[owner] += 1
            where = programs[owner].line(addr)
            if depth == 0:
                lines[owner][where] += 1
            else:
                callee = frames[0][1].split("+")[0] if len(frames[0]) > 1 else "?"
                lines[owner][where] += 1
                calls[owner][(where, callee)] += 1
            break
    for prog_id in sorted(programs, key=lambda p: -total[p]):
        n = total[prog_id]
        if not n:
            continue
        print(f"\nprogram {prog_id}: {n} samples (its own code and what it called)\n")
        print("| share | source line (with what it called) |\n|---|---|")
        for where, count in lines[prog_id].most_common(top):
            called = [
                f"{callee} {100 * c / n:.1f} %"
                for (w, callee), c in calls[prog_id].most_common()
                if w == where
            ]
            extra = f" — calls: {', '.join(called[:3])}" if called else ""
            print(f"| {100 * count / n:5.1f} % | `{where}`{extra} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "jit":
        jit(int(sys.argv[2]))
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) == 5 else 30)
    else:
        sys.exit(__doc__)
