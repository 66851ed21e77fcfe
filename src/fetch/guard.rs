//! The network guard: which destination addresses an avatar URL may reach.
//! Pure functions; the resolver and redirect hooks in `fetch` apply them at
//! connect time so a DNS answer cannot change between check and use.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::Url;

use crate::providers::host_matches;

/// The operator's port and host rules, checked before the request and on every redirect hop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Empty: any port.
    pub allowed_ports: Vec<u16>,
    /// Empty: any host.
    pub allowed_hosts: Vec<String>,
    pub denied_hosts: Vec<String>,
}

impl UrlPolicy {
    /// `Err` says why the URL is refused.
    pub fn check(&self, url: &Url) -> Result<(), String> {
        let port = url.port_or_known_default().unwrap_or(0);
        if !self.allowed_ports.is_empty() && !self.allowed_ports.contains(&port) {
            return Err(format!("port {port} is not in fetch.allowed_ports"));
        }
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let matches = |patterns: &[String]| {
            patterns
                .iter()
                .any(|p| host_matches(&p.to_ascii_lowercase(), &host))
        };
        if matches(&self.denied_hosts) {
            return Err(format!("host {host} is in fetch.denied_hosts"));
        }
        if !self.allowed_hosts.is_empty() && !matches(&self.allowed_hosts) {
            return Err(format!("host {host} is not in fetch.allowed_hosts"));
        }
        Ok(())
    }
}

/// The class of a non-public address, named in the `blocked` reason.
pub fn non_public_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link_local")
    } else if o[0] == 100 && (o[1] & 0xC0) == 64 {
        Some("shared_cgnat")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_documentation() || (o[0] == 198 && (o[1] & 0xFE) == 18) {
        Some("documentation_or_benchmark")
    } else if o[0] >= 240 {
        Some("reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("ietf_protocol")
    } else {
        None
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    // Embedded IPv4 forms would reach the IPv4 address: judge that one.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_class(v4);
    }
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64 well-known prefix: judge the embedded IPv4 address.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return v4_class(v4).map(|_| "nat64_non_public");
    }
    if s[0] == 0x2002 {
        return Some("6to4");
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some("teredo");
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Some("documentation_or_benchmark");
    }
    if (s[0] & 0xFE00) == 0xFC00 {
        return Some("unique_local");
    }
    if (s[0] & 0xFFC0) == 0xFE80 {
        return Some("link_local");
    }
    if (s[0] & 0xFF00) == 0xFF00 {
        return Some("multicast");
    }
    if s[0..6] == [0, 0, 0, 0, 0, 0] {
        // Deprecated IPv4-compatible ::a.b.c.d
        return Some("ipv4_compatible");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<&'static str> {
        non_public_class(s.parse().unwrap())
    }

    #[test]
    fn non_public_addresses_are_named() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link_local"),
            ("100.64.0.1", "shared_cgnat"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("192.0.2.1", "documentation_or_benchmark"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::7f00:1", "nat64_non_public"),
            ("2002:7f00:1::", "6to4"),
            ("2001:0:4136:e378::1", "teredo"),
            ("fd00::1", "unique_local"),
            ("fe80::1", "link_local"),
            ("ff02::1", "multicast"),
        ];
        for (ip, want) in cases {
            assert_eq!(class(ip), Some(want), "{ip}");
        }
    }

    #[test]
    fn ports_and_hosts_follow_the_operator_rules() {
        let p = UrlPolicy {
            allowed_ports: vec![80, 443],
            allowed_hosts: vec!["*.qlogo.cn".into(), "*.qpic.cn".into()],
            denied_hosts: vec!["evil.qlogo.cn".into()],
        };
        let check = |u: &str| p.check(&Url::parse(u).unwrap());
        assert!(check("https://thirdwx.qlogo.cn/a/132").is_ok());
        assert!(check("http://mmbiz.qpic.cn:80/a").is_ok());
        assert!(
            check("https://thirdwx.qlogo.cn:8443/a")
                .unwrap_err()
                .contains("port 8443")
        );
        assert!(
            check("https://example.com/a.png")
                .unwrap_err()
                .contains("not in fetch.allowed_hosts")
        );
        assert!(
            check("https://EVIL.qlogo.cn./a")
                .unwrap_err()
                .contains("denied_hosts")
        );
        assert!(
            UrlPolicy::default()
                .check(&Url::parse("http://x:1/").unwrap())
                .is_ok()
        );
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "1.1.1.1",
            "203.205.137.100",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }
}
