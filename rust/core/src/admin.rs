//! The live admin page, `GET /admin`: one self-contained HTML page (no CDN, no build step) that
//! shows clients, rooms, users, backends, nodes, message rates, every counter (drops in red) and a
//! small rate plot, refreshing every second from `GET /stats`. Off unless `admin_token` is set;
//! then the token comes as `Authorization: Bearer <token>` or from the page's login form
//! (`?token=`), compared in constant time; a wrong one gets 401. It is served wherever the other
//! operator routes are (`crate::metrics`).

use crate::http::{self, PlainGet};
use crate::protocol::secrets_equal;
use crate::Shared;

const PAGE: &str = include_str!("admin/page.html");
const LOGIN: &str = include_str!("admin/login.html");
const HTML: &str = "text/html; charset=utf-8";

/// The answer to `GET /admin`.
pub(crate) fn page(get: &PlainGet, shared: &Shared) -> Vec<u8> {
    let Some(expected) = shared.cfg.admin_token.as_deref() else {
        return http::response(404, "text/plain; charset=utf-8", b"the admin page is off (set admin_token)\n");
    };
    let given = get.bearer.clone().or_else(|| get.query_param("token"));
    match given {
        None => http::response(200, HTML, LOGIN.replace("{{error}}", "").as_bytes()),
        Some(t) if secrets_equal(t.as_bytes(), expected.as_bytes()) => http::response(200, HTML, PAGE.as_bytes()),
        Some(_) => http::response(401, HTML, LOGIN.replace("{{error}}", "Wrong token.").as_bytes()),
    }
}
