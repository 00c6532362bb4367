//! The walk-through `dev` prints: numbered steps of commands to paste, in order, into another
//! terminal, each with the result it shows.
//!
//! The text is a bash script (zsh too, with `setopt interactivecomments`): pasted whole, from
//! the first step to the last line, it runs. It is also a contract that `tests/walkthrough`
//! executes line by line, so its shape is fixed:
//! - a step starts with a comment `# N. …` (continued on comment lines `#    …`);
//! - a command is a line that is not a comment — nothing else is;
//! - an expected result is a comment `#    → a, b` under its command: the command prints every
//!   fragment (`Code: X` means grpcurl's error with that code, and the command fails with 64 +
//!   the code; `Failed …` means grpcurl could not call at all, and exits 1);
//! - any other comment is prose, and holds no character zsh would act on (no quote but
//!   paired `"`, no `$`, parentheses, redirections or globs): pasted into zsh without
//!   `interactivecomments`, a comment line is a command named `#`, which fails harmlessly.
//!
//! Commands never carry trailing `#` comments (zsh, without `interactivecomments`, passes
//! them to the command as arguments), every value a later step needs is in a variable set by
//! an earlier one, and `$TOKEN` stays the one-hour dev token throughout.

use std::fmt::Write as _;

use super::dev::DEV_SPIFFE_ID;

/// The last line `dev` prints: the walk-through is complete above it.
pub const END_LINE: &str = "# dev is running. Ctrl-C in its terminal stops it.";

/// Everything the walk-through names.
pub struct Walkthrough<'a> {
    /// AuthService's gRPC address (`host:port`).
    pub auth: String,
    /// The emulator's URL (`http://host:port`).
    pub emu: String,
    /// AuthService's webhook URL.
    pub webhooks: String,
    /// AuthService's metrics URL.
    pub metrics: String,
    /// The dev session token (one hour).
    pub token: &'a str,
    /// The dev token's user.
    pub user_id: &'a str,
    /// The dev token's session (revoked in the last step).
    pub session_id: &'a str,
    /// The dev user's other signed-in device, signed out from the dev session.
    pub phone_session_id: &'a str,
    /// That device's token (one hour).
    pub phone_token: &'a str,
    /// The dev token's organization.
    pub org_id: &'a str,
    /// Another organization.
    pub other_org_id: &'a str,
    /// Its admin (Linus).
    pub linus: &'a str,
    /// Another user (Grace), whom machine A may read and the dev user may not.
    pub other_user: &'a str,
    /// Machine A: on the identity-query allowlist; calls B.
    pub machine_a: &'a str,
    /// Machine A's secret key.
    pub machine_a_secret: &'a str,
    /// Machine B.
    pub machine_b: &'a str,
    /// `--tls`: the directory holding `ca.pem`, `client.pem` and `client-key.pem`.
    pub certs: Option<String>,
    /// Where the Orders example verifying in-process listens.
    pub orders_in_process: String,
    /// Where the Orders example delegating to AuthService listens.
    pub orders_delegated: String,
}

impl Walkthrough<'_> {
    /// grpcurl's transport flags for AuthService.
    fn grpcurl(&self) -> &'static str {
        if self.certs.is_some() {
            "grpcurl -cacert $CERTS/ca.pem -cert $CERTS/client.pem -key $CERTS/client-key.pem"
        } else {
            "grpcurl -plaintext"
        }
    }

    /// How the examples reach AuthService.
    fn auth_service_flags(&self) -> &'static str {
        if self.certs.is_some() {
            "https://$AUTH --tls-ca $CERTS/ca.pem --tls-cert $CERTS/client.pem --tls-key $CERTS/client-key.pem"
        } else {
            "http://$AUTH"
        }
    }

    /// The walk-through, ready to print.
    pub fn render(&self) -> String {
        let g = self.grpcurl();
        let tls = self.certs.is_some();
        let to_auth = self.auth_service_flags();
        let Walkthrough {
            user_id,
            session_id,
            phone_session_id,
            org_id,
            other_org_id,
            linus,
            other_user,
            ..
        } = *self;
        let mut out = String::new();
        let mut step = 0;
        let mut heading = |out: &mut String, text: &str| {
            step += 1;
            let _ = write!(out, "\n# {step}. ");
            for (i, line) in text.lines().enumerate() {
                if i > 0 {
                    out.push_str("\n#    ");
                }
                out.push_str(line);
            }
            out.push_str("\n\n");
        };
        let cmd = |out: &mut String, command: &str, expect: &str| {
            out.push_str(command);
            out.push('\n');
            if !expect.is_empty() {
                let _ = writeln!(out, "#    → {expect}");
            }
        };
        // `VerifyToken` with these JSON fields (shell-escaped for the double quotes around them).
        let verify = |fields: &str| {
            format!(r#"{g} -d "{{{fields}}}" $AUTH clerk.auth.v1.AuthService/VerifyToken"#)
        };
        let stats = "curl -s -w '\\n' $EMU/emulator/stats";
        let reset = "curl -s -o /dev/null -X POST $EMU/emulator/stats/reset";

        out.push_str(
            "# Paste what follows into another terminal in this directory, from the top: it is a\n\
             # bash script. In zsh, run setopt interactivecomments first. Under each command,\n\
             # after →, is what it prints.\n",
        );

        heading(
            &mut out,
            "Where everything is, and a session token: user_2dev…, admin of the organization\n\
             acme, valid for one hour. Every later step uses these variables.",
        );
        cmd(
            &mut out,
            &format!(
                "export AUTH={} EMU={} WEBHOOKS={} METRICS={}",
                self.auth, self.emu, self.webhooks, self.metrics
            ),
            "",
        );
        cmd(
            &mut out,
            &format!(
                "export MACHINE_A={} MACHINE_A_SECRET={} MACHINE_B={}",
                self.machine_a, self.machine_a_secret, self.machine_b
            ),
            "",
        );
        cmd(
            &mut out,
            &format!(
                "export ORDERS_IN_PROCESS={} ORDERS_DELEGATED={}",
                self.orders_in_process, self.orders_delegated
            ),
            "",
        );
        if let Some(certs) = &self.certs {
            cmd(&mut out, &format!("export CERTS={certs}"), "");
        }
        cmd(&mut out, &format!("export TOKEN={}", self.token), "");
        cmd(&mut out, &format!("export PHONE={}", self.phone_token), "");

        heading(
            &mut out,
            "Verify it. grpcurl needs no proto files: AuthService offers reflection. The keys\n\
             came from the JWKS of the emulator once, at start: verifying makes no request,\n\
             as the counts of the emulator show.",
        );
        cmd(&mut out, reset, "");
        cmd(
            &mut out,
            &verify(r#"\"token\":\"$TOKEN\""#),
            &format!(r#""userId": "{user_id}", "role": "org:admin""#),
        );
        cmd(
            &mut out,
            &format!("{g} $AUTH grpc.health.v1.Health/Check"),
            r#""status": "SERVING""#,
        );
        cmd(
            &mut out,
            &format!("{g} $AUTH describe clerk.auth.v1.AuthService"),
            "clerk.auth.v1.AuthService is a service",
        );
        cmd(&mut out, stats, r#""requests":{}"#);

        heading(
            &mut out,
            "Ten identity queries, one Backend API request for the user. Machine A, on the\n\
             identity-query allowlist, reads user Grace ten times: AuthService asks Clerk once\n\
             and answers the rest from its cache. The emulator counts what it was asked, by\n\
             endpoint.",
        );
        cmd(
            &mut out,
            "M2M=$(cargo run --release -q -- token --emulator-url $EMU --m2m --machine $MACHINE_A)",
            "",
        );
        cmd(&mut out, reset, "");
        cmd(
            &mut out,
            &format!(
                r#"for i in 1 2 3 4 5 6 7 8 9 10; do {g} -H "authorization: Bearer $M2M" -d '{{"user_id":"{other_user}"}}' $AUTH clerk.auth.v1.AuthService/GetUser > /dev/null; done"#
            ),
            "",
        );
        // With mTLS the allowlisted certificate is the caller: the M2M token is not verified.
        cmd(
            &mut out,
            stats,
            if tls {
                r#""GET /v1/users/{user_id}":1"#
            } else {
                r#""GET /v1/users/{user_id}":1, "POST /m2m_tokens/verify":1"#
            },
        );
        cmd(
            &mut out,
            &format!(
                r#"{g} -H "authorization: Bearer $M2M" -d '{{"user_id":"{other_user}"}}' $AUTH clerk.auth.v1.AuthService/GetUser"#
            ),
            r#""firstName": "Grace""#,
        );

        if tls {
            heading(
                &mut out,
                &format!(
                    "Who may ask. The port takes only clients with a certificate from the CA of dev,\n\
                     and yours, SPIFFE ID {DEV_SPIFFE_ID},\n\
                     is on the identity-query allowlist: with it, even the token of a user may read\n\
                     another user. A second token, for a member, goes into its own variable."
                ),
            );
        } else {
            heading(
                &mut out,
                "What a user may ask: about themselves, not about others. A second token, for a\n\
                 member, goes into its own variable.",
            );
        }
        cmd(
            &mut out,
            &format!(
                r#"{g} -H "authorization: Bearer $TOKEN" $AUTH clerk.auth.v1.AuthService/WhoAmI"#
            ),
            &format!(r#""userId": "{user_id}""#),
        );
        cmd(
            &mut out,
            &format!(
                r#"{g} -H "authorization: Bearer $TOKEN" -d '{{"user_id":"{other_user}"}}' $AUTH clerk.auth.v1.AuthService/GetUser"#
            ),
            if tls {
                r#""firstName": "Grace""#
            } else {
                "Code: PermissionDenied, CALLER_NOT_ALLOWED"
            },
        );
        if tls {
            cmd(
                &mut out,
                "grpcurl -cacert $CERTS/ca.pem $AUTH list",
                "Failed to dial target host",
            );
        }
        cmd(
            &mut out,
            &format!(
                "MEMBER=$(cargo run --release -q -- token --emulator-url $EMU --org {org_id} --org-slug acme --role member --permission org:invoices:read --expires-in 3600)"
            ),
            "",
        );
        cmd(
            &mut out,
            &verify(r#"\"token\":\"$MEMBER\""#),
            r#""role": "org:member", "org:invoices:read""#,
        );

        // As whom the identity queries below ask: over mTLS the allowlisted certificate is a
        // trusted caller by itself.
        let bearer = |var: &str, rpc: &str, body: &str| {
            format!(
                r#"{g} -H "authorization: Bearer ${var}" -d '{body}' $AUTH clerk.auth.v1.AuthService/{rpc}"#
            )
        };
        let as_user = |rpc: &str, body: &str| bearer("TOKEN", rpc, body);
        if tls {
            heading(
                &mut out,
                "Signed-in devices. Your certificate is a trusted caller: it lists the sessions of\n\
                 any user and revokes any of them, with no token at all. Without --tls, dev\n\
                 shows the user doing it for itself, refused until its token shows a fresh\n\
                 second factor. Either way the token of the phone is refused at once.",
            );
            cmd(
                &mut out,
                &format!(
                    r#"{g} -d '{{"user_id":"{user_id}"}}' $AUTH clerk.auth.v1.AuthService/ListSessions"#
                ),
                &format!(r#""id": "{phone_session_id}", "browserName": "Chrome""#),
            );
            cmd(
                &mut out,
                &format!(
                    r#"{g} -d '{{"session_id":"{phone_session_id}"}}' $AUTH clerk.auth.v1.AuthService/RevokeSession"#
                ),
                r#""status": "revoked""#,
            );
        } else {
            heading(
                &mut out,
                "Signed-in devices: the user lists its sessions, the one of TOKEN marked current,\n\
                 and signs out its phone. That needs a second factor within 10 minutes, the strict\n\
                 reverification of Clerk: refused with what to ask for, then allowed for a token\n\
                 of the same session showing one, fva 0,2. The token of the phone is refused at once.",
            );
            cmd(
                &mut out,
                &as_user("ListSessions", &format!(r#"{{"user_id":"{user_id}"}}"#)),
                &format!(
                    r#""isCurrent": true, "id": "{phone_session_id}", "browserName": "Chrome""#
                ),
            );
            cmd(
                &mut out,
                &as_user(
                    "RevokeSession",
                    &format!(r#"{{"session_id":"{phone_session_id}"}}"#),
                ),
                r#"Code: PermissionDenied, REVERIFICATION_REQUIRED, "level":"second_factor""#,
            );
            cmd(
                &mut out,
                &format!(
                    "FRESH=$(cargo run --release -q -- token --emulator-url $EMU --user {user_id} --session {session_id} --fva 0,2 --expires-in 600)"
                ),
                "",
            );
            cmd(
                &mut out,
                &bearer(
                    "FRESH",
                    "RevokeSession",
                    &format!(r#"{{"session_id":"{phone_session_id}"}}"#),
                ),
                r#""status": "revoked""#,
            );
        }
        cmd(
            &mut out,
            &verify(r#"\"token\":\"$PHONE\""#),
            "Code: Unauthenticated, SESSION_REVOKED",
        );

        heading(
            &mut out,
            &if tls {
                "Organizations for tenants. Your certificate reads any organization. Without\n\
                 --tls, dev shows the rule for users: the admin of acme lists its members, while\n\
                 a billing member, lacking org:sys_memberships:read, and the admin of another\n\
                 organization are refused."
                    .to_owned()
            } else {
                "Organizations for tenants: the admin of acme, TOKEN, reads it and lists its\n\
                 members. Grace, its billing member, lacks org:sys_memberships:read, and\n\
                 Linus administers another organization, globex: both are refused."
                    .to_owned()
            },
        );
        let org_body = format!(r#"{{"organization_id":"{org_id}"}}"#);
        cmd(
            &mut out,
            &as_user("GetOrganization", &org_body),
            r#""slug": "acme", "membersCount": 2"#,
        );
        cmd(
            &mut out,
            &as_user("ListOrganizationMembers", &org_body),
            r#""role": "org:billing", "firstName": "Grace", "role": "org:admin", "totalCount": 2"#,
        );
        if !tls {
            cmd(
                &mut out,
                &format!(
                    "GRACE=$(cargo run --release -q -- token --emulator-url $EMU --user {other_user} --org {org_id} --org-slug acme --role billing --permission org:invoices:read --expires-in 600)"
                ),
                "",
            );
            cmd(
                &mut out,
                &bearer("GRACE", "ListOrganizationMembers", &org_body),
                r#"Code: PermissionDenied, ORG_PERMISSION_REQUIRED, "permission":"org:sys_memberships:read""#,
            );
            cmd(
                &mut out,
                &format!(
                    "LINUS=$(cargo run --release -q -- token --emulator-url $EMU --user {linus} --org {other_org_id} --org-slug globex --role admin --expires-in 600)"
                ),
                "",
            );
            cmd(
                &mut out,
                &bearer("LINUS", "ListOrganizationMembers", &org_body),
                "Code: PermissionDenied, CALLER_NOT_ALLOWED",
            );
        }

        heading(
            &mut out,
            "Machine tokens: VerifyToken takes them when the request names their type.\n\
             token --api-key, --oauth and --jwt mint the other kinds.",
        );
        cmd(
            &mut out,
            &verify(r#"\"token\":\"$M2M\",\"acceptedTokenTypes\":[\"TOKEN_TYPE_M2M_TOKEN\"]"#),
            r#""tokenType": "TOKEN_TYPE_M2M_TOKEN""#,
        );
        cmd(
            &mut out,
            &verify(r#"\"token\":\"$M2M\""#),
            "Code: Unauthenticated, TOKEN_TYPE_MISMATCH",
        );

        heading(
            &mut out,
            "Machine to machine: service A calls service B, which asks this AuthService to\n\
             verify the M2M token of A. A call without a token is refused.",
        );
        cmd(
            &mut out,
            &format!(
                "CLERK_API_URL=$EMU CLERK_MACHINE_SECRET_KEY=$MACHINE_A_SECRET cargo run --release -q --example machine_to_machine -- --auth-service {to_auth} --machine-id $MACHINE_B"
            ),
            "A → B call 1: OK, anonymous → B: Unauthenticated",
        );

        heading(
            &mut out,
            "Protect your own service: the Orders example, verifying in-process and delegating\n\
             to AuthService, in the background. Both follow the revocations of this AuthService\n\
             as machine A. The curl line waits until both listen. Ping is public, ListOrders\n\
             takes any session, DeleteOrder needs the permission org:orders:delete.",
        );
        cmd(&mut out, "cargo build --release --examples", "");
        cmd(
            &mut out,
            &format!(
                "CLERK_JWKS_URL=$EMU/.well-known/jwks.json CLERK_API_URL=$EMU CLERK_MACHINE_SECRET_KEY=$MACHINE_A_SECRET cargo run --release -q --example in_process -- --listen $ORDERS_IN_PROCESS --revocations-from {to_auth} & IN_PROCESS_PID=$!"
            ),
            "",
        );
        cmd(
            &mut out,
            &format!(
                "CLERK_API_URL=$EMU CLERK_MACHINE_SECRET_KEY=$MACHINE_A_SECRET cargo run --release -q --example delegated -- --listen $ORDERS_DELEGATED --auth-service {to_auth} & DELEGATED_PID=$!"
            ),
            "",
        );
        cmd(
            &mut out,
            "curl -s -o /dev/null -o /dev/null --retry 60 --retry-connrefused --retry-delay 1 --http2-prior-knowledge http://$ORDERS_IN_PROCESS/ http://$ORDERS_DELEGATED/",
            "",
        );
        cmd(
            &mut out,
            "grpcurl -plaintext $ORDERS_IN_PROCESS examples.orders.v1.Orders/Ping",
            r#""message": "pong""#,
        );
        for addr in ["$ORDERS_IN_PROCESS", "$ORDERS_DELEGATED"] {
            cmd(
                &mut out,
                &format!(
                    r#"grpcurl -plaintext -H "authorization: Bearer $TOKEN" {addr} examples.orders.v1.Orders/ListOrders"#
                ),
                &format!(r#""description": "first order of {org_id}""#),
            );
        }
        cmd(
            &mut out,
            r#"grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"order_id":"ord_1"}' $ORDERS_DELEGATED examples.orders.v1.Orders/DeleteOrder"#,
            "Code: PermissionDenied",
        );

        heading(
            &mut out,
            "Behind Caddy or Traefik: the proxy asks /auth about each request, which it names in\n\
             X-Forwarded headers. Allowed with the identity for the app, and without a token 401.",
        );
        let ask = "curl -s -o /dev/null -D - -H 'X-Forwarded-Method: GET' \
                   -H 'X-Forwarded-Host: api.example.com' -H 'X-Forwarded-Uri: /orders'";
        cmd(
            &mut out,
            &format!(r#"{ask} -H "Authorization: Bearer $TOKEN" $WEBHOOKS/auth"#),
            &format!("HTTP/1.1 200 OK, x-clerk-user-id: {user_id}, x-clerk-org-id: {org_id}"),
        );
        cmd(
            &mut out,
            &format!("{ask} $WEBHOOKS/auth"),
            "HTTP/1.1 401 Unauthorized, www-authenticate: Bearer",
        );

        heading(
            &mut out,
            "Revoke the session. The emulator sends a signed session.revoked webhook to\n\
             AuthService, on its webhooks port, and returns once AuthService has taken it.\n\
             The examples learn it from the revocation stream of AuthService.",
        );
        cmd(
            &mut out,
            &format!(
                r#"curl -s -w '\n' -X POST $EMU/emulator/sessions/{session_id}/status -H 'content-type: application/json' -d '{{"status":"revoked"}}'"#
            ),
            r#""status":"revoked""#,
        );
        cmd(
            &mut out,
            &verify(r#"\"token\":\"$TOKEN\""#),
            "Code: Unauthenticated, SESSION_REVOKED",
        );

        heading(
            &mut out,
            "Stop the examples. Ctrl-C in the terminal of dev stops dev.",
        );
        cmd(&mut out, "kill $IN_PROCESS_PID $DELEGATED_PID", "");
        out.push('\n');
        out.push_str(END_LINE);
        out
    }
}
