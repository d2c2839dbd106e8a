/**
 * src/daemon/backend.ts (the store's timeout and fault-injection wrappers,
 * one knob for both backends) and the admin socket's `faults` op.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { AdminServer } from '../../../src/daemon/admin.js';
import {
  backendTimeoutSec, guardStore, guardTimeoutMs, storeUrlWithTimeout,
} from '../../../src/daemon/backend.js';
import { VolumeProvider } from '../../../src/daemon/volume-export.js';
import type { Store } from '../../../src/daemon/store.js';
import { createLogger } from '../../../src/common/log.js';

const lines: string[] = [];
const log = createLogger({ level: 'info', write: (l) => { lines.push(l); } });

function memoryStore(url = 'memory:', separate = false): Store & { closed: number } {
  const maps = new MemoryBlocker();
  const s = { url, maps, data: separate ? new MemoryBlocker() : maps, closed: 0, close: async () => { s.closed++; } };
  return s;
}

t.test('--backend-timeout: seconds ≥ 0, default 30', async (t) => {
  t.equal(backendTimeoutSec(undefined), 30);
  t.equal(backendTimeoutSec(0), 0);
  t.equal(backendTimeoutSec(1.5), 1.5);
  for (const bad of [-1, NaN, Infinity, 100_000]) t.throws(() => backendTimeoutSec(bad), { code: 'ARCH_E_USAGE' });
});

t.test('RADOS: op_timeout defaults to the backend timeout; the daemon\'s backstop is 5 s above it', async (t) => {
  t.equal(storeUrlWithTimeout('rados:data', 30), 'rados:data?op_timeout=30');
  t.equal(storeUrlWithTimeout('rados:data?maps=m', 12), 'rados:data?maps=m&op_timeout=12');
  t.equal(storeUrlWithTimeout('rados:data?maps=m', 1.5), 'rados:data?maps=m&op_timeout=2', 'whole seconds, rounded up');
  t.equal(storeUrlWithTimeout('rados:data?op_timeout=5', 30), 'rados:data?op_timeout=5', 'the URL wins');
  t.equal(storeUrlWithTimeout('rados:data', 0), 'rados:data', '0: librados keeps its own default');
  t.equal(storeUrlWithTimeout('file:/x', 30), 'file:/x');
  t.equal(guardTimeoutMs('rados:data?op_timeout=5', 30), 10_000);
  t.equal(guardTimeoutMs('rados:data?op_timeout=0', 30), 30_000, 'librados unbounded: the daemon bounds');
  t.equal(guardTimeoutMs('file:/x', 1.5), 1500);
  t.equal(guardTimeoutMs('file:/x', 0), 0);
});

t.test('guardStore: one wrapper for a shared blocker, loud warning, close fails hung calls', async (t) => {
  lines.length = 0;
  const raw = memoryStore();
  const g = guardStore(raw, { timeoutSec: 0.2, faultInjection: true, log });
  t.equal(g.store.maps, g.store.data, 'maps and data share one wrapper (rules and fences shared)');
  t.equal(g.timeoutMs, 200);
  t.ok(lines.some((l) => /FAULT INJECTION IS ON/.test(l) && /"level":"warn"/.test(l)), 'a loud warning');
  g.faults!.addRule({ ops: ['readFull'], hang: true });
  await g.store.maps.write('x', 0, Buffer.from('x'));
  await t.rejects(g.store.maps.readFull('x'), { code: 'ETIMEDOUT' });
  t.match(g.status(), { timeoutMs: 200, faultInjection: true, late: 1, timedOut: { readFull: 1 } });
  await g.store.close();
  t.equal(raw.closed, 1, 'the store is closed');
  t.equal(g.status().late, 0, 'the hung call failed at close');

  const two = guardStore(memoryStore('memory:', true), { log });
  t.not(two.store.maps, two.store.data, 'two blockers, two wrappers');
  t.equal(two.faults, null, 'fault injection is off by default');
  t.equal(two.timeoutMs, 30_000);
  t.match(two.status(), { faultInjection: false, late: 0 });
  await two.store.close();
});

t.test('admin: faults show/set/add/clear, refused when off', async (t) => {
  const g = guardStore(memoryStore(), { timeoutSec: 1, faultInjection: true, log });
  const admin = new AdminServer(g.store, new VolumeProvider(g.store, log), log, g);
  const ask = (req: object) => admin.handle(JSON.stringify({ op: 'faults', ...req }));
  t.match(await ask({ action: 'show' }), { ok: true, op: 'faults', rules: [], hanging: 0, backend: { timeoutMs: 1000 } });
  t.match(await ask({ action: 'add', rule: { ops: ['write'], prefix: 'd.', fail: 'EIO' } }), { ok: true, id: 1, rules: [{ id: 1 }] });
  t.match(await ask({ action: 'set', rules: [{ hang: true, ops: ['sync'] }, { delayMs: 5 }] }), { ok: true, ids: [2, 3] });
  const hung = g.store.data.sync();
  t.match(await ask({ action: 'show' }), { hanging: 1 });
  t.match(await ask({ action: 'clear', ids: [2] }), { ok: true, released: 1, rules: [{ id: 3 }] });
  await hung;
  t.match(await ask({ action: 'clear' }), { ok: true, rules: [] });
  t.match(await ask({ action: 'set', rules: [{ fail: 'EBOGUS' }] }), { ok: false, code: 'ARCH_E_USAGE', message: /fail must be one of/ });
  t.match(await ask({ action: 'set' }), { ok: false, code: 'ARCH_E_USAGE' });
  t.match(await ask({ action: 'clear', release: 'maybe' }), { ok: false, code: 'ARCH_E_USAGE' });
  t.match(await ask({ action: 'frob' }), { ok: false, code: 'ARCH_E_USAGE', message: /unknown action/ });
  t.match(await admin.handle('{"op":"status"}'), { ok: true, backend: { faultInjection: true } });

  const off = guardStore(memoryStore(), { log });
  const plain = new AdminServer(off.store, new VolumeProvider(off.store, log), log, off);
  t.match(await plain.handle('{"op":"faults","action":"show"}'), { ok: false, code: 'ARCH_E_USAGE', message: /fault injection is off/ });
  t.match(await plain.handle('{"op":"status"}'), { ok: true, backend: { faultInjection: false, timeoutMs: 30_000 } });
  await g.store.close();
  await off.store.close();
});
