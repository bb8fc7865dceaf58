//! The isolation guard: a second layer under the nftables table, so that a
//! `nft flush ruleset` (or any other loss of our table) opens no window in
//! which one org's traffic reaches another's.
//!
//! It is one classic BPF program, attached by the dataplane as a
//! direct-action `tc` filter at both ingress and egress of our WireGuard
//! interface (a `clsact` qdisc on the interface sixpn owns whole). On that
//! interface a packet starts at its IP header (no link-layer header), and the
//! program passes exactly the IPv6 packets whose source and destination lie
//! in the same /48, and drops everything else. That is never stricter than
//! the table: everything the table lets in or out of the interface is
//! same-org 6PN (forwarded, or a peer's DNS and ICMPv6 to its org's `::3`).
//! It compares the two addresses with each other, so it knows no org and
//! costs the same per packet with one org or a million; it does not live in
//! nftables, so nothing done to nftables touches it.
//!
//! Classic BPF, not eBPF: the kernel verifies and JITs it with no loader,
//! no maps and no BTF, and the whole program is the 15 instructions below,
//! which the tests run through an interpreter of the same semantics.

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant operand.
    pub k: u32,
}

// Opcodes (linux/filter.h, linux/bpf_common.h).
const LD_W_LEN: u16 = 0x80; // A = skb->len
const LD_B_ABS: u16 = 0x30; // A = pkt[k]
const LD_H_ABS: u16 = 0x28; // A = be16 pkt[k..k+2]
const LD_W_ABS: u16 = 0x20; // A = be32 pkt[k..k+4]
const ALU_AND_K: u16 = 0x54; // A &= k
const JMP_JEQ_K: u16 = 0x15; // A == k
const JMP_JGE_K: u16 = 0x35; // A >= k
const JMP_JEQ_X: u16 = 0x1d; // A == X
const MISC_TAX: u16 = 0x07; // X = A
const RET_K: u16 = 0x06; // return k

/// `TC_ACT_OK`: the packet goes on (to nftables and the rest of the stack).
pub const PASS: u32 = 0;
/// `TC_ACT_SHOT`: the packet is dropped.
pub const DROP: u32 = 2;

const fn op(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// The program. Offsets are from the IPv6 header: the version nibble at 0,
/// the source address at 8, the destination at 24; a /48 is the first 6
/// bytes of each (a word, then a half-word). Jump offsets count from the
/// next instruction; every `jf` lands on the final `DROP`.
pub const PROGRAM: [SockFilter; 15] = [
    op(LD_W_LEN, 0, 0, 0),     // 0: A = length
    op(JMP_JGE_K, 0, 12, 40),  // 1: shorter than an IPv6 header: drop
    op(LD_B_ABS, 0, 0, 0),     // 2: A = first byte
    op(ALU_AND_K, 0, 0, 0xf0), // 3: its version nibble
    op(JMP_JEQ_K, 0, 9, 0x60), // 4: not IPv6: drop
    op(LD_W_ABS, 0, 0, 8),     // 5: A = source bytes 0..4
    op(MISC_TAX, 0, 0, 0),     // 6: X = A
    op(LD_W_ABS, 0, 0, 24),    // 7: A = destination bytes 0..4
    op(JMP_JEQ_X, 0, 5, 0),    // 8: differ: drop
    op(LD_H_ABS, 0, 0, 12),    // 9: A = source bytes 4..6
    op(MISC_TAX, 0, 0, 0),     // 10: X = A
    op(LD_H_ABS, 0, 0, 28),    // 11: A = destination bytes 4..6
    op(JMP_JEQ_X, 0, 1, 0),    // 12: differ: drop
    op(RET_K, 0, 0, PASS),     // 13: same /48: pass
    op(RET_K, 0, 0, DROP),     // 14: drop
];

/// The program as the kernel takes it (`TCA_BPF_OPS`): `struct
/// sock_filter` in host byte order, 8 bytes each; also how a dump returns
/// it, so an installed guard is recognised by these bytes.
pub fn encode(program: &[SockFilter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for i in program {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    out
}

/// The program as `tc filter show` prints it (`bytecode 'N,op jt jf k,…'`),
/// for checks with the stock tool.
pub fn tc_bytecode() -> String {
    let ops: Vec<String> = PROGRAM
        .iter()
        .map(|i| format!("{} {} {} {}", i.code, i.jt, i.jf, i.k))
        .collect();
    format!("bytecode '{},{}'", PROGRAM.len(), ops.join(","))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// Runs a classic BPF program on `pkt` as the kernel does for the
    /// opcodes above: a load past the end returns 0 from the program.
    fn run(program: &[SockFilter], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |k: u32, n: usize| -> Option<u32> {
            let k = k as usize;
            let b = pkt.get(k..k + n)?;
            Some(b.iter().fold(0u32, |v, &byte| v << 8 | u32::from(byte)))
        };
        loop {
            let i = program[pc];
            pc += 1;
            let jump = |cond: bool| usize::from(if cond { i.jt } else { i.jf });
            match i.code {
                LD_W_LEN => a = pkt.len() as u32,
                LD_B_ABS | LD_H_ABS | LD_W_ABS => {
                    let n = match i.code {
                        LD_B_ABS => 1,
                        LD_H_ABS => 2,
                        _ => 4,
                    };
                    match load(i.k, n) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                ALU_AND_K => a &= i.k,
                JMP_JEQ_K => pc += jump(a == i.k),
                JMP_JGE_K => pc += jump(a >= i.k),
                JMP_JEQ_X => pc += jump(a == x),
                MISC_TAX => x = a,
                RET_K => return i.k,
                c => panic!("opcode {c:#x} not interpreted"),
            }
        }
    }

    fn v6(src: &str, dst: &str, payload: usize) -> Vec<u8> {
        let (s, d): (Ipv6Addr, Ipv6Addr) = (src.parse().unwrap(), dst.parse().unwrap());
        let mut p = vec![0x60, 0, 0, 0, 0, payload as u8, 17, 64];
        p.extend_from_slice(&s.octets());
        p.extend_from_slice(&d.octets());
        p.resize(40 + payload, 0xab);
        p
    }

    fn verdict(pkt: &[u8]) -> u32 {
        run(&PROGRAM, pkt)
    }

    #[test]
    fn same_org_passes_and_every_other_org_is_dropped() {
        let peer = "fdaa:0:1:a7b:d6b:0:a:2";
        for same in [
            "fdaa:0:1::3",
            "fdaa:0:1:a7b:ab6:0:a:102",
            "fdaa:0:1:ffff::1",
        ] {
            assert_eq!(verdict(&v6(peer, same, 8)), PASS, "{same}");
            assert_eq!(verdict(&v6(same, peer, 8)), PASS, "{same} back");
        }
        // Another org differs in either half of the network id, or only in
        // its last bit; an address outside 6PN differs too.
        for other in [
            "fdaa:0:2::3",
            "fdaa:1:1::3",
            "fdaa:0:3:a7b:d6b:0:a:2",
            "fdab:0:1::3",
            "2001:db8::1",
            "::1",
        ] {
            assert_eq!(verdict(&v6(peer, other, 8)), DROP, "{other}");
            assert_eq!(verdict(&v6(other, peer, 8)), DROP, "{other} back");
        }
    }

    #[test]
    fn what_is_not_a_whole_ipv6_header_is_dropped() {
        // IPv4 (even with "matching" bytes where IPv6 addresses would be).
        let mut v4 = v6("fdaa:0:1::2", "fdaa:0:1::3", 8);
        v4[0] = 0x45;
        assert_eq!(verdict(&v4), DROP);
        // Short packets: no load ever runs past the end.
        let full = v6("fdaa:0:1::2", "fdaa:0:1::3", 0);
        for n in [0, 1, 8, 29, 39] {
            assert_eq!(verdict(&full[..n]), DROP, "{n} bytes");
        }
        assert_eq!(verdict(&full), PASS, "a bare 40-byte header");
    }

    #[test]
    fn every_jump_lands_inside_the_program_and_false_means_drop() {
        for (pc, i) in PROGRAM.iter().enumerate() {
            if ![JMP_JEQ_K, JMP_JGE_K, JMP_JEQ_X].contains(&i.code) {
                assert_eq!((i.jt, i.jf), (0, 0), "{pc}");
                continue;
            }
            for off in [i.jt, i.jf] {
                assert!(pc + 1 + usize::from(off) < PROGRAM.len(), "{pc}");
            }
            if i.jf != 0 {
                assert_eq!(PROGRAM[pc + 1 + usize::from(i.jf)], op(RET_K, 0, 0, DROP));
            }
        }
        assert_eq!(encode(&PROGRAM).len(), 8 * PROGRAM.len());
    }
}
