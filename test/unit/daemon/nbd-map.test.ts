/**
 * src/daemon/nbd-map.ts: the nbd-client command lines map and unmap build,
 * server addresses from flags and from the daemon's settings, picking a free
 * /dev/nbdN from (a fake) sysfs, and the mapping record: written atomically,
 * read back, listed, and refused when damaged or of another format.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  MapUsageError, RECORD_FORMAT, attachArgv, checkConnections, daemonEndpoint, detachArgv, deviceName, deviceState,
  formatEndpoint, listRecords, parseEndpoint, parseRecord, pickFreeDevice, readRecord, recordPath, relayPaths, removeRecord,
  shellQuote, writeRecord, type MappingRecord,
} from '../../../src/daemon/nbd-map.js';

async function tmp(t: { teardown(fn: () => unknown): void }): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'archipelago-nbdmap-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A fake /sys/block: nbdN directories with a size file and, for connected ones, a pid file. */
async function fakeSys(dir: string, devices: Record<string, { sectors: number; pid?: number }>): Promise<string> {
  for (const [name, s] of Object.entries(devices)) {
    await fs.mkdir(path.join(dir, name), { recursive: true });
    await fs.writeFile(path.join(dir, name, 'size'), `${s.sectors}\n`);
    if (s.pid !== undefined) await fs.writeFile(path.join(dir, name, 'pid'), `${s.pid}\n`);
  }
  await fs.mkdir(path.join(dir, 'sda'), { recursive: true });
  return dir;
}

t.test('attachArgv: TCP, Unix socket, options', async (t) => {
  const base = { nbdClient: 'nbd-client', volume: 'vm1-disk', device: '/dev/nbd3', connections: 2, timeoutSec: 120, readOnly: false };
  t.same(attachArgv({ ...base, target: { kind: 'unix', path: '/run/archipelago-map/nbd3.sock' } }),
    ['nbd-client', '-unix', '/run/archipelago-map/nbd3.sock', '/dev/nbd3', '-N', 'vm1-disk', '-C', '2', '-t', '120']);
  t.same(attachArgv({ ...base, target: { kind: 'tcp', host: '127.0.0.1', port: 10809 }, connections: 1, readOnly: true, blockSize: 4096 }),
    ['nbd-client', '127.0.0.1', '10809', '/dev/nbd3', '-N', 'vm1-disk', '-t', '120', '-b', '4096', '-R'], 'one connection: no -C');
  t.notOk(attachArgv({ ...base, target: { kind: 'tcp', host: '::1', port: 1 } }).some((w) => /persist|nonetlink|^-p$|^-L$/.test(w)),
    'no -persist, no -nonetlink: the relay reconnects, netlink configures');
  t.same(detachArgv('/usr/sbin/nbd-client', '/dev/nbd3'), ['/usr/sbin/nbd-client', '-d', '/dev/nbd3']);
});

t.test('endpoints: parse, format, the daemon\'s own from its settings', async (t) => {
  t.same(parseEndpoint('127.0.0.1:10809'), { kind: 'tcp', host: '127.0.0.1', port: 10809 });
  t.same(parseEndpoint('tcp:[::1]:7'), { kind: 'tcp', host: '::1', port: 7 });
  t.same(parseEndpoint('unix:/run/a.sock'), { kind: 'unix', path: '/run/a.sock' });
  t.same(parseEndpoint('/run/a.sock'), { kind: 'unix', path: '/run/a.sock' });
  for (const e of ['tcp:127.0.0.1:10809', 'tcp:[::1]:7', 'unix:/run/a.sock']) t.equal(formatEndpoint(parseEndpoint(e)), e, `${e} round-trips`);
  t.throws(() => parseEndpoint('unix:relative.sock'), MapUsageError);
  t.throws(() => parseEndpoint('nohost'), /expected HOST:PORT/);
  t.throws(() => parseEndpoint('127.0.0.1:0'), /port 0/);
  t.same(daemonEndpoint({ listen: '127.0.0.1:10809', socket: '/run/archipelago/nbd.sock' }), { kind: 'unix', path: '/run/archipelago/nbd.sock' }, 'the Unix socket first');
  t.same(daemonEndpoint({ listen: '0.0.0.0:10809', socket: null }), { kind: 'tcp', host: '127.0.0.1', port: 10809 }, 'a wildcard is reached over loopback');
  t.same(daemonEndpoint({ listen: '[::]:10809', socket: null }), { kind: 'tcp', host: '::1', port: 10809 });
  t.equal(daemonEndpoint({ listen: null, socket: null }), null);
});

t.test('devices: names, state, the first free one', async (t) => {
  t.equal(deviceName('/dev/nbd12'), 'nbd12');
  t.equal(deviceName('nbd0'), 'nbd0');
  for (const bad of ['/dev/sda', '/dev/nbd', '/dev/nbd01', '/dev/nbd0p1', 'nbd-1']) t.throws(() => deviceName(bad), MapUsageError, bad);
  const sys = await fakeSys(await tmp(t), { nbd0: { sectors: 2048, pid: 77 }, nbd1: { sectors: 0 }, nbd2: { sectors: 0 }, nbd10: { sectors: 0 } });
  t.same(await deviceState(sys, 'nbd0'), { exists: true, pid: 77, sectors: 2048 });
  t.same(await deviceState(sys, 'nbd1'), { exists: true, pid: null, sectors: 0 });
  t.same(await deviceState(sys, 'nbd9'), { exists: false, pid: null, sectors: 0 });
  t.equal(await pickFreeDevice(sys, new Set()), '/dev/nbd1', 'nbd0 is connected');
  t.equal(await pickFreeDevice(sys, new Set(['nbd1'])), '/dev/nbd2', 'a recorded device is skipped');
  t.equal(await pickFreeDevice(sys, new Set(['nbd1', 'nbd2'])), '/dev/nbd10', 'numeric order, not text order');
  await t.rejects(pickFreeDevice(sys, new Set(['nbd1', 'nbd2', 'nbd10'])), /all 4 NBD devices are in use/);
  await t.rejects(pickFreeDevice(await tmp(t), new Set()), /modprobe nbd/);
});

t.test('records: write, read, list, remove; damaged and foreign ones refused', async (t) => {
  const dir = path.join(await tmp(t), 'mapped');
  const rec: MappingRecord = {
    format: RECORD_FORMAT, device: '/dev/nbd2', volume: 'v1', server: 'tcp:127.0.0.1:10809',
    relay: { pid: 1234, listen: 'unix:/run/x/nbd2.sock', reconnectTimeoutSec: 60, log: '/run/x/nbd2.log' },
    attach: ['nbd-client', '-unix', '/run/x/nbd2.sock', '/dev/nbd2', '-N', 'v1', '-t', '120'],
    connections: 1, timeoutSec: 120, readOnly: false, mappedAt: new Date(0).toISOString(),
  };
  const file = await writeRecord(dir, rec);
  t.equal(file, path.join(dir, 'nbd2.json'));
  t.equal(recordPath(dir, '/dev/nbd2'), file);
  t.same(relayPaths(dir, '/dev/nbd2'), { socket: path.join(dir, 'nbd2.sock'), log: path.join(dir, 'nbd2.log') });
  t.same(await readRecord(dir, '/dev/nbd2'), rec, 'reads back what was written');
  t.equal(await readRecord(dir, '/dev/nbd5'), null, 'no record: null');
  t.same((await fs.readdir(dir)).sort(), ['nbd2.json'], 'no temporary file left');
  await writeRecord(dir, { ...rec, device: '/dev/nbd10', relay: null });
  await fs.writeFile(path.join(dir, 'nbd3.json'), '{"format": 2}');
  const listed = await listRecords(dir);
  t.same(listed.records.map((r) => r.device), ['/dev/nbd2', '/dev/nbd10'], 'listed by device number');
  t.equal(listed.errors.length, 1, 'the foreign record is reported, not thrown');
  t.match(listed.errors[0], /nbd3\.json: record format 2 is not 1/);
  t.throws(() => parseRecord('{', 'f'), /f: not JSON/);
  t.throws(() => parseRecord(JSON.stringify({ ...rec, device: '/dev/sda' }), 'f'), /bad or missing device/);
  t.throws(() => parseRecord(JSON.stringify({ ...rec, attach: 'nbd-client' }), 'f'), /bad or missing attach/);
  t.same(parseRecord(JSON.stringify({ ...rec, future: 1 }), 'f').volume, 'v1', 'unknown fields are ignored');
  await removeRecord(dir, '/dev/nbd2');
  t.equal(await readRecord(dir, '/dev/nbd2'), null, 'removed');
  t.same(await listRecords(path.join(dir, 'missing')), { records: [], errors: [] }, 'no directory: nothing mapped');
});

t.test('small checks', async (t) => {
  t.equal(shellQuote(['nbd-client', '-N', 'a b', "it's"]), `nbd-client -N 'a b' 'it'\\''s'`);
  t.equal(checkConnections(16), 16);
  t.throws(() => checkConnections(0), /1 to 16/);
  t.throws(() => checkConnections(1.5), /1 to 16/);
});
