"""Malformed and refused requests, sent with libnbd's client-side checks off
(set_strict_mode(0)), so the server has to answer them.

$NBD_URI       read-write memory export (FAST_ZERO advertised)
$NBD_RO_URI    read-only memory export
$NBD_FILE_URI  raw-file export (FAST_ZERO not advertised)

After every refused request, a good read on the same connection must still
work: an error must never desynchronise or drop the connection.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from nbdcheck import Checker, env, expect, pattern  # noqa: E402

K = 1024
M = 1024 * K
c = Checker()


def connect(uri, meta=True):
    h = nbd.NBD()
    h.set_strict_mode(0)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


h = connect(env("NBD_URI"))
size = h.get_size()
c.check("strict mode is off", lambda: expect(h.get_strict_mode() == 0, "strict mode %d" % h.get_strict_mode()))
c.check("seed 4k of 0x5a at 0", lambda: h.pwrite(pattern(0x5A, 4 * K), 0))

step = [0]


def still_works(hh=None, label=""):
    """A good read after an error: the connection is still in sync."""
    hh = hh or h
    step[0] += 1

    def good_read():
        got = hh.pread(4 * K, 0)
        assert got == pattern(0x5A, 4 * K), "read after the error returned the wrong data"

    c.check("connection still works (%s)" % label, good_read)


def refused(name, fn, want, hh=None):
    c.expect_error(name, fn, want)
    still_works(hh, name)


noop = lambda *a: 0  # noqa: E731

refused("read past the end -> EINVAL", lambda: h.pread(512, size), "EINVAL")
refused("read straddling the end -> EINVAL", lambda: h.pread(4 * K, size - 2 * K), "EINVAL")
refused("read at a huge offset -> EINVAL", lambda: h.pread(512, 1 << 62), "EINVAL")
refused("write past the end -> ENOSPC", lambda: h.pwrite(pattern(1, 4 * K), size - 2 * K), "ENOSPC")
refused("write beyond the end -> ENOSPC", lambda: h.pwrite(pattern(1, 4 * K), size), "ENOSPC")
c.check("refused write changed nothing before the end", lambda: expect(h.pread(2 * K, size - 2 * K) == bytes(2 * K), "data changed"))
refused("trim past the end -> EINVAL", lambda: h.trim(4 * K, size - 2 * K), "EINVAL")
refused("zero past the end -> ENOSPC", lambda: h.zero(4 * K, size - 2 * K), "ENOSPC")
refused("cache past the end -> EINVAL", lambda: h.cache(4 * K, size), "EINVAL")
refused("block_status past the end -> EINVAL", lambda: h.block_status(4 * K, size, noop), "EINVAL")
refused("zero-length read -> EINVAL", lambda: h.pread(0, 0), "EINVAL")
refused("zero-length write -> EINVAL", lambda: h.pwrite(b"", 0), "EINVAL")
refused("zero-length trim -> EINVAL", lambda: h.trim(0, 0), "EINVAL")
refused("read with an unknown flag (0x20) -> EINVAL", lambda: h.pread(512, 0, 0x20), "EINVAL")
refused("read with an unknown flag (0x8000) -> EINVAL", lambda: h.pread(512, 0, 0x8000), "EINVAL")
refused("read with NO_HOLE -> EINVAL", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), "EINVAL")
refused("write with FAST_ZERO -> EINVAL", lambda: h.pwrite(pattern(1, 512), 8 * K, nbd.CMD_FLAG_FAST_ZERO), "EINVAL")
refused("trim with NO_HOLE -> EINVAL", lambda: h.trim(512, 8 * K, nbd.CMD_FLAG_NO_HOLE), "EINVAL")
refused("flush with DF -> EINVAL", lambda: h.flush(nbd.CMD_FLAG_DF), "EINVAL")
refused("block_status with DF -> EINVAL", lambda: h.block_status(4 * K, 0, noop, nbd.CMD_FLAG_DF), "EINVAL")
refused("zero with FAST_ZERO|NO_HOLE on the memory export -> ENOTSUP",
        lambda: h.zero(64 * K, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE), "ENOTSUP")
refused("read larger than the 32 MiB maximum -> EINVAL", lambda: h.pread(32 * M + 4 * K, 0), "EINVAL")
refused("write larger than the 32 MiB maximum -> EINVAL (payload skipped)",
        lambda: h.pwrite(pattern(0x77, 32 * M + 4 * K), 0), "EINVAL")
c.check("oversized write changed nothing", lambda: expect(h.pread(8 * K, 4 * K) == bytes(8 * K), "data changed"))
refused("read with REQ_ONE -> EINVAL", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), "EINVAL")
refused("cache with NO_HOLE -> EINVAL", lambda: h.cache(512, 0, nbd.CMD_FLAG_NO_HOLE), "EINVAL")
refused("zero with DF -> EINVAL", lambda: h.zero(512, 8 * K, nbd.CMD_FLAG_DF), "EINVAL")


def max_payload_ok():
    expect(size >= 64 * M, "export too small for this check: %d" % size)
    big = pattern(0x6B, 32 * M)
    h.pwrite(big, size - 32 * M)  # exactly the maximum, ending exactly at the end
    got = h.pread(32 * M, size - 32 * M)
    expect(got == big, "32 MiB read back differs")


c.check("write and read of exactly 32 MiB ending at the last byte succeed", max_payload_ok)
still_works(None, "after 32 MiB requests")
c.check("FUA accepted on a read (FUA is valid on every command)", lambda: h.pread(512, 0, nbd.CMD_FLAG_FUA))
c.check("FUA accepted on a flush", lambda: h.flush(nbd.CMD_FLAG_FUA))

# Block status without a negotiated meta context.
hn = connect(env("NBD_URI"), meta=False)
c.check("no meta context negotiated", lambda: expect(not hn.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation negotiated"))
refused("block_status without a meta context -> EINVAL", lambda: hn.block_status(4 * K, 0, noop), "EINVAL", hn)
hn.shutdown()

# Read-only export.
ro = connect(env("NBD_RO_URI"))
c.check("read-only export says so", lambda: expect(ro.is_read_only(), "not read-only"))
c.check("read-only export: no trim/zero/fast-zero advertised",
        lambda: expect((not ro.can_trim() and not ro.can_zero() and not ro.can_fast_zero()), "advertised"))


def ro_read_ok():
    assert ro.pread(4 * K, 0) == bytes(4 * K)


def refused_ro(name, fn, want):
    c.expect_error(name, fn, want)
    c.check("read-only connection still works (%s)" % name, ro_read_ok)


refused_ro("write on a read-only export -> EPERM", lambda: ro.pwrite(pattern(1, 4 * K), 0), "EPERM")
refused_ro("write with FUA on a read-only export -> EPERM", lambda: ro.pwrite(pattern(1, 4 * K), 0, nbd.CMD_FLAG_FUA), "EPERM")
refused_ro("trim on a read-only export -> EPERM", lambda: ro.trim(4 * K, 0), "EPERM")
refused_ro("zero on a read-only export -> EPERM", lambda: ro.zero(4 * K, 0), "EPERM")
refused_ro("write past the end of a read-only export -> EPERM or ENOSPC", lambda: ro.pwrite(pattern(1, 512), ro.get_size()), ("EPERM", "ENOSPC"))
c.check("flush on a read-only export succeeds", lambda: ro.flush())
ro.shutdown()

# The raw-file export does not advertise FAST_ZERO: the flag is an error.
fh = connect(env("NBD_FILE_URI"))
c.check("file export: WRITE_ZEROES advertised, FAST_ZERO not",
        lambda: expect((fh.can_zero() and not fh.can_fast_zero()), "zero %s fast %s" % (fh.can_zero(), fh.can_fast_zero())))
c.check("file export: seed", lambda: fh.pwrite(pattern(0x5A, 4 * K), 0))
refused("zero with FAST_ZERO when not advertised -> EINVAL", lambda: fh.zero(4 * K, 0, nbd.CMD_FLAG_FAST_ZERO), "EINVAL", fh)
c.check("file export: zero without FAST_ZERO works", lambda: fh.zero(4 * K, 8 * K))
c.check("file export: zeroed", lambda: expect(fh.pread(4 * K, 8 * K) == bytes(4 * K), "not zero"))
fh.shutdown()

h.shutdown()
c.finish()
