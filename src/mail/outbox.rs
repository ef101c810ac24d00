//! Queueing: a mail becomes an `email_outbox` row, rendered, in the caller's transaction,
//! so it is sent if and only if what caused it (a one-time token, an email change) commits.

use std::sync::Arc;

use sea_orm::{ActiveModelTrait as _, ConnectionTrait, DbErr, Set};
use uuid::Uuid;

use super::templates::{TemplateError, Templates};
use super::{Mail, Rendered};
use crate::clock::Clock;
use crate::config::Config;
use crate::store::entity::email_outbox;

/// The pages a mailed link opens. A one-time token goes in the URL fragment, which
/// browsers never send to servers, proxies or in `Referer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPage {
    VerifyEmail,
    ResetPassword,
    ConfirmEmail,
    /// The signed-in user's session list, where a session can be ended (the new-device
    /// mail); it takes no token: link to it with [`Outbox::page`].
    Sessions,
}

impl LinkPage {
    fn path(self) -> &'static str {
        match self {
            LinkPage::VerifyEmail => "verify-email",
            LinkPage::ResetPassword => "reset-password",
            LinkPage::ConfirmEmail => "confirm-email",
            LinkPage::Sessions => "sessions",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("writing the outbox row: {0}")]
    Database(#[from] DbErr),
}

/// What services hold to queue mail (in `AppState`).
#[derive(Clone, Debug)]
pub struct Outbox {
    templates: Arc<Templates>,
    link_base: String,
    sessions_link: String,
    clock: Clock,
}

impl Outbox {
    pub fn new(templates: Arc<Templates>, config: &Config, clock: Clock) -> Self {
        Self { templates, link_base: config.link_base(), sessions_link: config.sessions_link(), clock }
    }

    /// `{APP_URL}/{page}#token=…`, or Latchkey's own pages at `{JWT_ISSUER}/account/{page}`.
    pub fn link(&self, page: LinkPage, token: &str) -> String {
        format!("{}#token={token}", self.page(page))
    }

    /// A page without a token: `{APP_URL}/{page}`, or Latchkey's own at
    /// `{JWT_ISSUER}/account/{page}`. Latchkey has no page of its own for the session list:
    /// without `APP_URL`, [`LinkPage::Sessions`] is its operation in the API docs,
    /// `{JWT_ISSUER}/docs#/Users/mySessions`.
    pub fn page(&self, page: LinkPage) -> String {
        match page {
            LinkPage::Sessions => self.sessions_link.clone(),
            other => format!("{}/{}", self.link_base, other.path()),
        }
    }

    /// Renders `mail` and inserts it as a queued row on `conn` — pass the transaction
    /// that makes the change the mail is about. Returns the row's id (also the mail's
    /// `Message-ID`).
    pub async fn enqueue(&self, conn: &impl ConnectionTrait, mail: &Mail) -> Result<Uuid, MailError> {
        Ok(self.row(mail)?.insert(conn).await?.id)
    }

    /// `mail` rendered into a queued outbox row, not yet written: for a caller that renders
    /// before its transaction begins and inserts the row in it (login, its new-device mail).
    pub fn row(&self, mail: &Mail) -> Result<email_outbox::ActiveModel, MailError> {
        let Rendered { subject, text, html } = self.templates.render(mail)?;
        let now = self.clock.now();
        let id = Uuid::now_v7();
        Ok(email_outbox::ActiveModel {
            id: Set(id),
            recipient: Set(mail.recipient().as_str().to_owned()),
            template: Set(mail.template().to_owned()),
            subject: Set(subject),
            text_body: Set(text),
            html_body: Set(html),
            status: Set(super::worker::QUEUED.to_owned()),
            attempts: Set(0),
            next_attempt_at: Set(now),
            lease_until: Set(None),
            last_error: Set(None),
            created_at: Set(now),
            sent_at: Set(None),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(pairs: &[(&str, &str)]) -> Outbox {
        let map = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let config = Config::from_map(&map).expect("config");
        let templates = Templates::load(None, "Latchkey").expect("templates");
        Outbox::new(Arc::new(templates), &config, Clock::system())
    }

    #[test]
    fn links_go_to_the_app_or_to_latchkeys_own_pages() {
        let own = outbox(&[]);
        assert_eq!(
            own.link(LinkPage::ResetPassword, "t"),
            "http://localhost:8080/account/reset-password#token=t"
        );
        assert_eq!(own.page(LinkPage::Sessions), "http://localhost:8080/docs#/Users/mySessions");
        let app = outbox(&[("APP_URL", "https://app.example.com")]);
        assert_eq!(app.link(LinkPage::VerifyEmail, "t"), "https://app.example.com/verify-email#token=t");
        assert_eq!(app.page(LinkPage::Sessions), "https://app.example.com/sessions");
    }

    /// Without `APP_URL` the session list is a Swagger UI deep link (`#/{tag}/{operationId}`):
    /// renaming the operation or its tag would break every mailed link.
    #[test]
    fn the_docs_link_names_the_session_list_operation() {
        let spec: serde_json::Value = serde_json::from_str(&crate::api::spec_json()).expect("spec");
        let op = &spec["paths"]["/v1/users/me/sessions"]["get"];
        assert_eq!(op["operationId"], "mySessions", "{op}");
        assert_eq!(op["tags"], serde_json::json!(["Users"]), "{op}");
    }
}
