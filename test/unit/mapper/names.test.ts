/**
 * src/mapper/names.ts: the volume-name rules (a table of good and bad names,
 * path traversal included) and the object-name builders and parsers.
 */
import t from 'tap';
import { InvalidNameError, UsageError } from '../../../src/mapper/errors.js';
import {
  chunkObjectName, dataObjectName, headerObjectName, isValidVolumeName, isVolumeId,
  parseChunkObjectName, parseDataObjectName, parseHeaderObjectName, validateVolumeName,
} from '../../../src/mapper/names.js';

const GOOD = [
  'a', 'A', '0', 'vm-disk-1', 'vm_disk.1', 'Debian12.img', 'a.b.c', 'x-', 'x_', '9lives',
  'a'.repeat(80), 'a-.b', 'a._b', '0.0.1-rc',
];

const BAD: [unknown, RegExp][] = [
  ['', /must not be empty/],
  ['a'.repeat(81), /at most 80 characters \(got 81\)/],
  ['../x', /must start with a letter or digit/],
  ['..', /must start with a letter or digit/],
  ['.', /must start with a letter or digit/],
  ['.hidden', /must start with a letter or digit/],
  ['-rf', /must start with a letter or digit/],
  ['_x', /must start with a letter or digit/],
  ['a/b', /only letters, digits/],
  ['a\\b', /only letters, digits/],
  ['/etc/passwd', /must start with a letter or digit/],
  ['a/../../etc', /only letters, digits/],
  ['x..y', /must not contain "\.\."/],
  ['x/..', /only letters, digits/],
  ['a..', /must not contain "\.\."/],
  ['a.', /must not end with "\."/],
  ['a b', /only letters, digits/],
  ['a\tb', /only letters, digits/],
  ['a\nb', /only letters, digits/],
  ['a\0b', /only letters, digits/],
  ['vol:1', /only letters, digits/],
  ['naïve', /only letters, digits/],
  ['диск', /only letters, digits/],
  ['disk\u202e', /only letters, digits/],
  ['💾', /only letters, digits/],
  ['a%2fb', /only letters, digits/],
  ['a*', /only letters, digits/],
  [undefined, /must be a string/],
  [null, /must be a string/],
  [42, /must be a string/],
];

t.test('valid volume names', async (t) => {
  for (const name of GOOD) {
    t.doesNotThrow(() => validateVolumeName(name), JSON.stringify(name));
    t.ok(isValidVolumeName(name));
  }
});

t.test('invalid volume names throw InvalidNameError (a usage error) with a clear message', async (t) => {
  for (const [name, why] of BAD) {
    let caught: unknown;
    try {
      validateVolumeName(name);
    } catch (err) {
      caught = err;
    }
    t.ok(caught instanceof InvalidNameError, `${JSON.stringify(name)} rejected`);
    t.ok(caught instanceof UsageError, 'is a usage error');
    const e = caught as InvalidNameError;
    t.equal(e.code, 'ARCH_E_BAD_NAME');
    t.match(e.message, /^invalid volume name /);
    t.match(e.message, why, `${JSON.stringify(name)}: ${e.message}`);
    t.notOk(/[^\x20-\x7e]/.test(e.message), 'message is printable ASCII');
    t.notOk(isValidVolumeName(name));
  }
});

t.test('header object names', async (t) => {
  t.equal(headerObjectName('vm-1'), 'vol.vm-1');
  t.equal(parseHeaderObjectName('vol.vm-1'), 'vm-1');
  t.equal(parseHeaderObjectName('vol.a.b'), 'a.b');
  for (const bad of ['vol.', 'vol..x', 'vol.a/b', 'volx', 'm.0123456789abcdef.1.0', 'vol.a.']) {
    t.equal(parseHeaderObjectName(bad), null, bad);
  }
});

t.test('chunk and data object names: build, parse, canonical form only', async (t) => {
  const id = '0123456789abcdef';
  t.equal(chunkObjectName(id, 1, 0), 'm.0123456789abcdef.1.0');
  t.equal(dataObjectName(id, 0x1a, 0x3f2), 'd.0123456789abcdef.1a.3f2');
  t.equal(dataObjectName(id, 0xffffffff, 2 ** 37 - 1), 'd.0123456789abcdef.ffffffff.1fffffffff');
  for (const [gen, index] of [[1, 0], [2, 1], [0xffffffff, 0xffffffff], [77, 123456]] as const) {
    t.same(parseChunkObjectName(chunkObjectName(id, gen, index)), { volumeId: id, generation: gen, index });
    t.same(parseDataObjectName(dataObjectName(id, gen, index)), { volumeId: id, generation: gen, index });
  }
  t.same(parseDataObjectName(dataObjectName(id, 5, 2 ** 40)), { volumeId: id, generation: 5, index: 2 ** 40 });
  const bad = [
    'm.0123456789abcdef.01.0', // leading zero
    'm.0123456789abcdef.1.00',
    'm.0123456789abcdef.0.0', // generation 0
    'm.0123456789ABCDEF.1.0', // upper case
    'm.0123456789abcde.1.0', // short id
    'm.0000000000000000.1.0', // zero id
    'm.0123456789abcdef.100000000.0', // generation > u32
    'm.0123456789abcdef.1.100000000', // chunk index > u32
    'm.0123456789abcdef.1', 'm.0123456789abcdef.1.0.0', 'd.0123456789abcdef.1.0',
    'm.0123456789abcdef.-1.0', 'm.0123456789abcdef.1.g',
  ];
  for (const name of bad) t.equal(parseChunkObjectName(name), null, name);
  t.equal(parseDataObjectName('m.0123456789abcdef.1.0'), null);
  t.equal(parseDataObjectName('d.0123456789abcdef.1.0'.replace('.0', '.00')), null);
  t.equal(parseDataObjectName('d.0123456789abcdef.1.' + 'f'.repeat(15)), null, 'index beyond 2^53');
  t.ok(isVolumeId(id));
  t.notOk(isVolumeId('0000000000000000'));
  t.notOk(isVolumeId('0123456789abcdeg'));
});
