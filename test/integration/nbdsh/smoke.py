"""nbdsh smoke test: every command the server offers, on a fresh 16 MiB
memory export (sparse, 64 KiB pages) given in $NBD_URI.

The memory export advertises FAST_ZERO and fails with ENOTSUP only when
FAST_ZERO and NO_HOLE come together (zeroing while keeping pages allocated is
a write); plain FAST_ZERO succeeds by punching holes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from nbdcheck import Checker, env, pattern  # noqa: E402

K = 1024
M = 1024 * K
c = Checker()

h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(env("NBD_URI"))


def info():
    assert h.get_size() == 16 * M, "size %d" % h.get_size()
    assert h.get_structured_replies_negotiated(), "no structured replies"
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no base:allocation"
    for what in ("can_fua", "can_flush", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache", "can_multi_conn"):
        assert getattr(h, what)(), what + " is false"
    assert not h.is_read_only(), "read-only"
    assert not h.is_rotational(), "rotational"
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1, "minimum block"
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "preferred block"
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * M, "maximum block"


c.check("info: size, flags, base:allocation, block sizes", info)


def expect_read(offset, data):
    got = h.pread(len(data), offset)
    if got != data:
        first = next(i for i in range(len(data)) if got[i] != data[i])
        raise AssertionError("mismatch at offset %d: got 0x%02x, want 0x%02x" % (offset + first, got[first], data[first]))


# Page 0-1: written with FUA.
c.check("pwrite 128k with FUA", lambda: h.pwrite(pattern(0xAB, 128 * K), 0, nbd.CMD_FLAG_FUA))
c.check("pread returns what was written", lambda: expect_read(0, pattern(0xAB, 128 * K)))

# Page 0: zero with FAST_ZERO (memory export: punches a hole, fast).
c.check("zero with FAST_ZERO succeeds", lambda: h.zero(64 * K, 0, nbd.CMD_FLAG_FAST_ZERO))
c.check("zeroed range reads zeros", lambda: expect_read(0, bytes(64 * K)))

# Page 1: zero with NO_HOLE (stays allocated).
c.check("zero with NO_HOLE succeeds", lambda: h.zero(64 * K, 64 * K, nbd.CMD_FLAG_NO_HOLE))
c.check("NO_HOLE range reads zeros", lambda: expect_read(64 * K, bytes(64 * K)))

# Page 2: FAST_ZERO + NO_HOLE is refused with ENOTSUP and must not change data.
c.check("pwrite 0xcd page 2", lambda: h.pwrite(pattern(0xCD, 64 * K), 128 * K))
c.expect_error("zero with FAST_ZERO|NO_HOLE fails fast with ENOTSUP",
               lambda: h.zero(64 * K, 128 * K, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE), "ENOTSUP")
c.check("refused fast zero left the data alone", lambda: expect_read(128 * K, pattern(0xCD, 64 * K)))

# Pages 4-5: trim page 4.
c.check("pwrite 0xee pages 4-5", lambda: h.pwrite(pattern(0xEE, 128 * K), 256 * K))
c.check("trim page 4", lambda: h.trim(64 * K, 256 * K))
c.check("trimmed page reads zeros", lambda: expect_read(256 * K, bytes(64 * K)))
c.check("page after the trim intact", lambda: expect_read(320 * K, pattern(0xEE, 64 * K)))
c.check("trim with FUA", lambda: h.trim(4 * K, 15 * M, nbd.CMD_FLAG_FUA))
c.check("zero with FUA", lambda: h.zero(4 * K, 15 * M, nbd.CMD_FLAG_FUA))

c.check("flush", lambda: h.flush())
c.check("cache", lambda: h.cache(1 * M, 0))


def extents(count, offset, flags=0):
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            got.append((off, list(zip(entries[0::2], entries[1::2]))))
        return 0

    h.block_status(count, offset, cb, flags)
    assert len(got) == 1, "expected one base:allocation reply, got %d" % len(got)
    assert got[0][0] == offset, "extents start at %d, not %d" % (got[0][0], offset)
    return got[0][1]


HZ = nbd.STATE_HOLE | nbd.STATE_ZERO


def block_status_map():
    ex = extents(1 * M, 0)
    want = [(64 * K, HZ), (128 * K, 0), (128 * K, HZ), (64 * K, 0), (1 * M - 384 * K, HZ)]
    assert ex == want, "extents %r, want %r" % (ex, want)


c.check("block_status: hole / data / hole / data / hole as written", block_status_map)


def block_status_req_one():
    ex = extents(1 * M, 0, nbd.CMD_FLAG_REQ_ONE)
    assert ex == [(64 * K, HZ)], "REQ_ONE extents %r" % ex


c.check("block_status with REQ_ONE: exactly one extent", block_status_req_one)


def block_status_unaligned():
    ex = extents(100 * K, 100)
    assert ex[0] == (64 * K - 100, HZ), "first extent %r" % (ex[0],)
    assert sum(n for n, _ in ex[:-1]) < 100 * K, "extents past the request"
    assert sum(n for n, _ in ex) >= 1


c.check("block_status at an unaligned offset", block_status_unaligned)


def structured_read(flags):
    chunks = []

    def cb(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status))
        return 0

    buf = h.pread_structured(256 * K, 128 * K, cb, flags)
    want = pattern(0xCD, 64 * K) + bytes(128 * K) + pattern(0xEE, 64 * K)
    assert buf == want, "structured read returned the wrong bytes"
    return sorted(chunks)


def read_fragmented():
    chunks = structured_read(0)
    assert chunks == [(128 * K, 64 * K, nbd.READ_DATA), (192 * K, 128 * K, nbd.READ_HOLE), (320 * K, 64 * K, nbd.READ_DATA)], \
        "chunks %r" % chunks


def read_df():
    chunks = structured_read(nbd.CMD_FLAG_DF)
    assert chunks == [(128 * K, 256 * K, nbd.READ_DATA)], "DF chunks %r" % chunks


c.check("structured read: data and hole chunks", read_fragmented)
c.check("structured read with DF: one data chunk", read_df)


def df_hole_only():
    chunks = []
    buf = h.pread_structured(64 * K, 2 * M, lambda b, o, s, e: chunks.append((o, len(b), s)) or 0, nbd.CMD_FLAG_DF)
    assert buf == bytes(64 * K)
    assert chunks == [(2 * M, 64 * K, nbd.READ_DATA)], "DF chunks %r" % chunks


c.check("structured read with DF over a hole: one data chunk of zeros", df_hole_only)

# Unaligned write: neighbours untouched.
c.check("pwrite unaligned 5000 bytes at 1000001", lambda: h.pwrite(pattern(0x42, 5000), 1000001))
c.check("unaligned write reads back with untouched neighbours",
        lambda: expect_read(999999, bytes(2) + pattern(0x42, 5000) + bytes(2)))

# 4 MiB across many pages, one request each way.
big = bytes((i * 7 + 3) & 0xFF for i in range(256)) * (16 * K)
c.check("pwrite 4 MiB", lambda: h.pwrite(big, 8 * M))
c.check("pread 4 MiB", lambda: expect_read(8 * M, big))


def aio_batch():
    cookies = []
    bufs = []
    for i in range(64):
        b = nbd.Buffer.from_bytearray(bytearray([i]) * (4 * K))
        bufs.append(b)
        cookies.append(h.aio_pwrite(b, 13 * M + i * 4 * K))
    cookies.append(h.aio_flush())
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for ck in cookies:
        assert h.aio_command_completed(ck), "command %d not completed" % ck
    data = h.pread(64 * 4 * K, 13 * M)
    for i in range(64):
        assert data[i * 4 * K:(i + 1) * 4 * K] == bytes([i]) * (4 * K), "aio write %d wrong" % i


c.check("64 concurrent aio_pwrite + aio_flush, then read back", aio_batch)

c.check("shutdown", lambda: h.shutdown())
c.finish()
