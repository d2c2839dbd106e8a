"""The handshake, one option at a time, with libnbd's opt mode
(set_opt_mode(True)) and, where libnbd 1.14 cannot send an option on its
own, a raw socket.

$NBD_URI     nbd://HOST:PORT/NAME of a read-write memory export
$NBD_EXPECT  JSON list of the server's exports, in listing order:
             [{"name", "size", "readOnly", "description"}]
             The first one is the default export (empty name).
"""
import json
import os
import socket
import struct
import sys
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from nbdcheck import Checker, env, expect  # noqa: E402

c = Checker()
uri = env("NBD_URI")
expected = json.loads(env("NBD_EXPECT"))
u = urlparse(uri)
host, port = u.hostname, u.port
base = "nbd://%s:%d/" % (host, port)
by_name = {e["name"]: e for e in expected}
rw_name = urlparse(uri).path.lstrip("/")


def opt_handle(structured=True):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    return h


h = opt_handle()
c.check("opt mode: still negotiating after connect", lambda: expect(h.aio_is_negotiating(), "not negotiating"))
c.check("structured replies negotiated", lambda: expect(h.get_structured_replies_negotiated(), "no"))

# NBD_OPT_LIST
listed = []


def do_list():
    n = h.opt_list(lambda name, desc: listed.append((name, desc)) or 0)
    expect(n == len(expected), "opt_list returned %d, want %d" % (n, len(expected)))
    want = [(e["name"], e.get("description") or "") for e in expected]
    expect(listed == want, "listed %r, want %r" % (listed, want))


c.check("opt_list: every export with its description", do_list)
c.check("opt_list twice on one connection", lambda: expect(h.opt_list(lambda n, d: 0) == len(expected), "second list differs"))

# NBD_OPT_INFO for each known export.
for e in expected:
    def info(e=e):
        h.set_export_name(e["name"])
        h.set_full_info(True)
        h.opt_info()
        expect(h.get_size() == e["size"], "size %d, want %d" % (h.get_size(), e["size"]))
        expect(h.is_read_only() == e["readOnly"], "read-only %s" % h.is_read_only())
        expect(h.get_canonical_export_name() == e["name"], "name %r" % h.get_canonical_export_name())
        if e.get("description"):
            expect(h.get_export_description() == e["description"], "description %r" % h.get_export_description())
        expect(h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "preferred block size")
        if e["readOnly"]:
            expect(not h.can_zero() and not h.can_trim(), "read-only export offers zero/trim")
        expect(h.aio_is_negotiating(), "left negotiation")
    c.check("opt_info %r: size, read-only, name, description, block size" % e["name"], info)


def info_default():
    h.set_export_name("")
    h.opt_info()
    expect(h.get_size() == expected[0]["size"], "default export size %d" % h.get_size())


c.check("opt_info for the default export (empty name)", info_default)


def info_unknown():
    h.set_export_name("no-such-export")
    h.opt_info()


c.expect_error("opt_info for an unknown export fails with ENOENT", info_unknown, "ENOENT")
c.check("still negotiating after the failed opt_info", lambda: expect(h.aio_is_negotiating(), "not negotiating"))

# NBD_OPT_LIST_META_CONTEXT
h.set_export_name(rw_name)


def list_meta(queries):
    h.clear_meta_contexts()
    for q in queries:
        h.add_meta_context(q)
    got = []
    n = h.opt_list_meta_context(lambda name: got.append(name) or 0)
    expect(n == len(got), "count %d vs %d callbacks" % (n, len(got)))
    return got


c.check("opt_list_meta_context with no query lists base:allocation",
        lambda: expect(list_meta([]) == ["base:allocation"], "got %r" % list_meta([])))
c.check("opt_list_meta_context base:allocation", lambda: expect(list_meta(["base:allocation"]) == ["base:allocation"], "wrong"))
c.check("opt_list_meta_context base: (namespace wildcard)", lambda: expect(list_meta(["base:"]) == ["base:allocation"], "wrong"))
c.check("opt_list_meta_context of an unknown context: empty", lambda: expect(list_meta(["qemu:dirty-bitmap:x"]) == [], "wrong"))
c.check("opt_list_meta_context of an unknown base: leaf: empty", lambda: expect(list_meta(["base:nothing"]) == [], "wrong"))


def list_meta_unknown_export():
    h.set_export_name("no-such-export")
    try:
        list_meta([])
    finally:
        h.set_export_name(rw_name)


# libnbd 1.14 reports any error reply to LIST_META_CONTEXT as ENOTSUP; the raw
# check below pins the reply type (ERR_UNKNOWN).
c.expect_error("opt_list_meta_context for an unknown export fails", list_meta_unknown_export, ("ENOENT", "EINVAL", "ENOTSUP"))

# NBD_OPT_SET_META_CONTEXT then GO, with structured replies: block status works.
if hasattr(h, "opt_set_meta_context"):
    c.check("opt_set_meta_context selects base:allocation",
            lambda: expect(h.opt_set_meta_context(lambda name: 0) == 1, "not selected"))


def go_structured():
    h.clear_meta_contexts()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name(rw_name)
    h.opt_go()
    expect(not h.aio_is_negotiating(), "still negotiating")
    expect(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    expect(h.can_df(), "DF not offered with structured replies")
    h.pwrite(b"\x5a" * 4096, 0)
    expect(h.pread(4096, 0) == b"\x5a" * 4096, "read back")
    seen = []
    h.block_status(65536, 0, lambda ctx, off, ents, err: seen.append(ctx) or 0)
    expect(seen == ["base:allocation"], "block status contexts %r" % seen)


c.check("opt_go with structured replies and base:allocation: read, write, block status", go_structured)
h.shutdown()

# NBD_OPT_GO without structured replies: simple replies only.
s = opt_handle(structured=False)
c.check("structured replies not negotiated when not requested", lambda: expect(not s.get_structured_replies_negotiated(), "negotiated"))


def go_simple():
    s.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)  # libnbd does not send it without structured replies
    s.set_export_name(rw_name)
    s.opt_go()
    expect(not s.aio_is_negotiating(), "still negotiating")
    expect(not s.can_df(), "DF offered without structured replies")
    expect(not s.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation without structured replies")
    expect(s.pread(4096, 0) == b"\x5a" * 4096, "simple read of data")
    expect(s.pread(128 * 1024, 1024 * 1024) == bytes(128 * 1024), "simple read of a hole reads zeros")
    s.pwrite(b"\x33" * 1000, 4096 + 7)
    expect(s.pread(1002, 4096 + 6) == b"\0" + b"\x33" * 1000 + b"\0", "simple read after an unaligned write")


c.check("opt_go without structured replies: simple-reply reads and writes", go_simple)


def simple_error():
    s.set_strict_mode(0)
    s.pread(512, s.get_size())


c.expect_error("simple-reply error for a read past the end: EINVAL", simple_error, "EINVAL")
c.check("simple-reply connection still works after the error", lambda: expect(s.pread(4096, 0) == b"\x5a" * 4096, "wrong data"))
s.shutdown()

# opt_go for an unknown export fails, negotiation goes on, then a good opt_go.
g = opt_handle()


def go_unknown():
    g.set_export_name("no-such-export")
    g.opt_go()


c.expect_error("opt_go for an unknown export fails with ENOENT", go_unknown, "ENOENT")


def go_after_failure():
    expect(g.aio_is_negotiating(), "not negotiating after a failed GO")
    g.set_export_name(rw_name)
    g.opt_go()
    expect(g.pread(4096, 0) == b"\x5a" * 4096, "read")


c.check("opt_go after a failed opt_go works", go_after_failure)
g.shutdown()

# NBD_OPT_ABORT
a = opt_handle()


def abort():
    a.opt_abort()
    expect(not a.aio_is_negotiating(), "still negotiating after abort")
    expect(a.aio_is_closed() or a.aio_is_dead(), "not closed after abort")


c.check("opt_abort ends the connection cleanly", abort)


# Raw socket: options libnbd 1.14 cannot send alone.
OPT_MAGIC = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
REP_ACK = 1
REP_META_CONTEXT = 4
ERR_UNSUP = 0x80000001
ERR_INVALID = 0x80000003
ERR_UNKNOWN = 0x80000006
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_INFO = 6


class Raw:
    def __init__(self):
        self.s = socket.create_connection((host, port), timeout=10)
        greeting = self.recv(18)
        magic, ihaveopt, flags = struct.unpack(">QQH", greeting)
        expect(magic == 0x4E42444D41474943 and ihaveopt == OPT_MAGIC, "bad greeting")
        expect(flags == 3, "handshake flags %#x" % flags)
        self.s.sendall(struct.pack(">I", 3))

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            d = self.s.recv(n - len(buf))
            if not d:
                raise AssertionError("server closed the connection")
            buf += d
        return buf

    def option(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", OPT_MAGIC, opt, len(data)) + data)

    def reply(self):
        magic, opt, typ, length = struct.unpack(">QIII", self.recv(20))
        expect(magic == REP_MAGIC, "bad reply magic %#x" % magic)
        return opt, typ, self.recv(length)

    def close(self):
        self.s.close()


def meta_request(name, queries):
    nb = name.encode()
    out = struct.pack(">I", len(nb)) + nb + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode()
        out += struct.pack(">I", len(qb)) + qb
    return out


def raw_set_meta():
    r = Raw()
    try:
        r.option(NBD_OPT_SET_META_CONTEXT, meta_request(rw_name, ["base:allocation"]))
        opt, typ, _ = r.reply()
        expect(opt == NBD_OPT_SET_META_CONTEXT and typ == ERR_INVALID,
               "SET_META_CONTEXT before STRUCTURED_REPLY: reply %#x, want ERR_INVALID" % typ)
        r.option(NBD_OPT_STRUCTURED_REPLY)
        opt, typ, _ = r.reply()
        expect(typ == REP_ACK, "STRUCTURED_REPLY: reply %#x" % typ)
        r.option(NBD_OPT_SET_META_CONTEXT, meta_request(rw_name, ["base:allocation", "qemu:dirty-bitmap:x"]))
        opt, typ, data = r.reply()
        expect(typ == REP_META_CONTEXT, "SET_META_CONTEXT: first reply %#x" % typ)
        expect(data[4:] == b"base:allocation", "context %r" % data[4:])
        opt, typ, _ = r.reply()
        expect(typ == REP_ACK, "SET_META_CONTEXT: reply %#x, want ACK" % typ)
        r.option(NBD_OPT_LIST_META_CONTEXT, meta_request("no-such-export", []))
        opt, typ, _ = r.reply()
        expect(typ == ERR_UNKNOWN, "LIST_META_CONTEXT for an unknown export: reply %#x, want ERR_UNKNOWN" % typ)
        nb = b"no-such-export"
        r.option(NBD_OPT_INFO, struct.pack(">I", len(nb)) + nb + struct.pack(">H", 0))
        opt, typ, _ = r.reply()
        expect(typ == ERR_UNKNOWN, "INFO for an unknown export: reply %#x, want ERR_UNKNOWN" % typ)
        r.option(0x7777)  # unknown option
        opt, typ, _ = r.reply()
        expect(opt == 0x7777 and typ == ERR_UNSUP, "unknown option: reply %#x, want ERR_UNSUP" % typ)
        r.option(NBD_OPT_LIST, b"x")  # LIST with data
        opt, typ, _ = r.reply()
        expect(typ == ERR_INVALID, "LIST with data: reply %#x, want ERR_INVALID" % typ)
        r.option(NBD_OPT_ABORT)
        opt, typ, _ = r.reply()
        expect(opt == NBD_OPT_ABORT and typ == REP_ACK, "ABORT: reply %#x" % typ)
        expect(r.s.recv(1) == b"", "server did not close after ABORT")
    finally:
        r.close()


c.check("raw: SET_META_CONTEXT needs structured replies (ERR_INVALID), then selects base:allocation; "
        "unknown export ERR_UNKNOWN; unknown option ERR_UNSUP; LIST with data ERR_INVALID; ABORT acked and closed", raw_set_meta)

NBD_OPT_EXPORT_NAME = 1
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698


def raw_export_name(client_flags, name=rw_name):
    """Greeting, client flags, EXPORT_NAME; returns (Raw, size, flags)."""
    r = Raw.__new__(Raw)
    r.s = socket.create_connection((host, port), timeout=10)
    r.recv(18)
    r.s.sendall(struct.pack(">I", client_flags))
    r.option(NBD_OPT_EXPORT_NAME, name.encode())
    size, tflags = struct.unpack(">QH", r.recv(10))
    return r, size, tflags


def request(r, typ, cookie, offset, length, flags=0, payload=b""):
    r.s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, offset, length) + payload)


def simple_reply(r, cookie):
    magic, err, ck = struct.unpack(">IIQ", r.recv(16))
    expect(magic == SIMPLE_MAGIC, "reply magic %#x" % magic)
    expect(ck == cookie, "cookie %#x, want %#x" % (ck, cookie))
    return err


def export_name_flow(client_flags, padded):
    r, size, tflags = raw_export_name(client_flags)
    try:
        expect(size == by_name[rw_name]["size"], "size %d" % size)
        expect(tflags & 1, "HAS_FLAGS not set")
        expect(not tflags & (1 << 7), "DF advertised without structured replies")
        if padded:
            expect(r.recv(124) == bytes(124), "124 bytes of padding are not zeros")
        request(r, 0, 0xC0FFEE0000000001, 0, 4096)
        expect(simple_reply(r, 0xC0FFEE0000000001) == 0, "read failed")
        expect(r.recv(4096) == b"\x5a" * 4096, "read data")
        request(r, 0, 0xC0FFEE0000000002, 1 << 40, 4096)  # past the end: simple error, no data
        expect(simple_reply(r, 0xC0FFEE0000000002) == 22, "read past the end: want EINVAL")
        request(r, 1, 7, 8192, 3, payload=b"abc")
        expect(simple_reply(r, 7) == 0, "write failed")
        request(r, 0, 8, 8192, 3)
        expect(simple_reply(r, 8) == 0 and r.recv(3) == b"abc", "read back the write")
        request(r, 2, 9, 0, 0)  # DISC
        expect(r.s.recv(1) == b"", "server did not close after DISC")
    finally:
        r.close()


c.check("raw: EXPORT_NAME with NO_ZEROES: 10-byte reply, simple replies, DISC", lambda: export_name_flow(3, False))
c.check("raw: EXPORT_NAME without NO_ZEROES: 124 zero bytes of padding", lambda: export_name_flow(1, True))
c.check("raw: EXPORT_NAME from a plain newstyle client (flags 0)", lambda: export_name_flow(0, True))


def closed_by_server(client_flags, data_after=b""):
    s = socket.create_connection((host, port), timeout=10)
    try:
        greeting = b""
        while len(greeting) < 18:
            greeting += s.recv(18 - len(greeting))
        s.sendall(struct.pack(">I", client_flags) + data_after)
        try:
            while True:
                d = s.recv(4096)
                if not d:
                    return True
        except ConnectionResetError:
            return True
    finally:
        s.close()


c.check("raw: unknown client flags: the server closes",
        lambda: expect(closed_by_server(0x4), "still open"))
c.check("raw: EXPORT_NAME of an unknown export: the server closes",
        lambda: expect(closed_by_server(3, struct.pack(">QII", OPT_MAGIC, NBD_OPT_EXPORT_NAME, 4) + b"nope"), "still open"))


def vanish_mid_reply():
    for i in range(5):
        r, size, _ = raw_export_name(3)
        for k in range(4):
            request(r, 0, k, 0, min(size, 16 * 1024 * 1024))
        r.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        r.close()
    hh = nbd.NBD()
    hh.connect_uri(uri)
    expect(hh.pread(4096, 0) == b"\x5a" * 4096, "read after the vanished clients")
    hh.shutdown()


c.check("clients vanishing in the middle of 16 MiB reads do not hurt the server", vanish_mid_reply)


c.finish()
