//! Who may read or write which job: HS256 JWTs signed with `EVENTGATE_JWT_SECRET`.
//!
//! Any JWT library can mint the tokens, so a host application needs nothing of ours.
//! Claims: `exp` (required), `scope` (space-separated `read`, `write`), `jobs` (job ids
//! or `["*"]`) and `sub` (logged). A token is taken from `Authorization: Bearer`, the
//! HttpOnly cookie `eventgate_token`, or `?access_token=` (EventSource cannot send
//! headers), in that order.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Name of the cookie that may carry the token.
pub const COOKIE: &str = "eventgate_token";

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

/// What a request is allowed, once its token checked out.
#[derive(Debug, Clone)]
pub struct Grant {
    /// `None` when auth is off.
    pub claims: Option<Claims>,
}

impl Grant {
    /// When the token expires, if there is one.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.claims
            .as_ref()
            .map(|c| UNIX_EPOCH + Duration::from_secs(c.exp))
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
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.key.is_some() {
            "Auth(hs256, secret hidden)"
        } else {
            "Auth(off)"
        })
    }
}

impl Auth {
    pub fn off() -> Auth {
        Auth { key: None }
    }

    pub fn hs256(secret: &[u8]) -> Auth {
        Auth {
            key: Some(DecodingKey::from_secret(secret)),
        }
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
            return Ok(Grant { claims: None });
        };
        let token = token_of(req).ok_or(Failure::Missing)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = 0;
        validation.validate_exp = true;
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
        })
    }
}

/// The token of a request: header, then cookie, then query.
fn token_of<B>(req: &hyper::Request<B>) -> Option<String> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (kind, token) = value.split_once(' ')?;
        return kind
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    for value in req.headers().get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some((name, token)) = pair.trim().split_once('=') {
                if name == COOKIE && !token.is_empty() {
                    return Some(token.to_string());
                }
            }
        }
    }
    req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "access_token" && !v.is_empty()).then(|| v.to_string())
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
}
