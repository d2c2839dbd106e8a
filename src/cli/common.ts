/**
 * What every command shares: the --store and --json options, opening the
 * store, printing results, and turning errors into one clear line.
 */
import type { Argv } from 'yargs';
import { openStore, DEFAULT_STORE, type Store } from '../daemon/store.js';

export interface StoreArgs {
  store: string;
}
export interface JsonArgs {
  json: boolean;
}

export function withStore<T>(y: Argv<T>): Argv<T & StoreArgs> {
  return y.option('store', {
    type: 'string',
    describe: 'object store URL: file:PATH or rados:DATA_POOL?maps=MAP_POOL&conf=CEPH_CONF&id=USER; env ARCHIPELAGO_STORE',
    default: process.env.ARCHIPELAGO_STORE ?? DEFAULT_STORE,
  }) as Argv<T & StoreArgs>;
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
