/**
 * `archipelago serve`: the daemon. With --run CMD it is captive: it serves
 * until CMD (run by /bin/sh, with $ARCHIPELAGO_PORT and $ARCHIPELAGO_URI_BASE
 * = nbd://HOST:PORT set) exits, then stops
 * and exits with CMD's status.
 */
import { spawn } from 'node:child_process';
import type { CommandModule } from 'yargs';
import { startDaemon } from '../../daemon/serve.js';
import { createLogger, type LogLevel } from '../../common/log.js';
import { withStore, type StoreArgs } from '../common.js';

interface ServeArgs extends StoreArgs {
  listen: string;
  socket?: string;
  'admin-socket'?: string;
  metrics: string;
  'log-level': LogLevel;
  'max-connections': number;
  run?: string;
}

export const serve: CommandModule<object, ServeArgs> = {
  command: 'serve',
  describe: 'serve every volume of the store over NBD',
  builder: (y) => withStore(y
    .option('listen', { type: 'string', default: '127.0.0.1:10809', describe: 'TCP address HOST:PORT ("" for none)' })
    .option('socket', { type: 'string', describe: 'also listen on this Unix socket' })
    .option('admin-socket', { type: 'string', describe: 'serve the admin API (snapshots of served volumes, status) on this Unix socket, owner only' })
    .option('metrics', {
      type: 'string', default: '127.0.0.1:9810',
      describe: 'serve Prometheus metrics on http://HOST:PORT/metrics ("" for none; docs/metrics.md)',
    })
    .option('log-level', { choices: ['debug', 'info', 'warn', 'error'] as const, default: 'info' as const })
    .option('max-connections', { type: 'number', default: 1024 })
    .option('run', { type: 'string', describe: 'captive mode: run this shell command, stop when it exits' })) as never,
  handler: async (a) => {
    const log = createLogger({ level: a['log-level'] });
    let tcpPort: number | undefined;
    const daemon = await startDaemon({
      store: a.store,
      listen: a.listen === '' ? null : a.listen,
      socket: a.socket ?? null,
      adminSocket: a['admin-socket'] || null,
      metrics: a.metrics === '' ? null : a.metrics,
      log,
      maxConnections: a['max-connections'],
      onReady: (addrs, { metricsPort }) => {
        tcpPort = addrs.find((x) => x.port !== undefined)?.port;
        const line = ['READY', ...(tcpPort !== undefined ? [`port=${tcpPort}`] : []), ...(a.socket ? [`socket=${a.socket}`] : []),
          ...(a['admin-socket'] ? [`admin=${a['admin-socket']}`] : []), ...(metricsPort !== undefined ? [`metrics=${metricsPort}`] : [])].join(' ');
        // One machine-readable line for scripts and tests.
        process.stdout.write(line + '\n');
      },
    });
    let signals = 0;
    const onSignal = (sig: string) => {
      signals++;
      if (signals === 1) {
        log.info(`${sig}: stopping`);
        void daemon.stop().then(() => process.exit(0), (err) => { log.error(`shutdown: ${String(err)}`); process.exit(1); });
      } else {
        log.warn(`${sig} again: aborting`);
        void daemon.abort().finally(() => process.exit(1));
      }
    };
    process.on('SIGTERM', () => onSignal('SIGTERM'));
    process.on('SIGINT', () => onSignal('SIGINT'));
    if (a.run) {
      const host = a.listen.replace(/:\d+$/, '');
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
