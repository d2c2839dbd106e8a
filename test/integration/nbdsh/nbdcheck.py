"""Shared helpers for the nbdsh scripts: PASS/FAIL lines and a final tally.

Every check prints one line, `PASS <name>` or `FAIL <name>: <why>`; the
script ends with `N passed, N failed` and exits 1 if anything failed.
The TypeScript test turns each line into one assertion.
"""
import errno
import os
import sys
import traceback

import nbd


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, cond, name, why=""):
        if cond:
            self.passed += 1
            print("PASS " + name, flush=True)
        else:
            self.failed += 1
            print("FAIL " + name + (": " + why if why else ""), flush=True)
        return bool(cond)

    def check(self, name, fn):
        """Runs fn(); PASS unless it raises (use assert inside)."""
        try:
            fn()
        except AssertionError as e:
            return self.ok(False, name, str(e) or traceback.format_exc().strip().splitlines()[-2])
        except Exception as e:  # noqa: BLE001 - any failure is a FAIL line
            return self.ok(False, name, "%s: %s" % (type(e).__name__, e))
        return self.ok(True, name)

    def expect_error(self, name, fn, want):
        """fn() must raise nbd.Error with errno `want` (a name such as 'EINVAL', or a tuple of names)."""
        wants = (want,) if isinstance(want, str) else tuple(want)
        try:
            fn()
        except nbd.Error as e:
            got = errno.errorcode.get(e.errnum, str(e.errnum))
            return self.ok(got in wants, name, "expected %s, got %s (%s)" % ("/".join(wants), got, e.string))
        except Exception as e:  # noqa: BLE001
            return self.ok(False, name, "expected nbd.Error %s, got %s: %s" % ("/".join(wants), type(e).__name__, e))
        return self.ok(False, name, "expected %s, but it succeeded" % "/".join(wants))

    def finish(self):
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        sys.exit(1 if self.failed else 0)


def env(name):
    v = os.environ.get(name)
    if not v:
        print("FAIL environment: %s is not set" % name, flush=True)
        sys.exit(2)
    return v


def pattern(byte, n):
    return bytes([byte]) * n


def expect(cond, msg="check failed"):
    """For use in lambdas: raises AssertionError(msg) unless cond."""
    if not cond:
        raise AssertionError(msg)
