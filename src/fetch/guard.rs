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
pub(crate) fn non_public_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

/// One refused range: network, prefix length and the class it is reported as.
struct Range<T> {
    net: T,
    len: u8,
    class: &'static str,
}

/// IPv4 ranges an avatar may never reach. From the IANA IPv4 Special-Purpose
/// Address Registry (every entry not "globally reachable"), the multicast
/// registry, and cloud metadata addresses outside private space. More
/// specific entries first. The test table in `tests` cites each source.
const V4: &[Range<u32>] = &[
    r4([255, 255, 255, 255], 32, "broadcast"), // RFC 8190: limited broadcast
    r4([168, 63, 129, 16], 32, "cloud_metadata"), // Azure WireServer / host platform
    r4([0, 0, 0, 0], 8, "unspecified"),        // RFC 791: "this network"
    r4([10, 0, 0, 0], 8, "private"),           // RFC 1918
    r4([100, 64, 0, 0], 10, "shared_cgnat"),   // RFC 6598 (Alibaba metadata 100.100.100.200)
    r4([127, 0, 0, 0], 8, "loopback"),         // RFC 1122
    r4([169, 254, 0, 0], 16, "link_local"),    // RFC 3927 (AWS/GCP/Azure IMDS 169.254.169.254)
    r4([172, 16, 0, 0], 12, "private"),        // RFC 1918
    r4([192, 0, 0, 0], 24, "ietf_protocol"), // RFC 6890 (DS-Lite, PCP/TURN anycast, NAT64 discovery, OCI metadata)
    r4([192, 0, 2, 0], 24, "documentation_or_benchmark"), // RFC 5737 TEST-NET-1
    r4([192, 88, 99, 0], 24, "6to4_relay"),  // RFC 7526: deprecated 6to4 relay anycast
    r4([192, 168, 0, 0], 16, "private"),     // RFC 1918
    r4([198, 18, 0, 0], 15, "documentation_or_benchmark"), // RFC 2544 benchmarking
    r4([198, 51, 100, 0], 24, "documentation_or_benchmark"), // RFC 5737 TEST-NET-2
    r4([203, 0, 113, 0], 24, "documentation_or_benchmark"), // RFC 5737 TEST-NET-3
    r4([224, 0, 0, 0], 4, "multicast"),      // RFC 5771
    r4([240, 0, 0, 0], 4, "reserved"),       // RFC 1112
];

/// IPv6 ranges an avatar may never reach (IANA IPv6 Special-Purpose Address
/// Registry and the deprecated forms of RFC 3879 / RFC 4291). Anything
/// outside global unicast `2000::/3` is refused as `reserved` after these.
const V6: &[Range<u128>] = &[
    r6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified"), // RFC 4291
    r6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),    // RFC 4291
    r6([0, 0, 0, 0, 0xffff, 0, 0, 0], 96, "ipv4_translated"), // RFC 6145/2765 SIIT ::ffff:0:a.b.c.d
    r6([0, 0, 0, 0, 0, 0, 0, 0], 96, "ipv4_compatible"), // RFC 4291 §2.5.5.1 (deprecated)
    r6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "nat64_local_use"), // RFC 8215: local-use translation
    r6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard_only"), // RFC 6666
    r6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "teredo"),  // RFC 4380
    r6(
        [0x2001, 0x0db8, 0, 0, 0, 0, 0, 0],
        32,
        "documentation_or_benchmark",
    ), // RFC 3849
    r6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, "ietf_protocol"), // RFC 2928 (benchmarking, ORCHID, anycast)
    r6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4"),          // RFC 3056
    r6(
        [0x3fff, 0, 0, 0, 0, 0, 0, 0],
        20,
        "documentation_or_benchmark",
    ), // RFC 9637
    r6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique_local"),   // RFC 4193 (AWS IMDS fd00:ec2::254)
    r6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link_local"),    // RFC 4291
    r6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site_local"),    // RFC 3879 (deprecated)
    r6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),      // RFC 4291
];

const fn r4(o: [u8; 4], len: u8, class: &'static str) -> Range<u32> {
    Range {
        net: u32::from_be_bytes(o),
        len,
        class,
    }
}

const fn r6(s: [u16; 8], len: u8, class: &'static str) -> Range<u128> {
    let mut net = 0u128;
    let mut i = 0;
    while i < 8 {
        net = (net << 16) | s[i] as u128;
        i += 1;
    }
    Range { net, len, class }
}

fn find<T>(table: &[Range<T>], ip: T, bits: u32) -> Option<&'static str>
where
    T: Copy + Eq + std::ops::Shr<u32, Output = T>,
{
    table.iter().find_map(|r| {
        let shift = bits - u32::from(r.len);
        // A shift by the full width would overflow: a /0 matches everything.
        let same = shift == bits || (ip >> shift) == (r.net >> shift);
        same.then_some(r.class)
    })
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    find(V4, u32::from(ip), 32)
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    // IPv4-mapped ::ffff:a.b.c.d reaches the IPv4 address: judge that one.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_class(v4);
    }
    let s = ip.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix (RFC 6052, globally reachable): the
        // translator connects to the embedded IPv4 address.
        let o = ip.octets();
        let v4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
        return v4_class(v4).map(|_| "nat64_non_public");
    }
    let bits = u128::from(ip);
    find(V6, bits, 128).or_else(|| {
        // Only 2000::/3 is global unicast; the rest is reserved by IANA.
        (bits >> 125 != 0b001).then_some("reserved")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<&'static str> {
        non_public_class(s.parse().unwrap())
    }

    /// The specification, written from the registries rather than from the
    /// code: for each entry its first and last address and, where it has
    /// public neighbours, the addresses just outside. `None` = public.
    /// Sources: IANA IPv4 Special-Purpose Address Registry (v4-SPAR), IANA
    /// IPv6 Special-Purpose Address Registry (v6-SPAR), IANA multicast
    /// registries, and the cited RFCs and cloud documentation.
    const SPEC: &[(&str, Option<&str>, &str)] = &[
        // v4-SPAR 0.0.0.0/8 "This network" (RFC 791 §3.2), 0.0.0.0/32 "This host"
        ("0.0.0.0", Some("unspecified"), "v4-SPAR, RFC 791"),
        ("0.255.255.255", Some("unspecified"), "v4-SPAR, RFC 791"),
        ("1.0.0.0", None, "public neighbour"),
        // v4-SPAR 10.0.0.0/8 Private-Use (RFC 1918)
        ("9.255.255.255", None, "public neighbour"),
        ("10.0.0.0", Some("private"), "v4-SPAR, RFC 1918"),
        ("10.255.255.255", Some("private"), "v4-SPAR, RFC 1918"),
        ("11.0.0.0", None, "public neighbour"),
        // v4-SPAR 100.64.0.0/10 Shared Address Space (RFC 6598)
        ("100.63.255.255", None, "public neighbour"),
        ("100.64.0.0", Some("shared_cgnat"), "v4-SPAR, RFC 6598"),
        (
            "100.100.100.200",
            Some("shared_cgnat"),
            "Alibaba Cloud metadata",
        ),
        ("100.127.255.255", Some("shared_cgnat"), "v4-SPAR, RFC 6598"),
        ("100.128.0.0", None, "public neighbour"),
        // v4-SPAR 127.0.0.0/8 Loopback (RFC 1122 §3.2.1.3)
        ("126.255.255.255", None, "public neighbour"),
        ("127.0.0.0", Some("loopback"), "v4-SPAR, RFC 1122"),
        ("127.255.255.255", Some("loopback"), "v4-SPAR, RFC 1122"),
        ("128.0.0.0", None, "public neighbour"),
        // Azure's host platform address (WireServer, IMDS-adjacent), publicly routed space
        ("168.63.129.15", None, "public neighbour"),
        (
            "168.63.129.16",
            Some("cloud_metadata"),
            "Azure: what is IP address 168.63.129.16",
        ),
        ("168.63.129.17", None, "public neighbour"),
        // v4-SPAR 169.254.0.0/16 Link Local (RFC 3927): AWS/GCP/Azure/Tencent IMDS
        ("169.253.255.255", None, "public neighbour"),
        ("169.254.0.0", Some("link_local"), "v4-SPAR, RFC 3927"),
        (
            "169.254.169.254",
            Some("link_local"),
            "cloud instance metadata",
        ),
        ("169.254.255.255", Some("link_local"), "v4-SPAR, RFC 3927"),
        ("169.255.0.0", None, "public neighbour"),
        // v4-SPAR 172.16.0.0/12 Private-Use (RFC 1918)
        ("172.15.255.255", None, "public neighbour"),
        ("172.16.0.0", Some("private"), "v4-SPAR, RFC 1918"),
        ("172.31.255.255", Some("private"), "v4-SPAR, RFC 1918"),
        ("172.32.0.0", None, "public neighbour"),
        // v4-SPAR 192.0.0.0/24 IETF Protocol Assignments (RFC 6890 §2.1) with
        // 192.0.0.0/29 DS-Lite (RFC 7335), .8 dummy (RFC 7600), .9 PCP anycast
        // (RFC 7723), .10 TURN anycast (RFC 8155), .170/.171 NAT64 discovery (RFC 8880)
        ("191.255.255.255", None, "public neighbour"),
        ("192.0.0.0", Some("ietf_protocol"), "v4-SPAR, RFC 6890"),
        ("192.0.0.9", Some("ietf_protocol"), "v4-SPAR, RFC 7723"),
        ("192.0.0.170", Some("ietf_protocol"), "v4-SPAR, RFC 8880"),
        (
            "192.0.0.192",
            Some("ietf_protocol"),
            "Oracle Cloud metadata",
        ),
        ("192.0.0.255", Some("ietf_protocol"), "v4-SPAR, RFC 6890"),
        // v4-SPAR 192.0.2.0/24 Documentation TEST-NET-1 (RFC 5737)
        (
            "192.0.2.0",
            Some("documentation_or_benchmark"),
            "v4-SPAR, RFC 5737",
        ),
        (
            "192.0.2.255",
            Some("documentation_or_benchmark"),
            "v4-SPAR, RFC 5737",
        ),
        ("192.0.3.0", None, "public neighbour"),
        // v4-SPAR entries marked globally reachable: AS112-v4 (RFC 7535), AMT (RFC 7450),
        // Direct Delegation AS112 (RFC 7534). Public by the registry's own word.
        (
            "192.31.196.1",
            None,
            "v4-SPAR, RFC 7535 (globally reachable)",
        ),
        (
            "192.52.193.1",
            None,
            "v4-SPAR, RFC 7450 (globally reachable)",
        ),
        (
            "192.175.48.1",
            None,
            "v4-SPAR, RFC 7534 (globally reachable)",
        ),
        // v4-SPAR 192.88.99.0/24 Deprecated 6to4 Relay Anycast (RFC 7526)
        ("192.88.98.255", None, "public neighbour"),
        ("192.88.99.0", Some("6to4_relay"), "v4-SPAR, RFC 7526"),
        ("192.88.99.255", Some("6to4_relay"), "v4-SPAR, RFC 7526"),
        ("192.88.100.0", None, "public neighbour"),
        // v4-SPAR 192.168.0.0/16 Private-Use (RFC 1918)
        ("192.167.255.255", None, "public neighbour"),
        ("192.168.0.0", Some("private"), "v4-SPAR, RFC 1918"),
        ("192.168.255.255", Some("private"), "v4-SPAR, RFC 1918"),
        ("192.169.0.0", None, "public neighbour"),
        // v4-SPAR 198.18.0.0/15 Benchmarking (RFC 2544)
        ("198.17.255.255", None, "public neighbour"),
        (
            "198.18.0.0",
            Some("documentation_or_benchmark"),
            "v4-SPAR, RFC 2544",
        ),
        (
            "198.19.255.255",
            Some("documentation_or_benchmark"),
            "v4-SPAR, RFC 2544",
        ),
        ("198.20.0.0", None, "public neighbour"),
        // v4-SPAR 198.51.100.0/24 TEST-NET-2, 203.0.113.0/24 TEST-NET-3 (RFC 5737)
        ("198.51.99.255", None, "public neighbour"),
        (
            "198.51.100.0",
            Some("documentation_or_benchmark"),
            "v4-SPAR, RFC 5737",
        ),
        (
            "198.51.100.255",
            Some("documentation_or_benchmark"),
            "v4-SPAR, RFC 5737",
        ),
        (
            "203.0.113.0",
            Some("documentation_or_benchmark"),
            "v4-SPAR, RFC 5737",
        ),
        (
            "203.0.113.255",
            Some("documentation_or_benchmark"),
            "v4-SPAR, RFC 5737",
        ),
        ("203.0.114.0", None, "public neighbour"),
        // IANA IPv4 Multicast Address Space Registry 224.0.0.0/4 (RFC 5771)
        ("223.255.255.255", None, "public neighbour"),
        ("224.0.0.0", Some("multicast"), "IANA multicast, RFC 5771"),
        (
            "239.255.255.255",
            Some("multicast"),
            "IANA multicast, RFC 5771",
        ),
        // v4-SPAR 240.0.0.0/4 Reserved (RFC 1112 §4), 255.255.255.255/32 Limited Broadcast (RFC 8190)
        ("240.0.0.0", Some("reserved"), "v4-SPAR, RFC 1112"),
        ("255.255.255.254", Some("reserved"), "v4-SPAR, RFC 1112"),
        ("255.255.255.255", Some("broadcast"), "v4-SPAR, RFC 8190"),
        // Public addresses WeChat/QQ avatars are actually served from.
        ("203.205.137.100", None, "Tencent CDN"),
        ("1.1.1.1", None, "public"),
        // v6-SPAR ::/128 Unspecified, ::1/128 Loopback (RFC 4291)
        ("::", Some("unspecified"), "v6-SPAR, RFC 4291"),
        ("::1", Some("loopback"), "v6-SPAR, RFC 4291"),
        // RFC 4291 §2.5.5.1 IPv4-compatible ::a.b.c.d (deprecated)
        ("::2", Some("ipv4_compatible"), "RFC 4291 §2.5.5.1"),
        ("::8.8.8.8", Some("ipv4_compatible"), "RFC 4291 §2.5.5.1"),
        // v6-SPAR ::ffff:0:0/96 IPv4-mapped (RFC 4291): the embedded IPv4 decides
        ("::ffff:127.0.0.1", Some("loopback"), "v6-SPAR, RFC 4291"),
        ("::ffff:10.0.0.1", Some("private"), "v6-SPAR, RFC 4291"),
        (
            "::ffff:168.63.129.16",
            Some("cloud_metadata"),
            "v6-SPAR, RFC 4291",
        ),
        ("::ffff:8.8.8.8", None, "v6-SPAR, RFC 4291"),
        // SIIT IPv4-translated ::ffff:0:0:0/96 (RFC 6145, RFC 2765 §2.1)
        (
            "::ffff:0:7f00:1",
            Some("ipv4_translated"),
            "RFC 6145 / RFC 2765",
        ),
        (
            "::ffff:0:a9fe:a9fe",
            Some("ipv4_translated"),
            "RFC 6145 / RFC 2765",
        ),
        (
            "::ffff:0:808:808",
            Some("ipv4_translated"),
            "RFC 6145 / RFC 2765",
        ),
        // v6-SPAR 64:ff9b::/96 IPv4-IPv6 Translation (RFC 6052, globally reachable):
        // the translator reaches the embedded IPv4 address
        ("64:ff9b::808:808", None, "v6-SPAR, RFC 6052"),
        (
            "64:ff9b::7f00:1",
            Some("nat64_non_public"),
            "v6-SPAR, RFC 6052",
        ),
        (
            "64:ff9b::a9fe:a9fe",
            Some("nat64_non_public"),
            "v6-SPAR, RFC 6052",
        ),
        // v6-SPAR 64:ff9b:1::/48 Local-use IPv4/IPv6 Translation (RFC 8215):
        // the embedded IPv4 is not in the last 32 bits, so the whole prefix goes
        ("64:ff9b:1::", Some("nat64_local_use"), "v6-SPAR, RFC 8215"),
        (
            "64:ff9b:1:a00:0:100:808:808",
            Some("nat64_local_use"),
            "v6-SPAR, RFC 8215",
        ),
        (
            "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
            Some("nat64_local_use"),
            "v6-SPAR, RFC 8215",
        ),
        // v6-SPAR 100::/64 Discard-Only (RFC 6666)
        ("100::", Some("discard_only"), "v6-SPAR, RFC 6666"),
        (
            "100::ffff:ffff:ffff:ffff",
            Some("discard_only"),
            "v6-SPAR, RFC 6666",
        ),
        // v6-SPAR 2001::/23 IETF Protocol Assignments (RFC 2928): TEREDO 2001::/32
        // (RFC 4380), PCP/TURN anycast, Benchmarking 2001:2::/48 (RFC 5180), ORCHID
        (
            "1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("reserved"),
            "IANA IPv6 Address Space: not 2000::/3",
        ),
        (
            "2000::1",
            None,
            "IANA IPv6 Address Space: global unicast 2000::/3",
        ),
        ("2001::", Some("teredo"), "v6-SPAR, RFC 4380"),
        (
            "2001:0:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("teredo"),
            "v6-SPAR, RFC 4380",
        ),
        ("2001:1::1", Some("ietf_protocol"), "v6-SPAR, RFC 7723"),
        ("2001:2::", Some("ietf_protocol"), "v6-SPAR, RFC 5180"),
        (
            "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("ietf_protocol"),
            "v6-SPAR, RFC 2928",
        ),
        ("2001:200::", None, "public neighbour (APNIC)"),
        // v6-SPAR 2001:db8::/32 Documentation (RFC 3849)
        (
            "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
            None,
            "public neighbour",
        ),
        (
            "2001:db8::",
            Some("documentation_or_benchmark"),
            "v6-SPAR, RFC 3849",
        ),
        (
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("documentation_or_benchmark"),
            "v6-SPAR, RFC 3849",
        ),
        ("2001:db9::", None, "public neighbour"),
        // v6-SPAR 2002::/16 6to4 (RFC 3056)
        ("2002::", Some("6to4"), "v6-SPAR, RFC 3056"),
        (
            "2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("6to4"),
            "v6-SPAR, RFC 3056",
        ),
        ("2003::", None, "public neighbour"),
        // v6-SPAR 3fff::/20 Documentation (RFC 9637)
        ("3ffe:ffff::", None, "public neighbour"),
        (
            "3fff::",
            Some("documentation_or_benchmark"),
            "v6-SPAR, RFC 9637",
        ),
        (
            "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("documentation_or_benchmark"),
            "v6-SPAR, RFC 9637",
        ),
        ("3fff:1000::", None, "public neighbour"),
        // v6-SPAR 5f00::/16 SRv6 SIDs (RFC 9602), and everything else outside 2000::/3
        ("5f00::1", Some("reserved"), "v6-SPAR, RFC 9602"),
        ("4000::", Some("reserved"), "IANA IPv6 Address Space"),
        // v6-SPAR fc00::/7 Unique-Local (RFC 4193): AWS IMDS fd00:ec2::254
        ("fc00::", Some("unique_local"), "v6-SPAR, RFC 4193"),
        ("fd00:ec2::254", Some("unique_local"), "AWS IMDS over IPv6"),
        (
            "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("unique_local"),
            "v6-SPAR, RFC 4193",
        ),
        // v6-SPAR fe80::/10 Link-Local Unicast (RFC 4291)
        ("fe80::", Some("link_local"), "v6-SPAR, RFC 4291"),
        (
            "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("link_local"),
            "v6-SPAR, RFC 4291",
        ),
        // fec0::/10 site-local (RFC 3879, deprecated; still routed by some stacks)
        ("fec0::", Some("site_local"), "RFC 3879"),
        (
            "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("site_local"),
            "RFC 3879",
        ),
        // ff00::/8 multicast (RFC 4291, IANA IPv6 Multicast registry)
        ("ff00::", Some("multicast"), "RFC 4291"),
        ("ff02::1", Some("multicast"), "RFC 4291"),
        // Public IPv6 of real CDNs.
        ("2606:4700::1111", None, "public"),
        ("240e:f7:a070::1", None, "public (China Telecom)"),
    ];

    #[test]
    fn the_guard_follows_the_iana_special_purpose_registries() {
        let wrong: Vec<String> = SPEC
            .iter()
            .filter(|(ip, want, _)| class(ip) != *want)
            .map(|(ip, want, src)| format!("{ip}: want {want:?}, got {:?} ({src})", class(ip)))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
}
