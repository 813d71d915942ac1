//! The operator routes: `GET /health`, `/ready`, `/metrics` (Prometheus text), `/stats`
//! (JSON) and `/admin` (`crate::admin`), so load balancers, Kubernetes probes and Prometheus can see inside a broker from
//! outside. They are answered on the WebSocket port (a plain `GET` there, see `crate::http`), or
//! only on a separate listener when `metrics_bind` is set. Every figure comes from
//! [`snapshot`], the same one `BrokerHandle::stats` returns, so the three views cannot disagree.

use crate::http::{self, Head, PlainGet};
use crate::shutdown::{Signal, TaskGuard};
use crate::stats::{Stats, COUNTER_HELP};
use crate::Shared;
use serde_json::Value;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Every figure of one broker, now.
pub(crate) fn snapshot(shared: &Shared) -> Stats {
    let g = &shared.gauges;
    Stats {
        clients: shared.hub.client_count(),
        rooms: shared.hub.room_count(),
        users: shared.hub.user_count(),
        memberships: shared.hub.membership_count(),
        backends: g.backends.load(Ordering::Relaxed),
        queued_events: g.queued_events.load(Ordering::Relaxed),
        pending_requests: g.pending_requests.load(Ordering::Relaxed),
        unacked_events: g.unacked_events.load(Ordering::Relaxed),
        history_rooms: shared.rooms.counts().0,
        history_messages: shared.rooms.counts().1,
        counters: shared.counters.snapshot(),
        cluster: shared.cluster.as_ref().map(|c| c.stats(&shared.hub)),
    }
}

/// The answer to a plain `GET`, or `None` when it is not an operator route.
pub(crate) fn route(get: &PlainGet, shared: &Shared) -> Option<Vec<u8>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    Some(match get.path.as_str() {
        "/admin" | "/admin/stats" => crate::admin::route(get, shared),
        "/health" => http::response(200, TEXT, b"ok\n"),
        "/ready" => match not_ready(shared) {
            None => http::response(200, TEXT, b"ready\n"),
            Some(why) => http::response(503, TEXT, format!("not ready: {why}\n").as_bytes()),
        },
        "/metrics" => http::response(200, "text/plain; version=0.0.4; charset=utf-8", prometheus(shared).as_bytes()),
        "/stats" => {
            let body = serde_json::to_vec(&Value::Object(snapshot(shared).to_json())).unwrap_or_default();
            http::response(200, "application/json", &body)
        }
        _ => return None,
    })
}

/// Why this broker cannot accept clients now (`None`: it can).
fn not_ready(shared: &Shared) -> Option<&'static str> {
    if shared.stopping() {
        return Some("shutting down");
    }
    if let Some(c) = &shared.cluster {
        if !c.connected() {
            return Some("Redis (cluster_url) is unreachable");
        }
    }
    if shared.gauges.backends.load(Ordering::Relaxed) == 0 {
        return Some("no backend connected");
    }
    None
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let help = help.trim().replace('\\', "\\\\").replace('\n', " ");
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
}

/// The Prometheus text exposition (format 0.0.4): gauges as they are, counters as `*_total`.
pub(crate) fn prometheus(shared: &Shared) -> String {
    let s = snapshot(shared);
    let mut out = String::with_capacity(8 * 1024);
    let node = s.cluster.as_ref().map(|c| c.node_id.as_str()).unwrap_or("");
    let _ = write!(
        out,
        "# HELP pystrands_info The broker's version and cluster node id (empty when alone).\n\
         # TYPE pystrands_info gauge\npystrands_info{{version=\"{}\",node_id=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        node.replace('\\', "\\\\").replace('"', "\\\"")
    );
    for (name, help, value) in [
        ("clients", "WebSocket clients connected to this node.", s.clients),
        ("rooms", "Rooms with members on this node.", s.rooms),
        ("users", "Distinct users with a connection on this node.", s.users),
        ("memberships", "Room memberships on this node (a client in three rooms counts three).", s.memberships),
        ("backends", "Backends connected to this node.", s.backends),
        ("queued_events", "Events waiting in the no-backend queue.", s.queued_events),
        ("pending_requests", "Connection requests waiting for a backend's response.", s.pending_requests),
        ("unacked_events", "Events sent to v2 backends and not yet acknowledged.", s.unacked_events),
        (
            "history_rooms",
            "Rooms with a history stream in this node's memory (alone; a cluster keeps them in Redis).",
            s.history_rooms,
        ),
        ("history_messages", "Messages kept in this node's room history streams.", s.history_messages),
    ] {
        family(&mut out, &format!("pystrands_{name}"), "gauge", help, value);
    }
    for (name, value) in &s.counters {
        let help = COUNTER_HELP.iter().find(|(n, _)| n == name).map_or("", |(_, h)| h);
        family(&mut out, &format!("pystrands_{name}_total"), "counter", help, value);
    }
    if let Some(c) = &s.cluster {
        family(
            &mut out,
            "pystrands_cluster_connected",
            "gauge",
            "1 while both connections to Redis are up.",
            u8::from(c.connected),
        );
        family(&mut out, "pystrands_cluster_nodes", "gauge", "Live nodes of the cluster, this one included.", c.nodes);
        family(&mut out, "pystrands_cluster_clients", "gauge", "Clients on every live node.", c.clients);
        family(&mut out, "pystrands_cluster_rooms", "gauge", "Distinct rooms with members on any live node.", c.rooms);
    }
    out
}

/// The separate listener of `metrics_bind`: the operator routes and nothing else.
pub(crate) async fn listen(listener: TcpListener, shared: Arc<Shared>, stop: Signal, guard: TaskGuard) {
    crate::accept_loop(listener, "metrics", stop, guard, |stream, _addr| serve(stream, shared.clone())).await;
}

async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let answer = match http::read_request(&mut stream, shared.cfg.handshake_timeout).await {
        Ok((Head::Get(get), _)) => route(&get, &shared).unwrap_or_else(|| {
            http::response(404, "text/plain; charset=utf-8", b"not found: /health, /ready, /metrics, /stats, /admin\n")
        }),
        Ok((Head::Upgrade(_), _)) => http::response(404, "text/plain; charset=utf-8", b"not a WebSocket port\n"),
        Err(refusal) if refusal.status != 0 => http::error_response(refusal.status, &refusal.reason),
        Err(_) => return,
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
