//! Where an address is (issue 15): the MaxMind-format city database named by
//! `GEOIP_DATABASE`, read into memory once at start and shared by every request.
//!
//! A location is a label for people reading their session list or a new-device mail
//! ("Berlin, DE"), never evidence: an address the database does not know, a private one,
//! or a record that fails to decode gives `None`, never an error on the request path.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use maxminddb::{Reader, path};

/// A database that cannot be used; start-up stops with this message, which names the variable.
#[derive(Debug, thiserror::Error)]
#[error("GEOIP_DATABASE {path}: {reason}")]
pub struct GeoIpError {
    path: String,
    reason: String,
}

/// The loaded database. Cheap to clone.
#[derive(Clone)]
pub struct GeoIp {
    reader: Arc<Reader<Vec<u8>>>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let meta = self.reader.metadata();
        f.debug_struct("GeoIp")
            .field("database_type", &meta.database_type)
            .field("build_epoch", &meta.build_epoch)
            .finish()
    }
}

impl GeoIp {
    /// Reads the whole file and checks its metadata: a missing, unreadable or malformed
    /// file is an error here, at start, not at the first login.
    pub fn open(file: &Path) -> Result<Self, GeoIpError> {
        let fail = |reason: String| GeoIpError { path: file.display().to_string(), reason };
        let reader = Reader::open_readfile(file).map_err(|e| fail(e.to_string()))?;
        let meta = reader.metadata();
        tracing::info!(
            database_type = %meta.database_type,
            build_epoch = meta.build_epoch,
            "GEOIP_DATABASE loaded: sessions show their location"
        );
        Ok(Self { reader: Arc::new(reader) })
    }

    /// "Berlin, DE" (the city's English name and the country's ISO code), "DE" when the
    /// database knows only the country, `None` when it knows nothing or the address is not
    /// a public one.
    pub fn locate(&self, ip: IpAddr) -> Option<String> {
        // A dual-stack socket writes an IPv4 peer as ::ffff:a.b.c.d, which the database's
        // IPv6 tree does not hold (STACK trap 17).
        let ip = ip.to_canonical();
        if !is_public(ip) {
            return None;
        }
        let found = self.reader.lookup(ip).ok()?;
        if !found.has_data() {
            return None;
        }
        let city: Option<&str> = found.decode_path(&path!["city", "names", "en"]).ok().flatten();
        let country: Option<&str> = found.decode_path(&path!["country", "iso_code"]).ok().flatten();
        label(city, country)
    }
}

/// Private, loopback, link-local and unspecified addresses are in no city database; not
/// asking saves the lookup.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_unique_local() || v6.is_unicast_link_local())
        }
    }
}

/// The label shown for a city and a country, either of which may be unknown.
fn label(city: Option<&str>, country: Option<&str>) -> Option<String> {
    fn clean(s: Option<&str>) -> Option<&str> {
        s.map(str::trim).filter(|s| !s.is_empty())
    }
    match (clean(city), clean(country)) {
        (Some(city), Some(country)) => Some(format!("{city}, {country}")),
        (None, Some(country)) => Some(country.to_owned()),
        // A city without its country is too vague to be worth showing ("Paris" of which
        // country?), and never happens in MaxMind's own databases.
        (Some(_) | None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_city_and_the_country_code() {
        assert_eq!(label(Some("Berlin"), Some("DE")).as_deref(), Some("Berlin, DE"));
        assert_eq!(label(None, Some("DE")).as_deref(), Some("DE"));
        assert_eq!(label(Some(" "), Some("DE")).as_deref(), Some("DE"), "a blank city is no city");
        assert_eq!(label(Some("Berlin"), None), None);
        assert_eq!(label(None, None), None);
    }

    #[test]
    fn only_public_addresses_are_looked_up() {
        for private in
            ["10.1.2.3", "192.168.0.1", "127.0.0.1", "169.254.1.1", "0.0.0.0", "::1", "fd00::1", "fe80::1"]
        {
            assert!(!is_public(private.parse().expect("ip")), "{private}");
        }
        for public in ["203.0.113.7", "8.8.8.8", "2001:db8::7"] {
            assert!(is_public(public.parse().expect("ip")), "{public}");
        }
    }

    #[test]
    fn a_missing_or_malformed_database_names_the_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.mmdb");
        let err = GeoIp::open(&missing).expect_err("missing").to_string();
        assert!(err.starts_with("GEOIP_DATABASE ") && err.contains("missing.mmdb"), "{err}");
        let garbage = dir.path().join("garbage.mmdb");
        std::fs::write(&garbage, b"not a database").expect("write");
        let err = GeoIp::open(&garbage).expect_err("garbage").to_string();
        assert!(err.starts_with("GEOIP_DATABASE "), "{err}");
    }
}
