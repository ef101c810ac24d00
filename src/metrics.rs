//! Prometheus metrics, served on a listener of their own (`METRICS_ADDR`), never on the
//! public one. Each `Application` has its own registry (no global state, so tests can run
//! many servers in one process).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailLabels {
    template: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DependencyLabels {
    dependency: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    logins: Family<OutcomeLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    audit_depth: Gauge,
    audit_dropped: Family<ClassLabels, Gauge>,
    audit_suppressed: Family<ActionLabels, Counter>,
    dependency_errors: Family<DependencyLabels, Counter>,
    dependency_latency: Family<DependencyLabels, Histogram, fn() -> Histogram>,
    mails: Family<MailLabels, Counter>,
    mail_queue_depth: Gauge,
    mail_oldest_queued_age: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("latchkey");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_latency =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let logins = Family::<OutcomeLabels, Counter>::default();
        let rate_limited = Family::<LimitLabels, Counter>::default();
        let audit_depth = Gauge::default();
        let audit_dropped = Family::<ClassLabels, Gauge>::default();
        // A fixed label set, present from the start.
        for class in crate::audit::Class::ALL {
            let _ = audit_dropped.get_or_create(&ClassLabels { class: class.as_str() });
        }
        // Only refusals are audited under the flood rule; action names are code, never input.
        let audit_suppressed = Family::<ActionLabels, Counter>::default();
        let _ = audit_suppressed.get_or_create(&ActionLabels { action: "rate_limited" });
        let dependency_errors = Family::<DependencyLabels, Counter>::default();
        let dependency_latency =
            Family::<DependencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("http_requests", "HTTP requests by route, method and status", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            request_latency.clone(),
        );
        registry.register("logins", "Login attempts by outcome", logins.clone());
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit or the cool-down",
            rate_limited.clone(),
        );
        registry.register("audit_queue_depth", "Audit events waiting to be written", audit_depth.clone());
        registry.register(
            "audit_events_dropped",
            "Audit events dropped because their share of the queue was full, by class (security, noise)",
            audit_dropped.clone(),
        );
        registry.register(
            "audit_suppressed",
            "Refusals not written one by one (a repeat within the key's audit window), by action",
            audit_suppressed.clone(),
        );
        registry.register("dependency_errors", "Failed calls to SQL or Redis", dependency_errors.clone());
        registry.register(
            "dependency_duration_seconds",
            "Latency of calls to SQL or Redis",
            dependency_latency.clone(),
        );
        let mails = Family::<MailLabels, Counter>::default();
        let mail_queue_depth = Gauge::default();
        let mail_oldest_queued_age = Gauge::default();
        registry.register(
            "mails",
            "Mail send attempts by template and outcome (sent, retried, abandoned)",
            mails.clone(),
        );
        registry.register(
            "mail_queue_depth",
            "Mails in the outbox not yet sent or abandoned",
            mail_queue_depth.clone(),
        );
        registry.register(
            "mail_oldest_queued_age_seconds",
            "Age of the oldest mail not yet sent or abandoned (0 when none)",
            mail_oldest_queued_age.clone(),
        );
        Self {
            registry,
            requests,
            request_latency,
            logins,
            rate_limited,
            audit_depth,
            audit_dropped,
            audit_suppressed,
            dependency_errors,
            dependency_latency,
            mails,
            mail_queue_depth,
            mail_oldest_queued_age,
        }
    }

    /// One send attempt's outcome; `template` and `outcome` come from fixed sets.
    pub fn mail(&self, template: &'static str, outcome: &'static str) {
        self.mails.get_or_create(&MailLabels { template, outcome }).inc();
    }

    pub fn mail_queue(&self, depth: u64, oldest_age_seconds: i64) {
        self.mail_queue_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.mail_oldest_queued_age.set(oldest_age_seconds);
    }

    /// `route` and `method` come from fixed sets (see `startup::observe`, `method_label`).
    pub fn http(&self, route: &'static str, method: &'static str, status: u16, elapsed: Duration) {
        let route = route.to_owned();
        self.requests
            .get_or_create(&RequestLabels { route: route.clone(), method: method.to_owned(), status })
            .inc();
        self.request_latency.get_or_create(&RouteLabels { route }).observe(elapsed.as_secs_f64());
    }

    pub fn login(&self, outcome: &str) {
        self.logins.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    pub fn rate_limited(&self, limit: &str) {
        self.rate_limited.get_or_create(&LimitLabels { limit: limit.to_owned() }).inc();
    }

    /// A refusal counted instead of written (the audit log's flood rule).
    pub fn audit_suppressed(&self, action: &'static str) {
        self.audit_suppressed.get_or_create(&ActionLabels { action }).inc();
    }

    pub fn dependency(&self, dependency: &str, elapsed: Duration, ok: bool) {
        let labels = DependencyLabels { dependency: dependency.to_owned() };
        self.dependency_latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
        if !ok {
            self.dependency_errors.get_or_create(&labels).inc();
        }
    }

    /// The text exposition, with the audit queue's figures read at scrape time.
    pub fn encode(&self, audit: &crate::audit::Auditor) -> String {
        self.audit_depth.set(i64::try_from(audit.depth()).unwrap_or(i64::MAX));
        for class in crate::audit::Class::ALL {
            let dropped = i64::try_from(audit.dropped_of(class)).unwrap_or(i64::MAX);
            self.audit_dropped.get_or_create(&ClassLabels { class: class.as_str() }).set(dropped);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        out
    }
}

/// The `method` label: one of the methods the API and CORS use, or `other` (a client may
/// send any token as a method; each would be a series of its own).
pub fn method_label(method: &poem::http::Method) -> &'static str {
    use poem::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Times every call to the revocation and limit stores (Redis) as a dependency.
pub struct Timed<T: ?Sized> {
    pub inner: Arc<T>,
    pub metrics: Arc<Metrics>,
    pub dependency: &'static str,
}

impl<T: ?Sized> Timed<T> {
    async fn time<R, E>(&self, call: impl std::future::Future<Output = Result<R, E>>) -> Result<R, E> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics.dependency(self.dependency, started.elapsed(), result.is_ok());
        result
    }
}

mod timed_impls {
    use async_trait::async_trait;
    use uuid::Uuid;

    use super::Timed;
    use crate::config::Rate;
    use crate::rate_limit::{CooldownPolicy, Decision};
    use crate::store::limits::{Admission, LimitStore, LoginBudgets};
    use crate::store::revocation::{
        Activated, Activation, Ending, RevocationStore, SessionRecord, StoreError, TokenState,
    };

    #[async_trait]
    impl RevocationStore for Timed<dyn RevocationStore> {
        fn kind(&self) -> &'static str {
            self.inner.kind()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.time(self.inner.ping()).await
        }
        async fn session(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
            self.time(self.inner.session(id)).await
        }
        async fn activate(&self, a: &Activation) -> Result<Activated, StoreError> {
            self.time(self.inner.activate(a)).await
        }
        async fn end(&self, sessions: &[Ending], hashes: &[String]) -> Result<(), StoreError> {
            self.time(self.inner.end(sessions, hashes)).await
        }
        async fn refresh_token(&self, hash: &str) -> Result<Option<TokenState>, StoreError> {
            self.time(self.inner.refresh_token(hash)).await
        }
        async fn stash(&self, key: &str, value: &str, ttl: std::time::Duration) -> Result<(), StoreError> {
            self.time(self.inner.stash(key, value, ttl)).await
        }
        async fn peek(&self, key: &str) -> Result<Option<String>, StoreError> {
            self.time(self.inner.peek(key)).await
        }
        async fn take(&self, key: &str) -> Result<Option<String>, StoreError> {
            self.time(self.inner.take(key)).await
        }
        async fn count(&self, key: &str, ttl: std::time::Duration) -> Result<u64, StoreError> {
            self.time(self.inner.count(key, ttl)).await
        }
    }

    #[async_trait]
    impl LimitStore for Timed<dyn LimitStore> {
        async fn take(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError> {
            self.time(self.inner.take(key, rate, now_ms)).await
        }
        async fn peek(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError> {
            self.time(self.inner.peek(key, rate, now_ms)).await
        }
        async fn admit_login(&self, login: &LoginBudgets<'_>, now_ms: i64) -> Result<Admission, StoreError> {
            self.time(self.inner.admit_login(login, now_ms)).await
        }
        async fn record_failure(
            &self,
            account: &str,
            p: CooldownPolicy,
            now_ms: i64,
        ) -> Result<(), StoreError> {
            self.time(self.inner.record_failure(account, p, now_ms)).await
        }
        async fn clear_failures(&self, account: &str) -> Result<(), StoreError> {
            self.time(self.inner.clear_failures(account)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use poem::http::Method;

    use super::method_label;

    #[test]
    fn method_labels_come_from_a_fixed_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::OPTIONS), "OPTIONS");
        for invented in ["FOO123", "get", "PROPFIND", "CONNECT", "TRACE"] {
            let method = Method::from_bytes(invented.as_bytes()).expect("a token");
            assert_eq!(method_label(&method), "other", "{invented}");
        }
    }
}
