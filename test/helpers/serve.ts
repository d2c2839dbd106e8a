/**
 * Runs the NBD server on test exports, for shell harnesses and benchmarks:
 *   node build/test/helpers/serve.js [--host H] [--port P] [--socket PATH]
 *        [--memory NAME:SIZE[:ro]]... [--file NAME:PATH[:ro]]...
 * Prints `READY port=<N>` (and ` socket=<PATH>`) when listening; SIGTERM/SIGINT
 * close it gracefully.
 */
import { NbdServer } from '../../src/nbd/server.js';
import { createLogger } from '../../src/common/log.js';
import { StaticProvider, parseSize } from './exports.js';

const args = process.argv.slice(2);
let host = '127.0.0.1';
let port = 0;
let socket: string | undefined;
const provider = new StaticProvider();
for (let i = 0; i < args.length; i++) {
  const a = args[i]!;
  const v = () => { const x = args[++i]; if (x === undefined) throw new Error(`${a} needs a value`); return x; };
  if (a === '--host') host = v();
  else if (a === '--port') port = Number(v());
  else if (a === '--socket') socket = v();
  else if (a === '--memory') { const [n, s, ro] = v().split(':'); provider.addMemory(n!, parseSize(s!), ro === 'ro'); }
  else if (a === '--file') { const [n, p, ro] = v().split(':'); provider.addFile(n!, p!, ro === 'ro'); }
  else throw new Error(`unknown argument ${a}`);
}
const server = new NbdServer({ provider, log: createLogger({ level: (process.env.LOG_LEVEL as 'info') ?? 'warn' }) });
const bound = await server.listen({ host, port });
let line = `READY port=${bound.port}`;
if (socket) { await server.listen({ path: socket }); line += ` socket=${socket}`; }
process.stdout.write(line + '\n');
let stopping = false;
const stop = () => {
  if (stopping) { void server.destroy().then(() => process.exit(1)); return; }
  stopping = true;
  void server.close(5000).then(() => process.exit(0));
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
