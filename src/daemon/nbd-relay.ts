/**
 * The map relay: what the kernel's NBD client talks to when a volume is
 * mapped (`archipelago map`, nbd-map.ts). It serves one export — the volume —
 * with our own NBD server (src/nbd) on a Unix socket (or TCP), and forwards
 * every request to `archipelago serve` through an NbdUpstream per kernel
 * connection, which reconnects and replays when the daemon restarts. The
 * kernel sees a request take a few seconds longer, never an error.
 *
 *   nbd-client ─▶ kernel nbd ─┬─ conn 1 ─▶ NbdServer ─▶ RelayExport ─▶ NbdUpstream ─▶ daemon
 *                             └─ conn 2 ─▶    …      ─▶ RelayExport ─▶ NbdUpstream ─▶ daemon
 *
 * It advertises what the daemon advertises for the volume (size, read-only,
 * flush, FUA, trim, write zeroes, fast zero, cache, multi-conn); block
 * status is not relayed (the kernel never asks): it says "all data".
 *
 * Its life: it starts before nbd-client runs, and ends on SIGTERM (unmap)
 * or by itself once every connection has closed and its device is no longer
 * connected (someone ran `nbd-client -d` by hand).
 */
import { NbdServer } from '../nbd/server.js';
import type { Export, ExportCapabilities, ExportProvider, Extent, ReadPiece, ZeroOptions } from '../nbd/export.js';
import {
  NBD_CMD, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
} from '../nbd/constants.js';
import { silentLogger, type Logger } from '../common/log.js';
import { NbdUpstream, type UpstreamExport } from './nbd-upstream.js';
import type { Endpoint } from './nbd-map.js';

/** The daemon's largest request (src/nbd limits): the kernel sends at most 128 KiB anyway. */
const MAX_REQUEST = 32 * 1024 * 1024;

export function capabilitiesOf(flags: number): ExportCapabilities {
  return {
    flush: (flags & NBD_FLAG_SEND_FLUSH) !== 0,
    fua: (flags & NBD_FLAG_SEND_FUA) !== 0,
    trim: (flags & NBD_FLAG_SEND_TRIM) !== 0,
    zero: (flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0,
    fastZero: (flags & NBD_FLAG_SEND_FAST_ZERO) !== 0,
    cache: (flags & NBD_FLAG_SEND_CACHE) !== 0,
    multiConn: (flags & NBD_FLAG_CAN_MULTI_CONN) !== 0,
    blockStatus: false,
    rotational: (flags & NBD_FLAG_ROTATIONAL) !== 0,
  };
}

/** One kernel connection's view of the volume: every call is one upstream request. */
class RelayExport implements Export {
  readonly capabilities: ExportCapabilities;
  readonly readOnly: boolean;
  readonly size: number;
  readonly blockSize = { minimum: 1, preferred: 4096, maximum: MAX_REQUEST };

  constructor(readonly name: string, private readonly up: NbdUpstream) {
    this.size = up.info.size;
    this.readOnly = (up.info.flags & NBD_FLAG_READ_ONLY) !== 0;
    this.capabilities = capabilitiesOf(up.info.flags);
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    const data = await this.up.request(NBD_CMD.READ, 0, offset, length);
    return [{ offset, length, data }];
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    await this.up.request(NBD_CMD.WRITE, fua ? NBD_CMD_FLAG_FUA : 0, offset, data.length, data);
  }

  async flush(): Promise<void> {
    await this.up.request(NBD_CMD.FLUSH, 0, 0, 0);
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    await this.up.request(NBD_CMD.TRIM, fua ? NBD_CMD_FLAG_FUA : 0, offset, length);
  }

  async zero(offset: number, length: number, o: ZeroOptions): Promise<void> {
    const flags = (o.fua ? NBD_CMD_FLAG_FUA : 0) | (o.noHole ? NBD_CMD_FLAG_NO_HOLE : 0) | (o.fastZero ? NBD_CMD_FLAG_FAST_ZERO : 0);
    await this.up.request(NBD_CMD.WRITE_ZEROES, flags, offset, length);
  }

  /** Not relayed (the kernel never asks): everything reads as allocated data, which is always true enough. */
  async blockStatus(_offset: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 0 }];
  }

  async cache(offset: number, length: number): Promise<void> {
    if (this.capabilities.cache) await this.up.request(NBD_CMD.CACHE, 0, offset, length);
  }

  close(): Promise<void> {
    return this.up.close();
  }
}

export interface RelayOptions {
  volume: string;
  upstream: Endpoint;
  /** Where the kernel connects. */
  listen: Endpoint;
  reconnectTimeoutMs: number;
  log?: Logger;
  /** After the last kernel connection closed, wait this long for another before ending (default 1 s). */
  idleExitMs?: number;
  /**
   * Asked once the last connection has been closed for idleExitMs: true
   * keeps the relay running (its device is still connected: another
   * client came and went). Absent: the relay ends.
   */
  stillNeeded?: () => Promise<boolean>;
}

export interface Relay {
  /** What the daemon reported for the volume at start. */
  info: UpstreamExport;
  /** The bound TCP port (listen port 0), if TCP. */
  port?: number;
  /** Resolves when the relay has ended (the kernel let go, or close()). */
  done: Promise<void>;
  /** Kernel connections open now. */
  readonly connections: number;
  /** Stops listening and drops every connection. */
  close(): Promise<void>;
}

/**
 * Checks that the daemon serves the volume (fails at once if not: the map
 * must not hand the kernel a device that cannot work), then listens. The
 * first kernel connection reuses the checking connection.
 */
export async function startRelay(o: RelayOptions): Promise<Relay> {
  const log = o.log ?? silentLogger;
  const upstream = (exportName: string) => NbdUpstream.open({
    endpoint: o.upstream, exportName, reconnectTimeoutMs: o.reconnectTimeoutMs, log,
  });
  let spare: NbdUpstream | null = await upstream(o.volume);
  const info = spare.info;
  let open = 0;
  let seen = false;
  let idleTimer: NodeJS.Timeout | null = null;
  let finish!: () => void;
  const done = new Promise<void>((r) => { finish = r; });

  const provider: ExportProvider = {
    list: async () => [{ name: o.volume }],
    defaultExport: o.volume,
    open: async (name) => {
      if (name !== o.volume) return null;
      const up = spare ?? await upstream(o.volume);
      spare = null;
      return new RelayExport(o.volume, up);
    },
  };
  const server = new NbdServer({
    provider,
    log,
    // The kernel sends up to 128 KiB per request and keeps its queue depth.
    hooks: {
      exportOpened: () => {
        open++;
        seen = true;
        if (idleTimer) clearTimeout(idleTimer);
        idleTimer = null;
        return null;
      },
      exportClosed: () => {
        open--;
        if (open === 0 && seen) {
          idleTimer = setTimeout(() => {
            void (async () => {
              if (o.stillNeeded && await o.stillNeeded().catch(() => true)) return;
              if (open > 0) return;
              log.info('relay: every connection closed and the device is gone; exiting');
              void stop();
            })();
          }, o.idleExitMs ?? 1000);
        }
      },
    },
  });
  let stopping: Promise<void> | null = null;
  const stop = () => {
    stopping ??= (async () => {
      if (idleTimer) clearTimeout(idleTimer);
      spare?.destroy();
      spare = null;
      await server.close(2000);
      finish();
    })();
    return stopping;
  };
  let bound: { port?: number };
  try {
    bound = await server.listen(o.listen.kind === 'unix' ? { path: o.listen.path } : { host: o.listen.host, port: o.listen.port });
  } catch (err) {
    spare?.destroy();
    throw err;
  }
  return {
    info,
    port: bound.port,
    done,
    get connections() { return open; },
    close: stop,
  };
}
