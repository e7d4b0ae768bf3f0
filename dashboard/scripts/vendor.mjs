// Copy the front-end libraries the page uses from node_modules (installed from
// package-lock.json by `npm ci`) into static/vendor/, so the browser loads everything
// from the dashboard server itself: no CDN, no network.
import { cpSync, mkdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const vendor = join(root, 'static', 'vendor');
const files = [
  ['leaflet/dist/leaflet.js', 'leaflet.js'],
  ['leaflet/dist/leaflet.css', 'leaflet.css'],
  ['uplot/dist/uPlot.iife.min.js', 'uPlot.iife.min.js'],
  ['uplot/dist/uPlot.min.css', 'uPlot.min.css'],
];

rmSync(vendor, { recursive: true, force: true });
mkdirSync(vendor, { recursive: true });
for (const [from, to] of files) {
  cpSync(join(root, 'node_modules', from), join(vendor, to));
}
console.log(`vendored ${files.length} files into ${vendor}`);
