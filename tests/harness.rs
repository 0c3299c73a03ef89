//! Checks the shared test harness itself: certificates chain as expected, config edits that
//! no longer match a template fail loudly.
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

#[test]
#[should_panic(expected = "occurs 0 times")]
fn replace_once_refuses_a_template_that_no_longer_matches() {
    support::replace_once("send_batch_size: 200", "send_batch_size: 100", "x");
}

#[test]
#[should_panic(expected = "occurs 2 times")]
fn replace_once_refuses_an_ambiguous_edit() {
    support::replace_once("a: 1\nb: 1\n", ": 1", ": 2");
}

#[test]
fn replace_once_edits_the_one_match() {
    assert_eq!(support::replace_once("a: 1\nb: 2\n", "b: 2", "b: 3"), "a: 1\nb: 3\n");
}
