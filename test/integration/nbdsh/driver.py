#!/usr/bin/python3
"""A long-lived libnbd client driven over stdin/stdout, one JSON object a line.

Used by volume-crash.test.ts (the model-based test): the test decides what to
do, this process only does it through libnbd and reports what happened.
Every request gets exactly one reply line: {"ok": true, ...} or
{"ok": false, "error": "...", "errno": "EIO"} (libnbd's errno name, or null). Run with Debian's python3
(/usr/bin/python3), which has the nbd module.

Requests ("off"/"len" in bytes, "data" base64):
  {"op": "connect", "uri": U}            (re)connect; drops any old handle
  {"op": "disconnect"}
  {"op": "write", "off", "data", "fua"}
  {"op": "zero", "off", "len", "fua", "no_hole", "fast_zero"}
  {"op": "trim", "off", "len", "fua"}
  {"op": "flush"}
  {"op": "read", "off", "len"}         -> {"data"}
  {"op": "burst", "writes": [{"off", "data", "fua"}]}
        issues every write at once (aio), waits for all; -> {"done": [bool]}
        (a write is done when the server acknowledged it); "ok" is false if
        any failed, e.g. because the server died meanwhile.
  {"op": "size"}                         -> {"size"}
  {"op": "quit"}
"""
import base64
import json
import sys
import time

import nbd

MAX_REQUEST = 4 * 1024 * 1024

h = None


def drop():
    global h
    if h is not None:
        try:
            h.shutdown()
        except Exception:
            pass
        h = None


def handle():
    if h is None:
        raise RuntimeError("not connected")
    return h


def do(req):
    global h
    op = req["op"]
    fua = nbd.CMD_FLAG_FUA if req.get("fua") else 0
    if op == "connect":
        drop()
        n = nbd.NBD()
        n.connect_uri(req["uri"])
        h = n
        return {"size": h.get_size()}
    if op == "disconnect":
        drop()
        return {}
    if op == "size":
        return {"size": handle().get_size()}
    if op == "write":
        handle().pwrite(base64.b64decode(req["data"]), req["off"], fua)
        return {}
    if op == "zero":
        flags = fua | (nbd.CMD_FLAG_NO_HOLE if req.get("no_hole") else 0) \
            | (nbd.CMD_FLAG_FAST_ZERO if req.get("fast_zero") else 0)
        handle().zero(req["len"], req["off"], flags)
        return {}
    if op == "trim":
        handle().trim(req["len"], req["off"], fua)
        return {}
    if op == "flush":
        handle().flush()
        return {}
    if op == "read":
        out = bytearray()
        off, left = req["off"], req["len"]
        while left > 0:
            n = min(left, MAX_REQUEST)
            out += handle().pread(n, off)
            off += n
            left -= n
        return {"data": base64.b64encode(bytes(out)).decode("ascii")}
    if op == "burst":
        c = handle()
        cookies = []
        for w in req["writes"]:
            flags = nbd.CMD_FLAG_FUA if w.get("fua") else 0
            cookies.append(c.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(base64.b64decode(w["data"]))), w["off"], flags=flags))
        deadline = time.monotonic() + 30
        while c.aio_in_flight() > 0 and time.monotonic() < deadline:
            try:
                c.poll(1000)
            except nbd.Error:
                break
        done = []
        errors = []
        for k in cookies:
            try:
                done.append(bool(c.aio_command_completed(k)))
            except nbd.Error as e:
                done.append(False)
                errors.append(str(e))
        if errors or not all(done):
            return {"ok": False, "error": "; ".join(errors) or "not all writes completed", "done": done}
        return {"done": done}
    if op == "quit":
        drop()
        return {"quit": True}
    raise ValueError("unknown op %r" % op)


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            rep = {"ok": True}
            rep.update(do(req))
        except nbd.Error as e:
            rep = {"ok": False, "error": str(e), "errno": e.errno}
        except Exception as e:  # report, never die: the test decides
            rep = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        sys.stdout.write(json.dumps(rep) + "\n")
        sys.stdout.flush()
        if rep.get("quit"):
            break


if __name__ == "__main__":
    main()
