/**
 * Linux kernel NBD client against our server: boots a QEMU (TCG) guest via
 * scripts/kernel-nbd-smoke.sh whose /dev/nbd0 is an in-memory export served by
 * build/test/helpers/serve.js, then mkfs.ext4, write, fsck, reconnect, verify.
 *
 * Slow (~20-30 s per guest run). Never skipped: scripts/install-deps.sh and
 * scripts/kernel-guest/build.sh install what it needs.
 * Env passed through to the script: WORK (guest build cache), GUEST_TIMEOUT.
 */
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

// The compiled test lives at build/test/integration/kernel-client.test.js.
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const smoke = path.join(root, 'scripts/kernel-nbd-smoke.sh');
const serveJs = path.join(root, 'build/test/helpers/serve.js');

const GUEST_TIMEOUT = Number(process.env.GUEST_TIMEOUT ?? 180);

// Children still running when this process exits (timeout, crash) are killed here.
const children = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null && c.pid) {
      try { process.kill(c.pid, 'SIGTERM'); } catch { /* already gone */ }
    }
  }
});

function track(c: ChildProcess): ChildProcess {
  children.add(c);
  c.once('exit', () => children.delete(c));
  return c;
}

function exited(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => c.once('exit', () => resolve()));
}

async function stopChild(c: ChildProcess, graceMs = 10_000): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  c.kill('SIGTERM');
  const timer = setTimeout(() => c.kill('SIGKILL'), graceMs);
  await exited(c);
  clearTimeout(timer);
}

interface Server { proc: ChildProcess; port: number; stderr: () => string }

/** Starts serve.js with a 256 MiB in-memory export "disk"; resolves on READY. */
function startServer(): Promise<Server> {
  const proc = track(spawn(process.execPath,
    [serveJs, '--host', '127.0.0.1', '--port', '0', '--memory', 'disk:256M'],
    { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] }));
  let out = '';
  let err = '';
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => { err = (err + d).slice(-20_000); });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error('serve.js did not print READY within 20 s')), 20_000);
    const fail = (e: Error) => {
      clearTimeout(timer);
      void stopChild(proc);
      reject(new Error(`${e.message}\nstderr:\n${err}`));
    };
    proc.once('error', fail);
    proc.once('exit', (code, sig) => fail(new Error(`serve.js exited early (code ${code}, signal ${sig})`)));
    proc.stdout!.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      const m = /^READY port=(\d+)/m.exec(out);
      if (m) {
        clearTimeout(timer);
        proc.removeAllListeners('exit');
        resolve({ proc, port: Number(m[1]), stderr: () => err });
      }
    });
  });
}

interface RunResult { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }

function runSmoke(port: number, env: Record<string, string>): Promise<RunResult> {
  const proc = track(spawn('bash', [smoke, String(port), 'disk'], {
    cwd: root,
    env: { ...process.env, GUEST_TIMEOUT: String(GUEST_TIMEOUT), ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  }));
  let stdout = '';
  let stderr = '';
  proc.stdout!.setEncoding('utf8').on('data', (d: string) => { stdout += d; });
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
  return new Promise((resolve, reject) => {
    proc.once('error', reject);
    proc.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

function tail(file: string, lines: number): string {
  try {
    return fs.readFileSync(file, 'utf8').replace(/\r/g, '').split('\n').slice(-lines).join('\n');
  } catch (e) {
    return `(no serial log: ${(e as Error).message})`;
  }
}

// First run downloads the kernel package (~70 MB) and builds the initramfs.
t.setTimeout((2 * GUEST_TIMEOUT + 120) * 1000);

const variants: Array<{ name: string; env: Record<string, string> }> = [
  { name: 'kernel client: ext4 mkfs, write, fsck, reconnect, verify', env: {} },
  { name: 'kernel client with 2 connections (-C 2) and 2 vCPUs', env: { NBD_CLIENT_OPTS: '-C 2', SMP: '2' } },
];

for (const v of variants) {
  t.test(v.name, async (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'archipelago-kernel-client-'));
    const serialLog = path.join(dir, 'serial.log');
    let server: Server | undefined;
    let passed = false;
    t.teardown(async () => {
      if (server) await stopChild(server.proc);
      if (passed) fs.rmSync(dir, { recursive: true, force: true });
      else t.comment(`logs kept in ${dir}`);
    });

    server = await startServer();
    const r = await runSmoke(server.port, { ...v.env, GUEST_LOG: serialLog });
    const steps = r.stdout.split('\n').filter((l) => l.startsWith('STEP '));
    const failedSteps = steps.filter((l) => !/ OK$/.test(l));

    t.equal(r.code, 0, 'kernel-nbd-smoke.sh exits 0');
    t.match(r.stdout, /^RESULT PASS$/m, 'guest reports RESULT PASS');
    t.same(failedSteps, [], 'every guest step OK');
    t.ok(steps.length >= 10, `guest ran all steps (${steps.length})`);
    t.equal(server.proc.exitCode, null, 'server still running after the guest run');

    passed = r.code === 0 && /^RESULT PASS$/m.test(r.stdout) && failedSteps.length === 0
      && server.proc.exitCode === null;
    const timing = /kernel-nbd-smoke: build .*/.exec(r.stderr);
    if (timing) t.comment(timing[0]);
    if (!passed) {
      t.comment(`smoke exit code ${r.code} signal ${r.signal}`);
      t.comment(`smoke stdout:\n${r.stdout}`);
      t.comment(`smoke stderr (tail):\n${r.stderr.split('\n').slice(-30).join('\n')}`);
      t.comment(`guest serial log (tail):\n${tail(serialLog, 60)}`);
      t.comment(`server stderr (tail):\n${server.stderr().split('\n').slice(-30).join('\n')}`);
    }
  });
}
