//! `refresh`: a new token for the connection before its current one expires (the connection
//! is told `token_expiring` ahead of time; see [`crate::expiry`]).
//!
//! The token is checked as the upgrade checks one — the same keys (JWKS included), issuer and
//! audience — and must be for the same user (`sub`) and not yet expired (no leeway: the
//! connection would be closed at once). The connection keeps its display name and global-admin
//! standing from the upgrade: a token whose `roles` make a different admin standing is refused
//! (reconnect with it), so a revoked admin role never lives on in a refreshed connection.

use proto::client::Refresh;
use proto::{ErrorCode, ServerEvent};

use super::{err, Result, RunOnSession, SessionCx};

impl RunOnSession for Refresh {
    async fn run(self, cx: &mut SessionCx<'_>) -> Result<Option<ServerEvent>> {
        let new = cx
            .node
            .verifier
            .verify(&self.token)
            .await
            .map_err(|e| err(ErrorCode::Unauthorized, e.to_string()))?;
        if new.exp <= proto::auth::now_s() {
            return Err(err(ErrorCode::Unauthorized, "the token has expired"));
        }
        let current = &cx.caller.identity;
        if new.user.id != current.user.id {
            return Err(err(
                ErrorCode::Forbidden,
                "the token is for another user than this connection's",
            ));
        }
        if new.admin != current.admin {
            return Err(err(
                ErrorCode::Forbidden,
                "the token's roles differ from this connection's: reconnect with it",
            ));
        }
        if !cx
            .node
            .expiry
            .rewatch(&cx.caller.handle, current.exp, new.exp)
        {
            return Err(err(
                ErrorCode::Unauthorized,
                "the connection's token has already expired",
            ));
        }
        cx.caller.identity.exp = new.exp;
        Ok(Some(ServerEvent::Ack {
            r#ref: cx.r#ref.clone(),
            id: None,
            seq: None,
            ts: None,
        }))
    }
}
