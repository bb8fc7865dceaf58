//! The few byte-level reads of a DNS message the listeners and the
//! forwarder need without parsing it: the ID and question, and a SERVFAIL
//! built from a query.

use super::*;

pub(super) fn be16(b: &[u8], at: usize) -> Option<u16> {
    match b.get(at..at + 2) {
        Some(&[hi, lo]) => Some(u16::from_be_bytes([hi, lo])),
        _ => None,
    }
}

/// The end of the question section of a message with one uncompressed
/// question, or `None`.
pub(super) fn question_end(msg: &[u8]) -> Option<usize> {
    if be16(msg, 4)? != 1 {
        return None;
    }
    let mut pos = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 || pos + len > HEADER_LEN + 255 {
            return None;
        }
        pos += len;
    }
    let end = pos + 4;
    (end <= msg.len()).then_some(end)
}

/// The question bytes (name, type, class) of a message.
pub(super) fn question(msg: &[u8]) -> Option<&[u8]> {
    msg.get(HEADER_LEN..question_end(msg)?)
}

/// Writes a SERVFAIL response to `query` into `out` (header and, if it
/// parses, the question, and sixpn's OPT when the query had one: RFC 6891
/// §7). False if `query` has no header.
pub(super) fn servfail(query: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    if let Ok(m) = hickory_proto::op::Message::from_vec(query) {
        let mut r = hickory_proto::op::Message::error_msg(
            m.metadata.id,
            m.metadata.op_code,
            hickory_proto::op::ResponseCode::ServFail,
        );
        r.metadata.recursion_desired = m.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.metadata.checking_disabled = m.metadata.checking_disabled;
        r.add_queries(m.queries);
        r.edns = m
            .edns
            .map(|e| super::forward::own_edns(e.flags().dnssec_ok));
        if let Ok(bytes) = r.to_vec() {
            *out = bytes;
            return true;
        }
    }
    let Some(h) = query.get(..HEADER_LEN) else {
        return false;
    };
    let q = question(query);
    out.extend_from_slice(&h[..2]);
    out.push(0x80 | (h[2] & 0x79)); // QR, OPCODE and RD copied
    out.push(0x80 | (h[3] & 0x10) | 2); // RA, CD copied, SERVFAIL
    out.extend_from_slice(&u16::from(q.is_some()).to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    if let Some(q) = q {
        out.extend_from_slice(q);
    }
    true
}

/// The RCODE in a response header.
pub(super) fn rcode_of(msg: &[u8]) -> u16 {
    msg.get(3).map_or(0, |b| u16::from(b & 0x0F))
}
