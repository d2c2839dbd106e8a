/**
 * The config file through the compiled CLI: `serve --print-config` (exit 0,
 * the store never opened), `serve --config` serving with settings from the
 * file alone, exit 2 and one line FILE:LINE for a bad file, a missing
 * explicit --config, other commands taking `store` from --config, the
 * precedence flag > ARCHIPELAGO_STORE > file, and docs/operations.md listing
 * every setting with its default.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, childEnv } from '../../helpers/daemon.js';
import { diag, run, tempDir } from '../../helpers/run.js';
import { SETTINGS } from '../../../src/daemon/config.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', '..');

/** The environment without any ARCHIPELAGO_* setting of the caller's, and no default config file. */
function env(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const e = childEnv();
  for (const k of Object.keys(e)) if (k.startsWith('ARCHIPELAGO_')) delete e[k];
  return { ...e, ARCHIPELAGO_CONFIG: '', ...extra };
}

function cli(args: string[], extraEnv: NodeJS.ProcessEnv = {}) {
  return run(process.execPath, [CLI, ...args], { env: env(extraEnv), timeoutMs: 30_000 });
}

t.test('serve --print-config: the effective settings, exit 0, the store untouched', async (t) => {
  const dir = await tempDir(t);
  const conf = path.join(dir, 'archipelago.conf');
  // A store that cannot be opened: printing must not try.
  await fs.writeFile(conf, '# test\nstore = rados:no-such-pool?conf=/nonexistent/ceph.conf\nlisten = 127.0.0.1:0\n');
  const r = await cli(['serve', '--config', conf, '--print-config', '--metrics', ''], { ARCHIPELAGO_MAX_CONNECTIONS: '9' });
  t.equal(r.code, 0, 'exit 0', diag(r));
  t.equal(r.stderr, '', 'nothing on stderr');
  t.match(r.stdout, `# from: ${conf}:2\nstore = rados:no-such-pool?conf=/nonexistent/ceph.conf\n`);
  t.match(r.stdout, `# from: ${conf}:3\nlisten = 127.0.0.1:0\n`);
  t.match(r.stdout, '# from: command line --metrics\nmetrics = ""\n');
  t.match(r.stdout, '# from: environment ARCHIPELAGO_MAX_CONNECTIONS\nmax-connections = 9\n');
  t.match(r.stdout, '# from: built-in default\nlog-level = info\n');
});

t.test('serve --config: settings from the file alone', async (t) => {
  const dir = await tempDir(t);
  const conf = path.join(dir, 'archipelago.conf');
  const sock = path.join(dir, 'nbd.sock');
  await fs.writeFile(conf, [
    `store = file:${path.join(dir, 'store')}`, 'listen = 127.0.0.1:0', `socket = ${sock}`, 'metrics =', 'log-level = warn', '',
  ].join('\n'));
  await fs.mkdir(path.join(dir, 'store'));
  // Captive mode: serve while the command runs, which checks the Unix socket exists.
  const r = await cli(['serve', '--config', conf, '--run', `test -S ${sock} && echo "port=$ARCHIPELAGO_PORT"`]);
  t.equal(r.code, 0, 'served and stopped', diag(r));
  t.match(r.stdout, new RegExp(`^READY port=\\d+ socket=${sock}$`, 'm'), 'TCP and Unix listeners from the file, no metrics');
  t.match(r.stdout, /^port=\d+$/m, 'the command ran while it served');
});

t.test('a bad config file: exit 2, one line naming file:line', async (t) => {
  const dir = await tempDir(t);
  const conf = path.join(dir, 'bad.conf');
  for (const [text, why] of [
    ['listen = 127.0.0.1:0\nlisen = 1\n', `${conf}:2: unknown setting "lisen"; known: ${SETTINGS.map((s) => s.key).join(', ')}`],
    ['# x\n\nmax-connections = many\n', `${conf}:3: max-connections = "many": expected a whole number ≥ 1`],
  ]) {
    await fs.writeFile(conf, text!);
    for (const args of [['serve', '--config', conf], ['serve', '--config', conf, '--print-config'], ['list', '--config', conf]]) {
      const r = await cli(args);
      t.equal(r.code, 2, `${args.join(' ')}: exit 2`, diag(r));
      t.equal(r.stderr, `archipelago: ${why}\n`, 'one line');
    }
  }
  const missing = path.join(dir, 'missing.conf');
  let r = await cli(['serve', '--config', missing]);
  t.equal(r.code, 2, 'a missing --config: exit 2', diag(r));
  t.equal(r.stderr, `archipelago: config file ${missing}: no such file\n`);
  r = await cli(['list'], { ARCHIPELAGO_CONFIG: missing });
  t.equal(r.code, 2, 'a missing $ARCHIPELAGO_CONFIG: exit 2', diag(r));
  r = await cli(['serve', '--print-config'], { ARCHIPELAGO_LOG_LEVEL: 'loud' });
  t.equal(r.code, 2, 'a bad variable: exit 2', diag(r));
  t.equal(r.stderr, 'archipelago: ARCHIPELAGO_LOG_LEVEL="loud": expected one of debug, info, warn, error\n');
});

t.test('other commands take store from the config file; --store and ARCHIPELAGO_STORE win', async (t) => {
  const dir = await tempDir(t);
  const stores = { file: path.join(dir, 'a'), env: path.join(dir, 'b'), flag: path.join(dir, 'c') };
  for (const s of Object.values(stores)) await fs.mkdir(s);
  const conf = path.join(dir, 'archipelago.conf');
  await fs.writeFile(conf, `store = file:${stores.file}\n`);
  let r = await cli(['create', 'in-file', '--size', '1M', '--config', conf]);
  t.equal(r.code, 0, 'create --config', diag(r));
  r = await cli(['create', 'in-env', '--size', '1M', '--config', conf], { ARCHIPELAGO_STORE: `file:${stores.env}` });
  t.equal(r.code, 0, 'create with ARCHIPELAGO_STORE', diag(r));
  r = await cli(['create', 'in-flag', '--size', '1M', '--config', conf, '--store', `file:${stores.flag}`], { ARCHIPELAGO_STORE: `file:${stores.env}` });
  t.equal(r.code, 0, 'create --store', diag(r));
  for (const [where, name] of [['file', 'in-file'], ['env', 'in-env'], ['flag', 'in-flag']] as const) {
    r = await cli(['list', '--store', `file:${stores[where]}`]);
    t.equal(r.stdout, `${name}\n`, `${name} went to the ${where} store`, diag(r));
  }
  r = await cli(['list'], { ARCHIPELAGO_CONFIG: conf });
  t.equal(r.stdout, 'in-file\n', '$ARCHIPELAGO_CONFIG names the file too', diag(r));
});

t.test('docs/operations.md shows every setting with its default', async (t) => {
  const doc = await fs.readFile(path.join(ROOT, 'docs', 'operations.md'), 'utf8');
  const r = await cli(['serve', '--print-config']);
  t.equal(r.code, 0, diag(r));
  for (const line of r.stdout.split('\n').filter((l) => /^[a-z-]+ = /.test(l))) {
    t.ok(doc.includes(`\n${line}\n`), `the docs give the default: ${line}`);
  }
  t.equal(r.stdout.split('\n').filter((l) => /^[a-z-]+ = /.test(l)).length, SETTINGS.length, 'one line per setting');
});
