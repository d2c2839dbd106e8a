/**
 * Starts the real NBD server in the test process on 127.0.0.1 (port 0) with
 * test exports, and stops it when the test ends, pass or fail.
 */
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';
import { createLogger } from '../../src/common/log.js';
import { StaticProvider } from './exports.js';

export interface TestServer {
  server: NbdServer;
  provider: StaticProvider;
  port: number;
  /** nbd://127.0.0.1:PORT/NAME */
  uri(name: string): string;
}

interface Teardown { teardown(fn: () => unknown): void }

export async function startTestServer(t: Teardown, setup: (p: StaticProvider) => void,
  options: Partial<NbdServerOptions> = {}): Promise<TestServer> {
  const provider = new StaticProvider();
  setup(provider);
  const server = new NbdServer({
    provider,
    log: createLogger({ level: (process.env.ARCHIPELAGO_TEST_LOG as 'debug') ?? 'silent' }),
    ...options,
  });
  t.teardown(() => server.destroy());
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  return { server, provider, port: port!, uri: (name) => `nbd://127.0.0.1:${port}/${name}` };
}
