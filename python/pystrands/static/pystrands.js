/*
 * PyStrands browser client: the structured WebSocket protocol "pystrands.1" (docs/protocol.md).
 * No dependencies, no build step. The broker serves this file at /pystrands.js (ES module),
 * /pystrands.classic.js (classic script setting window.PyStrands) and its typings at
 * /pystrands.d.ts. Usage, options, events and guarantees: docs/browser.md.
 *
 * The classic build drops the last line (the module's exports, all on that one line) and wraps
 * the rest in a function: no other line may use that keyword.
 */
"use strict";

const PROTOCOL = "pystrands.1";

/** Close codes of the broker (docs/protocol.md, "Close codes"). */
const CLOSE_CODES = Object.freeze({
  NORMAL: 1000, // the backend's disconnect with 1000: stops
  GOING_AWAY: 1001, // broker shutting down: reconnects
  UNSUPPORTED_DATA: 1003, // binary data: stops
  ABNORMAL: 1006, // connection lost, or a refused handshake (browsers cannot tell): reconnects
  INVALID_PAYLOAD: 1007, // bad UTF-8: stops
  RATE_LIMITED: 1008, // reconnects (with backoff)
  TOO_BIG: 1009, // message too big: stops
  HISTORY_UNAVAILABLE: 1011, // room history unreadable in time: reconnects
  SLOW_CONSUMER: 1013, // reconnects
  REPLACED: 4001, // a newer connection with the same client id: stops
  NO_PONG: 4002, // reconnects
  BAD_FRAME: 4400, // malformed frame or bogus position: stops
  TOKEN_EXPIRED: 4401, // the signed token expired: reconnects at once with a fresh token
  CONNECT_TIMEOUT: 4408, // no connect frame in time: reconnects
});

/** Whether a close code means "do not reconnect" (4000-4499 from a backend: stop; 4500-4999: retry). */
function isTerminal(code) {
  if (code === 1000 || code === 1003 || code === 1007 || code === 1009) return true;
  return code >= 4000 && code <= 4499 && code !== 4002 && code !== 4401 && code !== 4408;
}

function option(value, fallback) {
  return typeof value === "number" && value >= 0 ? value : fallback;
}

function report(error) {
  // A listener that throws must not break the client: report it as an uncaught error.
  if (typeof reportError === "function") reportError(error);
  else setTimeout(() => { throw error; }, 0);
}

function isPosition(r) {
  return r && typeof r.offset === "number" && typeof r.epoch === "string";
}

/*
 * Per room: `offset`/`epoch` of the last message seen (null while unknown: a room without
 * history, or joined in a cluster before its first message). After a welcome that gave the
 * room's position without our own (first connect), the broker may still replay messages up to
 * that position: `upTo` is that position (-1 when not catching up) and `got` the last one of
 * those seen (-1: none yet).
 */
function roomState(offset, epoch, upTo) {
  return { offset, epoch, upTo: upTo === undefined ? -1 : upTo, got: -1 };
}

/** The position to name on reconnect: the last message seen. */
function positionOf(st) {
  if (st.upTo >= 0) return st.got >= 0 ? st.got : st.upTo;
  return st.offset;
}

class PyStrands {
  /**
   * @param {string} url ws://, wss://, http(s):// (mapped to ws(s)://) or a path relative to the page
   * @param {object} [options] see docs/browser.md and pystrands.d.ts
   */
  constructor(url, options) {
    const o = options || {};
    const WS = o.WebSocket || (typeof WebSocket !== "undefined" ? WebSocket : undefined);
    if (typeof WS !== "function") throw new TypeError("PyStrands: no WebSocket here; pass options.WebSocket");
    this.url = String(url);
    this._o = {
      token: o.token,
      tokenParam: o.tokenParam || "token",
      params: o.params || {},
      minDelay: option(o.minDelay, 500),
      baseDelay: option(o.baseDelay, 1000),
      maxDelay: option(o.maxDelay, 20000),
      connectTimeout: option(o.connectTimeout, 20000),
      maxQueued: option(o.maxQueued, 1000),
      WebSocket: WS,
    };
    this.state = "closed";
    this.clientId = null;
    this.userId = null;
    this._handlers = Object.create(null);
    this._rooms = new Map();
    this._session = null;
    this._queue = [];
    this._ws = null;
    this._timer = null; // the pending reconnect
    this._watch = null; // connect timeout, then dead-link check
    this._limit = 0;
    this._last = 0;
    this._why = "";
    this._gen = 0; // increases with every attempt and with close(): stale callbacks check it
    this._attempts = 0; // failed attempts since the last welcome
    this._welcomes = 0;
    this._lastGap = -Infinity;
    this._active = false; // wants to be connected
    this._wake = () => this._onWake();
    if (o.autoConnect !== false) {
      // Next microtask: listeners added right after `new` see every event.
      this._active = true;
      this.state = "connecting";
      Promise.resolve().then(() => {
        if (this._active && !this._ws && !this._timer && this._gen === 0) this._begin();
      });
    }
  }

  /** Rooms of this connection: room -> {offset, epoch} of the last message seen (null: unknown). */
  get rooms() {
    const out = {};
    this._rooms.forEach((st, room) => {
      out[room] = Object.freeze({ offset: st.epoch === null ? null : positionOf(st), epoch: st.epoch });
    });
    return Object.freeze(out);
  }

  /** The latest session token (from welcome, join or leave), or null. */
  get session() {
    return this._session;
  }

  /** Sends waiting for the next welcome. */
  get queued() {
    return this._queue.length;
  }

  /** Subscribes `fn` to event `name`; returns a function that unsubscribes it. */
  on(name, fn) {
    if (typeof fn !== "function") throw new TypeError("PyStrands.on: the listener must be a function");
    (this._handlers[name] || (this._handlers[name] = [])).push(fn);
    return () => this.off(name, fn);
  }

  /** Like on(), for the next event only. */
  once(name, fn) {
    const off = this.on(name, (ev) => {
      off();
      fn(ev);
    });
    return off;
  }

  off(name, fn) {
    const list = this._handlers[name];
    if (!list) return;
    const i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
  }

  _emit(name, ev) {
    const list = this._handlers[name];
    if (!list) return;
    for (const fn of list.slice()) {
      try {
        fn(ev);
      } catch (e) {
        report(e);
      }
    }
  }

  _setState(state) {
    const previous = this.state;
    if (previous === state) return;
    this.state = state;
    this._emit("state", { state, previous });
  }

  /** Starts connecting (after autoConnect: false, or again after close()); connects now when waiting to retry. */
  connect() {
    if (this._ws || (this._active && this.state === "connecting")) return;
    this._active = true;
    this._begin();
  }

  /** Closes for good (no reconnect); sends queued for later are dropped. */
  close(code, reason) {
    const ws = this._ws;
    const c = code === undefined ? 1000 : code;
    const r = reason === undefined ? "" : String(reason);
    this._active = false;
    this._gen++;
    this._stopTimers();
    this._listen(false);
    this._queue = [];
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(c, r);
      } catch (e) {
        ws.close();
      }
    }
    this._setState("closed");
    if (ws) this._emit("disconnected", { code: c, reason: r, wasClean: true, local: true, willReconnect: false, delay: null, attempt: this._attempts });
  }

  /**
   * Sends `data` (a string) to the backend (its on_message). While not connected it is queued
   * (up to maxQueued) and sent after the next welcome; returns false when the queue is full (the
   * new message is dropped). Throws once the client is closed.
   */
  send(data) {
    if (typeof data !== "string") throw new TypeError("PyStrands.send: data must be a string");
    if (!this._active) throw new Error("PyStrands.send: the client is closed");
    const ws = this._ws;
    if (this.state === "connected" && ws && ws.readyState === 1) {
      ws.send(JSON.stringify({ t: "msg", data }));
      return true;
    }
    if (this._queue.length >= this._o.maxQueued) return false;
    this._queue.push(data);
    return true;
  }

  // ------------------------------------------------------------------ connecting

  _stopTimers() {
    clearTimeout(this._timer);
    clearTimeout(this._watch);
    this._timer = this._watch = null;
  }

  _listen(on) {
    const method = on ? "addEventListener" : "removeEventListener";
    if (typeof window !== "undefined" && window[method]) window[method]("online", this._wake);
    if (typeof document !== "undefined" && document[method]) document[method]("visibilitychange", this._wake);
  }

  _onWake() {
    if (typeof document !== "undefined" && document.visibilityState === "hidden") return;
    if (this._active && this.state === "disconnected") this._begin();
    else if (this.state === "connected") this._check();
  }

  _begin() {
    const gen = ++this._gen;
    this._stopTimers();
    this._listen(true);
    this._setState("connecting");
    const token = this._o.token;
    Promise.resolve()
      .then(() => (typeof token === "function" ? token() : token))
      .then(
        (value) => {
          if (gen === this._gen && this._active) this._open(value);
        },
        (error) => {
          if (gen !== this._gen || !this._active) return;
          this._emit("error", { type: "token", message: "PyStrands: options.token failed: " + error, error });
          this._closed(CLOSE_CODES.ABNORMAL, "no token", false, true);
        }
      );
  }

  _url(token) {
    const base = typeof location !== "undefined" && location.href ? location.href : undefined;
    const url = new URL(this.url, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    else if (url.protocol === "https:") url.protocol = "wss:";
    const params = this._o.params;
    for (const k of Object.keys(params)) {
      if (params[k] !== undefined && params[k] !== null) url.searchParams.set(k, String(params[k]));
    }
    if (token !== undefined && token !== null && token !== "") url.searchParams.set(this._o.tokenParam, String(token));
    return url.toString();
  }

  _open(token) {
    let ws;
    try {
      ws = new this._o.WebSocket(this._url(token), [PROTOCOL]);
    } catch (error) {
      // A bad URL is a programming error: stop.
      this._emit("error", { type: "url", message: "PyStrands: cannot open " + this.url + ": " + error, error });
      this.close();
      return;
    }
    this._ws = ws;
    this._arm(this._o.connectTimeout, "no welcome within " + this._o.connectTimeout + " ms");
    ws.onopen = () => {
      if (this._ws !== ws) return;
      if (ws.protocol !== PROTOCOL) {
        const message = "PyStrands: the server did not accept the subprotocol " + PROTOCOL + " (got " + JSON.stringify(ws.protocol) + ")";
        this._emit("error", { type: "subprotocol", message });
        this._drop("subprotocol not accepted");
        return;
      }
      const connect = { t: "connect" };
      if (this._session) connect.session = this._session;
      const positions = {};
      let any = false;
      this._rooms.forEach((st, room) => {
        if (st.epoch !== null) {
          positions[room] = { offset: positionOf(st), epoch: st.epoch };
          any = true;
        }
      });
      if (any) connect.positions = positions;
      ws.send(JSON.stringify(connect));
    };
    ws.onmessage = (ev) => {
      if (this._ws === ws) this._frame(ev.data);
    };
    ws.onerror = () => {}; // browsers say nothing here; the close event follows
    ws.onclose = (ev) => {
      if (this._ws === ws) this._closed(ev.code, ev.reason || "", !!ev.wasClean, false);
    };
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  /** The client gives up on the current socket (dead link, gap, timeout) and reconnects. */
  _drop(why, delay) {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    this._detach(ws);
    try {
      ws.close(1000, "reconnecting");
    } catch (e) {
      // already closed
    }
    this._closed(CLOSE_CODES.ABNORMAL, why, false, true, delay);
  }

  _closed(code, reason, wasClean, local, delay) {
    this._ws = null;
    clearTimeout(this._watch);
    this._watch = null;
    if (!this._active) return;
    const base = { code, reason, wasClean, local };
    if (!local && isTerminal(code)) {
      if (code === CLOSE_CODES.BAD_FRAME) {
        // The session or a position may be what the broker refused: start afresh next time.
        this._session = null;
        this._rooms = new Map();
      }
      this._active = false;
      this._queue = [];
      this._listen(false);
      this._setState("closed");
      this._emit("disconnected", Object.assign(base, { willReconnect: false, delay: null, attempt: this._attempts }));
      return;
    }
    const o = this._o;
    let wait = delay;
    // An expired token: ask the token provider for a new one now, no backoff; but a second
    // expiry within 10 s (a provider handing out stale tokens) waits like any other close.
    if (wait === undefined && code === CLOSE_CODES.TOKEN_EXPIRED) {
      const now = Date.now();
      if (now - (this._tokenExpiredAt || 0) > 10000) wait = 0;
      this._tokenExpiredAt = now;
    }
    if (wait === undefined) wait = o.minDelay + Math.random() * Math.min(o.maxDelay, o.baseDelay * Math.pow(2, Math.min(this._attempts, 30)));
    this._attempts++;
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this._active) this._begin();
    }, wait);
    this._setState("disconnected");
    this._emit("disconnected", Object.assign(base, { willReconnect: true, delay: wait, attempt: this._attempts }));
  }

  /** Drops the socket when nothing arrived for `ms` (0: never). */
  _arm(ms, why) {
    clearTimeout(this._watch);
    this._watch = null;
    this._limit = ms;
    this._why = why;
    this._last = Date.now();
    if (ms > 0) this._watch = setTimeout(() => this._check(), ms);
  }

  _check() {
    if (!this._ws || !this._limit) return;
    const idle = Date.now() - this._last;
    clearTimeout(this._watch);
    if (idle >= this._limit) this._drop(this._why);
    else this._watch = setTimeout(() => this._check(), this._limit - idle);
  }

  // ------------------------------------------------------------------ frames

  _frame(raw) {
    this._last = Date.now();
    let f;
    try {
      f = JSON.parse(raw);
    } catch (error) {
      this._emit("error", { type: "frame", message: "PyStrands: a frame that is not JSON", error });
      return;
    }
    if (!f || typeof f !== "object") return;
    switch (f.t) {
      case "msg":
        this._message(f);
        break;
      case "welcome":
        this._welcome(f);
        break;
      case "join":
        this._membership(f, true);
        break;
      case "leave":
        this._membership(f, false);
        break;
      case "presence":
        this._emit("presence", {
          room: f.room,
          event: f.event,
          client: f.client,
          user: typeof f.user === "string" ? f.user : null,
          userFirst: f.user_first === true,
          userLast: f.user_last === true,
        });
        break;
      default:
      // "ping" (liveness only) and frame types of newer brokers
    }
  }

  _welcome(f) {
    const reconnect = this._welcomes++ > 0;
    this.clientId = typeof f.client === "string" ? f.client : null;
    this.userId = typeof f.user === "string" ? f.user : null;
    if (typeof f.session === "string") this._session = f.session;
    const old = this._rooms;
    const rooms = new Map();
    const failed = [];
    const given = f.rooms && typeof f.rooms === "object" ? f.rooms : {};
    for (const room of Object.keys(given)) {
      const r = given[room] || {};
      const has = isPosition(r);
      const before = old.get(room);
      if (r.recovered === false) failed.push({ room, recovered: false, offset: has ? r.offset : null, epoch: has ? r.epoch : null });
      if (r.recovered === true && before && before.epoch !== null) {
        // Recovered: the missed messages follow, after our own position.
        rooms.set(room, roomState(positionOf(before), before.epoch));
      } else if (has) {
        // Not recovered: from the room's current position on (the app reloads it). No position
        // of ours: messages up to that position may still be replayed (catch up to it).
        rooms.set(room, roomState(r.offset, r.epoch, r.recovered === false ? -1 : r.offset));
      } else if (r.recovered !== false) {
        rooms.set(room, roomState(null, null));
      } // else: a room we are not in (any more)
    }
    this._rooms = rooms;
    this._attempts = 0;
    const ping = typeof f.ping === "number" ? f.ping : 0;
    this._arm(ping > 0 ? (2 * ping + 5) * 1000 : 0, "no frame for " + (2 * ping + 5) + " s (dead link)");
    const ws = this._ws;
    const queue = this._queue;
    this._queue = [];
    for (const data of queue) ws.send(JSON.stringify({ t: "msg", data }));
    const asked = typeof f.recovered === "boolean";
    this._setState("connected");
    this._emit("connected", {
      clientId: this.clientId,
      userId: this.userId,
      rooms: this.rooms,
      recovered: asked ? f.recovered : null,
      sessionError: typeof f.session_error === "string" ? f.session_error : null,
      reconnect,
      ping,
    });
    if (this._ws !== ws) return; // a listener closed it
    for (const ev of failed) this._emit("recovery", ev);
    if (asked) this._emit("recovery", { room: null, recovered: f.recovered, offset: null, epoch: null, failed: failed.map((ev) => ev.room) });
  }

  _membership(f, joined) {
    if (typeof f.session === "string") this._session = f.session;
    const room = f.room;
    if (typeof room !== "string") return;
    if (joined) {
      const has = isPosition(f);
      this._rooms.set(room, has ? roomState(f.offset, f.epoch) : this._rooms.get(room) || roomState(null, null));
      this._emit("join", { room, offset: has ? f.offset : null, epoch: has ? f.epoch : null });
    } else {
      this._rooms.delete(room);
      this._emit("leave", { room });
    }
  }

  _message(f) {
    const room = typeof f.room === "string" ? f.room : null;
    const pos = room !== null && isPosition(f);
    if (room !== null) {
      let st = this._rooms.get(room);
      if (!st) this._rooms.set(room, (st = roomState(null, null)));
      if (pos) {
        const o = f.offset;
        if (st.epoch !== f.epoch) {
          // The room's first message, or a new epoch (its history was lost): adopt it.
          st.offset = o;
          st.epoch = f.epoch;
          st.upTo = st.got = -1;
        } else if (st.upTo >= 0) {
          if (o <= st.upTo) {
            if (o <= st.got) return; // a duplicate
            if (st.got >= 0 && o !== st.got + 1) return this._gap(room, st.got, o);
            st.got = o;
          } else {
            if (o !== st.upTo + 1 || (st.got >= 0 && st.got !== st.upTo)) return this._gap(room, positionOf(st), o);
            st.offset = o;
            st.upTo = st.got = -1;
          }
        } else {
          if (o <= st.offset) return; // a duplicate
          if (o !== st.offset + 1) return this._gap(room, st.offset, o);
          st.offset = o;
        }
      }
    }
    this._emit("message", {
      data: f.data,
      room,
      offset: pos ? f.offset : null,
      epoch: pos ? f.epoch : null,
      user: typeof f.user === "string" ? f.user : null,
      all: f.all === true,
    });
  }

  /** Messages were lost on the way (offsets jumped): reconnect now, which replays the gap. */
  _gap(room, last, offset) {
    const now = Date.now();
    // At once, unless the previous gap was recent (then with the usual backoff).
    const delay = now - this._lastGap < 10000 ? undefined : 0;
    this._lastGap = now;
    this._drop("messages missing in room " + JSON.stringify(room) + " (offset " + last + " then " + offset + ")", delay);
  }
}

PyStrands.PROTOCOL = PROTOCOL;
PyStrands.CLOSE_CODES = CLOSE_CODES;
PyStrands.isTerminal = isTerminal;

export { PyStrands, CLOSE_CODES };
