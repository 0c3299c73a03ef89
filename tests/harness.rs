//! Checks the shared test harness itself: certificates chain as expected.
mod support;

#[test]
fn pki_makes_a_chain() {
    let ca = support::pki::Ca::new("root");
    let inter = ca.intermediate("inter");
    let leaf = inter.server();
    assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(leaf.key_pem.contains("PRIVATE KEY"));
    assert_ne!(ca.cert_pem, inter.cert_pem);
}
