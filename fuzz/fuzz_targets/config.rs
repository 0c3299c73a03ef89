//! Config text with env substitution: Ok or errors with messages, never a panic. The first
//! line of the input is the value every `${env:...}` reference resolves to.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (value, config) = text.split_once('\n').unwrap_or(("", text));
    let value = value.to_string();
    let lookup = move |_: &str| Some(value.clone());
    if let Err(errors) = otlp_relay::config::parse_str(config, &lookup) {
        assert!(errors.0.iter().all(|e| !e.message.is_empty()));
    }
});
