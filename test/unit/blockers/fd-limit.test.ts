/** The file blocker's fd cache size from the open-file limit (fd-limit.ts). */
import t from 'tap';
import { defaultMaxOpenFiles } from '../../../src/blockers/fd-limit.js';

const limits = (soft: string, hard: string) =>
  `Limit                     Soft Limit           Hard Limit           Units     \nMax open files            ${soft.padEnd(21)}${hard.padEnd(21)}files     \n`;

t.equal(defaultMaxOpenFiles(limits('20000', '20000')), 10_000, 'half the soft limit');
t.equal(defaultMaxOpenFiles(limits('1048576', '1048576')), 16_384, 'at most 16384');
t.equal(defaultMaxOpenFiles(limits('unlimited', 'unlimited')), 16_384, 'unlimited: the maximum');
t.equal(defaultMaxOpenFiles(limits('100', '4096')), 64, 'at least 64');
t.equal(defaultMaxOpenFiles('garbage'), 1024, 'unreadable: 1024');
t.ok(defaultMaxOpenFiles() >= 64, `this process: ${defaultMaxOpenFiles()}`);
