/**
 * `archipelago serve --metrics`: the real daemon on a file store, a real NBD
 * client (qemu-io) writing to a volume, then
 *   - /metrics scraped over HTTP shows the write for that volume (count,
 *     bytes, latency, the backend's writes) and passes `promtool check
 *     metrics` without a single warning;
 *   - a real Prometheus (127.0.0.1, scraping every second, storage in a temp
 *     dir, killed by PID in teardown) ingests it: its query API returns the
 *     write count, the target is healthy, and every PromQL example of
 *     docs/metrics.md is valid.
 * Also: `--metrics ''` turns the endpoint off.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cli, startDaemon } from '../helpers/daemon.js';
import { diag, run, tempDir } from '../helpers/run.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** A TCP port free on 127.0.0.1 now (Prometheus cannot report the one it got for port 0). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/** Series of the text format: `name{a="x",b="y"}` (labels as written) → value. */
function series(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^([^#\s{]+(?:\{.*\})?) (\S+)$/.exec(line);
    if (m) out.set(m[1]!, Number(m[2]));
  }
  return out;
}

/** Sum of the series of `name` whose labels include every `label="value"` given. */
function sum(s: Map<string, number>, name: string, labels: Record<string, string>): number {
  let total = 0;
  for (const [key, v] of s) {
    if (!key.startsWith(`${name}{`)) continue;
    if (Object.entries(labels).every(([k, val]) => key.includes(`${k}="${val}"`))) total += v;
  }
  return total;
}

async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

t.test('qemu-io writes, /metrics counts them, promtool and a real Prometheus agree', async (t) => {
  const store = await tempDir(t, 'archipelago-store-');
  const created = await cli(['create', 'v', '--size', '64M', '--store', `file:${store}`]);
  t.equal(created.code, 0, 'create v', diag(created.result));
  const d = await startDaemon(t, { store });
  t.type(d.metricsPort, 'number', `READY line names the metrics port (${d.metricsPort})`);
  const metricsUrl = `http://127.0.0.1:${d.metricsPort}/metrics`;

  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 64k', '-c', 'read -P 0xab 0 64k', d.uri('v')], { t, timeoutMs: 30_000 });
  t.equal(io.code, 0, 'qemu-io write + read', diag(io));
  t.notMatch(io.stdout + io.stderr, /verification failed|error/i, 'the data read back is the data written');

  const res = await fetch(metricsUrl);
  t.equal(res.status, 200, 'GET /metrics');
  t.match(res.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
  const text = await res.text();
  const s = series(text);
  t.equal(s.get('archipelago_nbd_requests_total{volume="v",op="write"}'), 1, 'one NBD WRITE to v');
  t.equal(s.get('archipelago_nbd_request_bytes_total{volume="v",op="write"}'), 65536, '64 KiB written');
  t.ok((s.get('archipelago_nbd_requests_total{volume="v",op="read"}') ?? 0) >= 1, 'and read');
  t.equal(s.get('archipelago_nbd_request_bytes_total{volume="v",op="read"}'), 65536, '64 KiB read');
  t.equal(s.get('archipelago_nbd_request_duration_seconds_count{op="write"}'), 1, 'the write is in the latency histogram');
  t.equal(sum(s, 'archipelago_nbd_request_duration_seconds_bucket', { op: 'write', le: '+Inf' }), 1);
  t.ok(sum(s, 'archipelago_nbd_request_errors_total', { volume: 'v' }) === 0, 'no errors');
  t.ok(sum(s, 'archipelago_blocker_operation_duration_seconds_count', { blocker: 'file', role: 'data', op: 'write' }) >= 1,
    'the file blocker wrote the data object');
  t.ok(sum(s, 'archipelago_blocker_operation_duration_seconds_count', { blocker: 'file', role: 'maps', op: 'replace' }) >= 1,
    'and replaced map metadata');
  t.ok((s.get('archipelago_map_cache_hits_total{volume="v"}') ?? 0) >= 1, 'map lookups counted');
  t.ok((s.get('archipelago_nbd_connections_total') ?? 0) >= 1, 'the connection counted');
  t.ok((s.get('process_resident_memory_bytes') ?? 0) > 0, 'process metrics present');
  t.equal((await fetch(`http://127.0.0.1:${d.metricsPort}/`)).status, 404, '404 outside /metrics');

  // promtool: the exposition parses and passes every lint, no warnings.
  const check = await run('promtool', ['check', 'metrics'], { t, input: text, timeoutMs: 30_000 });
  t.equal(check.code, 0, 'promtool check metrics exits 0', diag(check));
  t.equal((check.stdout + check.stderr).trim(), '', 'promtool has nothing to say', diag(check));

  // A real Prometheus scraping the daemon every second.
  const work = await tempDir(t, 'archipelago-prometheus-');
  const webPort = await freePort();
  const config = path.join(work, 'prometheus.yml');
  await fs.writeFile(config, [
    'global:',
    '  scrape_interval: 1s',
    '  evaluation_interval: 1s',
    'scrape_configs:',
    '  - job_name: archipelago',
    '    scrape_interval: 1s',
    '    scrape_timeout: 1s',
    '    static_configs:',
    `      - targets: ['127.0.0.1:${d.metricsPort}']`,
    '',
  ].join('\n'));
  const prom = spawn('prometheus', [
    `--config.file=${config}`,
    `--storage.tsdb.path=${path.join(work, 'data')}`,
    `--web.listen-address=127.0.0.1:${webPort}`,
    '--log.level=warn',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  const promPid = prom.pid!;
  const promExit = new Promise<void>((resolve) => prom.once('exit', () => resolve()));
  let promLog = '';
  prom.stdout!.on('data', (b: Buffer) => { promLog += b.toString(); });
  prom.stderr!.on('data', (b: Buffer) => { promLog += b.toString(); });
  t.teardown(async () => {
    if (prom.exitCode === null && prom.signalCode === null) {
      try { process.kill(promPid, 'SIGKILL'); } catch { /* already gone */ }
    }
    await promExit;
  });
  const api = `http://127.0.0.1:${webPort}`;

  /** GET a Prometheus API path; null while it is not answering yet. */
  const get = async (p: string): Promise<{ status: number; body: any } | null> => {
    try {
      const r = await fetch(api + p);
      return { status: r.status, body: await r.json().catch(() => null) };
    } catch {
      return null;
    }
  };
  const query = (q: string) => get(`/api/v1/query?query=${encodeURIComponent(q)}`);

  let ready = false;
  for (const end = Date.now() + 30_000; !ready && Date.now() < end;) {
    try { ready = (await fetch(`${api}/-/ready`)).status === 200; } catch { /* starting */ }
    if (!ready) {
      if (prom.exitCode !== null) break;
      await sleep(200);
    }
  }
  t.ok(ready, 'Prometheus is ready', { log: promLog });

  let value: string | null = null;
  for (const end = Date.now() + 30_000; value === null && Date.now() < end;) {
    const r = await query('archipelago_nbd_requests_total{volume="v",op="write"}');
    const result = r?.body?.data?.result as { value: [number, string] }[] | undefined;
    if (result && result.length > 0) value = result[0]!.value[1];
    else await sleep(250);
  }
  t.equal(value, '1', 'Prometheus has the write count of v', { log: promLog });

  const targets = await get('/api/v1/targets');
  const active = (targets?.body?.data?.activeTargets ?? []) as { health: string; lastError: string; scrapeUrl: string }[];
  t.equal(active.length, 1, 'one target');
  t.match(active[0], { health: 'up', lastError: '', scrapeUrl: metricsUrl }, 'the daemon scraped cleanly');

  // Every example query of docs/metrics.md parses and runs.
  const docs = await fs.readFile(path.join(ROOT, 'docs', 'metrics.md'), 'utf8');
  const examples = [...docs.matchAll(/```promql\n([\s\S]*?)```/g)].map((m) => m[1]!.trim());
  t.ok(examples.length >= 8, `${examples.length} PromQL examples in docs/metrics.md`);
  for (const q of examples) {
    const r = await query(q);
    t.equal(r?.body?.status, 'success', `runs: ${q.replace(/\s+/g, ' ')}`, { reply: r?.body });
  }
  // rate() needs two samples in its window: a second scrape or so.
  let found = 0;
  for (const end = Date.now() + 15_000; found === 0 && Date.now() < end;) {
    const r = await query('rate(archipelago_nbd_requests_total{volume="v",op="write"}[1m])');
    found = (r?.body?.data?.result ?? []).length;
    if (found === 0) await sleep(250);
  }
  t.equal(found, 1, 'the write IOPS query of the docs finds v');

  t.equal(await d.stop(), 0, 'the daemon stops cleanly');
});

t.test("--metrics '' serves no endpoint", async (t) => {
  const store = await tempDir(t, 'archipelago-store-');
  const d = await startDaemon(t, { store, extraArgs: ['--metrics', ''] });
  t.equal(d.metricsPort, null, 'no metrics= on the READY line');
  t.equal(await d.stop(), 0);
});
