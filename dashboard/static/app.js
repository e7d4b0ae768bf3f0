// citypulse live dashboard: polls the read API (same origin, /api/...) every few seconds and
// draws the zones (Leaflet, GeoJSON squares, no tile layer), the selected zone's history and
// the ingestion rate (uPlot), the alert feed and sensor health. Loads nothing from elsewhere.
'use strict';

const REFRESH_MS = 3000;
const LEVEL_COLOURS = {
  free: '#2e9d5b', busy: '#d8b33a', heavy: '#e8743b', congested: '#d63c3c', unknown: '#3b4654',
};
const LEVEL_RANK = { congested: 4, heavy: 3, busy: 2, free: 1, unknown: 0 };
const $ = (id) => document.getElementById(id);
const utc = (ts) => uPlot.tzDate(new Date(ts * 1e3), 'Etc/UTC');
const hhmm = (iso) => (iso ? iso.slice(11, 19) : '–');
const fmt = (n, digits = 0) => (n === null || n === undefined ? '–'
  : Number(n).toLocaleString('en', { maximumFractionDigits: digits, minimumFractionDigits: digits }));

const state = {
  selected: null, zones: [], layer: null, labels: null, fitted: false, seenAlerts: null, refreshes: 0,
  zoneChart: null, ingestChart: null,
};

async function api(path) {
  const resp = await fetch(`api${path}`, { cache: 'no-store' });
  const body = await resp.json();
  if (!resp.ok) throw new Error(`${path}: ${resp.status} ${body.error ? body.error.message : ''}`);
  return body;
}

// -- map ---------------------------------------------------------------------------------------

const map = L.map('map', { zoomSnap: 0.25, attributionControl: false, preferCanvas: false });

function zoneStyle(feature) {
  const p = feature.properties;
  const selected = p.zone_id === state.selected;
  return {
    color: selected ? '#ffffff' : '#0b1015', weight: selected ? 3 : 1,
    fillColor: LEVEL_COLOURS[p.congestion.level] || LEVEL_COLOURS.unknown, fillOpacity: 0.85,
  };
}

// Leaflet puts tooltips and div icons in as HTML: the registry's names go in as text.
const HTML_ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const esc = (text) => String(text).replace(/[&<>"']/g, (ch) => HTML_ESCAPES[ch]);

function tooltip(p) {
  const c = p.congestion;
  const s = p.sensors;
  return `<b>${esc(p.zone_id)}</b> ${esc(p.name)}<br>${esc(c.level)}` +
    `${c.current_index !== null ? ` · index ${fmt(c.current_index, 2)}` : ''}` +
    `${c.since ? `<br>congested since ${hhmm(c.since)}Z` : ''}` +
    `<br>sensors ${s.reporting}/${s.registered} reporting${s.silent ? `, ${s.silent} silent` : ''}`;
}

function drawMap(collection) {
  state.zones = collection.features.map((f) => f.properties);
  if (state.layer) state.layer.remove();
  state.layer = L.geoJSON(collection, {
    style: zoneStyle,
    onEachFeature: (feature, layer) => {
      layer.bindTooltip(tooltip(feature.properties), { sticky: true });
      layer.on('click', () => selectZone(feature.properties.zone_id));
    },
  }).addTo(map);
  if (state.labels) state.labels.remove();
  if (collection.features.length <= 100) { // labels stay legible up to a 10 x 10 grid
    state.labels = L.layerGroup(collection.features.map((f) => L.marker([f.properties.lat, f.properties.lon], {
      interactive: false, keyboard: false,
      icon: L.divIcon({ className: 'zone-label', html: esc(f.properties.zone_id), iconSize: [60, 14], iconAnchor: [30, 7] }),
    }))).addTo(map);
  }
  if (!state.fitted && collection.features.length) {
    map.fitBounds(state.layer.getBounds(), { padding: [8, 8] });
    state.fitted = true;
  }
  $('map').dataset.zones = String(collection.features.length);
  $('map').dataset.withData = String(state.zones.filter((z) => z.congestion.level !== 'unknown').length);
}

// -- charts ------------------------------------------------------------------------------------

function chartWidth(el) { return Math.max(320, el.parentElement.clientWidth - 8); }

function axisStyle(extra = {}) {
  return { stroke: '#8494a6', grid: { stroke: '#263240', width: 1 }, ticks: { stroke: '#263240' }, ...extra };
}
// Time axes in UTC, 24-hour, like every other time on the page.
const timeAxis = () => axisStyle({ values: (u, splits) => splits.map((ts) => new Date(ts * 1e3).toISOString().slice(11, 16)) });

function makeZoneChart(el) {
  return new uPlot({
    width: chartWidth(el), height: 300, tzDate: utc,
    scales: { x: { time: true }, idx: { range: [0, 1] }, kmh: { range: (u, lo, hi) => [0, Math.max(60, hi)] } },
    series: [
      {},
      { label: 'congestion index', scale: 'idx', stroke: '#e8743b', width: 2, fill: 'rgba(232,116,59,0.12)', points: { show: false },
        value: (u, v) => fmt(v, 2) },
      { label: 'avg speed km/h', scale: 'kmh', stroke: '#4ea3ff', width: 1.5, points: { show: false }, value: (u, v) => fmt(v, 1) },
      { label: 'vehicles/min', scale: 'veh', stroke: '#8fd16a', width: 1, dash: [4, 3], points: { show: false }, value: (u, v) => fmt(v) },
    ],
    axes: [
      timeAxis(),
      axisStyle({ scale: 'idx', label: 'congestion index', labelSize: 18, size: 44 }),
      axisStyle({ scale: 'kmh', side: 1, label: 'km/h', labelSize: 18, grid: { show: false } }),
    ],
  }, [[], [], [], []], el);
}

function makeIngestChart(el) {
  return new uPlot({
    width: chartWidth(el), height: 190, tzDate: utc,
    scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(10, hi * 1.1)] } },
    series: [
      {},
      { label: 'readings/min', stroke: '#4ea3ff', fill: 'rgba(78,163,255,0.35)', width: 1,
        paths: uPlot.paths.bars({ size: [0.8, 40] }), value: (u, v) => fmt(v) },
    ],
    axes: [timeAxis(), axisStyle({ size: 56 })],
  }, [[], []], el);
}

function drawZone(metrics, zone) {
  const rows = metrics.items;
  const xs = rows.map((r) => Date.parse(r.start) / 1e3);
  state.zoneChart.setData([
    xs, rows.map((r) => r.avg_congestion_index), rows.map((r) => r.avg_speed_kmh), rows.map((r) => r.vehicles),
  ]);
  $('zone-chart').dataset.points = String(rows.length);
  $('zone-title').textContent = zone ? `${zone.zone_id} · ${zone.name}` : metrics.zone_id;
  $('zone-sub').textContent = zone
    ? `${zone.congestion.level}${zone.congestion.since ? ` since ${hhmm(zone.congestion.since)}Z` : ''} · ` +
      `last 3 h, per minute (UTC)`
    : '';
}

function drawIngestion(ing) {
  const rows = ing.minutes;
  state.ingestChart.setData([rows.map((r) => Date.parse(r.start) / 1e3), rows.map((r) => r.readings)]);
  $('ingest-chart').dataset.points = String(rows.filter((r) => r.readings > 0).length);
  $('kpi-rate').textContent = fmt(ing.current.readings_per_s, 1);
  const lag = ing.lag.event_lag_s;
  $('kpi-lag').textContent = lag === null ? '–' : lag < 120 ? `${fmt(lag)} s` : `${fmt(lag / 60, 1)} min`;
  $('h-event').textContent = ing.lag.newest_event_at ? `${hhmm(ing.lag.newest_event_at)}Z` : '–';
  $('h-write').textContent = ing.lag.write_age_s === null ? '–' : `${fmt(ing.lag.write_age_s, 1)} s ago`;
}

// -- alerts and health -------------------------------------------------------------------------

function alertText(a) {
  const d = a.detail;
  if (a.type === 'CongestionDetected') {
    const why = d.rule === 'severe' ? `, ${d.sensors_severe} of ${d.sensors_reporting} sensors jammed` : '';
    return ['raised', `Congestion in ${a.zone_id}`, `index ${fmt(d.congestion_index, 2)}${why}`];
  }
  if (a.type === 'CongestionCleared') {
    // "silent": the zone went dark (its sensors stopped), which ends an episode unconfirmed.
    const how = d.reason === 'silent' ? 'Sensors silent in' : 'Cleared in';
    return ['cleared', `${how} ${a.zone_id}`, `after ${d.duration_minutes} min, peak ${fmt(d.peak_congestion_index, 2)}`];
  }
  if (a.type === 'SensorSilent') return ['silent', `Sensor ${a.sensor_id} silent`, `zone ${a.zone_id}, ${d.silent_for_s} s`];
  if (a.type === 'SensorStuck') {
    return ['stuck', `Sensor ${a.sensor_id} stuck`, `zone ${a.zone_id}, count ${d.vehicle_count} × ${d.repeat_run}`];
  }
  return ['', a.type, ''];
}

function drawAlerts(page) {
  const list = $('alerts');
  const first = state.seenAlerts === null;
  const seen = state.seenAlerts || new Set();
  list.replaceChildren();
  if (!page.items.length) {
    const li = document.createElement('li');
    li.className = 'empty';
    li.textContent = 'no alerts in the last 24 h';
    list.append(li);
  }
  for (const a of page.items) {
    const [kind, what, more] = alertText(a);
    const li = document.createElement('li');
    li.className = kind + (!first && !seen.has(a.event_id) ? ' new' : '');
    li.dataset.eventId = a.event_id;
    li.dataset.type = a.type;
    li.innerHTML = '<span class="when"></span><div class="what"></div><div class="more"></div>';
    li.querySelector('.when').textContent = `${hhmm(a.at)}Z`;
    li.querySelector('.what').textContent = what;
    li.querySelector('.more').textContent = more;
    if (a.zone_id) li.addEventListener('click', () => selectZone(a.zone_id));
    list.append(li);
    seen.add(a.event_id);
  }
  state.seenAlerts = seen;
  list.dataset.count = String(page.items.length);
  // The newest page only: with more behind it, the counts are "at least".
  const more = page.next_cursor ? '+' : '';
  const raised = page.items.filter((a) => a.type === 'CongestionDetected').length;
  $('alerts-count').textContent = `${page.items.length}${more} in the last 24 h · ${raised}${more} congestion raised`;
}

function drawOverview(ov) {
  const s = ov.sensors;
  $('kpi-congested').textContent = `${ov.zones.by_level.congested || 0} / ${ov.zones.total}`;
  $('kpi-reporting').textContent = `${fmt(s.reporting)}`;
  $('kpi-silent').textContent = fmt(s.silent);
  $('kpi-stuck').textContent = fmt(s.stuck);
  $('kpi-stuck').title = 'live: the same non-zero vehicle count in a run of readings (the daily mart applies the same rule)';
  $('h-registered').textContent = fmt(s.registered);
  $('h-reporting').textContent = fmt(s.reporting);
  $('h-silent').textContent = fmt(s.silent);
  $('h-never').textContent = fmt(s.never_seen);
  $('h-stuck').textContent = fmt(s.stuck);
}

function drawTopZones() {
  const top = [...state.zones]
    .filter((z) => z.congestion.current_index !== null)
    .sort((a, b) => LEVEL_RANK[b.congestion.level] - LEVEL_RANK[a.congestion.level]
      || b.congestion.current_index - a.congestion.current_index)
    .slice(0, 5);
  $('top-zones').replaceChildren(...top.map((z) => {
    const li = document.createElement('li');
    li.innerHTML = '<span></span>';
    li.querySelector('span').textContent = `${z.congestion.level} · ${fmt(z.congestion.current_index, 2)}`;
    li.append(`${z.zone_id} ${z.name}`);
    li.addEventListener('click', () => selectZone(z.zone_id));
    return li;
  }));
}

// -- refresh loop ------------------------------------------------------------------------------

function pickDefaultZone() {
  const ranked = [...state.zones].sort((a, b) => LEVEL_RANK[b.congestion.level] - LEVEL_RANK[a.congestion.level]
    || (b.congestion.current_index || 0) - (a.congestion.current_index || 0));
  return ranked.length ? ranked[0].zone_id : null;
}

async function refreshZone() {
  const zoneId = state.selected;
  if (!zoneId) return;
  const metrics = await api(`/zones/${encodeURIComponent(zoneId)}/metrics?step=1&limit=240`);
  // A click on another zone while this answer was on its way: that zone's own request draws.
  if (zoneId !== state.selected) return;
  drawZone(metrics, state.zones.find((z) => z.zone_id === zoneId));
}

function selectZone(zoneId) {
  state.selected = zoneId;
  if (state.layer) state.layer.setStyle(zoneStyle);
  refreshZone().catch(showError);
}

function showError(err) {
  $('status-dot').className = 'dot bad';
  $('status-text').textContent = `error: ${err.message}`;
}

async function refresh() {
  try {
    const [collection, overview, ingestion, alerts] = await Promise.all([
      api('/map'), api('/overview'), api('/ingestion?minutes=90'), api('/alerts?limit=30'),
    ]);
    drawMap(collection);
    drawOverview(overview);
    drawIngestion(ingestion);
    drawAlerts(alerts);
    drawTopZones();
    if (!state.selected) state.selected = pickDefaultZone();
    if (state.layer) state.layer.setStyle(zoneStyle);
    await refreshZone();
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes);
    $('status-dot').className = 'dot ok';
    $('status-text').textContent = `updated ${new Date().toISOString().slice(11, 19)}Z · every ${REFRESH_MS / 1000} s`;
  } catch (err) {
    showError(err);
  }
}

async function loop() {
  const started = Date.now();
  await refresh();
  setTimeout(loop, Math.max(250, REFRESH_MS - (Date.now() - started)));
}

state.zoneChart = makeZoneChart($('zone-chart'));
state.ingestChart = makeIngestChart($('ingest-chart'));
window.addEventListener('resize', () => {
  state.zoneChart.setSize({ width: chartWidth($('zone-chart')), height: 300 });
  state.ingestChart.setSize({ width: chartWidth($('ingest-chart')), height: 190 });
});
loop();
