/**
 * The HTTP endpoint Prometheus scrapes: GET (or HEAD) /metrics answers the
 * text exposition format (gzip when the scraper accepts it, as Prometheus
 * does); any other path is 404, any other method 405. Bound to loopback by
 * default (`archipelago serve --metrics`): the numbers name every volume.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import type { Logger } from '../common/log.js';
import type { DaemonMetrics } from './metrics.js';

const gzip = promisify(zlib.gzip);

export interface MetricsServer {
  /** The bound TCP port (useful with port 0). */
  readonly port: number;
  /** Stops listening and drops open scrape connections. Idempotent. */
  close(): Promise<void>;
}

/** Serves `metrics` on host:port; rejects when the address cannot be bound. */
export async function listenMetrics(metrics: DaemonMetrics, addr: { host: string; port: number }, log: Logger): Promise<MetricsServer> {
  const server = http.createServer((req, res) => void respond(metrics, req, res, log));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: addr.host, port: addr.port }, () => { server.off('error', reject); resolve(); });
  }).catch((err: NodeJS.ErrnoException) => {
    throw new Error(`metrics: cannot listen on ${addr.host}:${addr.port}: ${err.code ?? err.message} `
      + '(choose another with --metrics HOST:PORT, or --metrics "" for none)', { cause: err });
  });
  server.on('error', (err) => log.error(`metrics listener: ${err.message}`, { err }));
  const port = (server.address() as AddressInfo).port;
  log.info(`metrics on http://${addr.host.includes(':') ? `[${addr.host}]` : addr.host}:${port}/metrics`);
  let closing: Promise<void> | null = null;
  return {
    port,
    close: () => (closing ??= new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    })),
  };
}

async function respond(metrics: DaemonMetrics, req: http.IncomingMessage, res: http.ServerResponse, log: Logger): Promise<void> {
  const path = (req.url ?? '').split('?', 1)[0];
  if (path !== '/metrics') {
    res.writeHead(404, { 'Content-Type': 'text/plain; charset=utf-8' }).end('not found: metrics are at /metrics\n');
    return;
  }
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { Allow: 'GET, HEAD', 'Content-Type': 'text/plain; charset=utf-8' }).end('method not allowed\n');
    return;
  }
  let body: Buffer;
  const headers: http.OutgoingHttpHeaders = { 'Content-Type': metrics.contentType };
  try {
    body = Buffer.from(await metrics.scrape(), 'utf8');
    if (/\bgzip\b/.test(String(req.headers['accept-encoding'] ?? ''))) {
      body = await gzip(body);
      headers['Content-Encoding'] = 'gzip';
    }
  } catch (err) {
    log.error(`metrics: scrape failed: ${(err as Error).message}`, { err });
    res.writeHead(500, { 'Content-Type': 'text/plain; charset=utf-8' }).end('scrape failed\n');
    return;
  }
  headers['Content-Length'] = body.length;
  res.writeHead(200, headers).end(req.method === 'HEAD' ? undefined : body);
}
