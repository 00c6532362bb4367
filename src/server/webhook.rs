//! The webhook endpoint: Clerk's deliveries, checked with [`SvixVerifier`], turned into
//! [`Event`]s. A delivery id seen before is acknowledged without being applied again.
//!
//! `user.updated` / `user.deleted` drop the user's cached profile and memberships;
//! `organization.*` drop the organization's cached profile and member pages;
//! `organizationMembership.*` drop the member's memberships and the organization's member
//! pages (and profile: its `members_count` changed);
//! every `session.*` event drops the user's cached session pages; `session.ended`,
//! `session.revoked` and `session.removed` also revoke the session: its tokens are refused with
//! `SESSION_REVOKED` from then on, on every replica when Redis is configured.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    clerk::svix::SvixVerifier,
    server::events::{Event, Events},
};

/// The path Clerk delivers to.
pub(crate) const WEBHOOK_PATH: &str = "/webhooks/clerk";
/// Largest webhook body accepted.
pub(crate) const MAX_WEBHOOK_BYTES: usize = 1024 * 1024;

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

/// What a webhook event asks us to do.
pub(crate) fn events_for(kind: &str, data: &Value) -> Vec<Event> {
    let s = |v: &Value| v.as_str().map(str::to_owned);
    match kind {
        // `user.created` too: a "not found" remembered for the id is forgotten.
        "user.created" | "user.updated" | "user.deleted" => s(&data["id"])
            .map(|id| vec![Event::UserChanged { id }])
            .unwrap_or_default(),
        k if k.starts_with("organization.") => s(&data["id"])
            .map(|id| vec![Event::OrganizationChanged { id }])
            .unwrap_or_default(),
        k if k.starts_with("organizationMembership.") => {
            let user = s(&data["public_user_data"]["user_id"])
                .map(|user_id| Event::MembershipsChanged { user_id });
            let org = s(&data["organization"]["id"]).map(|id| Event::OrganizationChanged { id });
            user.into_iter().chain(org).collect()
        }
        // Every session event changes its user's list of sessions; these three end it too.
        // The revocation first: it is the one that refuses tokens.
        k if k.starts_with("session.") => {
            let mut out: Vec<Event> = Vec::new();
            if matches!(k, "session.ended" | "session.revoked" | "session.removed") {
                out.extend(s(&data["id"]).map(|id| Event::SessionRevoked { id }));
            }
            out.extend(s(&data["user_id"]).map(|user_id| Event::SessionsChanged { user_id }));
            out
        }
        _ => Vec::new(),
    }
}

struct HookState {
    verifier: SvixVerifier,
    events: Events,
    seen: moka::sync::Cache<String, ()>,
}

/// The webhook route, to mount on the service's HTTP port.
pub(crate) fn router(verifier: SvixVerifier, events: Events) -> Router {
    let seen = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(verifier.tolerance * 2 + Duration::from_secs(60))
        .build();
    Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .with_state(Arc::new(HookState {
            verifier,
            events,
            seen,
        }))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn receive(State(st): State<Arc<HookState>>, headers: HeaderMap, body: Bytes) -> Response {
    if body.len() > MAX_WEBHOOK_BYTES {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let id = match st.verifier.verify(&headers, &body, now_secs()) {
        Ok(id) => id.to_owned(),
        Err(e) => {
            tracing::warn!(error = %e, "webhook refused");
            return refuse(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    if st.seen.contains_key(&id) {
        return (StatusCode::OK, Json(json!({"status": "duplicate"}))).into_response();
    }
    let env: Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(_) => return refuse(StatusCode::BAD_REQUEST, "not a Clerk event"),
    };
    let events = events_for(&env.kind, &env.data);
    tracing::info!(event = %env.kind, delivery = %id, applied = events.len(), "webhook received");
    for e in events {
        st.events.publish(e).await;
    }
    st.seen.insert(id, ());
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, Json(json!({"error": why}))).into_response()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_mapping() {
        let d = json!({"id": "sess_1"});
        for k in ["session.ended", "session.revoked", "session.removed"] {
            assert_eq!(
                events_for(k, &d),
                [Event::SessionRevoked {
                    id: "sess_1".into()
                }]
            );
        }
        assert!(events_for("session.created", &d).is_empty());
        // With the user (as Clerk sends it), its session pages go too.
        let d = json!({"id": "sess_1", "user_id": "user_1"});
        let pages = Event::SessionsChanged {
            user_id: "user_1".into(),
        };
        assert_eq!(
            events_for("session.created", &d),
            std::slice::from_ref(&pages)
        );
        assert_eq!(
            events_for("session.revoked", &d),
            [
                Event::SessionRevoked {
                    id: "sess_1".into()
                },
                pages
            ]
        );
        assert_eq!(
            events_for("user.created", &json!({"id": "user_1"})),
            [Event::UserChanged {
                id: "user_1".into()
            }]
        );
        assert_eq!(
            events_for("user.deleted", &json!({"id": "user_1", "deleted": true})),
            [Event::UserChanged {
                id: "user_1".into()
            }]
        );
        assert_eq!(
            events_for(
                "organizationMembership.updated",
                &json!({"public_user_data": {"user_id": "user_2"}})
            ),
            [Event::MembershipsChanged {
                user_id: "user_2".into()
            }]
        );
        // With the organization (as Clerk sends it), its member pages go too.
        assert_eq!(
            events_for(
                "organizationMembership.deleted",
                &json!({"organization": {"id": "org_1"}, "public_user_data": {"user_id": "user_2"}})
            ),
            [
                Event::MembershipsChanged {
                    user_id: "user_2".into()
                },
                Event::OrganizationChanged { id: "org_1".into() }
            ]
        );
        for kind in [
            "organization.created",
            "organization.updated",
            "organization.deleted",
        ] {
            assert_eq!(
                events_for(kind, &json!({"id": "org_1", "object": "organization"})),
                [Event::OrganizationChanged { id: "org_1".into() }]
            );
        }
        assert!(events_for("organization.updated", &json!({"id": ["org_1"]})).is_empty());
        assert!(
            events_for("organizationInvitation.created", &json!({"id": "orginv_1"})).is_empty()
        );
        assert!(events_for("user.updated", &json!({"id": 5})).is_empty());
    }
}
