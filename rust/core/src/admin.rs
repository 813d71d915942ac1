//! The live admin page, `GET /admin`: one self-contained HTML page (no CDN, no build step) that
//! shows clients, rooms, users, backends, nodes, message rates, every counter (drops in red) and a
//! small rate plot, refreshing every second from `GET /admin/stats`. Off unless `admin_token` is
//! set. The page itself holds no data: it asks for the token (kept in the tab's session storage,
//! never put in a URL) and sends it as `Authorization: Bearer` to `/admin/stats`, which compares it
//! in constant time and answers 401 to a wrong or missing one. It is served wherever the other
//! operator routes are (`crate::metrics`).

use crate::http::{self, PlainGet};
use crate::protocol::secrets_equal;
use crate::Shared;
use serde_json::Value;

const PAGE: &str = include_str!("admin/page.html");
const OFF: &[u8] = b"the admin page is off (set admin_token)\n";

/// The answer to `GET /admin` or `GET /admin/stats`.
pub(crate) fn route(get: &PlainGet, shared: &Shared) -> Vec<u8> {
    let Some(expected) = shared.cfg.admin_token.as_deref() else {
        return http::response(404, "text/plain; charset=utf-8", OFF);
    };
    if get.path == "/admin" {
        return http::response(200, "text/html; charset=utf-8", PAGE.as_bytes());
    }
    match get.bearer.as_deref() {
        Some(t) if secrets_equal(t.as_bytes(), expected.as_bytes()) => {
            let body =
                serde_json::to_vec(&Value::Object(crate::metrics::snapshot(shared).to_json())).unwrap_or_default();
            http::response(200, "application/json", &body)
        }
        _ => http::response(
            401,
            "application/json",
            br#"{"error":"wrong or missing admin token (Authorization: Bearer)"}"#,
        ),
    }
}
