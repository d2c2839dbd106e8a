/**
 * Snapshot and clone cost on the real file store (docs/format.md §8), beside
 * `qemu-img create -f qcow2 -b base -F raw overlay.qcow2`, in one run.
 *
 *   npm run build && node build/bench/snapshot-clone.js [--dir /var/tmp] [--runs 5]
 *
 * For each volume size (1 GiB, 1 TiB, 1 PiB, sparse) and amount "written"
 * (0, 1 GiB, 100 GiB): create the volume, allocate map entries for the first N
 * objects directly (setEntries with dataSynced, no data object is written:
 * snapshot and clone never read or write data objects), close it. Then, per
 * run, time `snapshotVolume` (open for write, markShared, snapshot header,
 * close) and `cloneSnapshot` of that fresh snapshot, counting the bytes of
 * every object created or replaced through a counting proxy around the
 * FileBlocker. Medians of `--runs` runs, fresh snapshot/clone names each run.
 *
 * qemu-img: 5 timed execFile runs (process start included) of the overlay
 * create over a sparse raw base of 1 GiB and 1 TiB; the file systems here
 * refuse a 1 PiB raw file, so 1 PiB uses a qcow2 base (cluster_size=2M).
 *
 * Writes the table to docs/snapshot-bench.md as well. Temp dirs are removed.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { performance } from 'node:perf_hooks';
import type { Blocker, BlockerCapabilities, ObjectStat } from '../src/blockers/blocker.js';
import { openFileBlocker } from '../src/blockers/file.js';
import { VolumeMap, type EntryUpdate } from '../src/mapper/volume-map.js';
import { snapshotVolume } from '../src/mapper/snapshot-create.js';
import { cloneSnapshot } from '../src/mapper/clone-create.js';
import { median, versionOf, argValue, root } from './lib.js';

const execFileP = promisify(execFile);
const RUNS = Number(argValue('runs', '5'));
const baseDir = argValue('dir', os.tmpdir());

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const PiB = 2 ** 50;

/** Delegates to a Blocker, summing the bytes of every replace and write. */
class CountingBlocker implements Blocker {
  bytes = 0;
  writes = 0;
  reads = 0;
  constructor(private readonly inner: Blocker) {}
  get kind(): string { return this.inner.kind; }
  get capabilities(): BlockerCapabilities { return this.inner.capabilities; }
  reset(): void { this.bytes = 0; this.writes = 0; this.reads = 0; }
  read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    this.reads++;
    return this.inner.read(name, offset, length, target);
  }
  write(name: string, offset: number, data: Buffer): Promise<void> {
    this.bytes += data.length;
    this.writes++;
    return this.inner.write(name, offset, data);
  }
  replace(name: string, data: Buffer): Promise<void> {
    this.bytes += data.length;
    this.writes++;
    return this.inner.replace(name, data);
  }
  readFull(name: string): Promise<Buffer> {
    this.reads++;
    return this.inner.readFull(name);
  }
  punch(name: string, offset: number, length: number): Promise<void> { return this.inner.punch(name, offset, length); }
  remove(name: string): Promise<void> { return this.inner.remove(name); }
  stat(name: string): Promise<ObjectStat> { return this.inner.stat(name); }
  list(prefix: string): AsyncIterable<string> { return this.inner.list(prefix); }
  sync(names?: Iterable<string>): Promise<void> { return this.inner.sync(names); }
  close(): Promise<void> { return this.inner.close(); }
}

interface Case {
  label: string;
  size: number;
  objectSize: number;
  written: number;
}

const sizes: { label: string; size: number; objectSize: number }[] = [
  { label: '1 GiB', size: GiB, objectSize: 4 * MiB },
  { label: '1 TiB', size: TiB, objectSize: 4 * MiB },
  { label: '1 PiB', size: PiB, objectSize: 64 * MiB },
];
const writtens: { label: string; bytes: number }[] = [
  { label: '0', bytes: 0 },
  { label: '1 GiB', bytes: GiB },
  { label: '100 GiB', bytes: 100 * GiB },
];
const cases: Case[] = [];
for (const s of sizes) {
  for (const w of writtens) {
    if (w.bytes > s.size) continue;
    cases.push({ label: `${s.label} vol, ${w.label} written`, size: s.size, objectSize: s.objectSize, written: w.bytes });
  }
}

const fmtInt = (n: number) => Math.round(n).toLocaleString('en-US');
const fmtMs = (n: number) => n.toFixed(2);

interface OurResult {
  snapMs: number; snapBytes: number; snapWrites: number; snapReads: number;
  cloneMs: number; cloneBytes: number; cloneWrites: number; cloneReads: number;
  entries: number;
  varied: boolean;
}

async function measureOurs(blocker: CountingBlocker, c: Case, tag: string): Promise<OurResult> {
  const vol = `v-${tag}`;
  const map = await VolumeMap.create(blocker, vol, { size: c.size, objectSize: c.objectSize });
  const n = Math.floor(c.written / c.objectSize);
  const entry = map.newEntry();
  const updates: EntryUpdate[] = [];
  for (let i = 0; i < n; i++) updates.push({ index: i, entry });
  await map.setEntries(updates, { dataSynced: true });
  await map.close();

  const snapMs: number[] = [], snapBytes: number[] = [], snapWrites: number[] = [], snapReads: number[] = [];
  const cloneMs: number[] = [], cloneBytes: number[] = [], cloneWrites: number[] = [], cloneReads: number[] = [];
  for (let r = 0; r < RUNS; r++) {
    const snap = `${vol}-snap${r}`;
    const clone = `${vol}-clone${r}`;
    blocker.reset();
    let t = performance.now();
    await snapshotVolume(blocker, vol, snap);
    snapMs.push(performance.now() - t);
    snapBytes.push(blocker.bytes); snapWrites.push(blocker.writes); snapReads.push(blocker.reads);

    blocker.reset();
    t = performance.now();
    await cloneSnapshot(blocker, snap, clone);
    cloneMs.push(performance.now() - t);
    cloneBytes.push(blocker.bytes); cloneWrites.push(blocker.writes); cloneReads.push(blocker.reads);
  }
  const same = (xs: number[]) => xs.every((x) => x === xs[0]);
  return {
    snapMs: median(snapMs), snapBytes: median(snapBytes), snapWrites: median(snapWrites), snapReads: median(snapReads),
    cloneMs: median(cloneMs), cloneBytes: median(cloneBytes), cloneWrites: median(cloneWrites), cloneReads: median(cloneReads),
    entries: n,
    // Should not move between runs (same names' lengths, same refs); flagged if it does.
    varied: !same(snapBytes) || !same(cloneBytes),
  };
}

interface QemuResult { ms: number; bytes: number; allocated: number; error?: string }

async function measureQemu(dir: string, tag: string, base: string, baseFmt: string, extra: string[]): Promise<QemuResult> {
  const times: number[] = [];
  let bytes = 0, allocated = 0;
  for (let r = 0; r < RUNS; r++) {
    const overlay = path.join(dir, `${tag}-overlay${r}.qcow2`);
    const t = performance.now();
    try {
      await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', ...extra, '-b', base, '-F', baseFmt, overlay]);
    } catch (err) {
      const msg = ((err as { stderr?: string }).stderr ?? String(err)).trim().split('\n')[0]!;
      return { ms: NaN, bytes: NaN, allocated: NaN, error: msg };
    }
    times.push(performance.now() - t);
    const st = await fs.stat(overlay);
    bytes = st.size;
    allocated = st.blocks * 512;
    await fs.rm(overlay);
  }
  return { ms: median(times), bytes, allocated };
}

/** Median time to spawn `qemu-img --version`: the process-start floor inside the qemu figures. */
async function spawnFloor(): Promise<number> {
  const times: number[] = [];
  for (let r = 0; r < RUNS; r++) {
    const t = performance.now();
    await execFileP('qemu-img', ['--version']);
    times.push(performance.now() - t);
  }
  return median(times);
}

const work = await fs.mkdtemp(path.join(baseDir, 'archipelago-snapbench-'));
let out = '';
try {
  const storeDir = path.join(work, 'store');
  const qemuDir = path.join(work, 'qemu');
  await fs.mkdir(qemuDir);
  const file = await openFileBlocker(storeDir);
  const blocker = new CountingBlocker(file);

  // Warm-up (JIT, fd cache, directories), not reported.
  await measureOurs(blocker, { label: 'warm-up', size: GiB, objectSize: 4 * MiB, written: GiB }, 'warmup');

  const ours = new Map<string, OurResult>();
  let i = 0;
  for (const c of cases) {
    const r = await measureOurs(blocker, c, String(i++));
    ours.set(c.label, r);
    process.stderr.write(`${c.label}: snapshot ${fmtMs(r.snapMs)} ms ${r.snapBytes} B, clone ${fmtMs(r.cloneMs)} ms ${r.cloneBytes} B\n`);
  }
  await blocker.close();

  // qemu-img overlays, one measurement per volume size (the base's content is
  // irrelevant to `qemu-img create`: it reads the base's size only).
  const qemu = new Map<string, QemuResult>();
  const qemuNotes: string[] = [];
  await execFileP('qemu-img', ['--version']); // warm-up: page cache for the binary and its libraries
  for (const [label, size] of [['1 GiB', '1G'], ['1 TiB', '1T']] as const) {
    const base = path.join(qemuDir, `base-${size}.img`);
    await execFileP('truncate', ['-s', size, base]);
    qemu.set(label, await measureQemu(qemuDir, `raw${size}`, base, 'raw', []));
  }
  // 1 PiB: a raw file that large is refused by ext4/xfs ("File too large"); try, then qcow2.
  const raw1p = path.join(qemuDir, 'base-1P.img');
  try {
    await execFileP('truncate', ['-s', '1P', raw1p]);
    qemu.set('1 PiB', await measureQemu(qemuDir, 'raw1P', raw1p, 'raw', []));
    qemuNotes.push('1 PiB: sparse raw base.');
  } catch (err) {
    const msg = ((err as { stderr?: string }).stderr ?? String(err)).trim().split('\n')[0]!.split(': ').pop()!;
    qemuNotes.push(`1 PiB: a sparse raw base fails on this file system (\`truncate -s 1P\`: "${msg}"), so the base is `
      + '`qemu-img create -f qcow2 -o cluster_size=2M base.qcow2 1P` and the overlay is `-F qcow2`.');
    const base = path.join(qemuDir, 'base-1P.qcow2');
    try {
      await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', base, '1P']);
      qemu.set('1 PiB', await measureQemu(qemuDir, 'q1P', base, 'qcow2', []));
      const big = await measureQemu(qemuDir, 'q1P2M', base, 'qcow2', ['-o', 'cluster_size=2M']);
      qemuNotes.push(big.error === undefined
        ? `1 PiB with the overlay also at \`-o cluster_size=2M\`: ${fmtMs(big.ms)} ms, ${fmtInt(big.bytes)} B `
          + `(${fmtInt(big.allocated)} B allocated): a 32× smaller L1 table, but each metadata structure takes a whole 2 MiB cluster.`
        : `1 PiB overlay with \`-o cluster_size=2M\` fails: ${big.error}`);
    } catch (err2) {
      const msg2 = ((err2 as { stderr?: string }).stderr ?? String(err2)).trim().split('\n')[0]!;
      qemu.set('1 PiB', { ms: NaN, bytes: NaN, allocated: NaN, error: msg2 });
    }
  }
  const floor = await spawnFloor();

  let table = '| case | our snapshot ms | snapshot metadata bytes | our clone ms | clone metadata bytes | qemu-img overlay ms | overlay bytes |\n'
    + '|---|---:|---:|---:|---:|---:|---:|\n';
  for (const c of cases) {
    const r = ours.get(c.label)!;
    const sizeLabel = c.label.split(' vol')[0]!;
    const q = qemu.get(sizeLabel);
    const qms = q === undefined ? 'n/a' : q.error !== undefined ? 'fails' : fmtMs(q.ms);
    const qb = q === undefined ? 'n/a' : q.error !== undefined ? 'fails'
      : q.allocated === q.bytes ? fmtInt(q.bytes) : `${fmtInt(q.bytes)} (${fmtInt(q.allocated)} allocated)`;
    table += `| ${c.label} (${fmtInt(r.entries)} entries, ${c.objectSize / MiB} MiB objects) `
      + `| ${fmtMs(r.snapMs)} | ${fmtInt(r.snapBytes)} (${r.snapWrites} replaces) `
      + `| ${fmtMs(r.cloneMs)} | ${fmtInt(r.cloneBytes)} (${r.cloneWrites} replace${r.cloneWrites === 1 ? '' : 's'}) `
      + `| ${qms} | ${qb} |\n`;
  }

  const reads = [...ours.values()];
  const notes = [
    `Medians of ${RUNS} runs; each run snapshots the same volume under a fresh name and clones that fresh snapshot.`,
    '"Written" is simulated: map entries for the first N objects are set directly with '
      + '`map.setEntries(..., { dataSynced: true })` (entries from `map.newEntry()`); no data object exists. '
      + 'Snapshot and clone never read or write data objects, so this does not change what they do.',
    'Object size: 4 MiB for the 1 GiB and 1 TiB volumes, 64 MiB for 1 PiB (keeps the entry count reasonable). '
      + 'A 1 GiB volume cannot hold 100 GiB, so that case is left out.',
    'Metadata bytes: the sum of the sizes of every object created or replaced (`replace` + `write`) through a '
      + 'counting proxy around the FileBlocker; each replace is temp file + fsync + rename (+ directory fsync).',
    '`snapshotVolume` here is the closed-volume path: open for write (a header write: the generation bump), '
      + 'markShared (a header write), the snapshot header (a header write), close. Each header carries '
      + '12 B per existing chunk ref (4096 entries per chunk). A snapshot of an already open volume '
      + '(`createSnapshot`) skips the open\'s header write.',
    `Object reads: snapshot ${[...new Set(reads.map((r) => r.snapReads))].join('/')}, `
      + `clone ${[...new Set(reads.map((r) => r.cloneReads))].join('/')} per run (header reads only; no chunk is read).`,
    `qemu-img: \`qemu-img create -q -f qcow2 -b base.img -F raw overlay.qcow2\`, ${RUNS} runs timed around execFile, `
      + `so process start is included: \`qemu-img --version\` alone takes ${fmtMs(floor)} ms here. `
      + 'Overlay bytes = the file\'s size (and its allocated blocks where they differ). The base is a sparse raw file made with `truncate`; qemu-img reads only '
      + 'its size, so the written amount does not matter to it and one measurement per volume size is shown in every row.',
    ...qemuNotes,
    ...(reads.some((r) => r.varied) ? ['Metadata bytes varied between runs (median shown).'] : []),
  ];
  const cpus = os.cpus();
  const machine = `node ${process.version}; ${await versionOf('qemu-img', ['--version'])}; `
    + `${cpus.length} CPUs (${cpus[0]?.model.trim() ?? 'unknown'}); ${os.type()} ${os.release()}; `
    + `temp dir on ${(await execFileP('df', ['--output=fstype', baseDir])).stdout.trim().split('\n').pop()}; `
    + `load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')} at the end (shared machine)`;
  out = `${machine}\n\n${table}\n${notes.map((n) => `- ${n}`).join('\n')}\n`;
  console.log(out);

  const cmd = `npm run build && node build/bench/snapshot-clone.js${baseDir === os.tmpdir() ? '' : ` --dir ${baseDir}`}`;
  const doc = '# Snapshot and clone cost, measured\n\n'
    + 'Written by `bench/snapshot-clone.ts` (see docs/format.md §8). Command:\n\n'
    + '```\n' + cmd + '\n```\n\n'
    + `Temp store under ${baseDir}. Machine: ${out}`;
  await fs.writeFile(path.join(root, 'docs/snapshot-bench.md'), doc);
} finally {
  await fs.rm(work, { recursive: true, force: true });
}
