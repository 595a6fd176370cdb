//! OIDC bearer tokens (JWT) from one issuer.
//!
//! A token is accepted when its signature verifies with a key of the issuer's JWKS, its
//! `iss` and `aud` are the configured ones, and `exp` (required) and `nbf` hold within
//! a bounded clock skew. Only RS256 (RSA keys) and ES256 (P-256 keys) are accepted, and
//! the algorithm must match the type of the key the `kid` names: `alg: none` and an
//! HMAC token "signed" with a public key are refused before any verification.
//!
//! The JWKS is fetched over HTTP(S), cached, refetched every `jwks_refresh` (key
//! rotation) and at once when a token names an unknown `kid` (at most once per
//! `unknown_kid_refetch`, so a flood of made-up kids cannot hammer the issuer). The
//! claims map to a principal: tenant from `tenant_claim` (or `default_tenant`), roles
//! from `roles_claim` through `role_map` (or the role names themselves), subject
//! `oidc:<sub>`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crewmesh_kit::principal::{Principal, Role, TenantId};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::problem::Problem;

/// The largest clock skew the gateway allows itself to be configured with.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq)]
pub struct OidcConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud` (one of the token's audiences).
    pub audience: String,
    /// Where the issuer publishes its keys (JWKS).
    pub jwks_url: String,
    /// Allowed clock skew for `exp` and `nbf` (at most [`MAX_LEEWAY`]).
    pub leeway: Duration,
    /// Claim holding the tenant id.
    pub tenant_claim: String,
    /// Tenant for tokens without `tenant_claim`; `None` refuses them.
    pub default_tenant: Option<String>,
    /// Claim holding the roles (an array of strings, or one space-separated string).
    pub roles_claim: String,
    /// Claim value -> role. Empty: the values must be role names.
    pub role_map: HashMap<String, Role>,
    /// How long a fetched JWKS is used before it is fetched again.
    pub jwks_refresh: Duration,
    /// Least time between two fetches caused by unknown `kid`s.
    pub unknown_kid_refetch: Duration,
}

impl OidcConfig {
    /// A config with the usual defaults for the optional settings.
    pub fn new(issuer: &str, audience: &str, jwks_url: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            jwks_url: jwks_url.to_owned(),
            leeway: Duration::from_secs(60),
            tenant_claim: "tenant".to_owned(),
            default_tenant: None,
            roles_claim: "roles".to_owned(),
            role_map: HashMap::new(),
            jwks_refresh: Duration::from_secs(300),
            unknown_kid_refetch: Duration::from_secs(10),
        }
    }

    /// Problems as (field, problem, fix).
    pub fn problems(&self) -> Vec<(&'static str, String, &'static str)> {
        let mut p = Vec::new();
        if self.issuer.is_empty() {
            p.push((
                "gateway.oidc.issuer",
                "is empty".into(),
                "set the issuer URL tokens carry in `iss`",
            ));
        }
        if self.audience.is_empty() {
            p.push((
                "gateway.oidc.audience",
                "is empty".into(),
                "set the audience tokens must carry in `aud`",
            ));
        }
        if !(self.jwks_url.starts_with("https://") || self.jwks_url.starts_with("http://")) {
            p.push((
                "gateway.oidc.jwks_url",
                format!("`{}` is not an http(s) URL", self.jwks_url),
                "set the issuer's JWKS URL (its `jwks_uri`)",
            ));
        }
        if self.leeway > MAX_LEEWAY {
            p.push((
                "gateway.oidc.leeway_secs",
                format!(
                    "{}s is more than the allowed {}s",
                    self.leeway.as_secs(),
                    MAX_LEEWAY.as_secs()
                ),
                "use a small clock skew, e.g. 60",
            ));
        }
        if let Some(t) = &self.default_tenant
            && TenantId::parse(t).is_err()
        {
            p.push((
                "gateway.oidc.default_tenant",
                format!("`{t}` is not a tenant id"),
                "use a-z, 0-9, '-' or '_'",
            ));
        }
        p
    }
}

/// The `[gateway.oidc]` section of a config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSection {
    pub issuer: String,
    pub audience: String,
    pub jwks_url: String,
    #[serde(default)]
    pub leeway_secs: Option<u64>,
    #[serde(default)]
    pub tenant_claim: Option<String>,
    #[serde(default)]
    pub default_tenant: Option<String>,
    #[serde(default)]
    pub roles_claim: Option<String>,
    /// Claim value -> role name.
    #[serde(default)]
    pub role_map: HashMap<String, String>,
    #[serde(default)]
    pub jwks_refresh_secs: Option<u64>,
}

impl OidcSection {
    /// The checked config; an unknown role name in `role_map` is an error naming it.
    pub fn into_config(self) -> Result<OidcConfig, String> {
        let mut c = OidcConfig::new(&self.issuer, &self.audience, &self.jwks_url);
        if let Some(s) = self.leeway_secs {
            c.leeway = Duration::from_secs(s);
        }
        if let Some(t) = self.tenant_claim {
            c.tenant_claim = t;
        }
        c.default_tenant = self.default_tenant;
        if let Some(r) = self.roles_claim {
            c.roles_claim = r;
        }
        for (value, role) in self.role_map {
            let role = Role::parse(&role).map_err(|e| format!("claim value `{value}`: {e}"))?;
            c.role_map.insert(value, role);
        }
        if let Some(s) = self.jwks_refresh_secs {
            c.jwks_refresh = Duration::from_secs(s.max(1));
        }
        Ok(c)
    }
}

/// A usable key of the JWKS.
struct VerifyKey {
    alg: Algorithm,
    key: DecodingKey,
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, Arc<VerifyKey>>,
    fetched: Option<Instant>,
    last_unknown_refetch: Option<Instant>,
}

/// Verifies OIDC tokens; cheap to share.
pub struct OidcVerifier {
    config: OidcConfig,
    http: reqwest::Client,
    cache: Mutex<Cache>,
}

/// Whether a bearer credential looks like a JWT (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && !token.starts_with(crate::auth::KEY_PREFIX)
}

fn unauthenticated(detail: impl Into<String>) -> Problem {
    Problem::unauthenticated(detail)
}

impl OidcVerifier {
    pub fn new(config: OidcConfig) -> Self {
        Self {
            config,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            cache: Mutex::new(Cache::default()),
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<VerifyKey>>, String> {
        let resp = self
            .http
            .get(&self.config.jwks_url)
            .send()
            .await
            .map_err(|e| format!("cannot fetch the JWKS: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("the JWKS endpoint answered {}", resp.status()));
        }
        let set: JwkSet = resp
            .json()
            .await
            .map_err(|e| format!("the JWKS is not valid: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                // Symmetric keys have no place in a public key set; other types are
                // not accepted.
                _ => continue,
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid, Arc::new(VerifyKey { alg, key }));
            }
        }
        Ok(keys)
    }

    /// The key `kid` names, fetching the JWKS when it is stale or the kid is unknown.
    async fn key(&self, kid: &str) -> Result<Arc<VerifyKey>, Problem> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let stale = cache
            .fetched
            .is_none_or(|t| now.duration_since(t) >= self.config.jwks_refresh);
        let unknown = !cache.keys.contains_key(kid);
        let may_refetch = cache
            .last_unknown_refetch
            .is_none_or(|t| now.duration_since(t) >= self.config.unknown_kid_refetch);
        if stale || (unknown && may_refetch) {
            if unknown && !stale {
                cache.last_unknown_refetch = Some(now);
            }
            match self.fetch().await {
                Ok(keys) => {
                    cache.keys = keys;
                    cache.fetched = Some(now);
                }
                Err(e) => {
                    // Keep the last good keys; a token with a known kid still works.
                    tracing::warn!(error = %e, "oidc jwks refresh failed");
                    if cache.keys.is_empty() {
                        return Err(Problem::new(
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "unavailable",
                            "Service unavailable",
                            "the identity provider's keys cannot be fetched",
                        ));
                    }
                }
            }
        }
        cache.keys.get(kid).cloned().ok_or_else(|| {
            unauthenticated(format!(
                "the token's signing key `{kid}` is not one of the issuer's keys"
            ))
        })
    }

    /// Verifies `token` and maps its claims to a principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, Problem> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauthenticated(format!("the bearer token is not a valid JWT: {e}")))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(unauthenticated(format!(
                "the token's algorithm {:?} is not accepted (RS256 or ES256 only)",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| unauthenticated("the token has no `kid` header"))?;
        let key = self.key(&kid).await?;
        if key.alg != header.alg {
            return Err(unauthenticated(format!(
                "the token's algorithm {:?} does not match its key `{kid}` ({:?})",
                header.alg, key.alg
            )));
        }
        let mut v = Validation::new(key.alg);
        v.algorithms = vec![key.alg];
        v.leeway = self.config.leeway.min(MAX_LEEWAY).as_secs();
        v.validate_nbf = true;
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[&self.config.audience]);
        v.required_spec_claims = ["exp", "iss", "aud", "sub"]
            .into_iter()
            .map(String::from)
            .collect();
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &v)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                let why = match e.kind() {
                    K::ExpiredSignature => "the token has expired".to_owned(),
                    K::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
                    K::InvalidIssuer => "the token's issuer is not the configured one".to_owned(),
                    K::InvalidAudience => {
                        "the token's audience is not the configured one".to_owned()
                    }
                    K::InvalidSignature => "the token's signature is not valid".to_owned(),
                    K::MissingRequiredClaim(c) => format!("the token has no `{c}` claim"),
                    other => format!("the token is not valid: {other:?}"),
                };
                unauthenticated(why)
            })?;
        self.principal(&data.claims)
    }

    fn principal(&self, claims: &serde_json::Map<String, Value>) -> Result<Principal, Problem> {
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let subject = format!("oidc:{sub}");
        if sub.is_empty() || subject.len() > 256 || !subject.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(unauthenticated(
                "the token's `sub` must be 1-250 printable ASCII characters",
            ));
        }
        let tenant = match claims.get(&self.config.tenant_claim) {
            Some(Value::String(t)) => t.clone(),
            Some(_) => {
                return Err(unauthenticated(format!(
                    "the token's `{}` claim is not a string",
                    self.config.tenant_claim
                )));
            }
            None => self.config.default_tenant.clone().ok_or_else(|| {
                unauthenticated(format!(
                    "the token has no `{}` claim",
                    self.config.tenant_claim
                ))
            })?,
        };
        let tenant = TenantId::parse(&tenant).map_err(|e| unauthenticated(e.to_string()))?;
        let values: Vec<String> = match claims.get(&self.config.roles_claim) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        let mut roles: Vec<Role> = values
            .iter()
            .filter_map(|v| {
                if self.config.role_map.is_empty() {
                    Role::parse(v).ok()
                } else {
                    self.config.role_map.get(v).copied()
                }
            })
            .collect();
        roles.sort_unstable();
        roles.dedup();
        Ok(Principal {
            tenant,
            subject,
            roles,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const ISS: &str = "https://idp.example";
    const AUD: &str = "crewmesh";

    struct Keys {
        rsa_pem: String,
        rsa_public_pem: String,
        rsa_n: String,
        ec_pem: String,
        ec_x: String,
        ec_y: String,
    }

    fn openssl(args: &[&str], dir: &std::path::Path) -> String {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A fresh RSA key (openssl) and P-256 key (rcgen).
    fn keys() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "rsa.pem",
            ],
            dir.path(),
        );
        let rsa_pem = std::fs::read_to_string(dir.path().join("rsa.pem")).unwrap();
        let rsa_public_pem = openssl(&["pkey", "-in", "rsa.pem", "-pubout"], dir.path());
        let modulus = openssl(&["rsa", "-in", "rsa.pem", "-noout", "-modulus"], dir.path());
        let modulus = hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = ec.public_key_raw();
        assert_eq!(raw.len(), 65);
        Keys {
            rsa_pem,
            rsa_public_pem,
            rsa_n: B64.encode(modulus),
            ec_pem: ec.serialize_pem(),
            ec_x: B64.encode(&raw[1..33]),
            ec_y: B64.encode(&raw[33..]),
        }
    }

    fn jwks(k: &Keys, rsa_kid: &str, ec_kid: &str) -> Value {
        json!({"keys": [
            {"kty": "RSA", "kid": rsa_kid, "use": "sig", "alg": "RS256", "n": k.rsa_n, "e": "AQAB"},
            {"kty": "EC", "kid": ec_kid, "use": "sig", "crv": "P-256", "x": k.ec_x, "y": k.ec_y},
        ]})
    }

    /// A JWKS endpoint serving whatever `set` holds, counting fetches.
    async fn serve(set: Arc<std::sync::Mutex<Value>>, fetches: Arc<AtomicUsize>) -> String {
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let set = set.clone();
                let fetches = fetches.clone();
                async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(set.lock().unwrap().clone())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/jwks")
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn claims() -> Value {
        json!({"iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 300,
               "tenant": "acme", "roles": ["developer", "unknown-role"]})
    }

    fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    struct Setup {
        keys: Keys,
        rsa: EncodingKey,
        ec: EncodingKey,
        set: Arc<std::sync::Mutex<Value>>,
        fetches: Arc<AtomicUsize>,
        verifier: OidcVerifier,
    }

    async fn setup(tweak: impl FnOnce(&mut OidcConfig)) -> Setup {
        crewmesh_testkit::init_crypto();
        let keys = keys();
        let set = Arc::new(std::sync::Mutex::new(jwks(&keys, "rsa-1", "ec-1")));
        let fetches = Arc::new(AtomicUsize::new(0));
        let url = serve(set.clone(), fetches.clone()).await;
        let mut config = OidcConfig::new(ISS, AUD, &url);
        tweak(&mut config);
        assert!(config.problems().is_empty());
        Setup {
            rsa: EncodingKey::from_rsa_pem(keys.rsa_pem.as_bytes()).unwrap(),
            ec: EncodingKey::from_ec_pem(keys.ec_pem.as_bytes()).unwrap(),
            keys,
            set,
            fetches,
            verifier: OidcVerifier::new(config),
        }
    }

    #[tokio::test]
    async fn accepts_rs256_and_es256_and_maps_claims() {
        let s = setup(|_| {}).await;
        for token in [
            sign(Algorithm::RS256, "rsa-1", &s.rsa, &claims()),
            sign(Algorithm::ES256, "ec-1", &s.ec, &claims()),
        ] {
            assert!(looks_like_jwt(&token));
            let p = s.verifier.verify(&token).await.unwrap();
            assert_eq!(p.tenant.as_str(), "acme");
            assert_eq!(p.subject, "oidc:alice");
            assert_eq!(p.roles, vec![Role::Developer]);
        }
        assert_eq!(s.fetches.load(Ordering::SeqCst), 1, "the JWKS is cached");
    }

    #[tokio::test]
    async fn refuses_every_bad_token_with_the_reason() {
        let s = setup(|c| c.leeway = Duration::from_secs(30)).await;
        let with = |patch: Value| {
            let mut c = claims();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = v.clone();
                }
            }
            c
        };
        let other_ec = EncodingKey::from_ec_pem(
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap()
                .serialize_pem()
                .as_bytes(),
        )
        .unwrap();
        let none = format!(
            "{}.{}.",
            B64.encode(json!({"alg": "none", "kid": "rsa-1", "typ": "JWT"}).to_string()),
            B64.encode(claims().to_string())
        );
        let hmac_with_public_key = sign(
            Algorithm::HS256,
            "rsa-1",
            &EncodingKey::from_secret(s.keys.rsa_public_pem.as_bytes()),
            &claims(),
        );
        let cases: Vec<(String, &str)> = vec![
            (
                sign(
                    Algorithm::RS256,
                    "rsa-1",
                    &s.rsa,
                    &with(json!({"exp": now() - 60})),
                ),
                "the token has expired",
            ),
            (
                sign(
                    Algorithm::RS256,
                    "rsa-1",
                    &s.rsa,
                    &with(json!({"nbf": now() + 120})),
                ),
                "the token is not valid yet (nbf)",
            ),
            (
                sign(
                    Algorithm::RS256,
                    "rsa-1",
                    &s.rsa,
                    &with(json!({"iss": "https://evil.example"})),
                ),
                "the token's issuer is not the configured one",
            ),
            (
                sign(
                    Algorithm::RS256,
                    "rsa-1",
                    &s.rsa,
                    &with(json!({"aud": "someone-else"})),
                ),
                "the token's audience is not the configured one",
            ),
            (
                sign(
                    Algorithm::RS256,
                    "rsa-1",
                    &s.rsa,
                    &with(json!({"exp": null})),
                ),
                "the token has no `exp` claim",
            ),
            (
                sign(Algorithm::ES256, "ec-1", &other_ec, &claims()),
                "the token's signature is not valid",
            ),
            (
                sign(Algorithm::ES256, "rsa-1", &s.ec, &claims()),
                "the token's algorithm ES256 does not match its key `rsa-1` (RS256)",
            ),
            (
                sign(Algorithm::RS256, "rsa-404", &s.rsa, &claims()),
                "the token's signing key `rsa-404` is not one of the issuer's keys",
            ),
            (
                hmac_with_public_key,
                "the token's algorithm HS256 is not accepted (RS256 or ES256 only)",
            ),
            (
                sign(
                    Algorithm::RS256,
                    "rsa-1",
                    &s.rsa,
                    &with(json!({"tenant": null})),
                ),
                "the token has no `tenant` claim",
            ),
        ];
        for (token, want) in cases {
            let p = s.verifier.verify(&token).await.unwrap_err();
            assert_eq!(p.status, 401, "{want}");
            assert_eq!(p.detail, want);
        }
        let p = s.verifier.verify(&none).await.unwrap_err();
        assert_eq!(p.status, 401);
        assert!(
            p.detail.starts_with("the bearer token is not a valid JWT"),
            "{}",
            p.detail
        );

        // Within the allowed skew an expired token still passes.
        let t = sign(
            Algorithm::RS256,
            "rsa-1",
            &s.rsa,
            &with(json!({"exp": now() - 10})),
        );
        s.verifier.verify(&t).await.unwrap();
    }

    #[tokio::test]
    async fn a_rotated_key_is_fetched_on_its_first_use_and_unknown_kids_are_throttled() {
        let s = setup(|c| c.unknown_kid_refetch = Duration::from_secs(3600)).await;
        let t1 = sign(Algorithm::RS256, "rsa-1", &s.rsa, &claims());
        s.verifier.verify(&t1).await.unwrap();
        assert_eq!(s.fetches.load(Ordering::SeqCst), 1);
        // The issuer rotates: the same RSA key is now published as rsa-2 only.
        *s.set.lock().unwrap() = jwks(&s.keys, "rsa-2", "ec-1");
        let t2 = sign(Algorithm::RS256, "rsa-2", &s.rsa, &claims());
        s.verifier.verify(&t2).await.unwrap();
        assert_eq!(
            s.fetches.load(Ordering::SeqCst),
            2,
            "refetched for the unknown kid"
        );
        // The retired kid is refused now.
        assert_eq!(s.verifier.verify(&t1).await.unwrap_err().status, 401);
        // Another unknown kid within the throttle interval does not fetch again.
        let t3 = sign(Algorithm::RS256, "rsa-3", &s.rsa, &claims());
        assert_eq!(s.verifier.verify(&t3).await.unwrap_err().status, 401);
        assert_eq!(s.fetches.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn maps_roles_through_the_configured_map() {
        crewmesh_testkit::init_crypto();
        let mut config = OidcConfig::new(ISS, AUD, "https://idp.example/jwks");
        config.role_map = HashMap::from([
            ("crewmesh-admins".to_owned(), Role::Admin),
            ("readers".to_owned(), Role::Viewer),
        ]);
        config.default_tenant = Some("default".into());
        let v = OidcVerifier::new(config);
        let c = json!({"sub": "bob", "roles": "readers crewmesh-admins admin"});
        let p = v.principal(c.as_object().unwrap()).unwrap();
        assert_eq!(p.tenant.as_str(), "default");
        assert_eq!(p.roles, vec![Role::Admin, Role::Viewer]);
    }

    #[test]
    fn config_problems_are_named() {
        let mut c = OidcConfig::new("", AUD, "ftp://x");
        c.leeway = Duration::from_secs(3600);
        let fields: Vec<&str> = c.problems().iter().map(|p| p.0).collect();
        assert_eq!(
            fields,
            vec![
                "gateway.oidc.issuer",
                "gateway.oidc.jwks_url",
                "gateway.oidc.leeway_secs"
            ]
        );
    }
}
