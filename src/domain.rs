//! Values that can only exist valid: parsed once at the edge, trusted everywhere after.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use unicode_normalization::UnicodeNormalization as _;
use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory as _};

/// A validated email address in its one canonical form, so that every spelling of one
/// address is one account and one login budget:
///
/// - trimmed, and refused if any character is a control, format (invisible: zero-width
///   space, soft hyphen, byte-order mark, bidi controls …), private-use, unassigned or
///   separator character, or one of the few other invisible ones;
/// - the local part lower-cased and in Unicode NFC;
/// - the domain IDNA-encoded (UTS #46, strict: STD3 rules, hyphens, DNS lengths) to
///   lower-case ASCII, so `Bücher.example` is stored as `xn--bcher-kva.example`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

/// Why a string is not an email address; the message starts with the field's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("email: {0}")]
pub struct InvalidEmail(&'static str);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, InvalidEmail> {
        let malformed = InvalidEmail("not a valid email address");
        let raw = raw.trim();
        // Anything this long is no address; the bound also caps the normalisation work.
        if raw.is_empty() || raw.len() > 4 * Self::MAX_LEN {
            return Err(malformed);
        }
        if raw.chars().any(invisible) {
            return Err(InvalidEmail("contains an invisible or control character"));
        }
        let (local, domain) = raw.rsplit_once('@').ok_or(malformed)?;
        let local: String = local.to_lowercase().nfc().collect();
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && !local.chars().any(|c| "@<>()[]\\,;:\"".contains(c));
        if !local_ok {
            return Err(malformed);
        }
        // Strict: the STD3 rules (letters, digits, hyphens), no label starting or ending
        // with a hyphen, DNS lengths, no empty label or trailing dot. It maps case and
        // compatibility forms (`Ｅ` → `e`) and normalises before encoding.
        let domain = idna::domain_to_ascii_strict(domain).map_err(|_| malformed)?;
        if !domain.contains('.') {
            return Err(malformed);
        }
        let email = format!("{local}@{domain}");
        if email.len() > Self::MAX_LEN {
            return Err(malformed);
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Words a password must not be built from: the address, its local part and the
    /// words in it, the domain's labels and their hyphenated parts (as typed and as
    /// stored).
    pub fn words(&self) -> Vec<String> {
        let (local, domain) = self.0.rsplit_once('@').unwrap_or((&self.0, ""));
        let (unicode_domain, _) = idna::domain_to_unicode(domain);
        let mut words = vec![self.0.clone(), local.to_owned()];
        words.extend(local.split(|c: char| !c.is_alphanumeric()).map(str::to_owned));
        words.extend(domain.split('.').map(str::to_owned));
        for label in unicode_domain.split('.') {
            words.push(label.to_owned());
            words.extend(label.split('-').map(str::to_owned));
        }
        words.retain(|w| w.chars().count() >= 3);
        words.sort();
        words.dedup();
        words
    }

    /// `{local}@example.com`, for sample mails (templates are rendered with them at start);
    /// `local` is a literal the caller knows to be a valid local part.
    pub(crate) fn example(local: &'static str) -> Self {
        Self(format!("{local}@example.com"))
    }
}

/// Characters that do not show, or show as something else: every control (Cc), format
/// (Cf: zero-width space and joiners, soft hyphen, byte-order mark, bidi controls and
/// isolates …), surrogate, private-use and unassigned (Cn: its normalisation could change
/// in a later Unicode version) code point; every separator (spaces, line and paragraph
/// separators); and the default-ignorable code points of other categories (Hangul fillers,
/// the combining grapheme joiner, variation selectors).
fn invisible(c: char) -> bool {
    matches!(c.general_category_group(), GeneralCategoryGroup::Other | GeneralCategoryGroup::Separator)
        || matches!(
            c,
            '\u{034f}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{17b4}'
                | '\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{ffa0}'
                | '\u{e0100}'..='\u{e01ef}'
        )
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email({})", self.0)
    }
}

impl AsRef<str> for Email {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A password of 8..=1024 characters (characters, not bytes). Never printed.
pub struct Password(SecretString);

/// Why a password is refused before anything else looks at it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPassword {
    #[error("password: must be at least 8 characters")]
    TooShort,
    #[error("password: must be at most 1024 characters")]
    TooLong,
}

/// A new password below the required strength. The message is zxcvbn's feedback (fixed
/// sentences about patterns, never the password or a part of it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct WeakPassword {
    pub score: u8,
    pub detail: String,
}

/// The zxcvbn score, 0 (anything goes) to 4, that a new password must reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Strength(u8);

impl Strength {
    pub const MAX: u8 = 4;

    pub fn score(self) -> u8 {
        self.0
    }
}

impl Default for Strength {
    fn default() -> Self {
        Self(3)
    }
}

impl std::str::FromStr for Strength {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<u8>() {
            Ok(n) if n <= Self::MAX => Ok(Self(n)),
            _ => Err(format!("expected a zxcvbn score, a whole number from 0 to 4, got {s:?}")),
        }
    }
}

impl Password {
    pub const MIN_CHARS: usize = 8;
    pub const MAX_CHARS: usize = 1024;

    /// For a new password: length rules apply.
    pub fn new(raw: String) -> Result<Self, InvalidPassword> {
        let chars = raw.chars().count();
        if chars < Self::MIN_CHARS {
            return Err(InvalidPassword::TooShort);
        }
        Self::candidate(raw)
    }

    /// For a login attempt: only the upper bound applies (it caps hashing work); a short
    /// password is simply wrong, answered like any wrong password.
    pub fn candidate(raw: String) -> Result<Self, InvalidPassword> {
        if raw.chars().count() > Self::MAX_CHARS {
            return Err(InvalidPassword::TooLong);
        }
        Ok(Self(SecretString::from(raw)))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether a new password reaches `min`, judged by zxcvbn with the account's email as
    /// context (a password built from the address is weak). CPU-bound: up to about 20 ms
    /// in a release build (see [`judged_part`]), so the server runs it on the hashing pool.
    pub fn judge(&self, email: &Email, min: Strength) -> Result<(), WeakPassword> {
        if min.0 == 0 {
            return Ok(());
        }
        let words = email.words();
        let context: Vec<&str> = words.iter().map(String::as_str).collect();
        let verdict = zxcvbn::zxcvbn(judged_part(self.expose()), &context);
        let score = u8::from(verdict.score());
        if score >= min.0 {
            return Ok(());
        }
        // zxcvbn's feedback is fixed sentences about the kind of pattern it found.
        let mut advice: Vec<String> = Vec::new();
        if let Some(feedback) = verdict.feedback() {
            advice.extend(feedback.warning().map(|w| w.to_string()));
            advice.extend(feedback.suggestions().iter().map(ToString::to_string));
        }
        if advice.is_empty() {
            advice.push("Add another word or two. Uncommon words are better.".to_owned());
        }
        let detail = format!(
            "password: too easy to guess (strength {score} of 4, at least {} required). {}",
            min.0,
            advice.join(" ")
        );
        Err(WeakPassword { score, detail })
    }
}

/// At most this many characters of a password are judged …
const JUDGED_MAX_CHARS: usize = 48;
/// … and fewer when they hold more than this many distinct l33t characters …
const JUDGED_MAX_L33T: usize = 6;
/// … but never fewer than this (random passwords score 4 from about 11 characters on).
const JUDGED_MIN_CHARS: usize = 12;
/// The characters zxcvbn's l33t matcher reads as letters (`4` as `a`, `|` as `i` or `l` …).
const L33T_CHARS: &str = "4@8({[<3691!|70$5+%2";

/// The part of a password that zxcvbn judges. Its cost grows with the cube of the length
/// (every substring against every dictionary), times the number of l33t readings, which
/// grows with each distinct l33t character (they are not deduplicated). Measured in a
/// release build: 100 characters of letters and digits 15 ms, of all l33t characters up
/// to a second. The part judged here stays under about 20 ms.
///
/// Judging a prefix can only make a password look weaker, never stronger: a long password
/// whose first 48 characters are weak is refused.
fn judged_part(password: &str) -> &str {
    let mut l33t: Vec<char> = Vec::with_capacity(JUDGED_MAX_L33T + 1);
    let mut keep = JUDGED_MAX_CHARS;
    for (n, c) in password.chars().take(JUDGED_MAX_CHARS).enumerate() {
        if L33T_CHARS.contains(c) && !l33t.contains(&c) {
            l33t.push(c);
            if l33t.len() > JUDGED_MAX_L33T {
                keep = n.max(JUDGED_MIN_CHARS);
                break;
            }
        }
    }
    password.char_indices().nth(keep).map_or(password, |(end, _)| &password[..end])
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        let e = Email::parse("  Alice@Example.COM ").expect("valid");
        assert_eq!(e.as_str(), "alice@example.com");
    }

    #[test]
    fn invalid_emails_are_refused() {
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a@@b.com",
            "a b@c.com",
            "a@b..com",
            "a@-b.com",
            ".a@b.com",
            "a<@b.com",
            "a@b\n.com",
            "a@b_c.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    /// `e` + U+0301 (combining acute) is NFD for U+00E9 `é`.
    const NFD_E: &str = "e\u{301}";

    #[test]
    fn canonically_equal_addresses_are_one() {
        let nfc = Email::parse("ren\u{e9}@example.com").expect("NFC");
        let nfd = Email::parse(&format!("ren{NFD_E}@example.com")).expect("NFD");
        assert_eq!(nfc, nfd);
        assert_eq!(nfc.as_str(), "ren\u{e9}@example.com", "stored NFC");
        let upper = Email::parse(&format!("REN{}@EXAMPLE.com", "E\u{301}")).expect("NFD upper");
        assert_eq!(upper, nfc);
    }

    #[test]
    fn the_domain_is_stored_as_ascii_and_the_local_part_as_lower_case_nfc() {
        let e = Email::parse("\u{dc}BER@B\u{dc}CHER.example").expect("valid");
        assert_eq!(e.as_str(), "\u{fc}ber@xn--bcher-kva.example");
        assert_eq!(Email::parse("\u{fc}ber@xn--bcher-kva.example").expect("punycode"), e);
        assert_eq!(Email::parse("\u{fc}ber@XN--BCHER-KVA.EXAMPLE").expect("upper punycode"), e);
        assert_eq!(Email::parse(&format!("u{}ber@bu{}cher.example", "\u{308}", "\u{308}")).expect("NFD"), e);
        assert_eq!(Email::parse("ada@m\u{fc}nchen.de").expect("idn").as_str(), "ada@xn--mnchen-3ya.de");
    }

    #[test]
    fn invisible_and_control_characters_are_refused_anywhere() {
        let invisible = [
            '\u{200b}',
            '\u{200c}',
            '\u{200d}',
            '\u{00ad}',
            '\u{feff}',
            '\u{2060}',
            '\u{180e}',
            '\u{202a}',
            '\u{202b}',
            '\u{202c}',
            '\u{202d}',
            '\u{202e}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{200e}',
            '\u{200f}',
            '\u{0000}',
            '\u{0007}',
            '\u{001b}',
            '\u{007f}',
            '\u{e000}',
            '\u{0378}',
            '\u{3164}',
            '\u{034f}',
            '\u{fe0f}',
            '\u{e0041}',
        ];
        let base = "alice@example.com";
        for c in invisible {
            for (at, _) in base.char_indices().chain([(base.len(), ' ')]) {
                let bad = format!("{}{c}{}", &base[..at], &base[at..]);
                assert!(Email::parse(&bad).is_err(), "U+{:04X} at {at} should be refused", u32::from(c));
            }
        }
    }

    #[test]
    fn domains_are_checked_strictly() {
        for bad in [
            "a@ex ample.com",
            "a@-x.com",
            "a@x-.com",
            "a@b..com",
            "a@example.com.",
            "a@under_score.com",
            "a@xn--a.com",
            &format!("a@{}.com", "x".repeat(64)),
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Email::parse(&format!("a@{}.com", "x".repeat(63))).is_ok());
    }

    /// A small deterministic generator: no dependency, reproducible failures.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn parsing_is_total_idempotent_and_yields_the_canonical_form() {
        use unicode_normalization::UnicodeNormalization as _;
        let alphabet: Vec<char> =
            "aZé\u{301}\u{308}Üß.-_@+ \u{200b}\u{ad}\u{202e}xn0İΣς\u{ff0e}例".chars().collect();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut valid = 0;
        for _ in 0..20_000 {
            let len = 1 + (next(&mut state) % 16) as usize;
            let mut raw: String =
                (0..len).map(|_| alphabet[(next(&mut state) % alphabet.len() as u64) as usize]).collect();
            if next(&mut state).is_multiple_of(2) {
                raw.push_str("@example.com");
            }
            let Ok(email) = Email::parse(&raw) else { continue };
            valid += 1;
            let s = email.as_str();
            assert_eq!(Email::parse(s).ok().as_ref().map(Email::as_str), Some(s), "idempotent: {raw:?}");
            assert_eq!(s.nfc().collect::<String>(), s, "NFC: {raw:?}");
            let nfd: String = raw.nfd().collect();
            assert_eq!(Email::parse(&nfd).ok().as_ref().map(Email::as_str), Some(s), "NFD alike: {raw:?}");
            let (local, domain) = s.rsplit_once('@').expect("one @");
            assert!(!local.contains('@'));
            assert_eq!(local.to_lowercase(), local, "{raw:?}");
            assert!(domain.is_ascii() && domain.to_ascii_lowercase() == domain, "{raw:?}");
            assert!(s.len() <= Email::MAX_LEN);
        }
        assert!(valid > 500, "the generator must reach valid addresses too: {valid}");
    }

    #[test]
    fn password_length_counts_characters() {
        assert!(Password::new("short".into()).is_err());
        assert!(Password::new("ééééééé".into()).is_err(), "7 chars, 14 bytes");
        assert!(Password::new("éééééééé".into()).is_ok());
        assert!(Password::new("x".repeat(1024)).is_ok());
        assert!(Password::new("x".repeat(1025)).is_err());
        assert!(Password::candidate("short".into()).is_ok());
        assert!(Password::candidate("é".repeat(1025)).is_err());
    }

    #[test]
    fn password_debug_hides_it() {
        let p = Password::new("correct horse battery".into()).expect("valid");
        assert!(!format!("{p:?}").contains("horse"));
    }

    fn email(raw: &str) -> Email {
        Email::parse(raw).expect("valid email")
    }

    fn judge(password: &str, address: &str, min: u8) -> Result<(), WeakPassword> {
        let min: Strength = min.to_string().parse().expect("strength");
        Password::new(password.into()).expect("long enough").judge(&email(address), min)
    }

    #[test]
    fn an_email_names_its_words() {
        let words = email("Ada.Lovelace@Bücher-Haus.example").words();
        for word in [
            "ada.lovelace@xn--bcher-haus-9db.example",
            "ada.lovelace",
            "ada",
            "lovelace",
            "xn--bcher-haus-9db",
            "bücher-haus",
            "bücher",
            "haus",
            "example",
        ] {
            assert!(words.iter().any(|w| w == word), "{word} in {words:?}");
        }
    }

    #[test]
    fn strength_is_a_score_from_0_to_4() {
        for ok in ["0", "3", "4", " 2 "] {
            assert!(ok.parse::<Strength>().is_ok(), "{ok:?}");
        }
        for bad in ["5", "-1", "three", "", "3.5", "256"] {
            assert!(bad.parse::<Strength>().is_err(), "{bad:?}");
        }
        assert_eq!(Strength::default().score(), 3);
    }

    #[test]
    fn common_passwords_are_weak() {
        let weak = judge("password123", "ada@example.com", 3).expect_err("weak");
        assert!(weak.score < 3);
        assert!(weak.detail.contains("common"), "zxcvbn's warning: {}", weak.detail);
        assert!(!weak.detail.contains("password123"), "{}", weak.detail);
        assert!(judge("password123", "ada@example.com", 0).is_ok(), "0 accepts anything");
    }

    #[test]
    fn a_password_made_of_the_email_is_weak() {
        // Strong on its own, weak for the account whose address it spells.
        let password = "zq7-kestrel-plinth";
        assert!(judge(password, "someone.else@example.com", 3).is_ok());
        let weak = judge(password, "zq7-kestrel-plinth@example.com", 3).expect_err("weak");
        assert!(!weak.detail.contains("kestrel"), "{}", weak.detail);
        assert!(judge("kestrel-mailhost-2024", "someone.else@example.com", 3).is_ok());
        assert!(judge("kestrel-mailhost-2024", "zq@kestrel-mailhost.example", 3).is_err(), "domain labels");
        assert!(judge("mailhostkestrel", "zq@kestrel-mailhost.example", 3).is_err(), "their parts");
    }

    #[test]
    fn a_passphrase_is_strong_and_the_test_suites_password_passes_with_typical_emails() {
        for address in
            ["ada@example.com", "user-0123456789abcdef0123456789abcdef@example.com", "root@example.com"]
        {
            assert!(judge("correct horse battery staple", address, 3).is_ok(), "{address}");
            assert!(judge("correct horse battery staple", address, 4).is_ok(), "{address}");
        }
    }

    #[test]
    fn the_detail_explains_without_echoing() {
        for password in ["password123", "aaaaaaaaaaaa", "qwertyuiop", "Tr0ub4dour&3", "01011990x"] {
            let weak = judge(password, "ada@example.com", 4).expect_err(password);
            assert!(!weak.detail.contains(password), "{}", weak.detail);
            assert!(weak.detail.contains("of 4"), "names the score: {}", weak.detail);
            assert!(weak.detail.len() > 40, "says what to do: {}", weak.detail);
        }
    }

    #[test]
    fn long_passwords_are_judged_on_a_bounded_part() {
        // zxcvbn's cost grows with the cube of the length and with the number of distinct
        // l33t characters: the judged part stays small whatever the input.
        let all_l33t = "4@8({[<3691!|70$5+%2".repeat(50);
        assert_eq!(judged_part(&all_l33t).chars().count(), 12);
        let long = "correct horse battery staple ".repeat(30);
        assert_eq!(judged_part(&long).chars().count(), 48);
        assert_eq!(judged_part("Tr0ub4dour&3"), "Tr0ub4dour&3");
        // Cut before the seventh distinct l33t character, once past the minimum.
        assert_eq!(judged_part("abcdefghijklmn4@8(3691"), "abcdefghijklmn4@8(36");
        assert!(judge(&all_l33t, "ada@example.com", 3).is_ok(), "random-looking");
        assert!(judge(&format!("{}x", "a".repeat(1000)), "ada@example.com", 3).is_err());
    }
}
