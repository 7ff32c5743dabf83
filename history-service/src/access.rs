//! Who may do what in a room: the one place the permission rules live. The gateway's command
//! guard and this service's HTTP reads both ask [`Access::check`]; nothing else decides.
//!
//! A decision is a pure function of the room's settings, the caller's membership and ban, and
//! the caller's token (global admin or not) — plus, for actions on another user, that user's
//! role in the room. Where the state comes from (a node's cache, a fresh store read) and how
//! current it is, is the caller's business (see the gateway's `commands::guard`).
//!
//! Order of refusals: a banned caller is told `banned` first, whatever the action (they learn
//! why, not only that they may not); then reading; then the action's own rule.

use proto::auth::Identity;
use proto::rooms::{MemberInfo, Role, RoomInfo, Visibility};
use proto::{ErrorCode, Timestamp};

use crate::store::{Ban, RoomAccess, RoomState};

/// What a caller wants to do in a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Join, and read history, pins, receipts and members.
    Read,
    /// Post a message, or type.
    Post,
    /// Edit a message written by `author`.
    Edit {
        author: &'a str,
    },
    /// Delete a message written by `author`.
    Delete {
        author: &'a str,
    },
    /// Pin or unpin.
    Pin,
    UpdateRoom,
    DeleteRoom,
    /// Add a member with this role.
    AddMember {
        role: Role,
    },
    /// Remove (or kick) `target`, whose role in the room is `role` (None: not a member).
    Remove {
        target: &'a str,
        role: Option<Role>,
    },
    Ban {
        target: &'a str,
        role: Option<Role>,
    },
    Unban,
    Mute {
        target: &'a str,
        role: Option<Role>,
    },
    Unmute,
    /// Change `target`'s role (`role`: theirs now) to `to`.
    SetRole {
        target: &'a str,
        role: Option<Role>,
        to: Role,
    },
    /// Read the room's bans.
    ListBans,
}

impl Action<'_> {
    /// What nobody may do, the application's backend included (the gateway's server API
    /// acts with no permission rule, but within these): the rules that keep a room whole.
    /// A room has one owner, whose role never changes and who is never removed, banned or
    /// muted; no other member becomes owner.
    pub fn keeps_room_whole(&self) -> Result<(), Denied> {
        use ErrorCode::{Forbidden, Invalid};
        let owner = Some(Role::Owner);
        match *self {
            Action::AddMember { role: Role::Owner }
            | Action::SetRole {
                to: Role::Owner, ..
            } => deny(Invalid, "role must be member or admin"),
            Action::SetRole { role, .. } if role == owner => {
                deny(Forbidden, "the owner's role cannot change")
            }
            Action::Remove { role, .. } | Action::Ban { role, .. } | Action::Mute { role, .. }
                if role == owner =>
            {
                deny(
                    Forbidden,
                    "the room's owner cannot be removed, banned or muted",
                )
            }
            _ => Ok(()),
        }
    }
}

/// A refusal: the protocol code and a message for humans.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    pub code: ErrorCode,
    pub message: String,
}

fn deny(code: ErrorCode, message: impl Into<String>) -> Result<(), Denied> {
    Err(Denied {
        code,
        message: message.into(),
    })
}

/// One user's standing in one room at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    pub info: &'a RoomInfo,
    /// The caller's membership, when a member.
    pub member: Option<&'a MemberInfo>,
    /// The caller's ban, when one is in force.
    ban: Option<&'a Ban>,
    /// The caller's user id.
    pub user: &'a str,
    pub global_admin: bool,
    now: Timestamp,
}

impl<'a> Access<'a> {
    pub fn new(
        info: &'a RoomInfo,
        member: Option<&'a MemberInfo>,
        ban: Option<&'a Ban>,
        who: &'a Identity,
    ) -> Self {
        let now = Timestamp::now();
        Self {
            info,
            member,
            ban: ban.filter(|b| b.active_at(now)),
            user: &who.user.id,
            global_admin: who.admin,
            now,
        }
    }

    /// From a room's whole state (the gateway's cache).
    pub fn of_state(state: &'a RoomState, who: &'a Identity) -> Self {
        let me = &who.user.id;
        Self::new(
            &state.info,
            state.members.iter().find(|m| &m.user.id == me),
            state.bans.iter().find(|b| &b.user.id == me),
            who,
        )
    }

    /// From the point reads of one user's access (the HTTP API).
    pub fn of_room(access: &'a RoomAccess, who: &'a Identity) -> Self {
        Self::new(
            &access.info,
            access.member.as_ref(),
            access.ban.as_ref(),
            who,
        )
    }

    pub fn role(&self) -> Option<Role> {
        self.member.map(|m| m.role)
    }

    /// A ban in force (global admins are never kept out).
    pub fn banned(&self) -> bool {
        self.ban.is_some() && !self.global_admin
    }

    /// Room admin or owner, or a global admin.
    pub fn moderates(&self) -> bool {
        self.global_admin || self.role() >= Some(Role::Admin)
    }

    fn owns(&self) -> bool {
        self.global_admin || self.role() == Some(Role::Owner)
    }

    /// Public and restricted rooms for anyone, private ones for members.
    pub fn may_read(&self) -> bool {
        !self.banned()
            && (self.info.visibility != Visibility::Private
                || self.member.is_some()
                || self.global_admin)
    }

    /// Public rooms for anyone who may read, the others for members.
    pub fn may_post(&self) -> bool {
        self.may_read()
            && (self.info.visibility == Visibility::Public
                || self.member.is_some()
                || self.global_admin)
    }

    /// Until when the caller is muted (None: not muted now).
    pub fn muted_until(&self) -> Option<Timestamp> {
        self.member
            .and_then(|m| m.muted_until)
            .filter(|t| *t > self.now)
    }

    /// May the caller act on a user whose role in the room is `theirs`? Nobody acts on the
    /// owner; the owner and global admins act on anyone else; admins on plain members and
    /// non-members.
    pub fn outranks(&self, theirs: Option<Role>) -> bool {
        if theirs == Some(Role::Owner) {
            return false;
        }
        if self.owns() {
            return true;
        }
        self.role() >= Some(Role::Admin) && theirs.unwrap_or(Role::Member) < Role::Admin
    }

    /// May the caller do `action`? The reason when not.
    pub fn check(&self, action: Action<'_>) -> Result<(), Denied> {
        use ErrorCode::{Banned, Forbidden, Muted};
        if self.banned() {
            return deny(Banned, "you are banned from this room");
        }
        match action {
            Action::Read => {
                if !self.may_read() {
                    return deny(Forbidden, "private room: members only");
                }
            }
            Action::Post => {
                if !self.may_read() {
                    return deny(Forbidden, "private room: members only");
                }
                if !self.may_post() {
                    return deny(Forbidden, "only members may post in this room");
                }
                if let Some(until) = self.muted_until() {
                    return deny(Muted, format!("you are muted until {until}"));
                }
            }
            Action::Edit { author } => {
                self.check(Action::Post)?;
                if !self.is_author(author) {
                    return deny(Forbidden, "only the author may edit");
                }
            }
            Action::Delete { author } => {
                if !self.may_read() {
                    return deny(Forbidden, "you may not read this room");
                }
                if !self.is_author(author) && !self.moderates() {
                    return deny(
                        Forbidden,
                        "only the author, a room admin or the owner may delete",
                    );
                }
            }
            Action::Pin => {
                let may_pin =
                    self.moderates() || (self.info.members_can_pin && self.member.is_some());
                if !self.may_read() || !may_pin {
                    return deny(Forbidden, "you may not pin in this room");
                }
            }
            Action::UpdateRoom => {
                if !self.moderates() {
                    return deny(Forbidden, "only the owner or an admin may update the room");
                }
            }
            Action::DeleteRoom => {
                if !self.owns() {
                    return deny(
                        Forbidden,
                        "only the owner or a global admin may delete the room",
                    );
                }
            }
            Action::AddMember { role } => {
                if !self.moderates() {
                    return deny(Forbidden, "only the owner or an admin may add members");
                }
                action.keeps_room_whole()?;
                if role == Role::Admin && !self.owns() {
                    return deny(Forbidden, "only the owner may add admins");
                }
            }
            Action::Remove { role, .. } => {
                if !self.moderates() {
                    return deny(Forbidden, "only the owner or an admin may remove members");
                }
                if !self.outranks(role) {
                    return deny(Forbidden, "you cannot remove that user");
                }
            }
            Action::Ban { target, role } => {
                if !self.moderates() {
                    return deny(Forbidden, "only the owner or an admin may ban");
                }
                if self.is_self(target) || !self.outranks(role) {
                    return deny(Forbidden, "you cannot ban that user");
                }
            }
            Action::Unban => {
                if !self.moderates() {
                    return deny(Forbidden, "only the owner or an admin may unban");
                }
            }
            Action::Mute { target, role } => {
                if !self.moderates() {
                    return deny(Forbidden, "only the owner or an admin may mute");
                }
                if self.is_self(target) || !self.outranks(role) {
                    return deny(Forbidden, "you cannot mute that user");
                }
            }
            Action::Unmute => {
                if !self.moderates() {
                    return deny(Forbidden, "only the owner or an admin may unmute");
                }
            }
            Action::SetRole { .. } => {
                if !self.owns() {
                    return deny(Forbidden, "only the owner may change roles");
                }
                action.keeps_room_whole()?;
            }
            Action::ListBans => {
                if !self.moderates() {
                    return deny(Forbidden, "only the owner or an admin may list bans");
                }
            }
        }
        Ok(())
    }

    fn is_author(&self, author: &str) -> bool {
        self.user == author
    }

    fn is_self(&self, target: &str) -> bool {
        self.user == target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{RoomId, UserRef};

    fn user(id: &str) -> UserRef {
        UserRef {
            id: id.into(),
            name: id.into(),
        }
    }

    fn identity(id: &str, admin: bool) -> Identity {
        Identity {
            user: user(id),
            admin,
            exp: u64::MAX,
        }
    }

    fn member(id: &str, role: Role, muted: bool) -> MemberInfo {
        MemberInfo {
            user: user(id),
            role,
            muted_until: muted.then(|| Timestamp::now().plus_secs(3600)),
            joined_at: Timestamp(0),
        }
    }

    fn room(visibility: Visibility, members_can_pin: bool) -> RoomInfo {
        RoomInfo {
            id: RoomId::new("r").unwrap(),
            name: "r".into(),
            topic: String::new(),
            visibility,
            max_members: None,
            members_can_pin,
            owner: Some("o".into()),
            created_at: Timestamp(0),
        }
    }

    /// The caller of a row: its membership, ban, and token.
    fn standing(who: &str) -> (Option<MemberInfo>, Option<Ban>, Identity) {
        let ban = Ban {
            user: user("c"),
            by: user("o"),
            reason: None,
            until: None,
            at: Timestamp(0),
        };
        match who {
            "none" => (None, None, identity("c", false)),
            "member" => (
                Some(member("c", Role::Member, false)),
                None,
                identity("c", false),
            ),
            "muted" => (
                Some(member("c", Role::Member, true)),
                None,
                identity("c", false),
            ),
            "admin" => (
                Some(member("c", Role::Admin, false)),
                None,
                identity("c", false),
            ),
            "owner" => (
                Some(member("c", Role::Owner, false)),
                None,
                identity("c", false),
            ),
            "gadmin" => (None, None, identity("c", true)),
            "banned" => (None, Some(ban), identity("c", false)),
            other => panic!("{other}"),
        }
    }

    fn outcome(r: Result<(), Denied>) -> &'static str {
        match r {
            Ok(()) => "ok",
            Err(d) => match d.code {
                ErrorCode::Forbidden => "F",
                ErrorCode::Banned => "B",
                ErrorCode::Muted => "M",
                ErrorCode::Invalid => "I",
                other => panic!("unexpected {other:?}"),
            },
        }
    }

    /// role × visibility × action → outcome (ok, F forbidden, B banned, M muted), written out
    /// by hand from the protocol's rules.
    const TABLE: &str = "
        vis        who     read post pin pin+ upd delr addm adda rmm rma banm mutm unban setr bans edo edx dlo dlx
        public     none    ok   ok   F   F    F   F    F    F    F   F   F    F    F     F    F    ok  F   ok  F
        public     member  ok   ok   F   ok   F   F    F    F    F   F   F    F    F     F    F    ok  F   ok  F
        public     muted   ok   M    F   ok   F   F    F    F    F   F   F    F    F     F    F    M   M   ok  F
        public     admin   ok   ok   ok  ok   ok  F    ok   F    ok  F   ok   ok   ok    F    ok   ok  F   ok  ok
        public     owner   ok   ok   ok  ok   ok  ok   ok   ok   ok  ok  ok   ok   ok    ok   ok   ok  F   ok  ok
        public     gadmin  ok   ok   ok  ok   ok  ok   ok   ok   ok  ok  ok   ok   ok    ok   ok   ok  F   ok  ok
        public     banned  B    B    B   B    B   B    B    B    B   B   B    B    B     B    B    B   B   B   B
        restricted none    ok   F    F   F    F   F    F    F    F   F   F    F    F     F    F    F   F   ok  F
        restricted member  ok   ok   F   ok   F   F    F    F    F   F   F    F    F     F    F    ok  F   ok  F
        restricted muted   ok   M    F   ok   F   F    F    F    F   F   F    F    F     F    F    M   M   ok  F
        restricted admin   ok   ok   ok  ok   ok  F    ok   F    ok  F   ok   ok   ok    F    ok   ok  F   ok  ok
        restricted owner   ok   ok   ok  ok   ok  ok   ok   ok   ok  ok  ok   ok   ok    ok   ok   ok  F   ok  ok
        restricted gadmin  ok   ok   ok  ok   ok  ok   ok   ok   ok  ok  ok   ok   ok    ok   ok   ok  F   ok  ok
        restricted banned  B    B    B   B    B   B    B    B    B   B   B    B    B     B    B    B   B   B   B
        private    none    F    F    F   F    F   F    F    F    F   F   F    F    F     F    F    F   F   F   F
        private    member  ok   ok   F   ok   F   F    F    F    F   F   F    F    F     F    F    ok  F   ok  F
        private    muted   ok   M    F   ok   F   F    F    F    F   F   F    F    F     F    F    M   M   ok  F
        private    admin   ok   ok   ok  ok   ok  F    ok   F    ok  F   ok   ok   ok    F    ok   ok  F   ok  ok
        private    owner   ok   ok   ok  ok   ok  ok   ok   ok   ok  ok  ok   ok   ok    ok   ok   ok  F   ok  ok
        private    gadmin  ok   ok   ok  ok   ok  ok   ok   ok   ok  ok  ok   ok   ok    ok   ok   ok  F   ok  ok
        private    banned  B    B    B   B    B   B    B    B    B   B   B    B    B     B    B    B   B   B   B
    ";

    #[test]
    fn the_rules_table() {
        let mut lines = TABLE.lines().map(str::trim).filter(|l| !l.is_empty());
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().skip(2).collect();
        let mut checked = 0;
        for line in lines {
            let cells: Vec<&str> = line.split_whitespace().collect();
            let vis = Visibility::parse(cells[0]).unwrap();
            let (me, ban, who) = standing(cells[1]);
            for (col, want) in header.iter().zip(&cells[2..]) {
                let info = room(vis, *col == "pin+");
                let access = Access::new(&info, me.as_ref(), ban.as_ref(), &who);
                let member = Some(Role::Member);
                let action = match *col {
                    "read" => Action::Read,
                    "post" => Action::Post,
                    "pin" | "pin+" => Action::Pin,
                    "upd" => Action::UpdateRoom,
                    "delr" => Action::DeleteRoom,
                    "addm" => Action::AddMember { role: Role::Member },
                    "adda" => Action::AddMember { role: Role::Admin },
                    "rmm" => Action::Remove {
                        target: "t",
                        role: member,
                    },
                    "rma" => Action::Remove {
                        target: "t",
                        role: Some(Role::Admin),
                    },
                    "banm" => Action::Ban {
                        target: "t",
                        role: member,
                    },
                    "mutm" => Action::Mute {
                        target: "t",
                        role: member,
                    },
                    "unban" => Action::Unban,
                    "setr" => Action::SetRole {
                        target: "t",
                        role: member,
                        to: Role::Admin,
                    },
                    "bans" => Action::ListBans,
                    "edo" => Action::Edit { author: "c" },
                    "edx" => Action::Edit { author: "t" },
                    "dlo" => Action::Delete { author: "c" },
                    "dlx" => Action::Delete { author: "t" },
                    other => panic!("column {other}"),
                };
                let got = outcome(access.check(action));
                assert_eq!(got, *want, "{} {} {col}", cells[0], cells[1]);
                checked += 1;
            }
        }
        assert_eq!(checked, 21 * 19);
    }

    #[test]
    fn nobody_acts_on_the_owner_or_on_themselves_and_roles_are_validated() {
        let info = room(Visibility::Public, false);
        let gadmin = identity("g", true);
        let g = Access::new(&info, None, None, &gadmin);
        let owner = Some(Role::Owner);
        assert_eq!(
            outcome(g.check(Action::Ban {
                target: "o",
                role: owner
            })),
            "F"
        );
        assert_eq!(
            outcome(g.check(Action::Remove {
                target: "o",
                role: owner
            })),
            "F"
        );
        assert_eq!(
            outcome(g.check(Action::Ban {
                target: "g",
                role: None
            })),
            "F"
        );
        assert_eq!(
            outcome(g.check(Action::Mute {
                target: "g",
                role: None
            })),
            "F"
        );
        let to_owner = Action::SetRole {
            target: "t",
            role: Some(Role::Member),
            to: Role::Owner,
        };
        assert_eq!(outcome(g.check(to_owner)), "I");
        let of_owner = Action::SetRole {
            target: "o",
            role: owner,
            to: Role::Admin,
        };
        assert_eq!(outcome(g.check(of_owner)), "F");
        assert_eq!(
            outcome(g.check(Action::AddMember { role: Role::Owner })),
            "I"
        );
        let admin_id = identity("a", false);
        let admin = member("a", Role::Admin, false);
        let a = Access::new(&info, Some(&admin), None, &admin_id);
        assert!(a.outranks(None) && a.outranks(Some(Role::Member)));
        assert!(!a.outranks(Some(Role::Admin)) && !a.outranks(owner));
    }

    #[test]
    fn even_the_server_keeps_a_room_whole() {
        let owner = Some(Role::Owner);
        let member = Some(Role::Member);
        let refused = [
            Action::AddMember { role: Role::Owner },
            Action::SetRole {
                target: "t",
                role: member,
                to: Role::Owner,
            },
            Action::SetRole {
                target: "o",
                role: owner,
                to: Role::Admin,
            },
            Action::Remove {
                target: "o",
                role: owner,
            },
            Action::Ban {
                target: "o",
                role: owner,
            },
            Action::Mute {
                target: "o",
                role: owner,
            },
        ];
        let codes: Vec<_> = refused
            .iter()
            .map(|a| outcome(a.keeps_room_whole()))
            .collect();
        assert_eq!(codes, ["I", "I", "F", "F", "F", "F"]);
        let allowed = [
            Action::AddMember { role: Role::Admin },
            Action::SetRole {
                target: "t",
                role: member,
                to: Role::Admin,
            },
            Action::Ban {
                target: "t",
                role: None,
            },
            Action::Remove {
                target: "t",
                role: member,
            },
            Action::DeleteRoom,
            Action::Post,
        ];
        assert!(allowed.iter().all(|a| a.keeps_room_whole().is_ok()));
    }

    #[test]
    fn an_expired_ban_keeps_nobody_out() {
        let info = room(Visibility::Public, false);
        let who = identity("c", false);
        let ban = Ban {
            user: user("c"),
            by: user("o"),
            reason: None,
            until: Some(Timestamp(1)),
            at: Timestamp(0),
        };
        let a = Access::new(&info, None, Some(&ban), &who);
        assert!(!a.banned());
        assert_eq!(a.check(Action::Post), Ok(()));
    }
}
