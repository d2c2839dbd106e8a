/**
 * Deduplication of content-addressed images (`archipelago import`, docs/format.md §4)
 * on the real file store, through the real CLI.
 *
 *   npm run build && node build/bench/dedup.js [--dir /var/tmp] [--size 256M]
 *
 * Makes raw image A (default 256 MiB) of 4 MiB blocks (the default object
 * size): ~25% all-zero blocks, ~10% of the non-zero blocks repeats of an
 * earlier block of A, the rest random. B has A's zero blocks and exactly half
 * of A's non-zero blocks (every other one, by position) unchanged; the other
 * half is new random data. Then runs, each as its own process,
 *
 *   node build/src/cli/main.js import A img1 --store file:DIR --json
 *   node build/src/cli/main.js import A img2 --store file:DIR --json
 *   node build/src/cli/main.js import B img3 --store file:DIR --json
 *
 * and after each walks the store directory for `sha256-*` objects (count and
 * bytes). Wall time includes process start. Writes the table to
 * docs/dedup-bench.md as well. Temp dirs are removed.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { performance } from 'node:perf_hooks';
import { parseSize } from '../src/cli/sizes.js';
import { mulberry32 } from '../src/common/prng.js';
import { argValue, cliPath as cli, root } from './lib.js';

const execFileP = promisify(execFile);
const baseDir = argValue('dir', os.tmpdir());
const sizeArg = argValue('size', '256M');

const MiB = 2 ** 20;
const BLOCK = 4 * MiB;
const size = parseSize(sizeArg);
if (size <= 0 || size % BLOCK !== 0) throw new Error(`--size must be a positive multiple of 4 MiB, not ${sizeArg}`);
const nBlocks = size / BLOCK;

/** Deterministic layout (seeded), so runs are comparable; the data itself is random. */
const prng = mulberry32;

type Block = { kind: 'zero' } | { kind: 'random' } | { kind: 'repeat'; of: number };

/** A's layout: ~25% zero, ~10% of the rest repeats an earlier random block. */
function layoutA(): Block[] {
  const rnd = prng(42);
  const out: Block[] = [];
  const randoms: number[] = [];
  for (let i = 0; i < nBlocks; i++) {
    const r = rnd();
    if (r < 0.25) out.push({ kind: 'zero' });
    else if (r < 0.325 && randoms.length > 0) out.push({ kind: 'repeat', of: randoms[Math.floor(rnd() * randoms.length)]! });
    else { out.push({ kind: 'random' }); randoms.push(i); }
  }
  return out;
}

/** Writes A and B block by block; returns A's and B's non-zero block counts. */
async function writeImages(fileA: string, fileB: string, layout: Block[]): Promise<{ nonZero: number; shared: number }> {
  const a = await fs.open(fileA, 'w');
  const b = await fs.open(fileB, 'w');
  const zero = Buffer.alloc(BLOCK);
  const blocksA: Buffer[] = []; // only random blocks kept until repeated: index → data
  const keep = new Set(layout.flatMap((x) => (x.kind === 'repeat' ? [x.of] : [])));
  let nonZero = 0, shared = 0;
  try {
    for (let i = 0; i < layout.length; i++) {
      const x = layout[i]!;
      let data: Buffer;
      if (x.kind === 'zero') data = zero;
      else if (x.kind === 'repeat') data = blocksA[x.of]!;
      else {
        data = crypto.randomBytes(BLOCK);
        if (keep.has(i)) blocksA[i] = data;
      }
      await a.write(data, 0, BLOCK, i * BLOCK);
      let dataB = data;
      if (x.kind !== 'zero') {
        // Every other non-zero block (by position) is shared with A, the rest is new.
        if (nonZero % 2 === 0) shared++;
        else dataB = crypto.randomBytes(BLOCK);
        nonZero++;
      }
      await b.write(dataB, 0, BLOCK, i * BLOCK);
    }
  } finally {
    await a.close();
    await b.close();
  }
  return { nonZero, shared };
}

/** Count and total bytes of `sha256-*` files anywhere under the store directory. */
async function countObjects(dir: string): Promise<{ count: number; bytes: number }> {
  let count = 0, bytes = 0;
  const walk = async (d: string): Promise<void> => {
    for (const e of await fs.readdir(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile() && e.name.startsWith('sha256-')) {
        count++;
        bytes += (await fs.stat(p)).size;
      }
    }
  };
  await walk(dir);
  return { count, bytes };
}

interface ImportJson { bytesRead: number; bytesZero: number; bytesStored: number; storedObjects: number; deduplicatedObjects: number; zeroObjects: number }

async function runImport(file: string, name: string, storeDir: string): Promise<{ r: ImportJson; ms: number }> {
  const t = performance.now();
  const { stdout } = await execFileP(process.execPath, [cli, 'import', file, name, '--store', `file:${storeDir}`, '--json'],
    { maxBuffer: 16 * MiB });
  const ms = performance.now() - t;
  return { r: JSON.parse(stdout) as ImportJson, ms };
}

const fmtInt = (n: number) => Math.round(n).toLocaleString('en-US');
const fmtMiB = (n: number) => `${fmtInt(n)} (${(n / MiB).toFixed(1)} MiB)`;

const work = await fs.mkdtemp(path.join(baseDir, 'archipelago-dedupbench-'));
let table = '';
const notes: string[] = [];
try {
  const storeDir = path.join(work, 'store');
  const fileA = path.join(work, 'a.raw');
  const fileB = path.join(work, 'b.raw');
  const layout = layoutA();
  const { nonZero, shared } = await writeImages(fileA, fileB, layout);
  const zeros = layout.filter((x) => x.kind === 'zero').length;
  const repeats = layout.filter((x) => x.kind === 'repeat').length;
  process.stderr.write(`A: ${nBlocks} blocks of 4 MiB, ${zeros} zero, ${repeats} repeats; B shares ${shared} of ${nonZero} non-zero blocks\n`);

  const steps: { label: string; file: string; name: string }[] = [
    { label: 'import A as img1', file: fileA, name: 'img1' },
    { label: 'import A again as img2', file: fileA, name: 'img2' },
    { label: 'import B as img3 (half of A\'s non-zero blocks shared)', file: fileB, name: 'img3' },
  ];
  table = '| step | bytes read | bytes newly stored | total stored bytes (sha256-* objects) | cumulative dedup ratio | import wall time (MiB/s) |\n'
    + '|---|---:|---:|---:|---:|---:|\n';
  let logical = 0;
  let prev = { count: 0, bytes: 0 };
  for (const s of steps) {
    const { r, ms } = await runImport(s.file, s.name, storeDir);
    const now = await countObjects(storeDir);
    const added = now.bytes - prev.bytes;
    logical += r.bytesRead - r.bytesZero;
    if (added !== r.bytesStored) notes.push(`${s.name}: the CLI reports bytesStored ${r.bytesStored}, the store grew by ${added} bytes.`);
    const ratio = now.bytes > 0 ? (logical / now.bytes).toFixed(3) : '-';
    const rate = (r.bytesRead / MiB) / (ms / 1000);
    table += `| ${s.label} | ${fmtMiB(r.bytesRead)} | ${fmtMiB(added)} (${now.count - prev.count} objects) | ${fmtMiB(now.bytes)} (${now.count} objects) | ${ratio} | ${(ms / 1000).toFixed(2)} s (${rate.toFixed(1)} MiB/s) |\n`;
    process.stderr.write(`${s.name}: ${JSON.stringify(r)} in ${ms.toFixed(0)} ms\n`);
    prev = now;
  }
  const expectUnique = nonZero - repeats; // A's distinct non-zero blocks
  const expectB = nonZero - shared; // B's new random blocks
  notes.push(`Expected stored objects: ${expectUnique} after img1 and img2 (A's distinct non-zero blocks), `
    + `${expectUnique + expectB} after img3 (+${expectB} new blocks of B).`);
  notes.push(`Layout: ${nBlocks} blocks of 4 MiB; ${zeros} all-zero, ${repeats} repeats of an earlier block of A; `
    + `B keeps A's zero blocks and ${shared} of its ${nonZero} non-zero blocks, the other ${nonZero - shared} are new random data.`);
} finally {
  await fs.rm(work, { recursive: true, force: true });
}

const cpus = os.cpus();
const machine = `node ${process.version}; ${cpus.length} CPUs (${cpus[0]?.model.trim() ?? 'unknown'}); ${os.type()} ${os.release()}`;
const command = `node build/bench/dedup.js --size ${sizeArg}${baseDir !== os.tmpdir() ? ` --dir ${baseDir}` : ''}`;
const out = `${table}\n${notes.map((n) => `- ${n}`).join('\n')}\n`;
process.stdout.write(out);
const doc = '# Image deduplication benchmark\n\n'
  + 'Written by `bench/dedup.ts`: `archipelago import --json` (real CLI, one process per import, '
  + 'process start included in the wall time) of a random raw image A twice, then of B, which shares '
  + 'exactly half of A\'s non-zero 4 MiB blocks, into one fresh file store. "Bytes newly stored" and "total '
  + 'stored bytes" count the `sha256-*` object files in the store directory. The cumulative dedup ratio is the '
  + 'non-zero bytes of all images imported so far divided by the stored bytes. Command:\n\n'
  + `    npm run build && ${command}\n\n`
  + `Temp store under ${baseDir}. Machine: ${machine}.\n\n`
  + out;
await fs.writeFile(path.join(root, 'docs/dedup-bench.md'), doc);
