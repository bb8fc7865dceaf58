//! Answering one DNS query, given as bytes, from the zone index — no
//! sockets, no allocation on the hot path (the caller lends `out`).
//!
//! The work per `.internal` query is: check the 12-byte header, copy the
//! question name lower-cased into a stack buffer while checking it, walk the
//! other sections for an EDNS0 OPT record, one hash lookup in the org's
//! [`OrgZone`], and copy header + question + pre-encoded answers.
//!
//! Rules (docs/architecture.md "DNS"; RFC numbers where the behaviour is subtle):
//!
//! - Fewer than 12 bytes, or a response (QR=1): [`Outcome::Drop`] — there is
//!   no header to answer, and answering responses invites loops.
//! - A source outside the listener's /48 (IPv4 and non-6PN sources
//!   included): REFUSED, whatever the name — the listener is not an open
//!   resolver.
//! - OPCODE other than QUERY: NOTIMP. QDCOUNT ≠ 1, a truncated or garbled
//!   message, a compression pointer or extended label type in the question,
//!   more than one OPT, an OPT not owned by the root: FORMERR (header only;
//!   RFC 6891 §6.1.1 for the OPT rules).
//! - A name outside `.internal`: [`Outcome::Forward`], nothing written.
//! - EDNS version ≠ 0: BADVERS (RFC 6891 §6.1.3).
//! - Class other than IN (or ANY), or a zone transfer (AXFR, IXFR):
//!   REFUSED — there is no such data to serve.
//! - `internal. SOA` and `internal. NS` are answered from the org's zone:
//!   the SOA (serial: the store revision the zone was built from) and one
//!   NS naming the SOA's MNAME, `_api.internal.` (see [`super::zone`]).
//! - An unknown `.internal` name: NXDOMAIN. A known name asked for a type
//!   it lacks (A, MX, ANY, …): NOERROR with no answer (ANY gets no records:
//!   RFC 8482 permits a minimal answer). Both negative answers carry the
//!   zone's SOA in the AUTHORITY section (NSCOUNT 1, TTL min(SOA TTL,
//!   MINIMUM) = 5 s, RFC 2308 §3), pre-encoded like every answer, so
//!   resolvers may cache them for those 5 s. Should question + SOA + OPT
//!   not fit the client's limit (they always do: at most 358 of the 512
//!   bytes) the SOA is left out, never truncated. A listener whose org has
//!   no zone answers NXDOMAIN without SOA.
//! - The response copies ID, OPCODE, RD and CD, and sets QR, AA (for
//!   `.internal`) and RA (we forward the rest). The question is echoed byte
//!   for byte, so a client's 0x20 case randomisation comes back intact and
//!   the answers' `0xC00C` pointers name it as asked.
//! - With an OPT in the query the response carries one, advertising
//!   [`MAX_UDP_PAYLOAD`] and echoing the DO bit (RFC 3225). A UDP response
//!   may be as large as the client's advertised payload, at least 512 and at
//!   most [`MAX_UDP_PAYLOAD`] (1232, DNS Flag Day 2020: no IP
//!   fragmentation); 512 without EDNS (RFC 1035 §4.2.1). If the answer
//!   doesn't fit it is left out and TC is set, so the client retries over
//!   TCP, where the limit is 65535. TXT lists never pass that limit (the
//!   zone cuts them with a marker); an AAAA set too large even for TCP
//!   (over ~2,300 addresses) gets SERVFAIL there.

use std::net::IpAddr;

use super::zone::{OrgZone, Rrs, ZoneIndex, HEADER_LEN, MAX_MESSAGE, OPT_RR_LEN};
use crate::model::OrgPrefix;

/// The largest UDP response we send, and the payload size our OPT
/// advertises: 1232 bytes fits any IPv6 path without fragmentation.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// What a UDP response may use without EDNS, and the floor of any
/// advertised payload (RFC 6891 §6.2.5).
const MIN_UDP_PAYLOAD: usize = 512;

/// The longest name in wire format (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;

const FLAG_QR: u8 = 0x80;
const FLAG_AA: u8 = 0x04;
const FLAG_TC: u8 = 0x02;
const FLAG_RD: u8 = 0x01;
const FLAG_RA: u8 = 0x80;
const FLAG_CD: u8 = 0x10;
const OPCODE_MASK: u8 = 0x78;

const TYPE_NS: u16 = 2;
const TYPE_SOA: u16 = 6;
const TYPE_AAAA: u16 = 28;
const TYPE_TXT: u16 = 16;
const TYPE_OPT: u16 = 41;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;
const CLASS_IN: u16 = 1;

/// The transport a query came on; it sets the response size limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// UDP: the limit is 512, or the client's EDNS payload up to
    /// [`MAX_UDP_PAYLOAD`].
    Udp,
    /// TCP: the limit is 65535 (the caller adds the 2-byte length prefix).
    Tcp,
}

/// A response code, extended codes included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rcode {
    /// 0: the answer (possibly empty, possibly truncated).
    NoError,
    /// 1: the query was malformed.
    FormErr,
    /// 2: the answer can't be sent (too large even for TCP).
    ServFail,
    /// 3: the `.internal` name does not exist.
    NxDomain,
    /// 4: an opcode other than QUERY.
    NotImp,
    /// 5: the source is outside the org, or a class/transfer we don't serve.
    Refused,
    /// 16 (extended, RFC 6891): an EDNS version other than 0.
    BadVers,
}

impl Rcode {
    /// The numeric code (12 bits: 4 in the header, 8 in the OPT record).
    pub fn code(self) -> u16 {
        match self {
            Rcode::NoError => 0,
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
            Rcode::BadVers => 16,
        }
    }
}

/// What to do with a query after [`answer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `out` holds the response, with this code.
    Answered(Rcode),
    /// The name is outside `.internal` and the source is in the org: send
    /// the query upstream. `out` is empty.
    Forward,
    /// Not a query we can answer (no header, or a response): send nothing.
    Drop,
}

/// Answers `query`, which came from `src` over `transport` to the listener
/// of the org whose /48 is `listener`, from that org's zone in `index`.
/// The response (if any) replaces the contents of `out`.
///
/// If `index` has no zone for the org (it was removed while its listener
/// lived on), every `.internal` name is NXDOMAIN.
pub fn answer(
    index: &ZoneIndex,
    listener: OrgPrefix,
    src: IpAddr,
    query: &[u8],
    transport: Transport,
    out: &mut Vec<u8>,
) -> Outcome {
    out.clear();
    let Some(header) = query.get(..HEADER_LEN) else {
        return Outcome::Drop;
    };
    if header[2] & FLAG_QR != 0 {
        return Outcome::Drop;
    }
    let is_query = header[2] & OPCODE_MASK == 0;
    let in_org = match src {
        IpAddr::V6(a) => listener.contains(a),
        IpAddr::V4(_) => false,
    };
    if !in_org {
        let parsed = if is_query { parse(query).ok() } else { None };
        let r = Response::error(Rcode::Refused).ra(false);
        return r.write(query, parsed.as_ref(), out);
    }
    // NOTIMP and REFUSED claim no recursion: none was done.
    if !is_query {
        // The question and OPT are echoed when they read (RFC 6891 §7).
        let parsed = parse(query).ok();
        return Response::error(Rcode::NotImp)
            .ra(false)
            .write(query, parsed.as_ref(), out);
    }
    let Ok(p) = parse(query) else {
        return Response::error(Rcode::FormErr).write(query, None, out);
    };
    // Only class IN is ever forwarded: CHAOS names (`version.bind`,
    // `hostname.bind`, `id.server`) would otherwise tell a peer what the
    // upstream runs, and a QCLASS of ANY is nothing an upstream should be
    // asked on a peer's behalf. Neither is done, so RA is not claimed.
    if !p.internal && p.qclass != CLASS_IN {
        return Response::error(Rcode::Refused)
            .ra(false)
            .write(query, Some(&p), out);
    }
    if !p.internal {
        return Outcome::Forward;
    }
    if p.edns.is_some_and(|e| e.version != 0) {
        return Response::error(Rcode::BadVers).write(query, Some(&p), out);
    }
    // QCLASS ANY can't be answered authoritatively (RFC 6895 §3.2): it is
    // refused like any class but IN.
    if p.qclass != CLASS_IN || p.qtype == TYPE_AXFR || p.qtype == TYPE_IXFR {
        return Response::error(Rcode::Refused)
            .ra(false)
            .write(query, Some(&p), out);
    }

    let zone = index.org(listener);
    let (rcode, rrs) = match zone.and_then(|z| resolve(z, &p)) {
        Some(rrs) => (Rcode::NoError, rrs),
        None => (Rcode::NxDomain, Rrs::default()),
    };
    let answers = zone.map(|z| z.bytes(rrs)).unwrap_or_default();

    let limit = match transport {
        Transport::Udp => p.edns.map_or(MIN_UDP_PAYLOAD, |e| {
            usize::from(e.payload).clamp(MIN_UDP_PAYLOAD, usize::from(MAX_UDP_PAYLOAD))
        }),
        Transport::Tcp => MAX_MESSAGE,
    };
    let opt_len = if p.edns.is_some() { OPT_RR_LEN } else { 0 };
    let fits = !rrs.oversize && p.end + answers.len() + opt_len <= limit;
    // NXDOMAIN or no-data: the SOA goes in AUTHORITY, if it fits.
    let authority = match zone {
        Some(z) if rrs.count == 0 && !rrs.oversize => {
            let soa = z.bytes(z.negative_soa());
            if p.end + soa.len() + opt_len <= limit {
                soa
            } else {
                &[]
            }
        }
        _ => &[],
    };
    let r = match (fits, transport) {
        (true, _) => Response {
            rcode,
            aa: true,
            tc: false,
            ra: true,
            answers,
            count: rrs.count as u16,
            authority,
            nscount: u16::from(!authority.is_empty()),
        },
        (false, Transport::Udp) => Response {
            rcode,
            aa: true,
            tc: true,
            ..Response::error(rcode)
        },
        (false, Transport::Tcp) => Response::error(Rcode::ServFail),
    };
    r.write(query, Some(&p), out)
}

/// The answer records for the question, or `None` if the name doesn't
/// exist. Empty records mean no-data.
fn resolve(zone: &OrgZone, p: &Parsed) -> Option<Rrs> {
    let name = p.name();
    let pick = |rrs: Rrs| {
        if p.qtype == TYPE_AAAA {
            rrs
        } else {
            Rrs::default()
        }
    };
    if let Some(e) = zone.lookup(name) {
        // Only the apex has SOA and NS; the type is tested first, the
        // common queries never compare names.
        match p.qtype {
            TYPE_SOA if name == APEX => return Some(zone.soa()),
            TYPE_NS if name == APEX => return Some(zone.ns()),
            _ => {}
        }
        return Some(match p.qtype {
            TYPE_AAAA => e.aaaa,
            TYPE_TXT => e.txt,
            _ => Rrs::default(),
        });
    }
    // top<N>.nearest.of.<app>.internal: N is unbounded, so it is not a
    // stored name; its parent holds the app's instances nearest first.
    let (first, parent) = split_first_label(name)?;
    let n = top_n(first)?;
    let nearest = zone.lookup(parent)?.nearest?;
    Some(pick(nearest.first_aaaa(n)))
}

/// `internal.` in wire format: the zone's apex.
const APEX: &[u8] = b"\x08internal\x00";

/// The first label and the rest of a wire-format name.
fn split_first_label(name: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(*name.first()?);
    Some((name.get(1..1 + len)?, name.get(1 + len..)?))
}

/// N of a `top<N>` label: decimal, N ≥ 1, no leading zero (so each N has
/// one name). Values past `usize` saturate; they all mean "every instance".
fn top_n(label: &[u8]) -> Option<usize> {
    let digits = label.strip_prefix(b"top")?;
    if digits.first().is_none_or(|&d| d == b'0') || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0usize, |n, d| {
        n.saturating_mul(10).saturating_add(usize::from(d - b'0'))
    }))
}

/// The query's EDNS0 OPT record.
#[derive(Clone, Copy, Debug)]
struct Edns {
    payload: u16,
    version: u8,
    dnssec_ok: bool,
}

/// A query that parsed.
struct Parsed {
    /// End of the question section: header + QNAME + QTYPE + QCLASS.
    end: usize,
    qtype: u16,
    qclass: u16,
    /// QNAME lower-cased, wire format, with the root label.
    lname: [u8; MAX_NAME],
    lname_len: usize,
    /// Whether the last label is `internal`.
    internal: bool,
    edns: Option<Edns>,
}

impl Parsed {
    fn name(&self) -> &[u8] {
        &self.lname[..self.lname_len]
    }
}

/// The query can't be parsed.
struct Malformed;

fn be16(b: &[u8], at: usize) -> Result<u16, Malformed> {
    match b.get(at..at + 2) {
        Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
        _ => Err(Malformed),
    }
}

/// Parses question and additional sections (answer and authority are
/// skipped; a query normally has none).
fn parse(query: &[u8]) -> Result<Parsed, Malformed> {
    if be16(query, 4)? != 1 {
        return Err(Malformed);
    }
    let skip = usize::from(be16(query, 6)?) + usize::from(be16(query, 8)?);
    let additional = be16(query, 10)?;

    let mut p = Parsed {
        end: 0,
        qtype: 0,
        qclass: 0,
        lname: [0; MAX_NAME],
        lname_len: 0,
        internal: false,
        edns: None,
    };
    let mut pos = HEADER_LEN;
    let mut last_label = None;
    loop {
        let len = usize::from(*query.get(pos).ok_or(Malformed)?);
        if len == 0 {
            break;
        }
        // 0xC0: a compression pointer (nothing before the question to point
        // at); 0x40, 0x80: label types no one uses (RFC 6891 §5).
        if len > 63 || p.lname_len + 1 + len + 1 > MAX_NAME {
            return Err(Malformed);
        }
        let label = query.get(pos + 1..pos + 1 + len).ok_or(Malformed)?;
        let at = p.lname_len;
        p.lname[at] = len as u8;
        for (dst, src) in p.lname[at + 1..at + 1 + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        last_label = Some(at);
        p.lname_len += 1 + len;
        pos += 1 + len;
    }
    p.lname[p.lname_len] = 0;
    p.lname_len += 1;
    pos += 1;
    p.internal = last_label.is_some_and(|at| &p.lname[at..p.lname_len] == b"\x08internal\x00");
    p.qtype = be16(query, pos)?;
    p.qclass = be16(query, pos + 2)?;
    pos += 4;
    p.end = pos;

    for _ in 0..skip {
        pos = read_rr(query, pos)?.next;
    }
    for _ in 0..additional {
        let rr = read_rr(query, pos)?;
        if rr.rtype == TYPE_OPT {
            if p.edns.is_some() || !rr.root_owner {
                return Err(Malformed);
            }
            p.edns = Some(Edns {
                payload: rr.class,
                version: (rr.ttl >> 16) as u8,
                dnssec_ok: rr.ttl & 0x8000 != 0,
            });
        }
        pos = rr.next;
    }
    Ok(p)
}

/// The parts of a resource record the parser needs.
struct Rr {
    next: usize,
    rtype: u16,
    class: u16,
    ttl: u32,
    root_owner: bool,
}

fn read_rr(msg: &[u8], mut pos: usize) -> Result<Rr, Malformed> {
    let root_owner = msg.get(pos) == Some(&0);
    // Skip the owner name; a pointer ends it (it needn't be followed).
    loop {
        let len = *msg.get(pos).ok_or(Malformed)?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                pos += 1;
                break;
            }
            0x00 => pos += 1 + usize::from(len),
            0xC0 => {
                pos += 2;
                break;
            }
            _ => return Err(Malformed),
        }
    }
    let rtype = be16(msg, pos)?;
    let class = be16(msg, pos + 2)?;
    let ttl = (u32::from(be16(msg, pos + 4)?) << 16) | u32::from(be16(msg, pos + 6)?);
    let rdlen = usize::from(be16(msg, pos + 8)?);
    let next = pos + 10 + rdlen;
    if next > msg.len() {
        return Err(Malformed);
    }
    Ok(Rr {
        next,
        rtype,
        class,
        ttl,
        root_owner,
    })
}

/// A response about to be written.
struct Response<'a> {
    rcode: Rcode,
    aa: bool,
    tc: bool,
    ra: bool,
    answers: &'a [u8],
    count: u16,
    /// AUTHORITY records (the SOA of a negative answer).
    authority: &'a [u8],
    nscount: u16,
}

impl Response<'_> {
    /// No answers, not authoritative.
    fn error(rcode: Rcode) -> Self {
        Response {
            rcode,
            aa: false,
            tc: false,
            ra: true,
            answers: &[],
            count: 0,
            authority: &[],
            nscount: 0,
        }
    }

    fn ra(self, ra: bool) -> Self {
        Self { ra, ..self }
    }

    /// Writes header, the question (if it parsed), answers, authority and
    /// an OPT (if the query had one) into `out`.
    fn write(&self, query: &[u8], parsed: Option<&Parsed>, out: &mut Vec<u8>) -> Outcome {
        let code = self.rcode.code();
        let edns = parsed.and_then(|p| p.edns);
        out.clear();
        out.extend_from_slice(&query[..2]);
        out.push(
            FLAG_QR
                | (query[2] & (OPCODE_MASK | FLAG_RD))
                | if self.aa { FLAG_AA } else { 0 }
                | if self.tc { FLAG_TC } else { 0 },
        );
        out.push(if self.ra { FLAG_RA } else { 0 } | (query[3] & FLAG_CD) | (code & 0xF) as u8);
        out.extend_from_slice(&u16::from(parsed.is_some()).to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.nscount.to_be_bytes());
        out.extend_from_slice(&u16::from(edns.is_some()).to_be_bytes());
        if let Some(p) = parsed {
            out.extend_from_slice(&query[HEADER_LEN..p.end]);
        }
        out.extend_from_slice(self.answers);
        out.extend_from_slice(self.authority);
        if let Some(e) = edns {
            out.push(0); // owner: the root
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
            // TTL field: extended rcode, version 0, DO, Z.
            out.extend_from_slice(&[(code >> 4) as u8, 0, u8::from(e.dnssec_ok) << 7, 0]);
            out.extend_from_slice(&[0, 0]); // no options
        }
        Outcome::Answered(self.rcode)
    }
}

#[cfg(test)]
mod tests;
