//! Rendering the wg-quick file a user loads into their WireGuard client
//! (docs/architecture.md "Configuration and CLI", a contract: the fields and their order).

use std::fmt::Write as _;

use crate::api::PeerInfo;
use crate::model::PrivateKey;

/// Keepalive the client sends so NAT mappings toward the gateway stay open.
pub const PERSISTENT_KEEPALIVE: u16 = 15;

/// Renders the wg-quick configuration for `peer`. With `private_key` absent
/// (the user registered an existing key), the `PrivateKey` line is a comment
/// that tells them what to put there.
pub fn render(peer: &PeerInfo, private_key: Option<&PrivateKey>) -> String {
    let mut s = String::new();
    // Writing to a String can't fail.
    let _ = writeln!(s, "[Interface]");
    match private_key {
        Some(k) => {
            let _ = writeln!(s, "PrivateKey = {}", k.to_base64());
        }
        None => {
            let _ = writeln!(s, "# PrivateKey = <the private key of {}>", peer.public_key);
        }
    }
    let _ = writeln!(
        s,
        "Address = {}/{}",
        peer.address,
        crate::model::PeerNet::LEN
    );
    let _ = writeln!(s, "DNS = {}", peer.dns);
    let _ = writeln!(s);
    let _ = writeln!(s, "[Peer]");
    let _ = writeln!(s, "PublicKey = {}", peer.gateway_public_key);
    let _ = writeln!(s, "AllowedIPs = {}", peer.org_prefix);
    let _ = writeln!(s, "Endpoint = {}", peer.endpoint);
    let _ = writeln!(s, "PersistentKeepalive = {PERSISTENT_KEEPALIVE}");
    s
}

/// The configuration as a QR code drawn with Unicode half blocks, for the
/// WireGuard mobile apps' "scan from QR code".
pub fn qr(config: &str) -> Result<String, super::CliError> {
    let code = qrcode::QrCode::new(config.as_bytes())
        .map_err(|e| super::CliError::Other(format!("cannot make a QR code: {e}")))?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PeerState;
    use crate::model::{NetworkId, PeerSlot};

    #[test]
    fn renders_the_contract_file() {
        let prefix = NetworkId::new(0x18).unwrap().prefix();
        let net = PeerSlot::new(0)
            .unwrap()
            .net(prefix, "a7b:d6b".parse().unwrap());
        let key = PrivateKey::generate();
        let gw = PrivateKey::generate().public_key();
        let peer = PeerInfo {
            org: "personal".parse().unwrap(),
            name: "basic".parse().unwrap(),
            region: "lhr".parse().unwrap(),
            gateway: "lhr-1".parse().unwrap(),
            address: net.peer_addr(),
            network: net,
            org_prefix: prefix,
            dns: prefix.dns_addr(),
            public_key: key.public_key(),
            gateway_public_key: gw,
            endpoint: "gw-lhr.example.net:51820".parse().unwrap(),
            state: PeerState::Installed,
            ephemeral: None,
            expires_at: None,
        };
        let expected = format!(
            "[Interface]\nPrivateKey = {}\nAddress = fdaa:0:18:a7b:d6b:0:a:2/120\n\
             DNS = fdaa:0:18::3\n\n[Peer]\nPublicKey = {gw}\nAllowedIPs = fdaa:0:18::/48\n\
             Endpoint = gw-lhr.example.net:51820\nPersistentKeepalive = 15\n",
            key.to_base64()
        );
        assert_eq!(render(&peer, Some(&key)), expected);
        let without = render(&peer, None);
        assert!(!without.contains(&key.to_base64()));
        assert!(without.contains("# PrivateKey = <the private key of"));
    }

    #[test]
    fn qr_code_is_drawn_in_half_blocks() {
        let q = qr("[Interface]\nPrivateKey = x\n").unwrap();
        let lines: Vec<&str> = q.lines().collect();
        assert!(lines.len() > 10);
        assert!(lines
            .iter()
            .all(|l| l.chars().count() == lines[0].chars().count()));
        assert!(q.contains('▀') || q.contains('▄'));
    }
}
