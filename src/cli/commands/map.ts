/**
 * `archipelago map`, `unmap`, `showmapped`: volumes as kernel block devices
 * through nbd-client, and the record of what is mapped where
 * (src/daemon/nbd-map.ts has the command lines and the record format).
 *
 *   archipelago map VOLUME [--device /dev/nbdN] [--connections N] [--timeout S]
 *                          [--reconnect-timeout S] [--server ADDR] [--port P] [--direct] [--reuse] [--dry-run]
 *   archipelago unmap DEVICE|VOLUME [--missing-ok] [--dry-run]
 *   archipelago showmapped [--json]
 *
 * `map` starts the device's relay (the hidden `map-relay` command, a
 * detached process that keeps the kernel's connections while the daemon
 * restarts), runs nbd-client against it, waits for the device, writes the
 * record and prints the device path. `--dry-run` prints the exact nbd-client
 * command instead and starts nothing.
 *
 * Environment: ARCHIPELAGO_MAPPED_DIR (records; default /run/archipelago-map),
 * ARCHIPELAGO_NBD_CLIENT (the nbd-client program), and for tests only
 * ARCHIPELAGO_SYS_BLOCK (where the nbdN directories are; default /sys/block).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import type { CommandModule } from 'yargs';
import { validateVolumeName } from '../../mapper/names.js';
import {
  DEFAULT_CONNECTIONS, DEFAULT_MAPPED_DIR, DEFAULT_RECONNECT_TIMEOUT_SEC, DEFAULT_SYS_BLOCK, DEFAULT_TIMEOUT_SEC,
  MapUsageError, RECORD_FORMAT, attachArgv, checkConnections, checkSeconds, daemonEndpoint, detachArgv, deviceName,
  deviceState, formatEndpoint, inUse, isDevice, listRecords, parseEndpoint, pickFreeDevice, readRecord, relayPaths,
  removeRecord, shellQuote, writeRecord, type Endpoint, type MappingRecord,
} from '../../daemon/nbd-map.js';
import { startRelay } from '../../daemon/nbd-relay.js';
import { createLogger, stderrIsJournal } from '../../common/log.js';
import { printJson, withJson, withStore, type JsonArgs, type StoreArgs } from '../common.js';

const MAIN = fileURLToPath(new URL('../main.js', import.meta.url));

interface CommonArgs {
  'mapped-dir'?: string;
  'nbd-client'?: string;
  'dry-run'?: boolean;
}

function mappedDir(a: CommonArgs): string {
  return a['mapped-dir'] ?? (process.env.ARCHIPELAGO_MAPPED_DIR || DEFAULT_MAPPED_DIR);
}
function nbdClient(a: CommonArgs): string {
  return a['nbd-client'] ?? (process.env.ARCHIPELAGO_NBD_CLIENT || 'nbd-client');
}
function sysBlock(): string {
  return process.env.ARCHIPELAGO_SYS_BLOCK || DEFAULT_SYS_BLOCK;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Ran { code: number | null; out: string }

/** Runs a program to completion with a deadline; never rejects for a failure to start (code null). */
function runProgram(argv: readonly string[], timeoutMs: number): Promise<Ran> {
  return new Promise((resolve) => {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (b: Buffer) => { out += b.toString(); });
    child.stderr.on('data', (b: Buffer) => { out += b.toString(); });
    const timer = setTimeout(() => { out += `\n(killed after ${timeoutMs / 1000} s)`; child.kill('SIGKILL'); }, timeoutMs);
    child.once('error', (err) => { clearTimeout(timer); resolve({ code: null, out: err.message }); });
    child.once('close', (code) => { clearTimeout(timer); resolve({ code, out }); });
  });
}

/** The last meaningful line of a program's output, for a one-line error. */
function lastLine(out: string): string {
  const lines = out.split('\n').map((l) => l.trim()).filter((l) => l && l !== 'Exiting.');
  return lines[lines.length - 1] ?? 'no output';
}

/** True when `pid` runs our relay (a recycled pid must not be signalled). */
function isRelay(pid: number): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes('map-relay');
  } catch {
    return false;
  }
}

async function stopRelay(pid: number): Promise<void> {
  for (let i = 0; i < 30 && isRelay(pid); i++) await sleep(100); // it ends by itself once the kernel let go
  for (const [signal, waits] of [['SIGTERM', 50], ['SIGKILL', 20]] as const) {
    if (!isRelay(pid)) return;
    try { process.kill(pid, signal); } catch { return; }
    for (let i = 0; i < waits && isRelay(pid); i++) await sleep(100);
  }
}

// ------------------------------------------------------------------- map

interface MapArgs extends StoreArgs, JsonArgs, CommonArgs {
  volume: string;
  device?: string;
  connections: number;
  timeout: number;
  'reconnect-timeout': number;
  server?: string;
  port?: number;
  direct?: boolean;
  'relay-listen'?: string;
  'read-only'?: boolean;
  'block-size'?: number;
  reuse?: boolean;
}

/** --server/--port, else the daemon's own address from its settings. */
function serverOf(a: MapArgs): Endpoint {
  if (a.server !== undefined) {
    const bareHost = !a.server.startsWith('/') && !a.server.startsWith('unix:') && !/:\d+$/.test(a.server);
    if (bareHost) return parseEndpoint(`${a.server.includes(':') ? `[${a.server}]` : a.server}:${a.port ?? 10809}`);
    if (a.port !== undefined) throw new MapUsageError('--port: the --server address already names its port or socket');
    return parseEndpoint(a.server);
  }
  const own = daemonEndpoint(a.settings.values);
  if (a.port !== undefined) return { kind: 'tcp', host: own?.kind === 'tcp' ? own.host : '127.0.0.1', port: a.port };
  if (!own) throw new MapUsageError('the daemon has no listener in its settings (listen, socket): give --server');
  return own;
}

export const map: CommandModule<object, MapArgs> = {
  command: 'map <volume>',
  describe: 'attach a volume to a kernel NBD device (/dev/nbdN) through nbd-client; prints the device',
  builder: (y) => withJson(withStore(y
    .positional('volume', { type: 'string', demandOption: true })
    .option('device', { type: 'string', describe: '/dev/nbdN to use (default: the first free one)' })
    .option('connections', { type: 'number', default: DEFAULT_CONNECTIONS, describe: 'kernel connections (nbd-client -C)' })
    .option('timeout', { type: 'number', default: DEFAULT_TIMEOUT_SEC, describe: 'kernel request timeout in seconds (nbd-client -t)' })
    .option('reconnect-timeout', {
      type: 'number', default: DEFAULT_RECONNECT_TIMEOUT_SEC,
      describe: 'how long requests wait for the daemon while it restarts, in seconds (below --timeout)',
    })
    .option('server', { type: 'string', describe: 'the daemon: HOST[:PORT], unix:PATH or /PATH (default: its socket or listen setting)' })
    .option('port', { type: 'number', describe: 'the daemon\'s TCP port (with --server HOST, or instead of the listen setting\'s)' })
    .option('direct', { type: 'boolean', describe: 'no relay: nbd-client connects to the daemon itself (I/O errors while it restarts)' })
    .option('relay-listen', { type: 'string', describe: 'where the relay listens: unix:PATH (default <mapped-dir>/nbdN.sock) or HOST:PORT' })
    .option('read-only', { type: 'boolean', describe: 'a read-only device (nbd-client -R)' })
    .option('block-size', { type: 'number', describe: 'logical block size: 512, 1024, 2048 or 4096 (nbd-client -b; default 512)' })
    .option('mapped-dir', { type: 'string', describe: `mapping records (default ${DEFAULT_MAPPED_DIR}); env ARCHIPELAGO_MAPPED_DIR` })
    .option('nbd-client', { type: 'string', describe: 'the nbd-client program; env ARCHIPELAGO_NBD_CLIENT' })
    .option('reuse', { type: 'boolean', describe: 'if the volume is already mapped on a connected device, print that device and do nothing' })
    .option('dry-run', { type: 'boolean', describe: 'print the nbd-client command line and run nothing' }))) as never,
  handler: async (a) => {
    validateVolumeName(a.volume);
    if (a.reuse && !a['dry-run']) {
      const mapped = await mappedOn(mappedDir(a), a.volume);
      if (mapped) {
        if (a.json) printJson(mapped);
        else process.stdout.write(`${mapped.device}\n`);
        return;
      }
    }
    const connections = checkConnections(a.connections);
    const timeoutSec = checkSeconds('--timeout', a.timeout, 0);
    const reconnectSec = checkSeconds('--reconnect-timeout', a['reconnect-timeout']);
    if (a['block-size'] !== undefined && ![512, 1024, 2048, 4096].includes(a['block-size'])) {
      throw new MapUsageError(`--block-size ${a['block-size']}: expected 512, 1024, 2048 or 4096`);
    }
    if (!a.direct && timeoutSec !== 0 && timeoutSec <= reconnectSec) {
      throw new MapUsageError(`--timeout ${timeoutSec} must exceed --reconnect-timeout ${reconnectSec} (or be 0, no timeout): the kernel would give up first`);
    }
    const server = serverOf(a);
    const dir = mappedDir(a);
    const sys = sysBlock();
    const recorded = new Set((await listRecords(dir)).records.map((r) => deviceName(r.device)));
    for (const f of await fsp.readdir(dir).catch(() => [] as string[])) if (/^nbd\d+\.claim$/.test(f)) recorded.add(f.slice(0, -6));
    const device = a.device !== undefined ? `/dev/${deviceName(a.device)}` : await pickFreeDevice(sys, recorded);
    const paths = relayPaths(dir, device);
    const relayListen = a['relay-listen'] !== undefined ? parseEndpoint(a['relay-listen']) : { kind: 'unix' as const, path: paths.socket };
    const argv = attachArgv({
      nbdClient: nbdClient(a), volume: a.volume, target: a.direct ? server : relayListen, device,
      connections, timeoutSec, readOnly: a['read-only'] === true, blockSize: a['block-size'],
    });
    if (a['dry-run']) {
      if (a.json) {
        printJson({ device, volume: a.volume, server: formatEndpoint(server), relay: a.direct ? null : formatEndpoint(relayListen), attach: argv });
      } else {
        process.stdout.write(shellQuote(argv) + '\n');
      }
      return;
    }

    // Claim the device, so that two maps at once cannot pick the same one.
    const name = deviceName(device);
    if (recorded.has(name)) {
      const r = await readRecord(dir, device).catch(() => null);
      throw new MapUsageError(`${device} is already mapped${r ? ` (volume ${r.volume})` : ''}: unmap it first`);
    }
    const state = await deviceState(sys, name);
    if (!state.exists) throw new MapUsageError(`${device}: no such NBD device in ${sys} (modprobe nbd; nbds_max=N for more)`);
    if (inUse(state)) throw new MapUsageError(`${device} is in use by another client (nbd-client -c ${device})`);
    await fsp.mkdir(dir, { recursive: true, mode: 0o750 });
    const claim = `${dir}/${name}.claim`;
    try {
      await fsp.writeFile(claim, `${process.pid}\n`, { flag: 'wx' });
    } catch {
      throw new MapUsageError(`${device} is being mapped by another command (${claim})`);
    }
    let relayPid: number | null = null;
    try {
      if (!a.direct) relayPid = await spawnRelay(a.volume, device, server, relayListen, reconnectSec, paths.log);
      const ran = await runProgram(argv, 60_000);
      if (ran.code !== 0) throw new Error(`${shellQuote(argv)}: ${lastLine(ran.out)}`);
      await waitForDevice(sys, name, device);
      const record: MappingRecord = {
        format: RECORD_FORMAT, device, volume: a.volume, server: formatEndpoint(server),
        relay: relayPid === null ? null : { pid: relayPid, listen: formatEndpoint(relayListen), reconnectTimeoutSec: reconnectSec, log: paths.log },
        attach: argv, connections, timeoutSec, readOnly: a['read-only'] === true, mappedAt: new Date().toISOString(),
      };
      await writeRecord(dir, record);
      relayPid = null;
      if (a.json) printJson(record);
      else process.stdout.write(`${device}\n`);
    } finally {
      if (relayPid !== null) await stopRelay(relayPid);
      await fsp.rm(claim, { force: true });
    }
  },
};

/** The record of a working mapping of `volume` (device connected, relay running if it has one), or null. */
async function mappedOn(dir: string, volume: string): Promise<MappingRecord | null> {
  for (const r of (await listRecords(dir)).records) {
    if (r.volume !== volume) continue;
    if (inUse(await deviceState(sysBlock(), deviceName(r.device))) && (!r.relay || isRelay(r.relay.pid))) return r;
  }
  return null;
}

/** Starts the relay detached (it outlives this command) and waits for its READY line. */
async function spawnRelay(volume: string, device: string, server: Endpoint, listen: Endpoint, reconnectSec: number, logFile: string): Promise<number> {
  const log = fs.openSync(logFile, 'a', 0o640);
  const child = spawn(process.execPath, [MAIN, 'map-relay', volume, '--device', device, '--upstream', formatEndpoint(server),
    '--listen', formatEndpoint(listen), '--reconnect-timeout', String(reconnectSec)], {
    detached: true, stdio: ['ignore', 'pipe', log], env: { ...process.env, NODE_OPTIONS: '' },
  });
  fs.closeSync(log);
  const pid = child.pid;
  if (pid === undefined) throw new Error('map: cannot start the relay');
  try {
    await new Promise<void>((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`map: the relay did not start within 30 s (log: ${logFile})`)), 30_000);
      child.stdout!.setEncoding('utf8').on('data', (s: string) => {
        out += s;
        if (/^READY\b/m.test(out)) { clearTimeout(timer); resolve(); }
      });
      child.once('exit', () => {
        clearTimeout(timer);
        const why = fs.readFileSync(logFile, 'utf8').trim().split('\n').reverse()
          .map((l) => { try { return (JSON.parse(l) as { msg?: string }).msg; } catch { return l; } })
          .find((m) => m) ?? 'no reason logged';
        reject(new Error(`map: ${why}`));
      });
    });
  } catch (err) {
    try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
    throw err;
  }
  child.stdout!.destroy();
  child.removeAllListeners('exit');
  child.unref();
  return pid;
}

/** nbd-client returns once the kernel has the device; wait a little for sysfs to say so. */
async function waitForDevice(sys: string, name: string, device: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const s = await deviceState(sys, name);
    if (s.sectors > 0) return;
    await sleep(100);
  }
  throw new Error(`${device}: nbd-client succeeded but the device has no size after 10 s`);
}

// ----------------------------------------------------------------- unmap

interface UnmapArgs extends JsonArgs, CommonArgs {
  target: string;
  'missing-ok'?: boolean;
}

export const unmap: CommandModule<object, UnmapArgs> = {
  command: 'unmap <target>',
  describe: 'detach a mapped device (DEVICE or VOLUME): flushes, disconnects, stops its relay, removes the record',
  builder: (y) => withJson(y
    .positional('target', { type: 'string', demandOption: true, describe: '/dev/nbdN, or the volume mapped on one device' })
    .option('mapped-dir', { type: 'string', describe: `mapping records (default ${DEFAULT_MAPPED_DIR}); env ARCHIPELAGO_MAPPED_DIR` })
    .option('nbd-client', { type: 'string', describe: 'the nbd-client program; env ARCHIPELAGO_NBD_CLIENT' })
    .option('missing-ok', { type: 'boolean', describe: 'nothing mapped there is not an error (for scripts that must be idempotent)' })
    .option('dry-run', { type: 'boolean', describe: 'print the nbd-client command line and run nothing' })) as never,
  handler: async (a) => {
    const dir = mappedDir(a);
    let device: string;
    let record: MappingRecord | null;
    if (isDevice(a.target)) {
      device = `/dev/${deviceName(a.target)}`;
      record = await readRecord(dir, device);
    } else {
      validateVolumeName(a.target);
      const found = (await listRecords(dir)).records.filter((r) => r.volume === a.target);
      if (found.length === 0 && a['missing-ok']) return;
      if (found.length === 0) throw new MapUsageError(`volume ${a.target} is not mapped (archipelago showmapped)`);
      if (found.length > 1) throw new MapUsageError(`volume ${a.target} is mapped on ${found.map((r) => r.device).join(', ')}: name the device`);
      record = found[0]!;
      device = record.device;
    }
    const argv = detachArgv(nbdClient(a), device);
    if (a['dry-run']) {
      process.stdout.write(shellQuote(argv) + '\n');
      return;
    }
    const name = deviceName(device);
    const sys = sysBlock();
    const before = await deviceState(sys, name);
    let note = '';
    if (inUse(before)) {
      const ran = await runProgram(argv, 120_000);
      if (ran.code !== 0) throw new Error(`${shellQuote(argv)}: ${lastLine(ran.out)}`);
      for (let i = 0; i < 100 && inUse(await deviceState(sys, name)); i++) await sleep(100);
      if (inUse(await deviceState(sys, name))) throw new Error(`${device}: still connected 10 s after ${shellQuote(argv)}`);
    } else {
      if (!record && a['missing-ok']) return;
      if (!record) throw new MapUsageError(`${device} is neither connected nor mapped by archipelago`);
      note = ' (it was no longer connected)';
    }
    if (record?.relay) await stopRelay(record.relay.pid);
    if (record) {
      await removeRecord(dir, device);
      await fsp.rm(relayPaths(dir, device).log, { force: true });
    }
    if (a.json) printJson({ device, volume: record?.volume ?? null, recordRemoved: record !== null });
    else process.stdout.write(`unmapped ${device}${record ? ` (volume ${record.volume})` : ''}${note}\n`);
  },
};

// ------------------------------------------------------------ showmapped

interface ShowArgs extends JsonArgs, CommonArgs {}

export const showmapped: CommandModule<object, ShowArgs> = {
  command: 'showmapped',
  describe: 'list mapped devices, and say which records no longer match a connected device',
  builder: (y) => withJson(y
    .option('mapped-dir', { type: 'string', describe: `mapping records (default ${DEFAULT_MAPPED_DIR}); env ARCHIPELAGO_MAPPED_DIR` })) as never,
  handler: async (a) => {
    const { records, errors } = await listRecords(mappedDir(a));
    const rows = [];
    for (const r of records) {
      const s = await deviceState(sysBlock(), deviceName(r.device));
      const relayRunning = r.relay ? isRelay(r.relay.pid) : null;
      const state = !inUse(s) ? 'not connected' : relayRunning === false ? 'relay not running' : 'connected';
      rows.push({ ...r, state, connected: inUse(s), relayRunning, sizeBytes: s.sectors * 512 });
    }
    if (a.json) {
      printJson(rows);
    } else {
      if (rows.length === 0) process.stdout.write('no mapped devices\n');
      for (const r of rows) {
        const hint = r.state === 'not connected' ? ` (stale record: archipelago unmap ${r.device} removes it)`
          : r.state === 'relay not running' ? ' (I/O fails: unmap, then map again)' : '';
        process.stdout.write(`${r.device}  ${r.volume}  ${r.server}${r.relay ? '  via relay' : '  direct'}  ${r.state}${hint}\n`);
      }
    }
    for (const e of errors) process.stderr.write(`archipelago: showmapped: ${e}\n`);
    if (errors.length) process.exitCode = 1;
  },
};

// ------------------------------------------------------------- map-relay

interface RelayArgs {
  volume: string;
  device: string;
  upstream: string;
  listen: string;
  'reconnect-timeout': number;
}

/** The relay process `map` starts (not for people: no help entry). */
export const mapRelay: CommandModule<object, RelayArgs> = {
  command: 'map-relay <volume>',
  describe: false,
  builder: (y) => y
    .positional('volume', { type: 'string', demandOption: true })
    .option('device', { type: 'string', demandOption: true })
    .option('upstream', { type: 'string', demandOption: true })
    .option('listen', { type: 'string', demandOption: true })
    .option('reconnect-timeout', { type: 'number', default: DEFAULT_RECONNECT_TIMEOUT_SEC }) as never,
  handler: async (a) => {
    const log = createLogger({ level: 'info', syslogPriority: stderrIsJournal() }, { component: 'map-relay', volume: a.volume });
    const relay = await startRelay({
      volume: a.volume, upstream: parseEndpoint(a.upstream), listen: parseEndpoint(a.listen),
      reconnectTimeoutMs: a['reconnect-timeout'] * 1000, log,
      stillNeeded: async () => inUse(await deviceState(sysBlock(), deviceName(a.device))),
    });
    log.info(`relay for ${a.volume} up: ${a.listen} → ${a.upstream} (${relay.info.size} bytes)`);
    const stop = (signal: string) => { log.info(`${signal}: stopping`); void relay.close(); };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
    process.stdout.on('error', () => { /* map closed its end after READY */ });
    process.stdout.write(`READY${relay.port !== undefined ? ` port=${relay.port}` : ''}\n`);
    await relay.done;
    log.info('relay stopped');
  },
};
