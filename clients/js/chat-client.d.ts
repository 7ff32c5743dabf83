// Type declarations for chat-client.js: the protocol's frames and the client's API.

export type RoomId = string;
export type Timestamp = string; // RFC 3339, UTC
export type Visibility = 'public' | 'private' | 'restricted';
export type Role = 'owner' | 'admin' | 'member';
export type Ref = string | number;

export interface UserRef { id: string; name: string }

export interface RoomInfo {
  id: RoomId;
  name: string;
  topic: string;
  visibility: Visibility;
  max_members?: number;
  members_can_pin: boolean;
  owner?: string;
  created_at: Timestamp;
}

export interface RoomSummary {
  id: RoomId;
  name: string;
  topic: string;
  visibility: Visibility;
  member_count: number;
  online_count: number;
  /** Stored events after the caller's read marker, when it has one. */
  unread?: number;
  /** The caller's role; null when not a member. */
  role: Role | null;
}

export interface MessageView {
  room: RoomId;
  id: string;
  seq: number;
  user: UserRef;
  content?: string;
  ts: Timestamp;
  reply_to?: string;
  edited_at?: Timestamp;
  deleted?: boolean;
}

export interface PinView { message: MessageView; by: UserRef; pinned_at: Timestamp }

export type ErrorCode =
  | 'invalid' | 'unauthorized' | 'forbidden' | 'not_found' | 'conflict' | 'too_large'
  | 'rate_limited' | 'muted' | 'banned' | 'room_full' | 'unavailable' | 'internal';

/** Client-side codes of ChatError, besides the protocol's. */
export type ClientErrorCode = 'disconnected' | 'timeout' | 'queue_full' | 'not_in_room' | 'closed' | 'http';

export interface Hello {
  type: 'hello';
  session_id: string;
  user: UserRef;
  node: string;
  heartbeat_s: number;
  limits: { max_frame_bytes: number; max_content_chars: number; messages_per_s: number };
}
export interface Ack { type: 'ack'; ref?: Ref; id?: string; seq?: number; ts?: Timestamp }
export interface ErrorFrame { type: 'error'; ref?: Ref; code: ErrorCode; message: string; retry_after_ms?: number }
export interface Pong { type: 'pong'; ref?: Ref }
export interface Joined {
  type: 'joined';
  ref?: Ref;
  room: RoomInfo;
  seq: number;
  /** Users online: everyone in a room of up to 100, else 100 of them. */
  online: UserRef[];
  /** How many users are online (exact). */
  online_count: number;
  pins: PinView[];
  recovered: boolean;
  role?: Role;
  unread?: number;
  epoch?: string;
}
export interface Left { type: 'left'; ref?: Ref; room: RoomId }
export interface Message {
  type: 'message'; seq: number; room: RoomId; id: string; user: UserRef; content: string; ts: Timestamp;
  reply_to?: string; client_msg_id?: string;
}
export interface MessageEdited { type: 'message_edited'; seq: number; room: RoomId; id: string; content: string; edited_at: Timestamp }
export interface MessageDeleted { type: 'message_deleted'; seq: number; room: RoomId; id: string; by: UserRef }
export interface Typing { type: 'typing'; room: RoomId; user: UserRef }
export interface StopTyping { type: 'stop_typing'; room: RoomId; user: UserRef }
export interface PresenceJoin { type: 'join'; room: RoomId; user: UserRef }
export interface PresenceLeave { type: 'leave'; room: RoomId; user: UserRef }
/**
 * Who is online: `count` exact, `users` up to 100. A big room (more online than the server's
 * CHAT_PRESENCE_COALESCE_ABOVE) gets no `join`/`leave` per user; its `online_users` (at most
 * one per interval and node) say who came and went since the last one instead: `joined` and
 * `left` list up to 20 users each, `joined_count` and `left_count` count all of them.
 */
export interface OnlineUsers {
  type: 'online_users'; room: RoomId; users: UserRef[]; count: number;
  joined?: UserRef[]; joined_count?: number; left?: UserRef[]; left_count?: number;
}
/** `seq` is the user's read marker, not an event position. */
export interface Receipt { type: 'receipt'; room: RoomId; user: UserRef; seq: number }
export interface Pinned { type: 'pinned'; seq: number; room: RoomId; message: MessageView; by: UserRef; pinned_at: Timestamp }
export interface Unpinned { type: 'unpinned'; seq: number; room: RoomId; id: string; by: UserRef }
export interface RoomCreated { type: 'room_created'; seq: number; room: RoomInfo }
export interface RoomUpdated { type: 'room_updated'; seq: number; room: RoomInfo }
export interface RoomDeleted { type: 'room_deleted'; seq: number; room: RoomId; by: UserRef }
export interface MemberAdded { type: 'member_added'; seq: number; room: RoomId; user: UserRef; role: Role; by: UserRef }
export interface MemberRemoved { type: 'member_removed'; seq: number; room: RoomId; user: UserRef; by: UserRef; reason?: string }
export interface MemberUpdated { type: 'member_updated'; seq: number; room: RoomId; user: UserRef; role: Role; by: UserRef }
export interface Banned { type: 'banned'; seq: number; room: RoomId; user: UserRef; by: UserRef; reason?: string; until?: Timestamp }
export interface Unbanned { type: 'unbanned'; seq: number; room: RoomId; user: UserRef; by: UserRef }
export interface Muted { type: 'muted'; seq: number; room: RoomId; user: UserRef; by: UserRef; until?: Timestamp }
export interface Unmuted { type: 'unmuted'; seq: number; room: RoomId; user: UserRef; by: UserRef }
export interface Rooms { type: 'rooms'; ref?: Ref; rooms: RoomSummary[] }
export interface Notice { type: 'notice'; content: string; ts: Timestamp }
export interface Reconnect { type: 'reconnect'; after_ms: number }
/** The connection's token expires soon: the client refreshes it when its token is a function. */
export interface TokenExpiring { type: 'token_expiring'; expires_at: Timestamp; expires_in_s: number }

export type ClientState = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'unauthorized' | 'closed';

/** Every event `on()` accepts: the server's frames by type, and the client's own. */
export interface ChatEvents {
  hello: Hello; ack: Ack; error: ErrorFrame; pong: Pong; joined: Joined; left: Left;
  message: Message; message_edited: MessageEdited; message_deleted: MessageDeleted;
  typing: Typing; stop_typing: StopTyping; join: PresenceJoin; leave: PresenceLeave;
  online_users: OnlineUsers; receipt: Receipt; pinned: Pinned; unpinned: Unpinned;
  room_created: RoomCreated; room_updated: RoomUpdated; room_deleted: RoomDeleted;
  member_added: MemberAdded; member_removed: MemberRemoved; member_updated: MemberUpdated;
  banned: Banned; unbanned: Unbanned; muted: Muted; unmuted: Unmuted; rooms: Rooms;
  notice: Notice; reconnect: Reconnect; token_expiring: TokenExpiring;
  /** The connection state; `delayMs` when a reconnect is scheduled. */
  state: { state: ClientState; attempt?: number; delayMs?: number; reason?: string };
  /** The close code and reason (`token expired`, or why the application disconnected the
   * user); `retryAfterMs`: when the server said to come back (`retry_after_ms` in the reason). */
  disconnected: { code: number; reason: string; retryAfterMs: number | null };
  /** The live connection could not take a new token (it closes at the old one's expiry). */
  refresh_failed: ChatError;
  /** Out of a room the client kept (banned, removed, deleted, made private, re-join refused). */
  lost: { room: RoomId; reason: string; frame: object };
  unauthorized: { reason: string };
}

/** The second argument of a `joined` listener. */
export interface JoinedMeta { since: number | null; rejoin: boolean }

export class ChatError extends Error {
  code: ErrorCode | ClientErrorCode;
  retryAfterMs?: number;
  status?: number;
  frame?: ErrorFrame;
  constructor(code: string, message?: string, extra?: { retryAfterMs?: number; status?: number; frame?: ErrorFrame });
}

export type TokenSource = string | (() => string | Promise<string>);

export interface ChatClientOptions {
  /** The gateway's base URL (http(s)://host:port); in a page, the page's origin. */
  url?: string;
  token: TokenSource;
  WebSocket?: typeof WebSocket;
  backoffStartMs?: number;
  backoffCapMs?: number;
  /** Messages and commands that may wait while offline (default 100). */
  queueLimit?: number;
  commandTimeoutMs?: number;
  rateLimitRetries?: number;
  /** The jitter's random source, 0 ≤ x < 1 (default Math.random). */
  random?: () => number;
}

export interface MessagesPage { messages: MessageView[]; next_before: number | null; next_after: number | null }

export interface RoomSettings {
  name?: string;
  topic?: string;
  visibility?: Visibility;
  max_members?: number;
  members_can_pin?: boolean;
}

export class ChatClient {
  constructor(options: ChatClientOptions);
  readonly state: ClientState;
  readonly user: UserRef | null;
  readonly hello: Hello | null;

  on<K extends keyof ChatEvents>(type: K, fn: K extends 'joined' ? (ev: Joined, meta?: JoinedMeta) => void : (ev: ChatEvents[K], meta?: unknown) => void): () => void;
  off<K extends keyof ChatEvents>(type: K, fn: (...args: any[]) => void): void;
  once<K extends keyof ChatEvents>(type: K, pred?: (ev: ChatEvents[K], meta?: unknown) => boolean): Promise<ChatEvents[K]>;

  connect(): Promise<Hello>;
  close(): void;
  /** Resolves with the server's ack when the live connection took the token, else null. */
  refresh(token: TokenSource): Promise<Ack | null>;
  reconnectNow(): void;
  drop(reason?: string): void;

  command(frame: { type: string; [field: string]: unknown }): Promise<any>;
  join(room: RoomId, options?: { since?: number }): Promise<Joined>;
  leave(room: RoomId): Promise<Left>;
  joinedRooms(): RoomId[];
  lastSeq(room: RoomId): number | null;
  sendMessage(room: RoomId, content: string, options?: { replyTo?: string; clientMsgId?: string }): Promise<Ack & { id: string; seq: number; ts: Timestamp }>;
  pendingMessages(): { room: RoomId; content: string; client_msg_id: string }[];

  edit(room: RoomId, id: string, content: string): Promise<Ack>;
  deleteMessage(room: RoomId, id: string): Promise<Ack>;
  pin(room: RoomId, id: string): Promise<Ack>;
  unpin(room: RoomId, id: string): Promise<Ack>;
  typing(room: RoomId): Promise<void>;
  stopTyping(room: RoomId): Promise<void>;
  read(room: RoomId, seq: number): Promise<void>;
  listRooms(): Promise<RoomSummary[]>;
  ping(): Promise<Pong>;
  createRoom(room: RoomId, settings: RoomSettings & { name: string; visibility: Visibility }): Promise<Ack>;
  updateRoom(room: RoomId, changes: RoomSettings): Promise<Ack>;
  deleteRoom(room: RoomId): Promise<Ack>;
  addMember(room: RoomId, user: string, role?: 'member' | 'admin'): Promise<Ack>;
  removeMember(room: RoomId, user: string, reason?: string): Promise<Ack>;
  kick(room: RoomId, user: string, reason?: string): Promise<Ack>;
  ban(room: RoomId, user: string, options?: { reason?: string; durationS?: number }): Promise<Ack>;
  unban(room: RoomId, user: string): Promise<Ack>;
  mute(room: RoomId, user: string, options?: { durationS?: number }): Promise<Ack>;
  unmute(room: RoomId, user: string): Promise<Ack>;
  setRole(room: RoomId, user: string, role: 'member' | 'admin'): Promise<Ack>;

  api<T = unknown>(path: string): Promise<T>;
  history(room: RoomId, page?: { before?: number; after?: number; limit?: number }): Promise<MessagesPage>;
}

/** The room id of a frame (`room` is an id, or a RoomInfo in room_created/room_updated). */
export function roomOf(frame: { room?: RoomId | { id: RoomId } }): RoomId | null;

/** The claims of a JWT, not verified (the server verifies); null when it is not one. */
export function tokenClaims(token: string): Record<string, unknown> | null;

/** A random id (a UUID where the platform has them), as used for `client_msg_id`. */
export function newId(): string;

/** The `retry_after_ms=N` a close frame's reason carries (ms), or null. */
export function retryHint(reason: string | null | undefined): number | null;
