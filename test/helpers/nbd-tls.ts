/**
 * TLS for NBD tests: the client side of NBD_OPT_STARTTLS over the raw
 * client (nbd-raw-client.ts), and credentials made by the real tools into a
 * temporary directory (certtool and psktool from gnutls-bin, as an operator
 * would make them; docs/tls.md shows the same commands).
 *
 *   const pki = await makePki(dir, ['client-a', 'client-b']);
 *   //   pki.server        server-cert.pem, server-key.pem, ca-cert.pem   (tls-certificates)
 *   //   pki.clients.X     ca-cert.pem, client-cert.pem, client-key.pem   (qemu dir=, nbdinfo tls-certificates=)
 *   //   pki.rogue         a client certificate from another CA (ca-cert.pem still trusts our server)
 *   const psk = await makePskFile(dir, ['alice', 'bob']);   // keys.psk, as QEMU's tls-creds-psk dir= wants it
 */
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import tls from 'node:tls';
import { RawClient } from './nbd-raw-client.js';
import { OPT, REP } from './nbd-encoder.js';
import { run } from './run.js';

/** Sends STARTTLS, expects ACK, runs the TLS handshake; resolves with a raw client over the TLS session. */
export async function startTls(c: RawClient, options: tls.ConnectionOptions, timeoutMs = 5000): Promise<RawClient> {
  const r = await c.option(OPT.STARTTLS);
  if (r.length !== 1 || r[0]!.type !== REP.ACK) throw new Error(`STARTTLS refused: 0x${r[0]!.type.toString(16)} ${r[0]!.data.toString()}`);
  if (c.available) throw new Error(`${c.available} unexpected bytes after the STARTTLS ACK`);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { s.destroy(); reject(new Error(`TLS handshake: no answer within ${timeoutMs} ms`)); }, timeoutMs);
    const s = tls.connect({ ...options, socket: c.socket }, () => {
      clearTimeout(timer);
      s.off('error', onError);
      resolve(RawClient.over(s));
    });
    const onError = (err: Error) => { clearTimeout(timer); s.destroy(); reject(err); };
    s.once('error', onError);
  });
}

/** Client options for a PSK session with `identity` and `key`. */
export function pskClient(identity: string, key: Buffer, extra: tls.ConnectionOptions = {}): tls.ConnectionOptions {
  return {
    pskCallback: () => ({ identity, psk: key }),
    // A PSK server has no certificate: nothing to check.
    checkServerIdentity: () => undefined,
    ciphers: 'ECDHE-PSK:PSK',
    ...extra,
  };
}

/** A keys map with fresh random 32-byte keys, as psktool would make. */
export function randomPskKeys(identities: string[]): Map<string, Buffer> {
  return new Map(identities.map((id) => [id, crypto.randomBytes(32)]));
}

async function tool(cmd: string, args: string[], cwd: string): Promise<void> {
  const r = await run(cmd, args, { cwd, timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.code}: ${r.stderr.trim()}`);
}

export interface Pki {
  /** tls-certificates for the daemon. */
  server: string;
  /** Client directories by CN, each trusting our CA. */
  clients: Record<string, string>;
  /** A client whose certificate another CA signed (its ca-cert.pem trusts both CAs, so the client itself is content). */
  rogue: string;
  /** A client directory with only ca-cert.pem (no client certificate). */
  anonymous: string;
  /** Revokes client `cn` in the server directory's ca-crl.pem. */
  revoke(cn: string): Promise<void>;
}

/** A CA, a server certificate for localhost/127.0.0.1, and client certificates with subject C=GB,O=Archipelago Test,CN=<cn>. */
export async function makePki(dir: string, clientNames: string[]): Promise<Pki> {
  await fs.mkdir(dir, { recursive: true });
  const w = (name: string, text: string) => fs.writeFile(path.join(dir, name), text);
  const key = (file: string) => tool('certtool', ['--generate-privkey', '--key-type=ecdsa', '--outfile', file], dir);
  await w('ca.info', 'cn = Archipelago Test CA\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 2\n');
  await w('rogue-ca.info', 'cn = Rogue CA\nca\ncert_signing_key\nexpiration_days = 2\n');
  await w('server.info', 'organization = Archipelago Test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n');
  await key('ca-key.pem');
  await tool('certtool', ['--generate-self-signed', '--load-privkey', 'ca-key.pem', '--template', 'ca.info', '--outfile', 'ca-cert.pem'], dir);
  const server = path.join(dir, 'server');
  await fs.mkdir(server);
  await fs.copyFile(path.join(dir, 'ca-cert.pem'), path.join(server, 'ca-cert.pem'));
  await key('server/server-key.pem');
  await fs.chmod(path.join(server, 'server-key.pem'), 0o600);
  await tool('certtool', ['--generate-certificate', '--load-ca-certificate', 'ca-cert.pem', '--load-ca-privkey', 'ca-key.pem',
    '--load-privkey', 'server/server-key.pem', '--template', 'server.info', '--outfile', 'server/server-cert.pem'], dir);

  const client = async (name: string, cn: string, caKey: string, caCert: string): Promise<string> => {
    const d = path.join(dir, name);
    await fs.mkdir(d);
    await w(`${name}.info`, `country = GB\norganization = Archipelago Test\ncn = ${cn}\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n`);
    await key(`${name}/client-key.pem`);
    await tool('certtool', ['--generate-certificate', '--load-ca-certificate', caCert, '--load-ca-privkey', caKey,
      '--load-privkey', `${name}/client-key.pem`, '--template', `${name}.info`, '--outfile', `${name}/client-cert.pem`], dir);
    await fs.copyFile(path.join(dir, 'ca-cert.pem'), path.join(d, 'ca-cert.pem'));
    return d;
  };
  const clients: Record<string, string> = {};
  for (const cn of clientNames) clients[cn] = await client(`client-${cn}`, cn, 'ca-key.pem', 'ca-cert.pem');

  await key('rogue-ca-key.pem');
  await tool('certtool', ['--generate-self-signed', '--load-privkey', 'rogue-ca-key.pem', '--template', 'rogue-ca.info', '--outfile', 'rogue-ca-cert.pem'], dir);
  const rogue = await client('rogue', clientNames[0] ?? 'rogue', 'rogue-ca-key.pem', 'rogue-ca-cert.pem');
  // QEMU checks its own certificate against its ca-cert.pem before connecting: trust both CAs there.
  await fs.writeFile(path.join(rogue, 'ca-cert.pem'), Buffer.concat([
    await fs.readFile(path.join(dir, 'ca-cert.pem')), await fs.readFile(path.join(dir, 'rogue-ca-cert.pem'))]));

  const anonymous = path.join(dir, 'anonymous');
  await fs.mkdir(anonymous);
  await fs.copyFile(path.join(dir, 'ca-cert.pem'), path.join(anonymous, 'ca-cert.pem'));

  const revoked: string[] = [];
  return {
    server, clients, rogue, anonymous,
    async revoke(cn: string) {
      revoked.push(path.join(clients[cn]!, 'client-cert.pem'));
      await w('crl.info', 'crl_next_update = 2\ncrl_number = 1\n');
      // One file holding every revoked certificate (certtool reads one --load-certificate).
      await fs.writeFile(path.join(dir, 'revoked.pem'), Buffer.concat(await Promise.all(revoked.map((c) => fs.readFile(c)))));
      await tool('certtool', ['--generate-crl', '--load-ca-privkey', 'ca-key.pem', '--load-ca-certificate', 'ca-cert.pem', '--load-certificate', 'revoked.pem',
        '--template', 'crl.info', '--outfile', path.join(server, 'ca-crl.pem')], dir);
    },
  };
}

/** psktool -u ID -p DIR/keys.psk for each identity; returns the file and the keys it holds. */
export async function makePskFile(dir: string, identities: string[]): Promise<{ file: string; keys: Map<string, Buffer> }> {
  await fs.mkdir(dir, { recursive: true });
  const file = path.join(dir, 'keys.psk');
  for (const id of identities) await tool('psktool', ['-u', id, '-p', file], dir);
  const keys = new Map<string, Buffer>();
  for (const line of (await fs.readFile(file, 'utf8')).split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) keys.set(line.slice(0, i), Buffer.from(line.slice(i + 1).trim(), 'hex'));
  }
  return { file, keys };
}
