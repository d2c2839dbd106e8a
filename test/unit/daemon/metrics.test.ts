/**
 * src/daemon/metrics.ts and its siblings: the per-volume request counters and
 * the latency histogram fed by the NBD hooks (directly, then through a real
 * NbdServer and a raw client: rejected requests, handshake failures,
 * refused connections, in flight), volume stats through the VolumeProvider
 * hooks (copy-ups, map cache, kept after close), the retention of idle
 * volumes' series, observeBlocker (the conformance suite through the
 * wrapper, times and error codes), the histogram's buckets, the HTTP
 * endpoint, and that only the metrics modules import prom-client.
 */
import t from 'tap';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { DaemonMetrics } from '../../../src/daemon/metrics.js';
import { guardStore } from '../../../src/daemon/backend.js';
import { BucketHistogram } from '../../../src/daemon/metrics-histogram.js';
import { listenMetrics } from '../../../src/daemon/metrics-http.js';
import { VolumeProvider } from '../../../src/daemon/volume-export.js';
import type { Store } from '../../../src/daemon/store.js';
import { NBD_CMD, NBD_E } from '../../../src/nbd/constants.js';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { observeBlocker, type BlockerOp } from '../../../src/blockers/observed.js';
import type { BlockerErrorCode } from '../../../src/blockers/errors.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';
import { createLogger, silentLogger } from '../../../src/common/log.js';
import { startTestServer } from '../../helpers/nbd-server.js';
import { RawClient, connectTo } from '../../helpers/nbd-raw-client.js';
import { CMD } from '../../helpers/nbd-encoder.js';
import type { VolumeSession } from '../../../src/daemon/volume-session.js';
import { blockerConformance, collect } from '../../helpers/blocker-conformance.js';

/** Parses the text exposition into `name{sorted labels}` → value. */
function parse(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) throw new Error(`unparsable line: ${line}`);
    const labels = m[2] ? [...m[2].matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)].map((l) => `${l[1]}=${l[2]}`).sort().join(',') : '';
    out.set(`${m[1]}{${labels}}`, Number(m[3]));
  }
  return out;
}

/** The value of one series, or undefined when absent. */
function value(series: Map<string, number>, name: string, labels: Record<string, string> = {}): number | undefined {
  const key = Object.entries(labels).map(([k, v]) => `${k}=${v}`).sort().join(',');
  return series.get(`${name}{${key}}`);
}

/** Polls `check` until it holds (or 5 s pass). */
async function waitFor(check: () => Promise<boolean>): Promise<boolean> {
  for (const end = Date.now() + 5000; Date.now() < end;) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return check();
}

const SOURCES = { connections: () => 0, inFlight: () => new Map<string, number>(), volumesOpen: () => 0 };

t.test('per-volume request counters and per-op latency from the request observer', async (t) => {
  const m = new DaemonMetrics({ processMetrics: false });
  m.attach({ connections: () => 3, inFlight: () => new Map([['v', 2]]), volumesOpen: () => 1 });
  const observe = m.nbdHooks.exportOpened!('v')!;
  const other = m.nbdHooks.exportOpened!('w')!;
  const start = process.hrtime.bigint();
  for (let i = 0; i < 3; i++) observe(NBD_CMD.WRITE, 4096, 0, start);
  observe(NBD_CMD.WRITE, 65536, NBD_E.ENOSPC, start);
  observe(NBD_CMD.READ, 512, 0, start);
  observe(NBD_CMD.READ, 512, NBD_E.EIO, start);
  observe(NBD_CMD.FLUSH, 0, 0, start);
  observe(42, 0, NBD_E.EINVAL, start);
  other(NBD_CMD.TRIM, 0, 0, start);

  const s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'v', op: 'write' }), 4, 'writes counted, the failed one too');
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'v', op: 'read' }), 2);
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'v', op: 'flush' }), 1);
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'v', op: 'other' }), 1, 'an unknown command is op="other"');
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'w', op: 'trim' }), 1, 'another volume apart');
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'v', op: 'trim' }), undefined, 'no series for ops never seen');
  t.equal(value(s, 'archipelago_nbd_request_bytes_total', { volume: 'v', op: 'write' }), 3 * 4096, 'bytes of successful writes only');
  t.equal(value(s, 'archipelago_nbd_request_bytes_total', { volume: 'v', op: 'read' }), 512);
  t.equal(value(s, 'archipelago_nbd_request_bytes_total', { volume: 'v', op: 'flush' }), undefined, 'no bytes series for flush');
  t.equal(value(s, 'archipelago_nbd_request_errors_total', { volume: 'v', op: 'write', error: 'ENOSPC' }), 1);
  t.equal(value(s, 'archipelago_nbd_request_errors_total', { volume: 'v', op: 'read', error: 'EIO' }), 1);
  t.equal(value(s, 'archipelago_nbd_request_errors_total', { volume: 'v', op: 'other', error: 'EINVAL' }), 1);
  t.ok(value(s, 'archipelago_nbd_request_seconds_total', { volume: 'v', op: 'write' })! > 0, 'time spent is summed');
  t.equal(value(s, 'archipelago_nbd_request_duration_seconds_count', { op: 'write' }), 4, 'histogram: all volumes together');
  t.equal(value(s, 'archipelago_nbd_request_duration_seconds_count', { op: 'trim' }), 1);
  t.equal(value(s, 'archipelago_nbd_request_duration_seconds_bucket', { op: 'write', le: '+Inf' }), 4);
  t.equal(value(s, 'archipelago_nbd_request_duration_seconds_count', { op: 'cache' }), undefined, 'no histogram series for ops never seen');
  t.equal(value(s, 'archipelago_nbd_requests_in_flight', { volume: 'v' }), 2, 'in flight: read from the server at scrape');
  t.equal(value(s, 'archipelago_nbd_connections'), 3);
  t.equal(value(s, 'archipelago_volumes_open'), 1);
  for (const reason of ['timeout', 'peer_closed', 'protocol', 'error']) {
    t.equal(value(s, 'archipelago_nbd_handshake_failures_total', { reason }), 0, `handshake failures ${reason}: present at 0`);
  }
  t.equal(value(s, 'process_cpu_seconds_total'), undefined, 'process metrics off when asked');

  observe(NBD_CMD.WRITE, 4096, 0, start);
  const again = parse(await m.scrape());
  t.equal(value(again, 'archipelago_nbd_requests_total', { volume: 'v', op: 'write' }), 5, 'counters keep counting across scrapes');
  t.equal(value(again, 'archipelago_nbd_request_errors_total', { volume: 'v', op: 'write', error: 'ENOSPC' }), 1, 'errors not doubled by a rescrape');
});

t.test('through a real NbdServer: requests, rejected requests, handshake failures, refusals', async (t) => {
  const m = new DaemonMetrics({ processMetrics: false });
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 1024 * 1024), {
    hooks: m.nbdHooks, handshakeTimeoutMs: 1000, maxConnections: 3,
  });
  m.attach({ connections: () => srv.server.connectionCount, inFlight: () => srv.server.inFlightByExport(), volumesOpen: () => 0 });

  const { client: c } = await connectTo(srv.port, 'disk');
  t.teardown(() => c.destroy());
  t.equal(await c.writeData(0, Buffer.alloc(8192, 1)), 0, 'write');
  t.same(await c.readData(0, 4096), Buffer.alloc(4096, 1), 'read');
  const beyond = await c.roundTrip({ type: CMD.READ, offset: 1024 * 1024, length: 4096 });
  t.ok(beyond[0]!.kind === 'simple' && beyond[0]!.error === NBD_E.EINVAL, 'a read past the end is refused EINVAL');

  // Handshake failures: bad client flags, a peer that leaves, one that says nothing.
  const bad = await RawClient.connect(srv.port);
  await bad.start(0x80);
  await bad.expectClosed();
  const gone = await RawClient.connect(srv.port);
  await gone.readGreeting();
  gone.destroy();
  const failures = async (reason: string) => value(parse(await m.scrape()), 'archipelago_nbd_handshake_failures_total', { reason });
  t.ok(await waitFor(async () => (await failures('peer_closed')) === 1), 'the server saw the peer leave');
  const mute = await RawClient.connect(srv.port);
  t.teardown(() => mute.destroy());
  const s1 = parse(await m.scrape());
  t.equal(value(s1, 'archipelago_nbd_connections'), 2, 'the client and the mute one are connected');
  t.equal(value(s1, 'archipelago_nbd_requests_in_flight', { volume: 'disk' }), 0, 'in flight: 0 for a connected, idle volume');
  await mute.expectClosed(5000);
  t.ok(await waitFor(async () => srv.server.connectionCount === 1), 'only the client is left');
  // Over maxConnections (3): the 4th is closed at once.
  const extra = await Promise.all([0, 1, 2].map(() => RawClient.connect(srv.port)));
  t.teardown(() => { for (const x of extra) x.destroy(); });
  await Promise.all(extra.map((x) => x.staysOpen(100)));

  const s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'disk', op: 'write' }), 1);
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'disk', op: 'read' }), 2, 'the refused read counts as a request');
  t.equal(value(s, 'archipelago_nbd_request_errors_total', { volume: 'disk', op: 'read', error: 'EINVAL' }), 1, 'and as an error');
  t.equal(value(s, 'archipelago_nbd_request_bytes_total', { volume: 'disk', op: 'write' }), 8192);
  t.equal(value(s, 'archipelago_nbd_request_bytes_total', { volume: 'disk', op: 'read' }), 4096, 'bytes of the successful read only');
  t.equal(value(s, 'archipelago_nbd_handshake_failures_total', { reason: 'protocol' }), 1, 'bad flags: protocol');
  t.equal(value(s, 'archipelago_nbd_handshake_failures_total', { reason: 'peer_closed' }), 1, 'left: peer_closed');
  t.equal(value(s, 'archipelago_nbd_handshake_failures_total', { reason: 'timeout' }), 1, 'silent: timeout');
  t.equal(value(s, 'archipelago_nbd_connections_refused_total', { reason: 'limit' }), 1, 'over the limit: refused');
  t.equal(value(s, 'archipelago_nbd_connections_total'), 6, 'accepted: client, bad, gone, mute and two of the extra');
});

async function volumeSetup(m: DaemonMetrics) {
  const blocker = new MemoryBlocker();
  const store: Store = { url: 'memory:', maps: blocker, data: blocker, close: async () => {} };
  const provider = new VolumeProvider(store, createLogger({ level: 'error', write: () => {} }), m.volumeHooks);
  m.attach({ ...SOURCES, volumesOpen: () => provider.openCount });
  await (await VolumeMap.create(blocker, 'v', { size: 8 * 65536, objectSize: 65536 })).close();
  return provider;
}

t.test('copy-ups and map cache through the VolumeProvider hooks, kept when the volume closes', async (t) => {
  const m = new DaemonMetrics({ processMetrics: false });
  const provider = await volumeSetup(m);
  const held = (await provider.acquire('v'))!;
  await held.volume.write(0, Buffer.alloc(65536, 1), false);
  await (held.volume as VolumeSession).exclusive((v) => v.map.markShared()); // what a snapshot does to its origin
  await held.volume.write(100, Buffer.alloc(10, 2), false); // partial write to a shared object: copy-up
  let s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_volume_copyups_total', { volume: 'v' }), 1, 'one copy-up');
  t.equal(value(s, 'archipelago_volumes_open'), 1);
  const hits = value(s, 'archipelago_map_cache_hits_total', { volume: 'v' })!;
  t.ok(hits >= 2, `lookups answered from memory (${hits})`);
  t.equal(value(s, 'archipelago_map_cache_misses_total', { volume: 'v' }), 0, 'no miss while the chunk stays loaded');
  await held.release();

  s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_volume_copyups_total', { volume: 'v' }), 1, 'still counted after the volume closed');
  t.equal(value(s, 'archipelago_map_cache_hits_total', { volume: 'v' }), hits);
  t.equal(value(s, 'archipelago_volumes_open'), 0);

  const again = (await provider.acquire('v'))!;
  const pieces = await again.volume.read(0, 4096);
  t.ok(pieces[0]!.data, 'reopened volume reads its data');
  s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_map_cache_misses_total', { volume: 'v' }), 1, 'the reopened map had to load its chunk');
  t.equal(value(s, 'archipelago_volume_copyups_total', { volume: 'v' }), 1, 'closed and open volumes summed');
  await again.release();
  await provider.close();
});

t.test('series of a volume idle past retainIdleMs are dropped; in use, they stay', async (t) => {
  let now = 1_000_000;
  const m = new DaemonMetrics({ processMetrics: false, retainIdleMs: 60_000, now: () => now });
  const observe = m.nbdHooks.exportOpened!('v')!;
  observe(NBD_CMD.WRITE, 10, 0, process.hrtime.bigint());
  m.nbdHooks.exportOpened!('busy')!(NBD_CMD.READ, 10, 0, process.hrtime.bigint());
  now += 120_000;
  let s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'v', op: 'write' }), 1, 'kept while a connection has it');
  m.nbdHooks.exportClosed!('v');
  now += 59_000;
  s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'v', op: 'write' }), 1, 'kept within retainIdleMs of its last use');
  now += 2_000;
  s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'v', op: 'write' }), undefined, 'dropped after');
  t.equal(value(s, 'archipelago_nbd_requests_total', { volume: 'busy', op: 'read' }), 1, 'a volume still connected stays');
  t.equal(value(s, 'archipelago_nbd_request_duration_seconds_count', { op: 'write' }), 1, 'the per-op histogram is not per volume: it stays');
});

await blockerConformance(t, 'observed memory', async () => ({
  blocker: observeBlocker(new MemoryBlocker(), () => {}),
  cleanup: async () => {},
}));

t.test('observeBlocker reports each operation, its time and its error code', async (t) => {
  const seen: { op: BlockerOp; ns: number; code: BlockerErrorCode | null }[] = [];
  const inner = new MemoryBlocker();
  const b = observeBlocker(inner, (op, ns, code) => seen.push({ op, ns, code }));
  t.equal(b.kind, inner.kind, 'same kind');
  t.equal(b.capabilities, inner.capabilities, 'same capabilities');
  await b.write('a', 0, Buffer.from('x'));
  await b.sync(['a']);
  await t.rejects(b.readFull('missing'), { code: 'ENOENT' }, 'errors pass through unchanged');
  t.same(await collect(b.list('')), ['a']);
  for await (const _ of b.list('')) break; // left early: still reported, as a success
  t.same(seen.map((s) => [s.op, s.code]), [['write', null], ['sync', null], ['read_full', 'ENOENT'], ['list', null], ['list', null]]);
  t.ok(seen.every((s) => s.ns >= 0 && Number.isFinite(s.ns)), 'durations in ns');

  const m = new DaemonMetrics({ processMetrics: false });
  const data = observeBlocker(inner, m.blockerObserver('memory', 'data'));
  const maps = observeBlocker(inner, m.blockerObserver('memory', 'maps'));
  await data.write('b', 0, Buffer.from('y'));
  await data.write('b', 1, Buffer.from('z'));
  await t.rejects(maps.readFull('nope'));
  const s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_blocker_operation_duration_seconds_count', { blocker: 'memory', role: 'data', op: 'write' }), 2);
  t.equal(value(s, 'archipelago_blocker_operation_duration_seconds_count', { blocker: 'memory', role: 'maps', op: 'read_full' }), 1);
  t.equal(value(s, 'archipelago_blocker_operation_duration_seconds_count', { blocker: 'memory', role: 'maps', op: 'write' }), undefined,
    'no series for operations never done');
  t.equal(value(s, 'archipelago_blocker_errors_total', { blocker: 'memory', role: 'maps', op: 'read_full', code: 'ENOENT' }), 1);
});

t.test('BucketHistogram: le is inclusive, buckets cumulative, +Inf counts all', async (t) => {
  const h = new BucketHistogram('x_seconds', 'help', [0.1, 1]);
  const a = h.addSeries({ op: 'a' });
  const b = h.addSeries({ op: 'b' });
  for (const v of [0.05, 0.1, 0.5, 1, 7]) h.observe(a, v);
  t.equal(h.count(a), 5);
  t.equal(h.count(b), 0);
  const got = (await h.get()).values.map((v) => [v.metricName, v.labels.le ?? '', v.value]);
  t.same(got, [
    ['x_seconds_bucket', '0.1', 2], ['x_seconds_bucket', '1', 4], ['x_seconds_bucket', '+Inf', 5],
    ['x_seconds_sum', '', 8.65], ['x_seconds_count', '', 5],
  ], 'series b (never observed) is not emitted');
  t.throws(() => new BucketHistogram('y', 'help', [1, 1]), /ascend/);
  t.throws(() => h.addSeries({ le: '1' }), /reserved/);
});

t.test('process metrics: default ones present, no gauge named *_total', async (t) => {
  const m = new DaemonMetrics();
  const text = await m.scrape();
  t.match(text, /^process_cpu_seconds_total \d/m, 'process_cpu_seconds_total');
  t.match(text, /^nodejs_heap_size_used_bytes \d/m, 'nodejs_heap_size_used_bytes');
  const gaugesTotal = [...text.matchAll(/^# TYPE (\S+_total) (\S+)$/gm)].filter((x) => x[2] !== 'counter').map((x) => x[1]);
  t.same(gaugesTotal, [], 'every *_total is a counter');
  const other = new DaemonMetrics();
  t.not(other.registry, m.registry, 'one registry per daemon');
  t.ok((await other.scrape()).includes('process_cpu_seconds_total'), 'a second daemon in the process has them too');
});

async function get(port: number, urlPath: string, o: { method?: string; gzip?: boolean } = {}) {
  return new Promise<{ status: number; headers: http.IncomingHttpHeaders; body: Buffer }>((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: urlPath, method: o.method ?? 'GET', headers: o.gzip ? { 'Accept-Encoding': 'gzip' } : {} },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks) }));
      });
    req.on('error', reject);
    req.end();
  });
}

t.test('HTTP: /metrics in the text format, gzip on request, 404 elsewhere, 405 for other methods', async (t) => {
  const m = new DaemonMetrics({ processMetrics: false });
  m.attach(SOURCES);
  const srv = await listenMetrics(m, { host: '127.0.0.1', port: 0 }, silentLogger);
  t.teardown(() => srv.close());
  const ok = await get(srv.port, '/metrics');
  t.equal(ok.status, 200);
  t.match(ok.headers['content-type'], /^text\/plain; version=0\.0\.4/);
  t.match(ok.body.toString(), /# TYPE archipelago_nbd_requests_total counter/);
  const q = await get(srv.port, '/metrics?x=1');
  t.equal(q.status, 200, 'a query string is ignored');
  const z = await get(srv.port, '/metrics', { gzip: true });
  t.equal(z.headers['content-encoding'], 'gzip');
  t.equal(zlib.gunzipSync(z.body).toString(), ok.body.toString(), 'same body, compressed');
  const head = await get(srv.port, '/metrics', { method: 'HEAD' });
  t.equal(head.status, 200);
  t.equal(head.body.length, 0, 'HEAD: no body');
  t.equal((await get(srv.port, '/')).status, 404);
  t.equal((await get(srv.port, '/metricsx')).status, 404);
  t.equal((await get(srv.port, '/metrics', { method: 'POST' })).status, 405);
  await t.rejects(listenMetrics(m, { host: '127.0.0.1', port: srv.port }, silentLogger), /metrics: cannot listen on 127\.0\.0\.1:\d+: EADDRINUSE/,
    'a taken port fails with a clear message');
});

t.test('only src/daemon/metrics*.ts import prom-client', async (t) => {
  const src = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../../src');
  const files = (fs.readdirSync(src, { recursive: true }) as string[]).filter((f) => f.endsWith('.ts'));
  const importers = files.filter((f) => /from\s+['"]prom-client['"]/.test(fs.readFileSync(path.join(src, f), 'utf8'))).sort();
  t.same(importers, ['daemon/metrics-histogram.ts', 'daemon/metrics.ts'].map((f) => f.split('/').join(path.sep)));
});

t.test('backend guard: timeouts by op, late operations and bytes, fenced objects, stalled, rejections', async (t) => {
  const m = new DaemonMetrics({ processMetrics: false });
  let s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_backend_fenced_objects'), 0, 'no sources attached: 0');
  const blocker = new MemoryBlocker();
  const g = guardStore({ url: 'memory:', maps: blocker, data: blocker, close: async () => {} },
    { timeoutSec: 0.1, faultInjection: true, maxLate: 2, log: createLogger({ level: 'error', write: () => {} }) });
  t.teardown(() => g.store.close());
  m.attach({ ...SOURCES, backend: () => g.status() });
  s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_backend_timeouts_total', { op: 'write' }), 0, 'every op has a series from the start');
  t.equal(value(s, 'archipelago_backend_timeouts_total', { op: 'read_full' }), 0, 'named like the blocker ops');
  t.equal(value(s, 'archipelago_backend_stalled'), 0);

  g.faults!.addRule({ ops: ['write'], hang: true });
  await t.rejects(g.store.data.write('d.1', 0, Buffer.alloc(4096)), { code: 'ETIMEDOUT' });
  s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_backend_timeouts_total', { op: 'write' }), 1, 'one write timed out');
  t.equal(value(s, 'archipelago_backend_late_operations'), 1, 'still running below');
  t.equal(value(s, 'archipelago_backend_late_bytes'), 4096, 'holding its 4 KiB');
  t.equal(value(s, 'archipelago_backend_fenced_objects'), 1, 'its object fenced');
  t.equal(value(s, 'archipelago_backend_stalled'), 0, 'below the bound');

  await t.rejects(g.store.maps.write('m.1', 0, Buffer.alloc(100)), { code: 'ETIMEDOUT' });
  await t.rejects(g.store.data.read('d.2', 0, 10, Buffer.alloc(10)), { code: 'ETIMEDOUT', message: /backend stalled/ });
  s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_backend_fenced_objects'), 2);
  t.equal(value(s, 'archipelago_backend_stalled'), 1, 'two late: the bound');
  t.equal(value(s, 'archipelago_backend_stalled_rejections_total'), 1, 'the read failed at once');
  t.equal(value(s, 'archipelago_backend_timeouts_total', { op: 'read' }), 0, 'not a timeout: never issued');

  g.faults!.clear();
  for (const end = Date.now() + 2000; g.status().late > 0 && Date.now() < end;) await new Promise((r) => setTimeout(r, 5));
  s = parse(await m.scrape());
  t.equal(value(s, 'archipelago_backend_late_operations'), 0, 'released: the late writes settled');
  t.equal(value(s, 'archipelago_backend_late_bytes'), 0);
  t.equal(value(s, 'archipelago_backend_fenced_objects'), 0, 'fences lifted');
  t.equal(value(s, 'archipelago_backend_stalled'), 0, 'recovered');
  t.equal(value(s, 'archipelago_backend_timeouts_total', { op: 'write' }), 2, 'counters keep counting');
  t.equal(value(s, 'archipelago_backend_stalled_rejections_total'), 1);
});
