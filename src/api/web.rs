//! The browser client every node serves at `/`: plain HTML, CSS and JavaScript modules with
//! no build step, embedded in the binary (no CDN, no external fonts: it works on a cluster
//! with no internet). The page talks to the same HTTP/JSON and WebSocket API as any other
//! client; see `src/api/web/README.md` for how its code is organised.
//!
//! Every asset is sent with a strict Content-Security-Policy (scripts and styles from this
//! node only, no inline script), `X-Content-Type-Options: nosniff` and no framing, and the
//! page renders every message and user id as text, never as HTML.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

const INDEX: &str = include_str!("web/index.html");
const STYLE: &str = include_str!("web/style.css");
const APP: &str = include_str!("web/app.js");
const API: &str = include_str!("web/api.js");
const CONN: &str = include_str!("web/conn.js");
const VIEW: &str = include_str!("web/view.js");

/// Scripts, styles, images from this node only; WebSockets and API calls to any node of
/// the cluster (a page fails over to another node, which is another origin).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' http: https: ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn routes() -> Router<Arc<crate::node::Node>> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/index.html", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP) }))
        .route("/api.js", get(|| async { asset("text/javascript; charset=utf-8", API) }))
        .route("/conn.js", get(|| async { asset("text/javascript; charset=utf-8", CONN) }))
        .route("/view.js", get(|| async { asset("text/javascript; charset=utf-8", VIEW) }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The assets change with the binary; revalidate rather than serve a stale page
            // after a rolling upgrade.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
