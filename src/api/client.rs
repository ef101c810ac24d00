//! The client's address and user agent, as the limiter, the audit log and session records
//! see them: the socket peer, unless the peer is a trusted proxy (`TRUSTED_PROXIES`), in
//! which case the right-most untrusted address of `X-Forwarded-For` (or `Forwarded`).

use std::net::IpAddr;

use poem::Request;
use poem::http::{HeaderMap, header};

use crate::config::{TrustedProxy, canonical};
use crate::service::ClientInfo;

pub fn client_info(req: &Request, trusted: &[TrustedProxy]) -> ClientInfo {
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|s| !s.is_empty());
    ClientInfo { ip: client_ip(req, trusted), user_agent }
}

pub fn client_ip(req: &Request, trusted: &[TrustedProxy]) -> Option<IpAddr> {
    let peer = req.remote_addr().as_socket_addr()?.ip();
    Some(client_ip_from(peer, req.headers(), trusted))
}

/// The client behind `peer`, believing forwarding headers only from trusted proxies.
pub fn client_ip_from(peer: IpAddr, headers: &HeaderMap, trusted: &[TrustedProxy]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|p| p.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Walk from the nearest hop outwards; the first address we do not trust is the client.
    forwarded_chain(headers).into_iter().rev().find(|ip| !is_trusted(*ip)).unwrap_or(peer)
}

/// Addresses in the order the proxies appended them (client first).
fn forwarded_chain(headers: &HeaderMap) -> Vec<IpAddr> {
    let xff: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| parse_ip(s.trim()))
        .collect();
    if !xff.is_empty() {
        return xff;
    }
    headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                k.eq_ignore_ascii_case("for").then(|| parse_ip(v.trim().trim_matches('"')))?
            })
        })
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:80`, `[::1]`, `[::1]:80` or `::1`.
fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sock) = s.parse::<std::net::SocketAddr>() {
        return Some(canonical(sock.ip()));
    }
    s.strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|inner| inner.parse().ok())
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(peer: &str, headers: &[(&str, &str)], trusted: &[TrustedProxy]) -> IpAddr {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                poem::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let addr: std::net::SocketAddr = peer.parse().expect("peer");
        client_ip_from(addr.ip(), &map, trusted)
    }

    fn proxies(list: &[&str]) -> Vec<TrustedProxy> {
        list.iter().map(|p| p.parse().expect("proxy")).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let got = resolve("203.0.113.9:5000", &[("x-forwarded-for", "1.1.1.1")], &[]);
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn trusted_proxy_yields_rightmost_untrusted() {
        let headers = [("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.3")];
        let got = resolve("10.0.0.2:5000", &headers, &proxies(&["10.0.0.0/8"]));
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn forwarded_header_is_understood() {
        let headers = [("forwarded", r#"for="[2001:db8::1]:4711";proto=https"#)];
        let got = resolve("10.0.0.2:5000", &headers, &proxies(&["10.0.0.2"]));
        assert_eq!(got, ip("2001:db8::1"));
    }
}
