/**
 * The layers of DESIGN.md §2 import only downwards, and the NBD wire modules
 * do no I/O (STYLE.md habit 1). Reads the TypeScript sources, so a wrong
 * import fails here before it can grow roots.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const src = path.join(root, 'src');

/** Which src/ folders each folder may import from (besides itself). */
const ALLOWED: Record<string, string[]> = {
  common: [],
  blockers: ['common'],
  locks: ['blockers', 'common'],
  mapper: ['locks', 'blockers', 'common'],
  compose: ['mapper', 'locks', 'blockers', 'common'],
  nbd: ['common'],
  daemon: ['nbd', 'compose', 'mapper', 'locks', 'blockers', 'common'],
  cli: ['daemon', 'nbd', 'compose', 'mapper', 'locks', 'blockers', 'common'],
};

function sources(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((d) =>
    d.isDirectory() ? sources(path.join(dir, d.name)) : d.name.endsWith('.ts') ? [path.join(dir, d.name)] : []);
}

function importsOf(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  return [...text.matchAll(/^\s*(?:import|export)\b[^'"]*?from\s+['"]([^'"]+)['"]/gm)].map((m) => m[1]!);
}

t.test('layers import only downwards', async (t) => {
  const files = sources(src);
  t.ok(files.length > 20, `found ${files.length} source files`);
  for (const file of files) {
    const layer = path.relative(src, file).split(path.sep)[0]!;
    t.ok(layer in ALLOWED, `${path.relative(root, file)}: folder ${layer} is a known layer`);
    for (const spec of importsOf(file)) {
      if (!spec.startsWith('.')) continue;
      const target = path.relative(src, path.resolve(path.dirname(file), spec)).split(path.sep)[0]!;
      if (target === layer) continue;
      t.ok(ALLOWED[layer]?.includes(target), `${path.relative(root, file)} imports ${spec} (${layer} → ${target})`);
    }
  }
});

t.test('NBD constants and wire format do no I/O', async (t) => {
  for (const f of ['constants.ts', 'wire.ts']) {
    const bad = importsOf(path.join(src, 'nbd', f)).filter((s) => /^(node:)?(net|tls|fs|fs\/promises|dgram|child_process)$/.test(s));
    t.same(bad, [], `src/nbd/${f} imports no I/O module`);
  }
});
