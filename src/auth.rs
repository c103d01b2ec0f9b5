//! Who may read or write which job: HS256 JWTs signed with `EVENTGATE_JWT_SECRET`.
//!
//! Any JWT library can mint the tokens, so a host application needs nothing of ours.
//! Claims: `exp` (required), `nbf` (honoured when present), `scope` (space-separated
//! `read`, `write`), `jobs` (job ids or `["*"]`), `sub` (logged), and `iss` / `aud`,
//! checked when the gateway is given `--jwt-issuer` / `--jwt-audience`. A token is taken
//! from `Authorization: Bearer`, the HttpOnly cookie `eventgate_token`, or
//! `?access_token=` (EventSource cannot send headers), in that order; an `Authorization`
//! header of another kind (`Basic`, added by a proxy) is not a token and hides nothing.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Name of the cookie that may carry the token.
pub const COOKIE: &str = "eventgate_token";

/// The longest lifetime `eventgate token` mints, and the furthest `exp` the gateway
/// plans for: a stream's end-of-credentials timer is set no later than this from now,
/// so no `exp` can overflow a clock (a token valid for longer is still valid; its
/// streams are just asked to reconnect once a decade).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 366 * 86400);

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Read,
    Write,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
        }
    }
}

/// The claims of a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub exp: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    #[serde(default)]
    pub jobs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Why a request was refused; the label of `eventgate_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Missing,
    Invalid,
    Expired,
    Scope,
    Job,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Failure::Missing,
        Failure::Invalid,
        Failure::Expired,
        Failure::Scope,
        Failure::Job,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Invalid => "invalid",
            Failure::Expired => "expired",
            Failure::Scope => "scope",
            Failure::Job => "job",
        }
    }

    /// 401 for a token problem, 403 for a valid token that does not reach this far.
    pub fn is_forbidden(self) -> bool {
        matches!(self, Failure::Scope | Failure::Job)
    }

    pub fn message(self) -> &'static str {
        match self {
            Failure::Missing => "a token is required",
            Failure::Invalid => "the token is invalid",
            Failure::Expired => "the token has expired",
            Failure::Scope => "the token does not allow this",
            Failure::Job => "the token does not cover this job",
        }
    }
}

/// Where a request's token came from. A cookie is sent by the browser on its own, so a
/// write authenticated by it needs more proof of intent (see the HTTP layer's CSRF check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Auth is off: no token.
    None,
    Bearer,
    Cookie,
    Query,
}

/// What a request is allowed, once its token checked out.
#[derive(Debug, Clone)]
pub struct Grant {
    /// `None` when auth is off.
    pub claims: Option<Claims>,
    /// Where the token was found.
    pub via: Transport,
}

impl Grant {
    /// When the token expires, if there is one; never later than [`MAX_TTL`] from now,
    /// so a caller can add it to a clock without overflow.
    pub fn expires_at(&self) -> Option<SystemTime> {
        let claims = self.claims.as_ref()?;
        let now = SystemTime::now();
        let cap = now + MAX_TTL;
        Some(
            UNIX_EPOCH
                .checked_add(Duration::from_secs(claims.exp))
                .map_or(cap, |at| at.min(cap)),
        )
    }

    /// Whether the grant covers a job (for list filtering).
    pub fn covers(&self, job: Uuid) -> bool {
        match &self.claims {
            None => true,
            Some(c) => covers(c, job),
        }
    }

    /// Whether the grant covers every job.
    pub fn covers_all(&self) -> bool {
        match &self.claims {
            None => true,
            Some(c) => c.jobs.iter().any(|j| j == "*"),
        }
    }

    pub fn subject(&self) -> Option<&str> {
        self.claims.as_ref().and_then(|c| c.sub.as_deref())
    }
}

fn covers(claims: &Claims, job: Uuid) -> bool {
    claims
        .jobs
        .iter()
        .any(|j| j == "*" || j.parse::<Uuid>().is_ok_and(|id| id == job))
}

/// The gateway's verifier: off, or HS256 with a secret.
#[derive(Clone)]
pub struct Auth {
    key: Option<DecodingKey>,
    /// `iss` a token must carry, when set.
    issuer: Option<String>,
    /// An `aud` a token must carry, when set.
    audience: Option<String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key {
            None => f.write_str("Auth(off)"),
            Some(_) => f
                .debug_struct("Auth")
                .field("alg", &"hs256")
                .field("secret", &"hidden")
                .field("issuer", &self.issuer)
                .field("audience", &self.audience)
                .finish(),
        }
    }
}

impl Auth {
    pub fn off() -> Auth {
        Auth {
            key: None,
            issuer: None,
            audience: None,
        }
    }

    pub fn hs256(secret: &[u8]) -> Auth {
        Auth {
            key: Some(DecodingKey::from_secret(secret)),
            issuer: None,
            audience: None,
        }
    }

    /// Tokens must carry this `iss`.
    pub fn with_issuer(mut self, issuer: Option<String>) -> Auth {
        self.issuer = issuer.filter(|s| !s.is_empty());
        self
    }

    /// Tokens must carry this `aud` (a string, or one of an array).
    pub fn with_audience(mut self, audience: Option<String>) -> Auth {
        self.audience = audience.filter(|s| !s.is_empty());
        self
    }

    pub fn is_on(&self) -> bool {
        self.key.is_some()
    }

    /// Checks the request's token for `scope` on `job` (`None`: no particular job,
    /// like the job list).
    pub fn check<B>(
        &self,
        req: &hyper::Request<B>,
        scope: Scope,
        job: Option<Uuid>,
    ) -> Result<Grant, Failure> {
        let Some(key) = &self.key else {
            return Ok(Grant {
                claims: None,
                via: Transport::None,
            });
        };
        let (token, via) = token_of(req).ok_or(Failure::Missing)?;
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp"];
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Without a configured audience, `aud` is not ours to judge: the library would
        // refuse every token that carries one.
        validation.validate_aud = self.audience.is_some();
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let claims = jsonwebtoken::decode::<Claims>(&token, key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Failure::Expired,
                _ => Failure::Invalid,
            })?
            .claims;
        // Expired at `exp` itself, not a second later: a stream ends at `exp`, and its
        // reconnect in that same second must not be let in again.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if claims.exp <= now {
            return Err(Failure::Expired);
        }
        if !claims.scope.split_whitespace().any(|s| s == scope.name()) {
            return Err(Failure::Scope);
        }
        if let Some(job) = job {
            if !covers(&claims, job) {
                return Err(Failure::Job);
            }
        }
        Ok(Grant {
            claims: Some(claims),
            via,
        })
    }
}

/// The token of a request and where it was: a Bearer header, then the cookie, then the
/// query. Only a Bearer header is a token: `Basic` credentials (a proxy's, say) are
/// passed over, not taken for a bad token that would hide a valid cookie.
fn token_of<B>(req: &hyper::Request<B>) -> Option<(String, Transport)> {
    let bearer = req
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .find_map(|value| {
            let (kind, token) = value.to_str().ok()?.trim().split_once(' ')?;
            let token = token.trim();
            (kind.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
        });
    if let Some(token) = bearer {
        return Some((token, Transport::Bearer));
    }
    for value in req.headers().get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some((name, token)) = pair.trim().split_once('=') {
                if name == COOKIE && !token.is_empty() {
                    return Some((token.to_string(), Transport::Cookie));
                }
            }
        }
    }
    req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "access_token" && !v.is_empty()).then(|| (v.to_string(), Transport::Query))
        })
    })
}

/// Mints a token (`eventgate token`).
pub fn mint(
    secret: &[u8],
    scopes: &[Scope],
    jobs: &[String],
    ttl: Duration,
    sub: Option<String>,
) -> Result<String, crate::Error> {
    if ttl > MAX_TTL {
        return Err(crate::Error::config(format!(
            "--ttl may be at most {} days",
            MAX_TTL.as_secs() / 86400
        )));
    }
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ttl)
        .as_secs();
    let scope = scopes
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(" ");
    let claims = Claims {
        exp,
        scope,
        jobs: jobs.to_vec(),
        sub,
        nbf: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| crate::Error::config(format!("cannot sign token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(header: Option<&str>, cookie: Option<&str>, query: &str) -> hyper::Request<()> {
        let mut b = hyper::Request::get(format!("/x{query}"));
        if let Some(h) = header {
            b = b.header("authorization", h);
        }
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn every_transport_and_every_refusal() {
        let auth = Auth::hs256(b"s3cret-s3cret");
        let job = Uuid::new_v4();
        let hour = Duration::from_secs(3600);
        let read = mint(
            b"s3cret-s3cret",
            &[Scope::Read],
            &[job.to_string()],
            hour,
            None,
        )
        .unwrap();
        let bearer = format!("Bearer {read}");
        assert!(auth
            .check(&req(Some(&bearer), None, ""), Scope::Read, Some(job))
            .is_ok());
        let cookie = format!("a=b; {COOKIE}={read}");
        assert!(auth
            .check(&req(None, Some(&cookie), ""), Scope::Read, Some(job))
            .is_ok());
        let query = format!("?x=1&access_token={read}");
        assert!(auth
            .check(&req(None, None, &query), Scope::Read, Some(job))
            .is_ok());

        let check = |r| auth.check(&r, Scope::Read, Some(job)).unwrap_err();
        assert_eq!(check(req(None, None, "")), Failure::Missing);
        let forged = mint(b"other", &[Scope::Read], &["*".into()], hour, None).unwrap();
        assert_eq!(
            check(req(Some(&format!("Bearer {forged}")), None, "")),
            Failure::Invalid
        );
        let other_job = Uuid::new_v4();
        assert_eq!(
            auth.check(&req(Some(&bearer), None, ""), Scope::Read, Some(other_job))
                .unwrap_err(),
            Failure::Job
        );
        assert_eq!(
            auth.check(&req(Some(&bearer), None, ""), Scope::Write, Some(job))
                .unwrap_err(),
            Failure::Scope
        );
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                exp: 1000,
                scope: "read".into(),
                jobs: vec!["*".into()],
                sub: None,
                nbf: None,
            },
            &EncodingKey::from_secret(b"s3cret-s3cret"),
        )
        .unwrap();
        assert_eq!(
            check(req(Some(&format!("Bearer {old}")), None, "")),
            Failure::Expired
        );
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    /// Signs arbitrary claims with the test secret.
    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s3cret-s3cret"),
        )
        .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn bearer(token: &str) -> hyper::Request<()> {
        req(Some(&format!("Bearer {token}")), None, "")
    }

    #[test]
    fn nbf_iss_and_aud() {
        let auth = Auth::hs256(b"s3cret-s3cret");
        let base = serde_json::json!({"exp": now() + 3600, "scope": "read", "jobs": ["*"]});
        let with = |extra: serde_json::Value| {
            let mut claims = base.clone();
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign(claims)
        };
        let check = |auth: &Auth, token: &str| auth.check(&bearer(token), Scope::Read, None);

        // Not before: refused until then.
        let later = with(serde_json::json!({"nbf": now() + 600}));
        assert_eq!(check(&auth, &later).unwrap_err(), Failure::Invalid);
        let earlier = with(serde_json::json!({"nbf": now() - 600}));
        assert!(check(&auth, &earlier).is_ok());

        // An audience the gateway was not told about is not a reason to refuse.
        let aud = with(serde_json::json!({"aud": "eventgate", "iss": "idp"}));
        assert!(check(&auth, &aud).is_ok());

        // Told: the claims must be there and match.
        let strict = Auth::hs256(b"s3cret-s3cret")
            .with_issuer(Some("idp".into()))
            .with_audience(Some("eventgate".into()));
        assert!(check(&strict, &aud).is_ok());
        let plain = with(serde_json::json!({}));
        assert_eq!(check(&strict, &plain).unwrap_err(), Failure::Invalid);
        let other_iss = with(serde_json::json!({"aud": "eventgate", "iss": "evil"}));
        assert_eq!(check(&strict, &other_iss).unwrap_err(), Failure::Invalid);
        let other_aud = with(serde_json::json!({"aud": ["x", "y"], "iss": "idp"}));
        assert_eq!(check(&strict, &other_aud).unwrap_err(), Failure::Invalid);
        let in_list = with(serde_json::json!({"aud": ["x", "eventgate"], "iss": "idp"}));
        assert!(check(&strict, &in_list).is_ok());
        assert!(!format!("{strict:?}").contains("s3cret"));
    }

    #[test]
    fn basic_credentials_do_not_hide_the_cookie() {
        let auth = Auth::hs256(b"s3cret-s3cret");
        let token = sign(serde_json::json!({"exp": now() + 60, "scope": "read", "jobs": ["*"]}));
        let cookie = format!("{COOKIE}={token}");
        let grant = auth
            .check(
                &req(Some("Basic dXNlcjpwYXNz"), Some(&cookie), ""),
                Scope::Read,
                None,
            )
            .unwrap();
        assert_eq!(grant.via, Transport::Cookie);
        let grant = auth.check(&bearer(&token), Scope::Read, None).unwrap();
        assert_eq!(grant.via, Transport::Bearer);
        // Basic alone is no token at all.
        assert_eq!(
            auth.check(
                &req(Some("Basic dXNlcjpwYXNz"), None, ""),
                Scope::Read,
                None
            )
            .unwrap_err(),
            Failure::Missing
        );
    }

    #[test]
    fn a_far_exp_cannot_overflow_a_clock() {
        let auth = Auth::hs256(b"s3cret-s3cret");
        for exp in [
            u64::MAX,
            u64::MAX / 2,
            200_000_000_000_000 * 86_400 / 86_400,
        ] {
            let token = sign(serde_json::json!({"exp": exp, "scope": "read", "jobs": ["*"]}));
            let Ok(grant) = auth.check(&bearer(&token), Scope::Read, None) else {
                continue; // refused is fine too; panicking is not
            };
            let at = grant.expires_at().unwrap();
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            assert!(left <= MAX_TTL);
            // What a stream does with it: a tokio deadline.
            let _ = tokio::time::Instant::now() + left;
        }
        let err = mint(b"k", &[Scope::Read], &["*".into()], MAX_TTL * 2, None).unwrap_err();
        assert!(err.to_string().contains("--ttl"), "{err}");
        assert!(mint(b"k", &[Scope::Read], &["*".into()], MAX_TTL, None).is_ok());
    }
}
