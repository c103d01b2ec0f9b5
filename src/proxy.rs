//! The client behind a reverse proxy: `--trusted-proxy CIDR` names the peers whose
//! `X-Forwarded-For` / `Forwarded` and `X-Forwarded-Proto` headers are believed.
//!
//! From any other peer the headers are ignored (anyone can send them), and the client
//! is the TCP peer. From a trusted peer the forwarded hops are read right to left, the
//! way they were appended, skipping hops that are trusted proxies themselves; the first
//! untrusted hop is the client. An address further left was written by that client and
//! is not believed. `X-Forwarded-For` is read when present (all three shipped proxy
//! configs set it), else `Forwarded`'s `for=`. The resulting address is the one the
//! logs show and the per-address caps count.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use hyper::header::{HeaderMap, HeaderName};

/// A block of addresses, `10.0.0.0/8`, `::1/128`, or one address (`127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid CIDR {text:?} (expected like 10.0.0.0/8 or ::1/128)");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let net = canonical(addr.parse::<IpAddr>().map_err(|_| bad())?);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, everything else as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Marks a request that came over this gateway's own TLS.
#[derive(Debug, Clone, Copy)]
pub struct Encrypted;

/// Who sent a request, as far as the gateway believes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the peer's, or the one a trusted proxy forwarded (port 0
    /// when the header gave none).
    pub addr: SocketAddr,
    /// Whether the client's own connection was HTTPS (this one's, or a trusted proxy's
    /// `X-Forwarded-Proto: https`).
    pub https: bool,
}

/// Works out the client of a request that came from `peer` over a connection that is
/// (`tls`) or is not HTTPS.
pub fn client(peer: SocketAddr, tls: bool, headers: &HeaderMap, trusted: &[Cidr]) -> Client {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    let mut found = Client {
        addr: peer,
        https: tls,
    };
    if trusted.is_empty() || !is_trusted(peer.ip()) {
        return found;
    }
    let hops = forwarded_hops(headers);
    // Right to left: the right-most hop was written by the peer, a trusted proxy.
    for hop in hops.iter().rev() {
        let Some(addr) = hop else {
            // "unknown" or an obfuscated name: nothing further left can be believed.
            break;
        };
        found.addr = *addr;
        if !is_trusted(addr.ip()) {
            break;
        }
    }
    if let Some(proto) = last_value(headers, "x-forwarded-proto") {
        found.https = proto.eq_ignore_ascii_case("https");
    }
    found
}

/// The hops of `X-Forwarded-For` (or, without it, `Forwarded`'s `for=`), left to
/// right, every header line in order; `None` for a hop that is no address.
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<SocketAddr>> {
    let xff = HeaderName::from_static("x-forwarded-for");
    if headers.contains_key(&xff) {
        return values(headers, &xff)
            .flat_map(|v| v.split(','))
            .map(|hop| parse_hop(hop.trim()))
            .collect();
    }
    values(headers, &hyper::header::FORWARDED)
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_hop(value.trim().trim_matches('"')))
            })
        })
        .collect()
}

/// Every value of a header that is text, in order.
fn values<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
}

/// The right-most item of a comma-separated header (the one the nearest proxy set).
fn last_value<'a>(headers: &'a HeaderMap, name: &'static str) -> Option<&'a str> {
    let name = HeaderName::from_static(name);
    values(headers, &name)
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .last()
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:5678`.
fn parse_hop(hop: &str) -> Option<SocketAddr> {
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(SocketAddr::new(canonical(addr.ip()), addr.port()));
    }
    let bare = hop.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let ip = bare.unwrap_or(hop).parse::<IpAddr>().ok()?;
    Some(SocketAddr::new(canonical(ip), 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn parses_and_matches_blocks() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "nope/8", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn believes_only_trusted_peers() {
        let proxy: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.7:4000".parse().unwrap();
        let trusted = cidrs(&["10.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        let c = client(proxy, false, &h, &trusted);
        assert_eq!(c.addr, "203.0.113.9:0".parse().unwrap());
        assert!(c.https);
        // The same headers from a peer that is not a trusted proxy: ignored.
        let c = client(stranger, false, &h, &trusted);
        assert_eq!(c.addr, stranger);
        assert!(!c.https);
        // No --trusted-proxy at all: ignored.
        assert_eq!(client(proxy, false, &h, &[]).addr, proxy);
    }

    #[test]
    fn takes_the_right_most_untrusted_hop() {
        let proxy: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let trusted = cidrs(&["10.0.0.0/8"]);
        // The client forged the left-most hop; the edge proxy appended the real one,
        // an inner proxy appended the edge's.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.9")]);
        assert_eq!(
            client(proxy, false, &h, &trusted).addr.ip(),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // Several header lines are one list.
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(client(proxy, false, &h, &trusted).addr.port(), 0);
        assert_eq!(
            client(proxy, false, &h, &trusted).addr.ip().to_string(),
            "203.0.113.9"
        );
        // Every hop trusted: the left-most.
        let h = headers(&[("x-forwarded-for", "10.1.1.1, 10.0.0.9")]);
        assert_eq!(
            client(proxy, false, &h, &trusted).addr.ip().to_string(),
            "10.1.1.1"
        );
        // A hop that is no address stops the walk at the proxy that wrote it.
        let h = headers(&[("x-forwarded-for", "203.0.113.9, garbage, 10.0.0.9")]);
        assert_eq!(
            client(proxy, false, &h, &trusted).addr.ip().to_string(),
            "10.0.0.9"
        );
    }

    #[test]
    fn reads_forwarded_without_x_forwarded_for() {
        let proxy: SocketAddr = "[::1]:4000".parse().unwrap();
        let trusted = cidrs(&["::1/128"]);
        let h = headers(&[(
            "forwarded",
            "for=1.1.1.1, for=\"[2001:db8::7]:4711\";proto=https",
        )]);
        let c = client(proxy, false, &h, &trusted);
        assert_eq!(c.addr, "[2001:db8::7]:4711".parse().unwrap());
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(client(proxy, true, &h, &trusted).addr, proxy);
        // X-Forwarded-For wins when both are there.
        let h = headers(&[("forwarded", "for=1.1.1.1"), ("x-forwarded-for", "2.2.2.2")]);
        assert_eq!(
            client(proxy, false, &h, &trusted).addr.ip().to_string(),
            "2.2.2.2"
        );
    }
}
