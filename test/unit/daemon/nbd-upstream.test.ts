/**
 * src/daemon/nbd-upstream.ts, the relay's client side, against our real NBD
 * server (in this process, on a Unix socket, memory exports): requests and
 * replies (a multi-MiB read arrives in many chunks), server errors, and
 * every path of its diagram — the connection dropped and the server back
 * (the waiting request is sent again), a draining server's ESHUTDOWN (the
 * request waits for the next server), no server within the reconnect window
 * (EIO), a server whose export changed size (EIO), an unknown export.
 */
import t from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { NbdServer } from '../../../src/nbd/server.js';
import { NBD_CMD } from '../../../src/nbd/constants.js';
import { NbdUpstream, UpstreamError } from '../../../src/daemon/nbd-upstream.js';
import { MemoryExport, MemoryStore } from '../../helpers/exports.js';
import type { Export, ExportProvider } from '../../../src/nbd/export.js';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A provider over one shared store, so that a "restarted" server serves the same data. */
function providerOf(store: MemoryStore, writeDelayMs = 0): ExportProvider {
  return {
    list: async () => [{ name: 'v' }],
    open: async (name): Promise<Export | null> => {
      if (name !== 'v') return null;
      const e = new MemoryExport('v', store);
      if (writeDelayMs) {
        const write = e.write.bind(e);
        e.write = async (o, d) => { await sleep(writeDelayMs); await write(o, d); };
      }
      return e;
    },
  };
}

async function serve(sock: string, provider: ExportProvider): Promise<NbdServer> {
  const s = new NbdServer({ provider });
  await s.listen({ path: sock });
  return s;
}

async function socketPath(t: { teardown(fn: () => unknown): void }): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'archipelago-upstream-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return path.join(dir, 'nbd.sock');
}

function open(sock: string, reconnectTimeoutMs = 10_000) {
  return NbdUpstream.open({ endpoint: { kind: 'unix', path: sock }, exportName: 'v', reconnectTimeoutMs });
}

t.test('requests and replies', async (t) => {
  const sock = await socketPath(t);
  const store = new MemoryStore(16 * MiB);
  const server = await serve(sock, providerOf(store));
  t.teardown(() => server.destroy());
  const up = await open(sock);
  t.teardown(() => up.destroy());
  t.equal(up.info.size, 16 * MiB, 'size from NBD_OPT_GO');
  const data = crypto.randomBytes(3 * MiB);
  await up.request(NBD_CMD.WRITE, 0, MiB, data.length, data);
  await up.request(NBD_CMD.FLUSH, 0, 0, 0);
  const back = await up.request(NBD_CMD.READ, 0, 0, 5 * MiB);
  t.equal(back!.length, 5 * MiB, 'a 5 MiB read');
  t.ok(back!.subarray(MiB, 4 * MiB).equals(data), 'reads back what was written');
  t.ok(back!.subarray(0, MiB).equals(Buffer.alloc(MiB)), 'and zeros around it');
  await up.request(NBD_CMD.WRITE_ZEROES, 0, MiB, 4096);
  t.ok((await up.request(NBD_CMD.READ, 0, MiB, 4096))!.equals(Buffer.alloc(4096)), 'write zeroes');
  // Many small requests at once, answered in any order.
  const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => up.request(NBD_CMD.READ, 0, MiB + i * 4096, 4096)));
  t.ok(reads.every((b, i) => b!.equals(i === 0 ? Buffer.alloc(4096) : data.subarray(i * 4096, (i + 1) * 4096))), '64 concurrent reads');
  await t.rejects(up.request(NBD_CMD.READ, 0, 16 * MiB, 4096), { name: 'UpstreamError', code: 'EINVAL' }, 'a read past the end: the server\'s EINVAL');
  t.ok((await up.request(NBD_CMD.READ, 0, MiB + 4096, 16))!.equals(data.subarray(4096, 4112)), 'the connection goes on after an error');
  t.equal(up.connects, 1);
  await up.close();
  await t.rejects(up.request(NBD_CMD.FLUSH, 0, 0, 0), { code: 'ESHUTDOWN' }, 'closed');
});

t.test('an unknown export fails at open', async (t) => {
  const sock = await socketPath(t);
  const server = await serve(sock, providerOf(new MemoryStore(MiB)));
  t.teardown(() => server.destroy());
  await t.rejects(NbdUpstream.open({ endpoint: { kind: 'unix', path: sock }, exportName: 'nosuch', reconnectTimeoutMs: 1000 }),
    { name: 'UpstreamError', code: 'ENOENT', message: /export "nosuch"/ });
});

t.test('connection dropped: the request issued meanwhile goes to the next server', async (t) => {
  const sock = await socketPath(t);
  const store = new MemoryStore(4 * MiB);
  let server = await serve(sock, providerOf(store));
  t.teardown(() => server.destroy());
  const up = await open(sock);
  t.teardown(() => up.destroy());
  await server.destroy();
  await sleep(50);
  const w = up.request(NBD_CMD.WRITE, 0, 0, 4096, Buffer.alloc(4096, 0x33));
  await sleep(300);
  t.equal(up.inFlight, 1, 'the write waits while no server listens');
  server = await serve(sock, providerOf(store));
  await w;
  t.ok(store.bytes(0, 4096).equals(Buffer.alloc(4096, 0x33)), 'it reached the new server');
  t.equal(up.connects, 2, 'one reconnection');
});

t.test('a draining server\'s ESHUTDOWN: the request waits for the next server', async (t) => {
  const sock = await socketPath(t);
  const store = new MemoryStore(4 * MiB);
  let server = await serve(sock, providerOf(store, 300));
  t.teardown(() => server.destroy());
  const up = await open(sock);
  t.teardown(() => up.destroy());
  const a = up.request(NBD_CMD.WRITE, 0, 0, 4096, Buffer.alloc(4096, 0xaa));
  await sleep(50);
  const closing = server.close(5000); // graceful: A finishes, later requests get ESHUTDOWN
  await sleep(20);
  const b = up.request(NBD_CMD.WRITE, 0, 4096, 4096, Buffer.alloc(4096, 0xbb));
  await a;
  t.ok(store.bytes(0, 4096).equals(Buffer.alloc(4096, 0xaa)), 'the running write finished on the old server');
  await closing;
  t.ok(store.bytes(4096, 4096).equals(Buffer.alloc(4096)), 'B not written by the draining server');
  server = await serve(sock, providerOf(store));
  await b;
  t.ok(store.bytes(4096, 4096).equals(Buffer.alloc(4096, 0xbb)), 'B went to the next server');
});

t.test('no server within the reconnect window: EIO', async (t) => {
  const sock = await socketPath(t);
  const server = await serve(sock, providerOf(new MemoryStore(MiB)));
  const up = await open(sock, 500);
  t.teardown(() => up.destroy());
  await server.destroy();
  const started = Date.now();
  await t.rejects(up.request(NBD_CMD.READ, 0, 0, 512), { name: 'UpstreamError', code: 'EIO', message: /no connection to the server for 0.5 s/ });
  const ms = Date.now() - started;
  t.ok(ms >= 450 && ms < 10_000, `failed after ${ms} ms`);
});

t.test('a server whose export changed size is not used', async (t) => {
  const sock = await socketPath(t);
  let server = await serve(sock, providerOf(new MemoryStore(MiB)));
  t.teardown(() => server.destroy());
  const up = await open(sock, 1500);
  t.teardown(() => up.destroy());
  await server.destroy();
  server = await serve(sock, providerOf(new MemoryStore(2 * MiB)));
  const err = await up.request(NBD_CMD.READ, 0, 0, 512).catch((e: unknown) => e);
  t.ok(err instanceof UpstreamError && err.code === 'EIO', 'the request fails once the window has passed');
  t.equal(up.connects, 1, 'never attached to the resized export');
});
