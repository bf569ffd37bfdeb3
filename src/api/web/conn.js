// The WebSocket side: one connection to one node at a time, requests matched to replies
// by id, pushes handed to the page, and failover.
//
// On a lost connection it reconnects (the next node of the cluster after a failure) with
// the cursor of the last push it handed on, so the server replays exactly what was missed
// (docs/protocol.md). Before the access token expires it asks for a fresh one and sends an
// `auth` frame on the open connection. States: "connecting", "connected", "reconnecting",
// "offline" (the session ended).

export class Connection {
  /// `getToken()` resolves to a valid access token (refreshing it if needed) or throws
  /// when the session has ended; `onPush(frame)` gets every message and receipt;
  /// `onState(state, detail)` every change of state; `onReady()` each (re)connection.
  constructor(cluster, { getToken, onPush, onState, onReady, onAuthLost, onTokenRejected }) {
    this.cluster = cluster;
    this.getToken = getToken;
    this.onPush = onPush;
    this.onState = onState;
    this.onReady = onReady;
    this.onAuthLost = onAuthLost;
    this.onTokenRejected = onTokenRejected;
    this.ws = null;
    this.cursor = null;
    this.pending = new Map(); // request id -> {resolve, reject, timer}
    this.nextId = 1;
    this.stopped = false;
    this.failures = 0;
    this.state = "connecting";
  }

  setState(state, detail) {
    this.state = state;
    this.onState(state, detail || "");
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000, "bye");
    this.failAll("stopped");
  }

  async open() {
    if (this.stopped) return;
    let token;
    try {
      token = await this.getToken();
    } catch (e) {
      if (e && (e.code === "session_ended" || e.code === "no_session")) {
        this.stopped = true;
        this.setState("offline", e.message);
        this.onAuthLost(e);
        return;
      }
      // The cluster did not answer the refresh: try again like a lost connection.
      this.retry(String(e && e.message));
      return;
    }
    const base = this.cluster.base.replace(/^http/, "ws");
    let url = base + "/v1/ws?access_token=" + encodeURIComponent(token);
    if (this.cursor) url += "&cursor=" + encodeURIComponent(this.cursor);
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      this.retry(String(e));
      return;
    }
    this.ws = ws;
    let ready = false;
    ws.onmessage = (ev) => {
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch (_) {
        return;
      }
      if (f.type === "ready") {
        ready = true;
        this.failures = 0;
        if (!this.cursor) this.cursor = f.cursor;
        this.setState("connected", this.cluster.base);
        this.onReady();
        return;
      }
      if (f.type === "message" || f.type === "receipt") {
        this.onPush(f);
        if (f.cursor) this.cursor = f.cursor;
        return;
      }
      if (f.id !== undefined && this.pending.has(f.id)) {
        const p = this.pending.get(f.id);
        this.pending.delete(f.id);
        clearTimeout(p.timer);
        if (f.type === "error") p.reject(f);
        else p.resolve(f);
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.failAll("connection lost");
      if (this.stopped) return;
      if (ev.code === 4002) this.cursor = null; // the cursor is not in this stream: start afresh
      // Refused or revoked token (4001), or an upgrade that failed (a browser cannot see its
      // 401): the next try uses a freshly refreshed token.
      if (ev.code === 4001 || !ready) this.onTokenRejected();
      // 4001 (token refused or expired) gets a fresh token on the next try; a node that
      // went away or never answered is left for the next one.
      if (!ready || ev.code === 1001 || ev.code === 1006) this.cluster.next();
      this.retry(ev.reason || "connection closed (" + ev.code + ")");
    };
  }

  retry(why) {
    if (this.stopped) return;
    this.failures += 1;
    this.setState("reconnecting", why);
    const delay = Math.min(250 * 2 ** Math.min(this.failures - 1, 4), 4000);
    setTimeout(() => this.open(), delay);
  }

  failAll(why) {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject({ type: "error", code: "disconnected", message: why });
    }
    this.pending.clear();
  }

  get connected() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.state === "connected";
  }

  /// Sends a request frame; resolves with its reply, rejects with its error frame (or a
  /// `disconnected`/`timeout` error when no reply can come).
  request(type, fields, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      if (!this.connected) {
        reject({ type: "error", code: "disconnected", message: "not connected" });
        return;
      }
      const id = "r" + this.nextId++;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject({ type: "error", code: "timeout", message: "no reply within " + timeoutMs + " ms" });
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ type, id, ...fields }));
    });
  }

  /// Sends a fresh token on the open connection so it outlives the old one.
  async renew() {
    if (!this.connected) return;
    const token = await this.getToken();
    await this.request("auth", { token });
  }
}
