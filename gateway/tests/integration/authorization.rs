//! Authorization across the cluster: a change acknowledged on one node holds for every later
//! command on every node. Two regressions (a node that had cached a room before the change),
//! and a randomized run of room-state changes and access attempts on random nodes, each
//! answer compared with a reference model of the rules written from the protocol.
//!
//! In scaled mode the server has two nodes and every user holds a connection on each; in
//! embedded mode both connections are on the one node.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::rooms::roomy;
use crate::support::*;

/// A client of `user` on the node at `addr`, with an admin token when `admin`.
async fn connect_on(addr: std::net::SocketAddr, user: &str, admin: bool) -> Client {
    let tok = if admin {
        admin_token(user)
    } else {
        token(user)
    };
    let ws = try_connect_url(&format!("ws://{addr}/ws?token={tok}"))
        .await
        .expect("upgrade accepted");
    let mut c = Client::from_ws(ws, user);
    c.hello = c.recv_type("hello").await;
    c
}

/// The second node's address in scaled mode, else the one node's.
fn other_addr(server: &Server) -> std::net::SocketAddr {
    server.other.as_ref().map_or(server.addr, |o| o.addr)
}

fn no_auto_create(c: &mut gateway::config::Config) {
    roomy(c);
    c.auto_create_rooms = false;
}

#[tokio::test]
async fn a_member_added_on_one_node_joins_through_a_node_that_refused_her_before() {
    let server = Server::start_with(no_auto_create).await;
    let mut admin = connect_on(server.addr, "adm", false).await;
    let mut eve = connect_on(other_addr(&server), "eve", false).await;
    let r = admin
        .call(json!({"type": "create_room", "room": "vault", "visibility": "private"}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    // Her refused join makes her node load (and cache) the room's state.
    let r = eve.call(json!({"type": "join", "room": "vault"})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = admin
        .call(json!({"type": "add_member", "room": "vault", "user": "eve"}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    let r = eve.call(json!({"type": "join", "room": "vault"})).await;
    assert_eq!(
        r["type"], "joined",
        "added a moment ago on the other node: {r}"
    );
    let r = eve
        .call(json!({"type": "message", "room": "vault", "content": "hi"}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    server.stop().await;
}

#[tokio::test]
async fn a_ban_on_one_node_keeps_the_user_out_through_a_node_that_knew_her_as_a_member() {
    let server = Server::start_with(no_auto_create).await;
    let mut admin = connect_on(server.addr, "adm", false).await;
    let mut eve = connect_on(other_addr(&server), "eve", false).await;
    let r = admin
        .call(json!({"type": "create_room", "room": "plaza", "visibility": "public"}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    eve.join("plaza").await;
    let r = eve.call(json!({"type": "leave", "room": "plaza"})).await;
    assert_eq!(r["type"], "left", "{r}");
    // Her node has no member in the room now: it hears nothing of the room's events.
    let r = admin
        .call(json!({"type": "ban", "room": "plaza", "user": "eve"}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    let r = eve.call(json!({"type": "join", "room": "plaza"})).await;
    assert_eq!(
        r["code"], "banned",
        "banned a moment ago on the other node: {r}"
    );
    let r = eve
        .call(json!({"type": "message", "room": "plaza", "content": "still here?"}))
        .await;
    assert_eq!(r["code"], "banned", "{r}");
    let r = eve
        .call(json!({"type": "typing", "room": "plaza", "ref": 1}))
        .await;
    assert_eq!(r["code"], "banned", "{r}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The randomized run and its model

const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
/// The global admin (an `admin` role in the token).
const ADMIN: &str = "gadm";
/// Room slots: each holds one room id at a time; a deleted room's id stays taken, so a slot
/// whose room was deleted moves on to a new id (`ra`, `ra-1`, …) now and then.
const SLOTS: [&str; 3] = ["ra", "rb", "rc"];
const MAX_PINS: usize = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Member,
    Admin,
    Owner,
}

#[derive(Clone, Debug, Default)]
struct RoomModel {
    exists: bool,
    /// Deleted ids stay taken.
    deleted: bool,
    visibility: &'static str,
    members_can_pin: bool,
    members: BTreeMap<String, Role>,
    banned: BTreeSet<String>,
    muted: BTreeSet<String>,
    /// Ids of messages posted (newest last) and of pinned ones.
    messages: Vec<Value>,
    pinned: BTreeSet<String>,
}

impl RoomModel {
    fn live(&self) -> bool {
        self.exists && !self.deleted
    }
    fn role(&self, user: &str) -> Option<Role> {
        self.members.get(user).copied()
    }
    fn gadm(user: &str) -> bool {
        user == ADMIN
    }
    fn banned(&self, user: &str) -> bool {
        self.banned.contains(user) && !Self::gadm(user)
    }
    fn moderates(&self, user: &str) -> bool {
        Self::gadm(user) || self.role(user) >= Some(Role::Admin)
    }
    fn owns(&self, user: &str) -> bool {
        Self::gadm(user) || self.role(user) == Some(Role::Owner)
    }
    fn may_read(&self, user: &str) -> bool {
        self.visibility != "private" || self.role(user).is_some() || Self::gadm(user)
    }
    fn may_post(&self, user: &str) -> bool {
        self.visibility == "public" || self.role(user).is_some() || Self::gadm(user)
    }
    /// Nobody acts on the owner; owners and global admins on anyone else; admins on the rest.
    fn outranks(&self, actor: &str, target: &str) -> bool {
        let theirs = self.role(target);
        if theirs == Some(Role::Owner) {
            return false;
        }
        if self.owns(actor) {
            return true;
        }
        self.role(actor) >= Some(Role::Admin) && theirs.unwrap_or(Role::Member) < Role::Admin
    }
}

/// The model's answer: Ok, or the error code.
type Expect = Result<(), &'static str>;

struct Run {
    rng: StdRng,
    seed: u64,
    rooms: HashMap<String, RoomModel>,
    /// The room id each slot holds now.
    slots: Vec<String>,
    /// Connections: (user, its client); each user has one per node.
    conns: Vec<(String, Client)>,
    /// (connection index, room) pairs that are joined.
    joined: BTreeSet<(usize, String)>,
    server_addrs: Vec<std::net::SocketAddr>,
    step: usize,
}

impl Run {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "seed {} (replay: CHAT_TEST_SEED={}), step {}: {what}",
            self.seed, self.seed, self.step
        );
    }

    fn users(&self) -> Vec<&'static str> {
        USERS.iter().copied().chain([ADMIN]).collect()
    }

    fn pick_user(&mut self) -> &'static str {
        let users = self.users();
        users[self.rng.random_range(0..users.len())]
    }

    fn pick_conn_of(&mut self, user: &str) -> usize {
        let mine: Vec<usize> = (0..self.conns.len())
            .filter(|i| self.conns[*i].0 == user)
            .collect();
        mine[self.rng.random_range(0..mine.len())]
    }

    fn pick_room(&mut self) -> String {
        let slot = self.rng.random_range(0..self.slots.len());
        let id = self.slots[slot].clone();
        if self.rooms.get(&id).is_some_and(|r| r.deleted) && self.rng.random_bool(0.2) {
            let next = format!("{}-{}", SLOTS[slot], self.step);
            self.slots[slot] = next.clone();
            return next;
        }
        id
    }

    fn conns_in(&self, room: &str) -> Vec<usize> {
        self.joined
            .iter()
            .filter(|(_, r)| r == room)
            .map(|(i, _)| *i)
            .collect()
    }

    /// Sends `cmd` on connection `conn` and compares the answer with `expect`.
    async fn check(&mut self, conn: usize, cmd: Value, expect: Expect, ok_type: &str) -> Value {
        let answer = self.conns[conn].1.call(cmd.clone()).await;
        let got: Expect = if answer["type"] == "error" {
            Err(match answer["code"].as_str() {
                Some("not_found") => "not_found",
                Some("forbidden") => "forbidden",
                Some("banned") => "banned",
                Some("muted") => "muted",
                Some("conflict") => "conflict",
                Some("invalid") => "invalid",
                _ => self.fail(&format!("{cmd} by {}: {answer}", self.conns[conn].0)),
            })
        } else if answer["type"] == ok_type {
            Ok(())
        } else {
            self.fail(&format!("{cmd}: unexpected answer {answer}"))
        };
        if got != expect {
            let user = self.conns[conn].0.clone();
            self.fail(&format!(
                "{cmd} by {user}: model says {expect:?}, server answered {answer}\nroom model: {:?}",
                cmd["room"].as_str().and_then(|r| self.rooms.get(r))
            ));
        }
        answer
    }

    /// After a stored room event with `seq`: every connection in the room has received it
    /// (and with it, everything the event changes on its node).
    async fn settle(&mut self, room: &str, seq: u64, in_room: &[usize]) {
        for &i in in_room {
            let c = &mut self.conns[i].1;
            c.skip_until(|f| {
                // `room_created`/`room_updated` carry the room as an object.
                let of_room = f["room"] == room || f["room"]["id"] == room;
                let event = f["type"] != "ack" && f["type"] != "joined";
                of_room && event && f["seq"].as_u64().is_some_and(|s| s >= seq)
            })
            .await;
        }
    }

    /// Takes `user`'s connections out of `room` in the model (a ban, a kick).
    fn evict(&mut self, room: &str, user: &str) {
        let conns: Vec<usize> = (0..self.conns.len())
            .filter(|i| self.conns[*i].0 == user)
            .collect();
        for i in conns {
            self.joined.remove(&(i, room.to_string()));
        }
    }

    async fn moderation(&mut self) {
        let room = self.pick_room();
        let actor = self.pick_user();
        let target = self.pick_user();
        let conn = self.pick_conn_of(actor);
        let m = self.rooms.get(&room).cloned().unwrap_or_default();
        let in_room = self.conns_in(&room);
        let kind = self.rng.random_range(0..10);
        // Every command on a room that is not there: not_found; then a banned actor: banned.
        let gate = |m: &RoomModel| -> Option<Expect> {
            if !m.live() {
                Some(Err("not_found"))
            } else if m.banned(actor) {
                Some(Err("banned"))
            } else {
                None
            }
        };
        let (cmd, expect) = match kind {
            0 => {
                let visibility = ["public", "private", "restricted"][self.rng.random_range(0..3)];
                let expect = if m.exists { Err("conflict") } else { Ok(()) };
                let cmd = json!({"type": "create_room", "room": room, "visibility": visibility});
                let answer = self.check(conn, cmd, expect, "ack").await;
                if expect.is_ok() {
                    assert!(answer["seq"].as_u64().is_some(), "{answer}");
                    let r = self.rooms.entry(room).or_default();
                    r.exists = true;
                    r.visibility = visibility;
                    r.members.insert(actor.to_string(), Role::Owner);
                }
                return;
            }
            1 => {
                let visibility = ["public", "private", "restricted"][self.rng.random_range(0..3)];
                let pin = self.rng.random_bool(0.5);
                let expect = gate(&m).unwrap_or(if m.moderates(actor) {
                    Ok(())
                } else {
                    Err("forbidden")
                });
                let cmd = json!({"type": "update_room", "room": room, "visibility": visibility, "members_can_pin": pin});
                (cmd, expect)
            }
            2 => {
                let expect = gate(&m).unwrap_or(if m.owns(actor) {
                    Ok(())
                } else {
                    Err("forbidden")
                });
                (json!({"type": "delete_room", "room": room}), expect)
            }
            3 => {
                let role = if self.rng.random_bool(0.3) {
                    "admin"
                } else {
                    "member"
                };
                let expect = gate(&m).unwrap_or_else(|| {
                    if !m.moderates(actor) || (role == "admin" && !m.owns(actor)) {
                        Err("forbidden")
                    } else if m.role(target).is_some() {
                        Err("conflict")
                    } else if m.banned.contains(target) {
                        Err("banned")
                    } else {
                        Ok(())
                    }
                });
                let cmd = json!({"type": "add_member", "room": room, "user": target, "role": role});
                (cmd, expect)
            }
            4 => {
                let kick = if self.rng.random_bool(0.5) {
                    "kick"
                } else {
                    "remove_member"
                };
                let expect =
                    gate(&m).unwrap_or(if m.moderates(actor) && m.outranks(actor, target) {
                        Ok(())
                    } else {
                        Err("forbidden")
                    });
                (json!({"type": kick, "room": room, "user": target}), expect)
            }
            5 => {
                let role = if self.rng.random_bool(0.5) {
                    "admin"
                } else {
                    "member"
                };
                let expect = gate(&m).unwrap_or_else(|| {
                    // Only the owner changes roles, and nobody the owner's.
                    if !m.owns(actor) || m.role(target) == Some(Role::Owner) {
                        Err("forbidden")
                    } else if m.role(target).is_none() {
                        Err("not_found")
                    } else {
                        Ok(())
                    }
                });
                (
                    json!({"type": "set_role", "room": room, "user": target, "role": role}),
                    expect,
                )
            }
            6 => {
                let expect = gate(&m).unwrap_or(
                    if m.moderates(actor) && actor != target && m.outranks(actor, target) {
                        Ok(())
                    } else {
                        Err("forbidden")
                    },
                );
                (json!({"type": "ban", "room": room, "user": target}), expect)
            }
            7 => {
                let expect = gate(&m).unwrap_or_else(|| {
                    if !m.moderates(actor) {
                        Err("forbidden")
                    } else if !m.banned.contains(target) {
                        Err("not_found")
                    } else {
                        Ok(())
                    }
                });
                (
                    json!({"type": "unban", "room": room, "user": target}),
                    expect,
                )
            }
            8 => {
                let expect = gate(&m).unwrap_or_else(|| {
                    if !m.moderates(actor) || actor == target || !m.outranks(actor, target) {
                        Err("forbidden")
                    } else if m.role(target).is_none() {
                        Err("not_found")
                    } else {
                        Ok(())
                    }
                });
                (
                    json!({"type": "mute", "room": room, "user": target}),
                    expect,
                )
            }
            _ => {
                let expect = gate(&m).unwrap_or_else(|| {
                    if !m.moderates(actor) {
                        Err("forbidden")
                    } else if m.role(target).is_none() {
                        Err("not_found")
                    } else {
                        Ok(())
                    }
                });
                (
                    json!({"type": "unmute", "room": room, "user": target}),
                    expect,
                )
            }
        };
        let answer = self.check(conn, cmd.clone(), expect, "ack").await;
        if expect.is_err() {
            return;
        }
        let seq = answer["seq"]
            .as_u64()
            .unwrap_or_else(|| self.fail("ack without seq"));
        // What the change did, in the model; who must see its event first.
        let r = self.rooms.get_mut(&room).expect("live room");
        let mut readers_out = false;
        match cmd["type"].as_str().unwrap() {
            "update_room" => {
                let to_private = cmd["visibility"] == "private" && r.visibility != "private";
                r.visibility = if cmd["visibility"] == "private" {
                    "private"
                } else if cmd["visibility"] == "public" {
                    "public"
                } else {
                    "restricted"
                };
                r.members_can_pin = cmd["members_can_pin"].as_bool().unwrap();
                readers_out = to_private;
            }
            "delete_room" => r.deleted = true,
            "add_member" => {
                let role = if cmd["role"] == "admin" {
                    Role::Admin
                } else {
                    Role::Member
                };
                r.members.insert(target.to_string(), role);
            }
            "kick" | "remove_member" => {
                r.members.remove(target);
                r.muted.remove(target);
            }
            "set_role" => {
                let role = if cmd["role"] == "admin" {
                    Role::Admin
                } else {
                    Role::Member
                };
                r.members.insert(target.to_string(), role);
            }
            "ban" => {
                r.banned.insert(target.to_string());
                r.members.remove(target);
                r.muted.remove(target);
            }
            "unban" => {
                r.banned.remove(target);
            }
            "mute" => {
                r.muted.insert(target.to_string());
            }
            "unmute" => {
                r.muted.remove(target);
            }
            other => self.fail(&format!("unknown {other}")),
        }
        self.settle(&room, seq, &in_room).await;
        match cmd["type"].as_str().unwrap() {
            "delete_room" => self.joined.retain(|(_, r)| *r != room),
            "kick" | "remove_member" | "ban" => self.evict(&room, target),
            _ => {}
        }
        if readers_out {
            // Sessions that may no longer read the private room are told `left`.
            let r = self.rooms[&room].clone();
            for i in self.conns_in(&room) {
                let user = self.conns[i].0.clone();
                if !r.may_read(&user) {
                    self.conns[i]
                        .1
                        .skip_until(|f| f["type"] == "left" && f["room"] == room.as_str())
                        .await;
                    self.joined.remove(&(i, room.clone()));
                }
            }
        }
    }

    async fn attempt(&mut self) {
        let room = self.pick_room();
        let user = self.pick_user();
        let conn = self.pick_conn_of(user);
        let m = self.rooms.get(&room).cloned().unwrap_or_default();
        let joined = self.joined.contains(&(conn, room.clone()));
        match self.rng.random_range(0..5) {
            0 => {
                let expect = if !m.live() {
                    Err("not_found")
                } else if joined {
                    Err("conflict")
                } else if m.banned(user) {
                    Err("banned")
                } else if !m.may_read(user) {
                    Err("forbidden")
                } else {
                    Ok(())
                };
                let cmd = json!({"type": "join", "room": room});
                self.check(conn, cmd, expect, "joined").await;
                if expect.is_ok() {
                    self.joined.insert((conn, room.clone()));
                    let r = self.rooms.get_mut(&room).unwrap();
                    if r.visibility == "public" && r.role(user).is_none() {
                        r.members.insert(user.to_string(), Role::Member);
                    }
                }
            }
            1 => {
                let expect = if !joined {
                    if !m.live() {
                        Err("not_found")
                    } else if m.banned(user) {
                        Err("banned")
                    } else {
                        Err("forbidden")
                    }
                } else if m.banned(user) {
                    Err("banned")
                } else if !m.may_post(user) {
                    Err("forbidden")
                } else if m.muted.contains(user) && m.role(user).is_some() {
                    Err("muted")
                } else {
                    Ok(())
                };
                let cmd =
                    json!({"type": "message", "room": room, "content": format!("s{}", self.step)});
                let answer = self.check(conn, cmd, expect, "ack").await;
                if expect.is_ok() {
                    let id = answer["id"].clone();
                    self.rooms.get_mut(&room).unwrap().messages.push(id);
                }
            }
            2 => {
                let Some(id) = m.messages.last().cloned() else {
                    return;
                };
                let pinned = m.pinned.contains(id.as_str().unwrap());
                let may_pin = m.moderates(user) || (m.members_can_pin && m.role(user).is_some());
                let expect = if !m.live() {
                    Err("not_found")
                } else if m.banned(user) {
                    Err("banned")
                } else if !m.may_read(user) || !may_pin {
                    Err("forbidden")
                } else if pinned || m.pinned.len() >= MAX_PINS {
                    Err("conflict")
                } else {
                    Ok(())
                };
                let cmd = json!({"type": "pin", "room": room, "id": id});
                self.check(conn, cmd, expect, "ack").await;
                if expect.is_ok() {
                    let r = self.rooms.get_mut(&room).unwrap();
                    r.pinned.insert(id.as_str().unwrap().to_string());
                }
            }
            3 => {
                let addr = self.server_addrs[self.rng.random_range(0..self.server_addrs.len())];
                let tok = if user == ADMIN {
                    admin_token(user)
                } else {
                    token(user)
                };
                let url = format!("http://{addr}/api/rooms/{room}/messages?limit=1");
                let r = http().get(url).bearer_auth(tok).send().await.unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                let expect = if !m.live() {
                    404
                } else if m.banned(user) || !m.may_read(user) {
                    403
                } else {
                    200
                };
                if status != expect {
                    self.fail(&format!(
                        "history of {room} read by {user}: model says {expect}, got {status} {body}"
                    ));
                }
            }
            _ => {
                let expect = if joined { Ok(()) } else { Err("not_found") };
                let cmd = json!({"type": "leave", "room": room});
                self.check(conn, cmd, expect, "left").await;
                if expect.is_ok() {
                    self.joined.remove(&(conn, room.clone()));
                    let r = self.rooms.get_mut(&room).unwrap();
                    if r.visibility == "public" && r.role(user) == Some(Role::Member) {
                        r.members.remove(user);
                        r.muted.remove(user);
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn random_changes_and_attempts_on_random_nodes_match_the_model() {
    let seed = std::env::var("CHAT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let steps: usize = std::env::var("CHAT_AUTHZ_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    eprintln!(
        "authorization model run: seed {seed} (CHAT_TEST_SEED={seed} replays it), {steps} steps"
    );
    let server = Server::start_with(no_auto_create).await;
    let addrs: Vec<_> = std::iter::once(server.addr)
        .chain(server.other.as_ref().map(|o| o.addr))
        .collect();
    let mut conns = Vec::new();
    for user in USERS.iter().copied().chain([ADMIN]) {
        for addr in [server.addr, other_addr(&server)] {
            conns.push((
                user.to_string(),
                connect_on(addr, user, user == ADMIN).await,
            ));
        }
    }
    let mut run = Run {
        rng: StdRng::seed_from_u64(seed),
        seed,
        rooms: HashMap::new(),
        slots: SLOTS.iter().map(|s| s.to_string()).collect(),
        conns,
        joined: BTreeSet::new(),
        server_addrs: addrs,
        step: 0,
    };
    while run.step < steps {
        run.step += 1;
        if run.rng.random_bool(0.3) {
            run.moderation().await;
        } else {
            run.attempt().await;
        }
    }
    let created = run.rooms.values().filter(|r| r.exists).count();
    assert!(created >= SLOTS.len(), "the run created rooms ({created})");
    server.stop().await;
}
