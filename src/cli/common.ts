/**
 * What every command shares: the --store, --config and --json options,
 * opening the store, printing results, and turning errors into one clear line.
 */
import type { Argv } from 'yargs';
import { openStore, DEFAULT_STORE, type Store } from '../daemon/store.js';
import { DEFAULT_CONFIG_PATH, SETTINGS, resolveSettings, type FlagValues, type ResolvedSettings } from '../daemon/config.js';

export interface StoreArgs {
  /** The effective store URL: --store, $ARCHIPELAGO_STORE, the config file, or the default. */
  store: string;
  config?: string;
  /** Every setting with its source (src/daemon/config.ts), resolved before the handler runs. */
  settings: ResolvedSettings;
}
export interface JsonArgs {
  json: boolean;
}

/**
 * Adds --store and --config, and resolves the settings (flag > environment >
 * config file > default) before the command's handler runs, so that
 * handlers read `store` (and serve reads `settings`) already decided. A bad
 * config file fails every command that uses it, with file:line.
 */
export function withStore<T>(y: Argv<T>): Argv<T & StoreArgs> {
  return y
    .option('store', {
      type: 'string',
      describe: `object store URL: file:PATH or rados:DATA_POOL?maps=MAP_POOL&conf=CEPH_CONF&id=USER; env ARCHIPELAGO_STORE; default ${DEFAULT_STORE}`,
    })
    .option('config', {
      type: 'string',
      describe: `config file (default ${DEFAULT_CONFIG_PATH}, if it exists; "" for none); env ARCHIPELAGO_CONFIG`,
    })
    .middleware(async (argv) => {
      const a = argv as Record<string, unknown>;
      const flags: FlagValues = {};
      for (const s of SETTINGS) {
        const v = a[s.key];
        if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') flags[s.key] = v;
      }
      const settings = await resolveSettings({ flags, env: process.env, config: a.config as string | undefined });
      a.settings = settings;
      a.store = settings.values.store;
    }) as unknown as Argv<T & StoreArgs>;
}

export function withJson<T>(y: Argv<T>): Argv<T & JsonArgs> {
  return y.option('json', { type: 'boolean', default: false, describe: 'print JSON' }) as Argv<T & JsonArgs>;
}

/** Runs `fn` with the store open, closing it afterwards. */
export async function usingStore<R>(url: string, fn: (store: Store) => Promise<R>): Promise<R> {
  const store = await openStore(url);
  try {
    return await fn(store);
  } finally {
    await store.close();
  }
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}
