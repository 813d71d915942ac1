//! The browser client, served by the broker itself at fixed paths on the WebSocket port, so a
//! page loads the client from the broker it talks to (`import { PyStrands } from
//! "https://broker/pystrands.js"`) and the two can never be of different versions.
//!
//! * `GET /pystrands.js` — the ES module (`python/pystrands/static/pystrands.js`, also shipped in
//!   the wheel for bundlers);
//! * `GET /pystrands.classic.js` — the same code as a classic script that sets
//!   `globalThis.PyStrands` (and the module's other exports): built here from the module by
//!   dropping its one final `export { ... };` line and wrapping the rest in a function;
//! * `GET /pystrands.d.ts` — its typings.
//!
//! Served with `Access-Control-Allow-Origin: *` (a module script from another origin needs CORS).

use crate::http;
use std::sync::OnceLock;

const MODULE: &str = include_str!("../../../python/pystrands/static/pystrands.js");
const TYPES: &str = include_str!("../../../python/pystrands/static/pystrands.d.ts");

/// The classic-script build of [`MODULE`].
fn classic() -> &'static str {
    static CLASSIC: OnceLock<String> = OnceLock::new();
    CLASSIC.get_or_init(|| {
        let body = MODULE.trim_end();
        let (code, last) = body.rsplit_once('\n').unwrap_or(("", body));
        let names: Vec<&str> = last
            .trim()
            .strip_prefix("export {")
            .and_then(|l| l.trim_end_matches(';').trim_end().strip_suffix('}'))
            .map(|names| names.split(',').map(str::trim).filter(|n| !n.is_empty()).collect())
            .unwrap_or_default();
        let exports: String = names.iter().map(|n| format!("  root.{n} = {n};\n")).collect();
        format!("/* PyStrands browser client (classic script build of /pystrands.js) */\n(function (root) {{\n{code}\n{exports}}})(typeof globalThis !== \"undefined\" ? globalThis : this);\n")
    })
}

/// The answer to `GET` of one of the client's paths, or `None`.
pub(crate) fn route(path: &str) -> Option<Vec<u8>> {
    const JS: &str = "text/javascript; charset=utf-8";
    let (ctype, body) = match path {
        "/pystrands.js" => (JS, MODULE),
        "/pystrands.classic.js" => (JS, classic()),
        "/pystrands.d.ts" => ("text/plain; charset=utf-8", TYPES),
        _ => return None,
    };
    Some(http::response_with(
        200,
        ctype,
        body.as_bytes(),
        "Access-Control-Allow-Origin: *\r\nCache-Control: max-age=300\r\n",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_build_drops_the_export_line_and_sets_globals() {
        let c = classic();
        assert!(!c.lines().any(|l| l.trim_start().starts_with("export ")), "no export left");
        assert!(c.contains("root.PyStrands = PyStrands;"));
        assert!(
            MODULE.trim_end().lines().last().unwrap().starts_with("export {"),
            "the module ends with its one export line"
        );
        let r = String::from_utf8(route("/pystrands.js").unwrap()).unwrap();
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("Access-Control-Allow-Origin: *"));
        assert!(route("/nope.js").is_none());
    }
}
