// Embed a live event feed in your own app, no framework needed:
//
//   <ul data-dualcast-feed data-server="https://push.example.com" data-rooms="ops"></ul>
//   <script type="module" src="/path/to/embed.js"></script>
//
// Every element with `data-dualcast-feed` gets the newest events (at most data-limit,
// default 50) as <li data-event-id>. The token comes from `window.dualcastToken`, a
// string or an async function your app provides (called again before the token
// expires): never write a token into your HTML.

export async function mountFeed(element, { server, token, rooms = [], limit = 50 }) {
  const { Dualcast } = await import(`${server}/dualcast.js`);
  const dc = new Dualcast(server, { token, rooms });
  dc.on('state', ({ transport, state }) => {
    element.dataset.transport = transport;
    element.dataset.state = state;
  });
  dc.on('event', ({ id, event, data }) => {
    const item = document.createElement('li');
    item.dataset.eventId = id;
    item.textContent = `${event}: ${JSON.stringify(data)}`;
    element.prepend(item);
    while (element.children.length > limit) element.lastElementChild.remove();
  });
  return dc.start();
}

for (const element of document.querySelectorAll('[data-dualcast-feed]')) {
  mountFeed(element, {
    server: element.dataset.server,
    token: window.dualcastToken,
    rooms: (element.dataset.rooms || '').split(',').filter(Boolean),
    limit: Number(element.dataset.limit) || 50,
  });
}
