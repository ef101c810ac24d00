//! One typed configuration, read from the environment once and validated at start.
//!
//! Every variable has a default (see `.env.example`); a value that does not parse stops
//! start-up with an error naming the variable. Secrets are wrapped so they never print.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// A token-bucket budget: `capacity` tokens, refilled at `capacity` per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub capacity: u32,
    pub period: Duration,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (n, period) =
            s.split_once('/').ok_or_else(|| format!("expected N/DURATION such as 30/1m, got {s:?}"))?;
        let capacity: u32 = n.trim().parse().map_err(|_| format!("{n:?} is not a whole number"))?;
        let period = humantime::parse_duration(period.trim()).map_err(|e| e.to_string())?;
        if capacity == 0 || period.is_zero() {
            return Err("capacity and period must be greater than zero".into());
        }
        Ok(Rate { capacity, period })
    }
}

/// A peer whose forwarding headers are believed: one address or a CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustedProxy {
    addr: IpAddr,
    prefix: u8,
}

impl TrustedProxy {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 peers (`::ffff:10.0.0.1`) compare as the IPv4 address they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for TrustedProxy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(TrustedProxy { addr, prefix })
    }
}

/// The one forwarding header the trusted proxies set (`FORWARDED_HEADER`); the other is
/// ignored, so a client cannot slip addresses in through the header the proxy leaves alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`
    XForwardedFor,
    /// RFC 7239: `Forwarded: for=client, for="[2001:db8::1]:4711"`
    Forwarded,
}

impl ForwardedHeader {
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }
}

impl FromStr for ForwardedHeader {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            _ => Err("expected x-forwarded-for or forwarded".into()),
        }
    }
}

/// A browser origin: `scheme://host[:port]`, or `*`.
struct Origin(String);

impl FromStr for Origin {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            return Ok(Origin(s.to_owned()));
        }
        let url =
            url::Url::parse(s).map_err(|_| format!("{s:?} is not an origin like https://app.example.com"))?;
        let origin = url.origin().ascii_serialization();
        if origin == "null" || origin != s.trim_end_matches('/') {
            return Err(format!("{s:?} is not an origin (scheme://host[:port], no path)"));
        }
        Ok(Origin(origin))
    }
}

/// Redis nodes given as a comma-separated list of `host:port` (or `redis://` / `rediss://`
/// URLs, which may carry credentials): kept as connection URLs, never printed.
#[derive(Clone)]
pub struct RedisNodes(Vec<SecretString>);

impl RedisNodes {
    fn parse(variable: &'static str, raw: &str) -> Result<Self, ConfigError> {
        let mut nodes = Vec::new();
        for (i, entry) in raw.split(',').map(str::trim).enumerate() {
            let position = i + 1;
            if entry.is_empty() {
                return Err(invalid(variable, format!("entry {position} is empty (expected host:port,...)")));
            }
            let url = if entry.starts_with("redis://") || entry.starts_with("rediss://") {
                entry.to_owned()
            } else if entry.contains("://") {
                return Err(invalid(
                    variable,
                    format!("entry {position}: expected host:port or a redis:// URL"),
                ));
            } else {
                let (host, port) = entry.rsplit_once(':').ok_or_else(|| {
                    invalid(variable, format!("entry {position} ({entry:?}) is not host:port"))
                })?;
                let host_ok = !host.is_empty() && !host.contains(['/', '@', ' ']);
                let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
                if !host_ok || !port_ok {
                    return Err(invalid(variable, format!("entry {position} ({entry:?}) is not host:port")));
                }
                format!("redis://{entry}")
            };
            // A URL's own check; its text may hold a password, so it is not repeated.
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|_| invalid(variable, format!("entry {position} is not a valid Redis address")))?;
            if !matches!(info.addr(), redis::ConnectionAddr::Tcp(..) | redis::ConnectionAddr::TcpTls { .. }) {
                return Err(invalid(variable, format!("entry {position} is not a TCP address")));
            }
            nodes.push(SecretString::from(url));
        }
        Ok(Self(nodes))
    }

    /// The connection URLs (they may hold passwords: never log them).
    pub fn urls(&self) -> Vec<String> {
        self.0.iter().map(|u| u.expose_secret().to_owned()).collect()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for RedisNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisNodes({} nodes, redacted)", self.0.len())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub database_url: SecretString,
    pub redis_url: Option<SecretString>,
    /// `REDIS_CLUSTER_NODES`: seed nodes of a Redis Cluster (replaces `REDIS_URL`).
    pub redis_cluster_nodes: Option<RedisNodes>,
    /// `REDIS_SENTINEL_NODES` and `REDIS_SENTINEL_MASTER`: Redis behind Sentinel.
    pub redis_sentinel: Option<(RedisNodes, String)>,
    pub redis_key_prefix: String,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub jwt_client_id: String,
    pub jwt_algorithm: jsonwebtoken::Algorithm,
    pub jwt_secret: Option<SecretString>,
    pub key_encryption_key: Option<SecretString>,
    pub key_encryption_key_old: Option<SecretString>,
    pub jwks_max_age: Duration,
    pub keys_refresh_interval: Duration,
    pub key_prepublish: Duration,
    pub key_rotation_interval: Option<Duration>,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub refresh_reuse_grace: Duration,
    pub max_sessions_per_user: u64,
    pub password_min_strength: crate::domain::Strength,
    pub rate_limit_login_per_ip: Rate,
    pub rate_limit_login_per_account: Rate,
    pub rate_limit_register_per_ip: Rate,
    pub rate_limit_refresh_per_ip: Rate,
    pub trusted_proxies: Vec<TrustedProxy>,
    pub forwarded_header: ForwardedHeader,
    /// Per-IP budgets count an IPv6 client by its first this-many bits (1..=128).
    pub rate_limit_ipv6_prefix: u8,
    pub cors_allowed_origins: Vec<String>,
    pub refresh_token_cookie: bool,
    pub login_cooldown: crate::rate_limit::CooldownPolicy,
    pub database_max_connections: u32,
    pub database_min_connections: u32,
    pub database_acquire_timeout: Duration,
    pub database_idle_timeout: Duration,
    pub redis_connect_timeout: Duration,
    pub redis_response_timeout: Duration,
    pub password_hash_workers: usize,
    pub password_hash_queue: usize,
    pub max_body_bytes: usize,
    pub http_body_timeout: Duration,
    pub http_header_timeout: Duration,
    pub http_idle_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub audit_retention: Duration,
    pub shutdown_timeout: Duration,
    pub audit_queue_capacity: usize,
    pub log_format: LogFormat,
    /// Where mail goes: `smtp://` / `smtps://` (see `check_smtp_url`); unset, `.eml` files
    /// in `mail_dir`.
    pub smtp_url: Option<SecretString>,
    pub mail_dir: std::path::PathBuf,
    pub email_from: lettre::message::Mailbox,
    pub product_name: String,
    /// The app's base URL (no trailing slash), where mailed links go.
    pub app_url: Option<String>,
    pub email_templates_dir: Option<std::path::PathBuf>,
    pub mail_workers: usize,
    pub mail_poll_interval: Duration,
    pub mail_lease: Duration,
    pub mail_max_attempts: u32,
    pub mail_retry_base: Duration,
    pub mail_retry_max: Duration,
    /// A MaxMind-format city database (`.mmdb`); sessions then show `location`. Opened at
    /// start (see `geoip`): a file that cannot be used stops start-up.
    pub geoip_database: Option<std::path::PathBuf>,
    /// Mail the user when a login comes from a device without a valid device token.
    pub notify_new_device: bool,
    pub email_verification: EmailVerification,
    pub verify_email_ttl: Duration,
    pub password_reset_ttl: Duration,
    pub email_change_ttl: Duration,
    /// How often mail can be triggered for one address, and from one client.
    pub rate_limit_email_per_address: Rate,
    pub rate_limit_email_per_ip: Rate,
    /// `WEBAUTHN_RP_ID` and `WEBAUTHN_ORIGINS` (defaults from `JWT_ISSUER`); `None` when
    /// neither is set and `JWT_ISSUER` cannot be a relying party (an IP address, or plain
    /// http beyond localhost): passkeys are then off, and start-up says so.
    pub webauthn: Option<WebauthnSettings>,
    /// How long a password-checked login waits for its second factor.
    pub mfa_ticket_ttl: Duration,
}

/// How long a passkey ceremony (options, then the authenticator's answer) may take: the
/// authenticator's timeout in the options, and the life of the ceremony's state.
pub const PASSKEY_CEREMONY_TTL: Duration = Duration::from_secs(300);

/// The WebAuthn relying party: its id (a domain) and the origins allowed to use passkeys,
/// each the RP id or one of its subdomains, `https://` (or `http://localhost…`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebauthnSettings {
    pub rp_id: String,
    pub origins: Vec<url::Url>,
}

impl WebauthnSettings {
    /// The relying party, as webauthn-rs checks it (built once at start, see `startup`).
    pub fn build(&self, rp_name: &str) -> Result<webauthn_rs::Webauthn, String> {
        let (first, rest) = self.origins.split_first().ok_or("no origin")?;
        let mut builder = webauthn_rs::WebauthnBuilder::new(&self.rp_id, first)
            .map_err(|e| format!("{first} is not {:?} or a subdomain of it ({e})", self.rp_id))?
            .rp_name(rp_name)
            .timeout(PASSKEY_CEREMONY_TTL);
        for origin in rest {
            builder = builder.append_allowed_origin(origin);
        }
        builder.build().map_err(|e| e.to_string())
    }
}

/// `WEBAUTHN_RP_ID` and `WEBAUTHN_ORIGINS`, each defaulting to `JWT_ISSUER`'s host and
/// origin. A value that is set and wrong names its variable; defaults that cannot work
/// (an IP address, http beyond localhost) turn passkeys off unless either variable is set.
fn webauthn_settings(
    rp_id: Option<String>,
    origins: Option<String>,
    issuer: &str,
) -> Result<Option<WebauthnSettings>, ConfigError> {
    const RP_ID: &str = "WEBAUTHN_RP_ID";
    const ORIGINS: &str = "WEBAUTHN_ORIGINS";
    let explicit = rp_id.is_some() || origins.is_some();
    let origins_set = origins.is_some();
    // An issuer that is no URL is JWT_ISSUER's own error (see `validate`).
    let Ok(issuer) = url::Url::parse(issuer) else { return Ok(None) };
    let derived = |variable: &'static str, reason: String| {
        if explicit {
            Err(invalid(variable, format!("defaults to JWT_ISSUER's, which {reason}: set {variable}")))
        } else {
            Ok(None)
        }
    };
    let origins: Vec<url::Url> = match &origins {
        Some(list) => {
            let parsed: Vec<url::Url> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    let origin = s.parse::<Origin>().map_err(|e| invalid(ORIGINS, e))?;
                    url::Url::parse(&origin.0)
                        .map_err(|_| invalid(ORIGINS, format!("{s:?} is not an origin")))
                })
                .collect::<Result<_, _>>()?;
            if parsed.is_empty() {
                return Err(invalid(ORIGINS, "lists no origin".into()));
            }
            parsed
        }
        None => {
            let origin = issuer.origin().ascii_serialization();
            match url::Url::parse(&origin) {
                Ok(url) if origin != "null" => vec![url],
                _ => return derived(ORIGINS, format!("{issuer} has no origin")),
            }
        }
    };
    let rp_id = match rp_id {
        Some(id) => {
            let id = id.to_ascii_lowercase();
            match url::Host::parse(&id) {
                Ok(url::Host::Domain(d)) if d == id && !d.ends_with('.') => id,
                _ => {
                    return Err(invalid(
                        RP_ID,
                        format!("{id:?} is not a domain name (an IP address cannot be one)"),
                    ));
                }
            }
        }
        None => match issuer.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            _ => {
                return derived(
                    RP_ID,
                    "is not a domain name (an IP address cannot be a relying party)".into(),
                );
            }
        },
    };
    for origin in &origins {
        let host = origin.host_str().unwrap_or_default();
        let localhost = host == "localhost" || host.ends_with(".localhost");
        if origin.scheme() != "https" && !(origin.scheme() == "http" && localhost) {
            let reason =
                format!("{origin} is not https:// (browsers allow passkeys over http on localhost only)");
            return if origins_set {
                Err(invalid(ORIGINS, reason))
            } else {
                derived(ORIGINS, format!("is plain http beyond localhost ({origin})"))
            };
        }
        if host != rp_id && !host.ends_with(&format!(".{rp_id}")) {
            return Err(invalid(
                ORIGINS,
                format!("{origin} is neither WEBAUTHN_RP_ID ({rp_id:?}) nor a subdomain of it"),
            ));
        }
    }
    Ok(Some(WebauthnSettings { rp_id, origins }))
}

/// `EMAIL_VERIFICATION`: whether sign-up mails a verification link, and whether login
/// waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmailVerification {
    /// No mails; register answers 201 (or 409 for a taken email) as before.
    Off,
    /// Mails sent; unverified users can log in.
    Optional,
    /// Login is refused (403 `email_not_verified`) until the address is verified.
    Required,
}

impl std::str::FromStr for EmailVerification {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(format!("expected off, optional or required, got {other:?}")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

impl Config {
    /// Reads the process environment (after `.env`, when present).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from a map; what the test harness uses, so tests never
    /// touch the process environment.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(|name| map.get(name).cloned())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env { lookup: &lookup };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());

        let config = Config {
            listen_addr: env.parse("LISTEN_ADDR", "127.0.0.1:8080")?,
            database_url: SecretString::from(env.string("DATABASE_URL", "sqlite://latchkey.db?mode=rwc")),
            redis_url: env.optional("REDIS_URL").map(SecretString::from),
            redis_cluster_nodes: env
                .optional("REDIS_CLUSTER_NODES")
                .map(|v| RedisNodes::parse("REDIS_CLUSTER_NODES", &v))
                .transpose()?,
            redis_sentinel: match (
                env.optional("REDIS_SENTINEL_NODES"),
                env.optional("REDIS_SENTINEL_MASTER"),
            ) {
                (None, None) => None,
                (Some(nodes), Some(master)) => {
                    Some((RedisNodes::parse("REDIS_SENTINEL_NODES", &nodes)?, master))
                }
                (Some(_), None) => {
                    return Err(invalid(
                        "REDIS_SENTINEL_MASTER",
                        "must be set with REDIS_SENTINEL_NODES (the master's name the sentinels monitor)"
                            .into(),
                    ));
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "REDIS_SENTINEL_NODES",
                        "must be set with REDIS_SENTINEL_MASTER (host:port of each sentinel)".into(),
                    ));
                }
            },
            redis_key_prefix: env.string("REDIS_KEY_PREFIX", "latchkey:"),
            jwt_issuer: env.string("JWT_ISSUER", "http://localhost:8080"),
            jwt_audience: env.string("JWT_AUDIENCE", "latchkey"),
            jwt_client_id: env.string("JWT_CLIENT_ID", "latchkey"),
            jwt_algorithm: {
                let raw = env.string("JWT_ALGORITHM", "EdDSA");
                crate::keys::parse_algorithm(&raw).ok_or_else(|| {
                    invalid("JWT_ALGORITHM", format!("{raw:?}: expected EdDSA, ES256, RS256 or HS256"))
                })?
            },
            jwt_secret: env.optional("JWT_SECRET").map(SecretString::from),
            key_encryption_key: env.optional("KEY_ENCRYPTION_KEY").map(SecretString::from),
            key_encryption_key_old: env.optional("KEY_ENCRYPTION_KEY_OLD").map(SecretString::from),
            jwks_max_age: env.duration("JWKS_MAX_AGE", "5m")?,
            keys_refresh_interval: env.duration("KEYS_REFRESH_INTERVAL", "30s")?,
            key_prepublish: {
                // Default: long enough that every cached JWKS has seen the new key.
                let max_age = env.duration("JWKS_MAX_AGE", "5m")?;
                let refresh = env.duration("KEYS_REFRESH_INTERVAL", "30s")?;
                match env.optional("KEY_PREPUBLISH") {
                    Some(_) => env.duration("KEY_PREPUBLISH", "")?,
                    None => max_age + refresh,
                }
            },
            key_rotation_interval: match env.string("KEY_ROTATION_INTERVAL", "off").as_str() {
                "off" => None,
                _ => Some(env.duration("KEY_ROTATION_INTERVAL", "off")?),
            },
            access_token_ttl: env.duration("ACCESS_TOKEN_TTL", "15m")?,
            refresh_token_ttl: env.duration("REFRESH_TOKEN_TTL", "30d")?,
            refresh_reuse_grace: env.duration("REFRESH_REUSE_GRACE", "10s")?,
            max_sessions_per_user: env.parse("MAX_SESSIONS_PER_USER", "100")?,
            password_min_strength: env.parse("PASSWORD_MIN_STRENGTH", "3")?,
            rate_limit_login_per_ip: env.parse("RATE_LIMIT_LOGIN_PER_IP", "30/1m")?,
            rate_limit_login_per_account: env.parse("RATE_LIMIT_LOGIN_PER_ACCOUNT", "10/1m")?,
            rate_limit_register_per_ip: env.parse("RATE_LIMIT_REGISTER_PER_IP", "10/1m")?,
            rate_limit_refresh_per_ip: env.parse("RATE_LIMIT_REFRESH_PER_IP", "60/1m")?,
            trusted_proxies: env.list("TRUSTED_PROXIES")?,
            forwarded_header: env.parse("FORWARDED_HEADER", "x-forwarded-for")?,
            rate_limit_ipv6_prefix: env.parse("RATE_LIMIT_IPV6_PREFIX", "64")?,
            cors_allowed_origins: env
                .list::<Origin>("CORS_ALLOWED_ORIGINS")?
                .into_iter()
                .map(|o| o.0)
                .collect(),
            refresh_token_cookie: env.parse("REFRESH_TOKEN_COOKIE", "false")?,
            login_cooldown: crate::rate_limit::CooldownPolicy {
                threshold: env.parse("LOGIN_COOLDOWN_THRESHOLD", "5")?,
                base_ms: millis(env.duration("LOGIN_COOLDOWN_BASE", "1s")?),
                max_ms: millis(env.duration("LOGIN_COOLDOWN_MAX", "5m")?),
            },
            database_max_connections: env.parse("DATABASE_MAX_CONNECTIONS", "10")?,
            database_min_connections: env.parse("DATABASE_MIN_CONNECTIONS", "1")?,
            database_acquire_timeout: env.duration("DATABASE_ACQUIRE_TIMEOUT", "3s")?,
            database_idle_timeout: env.duration("DATABASE_IDLE_TIMEOUT", "10m")?,
            redis_connect_timeout: env.duration("REDIS_CONNECT_TIMEOUT", "1s")?,
            redis_response_timeout: env.duration("REDIS_RESPONSE_TIMEOUT", "500ms")?,
            password_hash_workers: env.parse("PASSWORD_HASH_WORKERS", &cores.to_string())?,
            password_hash_queue: env.parse("PASSWORD_HASH_QUEUE", "64")?,
            max_body_bytes: env.parse("MAX_BODY_BYTES", "65536")?,
            http_body_timeout: env.duration("HTTP_BODY_TIMEOUT", "10s")?,
            http_header_timeout: env.duration("HTTP_HEADER_TIMEOUT", "10s")?,
            http_idle_timeout: env.duration("HTTP_IDLE_TIMEOUT", "60s")?,
            metrics_addr: match env.string("METRICS_ADDR", "127.0.0.1:9100").as_str() {
                "off" => None,
                other => Some(
                    other.parse().map_err(|e| invalid("METRICS_ADDR", format!("{other:?}: {e} (or off)")))?,
                ),
            },
            audit_retention: env.duration("AUDIT_RETENTION", "90d")?,
            shutdown_timeout: env.duration("SHUTDOWN_TIMEOUT", "30s")?,
            audit_queue_capacity: env.parse("AUDIT_QUEUE_CAPACITY", "10000")?,
            log_format: match env.string("LOG_FORMAT", "text").as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(invalid("LOG_FORMAT", format!("expected text or json, got {other:?}")));
                }
            },
            smtp_url: env.optional("SMTP_URL").map(SecretString::from),
            mail_dir: env.string("MAIL_DIR", "./mail").into(),
            email_from: {
                let raw = env.string("EMAIL_FROM", "Latchkey <no-reply@localhost>");
                raw.parse().map_err(|e| {
                    invalid("EMAIL_FROM", format!("{raw:?}: {e} (expected Name <address> or an address)"))
                })?
            },
            product_name: env.string("PRODUCT_NAME", "Latchkey"),
            app_url: env.optional("APP_URL").map(|u| u.trim_end_matches('/').to_owned()),
            email_templates_dir: env.optional("EMAIL_TEMPLATES_DIR").map(Into::into),
            mail_workers: env.parse("MAIL_WORKERS", "2")?,
            mail_poll_interval: env.duration("MAIL_POLL_INTERVAL", "1s")?,
            mail_lease: env.duration("MAIL_LEASE", "5m")?,
            mail_max_attempts: env.parse("MAIL_MAX_ATTEMPTS", "10")?,
            mail_retry_base: env.duration("MAIL_RETRY_BASE", "30s")?,
            mail_retry_max: env.duration("MAIL_RETRY_MAX", "1h")?,
            geoip_database: env.optional("GEOIP_DATABASE").map(Into::into),
            notify_new_device: env.parse("NOTIFY_NEW_DEVICE", "false")?,
            email_verification: env.parse("EMAIL_VERIFICATION", "optional")?,
            verify_email_ttl: env.duration("VERIFY_EMAIL_TTL", "24h")?,
            password_reset_ttl: env.duration("PASSWORD_RESET_TTL", "30m")?,
            email_change_ttl: env.duration("EMAIL_CHANGE_TTL", "1h")?,
            rate_limit_email_per_address: env.parse("RATE_LIMIT_EMAIL_PER_ADDRESS", "3/1h")?,
            rate_limit_email_per_ip: env.parse("RATE_LIMIT_EMAIL_PER_IP", "10/1h")?,
            webauthn: webauthn_settings(
                env.optional("WEBAUTHN_RP_ID"),
                env.optional("WEBAUTHN_ORIGINS"),
                &env.string("JWT_ISSUER", "http://localhost:8080"),
            )?,
            mfa_ticket_ttl: env.duration("MFA_TICKET_TTL", "5m")?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let db = self.database_url.expose_secret();
        if !["postgres://", "postgresql://", "mysql://", "sqlite:"].iter().any(|s| db.starts_with(s)) {
            return Err(invalid(
                "DATABASE_URL",
                "must start with postgres://, postgresql://, mysql:// or sqlite:".into(),
            ));
        }
        if let Some(redis) = &self.redis_url {
            let r = redis.expose_secret();
            if !(r.starts_with("redis://") || r.starts_with("rediss://")) {
                return Err(invalid("REDIS_URL", "must start with redis:// or rediss://".into()));
            }
            redis::Client::open(r).map_err(|_| invalid("REDIS_URL", "is not a valid Redis URL".into()))?;
        }
        let modes =
            [self.redis_url.is_some(), self.redis_cluster_nodes.is_some(), self.redis_sentinel.is_some()];
        if modes.iter().filter(|set| **set).count() > 1 {
            return Err(invalid(
                "REDIS_URL",
                "set only one of REDIS_URL, REDIS_CLUSTER_NODES, or REDIS_SENTINEL_NODES with REDIS_SENTINEL_MASTER"
                    .into(),
            ));
        }
        url::Url::parse(&self.jwt_issuer)
            .map_err(|e| invalid("JWT_ISSUER", format!("must be a URL: {e}")))?;
        for (name, value) in [("JWT_AUDIENCE", &self.jwt_audience), ("JWT_CLIENT_ID", &self.jwt_client_id)] {
            if value.trim().is_empty() {
                return Err(invalid(name, "must not be empty".into()));
            }
        }
        let positive = [
            ("ACCESS_TOKEN_TTL", self.access_token_ttl),
            ("REFRESH_TOKEN_TTL", self.refresh_token_ttl),
            ("DATABASE_ACQUIRE_TIMEOUT", self.database_acquire_timeout),
            ("REDIS_CONNECT_TIMEOUT", self.redis_connect_timeout),
            ("REDIS_RESPONSE_TIMEOUT", self.redis_response_timeout),
            ("HTTP_HEADER_TIMEOUT", self.http_header_timeout),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(invalid(name, "must be greater than zero".into()));
            }
        }
        if self.refresh_token_cookie && self.cors_allowed_origins.iter().any(|o| o == "*") {
            return Err(invalid(
                "CORS_ALLOWED_ORIGINS",
                "must list origins, not *, when REFRESH_TOKEN_COOKIE=true".into(),
            ));
        }
        match (self.jwt_algorithm, &self.jwt_secret) {
            (jsonwebtoken::Algorithm::HS256, None) => {
                return Err(invalid(
                    "JWT_SECRET",
                    "must be set (at least 32 bytes) when JWT_ALGORITHM=HS256".into(),
                ));
            }
            (jsonwebtoken::Algorithm::HS256, Some(secret)) if secret.expose_secret().len() < 32 => {
                return Err(invalid("JWT_SECRET", "must be at least 32 bytes".into()));
            }
            (jsonwebtoken::Algorithm::HS256, _) => {}
            (_, Some(_)) => {
                return Err(invalid("JWT_SECRET", "is only used with JWT_ALGORITHM=HS256; unset it".into()));
            }
            (_, None) => {}
        }
        for (name, value) in [
            ("KEY_ENCRYPTION_KEY", &self.key_encryption_key),
            ("KEY_ENCRYPTION_KEY_OLD", &self.key_encryption_key_old),
        ] {
            if let Some(raw) = value {
                crate::keys::parse_kek(raw.expose_secret()).map_err(|e| invalid(name, e))?;
            }
        }
        if self.key_prepublish < self.jwks_max_age + self.keys_refresh_interval {
            return Err(invalid(
                "KEY_PREPUBLISH",
                "must be at least JWKS_MAX_AGE + KEYS_REFRESH_INTERVAL, or verifiers with a cached key set would meet an unknown kid".into(),
            ));
        }
        if self.keys_refresh_interval.is_zero() || self.keys_refresh_interval > Duration::from_secs(60) {
            return Err(invalid("KEYS_REFRESH_INTERVAL", "must be between 1s and 60s".into()));
        }
        if self.access_token_ttl > self.refresh_token_ttl {
            return Err(invalid("ACCESS_TOKEN_TTL", "must not be longer than REFRESH_TOKEN_TTL".into()));
        }
        if self.database_max_connections == 0 || self.database_min_connections > self.database_max_connections
        {
            return Err(invalid(
                "DATABASE_MAX_CONNECTIONS",
                "must be at least 1 and at least DATABASE_MIN_CONNECTIONS".into(),
            ));
        }
        if !(1..=128).contains(&self.rate_limit_ipv6_prefix) {
            return Err(invalid("RATE_LIMIT_IPV6_PREFIX", "must be between 1 and 128".into()));
        }
        if self.login_cooldown.threshold == 0 {
            return Err(invalid("LOGIN_COOLDOWN_THRESHOLD", "must be at least 1".into()));
        }
        if self.login_cooldown.base_ms == 0 || self.login_cooldown.max_ms < self.login_cooldown.base_ms {
            return Err(invalid(
                "LOGIN_COOLDOWN_MAX",
                "must be at least LOGIN_COOLDOWN_BASE, which must be positive".into(),
            ));
        }
        if self.max_sessions_per_user == 0 {
            return Err(invalid("MAX_SESSIONS_PER_USER", "must be at least 1".into()));
        }
        if self.key_encryption_key_old.is_some() && self.key_encryption_key.is_none() {
            return Err(invalid(
                "KEY_ENCRYPTION_KEY_OLD",
                "is set without KEY_ENCRYPTION_KEY: the old key only opens keys while they are re-sealed under the new one; set KEY_ENCRYPTION_KEY too (or unset KEY_ENCRYPTION_KEY_OLD)".into(),
            ));
        }
        if self.audit_queue_capacity == 0 {
            return Err(invalid("AUDIT_QUEUE_CAPACITY", "must be at least 1".into()));
        }
        if self.password_hash_workers == 0 {
            return Err(invalid("PASSWORD_HASH_WORKERS", "must be at least 1".into()));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid("MAX_BODY_BYTES", "must be at least 1024".into()));
        }
        if let Some(webauthn) = &self.webauthn {
            webauthn.build(&self.product_name).map_err(|e| invalid("WEBAUTHN_ORIGINS", e))?;
        }
        self.validate_mail()
    }

    fn validate_mail(&self) -> Result<(), ConfigError> {
        if let Some(smtp) = &self.smtp_url {
            check_smtp_url(smtp.expose_secret()).map_err(|e| invalid("SMTP_URL", e))?;
        }
        if let Some(app) = &self.app_url {
            let url = url::Url::parse(app).map_err(|e| invalid("APP_URL", format!("must be a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.query().is_some() || url.fragment().is_some()
            {
                return Err(invalid("APP_URL", "must be an http(s) URL without query or fragment".into()));
            }
        }
        if self.product_name.chars().any(char::is_control) {
            return Err(invalid("PRODUCT_NAME", "must not contain control characters".into()));
        }
        if self.mail_workers == 0 {
            return Err(invalid("MAIL_WORKERS", "must be at least 1".into()));
        }
        if self.mail_max_attempts == 0 {
            return Err(invalid("MAIL_MAX_ATTEMPTS", "must be at least 1".into()));
        }
        for (name, value) in
            [("MAIL_POLL_INTERVAL", self.mail_poll_interval), ("MAIL_RETRY_BASE", self.mail_retry_base)]
        {
            if value.is_zero() {
                return Err(invalid(name, "must be greater than zero".into()));
            }
        }
        if self.mail_retry_max < self.mail_retry_base {
            return Err(invalid("MAIL_RETRY_MAX", "must be at least MAIL_RETRY_BASE".into()));
        }
        if self.mail_lease < 2 * crate::mail::transport::SMTP_TIMEOUT {
            return Err(invalid(
                "MAIL_LEASE",
                "must be at least 1m (twice the SMTP timeout), or a slow send could be taken over and sent twice"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Where mailed links point: `APP_URL`, or Latchkey's own pages under `JWT_ISSUER`.
    pub fn link_base(&self) -> String {
        match &self.app_url {
            Some(app) => app.clone(),
            None => format!("{}/account", self.jwt_issuer.trim_end_matches('/')),
        }
    }

    /// The session list a new-device mail links to: `{APP_URL}/sessions`, or, since
    /// Latchkey has no page of its own for it, its operation in the API docs.
    pub fn sessions_link(&self) -> String {
        match &self.app_url {
            Some(app) => format!("{app}/sessions"),
            None => format!("{}/docs#/Users/mySessions", self.jwt_issuer.trim_end_matches('/')),
        }
    }

    pub fn uses_sqlite(&self) -> bool {
        self.database_url.expose_secret().starts_with("sqlite:")
    }
}

/// `smtp://` (plain, or STARTTLS with `?tls=required` / `?tls=opportunistic`) or
/// `smtps://` (implicit TLS). lettre would send `AUTH` over a plain connection: credentials
/// are refused unless the connection is encrypted for sure (`smtps://`, `tls=required`) or
/// stays on this machine. Messages never repeat the URL (it holds the password).
fn check_smtp_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw)
        .map_err(|_| "is not a URL like smtps://user:password@smtp.example.com:465".to_owned())?;
    if !matches!(url.scheme(), "smtp" | "smtps") {
        return Err(format!("scheme {:?}: expected smtp or smtps", url.scheme()));
    }
    let loopback = match url.host() {
        // smtp is not a "special" scheme to the url crate: IP addresses come as domains.
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("has no host".into()),
    };
    let tls = url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
    match tls.as_deref() {
        None | Some("required" | "opportunistic") => {}
        Some(other) => return Err(format!("tls={other}: expected tls=required or tls=opportunistic")),
    }
    let credentials = !url.username().is_empty() || url.password().is_some();
    let encrypted = url.scheme() == "smtps" || tls.as_deref() == Some("required");
    if credentials && !encrypted && !loopback {
        return Err("would send its credentials in clear text: use smtps:// (port 465) or \
                    smtp://…?tls=required (STARTTLS), or no credentials"
            .into());
    }
    lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(raw)
        .map(|_| ())
        .map_err(|_| "is not a valid SMTP URL".to_owned())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn invalid(variable: &'static str, reason: String) -> ConfigError {
    ConfigError { variable, reason }
}

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    /// Unset and empty mean the same: the default.
    fn optional(&self, name: &str) -> Option<String> {
        (self.lookup)(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.optional(name).unwrap_or_else(|| default.to_owned())
    }

    fn parse<T: FromStr>(&self, name: &'static str, default: &str) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.string(name, default);
        raw.parse().map_err(|e: T::Err| invalid(name, format!("{raw:?}: {e}")))
    }

    fn duration(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let raw = self.string(name, default);
        humantime::parse_duration(&raw)
            .map_err(|e| invalid(name, format!("{raw:?}: {e} (use e.g. 10s, 15m, 30d)")))
    }

    fn list<T: FromStr<Err = String>>(&self, name: &'static str) -> Result<Vec<T>, ConfigError> {
        self.optional(name)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|e| invalid(name, e)))
            .collect()
    }
}

impl Config {
    /// The key settings, with the key-encryption keys decoded (validated at start).
    pub fn key_settings(&self) -> crate::keys::KeySettings {
        let kek = |raw: &Option<SecretString>| {
            raw.as_ref().and_then(|r| crate::keys::parse_kek(r.expose_secret()).ok())
        };
        crate::keys::KeySettings {
            algorithm: self.jwt_algorithm,
            hmac_secret: self.jwt_secret.clone(),
            kek: kek(&self.key_encryption_key),
            old_kek: kek(&self.key_encryption_key_old),
            prepublish: self.key_prepublish,
            access_token_ttl: self.access_token_ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_map(&map)
    }

    #[test]
    fn every_sql_backend_is_accepted() {
        for url in ["postgres://u@db/x", "postgresql://u@db/x", "mysql://u@db/x", "sqlite::memory:"] {
            let c = config(&[("DATABASE_URL", url)]).expect(url);
            assert_eq!(c.uses_sqlite(), url.starts_with("sqlite:"));
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = config(&[]).expect("defaults");
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.access_token_ttl, Duration::from_secs(900));
        assert_eq!(c.refresh_token_ttl, Duration::from_secs(30 * 86400));
        assert_eq!(c.rate_limit_login_per_ip, Rate { capacity: 30, period: Duration::from_secs(60) });
        assert!(c.redis_url.is_none());
        assert!(c.uses_sqlite());
        assert_eq!(c.http_header_timeout, Duration::from_secs(10));
        assert_eq!(c.password_min_strength.score(), 3);
        let lenient = config(&[("PASSWORD_MIN_STRENGTH", "0")]).expect("0 is allowed");
        assert_eq!(lenient.password_min_strength.score(), 0);
        assert_eq!(c.rate_limit_ipv6_prefix, 64);
        assert_eq!(c.forwarded_header, ForwardedHeader::XForwardedFor);
        let c =
            config(&[("FORWARDED_HEADER", "Forwarded"), ("RATE_LIMIT_IPV6_PREFIX", "128")]).expect("valid");
        assert_eq!(c.forwarded_header, ForwardedHeader::Forwarded);
        assert_eq!(c.rate_limit_ipv6_prefix, 128);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (var, value) in [
            ("ACCESS_TOKEN_TTL", "fifteen"),
            ("LISTEN_ADDR", "nowhere"),
            ("RATE_LIMIT_LOGIN_PER_IP", "30"),
            ("RATE_LIMIT_REFRESH_PER_IP", "0/1m"),
            ("TRUSTED_PROXIES", "10.0.0.0/33"),
            ("REDIS_URL", "http://x"),
            ("DATABASE_URL", "mariadb://x"),
            ("JWT_ISSUER", "not a url"),
            ("LOG_FORMAT", "xml"),
            ("HTTP_HEADER_TIMEOUT", "0s"),
            ("HTTP_HEADER_TIMEOUT", "soon"),
            ("PASSWORD_MIN_STRENGTH", "5"),
            ("PASSWORD_MIN_STRENGTH", "strong"),
            ("RATE_LIMIT_IPV6_PREFIX", "0"),
            ("RATE_LIMIT_IPV6_PREFIX", "129"),
            ("RATE_LIMIT_IPV6_PREFIX", "sixty-four"),
            ("FORWARDED_HEADER", "x-real-ip"),
        ] {
            let err = config(&[(var, value)]).expect_err(var);
            assert_eq!(err.variable, var, "{err}");
            assert!(err.to_string().contains(var));
        }
    }

    #[test]
    fn redis_cluster_and_sentinel_settings_are_checked() {
        let c = config(&[("REDIS_CLUSTER_NODES", "10.0.0.1:6379, redis-2:6380,redis://:pw@r3:6379")])
            .expect("cluster");
        assert_eq!(c.redis_cluster_nodes.as_ref().map(RedisNodes::len), Some(3));
        assert!(!format!("{c:?}").contains("pw"), "no password in Debug");
        for bad in ["nohost", "h:0", "h:99999", "h:1,,h:2", "http://h:1", ":6379"] {
            let err = config(&[("REDIS_CLUSTER_NODES", bad)]).expect_err(bad);
            assert_eq!(err.variable, "REDIS_CLUSTER_NODES", "{bad}: {err}");
        }
        let c =
            config(&[("REDIS_SENTINEL_NODES", "s1:26379,s2:26379"), ("REDIS_SENTINEL_MASTER", "mymaster")])
                .expect("sentinel");
        assert_eq!(c.redis_sentinel.as_ref().map(|(n, m)| (n.len(), m.as_str())), Some((2, "mymaster")));
        let err = config(&[("REDIS_SENTINEL_NODES", "s1:26379")]).expect_err("no master name");
        assert_eq!(err.variable, "REDIS_SENTINEL_MASTER");
        let err = config(&[("REDIS_SENTINEL_MASTER", "m")]).expect_err("no sentinels");
        assert_eq!(err.variable, "REDIS_SENTINEL_NODES");
        let err =
            config(&[("REDIS_URL", "redis://r"), ("REDIS_CLUSTER_NODES", "h:1")]).expect_err("two modes");
        assert!(err.to_string().contains("REDIS_CLUSTER_NODES"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = config(&[("DATABASE_URL", "postgres://u:hunter2@db/x"), ("REDIS_URL", "redis://:pw123@r")])
            .expect("config");
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("pw123"), "{printed}");
    }

    #[test]
    fn smtp_urls_with_credentials_must_be_encrypted_or_local() {
        for ok in [
            "smtps://user:pw@smtp.example.com:465",
            "smtp://user:pw@smtp.example.com:587?tls=required",
            "smtp://relay.example.com:25",
            "smtp://user:pw@127.0.0.1:2525",
            "smtp://user:pw@localhost",
            "smtp://user:pw@[::1]:2525",
        ] {
            config(&[("SMTP_URL", ok)]).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "smtp://user:pw@smtp.example.com:587",
            "smtp://user:pw@smtp.example.com?tls=opportunistic",
            "smtp://user:pw@127.0.0.1.example.com",
            "smtp://smtp.example.com?tls=none",
            "http://smtp.example.com",
            "smtp://",
        ] {
            let err = config(&[("SMTP_URL", bad)]).expect_err(bad);
            assert_eq!(err.variable, "SMTP_URL", "{err}");
            assert!(!err.to_string().contains("pw"), "the password stays out of the message: {err}");
        }
        let printed = format!("{:?}", config(&[("SMTP_URL", "smtps://u:hunter2@h:465")]).expect("config"));
        assert!(!printed.contains("hunter2"), "{printed}");
    }

    #[test]
    fn mail_settings_are_validated() {
        let c = config(&[]).expect("defaults");
        assert_eq!(c.email_from.to_string(), "Latchkey <no-reply@localhost>");
        assert_eq!(c.link_base(), "http://localhost:8080/account");
        assert_eq!(c.sessions_link(), "http://localhost:8080/docs#/Users/mySessions");
        let c = config(&[("APP_URL", "https://app.example.com/")]).expect("config");
        assert_eq!(c.link_base(), "https://app.example.com");
        assert_eq!(c.sessions_link(), "https://app.example.com/sessions");
        assert!(!c.notify_new_device && c.geoip_database.is_none(), "both off by default");
        let c = config(&[("NOTIFY_NEW_DEVICE", "true"), ("GEOIP_DATABASE", "/var/lib/geoip/city.mmdb")])
            .expect("config");
        assert!(c.notify_new_device);
        assert_eq!(c.geoip_database.as_deref(), Some(std::path::Path::new("/var/lib/geoip/city.mmdb")));
        for (var, value) in [
            ("NOTIFY_NEW_DEVICE", "yes please"),
            ("EMAIL_FROM", "not a mailbox"),
            ("APP_URL", "app.example.com"),
            ("MAIL_LEASE", "10s"),
            ("MAIL_MAX_ATTEMPTS", "0"),
            ("MAIL_RETRY_MAX", "1s"),
        ] {
            let err = config(&[(var, value)]).expect_err(var);
            assert_eq!(err.variable, var, "{err}");
        }
    }

    #[test]
    fn the_relying_party_defaults_to_the_issuer_and_refuses_what_cannot_work() {
        let settings = |pairs: &[(&str, &str)]| config(pairs).map(|c| c.webauthn);
        let default = settings(&[]).expect("defaults").expect("on by default");
        assert_eq!(default.rp_id, "localhost");
        assert_eq!(default.origins, vec![url::Url::parse("http://localhost:8080").expect("url")]);
        let derived = settings(&[("JWT_ISSUER", "https://Auth.Example.com/tenant/")]).expect("valid");
        let derived = derived.expect("on");
        assert_eq!(derived.rp_id, "auth.example.com");
        assert_eq!(derived.origins[0].as_str(), "https://auth.example.com/");
        let both = settings(&[
            ("WEBAUTHN_RP_ID", "example.com"),
            ("WEBAUTHN_ORIGINS", "https://auth.example.com, https://example.com:8443"),
        ])
        .expect("valid")
        .expect("on");
        assert_eq!((both.rp_id.as_str(), both.origins.len()), ("example.com", 2));
        // Defaults that cannot be a relying party turn passkeys off, without an error.
        for issuer in ["http://127.0.0.1:8080", "http://auth.internal:8080", "https://[::1]:8443"] {
            assert_eq!(settings(&[("JWT_ISSUER", issuer)]).expect(issuer), None, "{issuer}");
        }
        for (pairs, variable) in [
            (vec![("WEBAUTHN_ORIGINS", "https://evil.example")], "WEBAUTHN_ORIGINS"),
            (vec![("WEBAUTHN_ORIGINS", "*")], "WEBAUTHN_ORIGINS"),
            (vec![("WEBAUTHN_ORIGINS", " , ")], "WEBAUTHN_ORIGINS"),
            (vec![("WEBAUTHN_ORIGINS", "https://localhost.evil.example")], "WEBAUTHN_ORIGINS"),
            (
                vec![("WEBAUTHN_RP_ID", "example.com"), ("WEBAUTHN_ORIGINS", "http://example.com")],
                "WEBAUTHN_ORIGINS",
            ),
            (
                vec![("WEBAUTHN_RP_ID", "example.com"), ("WEBAUTHN_ORIGINS", "https://badexample.com")],
                "WEBAUTHN_ORIGINS",
            ),
            (vec![("WEBAUTHN_RP_ID", "10.0.0.1")], "WEBAUTHN_RP_ID"),
            (vec![("WEBAUTHN_RP_ID", "example.com/path")], "WEBAUTHN_RP_ID"),
            (
                vec![("JWT_ISSUER", "http://10.0.0.1"), ("WEBAUTHN_ORIGINS", "https://a.example")],
                "WEBAUTHN_RP_ID",
            ),
            (
                vec![("JWT_ISSUER", "http://auth.internal"), ("WEBAUTHN_RP_ID", "auth.internal")],
                "WEBAUTHN_ORIGINS",
            ),
        ] {
            let err = config(&pairs).expect_err(&format!("{pairs:?}"));
            assert_eq!(err.variable, variable, "{pairs:?}: {err}");
        }
    }

    #[test]
    fn trusted_proxies_match_blocks() {
        let p: TrustedProxy = "10.0.0.0/8".parse().expect("cidr");
        assert!(p.contains("10.1.2.3".parse().expect("ip")));
        assert!(p.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!p.contains("11.0.0.1".parse().expect("ip")));
        let one: TrustedProxy = "::1".parse().expect("ip");
        assert!(one.contains("::1".parse().expect("ip")));
        let all: TrustedProxy = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
    }
}
