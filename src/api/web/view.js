// Rendering: builds DOM nodes from state. Everything a user typed (message text, user ids,
// previews) goes through textContent, never innerHTML, so it shows as text and runs nothing.

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    e.setAttribute(k, v === true ? "" : String(v));
  }
  if (text !== undefined) e.textContent = text;
  return e;
}

const TIME = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

/// What a tick shows and says for a status of one of my messages.
export const TICKS = {
  pending: ["🕓", "sending"],
  failed: ["!", "not sent yet; will retry"],
  sent: ["✓", "sent"],
  delivered: ["✓✓", "delivered"],
  read: ["✓✓", "read"],
};

/// One message; `status` is set for my own messages only.
export function messageItem(m, mine, status) {
  const li = el("li", {
    class: mine ? "msg mine" : "msg",
    "data-seq": m.seq ?? "",
    "data-client-msg-id": m.client_msg_id || "",
    "data-from": m.from,
  });
  li.append(el("div", { class: "text", dir: "auto" }, m.text));
  const meta = el("div", { class: "meta" });
  const when = m.ts ? TIME.format(new Date(m.ts)) : "";
  meta.append(el("span", { class: "from" }, mine ? "you" : m.from));
  if (when) meta.append(el("time", { datetime: new Date(m.ts).toISOString() }, when));
  if (mine) meta.append(tick(status));
  li.append(meta);
  return li;
}

export function tick(status) {
  const [glyph, label] = TICKS[status] || TICKS.sent;
  return el("span", { class: "tick", "data-status": status, title: label, "aria-label": label, role: "img" }, glyph);
}

/// One row of the conversation list.
export function conversationItem(c, current) {
  const li = el("li", { "data-peer": c.peer });
  const unread = c.unread > 0;
  const label = c.peer + (unread ? ", " + c.unread + " unread" : "");
  const b = el("button", { type: "button", "aria-current": current ? "true" : "false", "aria-label": label });
  b.append(el("span", { class: "peer" }, c.peer));
  const badge = el("span", { class: "badge", "aria-hidden": "true", hidden: !unread }, unread ? String(c.unread) : "");
  b.append(badge);
  const who = c.last_from && c.last_from !== c.peer ? "you: " : "";
  b.append(el("span", { class: "preview", dir: "auto" }, c.preview ? who + c.preview : ""));
  li.append(b);
  return li;
}
