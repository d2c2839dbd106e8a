/**
 * libnbd's Python bindings (nbdsh) against the real server: a smoke test of
 * every command, malformed requests with client-side checks off, and the
 * handshake one option at a time. The scripts live in test/integration/nbdsh/
 * and print `PASS name` / `FAIL name: why`; each line becomes an assertion.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startTestServer } from '../helpers/nbd-server.js';
import { diag, nbdshEnv, run, tempDir, type RunResult } from '../helpers/run.js';

const MiB = 1024 * 1024;

/** The scripts are sources, not compiled: find them from the repository root. */
async function scriptsDir(): Promise<string> {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    try {
      await fs.access(path.join(dir, 'package.json'));
      return path.join(dir, 'test', 'integration', 'nbdsh');
    } catch {
      const up = path.dirname(dir);
      if (up === dir) throw new Error('repository root not found');
      dir = up;
    }
  }
}

/** A subtest, as tap hands it to t.test callbacks. */
type Assert = Test;

/** Waits (up to 5 s) for the server to have no connection left. */
async function noConnections(server: { connectionCount: number }): Promise<boolean> {
  for (let i = 0; i < 100 && server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 50));
  return server.connectionCount === 0;
}

/** Runs one script under nbdsh; `env` carries the URIs. */
async function nbdsh(t: Assert, script: string, env: Record<string, string>): Promise<RunResult> {
  const file = path.join(await scriptsDir(), script);
  const py = `import runpy, sys; sys.argv = [${JSON.stringify(file)}]; runpy.run_path(${JSON.stringify(file)}, run_name='__main__')`;
  return run('nbdsh', ['-n', '-c', py], { t, env: nbdshEnv(env), timeoutMs: 45_000 });
}

/** One assertion per PASS/FAIL line, then the tally and the exit code. */
function assertLines(t: Assert, r: RunResult, minChecks: number): void {
  const lines = r.stdout.split('\n');
  let n = 0;
  for (const line of lines) {
    const m = /^(PASS|FAIL) (.*)$/.exec(line);
    if (!m) continue;
    n++;
    t.ok(m[1] === 'PASS', m[2]!);
  }
  t.ok(n >= minChecks, `at least ${minChecks} checks ran (${n})`, diag(r));
  t.ok(/^\d+ passed, 0 failed$/m.test(r.stdout), 'script tally: none failed', diag(r));
  t.equal(r.code, 0, 'script exits 0', diag(r));
}

t.test('nbdsh smoke: every command', async (t) => {
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 16 * MiB));
  const r = await nbdsh(t, 'smoke.py', { NBD_URI: srv.uri('disk') });
  assertLines(t, r, 30);
  // The server saw what the script did.
  const store = srv.provider.memory.get('disk')!.store;
  t.notOk(store.pages.has(0), 'FAST_ZERO punched page 0');
  t.ok(store.pages.has(1), 'NO_HOLE kept page 1 allocated');
  t.notOk(store.pages.has(4), 'trim punched page 4');
});

t.test('nbdsh smoke negative control: a wrong expectation fails the script', async (t) => {
  // The smoke script expects a 16 MiB export: on 32 MiB only the info check fails.
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 32 * MiB));
  const r = await nbdsh(t, 'smoke.py', { NBD_URI: srv.uri('disk') });
  t.equal(r.code, 1, 'script exits 1', diag(r));
  const fails = r.stdout.split('\n').filter((l) => l.startsWith('FAIL '));
  t.equal(fails.length, 1, 'exactly one FAIL line', diag(r));
  t.match(fails[0] ?? '', /^FAIL info: .*size 33554432/);
  t.match(r.stdout, /^\d+ passed, 1 failed$/m);
});

t.test('nbdsh strict mode off: the server refuses bad requests and stays in sync', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'file.img');
  await fs.writeFile(file, '');
  await fs.truncate(file, 16 * MiB);
  const srv = await startTestServer(t, (p) => {
    p.addMemory('disk', 64 * MiB);
    p.addMemory('ro', 1 * MiB, true);
    p.addFile('file', file);
  });
  const r = await nbdsh(t, 'strict.py', {
    NBD_URI: srv.uri('disk'), NBD_RO_URI: srv.uri('ro'), NBD_FILE_URI: srv.uri('file'),
  });
  assertLines(t, r, 60);
  t.ok(await noConnections(srv.server), 'every connection closed');
});

t.test('nbdsh opt mode: the handshake one option at a time', async (t) => {
  const srv = await startTestServer(t, (p) => {
    p.addMemory('disk', 16 * MiB);
    p.addMemory('ro', 1 * MiB, true);
    p.addMemory('small', 2 * MiB, false, 'a small scratch disk');
  });
  const expect = [
    { name: 'disk', size: 16 * MiB, readOnly: false },
    { name: 'ro', size: 1 * MiB, readOnly: true },
    { name: 'small', size: 2 * MiB, readOnly: false, description: 'a small scratch disk' },
  ];
  const r = await nbdsh(t, 'opt.py', { NBD_URI: srv.uri('disk'), NBD_EXPECT: JSON.stringify(expect) });
  assertLines(t, r, 25);
  t.ok(await noConnections(srv.server), 'every connection closed, including those that vanished mid-reply');
});
