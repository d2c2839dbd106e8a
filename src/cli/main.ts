#!/usr/bin/env node
/**
 * The `archipelago` command line. One module per command under commands/;
 * errors print one line "archipelago: what: why" and exit non-zero (2 for
 * usage errors, 1 for everything else).
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { serve } from './commands/serve.js';
import { create, info, list, remove, rename, resize } from './commands/volume.js';
import { clone, snapshot } from './commands/snapshot.js';

const USAGE_CODES = new Set(['ARCH_E_USAGE', 'ARCH_E_CONFIG', 'ARCH_E_BAD_NAME', 'ARCH_E_NO_VOLUME', 'ARCH_E_VOLUME_EXISTS']);

try {
  await yargs(hideBin(process.argv))
    .scriptName('archipelago')
    // A repeated flag means its last value (as in most CLIs), not an array
    // the setting code would not recognise.
    .parserConfiguration({ 'duplicate-arguments-array': false })
    .command(serve)
    .command(create)
    .command(list)
    .command(info)
    .command(remove)
    .command(rename)
    .command(resize)
    .command(snapshot)
    .command(clone)
    .command((await import('./commands/gc.js')).gc)
    .command((await import('./commands/image.js')).importImage)
    .command((await import('./commands/image.js')).exportImage)
    .command((await import('./commands/image.js')).hashImage)
    .command((await import('./commands/faults.js')).faults)
    .command((await import('./commands/map.js')).map)
    .command((await import('./commands/map.js')).unmap)
    .command((await import('./commands/map.js')).showmapped)
    .command((await import('./commands/map.js')).mapRelay)
    .command((await import('./commands/lock.js')).lock)
    .command((await import('./commands/lock.js')).unlock)
    .command((await import('./commands/lock.js')).open)
    .command((await import('./commands/lock.js')).close)
    .command((await import('./commands/lock.js')).breakLock)
    .demandCommand(1, 'name a command (see --help)')
    .strict()
    .fail((msg, err) => {
      throw err ?? Object.assign(new Error(msg), { code: 'ARCH_E_USAGE' });
    })
    .help()
    .version()
    .parseAsync();
} catch (err) {
  const e = err as Error & { code?: string };
  // Damaged metadata must read as such, whatever the decoder's detail says.
  const what = e.code === 'ARCH_E_MAP_CORRUPT' ? 'corrupt volume metadata: ' : '';
  process.stderr.write(`archipelago: ${what}${e.message}\n`);
  process.exitCode = e.code && USAGE_CODES.has(e.code) ? 2 : 1;
}
