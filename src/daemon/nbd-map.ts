/**
 * Mapping volumes to kernel NBD devices (`archipelago map`, `unmap`,
 * `showmapped`): the nbd-client command lines, the choice of a free
 * /dev/nbdN, and the record of what is mapped where. No processes are run
 * here; the file functions take their directories as arguments so tests can
 * point them at fakes.
 *
 * How a mapping is wired (docs/operations.md, "Mapping volumes with the
 * kernel client"):
 *
 *   kernel /dev/nbdN ──(nbd-client, netlink)──▶ relay (map-relay process)
 *                                                  │  reconnects, replays
 *                                                  ▼
 *                                          archipelago serve (TCP or Unix)
 *
 * The relay (nbd-relay.ts) is there because Debian 12's nbd-client (3.24)
 * cannot survive a server restart: with netlink (its default) `-persist` is
 * ignored and no dead-connection timeout is set, so requests fail with EIO
 * once the link drops; with `-nonetlink -persist` the kernel fails requests
 * at once while the link is down and ends NBD_DO_IT with 0 on a clean close,
 * so nbd-client exits instead of reconnecting (both seen in the guest:
 * test/integration/kernel-map.test.ts). `--direct` maps without the relay.
 *
 * The record (one JSON file per device, <dir>/nbdN.json) — format 1:
 *
 *   { "format": 1,
 *     "device": "/dev/nbd0",              the kernel device
 *     "volume": "vm1-disk",               the export name
 *     "server": "unix:/run/archipelago/nbd.sock" | "tcp:127.0.0.1:10809",
 *                                         the daemon the mapping reaches
 *     "relay": { "pid": 4242, "listen": "unix:/run/archipelago-map/nbd0.sock",
 *                "reconnectTimeoutSec": 60, "log": "/run/archipelago-map/nbd0.log" } | null,
 *     "attach": ["nbd-client", "-unix", …],   the exact nbd-client argv run
 *     "connections": 2, "timeoutSec": 120, "readOnly": false,
 *     "mappedAt": "2026-01-01T00:00:00.000Z" }
 *
 * A reader refuses a format it does not know; new fields may be added
 * within a format, so readers ignore fields they do not know.
 *
 * Imports only parseListen from the daemon's settings code.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { parseListen } from './serve.js';

export const RECORD_FORMAT = 1;
/**
 * Records, relay sockets and relay logs. Not under /run/archipelago: that is
 * the daemon unit's RuntimeDirectory, which systemd empties whenever the
 * daemon stops — also for a restart, which mappings must outlive.
 */
export const DEFAULT_MAPPED_DIR = '/run/archipelago-map';
export const DEFAULT_SYS_BLOCK = '/sys/block';
/** Kernel request timeout: above the relay's reconnect window plus one bounded backend operation (30 s). */
export const DEFAULT_TIMEOUT_SEC = 120;
/** How long the relay holds requests while the daemon is away (a restart takes seconds). */
export const DEFAULT_RECONNECT_TIMEOUT_SEC = 60;
export const DEFAULT_CONNECTIONS = 2;
export const MAX_CONNECTIONS = 16;

/** A mapping problem the user can fix (exit status 2 in the CLI). */
export class MapUsageError extends Error {
  readonly code = 'ARCH_E_USAGE';
  constructor(message: string) {
    super(message);
    this.name = 'MapUsageError';
  }
}

/** Where an NBD server is: TCP host and port, or a Unix socket. */
export type Endpoint = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/** "tcp:HOST:PORT" (IPv6 in brackets) or "unix:PATH": the text form of records and logs. */
export function formatEndpoint(e: Endpoint): string {
  if (e.kind === 'unix') return `unix:${e.path}`;
  return `tcp:${e.host.includes(':') ? `[${e.host}]` : e.host}:${e.port}`;
}

/** Parses formatEndpoint's text, and also a bare HOST:PORT or an absolute path. */
export function parseEndpoint(text: string): Endpoint {
  if (text.startsWith('unix:')) return unixEndpoint(text.slice('unix:'.length));
  if (text.startsWith('/')) return unixEndpoint(text);
  const hp = text.startsWith('tcp:') ? text.slice('tcp:'.length) : text;
  let parsed: { host: string; port: number };
  try {
    parsed = parseListen(hp, 'address');
  } catch {
    throw new MapUsageError(`address ${JSON.stringify(text)}: expected HOST:PORT, tcp:HOST:PORT, unix:PATH or /PATH`);
  }
  if (parsed.port === 0) throw new MapUsageError(`address ${JSON.stringify(text)}: port 0 is not an address to connect to`);
  return { kind: 'tcp', host: parsed.host, port: parsed.port };
}

function unixEndpoint(p: string): Endpoint {
  if (!p.startsWith('/')) throw new MapUsageError(`unix socket ${JSON.stringify(p)}: give an absolute path`);
  return { kind: 'unix', path: p };
}

/**
 * The daemon's address for a client on this host, from its settings: the
 * Unix socket if it has one (no TCP on the path), else the TCP listener
 * (a wildcard listen address is reached over loopback). Null when it has
 * neither.
 */
export function daemonEndpoint(settings: { listen: string | null; socket: string | null }): Endpoint | null {
  if (settings.socket) return { kind: 'unix', path: settings.socket };
  if (settings.listen) {
    const { host, port } = parseListen(settings.listen);
    const wildcard = host === '0.0.0.0' ? '127.0.0.1' : host === '::' ? '::1' : host;
    return { kind: 'tcp', host: wildcard, port };
  }
  return null;
}

// ------------------------------------------------------------------ devices

const DEVICE = /^\/dev\/(nbd(0|[1-9]\d*))$/;

/** "/dev/nbd3" → "nbd3"; also accepts "nbd3". Throws MapUsageError otherwise. */
export function deviceName(device: string): string {
  const m = DEVICE.exec(device.startsWith('/') ? device : `/dev/${device}`);
  if (!m) throw new MapUsageError(`device ${JSON.stringify(device)}: expected /dev/nbdN`);
  return m[1]!;
}

export function isDevice(text: string): boolean {
  return DEVICE.test(text.startsWith('/') ? text : `/dev/${text}`);
}

/** What sysfs says about one NBD device. */
export interface DeviceState {
  /** /sys/block/nbdN exists (the nbd module is loaded with enough devices). */
  exists: boolean;
  /** The pid file's value: set while the device is connected. */
  pid: number | null;
  /** Size in 512-byte sectors (0: not connected). */
  sectors: number;
}

export async function deviceState(sysBlock: string, name: string): Promise<DeviceState> {
  const dir = path.join(sysBlock, name);
  try {
    await fs.stat(dir);
  } catch {
    return { exists: false, pid: null, sectors: 0 };
  }
  const pidText = await fs.readFile(path.join(dir, 'pid'), 'utf8').catch(() => null);
  const sizeText = await fs.readFile(path.join(dir, 'size'), 'utf8').catch(() => '0');
  const pid = pidText !== null && /^\d+$/.test(pidText.trim()) ? Number(pidText.trim()) : null;
  return { exists: true, pid, sectors: Number(sizeText.trim()) || 0 };
}

/** A device is in use when it has a connection or a size (nbd-client -c uses the pid file). */
export function inUse(s: DeviceState): boolean {
  return s.pid !== null || s.sectors > 0;
}

/** nbd0, nbd1, … nbd10 present in sysfs, in numeric order. */
export async function nbdDevices(sysBlock: string): Promise<string[]> {
  const names = await fs.readdir(sysBlock).catch(() => [] as string[]);
  return names.filter((n) => /^nbd(0|[1-9]\d*)$/.test(n)).sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
}

/** The first device that is neither connected nor recorded; throws when none is. */
export async function pickFreeDevice(sysBlock: string, recorded: ReadonlySet<string>): Promise<string> {
  const all = await nbdDevices(sysBlock);
  if (all.length === 0) throw new MapUsageError(`no NBD devices in ${sysBlock}: load the kernel module (modprobe nbd)`);
  for (const name of all) {
    if (recorded.has(name)) continue;
    if (!inUse(await deviceState(sysBlock, name))) return `/dev/${name}`;
  }
  throw new MapUsageError(`all ${all.length} NBD devices are in use (modprobe nbd nbds_max=N for more)`);
}

// ------------------------------------------------------------ command lines

export interface AttachOptions {
  /** nbd-client program (default "nbd-client", found on PATH). */
  nbdClient: string;
  volume: string;
  /** What nbd-client connects to: the relay, or the daemon with --direct. */
  target: Endpoint;
  device: string;
  connections: number;
  /** Kernel request timeout in seconds (NBD_ATTR_TIMEOUT). */
  timeoutSec: number;
  readOnly: boolean;
  /** Logical block size; absent: nbd-client's default (512). */
  blockSize?: number;
}

/**
 * The nbd-client argv for a mapping. Netlink (nbd-client's default) and no
 * -persist: the relay keeps the kernel's connections up across daemon
 * restarts, and 3.24 ignores -persist under netlink anyway. -C N only above
 * one connection (the kernel refuses several unless the server advertises
 * multi-conn, which ours does).
 */
export function attachArgv(o: AttachOptions): string[] {
  const argv = [o.nbdClient];
  if (o.target.kind === 'unix') argv.push('-unix', o.target.path, o.device);
  else argv.push(o.target.host, String(o.target.port), o.device);
  argv.push('-N', o.volume);
  if (o.connections > 1) argv.push('-C', String(o.connections));
  argv.push('-t', String(o.timeoutSec));
  if (o.blockSize !== undefined) argv.push('-b', String(o.blockSize));
  if (o.readOnly) argv.push('-R');
  return argv;
}

/** nbd-client -d DEVICE: flushes and disconnects (netlink or ioctl, whichever set it up). */
export function detachArgv(nbdClient: string, device: string): string[] {
  return [nbdClient, '-d', device];
}

/** A shell-safe rendering of an argv, for --dry-run and messages. */
export function shellQuote(argv: readonly string[]): string {
  return argv.map((a) => (/^[A-Za-z0-9_./:=@%+,-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

export function checkConnections(n: number): number {
  if (!Number.isInteger(n) || n < 1 || n > MAX_CONNECTIONS) throw new MapUsageError(`--connections ${n}: expected 1 to ${MAX_CONNECTIONS}`);
  return n;
}

export function checkSeconds(flag: string, n: number, min = 1): number {
  if (!Number.isInteger(n) || n < min || n > 86_400) throw new MapUsageError(`${flag} ${n}: expected whole seconds from ${min} to 86400`);
  return n;
}

// ------------------------------------------------------------------ records

export interface RelayRecord {
  pid: number;
  listen: string;
  reconnectTimeoutSec: number;
  log: string;
}

export interface MappingRecord {
  format: typeof RECORD_FORMAT;
  device: string;
  volume: string;
  server: string;
  relay: RelayRecord | null;
  attach: string[];
  connections: number;
  timeoutSec: number;
  readOnly: boolean;
  mappedAt: string;
}

export function recordPath(dir: string, device: string): string {
  return path.join(dir, `${deviceName(device)}.json`);
}

/** Where a device's relay listens by default, and where it logs. */
export function relayPaths(dir: string, device: string): { socket: string; log: string } {
  const name = deviceName(device);
  return { socket: path.join(dir, `${name}.sock`), log: path.join(dir, `${name}.log`) };
}

/** Checks a parsed record; throws Error("FILE: why") for anything else. */
export function parseRecord(text: string, file: string): MappingRecord {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new Error(`${file}: not JSON: ${(err as Error).message}`);
  }
  const r = v as Partial<MappingRecord> | null;
  if (typeof r !== 'object' || r === null) throw new Error(`${file}: not a mapping record`);
  if (r.format !== RECORD_FORMAT) throw new Error(`${file}: record format ${JSON.stringify(r.format)} is not ${RECORD_FORMAT} (written by another version of archipelago)`);
  const bad = (field: string) => new Error(`${file}: bad or missing ${field}`);
  if (typeof r.device !== 'string' || !isDevice(r.device)) throw bad('device');
  if (typeof r.volume !== 'string' || r.volume === '') throw bad('volume');
  if (typeof r.server !== 'string') throw bad('server');
  if (!Array.isArray(r.attach) || !r.attach.every((a) => typeof a === 'string')) throw bad('attach');
  if (r.relay !== null && (typeof r.relay !== 'object' || typeof r.relay?.pid !== 'number' || typeof r.relay.listen !== 'string')) throw bad('relay');
  if (typeof r.connections !== 'number' || typeof r.timeoutSec !== 'number') throw bad('connections/timeoutSec');
  if (typeof r.mappedAt !== 'string') throw bad('mappedAt');
  return { ...r, readOnly: r.readOnly === true } as MappingRecord;
}

/** Writes a record atomically (temporary file, then rename). */
export async function writeRecord(dir: string, record: MappingRecord): Promise<string> {
  await fs.mkdir(dir, { recursive: true, mode: 0o750 });
  const file = recordPath(dir, record.device);
  const tmp = `${file}.${process.pid}.tmp`;
  await fs.writeFile(tmp, JSON.stringify(record, null, 2) + '\n', { mode: 0o640 });
  await fs.rename(tmp, file);
  return file;
}

export async function readRecord(dir: string, device: string): Promise<MappingRecord | null> {
  const file = recordPath(dir, device);
  const text = await fs.readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return null;
    throw err;
  });
  return text === null ? null : parseRecord(text, file);
}

/** Every record in `dir`, by device number; unreadable ones come back as errors, not throws. */
export async function listRecords(dir: string): Promise<{ records: MappingRecord[]; errors: string[] }> {
  const names = await fs.readdir(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [] as string[];
    throw err;
  });
  const records: MappingRecord[] = [];
  const errors: string[] = [];
  for (const n of names.filter((x) => /^nbd\d+\.json$/.test(x)).sort((a, b) => Number(a.slice(3, -5)) - Number(b.slice(3, -5)))) {
    const file = path.join(dir, n);
    try {
      records.push(parseRecord(await fs.readFile(file, 'utf8'), file));
    } catch (err) {
      errors.push((err as Error).message);
    }
  }
  return { records, errors };
}

export async function removeRecord(dir: string, device: string): Promise<void> {
  await fs.rm(recordPath(dir, device), { force: true });
}
