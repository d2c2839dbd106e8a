/**
 * How object names become file names and fan-out directories in the file
 * store (see file.ts for the layout). Pure functions.
 */
import { createHash } from 'node:crypto';

const SAFE_BYTE = new Uint8Array(256);
for (const c of 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-') SAFE_BYTE[c.charCodeAt(0)] = 1;
const HEX = '0123456789ABCDEF';
const SAFE_NAME = /^[A-Za-z0-9._-]+$/;
const ENCODED_NAME = /^(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+$/;

/** The file name of object `name`: bytes outside [A-Za-z0-9._-] become %XX; never "." or "..". */
export function encodeName(name: string): string {
  if (SAFE_NAME.test(name)) return name === '.' || name === '..' ? name.replaceAll('.', '%2E') : name;
  let out = '';
  for (const b of Buffer.from(name, 'utf8')) {
    out += SAFE_BYTE[b] ? String.fromCharCode(b) : '%' + HEX[b >> 4] + HEX[b & 15];
  }
  return out;
}

/** The object name of a file, or undefined when the file is not a canonical encoding (not ours). */
export function decodeName(file: string): string | undefined {
  if (!ENCODED_NAME.test(file)) return undefined;
  let name = file;
  if (file.includes('%')) {
    const bytes: number[] = [];
    for (let i = 0; i < file.length; i++) {
      if (file[i] === '%') {
        bytes.push(parseInt(file.slice(i + 1, i + 3), 16));
        i += 2;
      } else {
        bytes.push(file.charCodeAt(i));
      }
    }
    name = Buffer.from(bytes).toString('utf8');
  }
  return encodeName(name) === file ? name : undefined;
}

/** The fan-out directory of an object, relative to the root: 'ab/cd'. */
export function fanOutDir(name: string): string {
  const h = createHash('sha1').update(name, 'utf8').digest('hex');
  return `${h.slice(0, 2)}/${h.slice(2, 4)}`;
}

