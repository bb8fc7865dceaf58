//! The just-in-time peers' handshake filter under a flood: what one
//! captured initiation costs the gateway, for a valid message and for the
//! cheapest garbage that gets past mac1 (made by someone who knows the
//! gateway's public key).
//!
//! `cargo bench --bench noise` (prints ns per call; no timing assertions).
//! `SIXPN_BENCH_ITERS` sets the iterations per row (default 20,000).

use std::hint::black_box;
use std::time::Instant;

use sixpn::jit::noise::{garbage_with_mac1, initiation, Responder, GARBAGE_LEN};
use sixpn::model::PrivateKey;

fn time(label: &str, iters: u32, mut f: impl FnMut() -> bool) {
    // Warm-up, and a check that the row measures what it says.
    let expect = f();
    let t = Instant::now();
    for _ in 0..iters {
        assert_eq!(black_box(f()), expect);
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
    println!("  {label:<34} {ns:>10.0} ns/call   (result {expect})");
}

fn main() {
    let iters: u32 = std::env::var("SIXPN_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let gw = PrivateKey::generate();
    let peer = PrivateKey::generate();
    let responder = Responder::new(&gw);
    let valid = initiation(&peer, &gw.public_key(), &[0x5a; 32], 42, [0x40; 12]);
    let random: [u8; GARBAGE_LEN] = std::array::from_fn(|i| (i as u8).wrapping_mul(167) ^ 0x3c);
    let garbage = garbage_with_mac1(&gw.public_key(), &random);
    let mut stranger = valid;
    stranger[100] ^= 1; // mac1 no longer matches

    println!("Noise IK first leg, responder side, {iters} iterations per row");
    time("mac1_ok, valid initiation", iters, || {
        responder.mac1_ok(black_box(&valid))
    });
    time("mac1_ok, bad mac1", iters, || {
        responder.mac1_ok(black_box(&stranger))
    });
    time("open, valid initiation", iters, || {
        responder.open(black_box(&valid)).is_ok()
    });
    time("open, garbage_with_mac1", iters, || {
        responder.open(black_box(&garbage)).is_ok()
    });
    time("Responder::new", iters.min(2_000), || {
        Responder::new(black_box(&gw)).mac1_ok(&valid)
    });
}
