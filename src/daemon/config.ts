/**
 * The daemon's settings: one table of every `serve` setting with its
 * built-in default, the config file that holds them, and where each
 * effective value came from.
 *
 * Precedence, highest first (each setting on its own):
 *
 *   command-line flag  ──▶  ARCHIPELAGO_<KEY> environment  ──▶  config file  ──▶  built-in default
 *
 * The config file (default /etc/archipelago/archipelago.conf; --config PATH
 * or $ARCHIPELAGO_CONFIG names another, "" none) is flat, one setting a line:
 *
 *   # a comment (only at the start of a line)
 *   store = file:/var/lib/archipelago/store
 *   listen = 127.0.0.1:10809
 *   socket = ""               # ← not allowed: no comments after a value
 *
 * Keys are the `serve` flags without "--". A value runs to the end of the
 * line, trimmed; a value in double quotes is a JSON string (for "", or
 * spaces at either end). An empty value turns an optional listener off.
 * Unknown keys, repeated keys and bad values are errors naming file:line.
 *
 * Why not JSON, INI or TOML through a library: JSON has no comments, so the
 * file could not document itself; the `ini` and TOML parsers on npm return
 * plain objects without line numbers, so "unknown key" or "bad value" could
 * not name the line, and `ini` accepts almost anything silently. The format
 * needs nothing they offer (no sections, no nesting, no types beyond a
 * string checked by each setting), and its parser is forty lines.
 *
 * Imports nothing from the CLI: `src/cli/` maps flags to `FlagValues`.
 */
import fs from 'node:fs/promises';
import { DEFAULT_STORE, parseRadosUrl } from './store.js';
import { parseListen } from './serve.js';
import { DEFAULT_BACKEND_TIMEOUT_SEC, backendTimeoutSec } from './backend.js';
import type { LogLevel } from '../common/log.js';
import { TLS_MODES, type TlsSettings } from './tls.js';

export const DEFAULT_CONFIG_PATH = '/etc/archipelago/archipelago.conf';

/** A configuration problem: exit status 2, one line naming the file and line (or the flag or variable). */
export class ConfigError extends Error {
  readonly code = 'ARCH_E_CONFIG';
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

/** The effective settings of `serve` (and `store` for every other command). */
export interface Settings {
  /** Object store URL (store.ts). */
  store: string;
  /** NBD over TCP, HOST:PORT, or null for none. */
  listen: string | null;
  /** NBD over a Unix socket, or null for none. */
  socket: string | null;
  /** NBD STARTTLS: off, on (clients may upgrade), require (they must); tls.ts. */
  tls: TlsSettings['mode'];
  /** X.509 credentials directory, or null. */
  tlsCertificates: string | null;
  /** X.509: require client certificates signed by ca-cert.pem. */
  tlsVerifyPeer: boolean;
  /** PSK keys file (psktool), or null. */
  tlsPskFile: string | null;
  /** Allow-list of client identities and export globs (tls-allow.ts), or null. */
  tlsAllow: string | null;
  /** The admin API's Unix socket, or null for none. */
  adminSocket: string | null;
  /** Prometheus endpoint HOST:PORT, or null for none. */
  metrics: string | null;
  logLevel: Exclude<LogLevel, 'silent'>;
  maxConnections: number;
  /** Bound on one backend operation, seconds (0: none); backend.ts. */
  backendTimeout: number;
  /** Let the admin socket inject backend faults (tests and drills only). */
  faultInjection: boolean;
  /** This node's name in volume locks (who holds what); '' for the host name. */
  nodeName: string;
  /** How long a write waits for a volume's lock, seconds. */
  lockWait: number;
  /** File store: the lock lease, seconds. */
  lockLease: number;
}

export type SettingKey =
  | 'tls' | 'tls-certificates' | 'tls-verify-peer' | 'tls-psk-file' | 'tls-allow'
  | 'store' | 'listen' | 'socket' | 'admin-socket' | 'metrics' | 'log-level' | 'max-connections' | 'backend-timeout' | 'fault-injection'
  | 'node-name' | 'lock-wait' | 'lock-lease';

/** Where an effective value came from. */
export type Source =
  | { kind: 'flag' }
  | { kind: 'env'; name: string }
  | { kind: 'file'; path: string; line: number }
  | { kind: 'default' };

interface SettingSpec<K extends SettingKey = SettingKey> {
  key: K;
  /** Property of Settings. */
  prop: keyof Settings;
  describe: string;
  /** The built-in default, as it would be written in the file. */
  default: string;
  /** Parses a value as written (flag, variable or file); throws Error(why). */
  parse(raw: string): Settings[keyof Settings];
  /** Writes a value back as text that parse() accepts. */
  format(value: Settings[keyof Settings]): string;
}

const UNIX_PATH_MAX = 107;

function hostPortOrNone(key: string) {
  return (raw: string): string | null => {
    if (raw === '') return null;
    parseListen(raw, `--${key}`);
    return raw;
  };
}

function pathOrNone(raw: string): string | null {
  if (raw.includes('\0')) throw new Error('a path cannot hold NUL');
  return raw === '' ? null : raw;
}

function socketPathOrNone(raw: string): string | null {
  if (raw === '') return null;
  if (Buffer.byteLength(raw) > UNIX_PATH_MAX) throw new Error(`a Unix socket path is at most ${UNIX_PATH_MAX} bytes`);
  if (raw.includes('\0')) throw new Error('a path cannot hold NUL');
  return raw;
}

/** Checks a store URL without opening it (the rules of store.ts openStore). */
function storeUrl(raw: string): string {
  if (raw.startsWith('rados:')) {
    parseRadosUrl(raw);
    return raw;
  }
  const path = raw.startsWith('file:') ? raw.slice('file:'.length) : raw;
  if (path === '' || raw.includes('://')) throw new Error('expected file:/path/to/store or rados:DATA_POOL?maps=MAP_POOL&conf=CEPH_CONF&id=USER');
  return raw;
}

const orEmpty = (v: unknown): string => (v === null ? '' : String(v));

/** Parses whole or decimal seconds in [min, max]. */
function seconds(key: string, min: number, max: number): (raw: string) => number {
  return (raw) => {
    const n = /^\d+(\.\d+)?$/.test(raw) ? Number(raw) : NaN;
    if (!(n >= min && n <= max)) throw new Error(`${key}: expected seconds from ${min} to ${max}`);
    return n;
  };
}

const TRUE = new Set(['true', 'yes', 'on', '1']);
const FALSE = new Set(['false', 'no', 'off', '0']);
function yesNo(raw: string): boolean {
  if (TRUE.has(raw)) return true;
  if (FALSE.has(raw)) return false;
  throw new Error('expected true or false (also yes/no, on/off, 1/0)');
}
const LOG_LEVELS = ['debug', 'info', 'warn', 'error'] as const;

/** Every setting, in the order the file and --print-config list them. */
export const SETTINGS: readonly SettingSpec[] = [
  {
    key: 'store', prop: 'store', default: DEFAULT_STORE, parse: storeUrl, format: orEmpty,
    describe: 'object store: file:PATH, or rados:DATA_POOL?maps=MAP_POOL&conf=CEPH_CONF&id=USER&op_timeout=SECONDS (docs/rados.md)',
  },
  {
    key: 'listen', prop: 'listen', default: '127.0.0.1:10809', parse: hostPortOrNone('listen'), format: orEmpty,
    describe: 'NBD over TCP on HOST:PORT ([::1]:PORT for IPv6); empty: no TCP listener',
  },
  {
    key: 'socket', prop: 'socket', default: '', parse: socketPathOrNone, format: orEmpty,
    describe: 'NBD over this Unix socket too (mode 0660); empty: none',
  },
  {
    key: 'tls', prop: 'tls', default: 'off', format: orEmpty,
    parse: (raw) => {
      if (!(TLS_MODES as readonly string[]).includes(raw)) throw new Error(`expected one of ${TLS_MODES.join(', ')}`);
      return raw as Settings['tls'];
    },
    describe: 'NBD TLS (STARTTLS; docs/tls.md): off, on (clients may upgrade), or require (plaintext clients are refused)',
  },
  {
    key: 'tls-certificates', prop: 'tlsCertificates', default: '', parse: pathOrNone, format: orEmpty,
    describe: 'TLS with X.509 certificates: directory holding server-cert.pem, server-key.pem, ca-cert.pem and optionally ca-crl.pem (the layout of QEMU\'s tls-creds-x509 and nbdkit\'s --tls-certificates); empty: none',
  },
  {
    key: 'tls-verify-peer', prop: 'tlsVerifyPeer', default: 'true', parse: yesNo, format: orEmpty,
    describe: 'TLS with certificates: clients must present a certificate signed by ca-cert.pem (their identity for tls-allow)',
  },
  {
    key: 'tls-psk-file', prop: 'tlsPskFile', default: '', parse: pathOrNone, format: orEmpty,
    describe: 'TLS with pre-shared keys: IDENTITY:HEXKEY lines as psktool writes them; empty: none (one of tls-certificates, tls-psk-file)',
  },
  {
    key: 'tls-allow', prop: 'tlsAllow', default: '', parse: pathOrNone, format: orEmpty,
    describe: 'TLS allow-list file: which client identities may open which exports (docs/tls.md); empty: every client every export',
  },
  {
    key: 'admin-socket', prop: 'adminSocket', default: '', parse: socketPathOrNone, format: orEmpty,
    describe: 'admin API (snapshots of served volumes, status) on this Unix socket, mode 0600; empty: none',
  },
  {
    key: 'metrics', prop: 'metrics', default: '127.0.0.1:9810', parse: hostPortOrNone('metrics'), format: orEmpty,
    describe: 'Prometheus metrics on http://HOST:PORT/metrics (docs/metrics.md); empty: off, nothing counted',
  },
  {
    key: 'log-level', prop: 'logLevel', default: 'info', format: orEmpty,
    parse: (raw) => {
      if (!(LOG_LEVELS as readonly string[]).includes(raw)) throw new Error(`expected one of ${LOG_LEVELS.join(', ')}`);
      return raw as Settings['logLevel'];
    },
    describe: 'least severe log level written to stderr: debug, info, warn or error',
  },
  {
    key: 'max-connections', prop: 'maxConnections', default: '1024', format: orEmpty,
    parse: (raw) => {
      const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
      if (!Number.isSafeInteger(n) || n < 1) throw new Error('expected a whole number ≥ 1');
      return n;
    },
    describe: 'NBD connections served at once; more are closed on arrival',
  },
  {
    key: 'backend-timeout', prop: 'backendTimeout', default: String(DEFAULT_BACKEND_TIMEOUT_SEC), format: orEmpty,
    parse: (raw) => {
      if (!/^\d+(\.\d+)?$/.test(raw)) throw new Error('expected seconds from 0 (no bound) to 86400');
      return backendTimeoutSec(Number(raw));
    },
    describe: 'bound on one backend operation, in seconds (0: none); on RADOS also the default of the store URL\'s op_timeout',
  },
  {
    key: 'node-name', prop: 'nodeName', default: '', format: orEmpty,
    parse: (raw) => {
      if (raw === '') return raw;
      if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(raw)) throw new Error('expected a host name: letters, digits, ".", "_", "-", at most 64');
      return raw;
    },
    describe: 'this node\'s name in volume locks (archipelago info shows who holds a volume); empty: the host name',
  },
  {
    key: 'lock-wait', prop: 'lockWait', default: '30', format: orEmpty,
    parse: seconds('lock-wait', 1, 3600),
    describe: 'how long a write waits for its volume\'s lock, seconds (a hand-over from another daemon, a dead holder\'s fencing); then the write fails (EIO)',
  },
  {
    key: 'lock-lease', prop: 'lockLease', default: '10', format: orEmpty,
    parse: seconds('lock-lease', 1, 600),
    describe: 'file store: the volume lock lease, seconds; a holder that cannot renew it in time stops writing, and another node may take the lock after it plus a margin (docs/locks.md)',
  },
  {
    key: 'fault-injection', prop: 'faultInjection', default: 'false', parse: yesNo, format: orEmpty,
    describe: 'TESTS AND DRILLS ONLY: let the admin socket inject backend faults (archipelago faults; docs/reliability.md)',
  },
];

const BY_KEY = new Map(SETTINGS.map((s) => [s.key as string, s]));

/** ARCHIPELAGO_ADMIN_SOCKET for admin-socket. */
export function envName(key: string): string {
  return `ARCHIPELAGO_${key.toUpperCase().replace(/-/g, '_')}`;
}

// ------------------------------------------------------------------ the file

export interface ConfigFile {
  path: string;
  entries: Map<SettingKey, { raw: string; line: number }>;
}

const LINE = /^([A-Za-z0-9_.-]+)\s*=\s*(.*)$/;

/** Parses the text of a config file; throws ConfigError "PATH:LINE: what". */
export function parseConfigFile(text: string, path: string): ConfigFile {
  const entries: ConfigFile['entries'] = new Map();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const n = i + 1;
    const bad = (why: string) => new ConfigError(`${path}:${n}: ${why}`);
    const line = lines[i]!.replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    if (line.startsWith('[')) throw bad(`${JSON.stringify(line)}: the file has no sections; write "key = value" lines`);
    const m = LINE.exec(line);
    if (!m) throw bad(`${JSON.stringify(line)}: expected "key = value"`);
    const key = m[1]!;
    const spec = BY_KEY.get(key);
    if (!spec) {
      const hint = BY_KEY.has(key.replace(/_/g, '-')) ? ` (did you mean ${key.replace(/_/g, '-')}?)` : '';
      throw bad(`unknown setting ${JSON.stringify(key)}${hint}; known: ${SETTINGS.map((s) => s.key).join(', ')}`);
    }
    const earlier = entries.get(spec.key);
    if (earlier) throw bad(`${key} is already set on line ${earlier.line}`);
    let raw = m[2]!;
    if (raw.startsWith('"')) {
      try {
        const v: unknown = JSON.parse(raw);
        if (typeof v !== 'string') throw new Error('not a string');
        raw = v;
      } catch {
        throw bad(`${key} = ${raw}: a quoted value must be one JSON string, "..." with \\" and \\\\ escaped`);
      }
    } else if (/\s[#;]/.test(raw)) {
      throw bad(`${key} = ${raw}: comments go on their own line (quote the value if "#" belongs to it)`);
    }
    entries.set(spec.key, { raw, line: n });
  }
  return { path, entries };
}

/**
 * Reads the config file: `explicit` (from --config or $ARCHIPELAGO_CONFIG)
 * must exist; the default path may be missing (then null).
 */
export async function readConfigFile(path: string, explicit: boolean): Promise<ConfigFile | null> {
  let text: string;
  try {
    text = await fs.readFile(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !explicit) return null;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'is a directory'
      : (err as Error).message;
    throw new ConfigError(`config file ${path}: ${why}`);
  }
  return parseConfigFile(text, path);
}

// -------------------------------------------------------------- resolution

/** Settings given on the command line, as typed (undefined: not given). */
export type FlagValues = Partial<Record<SettingKey, string | number | boolean | undefined>>;

export interface ResolvedSettings {
  values: Settings;
  sources: Record<SettingKey, Source>;
  /** The config file read, or null (none found, or --config ""). */
  file: string | null;
}

export interface ResolveInput {
  flags: FlagValues;
  env: NodeJS.ProcessEnv;
  /** --config as given (undefined: not given; "": read no file). */
  config?: string | undefined;
}

/** Which config file to read, and whether it must exist. */
export function configPathOf(config: string | undefined, env: NodeJS.ProcessEnv): { path: string | null; explicit: boolean } {
  if (config !== undefined) return { path: config === '' ? null : config, explicit: true };
  const fromEnv = env.ARCHIPELAGO_CONFIG;
  if (fromEnv !== undefined) return { path: fromEnv === '' ? null : fromEnv, explicit: true };
  return { path: DEFAULT_CONFIG_PATH, explicit: false };
}

/**
 * Every setting from its highest source. Every source present is checked,
 * also when a higher one overrides it, so a bad file line is never a
 * surprise for later; errors name the flag, the variable, or file:line.
 */
export async function resolveSettings(input: ResolveInput): Promise<ResolvedSettings> {
  const where = configPathOf(input.config, input.env);
  const file = where.path === null ? null : await readConfigFile(where.path, where.explicit);
  const values: Record<string, unknown> = {};
  const sources = {} as Record<SettingKey, Source>;
  for (const spec of SETTINGS) {
    const check = (raw: string, what: string) => {
      try {
        return spec.parse(raw);
      } catch (err) {
        throw new ConfigError(`${what}: ${stripFlag((err as Error).message)}`);
      }
    };
    const candidates: { raw: string; source: Source; what: string }[] = [];
    const flag = input.flags[spec.key];
    if (flag !== undefined) candidates.push({ raw: String(flag), source: { kind: 'flag' }, what: `--${spec.key} ${JSON.stringify(String(flag))}` });
    const name = envName(spec.key);
    const env = input.env[name];
    if (env !== undefined) candidates.push({ raw: env, source: { kind: 'env', name }, what: `${name}=${JSON.stringify(env)}` });
    const entry = file?.entries.get(spec.key);
    if (entry) {
      candidates.push({
        raw: entry.raw, source: { kind: 'file', path: file!.path, line: entry.line },
        what: `${file!.path}:${entry.line}: ${spec.key} = ${JSON.stringify(entry.raw)}`,
      });
    }
    const parsed = candidates.map((c) => check(c.raw, c.what));
    values[spec.prop] = parsed.length ? parsed[0] : spec.parse(spec.default);
    sources[spec.key] = candidates[0]?.source ?? { kind: 'default' };
  }
  return { values: values as unknown as Settings, sources, file: file?.path ?? null };
}

/** Validators share parseListen, whose message starts with the flag: the caller names the source instead. */
function stripFlag(message: string): string {
  return message.replace(/^--[a-z-]+ (?:"[^"]*"|\S+): /, '').replace(/^store "[^"]*": /, '');
}

/** "command line --listen", "environment ARCHIPELAGO_LISTEN", "/etc/…conf:3", "built-in default". */
export function describeSource(key: SettingKey, s: Source): string {
  switch (s.kind) {
    case 'flag': return `command line --${key}`;
    case 'env': return `environment ${s.name}`;
    case 'file': return `${s.path}:${s.line}`;
    case 'default': return 'built-in default';
  }
}

/** A value as the file writes it: bare, or quoted when it must be. */
function quote(text: string): string {
  return text === '' || text !== text.trim() || text.startsWith('"') || /\s[#;]/.test(text) ? JSON.stringify(text) : text;
}

/**
 * The effective configuration in the file's own format (so it can be saved
 * as the config file), each setting with what it does and where its value
 * came from.
 */
export function formatSettings(r: ResolvedSettings): string {
  const out = [
    '# Archipelago configuration: the effective settings of `archipelago serve`.',
    `# Config file: ${r.file ?? 'none'}. Precedence: command line > ARCHIPELAGO_<KEY>`,
    '# environment > config file > built-in default. One "key = value" a line;',
    '# "#" starts a comment line; "" is an empty value.',
  ];
  for (const spec of SETTINGS) {
    out.push('', `# ${spec.describe}`, `# from: ${describeSource(spec.key, r.sources[spec.key])}`);
    out.push(`${spec.key} = ${quote(spec.format(r.values[spec.prop]))}`);
  }
  return out.join('\n') + '\n';
}
