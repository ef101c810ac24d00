//! The built-in account pages (issue 15): where mailed links go when `APP_URL` is unset
//! (`{JWT_ISSUER}/account/verify-email#token=…`, see `mail::Outbox::link`).
//!
//! Three small HTML pages, rendered once at start-up from one minijinja template (the
//! `.html` name makes minijinja escape `PRODUCT_NAME`), and the one script and style sheet
//! they share, all compiled in. A fourth, `/account/passkeys` (issue 16), has a template and
//! a script of its own (`passkeys.js`): sign in with a passkey, or with a password and a
//! second factor, and add passkeys, so passkeys work without a custom front end. The script reads the token from the URL fragment, which
//! no server, proxy or `Referer` ever sees, and POSTs it to the JSON API only when the
//! person presses the button: opening a page changes nothing, so mail scanners that follow
//! (and even run) links do no harm. No inline script or style, so the pages carry a
//! Content-Security-Policy that allows only Latchkey's own files.
//!
//! Plain poem routes, not in the OpenAPI document; the API's middleware still wraps them,
//! so an unknown `/account/…` path or a method other than GET and HEAD gets the JSON error
//! of every other route. The pages link to their files and to the API with relative URLs,
//! so they also work when Latchkey is served under a path prefix.

use minijinja::{Environment, context};
use poem::http::{HeaderValue, StatusCode, header};
use poem::{Response, Route, get};

const TEMPLATE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("account.js");
const STYLE: &str = include_str!("account.css");
const PASSKEYS_TEMPLATE: &str = include_str!("passkeys.html");
const PASSKEYS_SCRIPT: &str = include_str!("passkeys.js");

/// Only Latchkey's own script, style sheet and API; no framing, no `<base>`, forms only
/// to Latchkey.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Each page: its path under `/account`, its title, its button.
const PAGES: [(&str, &str, &str); 3] = [
    ("verify-email", "Verify your email address", "Verify my email"),
    ("reset-password", "Choose a new password", "Change my password"),
    ("confirm-email", "Confirm your new email address", "Confirm new email"),
];

/// The pages, rendered for this server's `PRODUCT_NAME`.
#[derive(Clone, Debug)]
pub struct Pages {
    rendered: Vec<(&'static str, String)>,
}

impl Pages {
    pub fn render(product_name: &str) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        env.add_template("page.html", TEMPLATE)?;
        env.add_template("passkeys.html", PASSKEYS_TEMPLATE)?;
        let template = env.get_template("page.html")?;
        let mut rendered = PAGES
            .iter()
            .map(|&(page, title, button)| {
                let html = template.render(context! { page, title, button, product_name })?;
                Ok((page, html))
            })
            .collect::<Result<Vec<_>, minijinja::Error>>()?;
        let page = "passkeys";
        let html = env
            .get_template("passkeys.html")?
            .render(context! { page, title => "Passkeys", product_name })?;
        rendered.push((page, html));
        Ok(Self { rendered })
    }

    /// The routes, to be nested at `/account`.
    pub fn routes(&self) -> Route {
        let route = self.rendered.iter().fold(Route::new(), |route, (page, html)| {
            let html = html.clone();
            route.at(
                format!("/{page}"),
                get(poem::endpoint::make_sync(move |_| respond(html.clone(), "text/html; charset=utf-8"))),
            )
        });
        route
            .at(
                "/account.js",
                get(poem::endpoint::make_sync(|_| {
                    respond(SCRIPT.to_owned(), "text/javascript; charset=utf-8")
                })),
            )
            .at(
                "/passkeys.js",
                get(poem::endpoint::make_sync(|_| {
                    respond(PASSKEYS_SCRIPT.to_owned(), "text/javascript; charset=utf-8")
                })),
            )
            .at(
                "/account.css",
                get(poem::endpoint::make_sync(|_| respond(STYLE.to_owned(), "text/css; charset=utf-8"))),
            )
    }
}

/// A page or one of its files, with the headers every one of them carries. `no-store`: a
/// page may sit behind a link with a live token, and the files are tiny and must never be
/// older than the page that loads them.
fn respond(body: String, content_type: &'static str) -> Response {
    let mut resp = Response::builder().status(StatusCode::OK).body(body);
    let headers = resp.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::HeaderName::from_static("cross-origin-opener-policy"), "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page<'a>(pages: &'a Pages, name: &str) -> &'a str {
        pages.rendered.iter().find(|(p, _)| *p == name).map(|(_, html)| html.as_str()).unwrap_or_default()
    }

    #[test]
    fn the_product_name_is_escaped_everywhere_it_appears() {
        let pages = Pages::render(r#"<script>alert("x")</script> & "Co""#).unwrap();
        assert_eq!(pages.rendered.len(), 4);
        for (name, html) in &pages.rendered {
            assert!(!html.contains("<script>alert"), "{name}: {html}");
            assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)"), "{name}: {html}");
            assert!(html.contains("&amp; &quot;Co&quot;"), "{name}: {html}");
        }
    }

    #[test]
    fn each_page_has_its_button_and_only_the_reset_page_asks_for_a_password() {
        let pages = Pages::render("Latchkey").unwrap();
        for (name, _, button) in PAGES {
            let html = page(&pages, name);
            assert!(html.contains(&format!(r#"data-page="{name}""#)), "{html}");
            assert!(html.contains(&format!(">{button}</button>")), "{html}");
            assert_eq!(html.contains(r#"type="password""#), name == "reset-password", "{name}");
        }
    }

    #[test]
    fn the_passkeys_page_has_both_ways_in_and_loads_its_own_script() {
        let pages = Pages::render("Latchkey").unwrap();
        let html = page(&pages, "passkeys");
        for needle in [
            r#"data-page="passkeys""#,
            r#"<script src="passkeys.js" defer></script>"#,
            ">Sign in with a passkey</button>",
            ">Add a passkey</button>",
            r#"autocomplete="current-password""#,
            r#"autocomplete="one-time-code""#,
        ] {
            assert!(html.contains(needle), "no {needle}: {html}");
        }
        assert!(!html.contains("account.js"), "{html}");
    }
}
