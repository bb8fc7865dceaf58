//! Test certificates made with the `openssl` command: a CA, and leaf
//! certificates it signs for one IP address (server and client use), with
//! their keys 0600 as the daemon requires of secrets.

use std::path::Path;
use std::process::Command;

/// Runs `openssl ARGS…` in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A CA `NAME.pem` / `NAME.key` in `dir`.
pub fn make_ca(dir: &Path, name: &str) {
    let (subj, key, pem) = (
        format!("/CN={name}"),
        format!("{name}.key"),
        format!("{name}.pem"),
    );
    let mut args = vec![
        "req", "-x509", "-days", "2", "-subj", &subj, "-keyout", &key, "-out", &pem,
    ];
    args.extend(EC);
    openssl(dir, &args);
}

/// `LEAF.pem` / `LEAF.key` (0600) in `dir` for the IP address `ip`, signed
/// by the CA `ca` (made by [`make_ca`]); each call gets a new serial.
pub fn make_leaf(dir: &Path, ca: &str, leaf: &str, ip: &str) {
    let (key, csr, pem) = (
        format!("{leaf}.key"),
        format!("{leaf}.csr"),
        format!("{leaf}.pem"),
    );
    let mut req = vec![
        "req",
        "-subj",
        "/CN=sixpn-test",
        "-keyout",
        &key,
        "-out",
        &csr,
    ];
    req.extend(EC);
    openssl(dir, &req);
    let ext = format!("{leaf}.ext");
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"),
    )
    .expect("write the extensions file");
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600))
        .expect("chmod the key");
}

/// Whether the `openssl` command runs here.
pub fn have_openssl() -> bool {
    Command::new("openssl").arg("version").output().is_ok()
}
