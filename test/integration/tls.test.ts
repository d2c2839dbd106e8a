/**
 * NBD over TLS with real clients against the `archipelago serve` daemon on a
 * file store: qemu-io and qemu-img with `--object tls-creds-x509` and
 * `tls-creds-psk`, nbdinfo and nbdcopy with `nbds://` URIs
 * (`tls-certificates=`, `tls-psk-file=`, user@ for the PSK identity),
 * nbd-client -l with certificates. Certificates and keys are made with
 * certtool and psktool (gnutls-bin), as docs/tls.md tells operators to.
 *
 * What must hold: data written over TLS reads back over TLS; tls = require
 * refuses plaintext clients; the allow-list lets an identity open its
 * exports and refuses others (by certificate CN, by DN, by PSK identity,
 * and "anonymous" for plaintext under tls = on); a client certificate from
 * an unknown CA, a server the client does not trust, a wrong key and an
 * unknown PSK identity all fail, and count as reason="tls"; a bad TLS
 * setting stops the daemon at start-up with exit status 2.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import { cli, startDaemon, tempFileStore, type Daemon } from '../helpers/daemon.js';
import { diag, randomFile, run, tempDir } from '../helpers/run.js';
import { makePki, makePskFile, type Pki } from '../helpers/nbd-tls.js';

const MiB = 1024 * 1024;

async function create(t: Test, store: string, names: string[]): Promise<void> {
  for (const name of names) {
    const r = await cli(['create', name, '--size', '16M', '--object-size', '64K', '--store', `file:${store}`]);
    t.equal(r.code, 0, `create ${name}`, diag(r.result));
  }
}

/** qemu-io on `exportName` over TLS with the credentials object `creds` (id tls0). */
function qemuIo(t: Test, d: Daemon, exportName: string, creds: string | null, commands: string[]) {
  const opts = [`driver=raw`, `file.driver=nbd`, `file.host=127.0.0.1`, `file.port=${d.port}`, `file.export=${exportName}`];
  if (creds) opts.push('file.tls-creds=tls0');
  const args = [...(creds ? ['--object', creds] : []), '--image-opts', opts.join(','), ...commands.flatMap((c) => ['-c', c])];
  return run('qemu-io', args, { t, timeoutMs: 60_000 });
}

/** An nbds:// URI (TLS required by the client) with query parameters. */
function nbds(d: Daemon, exportName: string, query: string, user = ''): string {
  return `nbds://${user ? `${user}@` : ''}127.0.0.1:${d.port}/${exportName}?${query}`;
}

async function handshakeFailures(d: Daemon, reason: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
  const m = new RegExp(`^archipelago_nbd_handshake_failures_total\\{reason="${reason}"\\} (\\d+)$`, 'm').exec(text);
  return m ? Number(m[1]) : NaN;
}

t.test('X.509, tls = require, allow-list by CN and DN: qemu-io, qemu-img, nbdinfo, nbdcopy, nbd-client', async (t) => {
  const work = await tempDir(t, 'archipelago-tls-');
  const store = await tempFileStore(t);
  await create(t, store, ['vm-a', 'vm-b', 'shared']);
  const pki: Pki = await makePki(path.join(work, 'pki'), ['client-a', 'client-b']);
  const allow = path.join(work, 'allow');
  await fs.writeFile(allow, [
    '# client-a by its CN, client-b by its whole subject',
    'version 1',
    'cn:client-a  vm-a shared',
    '"dn:CN=client-b,O=Archipelago Test,C=GB"  vm-b',
    '',
  ].join('\n'));
  const d = await startDaemon(t, { store, extraArgs: ['--tls', 'require', '--tls-certificates', pki.server, '--tls-allow', allow] });
  const credsA = `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.clients['client-a']}`;
  const credsB = `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.clients['client-b']}`;

  // Data written over TLS reads back over TLS (new connections each time).
  let r = await qemuIo(t, d, 'vm-a', credsA, ['write -P 0x5a 100k 1M', 'write -P 0xa5 5M 64k']);
  t.equal(r.code, 0, 'qemu-io writes vm-a over TLS', diag(r));
  r = await qemuIo(t, d, 'vm-a', credsA, ['read -P 0x5a 100k 1M', 'read -P 0xa5 5M 64k', 'read -P 0 0 100k']);
  t.equal(r.code, 0, 'qemu-io reads it back over TLS', diag(r));
  t.notMatch(r.stdout, /Pattern verification failed/, 'patterns verified');

  // A whole image in with qemu-img, out with nbdcopy, both over TLS.
  const image = path.join(work, 'image.raw');
  const data = await randomFile(image, 16 * MiB);
  r = await run('qemu-img', ['convert', '-n', '--object', credsB, '--target-image-opts', image,
    `driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port=${d.port},file.export=vm-b,file.tls-creds=tls0`], { t, timeoutMs: 120_000 });
  t.equal(r.code, 0, 'qemu-img convert into vm-b as client-b (DN rule)', diag(r));
  const out = path.join(work, 'out.raw');
  r = await run('nbdcopy', [nbds(d, 'vm-b', `tls-certificates=${pki.clients['client-b']}`), out], { t, timeoutMs: 120_000 });
  t.equal(r.code, 0, 'nbdcopy out of vm-b over TLS', diag(r));
  t.ok((await fs.readFile(out)).equals(data), 'the image read back is the image written');

  // nbdinfo: TLS in use; LIST shows only what the identity may open.
  r = await run('nbdinfo', ['--json', nbds(d, 'vm-a', `tls-certificates=${pki.clients['client-a']}`)], { t });
  t.equal(r.code, 0, 'nbdinfo vm-a as client-a', diag(r));
  t.equal((JSON.parse(r.stdout) as { TLS: boolean }).TLS, true, 'nbdinfo reports TLS');
  r = await run('nbdinfo', ['--list', '--json', nbds(d, '', `tls-certificates=${pki.clients['client-a']}`)], { t });
  t.equal(r.code, 0, 'nbdinfo --list as client-a', diag(r));
  t.same((JSON.parse(r.stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']).sort(), ['shared', 'vm-a']);
  r = await run('nbd-client', ['-l', '127.0.0.1', String(d.port), '-certfile', path.join(pki.clients['client-b']!, 'client-cert.pem'),
    '-keyfile', path.join(pki.clients['client-b']!, 'client-key.pem'), '-cacertfile', path.join(pki.server, 'ca-cert.pem'), '-tlshostname', 'localhost'], { t });
  t.equal(r.code, 0, 'nbd-client -l over TLS as client-b', diag(r));
  t.same(r.stdout.trim().split('\n').filter((l) => !l.startsWith('Negotiation')), ['vm-b'], 'nbd-client lists only vm-b');

  // The allow-list refuses the other exports.
  r = await qemuIo(t, d, 'vm-b', credsA, ['read 0 4k']);
  t.not(r.code, 0, 'client-a cannot open vm-b');
  t.match(r.stderr, /vm-b.*is not open to x509:CN=client-a,O=Archipelago Test,C=GB/, 'qemu shows the server\'s reason');
  r = await qemuIo(t, d, 'shared', credsB, ['read 0 4k']);
  t.not(r.code, 0, 'client-b cannot open shared');
  r = await run('nbdinfo', [nbds(d, 'vm-a', `tls-certificates=${pki.clients['client-b']}`)], { t });
  t.not(r.code, 0, 'nbdinfo: client-b cannot open vm-a');

  // Plaintext clients are refused before any export is opened.
  r = await qemuIo(t, d, 'vm-a', null, ['read 0 4k']);
  t.not(r.code, 0, 'plaintext qemu-io refused');
  t.match(r.stderr, /requires TLS/, 'qemu shows ERR_TLS_REQD\'s message');
  r = await run('nbdinfo', [d.uri('vm-a')], { t });
  t.not(r.code, 0, 'plaintext nbdinfo refused');
  r = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${d.port}`], { t });
  t.not(r.code, 0, 'plaintext nbdinfo --list refused');

  // Credentials that must fail: a client certificate of another CA, no
  // client certificate, and a client that does not trust the server.
  const before = await handshakeFailures(d, 'tls');
  r = await qemuIo(t, d, 'vm-a', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.rogue}`, ['read 0 4k']);
  t.not(r.code, 0, 'qemu-io with a certificate of an unknown CA fails', diag(r));
  r = await run('nbdinfo', [nbds(d, 'vm-a', `tls-certificates=${pki.rogue}`)], { t });
  t.not(r.code, 0, 'nbdinfo with a certificate of an unknown CA fails');
  r = await qemuIo(t, d, 'vm-a', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.anonymous}`, ['read 0 4k']);
  t.not(r.code, 0, 'qemu-io without a client certificate fails');
  const distrust = path.join(work, 'distrust');
  await fs.mkdir(distrust);
  for (const f of ['client-cert.pem', 'client-key.pem']) await fs.copyFile(path.join(pki.clients['client-a']!, f), path.join(distrust, f));
  await fs.copyFile(path.join(work, 'pki', 'rogue-ca-cert.pem'), path.join(distrust, 'ca-cert.pem'));
  r = await run('nbdinfo', [nbds(d, 'vm-a', `tls-certificates=${distrust}`)], { t });
  t.not(r.code, 0, 'a client that does not trust the server certificate fails');
  t.match(r.stderr, /certificate|verif/i, 'nbdinfo says the certificate did not verify', diag(r));
  await new Promise((res) => setTimeout(res, 300));
  t.ok(await handshakeFailures(d, 'tls') >= before + 3, 'server-side refusals count as reason="tls"');
  // gnutls clients send no certificate that the server's CA list does not name: "unknown CA" shows as "no certificate".
  t.match(d.stderr(), /TLS handshake failed: peer did not return a certificate/, 'the log says why');

  t.equal(await d.stop(), 0, 'the daemon stops cleanly');
});

t.test('PSK, tls = on, allow-list by identity and for plaintext: qemu-io, qemu-img, nbdinfo', async (t) => {
  const work = await tempDir(t, 'archipelago-tls-');
  const store = await tempFileStore(t);
  await create(t, store, ['vm-a', 'vm-b', 'iso']);
  const psk = await makePskFile(path.join(work, 'psk'), ['alice', 'bob']);
  await fs.chmod(psk.file, 0o600);
  const allow = path.join(work, 'allow');
  await fs.writeFile(allow, 'version 1\npsk:alice vm-a\npsk:bob vm-?\nanonymous iso\n');
  const d = await startDaemon(t, { store, extraArgs: ['--tls', 'on', '--tls-psk-file', psk.file, '--tls-allow', allow] });
  // QEMU's tls-creds-psk reads DIR/keys.psk and picks the line of `username`.
  const creds = (user: string, dir = path.dirname(psk.file)) => `tls-creds-psk,id=tls0,endpoint=client,dir=${dir},username=${user}`;

  let r = await qemuIo(t, d, 'vm-a', creds('alice'), ['write -P 0x33 0 2M', 'write -P 0x44 3M 4k']);
  t.equal(r.code, 0, 'qemu-io writes vm-a as alice', diag(r));
  r = await run('qemu-img', ['info', '--output=json', '--object', creds('bob'), '--image-opts',
    `driver=nbd,host=127.0.0.1,port=${d.port},export=vm-b,tls-creds=tls0`], { t });
  t.equal(r.code, 0, 'qemu-img info vm-b as bob', diag(r));
  t.equal((JSON.parse(r.stdout) as { 'virtual-size': number })['virtual-size'], 16 * MiB);
  r = await qemuIo(t, d, 'vm-a', creds('bob'), ['read -P 0x33 0 2M', 'read -P 0x44 3M 4k']);
  t.equal(r.code, 0, 'bob (vm-?) reads what alice wrote', diag(r));
  t.notMatch(r.stdout, /Pattern verification failed/);
  r = await run('nbdinfo', ['--json', nbds(d, 'vm-a', `tls-psk-file=${psk.file}`, 'alice')], { t });
  t.equal(r.code, 0, 'nbdinfo as alice', diag(r));
  t.equal((JSON.parse(r.stdout) as { TLS: boolean }).TLS, true);

  r = await qemuIo(t, d, 'vm-b', creds('alice'), ['read 0 4k']);
  t.not(r.code, 0, 'alice cannot open vm-b');
  t.match(r.stderr, /is not open to psk:alice/);
  r = await run('nbdinfo', [nbds(d, 'iso', `tls-psk-file=${psk.file}`, 'alice')], { t });
  t.not(r.code, 0, 'an identity is not "anonymous": alice cannot open iso');

  // Plaintext under tls = on: only what "anonymous" may open; the rest is TLS-only.
  r = await run('nbdinfo', ['--json', d.uri('iso')], { t });
  t.equal(r.code, 0, 'plaintext nbdinfo opens iso', diag(r));
  t.equal((JSON.parse(r.stdout) as { TLS: boolean }).TLS, false);
  r = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${d.port}`], { t });
  t.same((JSON.parse(r.stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']), ['iso'], 'plaintext LIST: iso only');
  r = await qemuIo(t, d, 'vm-a', null, ['read 0 4k']);
  t.not(r.code, 0, 'plaintext qemu-io cannot open vm-a');
  t.match(r.stderr, /requires TLS/);

  // A wrong key and an unknown identity fail the TLS handshake.
  const wrong = path.join(work, 'wrong');
  await fs.mkdir(wrong);
  await fs.writeFile(path.join(wrong, 'keys.psk'), `alice:${Buffer.alloc(32, 7).toString('hex')}\nmallory:${psk.keys.get('alice')!.toString('hex')}\n`);
  const before = await handshakeFailures(d, 'tls');
  r = await qemuIo(t, d, 'vm-a', creds('alice', wrong), ['read 0 4k']);
  t.not(r.code, 0, 'qemu-io with a wrong key fails');
  t.match(r.stderr, /TLS/, 'qemu says the TLS handshake failed', diag(r));
  r = await run('nbdinfo', [nbds(d, 'vm-a', `tls-psk-file=${path.join(wrong, 'keys.psk')}`, 'alice')], { t });
  t.not(r.code, 0, 'nbdinfo with a wrong key fails');
  r = await run('nbdinfo', [nbds(d, 'vm-a', `tls-psk-file=${path.join(wrong, 'keys.psk')}`, 'mallory')], { t });
  t.not(r.code, 0, 'nbdinfo with an unknown identity fails');
  await new Promise((res) => setTimeout(res, 300));
  t.equal(await handshakeFailures(d, 'tls'), before + 3, 'three TLS failures counted');
  t.match(d.stderr(), /unknown PSK identity \\"mallory\\"/, 'the log names the unknown identity (in JSON)');
  t.equal(await d.stop(), 0);
});

t.test('a TLS setting that cannot work stops serve at start-up with exit status 2', async (t) => {
  const work = await tempDir(t, 'archipelago-tls-');
  const store = await tempFileStore(t);
  const base = ['serve', '--store', `file:${store}`, '--listen', '127.0.0.1:0', '--metrics', ''];
  const cases: Array<[string[], RegExp]> = [
    [['--tls', 'require'], /^archipelago: tls = require needs credentials: set tls-certificates or tls-psk-file$/m],
    [['--tls', 'on', '--tls-certificates', path.join(work, 'none')], /^archipelago: tls-certificates .*none: no such file$/m],
    [['--tls', 'on', '--tls-psk-file', path.join(work, 'none.psk')], /^archipelago: tls-psk-file: .*none.psk: no such file$/m],
    [['--tls', 'maybe'], /Invalid values:[\s\S]*tls/],
  ];
  for (const [args, want] of cases) {
    const r = await cli([...base, ...args], { t, timeoutMs: 30_000 });
    t.equal(r.code, 2, `${args.join(' ')}: exit 2`, diag(r.result));
    t.match(r.stderr, want);
  }
  // The same through the config file, with the file named in --print-config.
  const conf = path.join(work, 'archipelago.conf');
  await fs.writeFile(conf, 'tls = sometimes\n');
  const r = await cli(['serve', '--config', conf, '--print-config'], { t });
  t.equal(r.code, 2);
  t.match(r.stderr, new RegExp(`${conf}:1: tls = "sometimes": expected one of off, on, require`));
});
