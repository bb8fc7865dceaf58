//! Validated domain types and the 6PN address layout (docs/architecture.md "6PN addressing").
//!
//! Every value that enters sixpn from a user, the API or the store is parsed
//! into one of these types first; a value of these types is always valid, so
//! code past the edge never re-checks it.
//!
//! Address layout (128 bits):
//!
//! ```text
//! fdaa : NET_HI : NET_LO : HOST_HI : HOST_LO : X : Y : Z
//! |16|   |-- 32-bit org --|  |-- 32-bit host --|  |-- 48 bits --|
//! instances: X:Y = machine id, Z = 2
//! WireGuard peers: X = 0, Y = 0xa + index / 256, Z = (index % 256) << 8 | 2
//! ```

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a value was rejected. The message names the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct InvalidValue {
    /// What kind of value (e.g. "org name", "public key").
    pub kind: &'static str,
    /// The offending input, truncated so that errors stay one line.
    pub value: String,
    /// The rule it broke.
    pub reason: &'static str,
}

impl InvalidValue {
    fn new(kind: &'static str, value: &str, reason: &'static str) -> Self {
        let mut shown: String = value.chars().take(80).collect();
        if shown.len() < value.len() {
            shown.push('…');
        }
        Self {
            kind,
            value: shown,
            reason,
        }
    }
}

/// Serde glue for the types that round-trip through their `Display`/`FromStr`.
macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Checks the naming rule shared by orgs, apps, peers, regions and gateways:
/// `[a-z0-9-]`, 1–63 characters (one DNS label), no leading or trailing `-`.
fn check_label(kind: &'static str, s: &str) -> Result<(), InvalidValue> {
    if s.is_empty() || s.len() > 63 {
        return Err(InvalidValue::new(kind, s, "must be 1 to 63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(InvalidValue::new(
            kind,
            s,
            "only lowercase letters, digits and '-' are allowed",
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(InvalidValue::new(kind, s, "must not start or end with '-'"));
    }
    Ok(())
}

/// Labels are shared, not copied: a snapshot of 10,000 peers is cloned on
/// every store write, and four `String`s per peer made that the largest
/// cost of adding one.
macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// A compile-time constant name; checked in debug builds and by tests.
            #[allow(dead_code)]
            pub(crate) fn from_static(s: &'static str) -> Self {
                debug_assert!(check_label($kind, s).is_ok(), "{s}");
                Self(s.into())
            }
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $name {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, InvalidValue> {
                check_label($kind, s)?;
                Ok(Self(s.into()))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        serde_via_str!($name);
    };
}

label_type!(
    /// An organization's name (`personal`, `acme`).
    OrgName,
    "org name"
);
label_type!(
    /// An application's name (`paulgra-ham`).
    AppName,
    "app name"
);
label_type!(
    /// A WireGuard peer's name, unique within its org.
    PeerName,
    "peer name"
);
label_type!(
    /// A region code (`lhr`, `iad`).
    RegionName,
    "region"
);
label_type!(
    /// A gateway's name, unique in the store (`lhr-1`).
    GatewayName,
    "gateway name"
);
label_type!(
    /// An instance id within an app (`f066b83b`).
    InstanceId,
    "instance id"
);
label_type!(
    /// A process group of an app (`web`, `worker`).
    ProcessGroup,
    "process group"
);

/// The 32-bit organization network id; it selects the org's /48.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NetworkId(u32);

impl NetworkId {
    /// Network id 0 would give `fdaa:0:0::/48`, which Fly reserves for
    /// instance-local DNS (`fdaa::3`); sixpn never allocates it.
    pub fn new(id: u32) -> Result<Self, InvalidValue> {
        if id == 0 {
            return Err(InvalidValue::new(
                "network id",
                "0",
                "0 is reserved (fdaa::/48)",
            ));
        }
        Ok(Self(id))
    }

    /// The raw id.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The org's prefix `fdaa:HI:LO::/48`.
    pub fn prefix(self) -> OrgPrefix {
        OrgPrefix(self)
    }
}

/// An organization's /48, `fdaa:HI:LO::/48`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct OrgPrefix(NetworkId);

impl OrgPrefix {
    /// The network id this prefix encodes.
    pub fn network_id(self) -> NetworkId {
        self.0
    }

    /// The first three groups of every address in the prefix.
    fn groups(self) -> [u16; 3] {
        let id = self.0.get();
        [0xfdaa, (id >> 16) as u16, id as u16]
    }

    /// The network address `fdaa:HI:LO::`.
    pub fn addr(self) -> Ipv6Addr {
        let [a, b, c] = self.groups();
        Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 0)
    }

    /// The org's DNS server `fdaa:HI:LO::3`.
    pub fn dns_addr(self) -> Ipv6Addr {
        let [a, b, c] = self.groups();
        Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 3)
    }

    /// Whether `addr` lies inside this /48.
    pub fn contains(self, addr: Ipv6Addr) -> bool {
        addr.segments()[..3] == self.groups()
    }

    /// The prefix of any 6PN address (`fdaa::/16`), if it is one with a
    /// non-zero network id.
    pub fn of(addr: Ipv6Addr) -> Option<Self> {
        let s = addr.segments();
        if s[0] != 0xfdaa {
            return None;
        }
        let id = (u32::from(s[1]) << 16) | u32::from(s[2]);
        NetworkId::new(id).ok().map(Self)
    }
}

impl fmt::Display for OrgPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/48", self.addr())
    }
}

impl FromStr for OrgPrefix {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let bad = |reason| InvalidValue::new("org prefix", s, reason);
        let (addr, len) = s.split_once('/').ok_or_else(|| bad("expected ADDR/48"))?;
        if len != "48" {
            return Err(bad("prefix length must be 48"));
        }
        let addr: Ipv6Addr = addr.parse().map_err(|_| bad("not an IPv6 address"))?;
        let p = Self::of(addr).ok_or_else(|| bad("not a 6PN prefix under fdaa::/16"))?;
        if p.addr() != addr {
            return Err(bad("host bits must be zero"));
        }
        Ok(p)
    }
}
serde_via_str!(OrgPrefix);

/// Parses `HI:LO`, two groups of up to four hex digits, into a u32.
fn parse_two_groups(kind: &'static str, s: &str) -> Result<u32, InvalidValue> {
    let bad = |reason| InvalidValue::new(kind, s, reason);
    let (hi, lo) = s
        .split_once(':')
        .ok_or_else(|| bad("expected two hex groups like a7b:d6b"))?;
    let group = |g: &str| {
        if g.is_empty() || g.len() > 4 || !g.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("each group is 1 to 4 hex digits"));
        }
        u16::from_str_radix(g, 16).map_err(|_| bad("each group is 1 to 4 hex digits"))
    };
    Ok((u32::from(group(hi)?) << 16) | u32::from(group(lo)?))
}

fn fmt_two_groups(v: u32, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{:x}:{:x}", v >> 16, v & 0xffff)
}

/// The 32-bit id of a gateway or instance host, written as two hex groups
/// (`a7b:d6b`); it is the 4th and 5th group of the host's 6PN addresses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(u32);

impl HostId {
    /// From the raw 32 bits.
    pub fn from_u32(v: u32) -> Self {
        Self(v)
    }
    /// The raw 32 bits.
    pub fn get(self) -> u32 {
        self.0
    }
    fn groups(self) -> [u16; 2] {
        [(self.0 >> 16) as u16, self.0 as u16]
    }
}
impl FromStr for HostId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        parse_two_groups("host id", s).map(Self)
    }
}
impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_two_groups(self.0, f)
    }
}
impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostId({self})")
    }
}
serde_via_str!(HostId);

/// The public id of an org token: the first 6 bytes of the token's SHA-256,
/// in lowercase hex (`3f9a0c12be77`). It names the token in lists and
/// revocations without being the token, and the store derives it from the
/// hash it keeps, so it needs no column of its own.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId([u8; 6]);

impl TokenId {
    /// The id of the token whose SHA-256 is `sha`.
    pub fn of(sha: &[u8; 32]) -> Self {
        let mut id = [0; 6];
        id.copy_from_slice(&sha[..6]);
        Self(id)
    }
    /// Whether `sha` is the hash of the token this id names.
    pub fn names(&self, sha: &[u8; 32]) -> bool {
        sha[..6] == self.0
    }
}
impl FromStr for TokenId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let bad = |reason| InvalidValue::new("token id", s, reason);
        if s.len() != 12 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad(
                "12 lowercase hex digits, as `sixpn orgs token ORG --list` shows",
            ));
        }
        let mut id = [0; 6];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad("not hex"))?;
        }
        Ok(Self(id))
    }
}
impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}
serde_via_str!(TokenId);

/// The 32-bit machine id of an instance (`f066:b83b`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineId(u32);

impl MachineId {
    /// From the raw 32 bits.
    pub fn from_u32(v: u32) -> Self {
        Self(v)
    }
}
impl FromStr for MachineId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        parse_two_groups("machine id", s).map(Self)
    }
}
impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_two_groups(self.0, f)
    }
}
impl fmt::Debug for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MachineId({self})")
    }
}
serde_via_str!(MachineId);

/// An instance's address: `<org prefix>:HOST:MACHINE:2`.
pub fn instance_addr(prefix: OrgPrefix, host: HostId, machine: MachineId) -> Ipv6Addr {
    let [a, b, c] = prefix.groups();
    let [h1, h2] = host.groups();
    Ipv6Addr::new(
        a,
        b,
        c,
        h1,
        h2,
        (machine.0 >> 16) as u16,
        machine.0 as u16,
        2,
    )
}

/// The first group of peer /120s on a gateway (`0:a`); later blocks of 256
/// use `0:b`, `0:c`, ….
const PEER_GROUP_BASE: u32 = 0xa;

/// The host whose peer /120s `addr` would lie among
/// (`<org>:<host>:0:a:…` through `<org>:<host>:0:ffff:…`), if it has that
/// shape. On a gateway's host that range is reserved for its peers, whoever
/// holds each slot now, so it is never an instance's address there.
pub fn peer_region_host(addr: Ipv6Addr) -> Option<HostId> {
    let s = addr.segments();
    (s[5] == 0 && u32::from(s[6]) >= PEER_GROUP_BASE)
        .then(|| HostId((u32::from(s[3]) << 16) | u32::from(s[4])))
}

/// The index of a WireGuard peer's /120 among its gateway's peer slots in one
/// org: index `n` is slot `n % 256` of group `0:(a + n / 256)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerSlot(u32);

impl PeerSlot {
    /// How many slots a gateway has per org: groups `0:a` … `0:ffff`.
    pub const COUNT: u32 = (0x1_0000 - PEER_GROUP_BASE) * 256;

    /// A slot index, if it is below [`PeerSlot::COUNT`].
    pub fn new(index: u32) -> Result<Self, InvalidValue> {
        if index >= Self::COUNT {
            return Err(InvalidValue::new(
                "peer slot",
                &index.to_string(),
                "out of range",
            ));
        }
        Ok(Self(index))
    }

    /// The raw index.
    pub fn index(self) -> u32 {
        self.0
    }

    /// The peer's network for this slot.
    pub fn net(self, prefix: OrgPrefix, gateway: HostId) -> PeerNet {
        let [a, b, c] = prefix.groups();
        let [h1, h2] = gateway.groups();
        let group = (PEER_GROUP_BASE + self.0 / 256) as u16;
        let base = ((self.0 % 256) << 8) as u16;
        PeerNet(Ipv6Addr::new(a, b, c, h1, h2, 0, group, base))
    }
}

/// A WireGuard peer's /120 (`fdaa:0:18:a7b:d6b:0:a:0/120`). The peer itself
/// uses `…:02` inside it ([`PeerNet::peer_addr`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PeerNet(Ipv6Addr);

impl PeerNet {
    /// The prefix length of every peer network.
    pub const LEN: u8 = 120;

    /// The network address (low 8 bits zero).
    pub fn network(self) -> Ipv6Addr {
        self.0
    }

    /// The address the peer uses: network + 2.
    pub fn peer_addr(self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.0) | 2)
    }

    /// Whether `addr` lies inside this /120.
    pub fn contains(self, addr: Ipv6Addr) -> bool {
        u128::from(addr) >> 8 == u128::from(self.0) >> 8
    }
}

impl fmt::Display for PeerNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, Self::LEN)
    }
}

impl FromStr for PeerNet {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let bad = |reason| InvalidValue::new("peer network", s, reason);
        let (addr, len) = s.split_once('/').ok_or_else(|| bad("expected ADDR/120"))?;
        if len != "120" {
            return Err(bad("prefix length must be 120"));
        }
        let addr: Ipv6Addr = addr.parse().map_err(|_| bad("not an IPv6 address"))?;
        if OrgPrefix::of(addr).is_none() {
            return Err(bad("not a 6PN address under fdaa::/16"));
        }
        if u128::from(addr) & 0xff != 0 {
            return Err(bad("host bits must be zero"));
        }
        Ok(Self(addr))
    }
}
serde_via_str!(PeerNet);

/// A Curve25519 key as WireGuard writes it: 32 bytes, base64. The all-zero
/// key is rejected (WireGuard treats it as "no key").
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

fn decode_key(kind: &'static str, s: &str) -> Result<[u8; 32], InvalidValue> {
    use base64::Engine as _;
    let bad = |reason| InvalidValue::new(kind, s, reason);
    let s = s.trim();
    if s.len() != 44 {
        return Err(bad("expected 44 characters of base64 (32 bytes)"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| bad("not valid base64"))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| bad("expected 44 characters of base64 (32 bytes)"))?;
    if key == [0; 32] {
        return Err(bad("the all-zero key is not a key"));
    }
    Ok(key)
}

fn encode_key(k: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(k)
}

impl PublicKey {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// From raw bytes (e.g. read back from the kernel); zero is rejected.
    pub fn from_bytes(b: [u8; 32]) -> Result<Self, InvalidValue> {
        if b == [0; 32] {
            return Err(InvalidValue::new(
                "public key",
                "AAAA…",
                "the all-zero key is not a key",
            ));
        }
        Ok(Self(b))
    }
    /// Base64, as `wg` prints it.
    pub fn to_base64(&self) -> String {
        encode_key(&self.0)
    }
}
impl FromStr for PublicKey {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        decode_key("public key", s).map(Self)
    }
}
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}
impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}
serde_via_str!(PublicKey);

/// A Curve25519 private key. Its `Debug` never shows the key, and it is not
/// `Serialize`, so it can't end up in a log line or an API body by accident.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh random key, clamped as Curve25519 requires.
    pub fn generate() -> Self {
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
        Self(secret.to_bytes())
    }
    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
    /// Base64, as wg-quick files hold it.
    pub fn to_base64(&self) -> String {
        encode_key(&self.0)
    }
    /// The raw bytes (for handing to the kernel).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}
impl FromStr for PrivateKey {
    type Err = InvalidValue;
    /// A bad key is never echoed back: an error about a private key may end
    /// up in a log, and a nearly-right key is nearly the key.
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        decode_key("private key", s).map(Self).map_err(|mut e| {
            e.value = "<redacted>".into();
            e
        })
    }
}
impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A network interface name as Linux accepts it: 1–15 bytes, no `/`, no
/// whitespace, not `.` or `..`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct InterfaceName(String);

impl InterfaceName {
    /// A compile-time constant name; checked in debug builds and by tests.
    pub(crate) fn from_static(s: &'static str) -> Self {
        debug_assert!(s.parse::<Self>().is_ok(), "{s}");
        Self(s.to_owned())
    }
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl FromStr for InterfaceName {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let bad = |reason| InvalidValue::new("interface name", s, reason);
        if s.is_empty() || s.len() > 15 {
            return Err(bad("must be 1 to 15 bytes"));
        }
        if s == "." || s == ".." {
            return Err(bad("'.' and '..' are not interface names"));
        }
        if s.bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic())
        {
            return Err(bad("no '/', ':', whitespace or control characters"));
        }
        Ok(Self(s.to_owned()))
    }
}
impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
serde_via_str!(InterfaceName);

/// A `host:port` that peers dial: a DNS name or IP literal (IPv6 in
/// brackets) and a non-zero port.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Endpoint(String);

impl Endpoint {
    /// As written, `host:port`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
/// A host name by RFC 1123 (labels of 1–63 letters, digits and inner
/// hyphens, 253 bytes at most) or a dotted IPv4 address; a name whose last
/// label is all digits must be that address.
fn valid_host(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !host.split('.').all(label_ok) {
        return false;
    }
    let last = host.rsplit('.').next().unwrap_or(host);
    !last.bytes().all(|b| b.is_ascii_digit()) || host.parse::<std::net::Ipv4Addr>().is_ok()
}

impl FromStr for Endpoint {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let bad = |reason| InvalidValue::new("endpoint", s, reason);
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("port must be a number 1-65535"))?;
        if port == 0 {
            return Err(bad("port must be a number 1-65535"));
        }
        if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| bad("unclosed '[' in IPv6 literal"))?;
            inner
                .parse::<Ipv6Addr>()
                .map_err(|_| bad("bad IPv6 literal"))?;
        } else if !valid_host(host) {
            return Err(bad("host must be a DNS name, an IPv4 address or [IPv6]"));
        }
        Ok(Self(s.to_owned()))
    }
}
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
serde_via_str!(Endpoint);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_label_rule() {
        for ok in ["a", "lhr", "paulgra-ham", "x1-2", &"a".repeat(63)] {
            assert!(ok.parse::<OrgName>().is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"a".repeat(64)] {
            let e = bad.parse::<PeerName>().unwrap_err();
            assert_eq!(e.kind, "peer name");
        }
    }

    #[test]
    fn seed_addresses_match_the_reference() {
        // fdaa:0:18:a7b:d6b:0:a:2/120 is slot 0 of network 0x18 on host a7b:d6b.
        let p = NetworkId::new(0x18).unwrap().prefix();
        let h: HostId = "a7b:d6b".parse().unwrap();
        let net = PeerSlot::new(0).unwrap().net(p, h);
        assert_eq!(net.peer_addr().to_string(), "fdaa:0:18:a7b:d6b:0:a:2");
        assert_eq!(net.to_string(), "fdaa:0:18:a7b:d6b:0:a:0/120");
        assert_eq!(p.dns_addr().to_string(), "fdaa:0:18::3");
        assert_eq!(p.to_string(), "fdaa:0:18::/48");
        // fdaa:0:4:a7b:ab6:0:a:102 is slot 1 of network 4 on host a7b:ab6.
        let p4 = NetworkId::new(4).unwrap().prefix();
        let h2: HostId = "a7b:ab6".parse().unwrap();
        let net = PeerSlot::new(1).unwrap().net(p4, h2);
        assert_eq!(net.peer_addr().to_string(), "fdaa:0:4:a7b:ab6:0:a:102");
        // Instance: fdaa:0:18:a7b:7d:f066:b83b:2
        let host: HostId = "a7b:7d".parse().unwrap();
        let m: MachineId = "f066:b83b".parse().unwrap();
        assert_eq!(
            instance_addr(p, host, m).to_string(),
            "fdaa:0:18:a7b:7d:f066:b83b:2"
        );
    }

    #[test]
    fn slots_past_256_continue_in_the_next_group() {
        let p = NetworkId::new(1).unwrap().prefix();
        let h = HostId::from_u32(1);
        assert_eq!(
            PeerSlot::new(255)
                .unwrap()
                .net(p, h)
                .peer_addr()
                .to_string(),
            "fdaa:0:1:0:1:0:a:ff02"
        );
        assert_eq!(
            PeerSlot::new(256)
                .unwrap()
                .net(p, h)
                .peer_addr()
                .to_string(),
            "fdaa:0:1:0:1:0:b:2"
        );
        assert!(PeerSlot::new(PeerSlot::COUNT).is_err());
        let last = PeerSlot::new(PeerSlot::COUNT - 1).unwrap().net(p, h);
        assert_eq!(last.peer_addr().to_string(), "fdaa:0:1:0:1:0:ffff:ff02");
    }

    #[test]
    fn token_ids_name_a_hash_and_parse_only_as_shown() {
        let sha: [u8; 32] = std::array::from_fn(|i| (i * 17) as u8);
        let id = TokenId::of(&sha);
        assert_eq!(id.to_string(), "001122334455");
        assert_eq!(id.to_string().parse::<TokenId>().unwrap(), id);
        assert!(id.names(&sha));
        let mut other = sha;
        other[5] ^= 1;
        assert!(!id.names(&other));
        for bad in [
            "",
            "0011223344",
            "00112233445566",
            "0011223344GG",
            "00112233445A",
            " 00112233445",
        ] {
            assert!(bad.parse::<TokenId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_parse_and_reject_bad_input() {
        let k = PrivateKey::generate();
        let pk = k.public_key();
        assert_eq!(pk.to_base64().parse::<PublicKey>().unwrap(), pk);
        assert_eq!(
            k.to_base64().parse::<PrivateKey>().unwrap().public_key(),
            pk
        );
        assert!(format!("{k:?}").contains("redacted"));
        assert!(!format!("{k:?}").contains(&k.to_base64()));
        let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        assert!(zero
            .parse::<PublicKey>()
            .unwrap_err()
            .reason
            .contains("zero"));
        assert!("abc".parse::<PublicKey>().is_err());
        assert!("!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            .parse::<PublicKey>()
            .is_err());
    }

    #[test]
    fn host_ids_and_interfaces_and_endpoints() {
        assert_eq!("a7b:d6b".parse::<HostId>().unwrap().get(), 0x0a7b_0d6b);
        assert_eq!("0:1".parse::<HostId>().unwrap().to_string(), "0:1");
        for bad in ["", "a7b", "a7b:", "12345:1", "g:1", "1:2:3"] {
            assert!(bad.parse::<HostId>().is_err(), "{bad}");
        }
        assert!("sixpn0".parse::<InterfaceName>().is_ok());
        for bad in ["", "a/b", "a b", "sixteen-chars-xx", ".."] {
            assert!(bad.parse::<InterfaceName>().is_err(), "{bad}");
        }
        for ok in [
            "gw.example.net:51820",
            "10.0.0.1:1",
            "[2001:db8::1]:51820",
            "lhr-1:51820",
            "a7b.d6b.example:51820",
        ] {
            assert!(ok.parse::<Endpoint>().is_ok(), "{ok}");
        }
        for bad in [
            "gw",
            "gw:0",
            "gw:x",
            "[::1:5",
            "a b:1",
            ":1",
            "..:51820",
            "a..b:51820",
            "-gw.example:51820",
            "gw-.example:51820",
            "gw.example.:51820",
            "1.2.3.999:51820",
            "10.0.0:51820",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_peer_slot_is_in_the_peer_region_and_instances_are_not() {
        let prefix: OrgPrefix = "fdaa:0:18::/48".parse().unwrap();
        let host: HostId = "a7b:d6b".parse().unwrap();
        for slot in [0, 255, 256, PeerSlot::COUNT - 1] {
            let net = PeerSlot::new(slot).unwrap().net(prefix, host);
            assert_eq!(peer_region_host(net.peer_addr()), Some(host), "{net}");
            assert_eq!(peer_region_host(net.network()), Some(host), "{net}");
        }
        let machine: MachineId = "f066:b83b".parse().unwrap();
        assert_eq!(peer_region_host(instance_addr(prefix, host, machine)), None);
        for free in [
            "fdaa:0:18:a7b:d6b:0:9:2",
            "fdaa:0:18:a7b:d6b:1:a:2",
            "fdaa:0:18::3",
        ] {
            assert_eq!(peer_region_host(free.parse().unwrap()), None, "{free}");
        }
    }

    #[test]
    fn org_prefix_parses_and_contains() {
        let p: OrgPrefix = "fdaa:0:18::/48".parse().unwrap();
        assert_eq!(p.network_id().get(), 0x18);
        assert!(p.contains("fdaa:0:18:a7b:d6b:0:a:2".parse().unwrap()));
        assert!(!p.contains("fdaa:0:19::2".parse().unwrap()));
        for bad in [
            "fdaa:0:18::1/48",
            "fdaa:0:18::/64",
            "fd00::/48",
            "fdaa::/48",
        ] {
            assert!(bad.parse::<OrgPrefix>().is_err(), "{bad}");
        }
    }
}
