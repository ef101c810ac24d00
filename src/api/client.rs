//! The client's address and user agent, as the limiter, the audit log and session records
//! see them: the socket peer, unless the peer is a trusted proxy (`TRUSTED_PROXIES`), in
//! which case the chain of the one configured forwarding header (`FORWARDED_HEADER`) is
//! walked from the right, hop by hop, while the hops are trusted proxies.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;

use poem::Request;
use poem::http::{HeaderMap, header};

use crate::config::{ForwardedHeader, TrustedProxy, canonical};
use crate::service::ClientInfo;
use crate::state::AppState;

pub fn client_info(req: &Request, state: &AppState) -> ClientInfo {
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|s| !s.is_empty());
    ClientInfo { ip: client_ip(req, state), user_agent }
}

pub fn client_ip(req: &Request, state: &AppState) -> Option<IpAddr> {
    let peer = req.remote_addr().as_socket_addr()?.ip();
    let config = &state.config;
    if config.trusted_proxies.is_empty()
        && [header::FORWARDED.as_str(), "x-forwarded-for"].iter().any(|h| req.headers().contains_key(*h))
        && !state.warned_untrusted_forwarding.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            "requests carry X-Forwarded-For or Forwarded but TRUSTED_PROXIES is empty: the headers are \
             ignored and every client is its socket peer (set TRUSTED_PROXIES if a proxy sets them)"
        );
    }
    Some(client_ip_from(peer, req.headers(), &config.trusted_proxies, config.forwarded_header))
}

/// The client behind `peer`, believing only `header`, and only from trusted proxies.
///
/// From the peer, step left through the chain while the current hop is a trusted proxy:
/// the first entry that is not a trusted proxy is the client. An entry that names no
/// address (`unknown`, an obfuscated `_id`, garbage) ends the walk at the last trusted hop:
/// everything left of it was written by someone no trusted proxy vouched for. A chain of
/// trusted hops only ends at its first hop.
pub fn client_ip_from(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[TrustedProxy],
    header: ForwardedHeader,
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|p| p.contains(ip));
    let mut hop = canonical(peer);
    if !is_trusted(hop) {
        return hop;
    }
    for entry in forwarded_chain(headers, header).into_iter().rev() {
        let Some(ip) = entry else { return hop };
        hop = ip;
        if !is_trusted(hop) {
            return hop;
        }
    }
    hop
}

/// The header's entries in the order the proxies appended them (client first), every line
/// of it in order as one list; `None` for an entry that names no address. Empty list
/// elements are no entries (RFC 9110 §5.6.1); a line that is not text is one `None`.
fn forwarded_chain(headers: &HeaderMap, header: ForwardedHeader) -> Vec<Option<IpAddr>> {
    let mut chain = Vec::new();
    for line in headers.get_all(header.name()) {
        let Ok(line) = line.to_str() else {
            chain.push(None);
            continue;
        };
        for element in line.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            chain.push(match header {
                ForwardedHeader::XForwardedFor => parse_node(element),
                ForwardedHeader::Forwarded => forwarded_for(element),
            });
        }
    }
    chain
}

/// The address of an RFC 7239 element's one `for` parameter. Splitting the header on `,`
/// is exact: no valid node contains a comma, so only invalid ones come apart (and fail).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let mut values = element.split(';').filter_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then_some(value.trim())
    });
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = match value.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"').filter(|v| !v.contains(['"', '\\']))?,
        None => value,
    };
    parse_node(value)
}

/// `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`; a port may be obfuscated (`:_p`).
/// `unknown` and obfuscated identifiers (`_hidden`) name no address.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return host.parse::<Ipv6Addr>().ok().map(|ip| canonical(IpAddr::V6(ip)));
    }
    let (host, port) = s.split_once(':')?;
    if !is_port(port) {
        return None;
    }
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A port number, or an obfuscated one (RFC 7239 §6.3: `_` then letters, digits, `.`, `_`, `-`).
fn is_port(s: &str) -> bool {
    match s.strip_prefix('_') {
        Some(obfuscated) => {
            !obfuscated.is_empty()
                && obfuscated.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        }
        None => !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u16>().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;
    const FWD: ForwardedHeader = ForwardedHeader::Forwarded;

    fn resolve_with(
        peer: &str,
        headers: &[(&str, &[u8])],
        trusted: &[TrustedProxy],
        header: ForwardedHeader,
    ) -> IpAddr {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                poem::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                poem::http::HeaderValue::from_bytes(v).expect("value"),
            );
        }
        let addr: std::net::SocketAddr = peer.parse().expect("peer");
        client_ip_from(addr.ip(), &map, trusted, header)
    }

    fn resolve(
        peer: &str,
        headers: &[(&str, &str)],
        trusted: &[TrustedProxy],
        header: ForwardedHeader,
    ) -> IpAddr {
        let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        resolve_with(peer, &raw, trusted, header)
    }

    fn proxies(list: &[&str]) -> Vec<TrustedProxy> {
        list.iter().map(|p| p.parse().expect("proxy")).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let got = resolve("203.0.113.9:5000", &[("x-forwarded-for", "1.1.1.1")], &[], XFF);
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn trusted_proxy_yields_rightmost_untrusted() {
        let headers = [("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.3")];
        let got = resolve("10.0.0.2:5000", &headers, &proxies(&["10.0.0.0/8"]), XFF);
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn forwarded_header_is_understood() {
        let headers = [("forwarded", r#"for="[2001:db8::1]:4711";proto=https"#)];
        let got = resolve("10.0.0.2:5000", &headers, &proxies(&["10.0.0.2"]), FWD);
        assert_eq!(got, ip("2001:db8::1"));
        let headers = [("forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43, For=198.51.100.17:8080")];
        let got = resolve("10.0.0.2:5000", &headers, &proxies(&["10.0.0.2"]), FWD);
        assert_eq!(got, ip("198.51.100.17"));
    }

    #[test]
    fn only_the_configured_header_counts() {
        let trusted = proxies(&["10.0.0.2"]);
        let both = [("x-forwarded-for", "198.51.100.1"), ("forwarded", "for=198.51.100.2")];
        assert_eq!(resolve("10.0.0.2:1", &both, &trusted, XFF), ip("198.51.100.1"));
        assert_eq!(resolve("10.0.0.2:1", &both, &trusted, FWD), ip("198.51.100.2"));
        // The other header alone is not believed either: the client is the proxy itself.
        assert_eq!(resolve("10.0.0.2:1", &both[1..], &trusted, XFF), ip("10.0.0.2"));
        assert_eq!(resolve("10.0.0.2:1", &both[..1], &trusted, FWD), ip("10.0.0.2"));
    }

    #[test]
    fn an_unknown_entry_ends_the_walk_at_the_last_trusted_hop() {
        let trusted = proxies(&["10.0.0.0/8"]);
        // The proxy could not name its client: what stands left of that was written by the
        // client, so it is never believed.
        let headers = [("x-forwarded-for", "198.51.100.1, unknown")];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, XFF), ip("10.0.0.2"));
        let headers = [("x-forwarded-for", "198.51.100.1, unknown, 10.0.0.3")];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, XFF), ip("10.0.0.3"));
        for garbage in ["not-an-ip", "198.51.100.1:99999", "[2001:db8::1", "1.2.3.4.5", "fe80::1%eth0"] {
            let headers = [("x-forwarded-for", garbage)];
            assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, XFF), ip("10.0.0.2"), "{garbage}");
        }
        // An untrusted client to the right of an unknown entry is still found first.
        let headers = [("x-forwarded-for", "unknown, 198.51.100.1")];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, XFF), ip("198.51.100.1"));
    }

    #[test]
    fn obfuscated_identifiers_end_the_walk() {
        let trusted = proxies(&["10.0.0.0/8"]);
        for value in [
            "for=198.51.100.9, for=_hidden",
            r#"for=198.51.100.9, for="_gazonk""#,
            "for=198.51.100.9, for=unknown",
        ] {
            assert_eq!(
                resolve("10.0.0.2:1", &[("forwarded", value)], &trusted, FWD),
                ip("10.0.0.2"),
                "{value}"
            );
        }
        // An element without `for`, or with it twice, names no one.
        for value in ["for=198.51.100.9, proto=https", "for=198.51.100.9, for=1.1.1.1;for=2.2.2.2"] {
            assert_eq!(
                resolve("10.0.0.2:1", &[("forwarded", value)], &trusted, FWD),
                ip("10.0.0.2"),
                "{value}"
            );
        }
        // An obfuscated port hides only the port.
        let headers = [("forwarded", r#"for="198.51.100.9:_p1""#)];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, FWD), ip("198.51.100.9"));
        let headers = [("forwarded", r#"for="[2001:db8::9]:_p1""#)];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, FWD), ip("2001:db8::9"));
    }

    #[test]
    fn entries_an_attacker_prepends_are_never_reached() {
        let trusted = proxies(&["10.0.0.0/8"]);
        // The attacker (198.51.100.7) claims to be a trusted proxy's client, or a proxy.
        for forged in ["6.6.6.6", "10.0.0.9", "1.1.1.1, 10.0.0.5", "unknown", "_hidden"] {
            let headers = [("x-forwarded-for", format!("{forged}, 198.51.100.7, 10.0.0.3"))];
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, XFF), ip("198.51.100.7"), "{forged}");
        }
        let headers = [("forwarded", r#"for="_x", for=10.0.0.9, for="[2001:db8::66]:4711""#)];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, FWD), ip("2001:db8::66"));
    }

    #[test]
    fn header_lines_are_read_in_order_as_one_list() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let headers = [("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "10.0.0.3")];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, XFF), ip("198.51.100.1"));
        let headers = [("forwarded", "for=198.51.100.2"), ("forwarded", "for=10.0.0.3;proto=https")];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, FWD), ip("198.51.100.2"));
        // A line that is not text ends the walk where it stands.
        let raw: [(&str, &[u8]); 2] =
            [("x-forwarded-for", b"198.51.100.1, \xff"), ("x-forwarded-for", b"10.0.0.3")];
        assert_eq!(resolve_with("10.0.0.2:1", &raw, &trusted, XFF), ip("10.0.0.3"));
    }

    #[test]
    fn a_chain_of_trusted_hops_ends_at_its_first_hop() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let headers = [("x-forwarded-for", "10.0.0.5, 10.0.0.3")];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, XFF), ip("10.0.0.5"));
        assert_eq!(resolve("10.0.0.2:1", &[], &trusted, XFF), ip("10.0.0.2"));
        // Empty list elements are no entries at all (RFC 9110 §5.6.1).
        let headers = [("x-forwarded-for", "198.51.100.1, , 10.0.0.3,")];
        assert_eq!(resolve("10.0.0.2:1", &headers, &trusted, XFF), ip("198.51.100.1"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let headers = [("x-forwarded-for", "::ffff:198.51.100.1, ::ffff:10.0.0.3")];
        assert_eq!(resolve("[::ffff:10.0.0.2]:1", &headers, &trusted, XFF), ip("198.51.100.1"));
    }
}
