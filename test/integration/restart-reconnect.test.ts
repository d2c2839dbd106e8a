/**
 * A daemon restart under a connected QEMU client that reconnects: qemu-io
 * opens the volume with the NBD driver's `reconnect-delay`, writes and
 * flushes; the daemon is stopped (SIGTERM: drain, flush) and kept down while
 * the client issues its next write, then started again on the same port; the
 * write waits, goes through the new daemon, and every byte is there. The control run
 * without `reconnect-delay` must fail, or the test proves nothing.
 * (How to configure QEMU and nbd-client for this: docs/reliability.md.)
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { cli, startDaemon } from '../helpers/daemon.js';
import { tempStore } from '../helpers/stores.js';
import { freePort, killChild } from '../helpers/run.js';

const KiB = 1024;

/** Runs qemu-io; resolves with its output once it printed `marker` (then keeps running) and its exit. */
function qemuIo(args: string[], marker: string) {
  // Line-buffered: qemu-io's stdout to a pipe would otherwise arrive only at its exit.
  const child = spawn('stdbuf', ['-oL', 'qemu-io', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let seen: () => void = () => {};
  const markerSeen = new Promise<void>((resolve) => { seen = resolve; });
  const onData = (s: Buffer) => {
    out += s.toString();
    if (out.includes(marker)) seen();
  };
  child.stdout.on('data', onData);
  child.stderr.on('data', onData);
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, markerSeen, exit, output: () => out };
}

for (const reconnect of [true, false]) {
  t.test(`qemu-io ${reconnect ? 'with' : 'without'} reconnect-delay across a daemon restart`, async (t) => {
    const store = await tempStore(t);
    const r = await cli(['create', 'v', '--size', '4M', '--object-size', '64K', '--store', store]);
    t.equal(r.code, 0, 'create');
    const port = await freePort();
    const listen = ['--listen', `127.0.0.1:${port}`];
    let d = await startDaemon(t, { store, extraArgs: listen });

    const opts = [
      'driver=raw', 'file.driver=nbd', 'file.server.type=inet', 'file.server.host=127.0.0.1',
      `file.server.port=${port}`, 'file.export=v', ...(reconnect ? ['file.reconnect-delay=30'] : []),
    ].join(',');
    const q = qemuIo([
      '--image-opts', opts,
      '-c', `write -P 0x11 0 ${64 * KiB}`, '-c', 'flush',
      '-c', 'sleep 1000',
      '-c', `write -P 0x22 ${64 * KiB} ${64 * KiB}`, '-c', 'flush',
      '-c', `read -P 0x11 0 ${64 * KiB}`, '-c', `read -P 0x22 ${64 * KiB} ${64 * KiB}`,
    ], 'wrote 65536/65536');
    t.teardown(() => killChild(q.child));
    await q.markerSeen;
    const seenAt = Date.now();
    // Restart under the client: SIGTERM drains and flushes; the daemon stays
    // down for 3 s, so the client's next write (after its 1 s sleep) is
    // issued while nothing listens.
    t.equal(await d.stop(), 0, 'daemon stopped cleanly with the client connected');
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, seenAt + 3000 - Date.now())));
    d = await startDaemon(t, { store, extraArgs: listen });
    const code = await q.exit;
    const out = q.output();
    if (reconnect) {
      t.equal(code, 0, 'qemu-io finished', { out });
      t.notMatch(out, /error|failed/i, 'no I/O error', { out });
      t.equal((out.match(/read 65536\/65536/g) ?? []).length, 2, 'both reads verified their pattern', { out });
    } else {
      t.match(out, /error|failed/i, 'control: without reconnect-delay the write after the restart fails', { out });
    }
    // Whatever qemu-io saw, what it wrote before the restart is on the volume.
    const check = await new Promise<string>((resolve) => {
      const c = spawn('qemu-io', ['-f', 'raw', d.uri('v'), '-c', `read -P 0x11 0 ${64 * KiB}`]);
      let s = '';
      c.stdout.on('data', (b: Buffer) => { s += b.toString(); });
      c.stderr.on('data', (b: Buffer) => { s += b.toString(); });
      c.once('exit', () => resolve(s));
    });
    t.match(check, /read 65536\/65536/, 'the flushed write from before the restart reads back');
    t.notMatch(check, /Pattern verification failed/, 'with its pattern');
    t.equal(await d.stop(), 0, 'stop');
  });
}
