/**
 * `archipelago gc [--dry-run]`: one mark-and-sweep over the store
 * (src/mapper/gc.ts), printing what it freed. Safe while daemons write; a
 * corrupt header stops it before anything is deleted.
 */
import type { CommandModule } from 'yargs';
import { collectGarbage } from '../../mapper/gc.js';
import { formatSize } from '../sizes.js';
import { printJson, usingStore, withJson, withStore, type JsonArgs, type StoreArgs } from '../common.js';

type Args = { 'dry-run': boolean } & StoreArgs & JsonArgs;

export const gc: CommandModule<object, Args> = {
  command: 'gc',
  describe: 'delete objects that no volume, snapshot or clone references',
  builder: (y) => withJson(withStore(y
    .option('dry-run', { type: 'boolean', default: false, describe: 'report what would be freed, delete nothing' }))) as never,
  handler: async (a) => {
    await usingStore(a.store, async (s) => {
      const r = await collectGarbage(s.maps, { dryRun: a['dry-run'], data: s.data });
      if (a.json) {
        printJson({ dryRun: a['dry-run'], ...r });
      } else {
        const verb = a['dry-run'] ? 'would free' : 'freed';
        process.stdout.write(`gc: ${verb} ${r.sweptObjects} objects (${formatSize(r.sweptBytes)}); `
          + `${r.scannedHeaders} headers, ${r.referencedObjects} referenced objects; `
          + `kept ${r.keptYoung} young and ${r.keptNew} of new volumes\n`);
        if (r.contentKeptBecause) process.stdout.write(`gc: kept every unreferenced sha256- object: ${r.contentKeptBecause}\n`);
        for (const e of r.errors) process.stderr.write(`archipelago: gc: could not delete ${e}\n`);
      }
      if (r.errors.length > 0) process.exitCode = 1;
    });
  },
};
