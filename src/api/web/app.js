// raftchat's page: the state of the signed-in user's chats and what changes it.
//
// - api.js: the cluster's nodes, the stored session, login/signup/refresh over HTTP.
// - conn.js: the WebSocket (requests, pushes, resume from the cursor, failover).
// - view.js: DOM nodes from state, text only.
// - this file: state (conversations, the open conversation, my pending sends) and events.
//
// Sends are shown at once as pending and confirmed by their `sent` reply; one that gets no
// reply is sent again with the same client_msg_id (the server stores it once). Messages of
// the peer are acked (delivered) when they arrive and marked read while the conversation is
// on screen.

import { Cluster, loadSession, saveSession, signup, login, refresh, logout, userExists } from "./api.js";
import { Connection } from "./conn.js";
import { $, el, messageItem, conversationItem } from "./view.js";

const PAGE = 50;
const PERMANENT = new Set(["empty_text", "text_too_long", "self_send", "unknown_user", "invalid_request", "forbidden", "invalid_user", "invalid_text"]);

const cluster = new Cluster();
let session = null;
let conn = null;
let refreshing = null;
let renewTimer = null;
const tag = Math.random().toString(36).slice(2, 10);
let counter = 0;

const state = {
  convs: new Map(), // peer -> conversation summary (as `conversations` answers)
  open: null, // {peer, id, messages: Map(seq -> message), exhausted, loading}
  pending: new Map(), // client_msg_id -> {peer, text, status, client_msg_id, ts}
};

const me = () => session && session.user;
const convId = (a, b) => (a < b ? a + "~" + b : b + "~" + a);
const peerOf = (id) => id.split("~").find((u) => u !== me()) || me();

// ---- session and tokens ----

const fresh = (s) => s && s.access_expires_at - Date.now() / 1000 > 60;

/// A valid access token; refreshes when needed. One refresh at a time, also across this
/// origin's tabs (they share the stored session and each refresh spends its refresh token):
/// under a Web Lock, a tab first adopts what another tab may just have stored.
async function getToken() {
  if (!session) throw { code: "no_session", message: "not logged in" };
  if (fresh(session)) return session.access_token;
  if (!refreshing) {
    const doRefresh = async () => {
      const stored = loadSession();
      if (stored && stored.user === session.user && stored.refresh_token !== session.refresh_token && fresh(stored)) {
        return stored;
      }
      return refresh(cluster, stored && stored.user === session.user ? stored : session);
    };
    const locked = navigator.locks ? navigator.locks.request("raftchat-refresh", doRefresh) : doRefresh();
    refreshing = locked
      .then((s) => {
        session = s;
        scheduleRenew();
        return s;
      })
      .finally(() => {
        refreshing = null;
      });
  }
  const s = await refreshing;
  return s.access_token;
}

function scheduleRenew() {
  clearTimeout(renewTimer);
  if (!session) return;
  const inMs = Math.max((session.access_expires_at - Date.now() / 1000 - 60) * 1000, 5000);
  renewTimer = setTimeout(async () => {
    try {
      await getToken();
      if (conn) await conn.renew();
    } catch (e) {
      if (e && e.code === "session_ended") return sessionLost(e);
      scheduleRenew();
    }
  }, inMs);
}

function sessionLost(e) {
  if (conn) conn.stop();
  conn = null;
  session = null;
  saveSession(null);
  showAuth("Your session has ended: " + (e.message || "log in again") + ".");
}

// ---- views ----

function showAuth(notice) {
  clearTimeout(renewTimer);
  document.body.classList.remove("in-conversation");
  $("chat-view").hidden = true;
  $("auth-view").hidden = false;
  const n = $("auth-notice");
  n.hidden = !notice;
  n.textContent = notice || "";
  $("invite-field").hidden = cluster.registration !== "invite";
  $("signup-form").hidden = cluster.registration === "closed";
  $("login-user").focus();
}

function showChat() {
  $("auth-view").hidden = true;
  $("chat-view").hidden = false;
  $("me").textContent = me();
  state.convs.clear();
  state.open = null;
  $("conv-pane").hidden = true;
  renderList();
  conn = new Connection(cluster, {
    getToken,
    onPush,
    onState: (s, detail) => {
      const c = $("conn-state");
      c.dataset.state = s;
      c.textContent = { connecting: "connecting…", connected: "connected", reconnecting: "reconnecting…", offline: "offline" }[s];
      c.title = detail;
    },
    onReady,
    onAuthLost: sessionLost,
    onTokenRejected: () => {
      if (session) session.access_expires_at = 0;
    },
  });
  conn.start();
  scheduleRenew();
  $("new-peer").focus();
}

function renderList() {
  const ul = $("conversations");
  const rows = [...state.convs.values()].sort((a, b) => b.last_ts - a.last_ts || (a.peer < b.peer ? -1 : 1));
  ul.replaceChildren(...rows.map((c) => {
    const li = conversationItem(c, state.open && state.open.peer === c.peer);
    li.querySelector("button").addEventListener("click", () => openConversation(c.peer));
    return li;
  }));
}

function statusOf(m) {
  const c = state.convs.get(state.open.peer);
  if (c && m.seq <= (c.peer_read_seq || 0)) return "read";
  if (c && m.seq <= (c.peer_delivered_seq || 0)) return "delivered";
  return "sent";
}

/// Redraws the open conversation; keeps the view at the bottom if it was there, or where
/// it was when older messages were added above.
function renderMessages({ prepended = false } = {}) {
  const open = state.open;
  if (!open) return;
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const before = box.scrollHeight;
  const items = [...open.messages.values()]
    .sort((a, b) => a.seq - b.seq)
    .map((m) => messageItem(m, m.from === me(), m.from === me() ? statusOf(m) : undefined));
  for (const p of state.pending.values()) {
    if (p.peer === open.peer) items.push(messageItem({ from: me(), text: p.text, ts: p.ts, client_msg_id: p.client_msg_id }, true, p.status));
  }
  $("message-list").replaceChildren(...items);
  $("older-status").textContent = open.exhausted ? "Beginning of the conversation" : open.loading ? "Loading earlier messages…" : "";
  if (prepended) box.scrollTop += box.scrollHeight - before;
  else if (atBottom || open.stickToBottom) {
    box.scrollTop = box.scrollHeight;
    open.stickToBottom = false;
  }
}

// ---- conversations ----

function summary(peer) {
  let c = state.convs.get(peer);
  if (!c) {
    c = { peer, conversation_id: convId(me(), peer), last_seq: 0, last_ts: 0, preview: "", unread: 0, read_seq: 0, peer_delivered_seq: 0, peer_read_seq: 0 };
    state.convs.set(peer, c);
  }
  return c;
}

async function loadConversations() {
  const r = await conn.request("conversations", { limit: PAGE });
  for (const c of r.conversations) {
    const old = state.convs.get(c.peer);
    // A push may have moved it further than this answer already.
    if (!old || old.last_seq <= c.last_seq) state.convs.set(c.peer, c);
  }
  renderList();
}

async function openConversation(peer) {
  state.open = { peer, id: convId(me(), peer), messages: new Map(), exhausted: false, loading: false, stickToBottom: true };
  document.body.classList.add("in-conversation");
  $("conv-pane").hidden = false;
  $("conv-title").textContent = peer;
  $("composer-error").textContent = "";
  renderList();
  renderMessages();
  $("composer-text").focus();
  await loadNewest();
}

function merge(messages) {
  for (const m of messages) state.open.messages.set(m.seq, m);
}

async function loadNewest() {
  const open = state.open;
  if (!open || !conn || !conn.connected) return;
  try {
    const r = await conn.request("history", { conversation_id: open.id, limit: PAGE });
    if (state.open !== open) return;
    merge(r.messages);
    if (r.messages.length < PAGE) open.exhausted = true;
  } catch (e) {
    if (e.code !== "unknown_conversation" && e.code !== "not_found") return showComposerError(e);
    open.exhausted = true;
  }
  open.stickToBottom = true;
  renderMessages();
  markRead();
}

async function loadOlder() {
  const open = state.open;
  if (!open || open.exhausted || open.loading || !conn || !conn.connected) return;
  const oldest = Math.min(...open.messages.keys());
  if (!Number.isFinite(oldest) || oldest <= 1) {
    open.exhausted = Number.isFinite(oldest);
    return renderMessages();
  }
  open.loading = true;
  renderMessages();
  try {
    const r = await conn.request("history", { conversation_id: open.id, before: oldest, limit: PAGE });
    if (state.open !== open) return;
    merge(r.messages);
    if (r.messages.length < PAGE || Math.min(...r.messages.map((m) => m.seq)) <= 1) open.exhausted = true;
  } catch (e) {
    showComposerError(e);
  } finally {
    open.loading = false;
  }
  renderMessages({ prepended: true });
}

/// Moves my read marker to the newest message of the peer on screen.
async function markRead() {
  const open = state.open;
  if (!open || document.visibilityState !== "visible" || !conn || !conn.connected) return;
  const c = summary(open.peer);
  let newest = 0;
  for (const m of open.messages.values()) if (m.from !== me() && m.seq > newest) newest = m.seq;
  if (newest <= (c.read_seq || 0)) {
    if (c.unread) {
      c.unread = 0;
      renderList();
    }
    return;
  }
  try {
    const r = await conn.request("mark_read", { conversation_id: open.id, seq: newest });
    c.read_seq = Math.max(c.read_seq || 0, r.read_seq);
    c.unread = r.unread;
    renderList();
  } catch (_) {
    // Moved again on the next message or reconnection.
  }
}

// ---- pushes ----

const ackDue = new Map(); // conversation id -> highest seq of the peer received
let ackTimer = null;

function ackLater(conversation_id, seq) {
  ackDue.set(conversation_id, Math.max(ackDue.get(conversation_id) || 0, seq));
  if (!ackTimer) {
    ackTimer = setTimeout(() => {
      ackTimer = null;
      for (const [id, s] of ackDue) conn && conn.connected && conn.request("ack", { conversation_id: id, seq: s }).catch(() => {});
      ackDue.clear();
    }, 100);
  }
}

function onPush(f) {
  if (f.type === "message") {
    const mine = f.from === me();
    const peer = mine ? peerOf(f.conversation_id) : f.from;
    const c = summary(peer);
    if (f.seq > c.last_seq) {
      c.last_seq = f.seq;
      c.last_ts = f.ts;
      c.preview = f.text.length > 80 ? f.text.slice(0, 80) + "…" : f.text;
      c.last_from = f.from;
      const viewing = state.open && state.open.peer === peer && document.visibilityState === "visible";
      if (!mine && !viewing && f.seq > (c.read_seq || 0)) c.unread = (c.unread || 0) + 1;
    }
    if (mine) state.pending.delete(f.client_msg_id);
    else ackLater(f.conversation_id, f.seq);
    if (state.open && state.open.peer === peer) {
      state.open.messages.set(f.seq, { seq: f.seq, from: f.from, text: f.text, ts: f.ts, client_msg_id: f.client_msg_id });
      renderMessages();
      if (!mine) markRead();
    }
    renderList();
  } else if (f.type === "receipt") {
    const c = summary(peerOf(f.conversation_id));
    if (f.receipt === "read") c.peer_read_seq = Math.max(c.peer_read_seq || 0, f.seq);
    c.peer_delivered_seq = Math.max(c.peer_delivered_seq || 0, f.seq);
    if (state.open && state.open.peer === c.peer) renderMessages();
  }
}

async function onReady() {
  try {
    await loadConversations();
  } catch (_) {
    // Comes again with the next connection.
  }
  if (state.open) await loadNewest();
  for (const p of state.pending.values()) trySend(p);
}

// ---- sending ----

function showComposerError(e) {
  $("composer-error").textContent = e.message || String(e);
}

function sendText(text) {
  const open = state.open;
  if (!open) return;
  counter += 1;
  const p = { peer: open.peer, text, status: "pending", client_msg_id: me() + "-" + tag + "-" + counter, ts: Date.now() };
  state.pending.set(p.client_msg_id, p);
  open.stickToBottom = true;
  renderMessages();
  trySend(p);
}

async function trySend(p) {
  if (p.inflight || !state.pending.has(p.client_msg_id)) return;
  if (!conn || !conn.connected) return; // sent again when the connection is ready
  p.inflight = true;
  try {
    const r = await conn.request("send", { to: p.peer, client_msg_id: p.client_msg_id, text: p.text }, 15000);
    state.pending.delete(p.client_msg_id);
    const c = summary(p.peer);
    if (r.seq > c.last_seq) {
      Object.assign(c, { last_seq: r.seq, last_ts: r.ts, preview: p.text.slice(0, 80), last_from: me() });
    }
    if (state.open && state.open.peer === p.peer) {
      state.open.messages.set(r.seq, { seq: r.seq, from: me(), text: p.text, ts: r.ts, client_msg_id: p.client_msg_id });
    }
    renderList();
  } catch (e) {
    if (PERMANENT.has(e.code)) {
      state.pending.delete(p.client_msg_id);
      showComposerError(e);
    } else {
      // No answer, the connection went, or the cluster is busy: the same client_msg_id
      // again, so the message is stored once whatever happened to the first try.
      p.status = "failed";
      setTimeout(() => {
        p.inflight = false;
        trySend(p);
      }, e.retry_after_ms || 1500);
      renderMessages();
      return;
    }
  }
  p.inflight = false;
  renderMessages();
}

// ---- events ----

function formError(id, e) {
  $(id).textContent = e.message || String(e);
}

async function onLogin(ev) {
  ev.preventDefault();
  $("login-error").textContent = "";
  $("auth-notice").hidden = true;
  const btn = $("login-submit");
  btn.disabled = true;
  try {
    session = await login(cluster, $("login-user").value.trim(), $("login-password").value);
    $("login-password").value = "";
    showChat();
  } catch (e) {
    formError("login-error", e.code === "invalid_credentials" ? { message: "Wrong user id or password." } : e);
  } finally {
    btn.disabled = false;
  }
}

async function onSignup(ev) {
  ev.preventDefault();
  $("signup-error").textContent = "";
  const user = $("signup-user").value.trim();
  const password = $("signup-password").value;
  const btn = $("signup-submit");
  btn.disabled = true;
  try {
    await signup(cluster, user, password, $("signup-invite").value.trim());
    session = await login(cluster, user, password);
    $("signup-password").value = "";
    showChat();
  } catch (e) {
    formError("signup-error", e);
  } finally {
    btn.disabled = false;
  }
}

async function onNewConversation(ev) {
  ev.preventDefault();
  const peer = $("new-peer").value.trim();
  $("new-error").textContent = "";
  if (!peer) return;
  if (peer === me()) return formError("new-error", { message: "That is you; pick someone else." });
  try {
    if (!state.convs.has(peer) && !(await userExists(cluster, { access_token: await getToken() }, peer))) {
      return formError("new-error", { message: "There is no user “" + peer + "”." });
    }
  } catch (e) {
    return formError("new-error", e);
  }
  $("new-peer").value = "";
  openConversation(peer);
}

function bind() {
  $("login-form").addEventListener("submit", onLogin);
  $("signup-form").addEventListener("submit", onSignup);
  $("new-form").addEventListener("submit", onNewConversation);
  $("logout").addEventListener("click", async () => {
    const s = session;
    if (conn) conn.stop();
    conn = null;
    session = null;
    state.pending.clear();
    if (s) await logout(cluster, s);
    showAuth("You have logged out.");
  });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("composer-text");
    const text = t.value;
    if (!text.trim()) return;
    $("composer-error").textContent = "";
    t.value = "";
    sendText(text);
  });
  $("composer-text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 60) loadOlder();
  });
  $("back").addEventListener("click", () => {
    document.body.classList.remove("in-conversation");
    $("new-peer").focus();
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && document.body.classList.contains("in-conversation")) $("back").click();
  });
  document.addEventListener("visibilitychange", markRead);
}

async function main() {
  bind();
  try {
    await cluster.refreshNodes();
  } catch (_) {
    // The page's own node is enough to start; the list comes with the next call.
  }
  session = loadSession();
  if (session) showChat();
  else showAuth();
}

main();
