// One connection for all tabs of this origin: the tabs elect a leader with the Web Locks
// API (the lock is released when the tab closes, so the next queued tab takes over) and
// talk over a BroadcastChannel. The leader holds the connection and rebroadcasts events,
// the cursor and its status; followers only listen. Without locks or BroadcastChannel
// every tab is its own leader.

export class TabCoordinator {
  /**
   * @param {{name?: string, locks?: LockManager, BroadcastChannel?: Function,
   *          onLeader: () => void, onMessage: (msg: object) => void}} opts
   */
  constructor(opts) {
    this.name = opts.name ?? 'dualcast';
    this.locks = opts.locks === undefined ? globalThis.navigator?.locks : opts.locks;
    this.Channel = opts.BroadcastChannel === undefined ? globalThis.BroadcastChannel
      : opts.BroadcastChannel;
    this.onLeader = opts.onLeader;
    this.onMessage = opts.onMessage;
    this.id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    this.isLeader = false;
    this.channel = null;
    this.release = null;
  }

  get shared() {
    return Boolean(this.locks && this.Channel);
  }

  /** Start listening (before loading state, so nothing broadcast meanwhile is missed). */
  listen() {
    if (!this.shared) return;
    this.channel = new this.Channel(`${this.name}-tabs`);
    this.channel.onmessage = (msg) => {
      if (msg.data && msg.data.from !== this.id) this.onMessage(msg.data);
    };
  }

  /** Queue for the leader lock; `onLeader` runs when this tab gets it. */
  elect() {
    if (!this.shared) {
      this.becomeLeader();
      return;
    }
    this.locks.request(`${this.name}-leader`, () => new Promise((resolve) => {
      this.release = resolve;
      this.becomeLeader();
    })).catch(() => {
      // the lock manager refused (e.g. a sandboxed frame): go it alone
      if (!this.isLeader) this.becomeLeader();
    });
  }

  becomeLeader() {
    this.isLeader = true;
    this.onLeader();
  }

  post(msg) {
    if (!this.channel) return;
    try {
      this.channel.postMessage({ ...msg, from: this.id });
    } catch {
      /* a closed channel during unload */
    }
  }

  /** Give up the lock (logout): another tab may lead. */
  close() {
    if (this.release) this.release();
    this.release = null;
    this.isLeader = false;
    if (this.channel) this.channel.close();
    this.channel = null;
  }
}
