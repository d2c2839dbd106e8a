/** Human sizes: "10G", "512M", "4096", "1.5T" (binary units, case-insensitive, optional "iB"/"B"). */

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

/** A size the user typed that is not one: a usage error (the CLI exits 2). */
export class SizeError extends Error {
  readonly code = 'ARCH_E_USAGE';
}

export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$/i.exec(text);
  if (!m) throw new SizeError(`invalid size ${JSON.stringify(text)}: expected a number with an optional K, M, G, T or P suffix`);
  const value = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(value)) throw new SizeError(`invalid size ${JSON.stringify(text)}: not a whole number of bytes below 8 PiB`);
  return value;
}

export function formatSize(bytes: number): string {
  for (const u of ['P', 'T', 'G', 'M', 'K']) {
    const n = UNITS[u]!;
    if (bytes >= n && bytes % (n / 1024) === 0) {
      const v = bytes / n;
      return `${Number.isInteger(v) ? v : v.toFixed(2)}${u}iB`;
    }
  }
  return `${bytes}B`;
}
