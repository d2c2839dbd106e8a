/**
 * `npm run bench`: one entry point for the comparative benchmarks.
 *
 *   npm run bench -- [file|rados|memory|nbd] [flags of that bench]
 *
 *   file    volumes on the file store vs qemu-nbd, nbdkit-file, fio on a raw file (default)
 *   rados   volumes on RADOS vs qemu-nbd + librbd, fio's rbd engine (starts its own cluster)
 *   memory  64 volumes under load: peak RSS ≤ 200 MiB
 *   nbd     the NBD layer alone vs nbdkit memory
 */
const BENCHES: Record<string, string> = {
  file: './volume-file.js', rados: './volume-rados.js', memory: './volume-memory.js', nbd: './nbd-memory.js',
};
const which = process.argv[2] && !process.argv[2].startsWith('--') ? process.argv[2] : 'file';
const module = BENCHES[which];
if (!module) {
  process.stderr.write(`bench: unknown bench ${JSON.stringify(which)}; one of ${Object.keys(BENCHES).join(', ')}\n`);
  process.exit(2);
}
await import(module);
