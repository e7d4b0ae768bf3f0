// Headless-browser check of the live dashboard, driven by tests/test_dashboard_browser.py.
//
//   node e2e/check_dashboard.mjs <dashboard url> <screenshot dir>
//
// Protocol (one JSON object per line): this script prints {"event":"ready",...} once the page
// shows the map, both charts and the alert feed with data; the test then triggers an alert
// and, as soon as the read API serves it, writes {"expect":"<event id>"} to this script's
// stdin; the script measures how long the page takes to show it, takes the screenshots and
// prints {"event":"done",...}. Any failure prints {"event":"failed","error":...} and exits 1.
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, outDir] = process.argv.slice(2);
if (!url || !outDir) {
  console.error('usage: node e2e/check_dashboard.mjs <url> <screenshot dir>');
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });
const say = (doc) => process.stdout.write(`${JSON.stringify(doc)}\n`);
const origin = new URL(url).origin;
const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve, reject) => {
  lines.once('line', (line) => resolve(JSON.parse(line)));
  lines.once('close', () => reject(new Error('the test closed stdin')));
});

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});
const foreign = [];
const problems = [];
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 900 }, deviceScaleFactor: 1 });
  page.on('request', (req) => { if (!req.url().startsWith(origin) && !req.url().startsWith('data:')) foreign.push(req.url()); });
  page.on('console', (msg) => { if (msg.type() === 'error') problems.push(msg.text()); });
  page.on('pageerror', (err) => problems.push(String(err)));

  await page.goto(url, { waitUntil: 'load' });
  // The map has every zone, some with live data; both charts have points; the feed has alerts.
  await page.waitForFunction(() => {
    const d = (id, key) => Number(document.getElementById(id).dataset[key] || 0);
    return d('map', 'zones') > 0 && d('map', 'withData') > 0 && d('zone-chart', 'points') > 1
      && d('ingest-chart', 'points') > 1 && d('alerts', 'count') > 0;
  }, null, { timeout: 60_000, polling: 250 });
  const rendered = await page.evaluate(() => ({
    zones: Number(document.getElementById('map').dataset.zones),
    zonesWithData: Number(document.getElementById('map').dataset.withData),
    zonePaths: document.querySelectorAll('#map path.leaflet-interactive').length,
    zoneChartPoints: Number(document.getElementById('zone-chart').dataset.points),
    ingestPoints: Number(document.getElementById('ingest-chart').dataset.points),
    chartCanvases: document.querySelectorAll('.uplot canvas').length,
    alerts: [...document.querySelectorAll('#alerts li[data-event-id]')].map((li) => li.dataset.eventId),
    rate: document.getElementById('kpi-rate').textContent,
    refreshes: Number(document.body.dataset.refreshes || 0),
  }));
  await page.screenshot({ path: join(outDir, 'dashboard-loaded.png') });
  say({ event: 'ready', ...rendered });

  const { expect } = await nextLine();
  const t0 = Date.now();
  await page.waitForSelector(`#alerts li[data-event-id="${expect.replace(/"/g, '\\"')}"]`, { timeout: 30_000 });
  const shownAfterMs = Date.now() - t0;
  await page.waitForTimeout(400); // let the highlight animation show in the screenshot (cosmetic)
  await page.screenshot({ path: join(outDir, 'dashboard-new-alert.png') });
  // The zone of the new alert, selected by clicking it in the feed: its chart must have data too.
  await page.click(`#alerts li[data-event-id="${expect.replace(/"/g, '\\"')}"]`);
  await page.waitForFunction((id) => document.getElementById('zone-title').textContent.startsWith(id)
    && Number(document.getElementById('zone-chart').dataset.points) > 1, expect.split('/')[1], { timeout: 10_000 });
  await page.screenshot({ path: join(outDir, 'dashboard-zone-selected.png') });
  say({ event: 'done', shownAfterMs, foreign, problems });
} catch (err) {
  say({ event: 'failed', error: String(err && err.stack || err), foreign, problems });
  process.exitCode = 1;
} finally {
  await browser.close();
  lines.close();
}
