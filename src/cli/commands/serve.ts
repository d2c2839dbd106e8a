/**
 * `archipelago serve`: the daemon. With --run CMD it is captive: it serves
 * until CMD (run by /bin/sh, with $ARCHIPELAGO_PORT and $ARCHIPELAGO_URI_BASE
 * = nbd://HOST:PORT set) exits, then stops
 * and exits with CMD's status.
 *
 * Every setting (store, listen, …) comes from its flag, else
 * $ARCHIPELAGO_<KEY>, else the config file, else its default
 * (src/daemon/config.ts); --print-config prints the result and exits.
 * Under systemd (Type=notify) READY=1 is sent once the listeners are up and
 * STOPPING=1 when a signal starts the shutdown (src/daemon/notify.ts).
 */
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import type { CommandModule } from 'yargs';
import { startDaemon } from '../../daemon/serve.js';
import { createLogger, stderrIsJournal } from '../../common/log.js';
import { formatSettings } from '../../daemon/config.js';
import { systemdNotifier } from '../../daemon/notify.js';
import { withStore, type StoreArgs } from '../common.js';

/** The flags as given (undefined: not given); the effective values are in `settings`. */
interface ServeArgs extends StoreArgs {
  run?: string;
  'print-config'?: boolean;
}

export const serve: CommandModule<object, ServeArgs> = {
  command: 'serve',
  describe: 'serve every volume of the store over NBD',
  builder: (y) => withStore(y
    // No yargs defaults: an absent flag leaves the setting to the
    // environment, the config file or the built-in default (config.ts).
    .option('listen', { type: 'string', describe: 'TCP address HOST:PORT ("" for none); default 127.0.0.1:10809' })
    .option('socket', { type: 'string', describe: 'also listen on this Unix socket' })
    .option('tls', { choices: ['off', 'on', 'require'] as const, describe: 'NBD TLS (docs/tls.md): off, on (clients may upgrade), require; default off' })
    .option('tls-certificates', { type: 'string', describe: 'TLS X.509: directory with server-cert.pem, server-key.pem, ca-cert.pem[, ca-crl.pem]' })
    .option('tls-verify-peer', { type: 'boolean', describe: 'TLS certificates: require client certificates signed by ca-cert.pem; default true' })
    .option('tls-psk-file', { type: 'string', describe: 'TLS pre-shared keys: IDENTITY:HEXKEY lines (psktool)' })
    .option('tls-allow', { type: 'string', describe: 'TLS allow-list: which client identities may open which exports (docs/tls.md)' })
    .option('admin-socket', { type: 'string', describe: 'serve the admin API (snapshots of served volumes, status) on this Unix socket, owner only' })
    .option('metrics', {
      type: 'string',
      describe: 'serve Prometheus metrics on http://HOST:PORT/metrics ("" for none; docs/metrics.md); default 127.0.0.1:9810',
    })
    .option('log-level', { choices: ['debug', 'info', 'warn', 'error'] as const, describe: 'default info' })
    .option('max-connections', { type: 'string', describe: 'default 1024' })
    .option('print-config', { type: 'boolean', describe: 'print the effective configuration (config file format, with each value\'s source) and exit' })
    .option('run', { type: 'string', describe: 'captive mode: run this shell command, stop when it exits' })
    .option('backend-timeout', {
      // A string, checked by config.ts like the file's and $ARCHIPELAGO_BACKEND_TIMEOUT's (yargs turns a bad number into null).
      type: 'string',
      describe: 'bound on one backend operation, in seconds (0: none); on RADOS also the default of the store URL\'s op_timeout; default 30',
    })
    .option('node-name', { type: 'string', describe: 'this node\'s name in volume locks; default the host name' })
    .option('lock-wait', { type: 'string', describe: 'how long a write waits for its volume\'s lock, seconds; default 30' })
    .option('lock-lease', { type: 'string', describe: 'file store: the volume lock lease, seconds; default 10' })
    .option('fault-injection', {
      type: 'boolean',
      describe: 'TESTS AND DRILLS ONLY: let the admin socket inject backend faults (archipelago faults; docs/reliability.md)',
    })) as never,
  handler: async (a) => {
    const cfg = a.settings.values;
    if (a['print-config']) {
      process.stdout.write(formatSettings(a.settings));
      return;
    }
    const log = createLogger({ level: cfg.logLevel, syslogPriority: stderrIsJournal() });
    const notifier = systemdNotifier(log.child({ component: 'systemd' }));
    log.info(`archipelago ${version()} starting`, { pid: process.pid, config: a.settings.file });
    let tcpPort: number | undefined;
    const daemon = await startDaemon({
      store: cfg.store,
      listen: cfg.listen,
      socket: cfg.socket,
      adminSocket: cfg.adminSocket,
      metrics: cfg.metrics,
      log,
      maxConnections: cfg.maxConnections,
      backendTimeout: cfg.backendTimeout,
      faultInjection: cfg.faultInjection,
      tls: { mode: cfg.tls, certificatesDir: cfg.tlsCertificates, verifyPeer: cfg.tlsVerifyPeer, pskFile: cfg.tlsPskFile, allowFile: cfg.tlsAllow },
      nodeName: cfg.nodeName || undefined,
      lockWait: cfg.lockWait,
      lockLease: cfg.lockLease,
      onFatal: () => {
        // EX_TEMPFAIL: systemd restarts us (Restart=on-failure) with a new RADOS client.
        void daemon.abort().finally(() => process.exit(75));
      },
      onReady: (addrs, { metricsPort }) => {
        tcpPort = addrs.find((x) => x.port !== undefined)?.port;
        const line = ['READY', ...(tcpPort !== undefined ? [`port=${tcpPort}`] : []), ...(cfg.socket ? [`socket=${cfg.socket}`] : []),
          ...(cfg.adminSocket ? [`admin=${cfg.adminSocket}`] : []), ...(metricsPort !== undefined ? [`metrics=${metricsPort}`] : [])].join(' ');
        // One machine-readable line for scripts and tests.
        process.stdout.write(line + '\n');
        void notifier.ready(`serving ${line.slice('READY '.length) || 'no listener'}`);
      },
    });
    let signals = 0;
    const onSignal = (sig: string) => {
      signals++;
      if (signals === 1) {
        log.info(`${sig}: stopping`);
        const told = notifier.stopping(`${sig}: draining connections, flushing volumes`);
        void daemon.stop().then(
          () => told.finally(() => process.exit(0)),
          (err) => { log.error(`shutdown: ${String(err)}`, { err }); void told.finally(() => process.exit(1)); });
      } else {
        log.warn(`${sig} again: aborting`);
        void daemon.abort().finally(() => process.exit(1));
      }
    };
    process.on('SIGTERM', () => onSignal('SIGTERM'));
    process.on('SIGINT', () => onSignal('SIGINT'));
    if (a.run) {
      const host = (cfg.listen ?? '').replace(/:\d+$/, '');
      const child = spawn('/bin/sh', ['-c', a.run], {
        stdio: 'inherit',
        env: {
          ...process.env,
          ARCHIPELAGO_PORT: tcpPort === undefined ? '' : String(tcpPort),
          ARCHIPELAGO_URI_BASE: tcpPort === undefined ? '' : `nbd://${host}:${tcpPort}`,
        },
      });
      child.on('exit', (code, signal) => {
        void daemon.stop().then(() => process.exit(code ?? (signal ? 1 : 0)));
      });
    }
  },
};

/** The package version, for the start-up line (package.json beside build/). */
function version(): string {
  try {
    const pkg = createRequire(import.meta.url)('../../../../package.json') as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}
