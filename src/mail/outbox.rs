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

/// The pages a mailed link opens; the token goes in the URL fragment, which browsers
/// never send to servers, proxies or in `Referer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPage {
    VerifyEmail,
    ResetPassword,
    ConfirmEmail,
}

impl LinkPage {
    fn path(self) -> &'static str {
        match self {
            LinkPage::VerifyEmail => "verify-email",
            LinkPage::ResetPassword => "reset-password",
            LinkPage::ConfirmEmail => "confirm-email",
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
    clock: Clock,
}

impl Outbox {
    pub fn new(templates: Arc<Templates>, config: &Config, clock: Clock) -> Self {
        Self { templates, link_base: config.link_base(), clock }
    }

    /// `{APP_URL}/{page}#token=…`, or Latchkey's own pages at `{JWT_ISSUER}/account/{page}`.
    pub fn link(&self, page: LinkPage, token: &str) -> String {
        format!("{}/{}#token={token}", self.link_base, page.path())
    }

    /// Renders `mail` and inserts it as a queued row on `conn` — pass the transaction
    /// that makes the change the mail is about. Returns the row's id (also the mail's
    /// `Message-ID`).
    pub async fn enqueue(&self, conn: &impl ConnectionTrait, mail: &Mail) -> Result<Uuid, MailError> {
        let Rendered { subject, text, html } = self.templates.render(mail)?;
        let now = self.clock.now();
        let id = Uuid::now_v7();
        email_outbox::ActiveModel {
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
        }
        .insert(conn)
        .await?;
        Ok(id)
    }
}
