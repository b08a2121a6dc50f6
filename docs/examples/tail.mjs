// Follow a dualcast server from Node 22+ (or Node 20/21 with --experimental-websocket;
// without it, this says so once and follows on SSE):
//
//   node docs/examples/tail.mjs http://127.0.0.1:8000 [--token T] [--rooms a,b ...] [--from ID]
//
// prints one JSON object per event and line ({id, event, data, ts}); transport changes
// and errors go to stderr. Ctrl-C exits 0; print the last id and pass it as --from to
// resume where you left off, nothing lost, nothing twice.
import { parseArgs } from 'node:util';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    token: { type: 'string' }, rooms: { type: 'string', multiple: true },
    from: { type: 'string' },
    client: { type: 'string' },
  },
});
const server = positionals[0] ?? 'http://127.0.0.1:8000';
// dualcast.js from this checkout, or from the server itself: import(`${server}/dualcast.js`)
// needs --experimental-network-imports, so a copy next to your script is simplest
const client = values.client ?? new URL('../../static/dualcast.js', import.meta.url).href;
const { Dualcast } = await import(client);

if (typeof globalThis.WebSocket !== 'function') {
  // the client then goes on without it (SSE, then polling): say why, once
  process.stderr.write(`websocket: not available in Node ${process.version}: run node `
    + 'with --experimental-websocket (Node 20.10+ and 21), or use Node 22+\n');
}

const dc = new Dualcast(server, {
  token: values.token ?? process.env.DUALCAST_TOKEN,
  // every --rooms counts, as with `dualcast tail`: --rooms a,b --rooms c
  rooms: (values.rooms ?? []).flatMap((r) => r.split(',')).filter(Boolean),
  lastEventId: values.from,
});
dc.on('event', (e) => process.stdout.write(`${JSON.stringify(e)}\n`));
// 'state' also fires when a better transport is tried and given up: say that, so no
// line repeats the one before it
let said = null;
dc.on('state', ({ transport, state, probing }) => {
  const line = `${transport} ${state}${probing ? ` (trying ${probing})` : ''}`;
  if (line !== said) process.stderr.write(`${line}\n`);
  said = line;
});
dc.on('error', ({ code, message }) => process.stderr.write(`error ${code}: ${message}\n`));
process.once('SIGINT', () => {
  dc.stop();
  process.stderr.write(`stopped; resume with --from ${dc.lastEventId ?? ''}\n`);
  process.exit(0);
});
dc.start();
