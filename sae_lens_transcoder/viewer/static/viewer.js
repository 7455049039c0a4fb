// The sae-lens-transcoder graph viewer: plain JS and SVG, no libraries, no network beyond
// the local server (routes in viewer/server.py). Pages: #/ (graph list),
// #/graph/<file> (layers x tokens), #/graph/<file>/node/<node_id> (one node: its feature
// file, its links in the graph, its strongest path to the output).
'use strict';

const SVG_NS = 'http://www.w3.org/2000/svg';
const app = document.getElementById('app');
const tooltip = document.getElementById('tooltip');
const cache = {graphs: new Map(), featureFiles: new Map(), features: new Map()};
let threshold = null; // the pruning slider's value, kept across pages of one graph
let thresholdGraph = null;

// ---------------------------------------------------------------- DOM helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'text') node.textContent = value;
    else if (key === 'class') node.className = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

const fmt = (x, digits = 3) => (typeof x === 'number' ? x.toPrecision(digits) : '–');
const visibleToken = (t) => String(t).replace(/\n/g, '⏎').replace(/\t/g, '→').replace(/\r/g, '↵');
const graphHash = (file) => `#/graph/${encodeURIComponent(file)}`;
const nodeHash = (file, id) => `${graphHash(file)}/node/${encodeURIComponent(id)}`;

// ---------------------------------------------------------------- graph model

function layerKey(layer) {
  return layer === 'E' ? -1 : Number(layer);
}

function layerName(layer, isLogit) {
  if (layer === 'E') return 'Emb';
  return isLogit ? 'Out' : `L${layer}`;
}

function kindOf(node) {
  const t = node.feature_type;
  if (t === 'cross layer transcoder') return 'feature';
  if (t === 'embedding') return 'embedding';
  if (t === 'logit') return 'logit';
  if (t.includes('error')) return 'error';
  if (t === 'attention head') return 'head';
  return 'other';
}

function featureIndex(node) {
  const parts = String(node.node_id).split('_');
  return parts.length === 3 ? Number(parts[1]) : node.feature;
}

function describe(node, graph) {
  const token = graph.data.metadata.prompt_tokens[node.ctx_idx];
  const where = `“${visibleToken(token ?? '?')}” (t${node.ctx_idx})`;
  const kind = kindOf(node);
  if (kind === 'feature') return `L${node.layer} feature ${featureIndex(node)} at ${where}`;
  if (kind === 'logit') return node.clerp || `Output at ${where}`;
  return node.clerp || `${node.feature_type} at ${where}`;
}

function prepareGraph(data) {
  const byId = new Map(data.nodes.map((n) => [n.node_id, n]));
  const incoming = new Map(data.nodes.map((n) => [n.node_id, []]));
  const outgoing = new Map(data.nodes.map((n) => [n.node_id, []]));
  for (const link of data.links) {
    if (!byId.has(link.source) || !byId.has(link.target)) continue;
    outgoing.get(link.source).push(link);
    incoming.get(link.target).push(link);
  }
  let roots = data.nodes.filter((n) => n.is_target_logit);
  if (!roots.length) roots = data.nodes.filter((n) => !outgoing.get(n.node_id).length && incoming.get(n.node_id).length);
  const rootIds = new Set(roots.map((n) => n.node_id));
  const maxWeight = Math.max(1e-12, ...data.links.map((l) => Math.abs(l.weight)));
  return {data, byId, incoming, outgoing, rootIds, maxWeight, paths: new Map()};
}

// The widest path to an output: the path whose weakest link (in the output's units) is
// strongest, found by memoised search over the DAG.
function strongestPath(graph, id, seen = new Set()) {
  if (graph.paths.has(id)) return graph.paths.get(id);
  if (graph.rootIds.has(id)) return {strength: Infinity, links: []};
  if (seen.has(id)) return {strength: -1, links: []}; // a cycle: not a path
  seen.add(id);
  let best = {strength: -1, links: []};
  for (const link of graph.outgoing.get(id) || []) {
    const rest = strongestPath(graph, link.target, seen);
    if (rest.strength < 0) continue;
    const strength = Math.min(Math.abs(link.weight), rest.strength);
    if (strength > best.strength) best = {strength, links: [link, ...rest.links]};
  }
  seen.delete(id);
  graph.paths.set(id, best);
  return best;
}

async function loadGraph(file) {
  if (!cache.graphs.has(file)) {
    const [data, files] = await Promise.all([
      getJSON(`/data/${encodeURI(file)}`),
      getJSON(`/api/feature-files?graph=${encodeURIComponent(file)}`),
    ]);
    cache.graphs.set(file, prepareGraph(data));
    cache.featureFiles.set(file, files.files);
  }
  return cache.graphs.get(file);
}

async function loadFeature(path) {
  if (!cache.features.has(path)) cache.features.set(path, await getJSON(`/data/${encodeURI(path)}`));
  return cache.features.get(path);
}

// ---------------------------------------------------------------- graph list

async function showList() {
  document.title = 'sae-lens-transcoder graphs';
  const {graphs} = await getJSON('/api/graphs');
  const page = el('section', {id: 'graph-list'}, el('h1', {text: 'Attribution graphs'}));
  if (!graphs.length) page.append(el('p', {text: 'No graph JSON files in the served folder.'}));
  const list = el('ul', {class: 'graphs'});
  for (const g of graphs) {
    list.append(el('li', {},
      el('a', {href: graphHash(g.file), class: 'graph-link', text: g.slug}),
      el('span', {class: 'muted', text: ` ${g.n_nodes} nodes, ${g.n_links} links · ${g.file}`}),
      el('div', {class: 'prompt', text: visibleToken(g.prompt)})));
  }
  page.append(list);
  app.replaceChildren(page);
}

// ---------------------------------------------------------------- graph page

function isVisible(node, cut) {
  if (node.feature_type === 'embedding' || node.feature_type === 'logit') return true;
  return node.influence == null || node.influence <= cut;
}

function layout(graph, nodes) {
  const tokens = graph.data.metadata.prompt_tokens;
  const rows = [...new Set(graph.data.nodes.map((n) => layerKey(n.layer)))].sort((a, b) => a - b);
  const rowOf = new Map(rows.map((r, i) => [r, i]));
  const cells = new Map();
  for (const node of nodes) {
    const key = `${layerKey(node.layer)}|${node.ctx_idx}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(node);
  }
  const widths = tokens.map(() => 64);
  for (const [key, members] of cells) {
    const col = Number(key.split('|')[1]);
    widths[col] = Math.max(widths[col], members.length * 16 + 16);
  }
  const left = 56, rowHeight = 64, top = 24;
  const starts = [];
  widths.reduce((x, w, i) => { starts[i] = x; return x + w; }, left);
  const position = new Map();
  for (const [key, members] of cells) {
    const [row, col] = key.split('|').map(Number);
    members.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0));
    const step = (widths[col] - 16) / members.length;
    members.forEach((node, i) => position.set(node.node_id, {
      x: starts[col] + 8 + step * (i + 0.5),
      y: top + (rows.length - 1 - rowOf.get(row)) * rowHeight + rowHeight / 2,
    }));
  }
  const width = left + widths.reduce((a, b) => a + b, 0) + 16;
  const height = top + rows.length * rowHeight + 90;
  return {rows, rowHeight, top, starts, widths, position, width, height};
}

function nodeShape(node, p) {
  const kind = kindOf(node);
  let shape;
  if (kind === 'feature' || kind === 'head' || kind === 'other') shape = svgEl('circle', {cx: p.x, cy: p.y, r: 6});
  else if (kind === 'logit') shape = svgEl('polygon', {points: `${p.x},${p.y - 8} ${p.x + 8},${p.y} ${p.x},${p.y + 8} ${p.x - 8},${p.y}`});
  else shape = svgEl('rect', {x: p.x - 6, y: p.y - 6, width: 12, height: 12});
  shape.setAttribute('class', `node kind-${kind}`);
  shape.dataset.nodeId = node.node_id;
  return shape;
}

function showTooltip(event, lines) {
  tooltip.replaceChildren(...lines.map((line, i) => el(i ? 'div' : 'strong', {text: line})));
  tooltip.dataset.nodeId = event.target.dataset.nodeId || '';
  tooltip.hidden = false;
  tooltip.style.left = `${event.pageX + 14}px`;
  tooltip.style.top = `${event.pageY + 14}px`;
}

function hideTooltip() {
  tooltip.hidden = true;
}

function nodeLines(node, graph) {
  const lines = [describe(node, graph), `${node.feature_type} · node ${node.node_id}`];
  if (node.activation != null) lines.push(`activation ${fmt(node.activation)}`);
  if (node.influence != null) lines.push(`influence (cumulative share) ${fmt(node.influence)}`);
  if (kindOf(node) === 'feature' && node.clerp) lines.push(node.clerp);
  lines.push(`${graph.incoming.get(node.node_id).length} inputs, ${graph.outgoing.get(node.node_id).length} outputs`);
  return lines;
}

function drawGraph(file, graph, holder, count) {
  const nodes = graph.data.nodes.filter((n) => isVisible(n, threshold));
  const shown = new Set(nodes.map((n) => n.node_id));
  const L = layout(graph, nodes);
  const canvas = svgEl('svg', {id: 'graph-svg', width: L.width, height: L.height, viewBox: `0 0 ${L.width} ${L.height}`});
  const tokens = graph.data.metadata.prompt_tokens;
  const logitLayers = new Set(graph.data.nodes.filter((n) => n.feature_type === 'logit').map((n) => layerKey(n.layer)));
  L.rows.forEach((row, i) => {
    const y = L.top + (L.rows.length - 1 - i) * L.rowHeight + L.rowHeight / 2;
    canvas.append(svgEl('line', {x1: 48, x2: L.width - 8, y1: y, y2: y, class: 'row-line'}));
    const label = svgEl('text', {x: 6, y: y + 4, class: 'row-label'});
    label.textContent = layerName(row === -1 ? 'E' : String(row), logitLayers.has(row));
    canvas.append(label);
  });
  tokens.forEach((token, col) => {
    const x = L.starts[col] + L.widths[col] / 2;
    const y = L.top + L.rows.length * L.rowHeight + 14;
    canvas.append(svgEl('line', {x1: L.starts[col], x2: L.starts[col], y1: L.top, y2: y - 10, class: 'col-line'}));
    const label = svgEl('text', {x, y, class: 'token-label', transform: `rotate(30 ${x} ${y})`});
    label.textContent = visibleToken(token);
    canvas.append(label);
  });
  const edges = svgEl('g', {class: 'edges'});
  const links = graph.data.links.filter((l) => shown.has(l.source) && shown.has(l.target));
  for (const link of links) {
    const a = L.position.get(link.source), b = L.position.get(link.target);
    const line = svgEl('line', {
      x1: a.x, y1: a.y, x2: b.x, y2: b.y,
      class: `edge ${link.weight >= 0 ? 'positive' : 'negative'}`,
      'stroke-width': (0.4 + 3.6 * Math.abs(link.weight) / graph.maxWeight).toFixed(2),
    });
    line.dataset.source = link.source;
    line.dataset.target = link.target;
    edges.append(line);
  }
  canvas.append(edges);
  const nodeLayer = svgEl('g', {class: 'nodes'});
  for (const node of nodes) {
    const shape = nodeShape(node, L.position.get(node.node_id));
    let lines = nodeLines(node, graph);
    shape.addEventListener('mouseenter', (event) => {
      showTooltip(event, lines);
      highlight(canvas, graph, node.node_id);
      const path = cache.featureFiles.get(file)[node.node_id];
      if (path) loadFeature(path).then((feature) => { // the feature file adds what it does, when it has loaded
        lines = [...nodeLines(node, graph), `fires on ${(100 * feature.activation_frequency).toFixed(2)}% of tokens`,
          `logit lens: ${feature.top_logits.slice(0, 5).map(visibleToken).join(' · ')}`];
        if (!tooltip.hidden && tooltip.dataset.nodeId === node.node_id) showTooltip(event, lines);
      });
    });
    shape.addEventListener('mousemove', (event) => showTooltip(event, lines));
    shape.addEventListener('mouseleave', () => { hideTooltip(); highlight(canvas, graph, null); });
    shape.addEventListener('click', () => { hideTooltip(); location.hash = nodeHash(file, node.node_id); });
    nodeLayer.append(shape);
  }
  canvas.append(nodeLayer);
  holder.replaceChildren(canvas);
  count.textContent = `${nodes.length} of ${graph.data.nodes.length} nodes, ${links.length} links shown`;
  count.dataset.nodes = String(nodes.length);
}

// Hovering a node lights up its own links and its strongest path to the output.
function highlight(canvas, graph, id) {
  canvas.classList.toggle('focused', id != null);
  const onPath = new Set();
  if (id != null) for (const link of strongestPath(graph, id).links) onPath.add(`${link.source}>${link.target}`);
  for (const line of canvas.querySelectorAll('.edge')) {
    const key = `${line.dataset.source}>${line.dataset.target}`;
    line.classList.toggle('lit', id != null && (line.dataset.source === id || line.dataset.target === id));
    line.classList.toggle('path', onPath.has(key));
  }
}

async function showGraph(file) {
  const graph = await loadGraph(file);
  const meta = graph.data.metadata;
  if (thresholdGraph !== file) {
    threshold = meta.node_threshold ?? 0.8;
    thresholdGraph = file;
  }
  document.title = `${meta.slug} · graph`;
  const count = el('span', {id: 'node-count', class: 'muted'});
  const value = el('span', {id: 'prune-value', text: threshold.toFixed(2)});
  const slider = el('input', {id: 'prune', type: 'range', min: '0', max: '1', step: '0.01', value: String(threshold)});
  const holder = el('div', {id: 'graph-holder'});
  slider.addEventListener('input', () => {
    threshold = Number(slider.value);
    value.textContent = threshold.toFixed(2);
    drawGraph(file, graph, holder, count);
  });
  const kinds = ['feature', 'error', 'embedding', 'logit', 'head', 'other'].map((k) =>
    el('span', {class: `legend-item`}, el('span', {class: `swatch kind-${k}`}), ` ${k}`));
  app.replaceChildren(el('section', {id: 'graph-page'},
    el('p', {}, el('a', {href: '#/', text: '← all graphs'})),
    el('h1', {text: meta.slug}),
    el('div', {class: 'prompt', text: visibleToken(meta.prompt)}),
    el('div', {class: 'controls'},
      el('label', {for: 'prune', text: 'Pruning: keep nodes with cumulative influence ≤ '}), value, ' ', slider, ' ', count),
    el('div', {class: 'legend'}, ...kinds,
      el('span', {class: 'legend-item'}, el('span', {class: 'swatch edge-positive'}), ' positive'),
      el('span', {class: 'legend-item'}, el('span', {class: 'swatch edge-negative'}), ' negative link')),
    el('p', {class: 'muted', text: 'Hover a node for details and its strongest path to the output; click it for its page.'}),
    holder));
  drawGraph(file, graph, holder, count);
}

// ---------------------------------------------------------------- node page

function linkTable(title, file, graph, links, end, id) {
  const sorted = [...links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const table = el('table', {class: 'links', id},
    el('tr', {}, el('th', {text: 'node'}), el('th', {text: 'weight'})));
  for (const link of sorted) {
    const other = graph.byId.get(link[end]);
    table.append(el('tr', {},
      el('td', {}, el('a', {href: nodeHash(file, other.node_id), text: describe(other, graph)})),
      el('td', {class: link.weight >= 0 ? 'pos' : 'neg', text: fmt(link.weight)})));
  }
  return el('div', {class: 'panel'}, el('h2', {text: `${title} (${links.length})`}),
    links.length ? table : el('p', {class: 'muted', text: 'none in this graph'}));
}

function pathPanel(file, graph, node) {
  const path = strongestPath(graph, node.node_id);
  const panel = el('div', {class: 'panel', id: 'path'}, el('h2', {text: 'Strongest path to the output'}));
  if (graph.rootIds.has(node.node_id) || path.strength < 0) {
    const text = path.strength < 0 ? 'No path to the output in this graph.' : 'This node is the output.';
    panel.append(el('p', {class: 'muted', text}));
    return panel;
  }
  const chain = el('div', {class: 'path-chain'});
  chain.append(el('span', {class: 'path-node current', text: describe(node, graph)}));
  for (const link of path.links) {
    chain.append(el('span', {class: `path-arrow ${link.weight >= 0 ? 'pos' : 'neg'}`, text: ` —${fmt(link.weight)}→ `}));
    chain.append(el('a', {class: 'path-node', href: nodeHash(file, link.target), text: describe(graph.byId.get(link.target), graph)}));
  }
  panel.append(chain, el('p', {class: 'muted', text: `weakest link ${fmt(path.strength)} (links are in the output's units)`}));
  return panel;
}

function tokenRow(tokens, scores, cls) {
  return el('div', {class: `token-row ${cls}`}, ...tokens.map((t, i) =>
    el('span', {class: 'chip', title: scores ? fmt(scores[i]) : '', text: visibleToken(t)})));
}

function scoredPanel(title, id, section, fallbackTop, fallbackBottom) {
  const panel = el('div', {class: 'panel', id}, el('h2', {text: title}));
  const top = section ? section.top : (fallbackTop || []).map((token) => ({token}));
  const bottom = section ? section.bottom : (fallbackBottom || []).map((token) => ({token}));
  panel.append(el('div', {class: 'muted', text: 'top'}), tokenRow(top.map((t) => t.token), section && top.map((t) => t.score), 'pos'));
  panel.append(el('div', {class: 'muted', text: 'bottom'}), tokenRow(bottom.map((t) => t.token), section && bottom.map((t) => t.score), 'neg'));
  return panel;
}

function histogram(feature, activation) {
  const counts = feature.histogram || [];
  const width = 360, height = 90, n = counts.length || 1;
  const max = Math.max(1, ...counts);
  const chart = svgEl('svg', {width, height, class: 'histogram', viewBox: `0 0 ${width} ${height}`});
  counts.forEach((c, i) => chart.append(svgEl('rect', {
    x: (i * width) / n, y: height - 14 - ((height - 20) * c) / max, width: width / n - 1, height: ((height - 20) * c) / max, class: 'bar',
  })));
  if (typeof activation === 'number' && feature.act_max > feature.act_min) {
    const x = (width * (activation - feature.act_min)) / (feature.act_max - feature.act_min);
    chart.append(svgEl('line', {x1: x, x2: x, y1: 0, y2: height - 14, class: 'marker'}));
  }
  for (const [x, anchor, label] of [[0, 'start', fmt(feature.act_min)], [width, 'end', fmt(feature.act_max)]]) {
    const text = svgEl('text', {x, y: height - 2, 'text-anchor': anchor, class: 'axis'});
    text.textContent = label;
    chart.append(text);
  }
  return chart;
}

function contextRow(example, actMax) {
  const row = el('div', {class: `context${example.is_repeated_datapoint ? ' repeated' : ''}`});
  example.tokens.forEach((token, i) => {
    const act = example.tokens_acts_list[i];
    const alpha = actMax > 0 ? Math.max(0, Math.min(1, act / actMax)) : 0;
    const span = el('span', {class: `tok${i === example.train_token_ind ? ' max' : ''}`, title: fmt(act), text: visibleToken(token)});
    span.style.backgroundColor = `rgba(255, 140, 0, ${alpha.toFixed(3)})`;
    row.append(span);
  });
  return row;
}

function featurePanels(feature, node) {
  const stats = el('div', {class: 'panel', id: 'stats'}, el('h2', {text: 'Activations'}),
    el('p', {text: `fires on ${(100 * feature.activation_frequency).toFixed(3)}% of ${feature.n_tokens ?? '?'} tokens · max ${fmt(feature.act_max)}`
      + (typeof node.activation === 'number' ? ` · here ${fmt(node.activation)}` : '')}),
    histogram(feature, node.activation));
  const contexts = el('div', {class: 'panel wide', id: 'contexts'}, el('h2', {text: 'Top activating contexts'}));
  for (const group of feature.examples_quantiles) {
    contexts.append(el('h3', {class: 'quantile', text: group.quantile_name}));
    const list = el('div', {class: 'examples'});
    for (const example of group.examples) list.append(contextRow(example, feature.act_max));
    contexts.append(list);
  }
  return [
    stats,
    scoredPanel('Logit lens (decoder row through the unembedding)', 'logit-lens', feature.logit_lens, feature.top_logits, feature.bottom_logits),
    scoredPanel('De-embedding (input tokens read by the encoder)', 'de-embedding', feature.de_embedding),
    contexts,
  ];
}

async function showNode(file, id) {
  const graph = await loadGraph(file);
  const node = graph.byId.get(id);
  if (!node) throw new Error(`graph ${file} has no node ${id}`);
  document.title = `${describe(node, graph)} · ${graph.data.metadata.slug}`;
  const details = el('table', {class: 'details'});
  const token = graph.data.metadata.prompt_tokens[node.ctx_idx];
  for (const [key, value] of [
    ['node', node.node_id], ['type', node.feature_type], ['layer', node.layer], ['position', `t${node.ctx_idx} “${visibleToken(token ?? '?')}”`],
    ['activation', fmt(node.activation)], ['influence', fmt(node.influence)], ['label', node.clerp || '–'],
  ]) details.append(el('tr', {}, el('th', {text: key}), el('td', {text: String(value)})));
  const panels = [];
  if (kindOf(node) === 'feature') {
    const path = cache.featureFiles.get(file)[node.node_id];
    if (path) panels.push(...featurePanels(await loadFeature(path), node));
    else panels.push(el('div', {class: 'panel', id: 'no-feature-file'}, el('h2', {text: 'No feature file'}),
      el('p', {text: 'Write one with `sae-lens-transcoder features` (or write_graph_feature_files) into the served folder.'})));
  }
  app.replaceChildren(el('section', {id: 'node-page'},
    el('p', {}, el('a', {href: graphHash(file), text: `← graph ${graph.data.metadata.slug}`})),
    el('h1', {id: 'node-title', text: describe(node, graph)}),
    el('div', {class: 'panel'}, details),
    pathPanel(file, graph, node),
    ...panels,
    linkTable('Upstream: inputs to this node', file, graph, graph.incoming.get(id), 'source', 'upstream'),
    linkTable('Downstream: nodes this one feeds', file, graph, graph.outgoing.get(id), 'target', 'downstream')));
  window.scrollTo(0, 0);
}

// ---------------------------------------------------------------- routing

async function route() {
  hideTooltip();
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  try {
    if (parts[0] === 'graph' && parts.length >= 4 && parts[2] === 'node') await showNode(parts[1], parts.slice(3).join('/'));
    else if (parts[0] === 'graph' && parts[1]) await showGraph(parts[1]);
    else await showList();
  } catch (error) {
    app.replaceChildren(el('p', {class: 'error', text: `Could not show this page: ${error.message}`}));
  }
  document.body.dataset.ready = location.hash || '#/';
}

window.addEventListener('hashchange', route);
route();
