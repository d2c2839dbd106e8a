/**
 * The volume commands of the `archipelago` CLI on a file store, run as the
 * compiled program: create, list, info --json, rename, resize, remove; the
 * errors (exit code 2 and one clear line) for bad names, bad sizes, a taken
 * name and a missing volume; and a volume created while the daemon runs is
 * served at once.
 */
import t from 'tap';
import { cli, startDaemon } from '../helpers/daemon.js';
import { listObjects, tempStore } from '../helpers/stores.js';
import { diag, run } from '../helpers/run.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Objects in the store (there must be none after a refused create). */
function storeObjects(store: string): Promise<string[]> {
  return listObjects(store, '');
}

/** Runs `fn` over `items` with at most `n` at a time; results in input order. */
async function inPool<T, R>(items: T[], n: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(Array.from({ length: n }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  }));
  return out;
}

t.test('create, list, info, rename, resize, remove', async (t) => {
  const store = await tempStore(t);

  let r = await cli(['create', 'alpha', '--size', '64M', '--object-size', '64K', '--store', store]);
  t.equal(r.code, 0, 'create exits 0', diag(r.result));
  t.match(r.stdout, /created volume alpha: 64MiB, objects of 64KiB/, 'create says what it made');

  r = await cli(['create', 'beta', '--size', '1M', '--store', store, '--json']);
  t.equal(r.code, 0, 'create --json exits 0', diag(r.result));
  t.equal(JSON.parse(r.stdout).objectSize, 4 * MiB, 'default object size is 4 MiB');

  r = await cli(['list', '--store', store]);
  t.equal(r.code, 0, 'list exits 0', diag(r.result));
  t.same(r.stdout.trim().split('\n').sort(), ['alpha', 'beta'], 'list names both volumes');

  r = await cli(['list', '--json', '--store', store]);
  t.equal(r.code, 0, 'list --json exits 0', diag(r.result));
  const rows = JSON.parse(r.stdout) as { name: string; size: number }[];
  t.same(rows.map((x) => [x.name, x.size]).sort(), [['alpha', 64 * MiB], ['beta', 1 * MiB]], 'list --json rows');

  r = await cli(['info', 'alpha', '--json', '--store', store]);
  t.equal(r.code, 0, 'info --json exits 0', diag(r.result));
  const info = JSON.parse(r.stdout) as Record<string, unknown>;
  t.equal(info.name, 'alpha');
  t.match(info.id, /^[0-9a-f]{16}$/, 'id is 16 hex digits');
  t.equal(info.size, 64 * MiB, 'size in bytes');
  t.equal(info.objectSize, 64 * KiB, 'object size in bytes');
  t.type(info.generation, 'number', 'generation');
  t.equal(info.mapChunks, 0, 'a new volume has no map chunks');
  t.ok(!Number.isNaN(Date.parse(info.created as string)) && Math.abs(Date.parse(info.created as string) - Date.now()) < 120_000, 'created is a recent ISO time');
  t.equal(info.parent, null, 'no parent');

  r = await cli(['info', 'alpha', '--store', store]);
  t.equal(r.code, 0, 'info (text) exits 0', diag(r.result));
  t.match(r.stdout, /size:\s+64MiB \(67108864 bytes\)/, 'text info shows the size');
  t.match(r.stdout, /object size:\s+64KiB/, 'text info shows the object size');

  // rename
  r = await cli(['rename', 'alpha', 'gamma', '--store', store]);
  t.equal(r.code, 0, 'rename exits 0', diag(r.result));
  r = await cli(['list', '--store', store]);
  t.same(r.stdout.trim().split('\n').sort(), ['beta', 'gamma'], 'list after rename');
  r = await cli(['info', 'gamma', '--json', '--store', store]);
  t.equal(r.code, 0, 'info of the new name', diag(r.result));
  t.equal(JSON.parse(r.stdout).id, info.id, 'rename keeps the volume id');
  r = await cli(['info', 'alpha', '--store', store]);
  t.equal(r.code, 2, 'the old name is gone (exit 2)', diag(r.result));
  t.match(r.stderr, /^archipelago: volume "alpha": (no such volume|renamed to "gamma")\n$/, 'one clear line');
  r = await cli(['rename', 'gamma', 'beta', '--store', store]);
  t.equal(r.code, 2, 'rename onto an existing volume: exit 2', diag(r.result));
  t.match(r.stderr, /already exists/, 'says the target exists');

  // resize
  r = await cli(['resize', 'gamma', '--size', '128M', '--store', store]);
  t.equal(r.code, 0, 'grow exits 0', diag(r.result));
  t.match(r.stdout, /resized volume gamma to 128MiB/);
  r = await cli(['info', 'gamma', '--json', '--store', store]);
  t.equal(JSON.parse(r.stdout).size, 128 * MiB, 'size after grow');
  r = await cli(['resize', 'gamma', '--size', '32M', '--store', store]);
  t.not(r.code, 0, 'shrink is refused with a non-zero exit', diag(r.result));
  t.match(r.stderr, /^archipelago: volume "gamma": cannot shrink from 134217728 to 33554432 bytes\n$/, 'shrink: one clear line');
  r = await cli(['info', 'gamma', '--json', '--store', store]);
  t.equal(JSON.parse(r.stdout).size, 128 * MiB, 'size unchanged after the refused shrink');
  r = await cli(['resize', 'gamma', '--size', '128M', '--store', store]);
  t.equal(r.code, 0, 'resize to the same size is fine', diag(r.result));

  // remove
  r = await cli(['remove', 'gamma', '--store', store]);
  t.equal(r.code, 0, 'remove exits 0', diag(r.result));
  t.match(r.stdout, /removed volume gamma/);
  r = await cli(['list', '--store', store]);
  t.same(r.stdout.trim().split('\n'), ['beta'], 'list after remove');
  r = await cli(['rm', 'beta', '--json', '--store', store]);
  t.equal(r.code, 0, 'rm alias with --json', diag(r.result));
  t.equal(JSON.parse(r.stdout).name, 'beta');
  r = await cli(['list', '--store', store]);
  t.equal(r.stdout, '', 'empty store lists nothing');
  t.same(await storeObjects(store), [], 'no objects left in the store');
});

t.test('bad names: exit 2, one clear line, nothing created', async (t) => {
  const store = await tempStore(t);
  const ok = await cli(['create', 'good', '--size', '1M', '--store', store]);
  t.equal(ok.code, 0, 'a good volume to rename', diag(ok.result));
  const bad = ['../x', 'a/b', '', 'x'.repeat(81), '.hidden', '_under', 'a..b', 'dot.', 'sp ace', 'é'];
  // Every name through create and info; the other commands with a few of them.
  const cases = bad.flatMap((name, i) => [
    ['create', name, '--size', '1M'],
    ['info', name],
    ...(i < 3 ? [['remove', name], ['resize', name, '--size', '2M'], ['rename', 'good', name], ['rename', name, 'good2']] : []),
  ].map((args) => ({ name, args })));
  const results = await inPool(cases, 3, async (c) => ({ ...c, r: await cli([...c.args, '--store', store]) }));
  for (const { name, args, r } of results) {
    t.equal(r.code, 2, `${args[0]} ${JSON.stringify(name)}: exit 2`, diag(r.result));
    t.match(r.stderr, /^archipelago: invalid volume name .*: .+\n$/, `${args[0]} ${JSON.stringify(name)}: one clear line`);
  }
  t.equal((await cli(['create', 'x'.repeat(80), '--size', '1M', '--store', store])).code, 0, '80 characters is allowed');
  const r = await cli(['list', '--store', store]);
  t.same(r.stdout.trim().split('\n').sort(), ['good', 'x'.repeat(80)], 'only the valid volumes exist');
});

t.test('duplicate create and missing volumes: exit 2', async (t) => {
  const store = await tempStore(t);
  t.equal((await cli(['create', 'v', '--size', '1M', '--store', store])).code, 0);
  const before = await cli(['info', 'v', '--json', '--store', store]);
  let r = await cli(['create', 'v', '--size', '2M', '--store', store]);
  t.equal(r.code, 2, 'duplicate create: exit 2', diag(r.result));
  t.equal(r.stderr, 'archipelago: volume "v": already exists\n', 'duplicate create: one clear line');
  const after = await cli(['info', 'v', '--json', '--store', store]);
  t.same(JSON.parse(after.stdout), JSON.parse(before.stdout), 'the existing volume is untouched');
  for (const args of [['info', 'nope'], ['info', 'nope', '--json'], ['remove', 'nope'], ['rename', 'nope', 'other'], ['resize', 'nope', '--size', '2M']]) {
    r = await cli([...args, '--store', store]);
    t.equal(r.code, 2, `${args.join(' ')}: exit 2`, diag(r.result));
    t.equal(r.stderr, 'archipelago: volume "nope": no such volume\n', `${args.join(' ')}: one clear line`);
    t.equal(r.stdout, '', `${args.join(' ')}: nothing on stdout`);
  }
});

t.test('sizes', async (t) => {
  const store = await tempStore(t);
  const good: [string, number][] = [['10G', 10 * GiB], ['512M', 512 * MiB], ['4096', 4096], ['1.5T', 1.5 * 1024 * GiB], ['64KiB', 64 * KiB], ['2g', 2 * GiB]];
  await inPool(good.map(([text], i) => ({ text, i })), 3, async ({ text, i }) => {
    const r = await cli(['create', `s${i}`, '--size', text, '--store', store]);
    t.equal(r.code, 0, `create --size ${text}`, diag(r.result));
  });
  const r = await cli(['list', '--json', '--store', store]);
  const sizes = new Map((JSON.parse(r.stdout) as { name: string; size: number }[]).map((x) => [x.name, x.size]));
  good.forEach(([text, bytes], i) => t.equal(sizes.get(`s${i}`), bytes, `${text} = ${bytes} bytes`));

  for (const [args, why] of [
    [['create', 'b1', '--size', '10X'], /invalid size "10X"/],
    [['create', 'b2', '--size', 'ten'], /invalid size "ten"/],
    [['create', 'b3', '--size=-1M'], /invalid size "-1M"/],
    [['create', 'b4', '--size', '1.3'], /invalid size "1\.3"/],
    [['create', 'b5', '--size', '1M', '--object-size', '3K'], /object size 3072: must be a power of two/],
    [['create', 'b6', '--size', '1M', '--object-size', '128M'], /object size 134217728: must be a power of two/],
    [['resize', 's0', '--size', '10X'], /invalid size "10X"/],
  ] as const) {
    const r = await cli([...args, '--store', store]);
    t.equal(r.code, 2, `${args.join(' ')}: exit 2 (usage error)`, diag(r.result));
    t.match(r.stderr, why, `${args.join(' ')}: says why`);
    t.equal(r.stderr.split('\n').length, 2, `${args.join(' ')}: one line`);
  }
  const names = (await cli(['list', '--store', store])).stdout.trim().split('\n');
  t.notOk(names.some((n) => n.startsWith('b')), 'no volume made from a bad size');
  const s0 = await cli(['info', 's0', '--json', '--store', store]);
  t.equal(JSON.parse(s0.stdout).size, 10 * GiB, 'a bad resize leaves the size alone');
});

t.test('a volume created while the daemon runs is served at once', async (t) => {
  const store = await tempStore(t);
  const d = await startDaemon(t, { store });
  let r0 = await run('nbdinfo', ['--json', d.uri('late')], { t, timeoutMs: 20_000 });
  t.not(r0.code, 0, 'before create: nbdinfo fails', diag(r0));

  const r = await cli(['create', 'late', '--size', '8M', '--object-size', '64K', '--store', store]);
  t.equal(r.code, 0, 'create while serving', diag(r.result));
  r0 = await run('nbdinfo', ['--json', d.uri('late')], { t, timeoutMs: 20_000 });
  t.equal(r0.code, 0, 'nbdinfo on the new volume', diag(r0));
  const doc = JSON.parse(r0.stdout) as { exports: { 'export-name': string; 'export-size': number; 'is_read_only': boolean }[] };
  t.equal(doc.exports[0]!['export-name'], 'late');
  t.equal(doc.exports[0]!['export-size'], 8 * MiB, 'served with its size');
  t.equal(doc.exports[0]!.is_read_only, false, 'served writable');

  const list = await run('nbdinfo', ['--list', '--json', d.uri('')], { t, timeoutMs: 20_000 });
  t.equal(list.code, 0, 'nbdinfo --list', diag(list));
  t.ok((JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.some((e) => e['export-name'] === 'late'), 'listed over NBD');

  // Grown offline while no client has it open: the next client sees the new size.
  const g = await cli(['resize', 'late', '--size', '16M', '--store', store]);
  t.equal(g.code, 0, 'resize while served (not open)', diag(g.result));
  r0 = await run('nbdinfo', ['--size', d.uri('late')], { t, timeoutMs: 20_000 });
  t.equal(r0.stdout.trim(), String(16 * MiB), 'next client sees the new size', diag(r0));

  t.equal(await d.stop(), 0, 'SIGTERM: daemon exits 0');
  t.equal(d.stderr(), '', 'daemon logged nothing at warn level', { stderr: d.stderr() });
});
