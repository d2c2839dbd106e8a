/**
 * src/daemon/config.ts: the config file format (comments, quoting, and the
 * file:line errors for unknown keys, repeats, bad values and stray
 * comments), the precedence flag > environment > file > default with the
 * source of every value, which file is read (--config, $ARCHIPELAGO_CONFIG,
 * the default path), and --print-config's text read back as a config file.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  ConfigError, DEFAULT_CONFIG_PATH, SETTINGS, configPathOf, envName, formatSettings, parseConfigFile, readConfigFile, resolveSettings,
} from '../../../src/daemon/config.js';
import { DEFAULT_STORE } from '../../../src/daemon/store.js';

async function tmpFile(t: { teardown(fn: () => unknown): void }, text: string): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'archipelago-config-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'archipelago.conf');
  await fs.writeFile(file, text);
  return file;
}

t.test('the file: comments, blank lines, bare and quoted values', async (t) => {
  const f = parseConfigFile([
    '# a comment',
    '; another',
    '',
    '   store = file:/srv/store   ',
    'listen=[::1]:10809',
    'socket =',
    'admin-socket = "/run/a b/admin.sock"',
    'metrics = ""',
    'log-level = debug\r',
  ].join('\n'), 'x.conf');
  t.same(Object.fromEntries(f.entries), {
    store: { raw: 'file:/srv/store', line: 4 },
    listen: { raw: '[::1]:10809', line: 5 },
    socket: { raw: '', line: 6 },
    'admin-socket': { raw: '/run/a b/admin.sock', line: 7 },
    metrics: { raw: '', line: 8 },
    'log-level': { raw: 'debug', line: 9 },
  });
});

t.test('the file: every mistake is one line naming file:line', async (t) => {
  const cases: [string, RegExp][] = [
    ['listen = 127.0.0.1:1\nlisen = x\n', /^f\.conf:2: unknown setting "lisen"; known: store, listen, /],
    ['admin_socket = /x\n', /^f\.conf:1: unknown setting "admin_socket" \(did you mean admin-socket\?\)/],
    ['store = file:/a\n\nstore = file:/b\n', /^f\.conf:3: store is already set on line 1$/],
    ['listen 127.0.0.1:1\n', /^f\.conf:1: "listen 127\.0\.0\.1:1": expected "key = value"$/],
    ['[serve]\nlisten = 127.0.0.1:1\n', /^f\.conf:1: "\[serve\]": the file has no sections/],
    ['socket = /run/x.sock  # the socket\n', /^f\.conf:1: socket = \/run\/x\.sock  # the socket: comments go on their own line/],
    ['socket = "/run/x.sock\n', /^f\.conf:1: socket = "\/run\/x\.sock: a quoted value must be one JSON string/],
  ];
  for (const [text, re] of cases) {
    const err = t.throws(() => parseConfigFile(text, 'f.conf'), ConfigError, JSON.stringify(text)) as unknown as Error;
    t.match(err.message, re, JSON.stringify(text));
    t.notMatch(err.message, /\n/, 'one line');
  }
  t.doesNotThrow(() => parseConfigFile('socket = "/run/x.sock  # not a comment"\n', 'f.conf'), 'a quoted "#" is part of the value');
});

t.test('bad values: the file line, the variable or the flag is named; overridden ones are checked too', async (t) => {
  const bad: [string, string, RegExp, string][] = [
    ['listen', 'localhost', /: expected HOST:PORT$/, '127.0.0.1:1'],
    ['metrics', '127.0.0.1:99999', /: expected HOST:PORT$/, '127.0.0.1:1'],
    ['max-connections', '0', /: expected a whole number ≥ 1$/, '5'],
    ['max-connections', '12x', /: expected a whole number ≥ 1$/, '5'],
    ['log-level', 'verbose', /: expected one of debug, info, warn, error$/, 'warn'],
    ['store', 'rados:pool?bogus=1', /: unknown parameter "bogus"/, 'file:/x'],
    ['store', 'file:', /: expected file:\/path\/to\/store or rados:/, 'file:/x'],
    ['socket', '/' + 'x'.repeat(120), /: a Unix socket path is at most 107 bytes$/, '/x.sock'],
    ['backend-timeout', '-1', /: expected seconds from 0 \(no bound\) to 86400$/, '5'],
    ['backend-timeout', '90000', /: expected seconds from 0 \(no bound\) to 86400$/, '5'],
    ['fault-injection', 'maybe', /: expected true or false/, 'false'],
  ];
  const messageOf = async (p: Promise<unknown>) => {
    try {
      await p;
    } catch (err) {
      t.type(err, ConfigError);
      return (err as Error).message;
    }
    return 'no error';
  };
  for (const [key, value, why, good] of bad) {
    const file = await tmpFile(t, `# settings\n${key} = ${value}\n`);
    let m = await messageOf(resolveSettings({ flags: {}, env: {}, config: file }));
    t.ok(m.startsWith(`${file}:2: ${key} = ${JSON.stringify(value)}: `), `file ${key} = ${value}: ${m}`);
    t.match(m, why);
    m = await messageOf(resolveSettings({ flags: { [key]: good }, env: {}, config: file }));
    t.ok(m.startsWith(`${file}:2: `), `file ${key} = ${value} is refused even when a flag overrides it: ${m}`);
    m = await messageOf(resolveSettings({ flags: {}, env: { [envName(key)]: value }, config: '' }));
    t.ok(m.startsWith(`${envName(key)}=${JSON.stringify(value)}: `), `env: ${m}`);
    t.match(m, why);
    m = await messageOf(resolveSettings({ flags: { [key]: value }, env: {}, config: '' }));
    t.ok(m.startsWith(`--${key} ${JSON.stringify(value)}: `), `flag: ${m}`);
    t.match(m, why);
  }
});

t.test('defaults: every setting, and the default store', async (t) => {
  const r = await resolveSettings({ flags: {}, env: {}, config: '' });
  t.same(r.values, {
    store: DEFAULT_STORE, listen: '127.0.0.1:10809', socket: null, adminSocket: null, metrics: '127.0.0.1:9810',
    logLevel: 'info', maxConnections: 1024, backendTimeout: 30, faultInjection: false,
    nodeName: '', lockWait: 30, lockLease: 10,
    tls: 'off', tlsCertificates: null, tlsVerifyPeer: true, tlsPskFile: null, tlsAllow: null,
  });
  t.equal(r.file, null, 'no file read');
  for (const s of SETTINGS) t.same(r.sources[s.key], { kind: 'default' }, `${s.key} from the default`);
});

t.test('precedence: flag > environment > file > default, each setting on its own', async (t) => {
  const file = await tmpFile(t, [
    'store = file:/from/file',
    'listen = 127.0.0.2:1',
    'socket = /run/file.sock',
    'metrics = ""',
  ].join('\n'));
  const r = await resolveSettings({
    flags: { store: 'file:/from/flag' },
    env: { ARCHIPELAGO_STORE: 'file:/from/env', ARCHIPELAGO_LISTEN: '127.0.0.3:1', ARCHIPELAGO_MAX_CONNECTIONS: '7' },
    config: file,
  });
  t.equal(r.values.store, 'file:/from/flag', 'flag beats env and file');
  t.same(r.sources.store, { kind: 'flag' });
  t.equal(r.values.listen, '127.0.0.3:1', 'env beats file');
  t.same(r.sources.listen, { kind: 'env', name: 'ARCHIPELAGO_LISTEN' });
  t.equal(r.values.maxConnections, 7, 'env beats default');
  t.equal(r.values.socket, '/run/file.sock', 'file beats default');
  t.same(r.sources.socket, { kind: 'file', path: file, line: 3 });
  t.equal(r.values.metrics, null, 'an empty value in the file turns metrics off');
  t.equal(r.values.logLevel, 'info', 'default');
  t.same(r.sources['log-level'], { kind: 'default' });
  t.equal(r.file, file);

  const off = await resolveSettings({ flags: { listen: '', metrics: '' }, env: {}, config: '' });
  t.equal(off.values.listen, null, '--listen "" is no TCP listener');
  t.equal(off.values.metrics, null, '--metrics "" is off');
  const n = await resolveSettings({ flags: { 'max-connections': 5, 'fault-injection': true }, env: { ARCHIPELAGO_BACKEND_TIMEOUT: '2.5' }, config: '' });
  t.equal(n.values.maxConnections, 5, 'a number from yargs');
  t.equal(n.values.faultInjection, true, 'a boolean flag');
  t.equal(n.values.backendTimeout, 2.5, 'fractional seconds');
  const no = await resolveSettings({ flags: {}, env: { ARCHIPELAGO_FAULT_INJECTION: 'no' }, config: '' });
  t.equal(no.values.faultInjection, false, 'yes/no spelling');
});

t.test('which file: --config, then $ARCHIPELAGO_CONFIG, then the default (which may be missing)', async (t) => {
  t.same(configPathOf('/x.conf', { ARCHIPELAGO_CONFIG: '/y.conf' }), { path: '/x.conf', explicit: true });
  t.same(configPathOf(undefined, { ARCHIPELAGO_CONFIG: '/y.conf' }), { path: '/y.conf', explicit: true });
  t.same(configPathOf('', { ARCHIPELAGO_CONFIG: '/y.conf' }), { path: null, explicit: true }, '--config "" reads no file');
  t.same(configPathOf(undefined, { ARCHIPELAGO_CONFIG: '' }), { path: null, explicit: true });
  t.same(configPathOf(undefined, {}), { path: DEFAULT_CONFIG_PATH, explicit: false });

  const missing = path.join(os.tmpdir(), `archipelago-no-such-${process.pid}.conf`);
  t.equal(await readConfigFile(missing, false), null, 'a missing default file is no file');
  await t.rejects(readConfigFile(missing, true), { name: 'ConfigError', message: `config file ${missing}: no such file` }, 'a missing explicit file is an error');
  await t.rejects(resolveSettings({ flags: {}, env: { ARCHIPELAGO_CONFIG: missing }, config: undefined }), { message: /no such file/ });
  await t.rejects(readConfigFile(os.tmpdir(), true), { message: /is a directory/ });
});

t.test('--print-config text is a config file that gives the same settings', async (t) => {
  const file = await tmpFile(t, 'socket = /run/archipelago/nbd.sock\nadmin-socket = "/run/x y/admin.sock"\n');
  const r = await resolveSettings({ flags: { 'log-level': 'debug' }, env: { ARCHIPELAGO_METRICS: '' }, config: file });
  const text = formatSettings(r);
  t.match(text, /# from: command line --log-level\nlog-level = debug\n/);
  t.match(text, /# from: environment ARCHIPELAGO_METRICS\nmetrics = ""\n/);
  t.match(text, new RegExp(`# from: ${file}:1\\nsocket = /run/archipelago/nbd.sock\\n`));
  t.match(text, /# from: built-in default\nlisten = 127\.0\.0\.1:10809\n/);
  for (const s of SETTINGS) t.match(text, new RegExp(`^${s.key} = `, 'm'), `${s.key} is printed`);
  const again = await tmpFile(t, text);
  const r2 = await resolveSettings({ flags: {}, env: {}, config: again });
  t.same(r2.values, r.values, 'read back, the same values');
});
