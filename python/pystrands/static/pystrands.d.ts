/**
 * Typings of the PyStrands browser client (/pystrands.js), the browser side of the structured
 * WebSocket protocol `pystrands.1`. Guide: docs/browser.md; wire spec: docs/protocol.md.
 */

/** "connecting" (token, WebSocket handshake, waiting for `welcome`), "connected" (after `welcome`),
 * "disconnected" (waiting to reconnect), "closed" (stopped: close(), a terminal close code, or
 * not started yet with `autoConnect: false`). */
export type State = "connecting" | "connected" | "disconnected" | "closed";

export interface Options {
  /** Called before EVERY connection attempt (so a signed token can be refreshed); its value is
   * sent as the query parameter `tokenParam`. A plain string is sent as is. Nothing is added
   * when it returns null, undefined or "". A throw or rejection is reported as an `error` event
   * (type "token") and retried with the backoff. */
  token?: string | (() => string | null | undefined | Promise<string | null | undefined>);
  /** Query parameter name of the token. Default "token". */
  tokenParam?: string;
  /** Extra query parameters added to the URL on every attempt (null/undefined values skipped). */
  params?: Record<string, string | number | boolean | null | undefined>;
  /** Reconnect delay floor, ms. Default 500. */
  minDelay?: number;
  /** Base of the exponential part of the reconnect delay, ms. Default 1000. */
  baseDelay?: number;
  /** Cap of the exponential part of the reconnect delay, ms. Default 20000.
   * delay = minDelay + Math.random() * Math.min(maxDelay, baseDelay * 2 ** attempt), where
   * attempt counts the failed attempts since the last `welcome` (0 for the first retry). */
  maxDelay?: number;
  /** An attempt that has no `welcome` within this many ms is dropped and retried. Default 20000. */
  connectTimeout?: number;
  /** Sends kept while not connected, sent in order after the next `welcome`. When full, send()
   * returns false and drops the new message. 0: send() returns false while not connected.
   * Default 1000. */
  maxQueued?: number;
  /** The WebSocket constructor (tests, non-browser hosts). Default: the global WebSocket. */
  WebSocket?: { new (url: string, protocols?: string | string[]): WebSocket };
  /** Start connecting at once (in the next microtask, so listeners added right after `new`
   * see every event). Default true; false: call connect(). */
  autoConnect?: boolean;
}

/** A room's position: the offset and epoch of the last message seen in it; both null for a
 * room without history (or, in a cluster, joined before its first message). */
export interface Position {
  readonly offset: number | null;
  readonly epoch: string | null;
}

export interface StateEvent {
  state: State;
  previous: State;
}

export interface ConnectedEvent {
  clientId: string;
  /** The user id the backend gave this connection, or null. */
  userId: string | null;
  /** The connection's rooms and where each one's stream stands (see Position). */
  rooms: Readonly<Record<string, Position>>;
  /** With positions sent (a reconnect with rooms that have history): true when every room was
   * recovered (the missed messages follow, each exactly once), false otherwise (see the
   * `recovery` events). null when no position was sent. */
  recovered: boolean | null;
  /** Why the rooms of the previous session were not restored: "invalid", "expired",
   * "user mismatch"; null when they were (or there was no session). */
  sessionError: string | null;
  /** false for the first welcome of this client object, true after a reconnect. */
  reconnect: boolean;
  /** The broker's ping interval, seconds (0: no pings, no dead-link detection). */
  ping: number;
}

export interface MessageEvent {
  data: string;
  /** The room it was sent to; null for a message to this connection, to its user, or to everyone. */
  room: string | null;
  /** Its position in the room's stream (rooms with history), else null. */
  offset: number | null;
  epoch: string | null;
  /** Set for a message to every connection of a user (the user id). */
  user: string | null;
  /** true for a broadcast to everyone. */
  all: boolean;
}

export interface JoinEvent {
  room: string;
  /** The room's position at the join (a lone broker, room with history), else null: the
   * position is then taken from the room's first message. */
  offset: number | null;
  epoch: string | null;
}

export interface LeaveEvent {
  room: string;
}

export interface PresenceEvent {
  room: string;
  event: "join" | "leave";
  /** The client id of the connection that entered or left. */
  client: string;
  user: string | null;
  /** join: it is that user's first connection in the room. */
  userFirst: boolean;
  /** leave: it was that user's last connection in the room. */
  userLast: boolean;
}

/** One event per room that could not be recovered (`room` set: reload that room from your own
 * store; `offset`/`epoch` are the room's current position, or null when the connection is no
 * longer in the room), then one with the overall result (`room` null, `failed` lists the rooms).
 * Emitted after each `welcome` that answered positions, right after `connected`. */
export type RecoveryEvent =
  | { room: string; recovered: false; offset: number | null; epoch: string | null }
  | { room: null; recovered: boolean; offset: null; epoch: null; failed: string[] };

export interface DisconnectedEvent {
  /** The close code (CLOSE_CODES); 1006 when the connection was lost or refused, or when the
   * client itself dropped it (`local`). */
  code: number;
  reason: string;
  wasClean: boolean;
  /** The client dropped the socket itself (dead link, connect timeout, a gap in a room's
   * offsets, subprotocol refused, no token) or close() was called. */
  local: boolean;
  willReconnect: boolean;
  /** ms until the next attempt (0: at once), null when not reconnecting. */
  delay: number | null;
  /** The number of the next attempt since the last welcome (1 = first retry). */
  attempt: number;
}

export interface ErrorEvent {
  /** "token": options.token failed; "subprotocol": the server did not accept pystrands.1;
   * "frame": a frame that is not JSON (ignored); "url": the URL cannot be opened (the client closes). */
  type: "token" | "subprotocol" | "frame" | "url";
  message: string;
  error?: unknown;
}

export interface EventMap {
  state: StateEvent;
  connected: ConnectedEvent;
  message: MessageEvent;
  join: JoinEvent;
  leave: LeaveEvent;
  presence: PresenceEvent;
  recovery: RecoveryEvent;
  disconnected: DisconnectedEvent;
  error: ErrorEvent;
}

export declare const CLOSE_CODES: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  UNSUPPORTED_DATA: 1003;
  ABNORMAL: 1006;
  INVALID_PAYLOAD: 1007;
  RATE_LIMITED: 1008;
  TOO_BIG: 1009;
  HISTORY_UNAVAILABLE: 1011;
  SLOW_CONSUMER: 1013;
  REPLACED: 4001;
  NO_PONG: 4002;
  BAD_FRAME: 4400;
  TOKEN_EXPIRED: 4401;
  CONNECT_TIMEOUT: 4408;
}>;

export declare class PyStrands {
  /** "pystrands.1" */
  static readonly PROTOCOL: string;
  static readonly CLOSE_CODES: typeof CLOSE_CODES;
  /** Whether the client stops on this close code (1000, 1003, 1007, 1009, and 4000-4499 but
   * 4002, 4401 and 4408); every other code is retried with the backoff. */
  static isTerminal(code: number): boolean;

  /** `url`: ws://, wss://, http(s):// (becomes ws(s)://) or relative to the page. */
  constructor(url: string, options?: Options);

  readonly url: string;
  readonly state: State;
  /** From the last welcome; null before the first. */
  readonly clientId: string | null;
  readonly userId: string | null;
  /** A snapshot: room -> position of the last message seen (what a reconnect names). */
  readonly rooms: Readonly<Record<string, Position>>;
  /** The latest session token (from welcome, join or leave), or null. */
  readonly session: string | null;
  /** Sends queued for the next welcome. */
  readonly queued: number;

  /** Subscribes; returns a function that unsubscribes. A listener that throws is reported as an
   * uncaught error and does not disturb the client or the other listeners. */
  on<K extends keyof EventMap>(name: K, listener: (event: EventMap[K]) => void): () => void;
  once<K extends keyof EventMap>(name: K, listener: (event: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(name: K, listener: (event: EventMap[K]) => void): void;

  /** Sends `data` to the backend (its on_message). Connected: sent now, true. Otherwise queued
   * for the next welcome (true), or false when `maxQueued` are already waiting (the message is
   * dropped). Throws TypeError for a non-string and Error once the client is closed. At most
   * once: a message written just before a connection drops may be lost. */
  send(data: string): boolean;
  /** Starts connecting (autoConnect: false, or after close()); when waiting to reconnect,
   * reconnects now. Keeps the session and positions, so it recovers. No-op while connecting
   * or connected. */
  connect(): void;
  /** Closes for good: no reconnect, queued sends dropped. Default code 1000. */
  close(code?: number, reason?: string): void;
}
