// HTTP side of the page: the cluster's nodes, the stored session, login/signup/refresh.
//
// A session is {user, access_token, access_expires_at, refresh_token} in localStorage, so
// it survives a reload. Calls go to the current node and fail over to the next one of
// `GET /v1/nodes` when a node does not answer (a network error, not an HTTP error).

const SESSION_KEY = "raftchat.session";
const NODES_KEY = "raftchat.nodes";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Cluster {
  constructor() {
    const stored = JSON.parse(localStorage.getItem(NODES_KEY) || "[]");
    // This page's own node first.
    this.urls = [location.origin, ...stored.filter((u) => u !== location.origin)];
    this.current = 0;
    this.registration = "open";
  }

  get base() {
    return this.urls[this.current % this.urls.length];
  }

  /// Moves on to the next node (after a failure of the current one).
  next() {
    this.current = (this.current + 1) % this.urls.length;
    return this.base;
  }

  async refreshNodes() {
    const info = await this.call("GET", "/v1/nodes");
    this.registration = info.registration;
    const urls = info.nodes.map((n) => n.url.replace(/\/$/, ""));
    const base = this.base;
    this.urls = [base, ...urls.filter((u) => u !== base)];
    this.current = 0;
    localStorage.setItem(NODES_KEY, JSON.stringify(urls));
    return info;
  }

  /// One JSON call; a node that cannot be reached is skipped for the next one (each node
  /// tried once). HTTP errors are thrown as ApiError with the server's code and message.
  async call(method, path, body, token) {
    let lastError = null;
    for (let tries = 0; tries < this.urls.length; tries++) {
      const url = this.base + path;
      let resp;
      try {
        const headers = {};
        if (body !== undefined) headers["content-type"] = "application/json";
        if (token) headers["authorization"] = "Bearer " + token;
        resp = await fetch(url, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (e) {
        lastError = e;
        this.next();
        continue;
      }
      let data = null;
      try {
        data = await resp.json();
      } catch (_) {
        data = null;
      }
      if (!resp.ok) {
        const code = (data && data.code) || "http_" + resp.status;
        const message = (data && data.message) || resp.statusText;
        throw new ApiError(resp.status, code, message);
      }
      return data;
    }
    throw new ApiError(0, "unreachable", "no node of the cluster answers (" + (lastError && lastError.message) + ")");
  }
}

export function loadSession() {
  try {
    const s = JSON.parse(localStorage.getItem(SESSION_KEY) || "null");
    return s && s.user && s.refresh_token ? s : null;
  } catch (_) {
    return null;
  }
}

export function saveSession(s) {
  if (s) localStorage.setItem(SESSION_KEY, JSON.stringify(s));
  else localStorage.removeItem(SESSION_KEY);
}

export async function signup(cluster, user, password, invite) {
  const body = { user, password };
  if (invite) body.invite = invite;
  return cluster.call("POST", "/v1/accounts", body);
}

export async function login(cluster, user, password) {
  const s = await cluster.call("POST", "/v1/sessions", { user, password });
  saveSession(s);
  return s;
}

/// A fresh access token (and a rotated refresh token) for the stored session.
export async function refresh(cluster, session) {
  const s = await cluster.call("POST", "/v1/sessions/refresh", { refresh_token: session.refresh_token });
  saveSession(s);
  return s;
}

export async function logout(cluster, session) {
  saveSession(null);
  try {
    await cluster.call("POST", "/v1/sessions/logout", { refresh_token: session.refresh_token });
  } catch (_) {
    // The session is forgotten here either way; an unreachable cluster lets it lapse.
  }
}

export async function userExists(cluster, session, user) {
  try {
    await cluster.call("GET", "/v1/users/" + encodeURIComponent(user), undefined, session.access_token);
    return true;
  } catch (e) {
    if (e.code === "unknown_user") return false;
    throw e;
  }
}
